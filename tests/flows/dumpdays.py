"""Three days of Wikidata incremental XML dumps, built from the recorded day's real entity
bodies (data/wikidata_day, see its SOURCES.md), and a copy of that recording for the replay
server that also serves the dumps' revisions (Wikidata's API has every revision a dump has).

Constructed (not real-world events; written out in tests/fixtures/wikidata/SOURCES.md):
the revisions 2150000301..2150000306 below, their timestamps, users and comments. Each body
is a real body of the recording (the "after" side of one of its constructed edits); each
page's first revision in the dumps has a real or recorded parent that only the API holds.

| revid      | day        | item    | parent                 | body (recorded revision) | expected             |
|------------|------------|---------|------------------------|--------------------------|----------------------|
| 2150000301 | 2024-05-02 | Q1040   | 619336121 (API)        | 2150000103 new mayor     | P6 updated           |
| 2150000302 | 2024-05-02 | Q42     | 196015688 (API)        | 2150000101 later Q42     | 4 statements added   |
| 2150000303 | 2024-05-03 | Q1040   | 2150000301 (day 1)     | 2150000109 population    | P1082 updated        |
| 2150000304 | 2024-05-03 | Q131261 | 2150000001 (API)       | 2150000104 transfer      | P54 updated          |
| 2150000305 | 2024-05-04 | Q328212 | 241827923 (API)        | 2150000105 award         | P166 added           |
| 2150000306 | 2024-05-04 | Q2112   | 363579534 (API)        | 2150000108 bot edit      | filtered (bot)       |

`write_daily_dumps` writes one `wikidatawiki-YYYYMMDD-pages-meta-hist-incr.xml.bz2` per day
(so 2150000303's parent is in the previous day's file: fetched from the API), and
`write_one_dump` all three days in one file (pages, then revisions oldest first, as a
dump orders them: there 2150000303's parent is read from the file).
"""
from __future__ import annotations

import bz2
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape

from tests.conftest import WIKIDATA_DAY

DAYS = ["2024-05-02", "2024-05-03", "2024-05-04"]
# revid -> (item, pageid, parent, timestamp, user, comment, recorded revision whose body it has)
REVISIONS = {
    2150000301: ("Q1040", 1374, 619336121, "2024-05-02T10:00:00Z", "Stadtchronist",
                 "/* wbeditentity-update:0| */ new mayor took office", 2150000103),
    2150000302: ("Q42", 138, 196015688, "2024-05-02T12:00:00Z", "ExampleEditor",
                 "/* wbeditentity-update:0| */ statements from the later recorded revision", 2150000101),
    2150000303: ("Q1040", 1374, 2150000301, "2024-05-03T09:00:00Z", "Stadtchronist",
                 "/* wbeditentity-update:0| */ population 2023", 2150000109),
    2150000304: ("Q131261", 127473, 2150000001, "2024-05-03T15:00:00Z", "KickerFan",
                 "/* wbeditentity-update:0| */ transfer", 2150000104),
    2150000305: ("Q328212", 314890, 241827923, "2024-05-04T08:00:00Z", "LitEditor",
                 "/* wbcreateclaim-create:1| */ [[Property:P166]]: [[Q999000103]]", 2150000105),
    2150000306: ("Q2112", 3244, 363579534, "2024-05-04T11:00:00Z", "KrBot",
                 "/* wbcreateclaim-create:1| */ [[Property:P402]]: 62646", 2150000108),
}
FIRST_OF_PAGE_IN_DAY = [2150000301, 2150000302, 2150000303, 2150000304, 2150000305, 2150000306]
ACCEPTED_BY_DAY = {"2024-05-02": 5, "2024-05-03": 2, "2024-05-04": 1}  # fact changes accepted per day


def day(n: int) -> datetime:
    """2024-05-0n, 00:00 UTC."""
    return datetime(2024, 5, n, tzinfo=timezone.utc)


def _body(revid: int) -> dict:
    return json.loads((WIKIDATA_DAY / "revisions" / f"{revid}.json").read_text(encoding="utf-8"))["entity"]


def build_replay_folder(folder: Path) -> Path:
    """The recorded day plus the dumps' revisions, servable by `connectors.replay.ReplayServer`."""
    shutil.copytree(WIKIDATA_DAY, folder)
    for revid, (item, pageid, parent, ts, user, comment, body_of) in REVISIONS.items():
        rec = {"title": item, "pageid": pageid, "entity": _body(body_of),
               "revision": {"revid": revid, "parentid": parent, "timestamp": ts, "user": user,
                            "comment": comment, "tags": []}}
        (folder / "revisions" / f"{revid}.json").write_text(json.dumps(rec), encoding="utf-8")
    return folder


def _xml(revids: list[int]) -> str:
    """A MediaWiki export (schema 0.11) of `revids`: pages in first-seen order, revisions oldest first."""
    pages: dict[str, list[int]] = {}
    for r in revids:
        pages.setdefault(REVISIONS[r][0], []).append(r)
    out = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="en">',
           "  <siteinfo><sitename>Wikidata</sitename><dbname>wikidatawiki</dbname></siteinfo>"]
    for title, revs in pages.items():
        out.append(f"  <page><title>{title}</title><ns>0</ns><id>{REVISIONS[revs[0]][1]}</id>")
        for r in sorted(revs, key=lambda x: REVISIONS[x][3]):
            _, _, parent, ts, user, comment, body_of = REVISIONS[r]
            text = escape(json.dumps(_body(body_of), ensure_ascii=False, separators=(",", ":")))
            out.append(f"    <revision><id>{r}</id><parentid>{parent}</parentid><timestamp>{ts}</timestamp>"
                       f"<contributor><username>{escape(user)}</username><id>7</id></contributor>"
                       f"<comment>{escape(comment)}</comment><model>wikibase-item</model>"
                       f"<format>application/json</format><text bytes=\"{len(text)}\" xml:space=\"preserve\">"
                       f"{text}</text><sha1>0</sha1></revision>")
        out.append("  </page>")
    out.append("</mediawiki>")
    return "\n".join(out) + "\n"


def write_daily_dumps(folder: Path) -> Path:
    """One incremental dump per day in `folder`, named as Wikimedia names them."""
    folder.mkdir(parents=True, exist_ok=True)
    for d in DAYS:
        revids = [r for r, v in REVISIONS.items() if v[3].startswith(d)]
        name = f"wikidatawiki-{d.replace('-', '')}-pages-meta-hist-incr.xml.bz2"
        (folder / name).write_bytes(bz2.compress(_xml(revids).encode("utf-8")))
    return folder


def write_one_dump(path: Path) -> Path:
    """All three days in one plain XML file (no date in its name: read for every chunk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_xml(sorted(REVISIONS)), encoding="utf-8")
    return path
