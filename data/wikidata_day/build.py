"""Build the recorded demo day in this folder from the real entity bodies in
tests/fixtures/wikidata/ (copied byte for byte from public projects, see SOURCES.md there).

Run: python data/wikidata_day/build.py   (deterministic; rewrites the folder's JSON files)

Real: the entity bodies used as "before" revisions and Q42's "after" body. Constructed here,
and said so in SOURCES.md: every second revision except Q42's, all revision ids after 2e9,
timestamps, users, comments, tags, the recent-changes rows, labels of placeholder items
(ids Q999000101..), and users.json. Bodies are trimmed to keep the folder small: only English
terms, no references, only the enwiki sitelink.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REAL = HERE.parents[1] / "tests" / "fixtures" / "wikidata"
DAY = "2024-05-01"
WD = "http://www.wikidata.org/entity/"


def load(name: str, eid: str | None = None) -> dict:
    d = json.loads((REAL / name).read_text(encoding="utf-8"))
    if "entities" in d:
        d = d["entities"][eid]
    return d


def trim(e: dict) -> dict:
    """English terms only, no references, enwiki only: the facts stay as recorded."""
    e = copy.deepcopy(e)
    for part in ("labels", "descriptions", "aliases"):
        e[part] = {k: v for k, v in (e.get(part) or {}).items() if k == "en"}
    e["sitelinks"] = {k: v for k, v in (e.get("sitelinks") or {}).items() if k == "enwiki"}
    for stmts in (e.get("claims") or {}).values():
        for s in stmts:
            s.pop("references", None)
    for k in ("pageid", "ns", "title", "lastrevid", "modified"):
        e.pop(k, None)
    return e


def item(qid: str) -> dict:
    n = int(qid[1:])
    return {"type": "wikibase-entityid", "value": {"entity-type": "item", "numeric-id": n, "id": qid}}


def time_value(t: str, precision: int = 11) -> dict:
    return {"type": "time", "value": {"time": t, "timezone": 0, "before": 0, "after": 0, "precision": precision,
                                      "calendarmodel": WD + "Q1985727"}}


def snak(pid: str, datatype: str, datavalue: dict) -> dict:
    return {"snaktype": "value", "property": pid, "datatype": datatype, "datavalue": datavalue}


def statement(qid: str, guid: str, pid: str, datatype: str, datavalue: dict, rank: str = "normal",
              qualifiers: dict | None = None) -> dict:
    s = {"mainsnak": snak(pid, datatype, datavalue), "type": "statement", "id": f"{qid}${guid}", "rank": rank}
    if qualifiers:
        s["qualifiers"] = qualifiers
        s["qualifiers-order"] = list(qualifiers)
    return s


# ----------------------------------------------------------------------------- bodies

q42_old = trim(load("wbgetentities-Q6-Q42-P31.json", "Q42"))  # real, revision 196015688
q42_new = trim(load("wbgetentities-Douglas-Adams.json", "Q42"))  # real, later (undated) revision

karlsruhe_0 = trim(load("wbgetentities-Q32063953.json", "Q32063953"))  # real Q1040, revision 619336121
karlsruhe_1 = copy.deepcopy(karlsruhe_0)  # constructed: a new head of government
for s in karlsruhe_1["claims"]["P6"]:
    if s["mainsnak"]["datavalue"]["value"]["id"] == "Q1443774":
        s["rank"] = "normal"
        s.setdefault("qualifiers", {})["P582"] = [snak("P582", "time", time_value("+2024-05-01T00:00:00Z"))]
karlsruhe_1["claims"]["P6"].append(statement(
    "Q1040", "5B2C1D7E-0A11-4C55-9F00-000000000001", "P6", "wikibase-item", item("Q999000101"), "preferred",
    {"P580": [snak("P580", "time", time_value("+2024-05-01T00:00:00Z"))]}))
karlsruhe_2 = copy.deepcopy(karlsruhe_1)  # constructed: a population update
for s in karlsruhe_2["claims"]["P1082"]:
    s["rank"] = "normal"
karlsruhe_2["claims"]["P1082"].append(statement(
    "Q1040", "5B2C1D7E-0A11-4C55-9F00-000000000002", "P1082", "quantity",
    {"type": "quantity", "value": {"amount": "+308707", "unit": "1"}}, "preferred",
    {"P585": [snak("P585", "time", time_value("+2023-12-31T00:00:00Z"))]}))

new_mayor = {"type": "item", "id": "Q999000101",  # constructed: the new item for the new mayor
             "labels": {"en": {"language": "en", "value": "Lena Hartmann"}},
             "descriptions": {"en": {"language": "en", "value": "German politician, mayor of Karlsruhe (placeholder)"}},
             "aliases": {}, "sitelinks": {},
             "claims": {"P31": [statement("Q999000101", "A1", "P31", "wikibase-item", item("Q5"))],
                        "P106": [statement("Q999000101", "A2", "P106", "wikibase-item", item("Q82955"))]}}

kahn_0 = trim(load("wbgetentities-Oliver-Kahn.json", "Q131261"))  # real Q131261
kahn_1 = copy.deepcopy(kahn_0)  # constructed: a transfer (P54) with P580/P582
for s in kahn_1["claims"]["P54"]:
    if s["mainsnak"]["datavalue"]["value"].get("numeric-id") == 15789:
        s.setdefault("qualifiers", {})["P582"] = [snak("P582", "time", time_value("+2024-04-30T00:00:00Z"))]
kahn_1["claims"]["P54"].append(statement(
    "Q131261", "5B2C1D7E-0A11-4C55-9F00-000000000003", "P54", "wikibase-item", item("Q999000102"), "normal",
    {"P580": [snak("P580", "time", time_value("+2024-05-01T00:00:00Z"))]}))

roth_0 = trim(load("entity-Q328212.json"))  # real Q328212, revision 241827923
roth_1 = copy.deepcopy(roth_0)  # constructed: a new award
roth_1["claims"]["P166"] = [statement(
    "Q328212", "5B2C1D7E-0A11-4C55-9F00-000000000004", "P166", "wikibase-item", item("Q999000103"), "normal",
    {"P585": [snak("P585", "time", time_value("+2024-00-00T00:00:00Z", 9))]})]
roth_2 = copy.deepcopy(roth_1)  # constructed: profanity replacing the birth name, by a new account
roth_2["claims"]["P1477"][0]["mainsnak"]["datavalue"]["value"] = {"language": "en", "text": "Veronica Fuckface"}

book_0 = trim(load("entity-Q571.json"))  # real Q571, revision 422538507
book_1 = copy.deepcopy(book_0)  # constructed vandalism: "publication" replaced
for s in book_1["claims"]["P279"]:
    if s["mainsnak"]["datavalue"]["value"]["id"] == "Q732577":
        s["mainsnak"]["datavalue"] = item("Q999000104")
book_2 = copy.deepcopy(book_0)  # constructed: the undo restores the recorded body

bielefeld_0 = trim(load("entity-Q2112.json"))  # real Q2112, revision 363579534
bielefeld_1 = copy.deepcopy(bielefeld_0)  # constructed: a bot adds an identifier
bielefeld_1["claims"]["P402"] = [statement(
    "Q2112", "5B2C1D7E-0A11-4C55-9F00-000000000005", "P402", "external-id", {"type": "string", "value": "62646"})]

chr_0 = trim(load("entity-Q646148.json"))  # real Q646148, revision 423448236
chr_1 = copy.deepcopy(chr_0)  # constructed: description-only edit
chr_1["descriptions"]["en"]["value"] = "Danish politician and European Commissioner (1931-2016)"

# ----------------------------------------------------------------------------- revisions
# (revid, parentid, title, pageid, time-of-day, user, flags, tags, comment, body)
BASE = [
    (196015688, 0, "Q42", 138, "2015-02-13T00:11:48Z", q42_old),
    (619336121, 0, "Q1040", 1374, "2018-01-12T15:50:54Z", karlsruhe_0),
    (2150000001, 0, "Q131261", 127473, "2024-03-02T08:00:00Z", kahn_0),
    (241827923, 0, "Q328212", 314890, "2015-08-15T15:13:13Z", roth_0),
    (422538507, 0, "Q571", 698, "2016-12-30T12:28:43Z", book_0),
    (363579534, 0, "Q2112", 3244, "2016-08-12T09:00:51Z", bielefeld_0),
    (423448236, 0, "Q646148", 612343, "2017-01-02T06:57:50Z", chr_0),
]
EDITS = [
    # revid, parent, title, pageid, time, user, kind, extra flags, tags, comment, body
    (2150000101, 196015688, "Q42", 138, "00:41:07", "ExampleEditor", "edit", {}, [],
     "/* wbeditentity-update:0| */ statements from the later recorded revision", q42_new),
    (2150000102, 0, "Q999000101", 999000101, "08:55:12", "Stadtchronist", "new", {}, [],
     "/* wbeditentity-create-item:0| */", new_mayor),
    (2150000103, 619336121, "Q1040", 1374, "09:02:40", "Stadtchronist", "edit", {}, [],
     "/* wbeditentity-update:0| */ new mayor took office", karlsruhe_1),
    (2150000104, 2150000001, "Q131261", 127473, "10:15:00", "KickerFan", "edit", {}, [],
     "/* wbeditentity-update:0| */ transfer", kahn_1),
    (2150000105, 241827923, "Q328212", 314890, "11:20:31", "LitEditor", "edit", {}, [],
     "/* wbcreateclaim-create:1| */ [[Property:P166]]: [[Q999000103]]", roth_1),
    (2150000106, 422538507, "Q571", 698, "12:00:05", "203.0.113.45", "edit", {"anon": True}, ["mw-reverted"],
     "/* wbsetclaim-update:2||1 */ [[Property:P279]]: [[Q999000104]]", book_1),
    (2150000107, 2150000106, "Q571", 698, "12:21:44", "Patroller", "edit", {}, ["mw-undo"],
     "/* undo:0||2150000106|203.0.113.45 */", book_2),
    (2150000108, 363579534, "Q2112", 3244, "13:05:09", "KrBot", "edit", {"bot": True}, [],
     "/* wbcreateclaim-create:1| */ [[Property:P402]]: 62646", bielefeld_1),
    (2150000109, 2150000103, "Q1040", 1374, "14:30:00", "Stadtchronist", "edit", {}, [],
     "/* wbeditentity-update:0| */ population 2023", karlsruhe_2),
    (2150000110, 423448236, "Q646148", 612343, "15:45:51", "ExampleEditor", "edit", {"minor": True}, [],
     "/* wbsetdescription-set:1|en */ Danish politician and European Commissioner (1931-2016)", chr_1),
    (2150000111, 2150000105, "Q328212", 314890, "17:03:27", "Xyzzy2024", "edit", {}, [],
     "/* wbsetclaim-update:2||1 */ [[Property:P1477]]", roth_2),
    (2150000112, 2150000108, "Q2112", 3244, "18:10:10", "ExampleEditor", "edit", {}, [],
     "(edit summary removed)", None),  # content suppressed after the fact
]

# Labels: subjects from the real bodies; values marked (k) from general knowledge, (p) placeholders.
VALUE_LABELS = {
    "Q1443774": ("Frank Mentrup", "German politician"),  # (k)
    "Q15789": ("FC Bayern Munich", "association football club in Munich, Germany"),  # (k)
    "Q105853": ("Karlsruher SC", "association football club"),  # (k)
    "Q902712": ("Dirk Gently's Holistic Detective Agency", "novel by Douglas Adams"),  # (k)
    "Q732577": ("publication", "content made available to the general public"),  # (k)
    "Q5": ("human", "any member of Homo sapiens"),  # (k)
    "Q82955": ("politician", "person involved in politics"),  # (k)
    "Q999000102": ("SV Rheinau 1921", "football club (placeholder)"),  # (p)
    "Q999000103": ("Northern Lights Fiction Prize", "literary award (placeholder)"),  # (p)
    "Q999000104": ("stinky garbage", "vandal's placeholder item"),  # (p)
}
USERS = {
    "ExampleEditor": {"editcount": 48213, "registration": "2013-06-02T10:00:00Z"},
    "Stadtchronist": {"editcount": 5120, "registration": "2016-01-20T09:00:00Z"},
    "KickerFan": {"editcount": 910, "registration": "2019-08-11T12:00:00Z"},
    "LitEditor": {"editcount": 2210, "registration": "2014-03-03T08:00:00Z"},
    "Patroller": {"editcount": 150002, "registration": "2012-11-01T00:00:00Z"},
    "KrBot": {"editcount": 9000000, "registration": "2014-01-01T00:00:00Z"},
    "Xyzzy2024": {"editcount": 3, "registration": "2024-04-30T22:10:00Z"},
}
PAGE_SIZE = 5


def write_rev(revdir: Path, revid, parent, title, pageid, ts, user, tags, comment, body, extra=None) -> None:
    """One recorded revision file as the replay server serves it (a hidden body: `texthidden`)."""
    rev = {"revid": revid, "parentid": parent, "timestamp": ts, "user": user, "comment": comment, "tags": tags}
    rev.update(extra or {})
    rec = {"title": title, "pageid": pageid, "revision": rev}
    if body is None:
        rev["texthidden"] = True
    else:
        rec["entity"] = body
    (revdir / f"{revid}.json").write_text(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n",
                                          encoding="utf-8")


def main() -> None:
    revdir = HERE / "revisions"
    revdir.mkdir(exist_ok=True)
    for f in revdir.glob("*.json"):
        f.unlink()

    for revid, parent, title, pageid, ts, body in BASE:
        write_rev(revdir, revid, parent, title, pageid, ts, "RecordedUser", [], "", body)
    rows = []
    for i, (revid, parent, title, pageid, tod, user, kind, flags, tags, comment, body) in enumerate(EDITS):
        ts = f"{DAY}T{tod}Z"
        write_rev(revdir, revid, parent, title, pageid, ts, user, tags, comment, body,
                  {"anon": True} if flags.get("anon") else None)
        row = {"type": kind, "ns": 0, "title": title, "pageid": pageid, "revid": revid, "old_revid": parent,
               "rcid": 2300000001 + i, "user": user, "bot": bool(flags.get("bot")), "new": kind == "new",
               "minor": bool(flags.get("minor")), "timestamp": ts, "comment": comment, "tags": tags}
        if flags.get("anon"):
            row["anon"] = True
        if body is None:
            row["commenthidden"] = True
            row["comment"] = ""
        rows.append(row)
    for f in HERE.glob("recentchanges-*.json"):
        f.unlink()
    pages = [rows[i:i + PAGE_SIZE] for i in range(0, len(rows), PAGE_SIZE)]
    for n, page in enumerate(pages, 1):
        answer: dict = {"batchcomplete": True, "query": {"recentchanges": page}}
        if n < len(pages):
            nxt = pages[n][0]
            answer = {"batchcomplete": True,
                      "continue": {"rccontinue": f"{nxt['timestamp']}|{nxt['rcid']}", "continue": "-||"},
                      "query": {"recentchanges": page}}
        (HERE / f"recentchanges-{n}.json").write_text(json.dumps(answer, indent=1, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")

    entities = {}
    for body in [q42_new, karlsruhe_2, new_mayor, kahn_1, roth_2, book_0, bielefeld_1, chr_1]:
        entities[body["id"]] = {"id": body["id"], "type": "item", "labels": body.get("labels", {}),
                                "descriptions": body.get("descriptions", {}), "aliases": body.get("aliases", {})}
    for qid, (label, desc) in VALUE_LABELS.items():
        entities[qid] = {"id": qid, "type": "item", "labels": {"en": {"language": "en", "value": label}},
                         "descriptions": {"en": {"language": "en", "value": desc}}, "aliases": {}}
    (HERE / "labels.json").write_text(json.dumps({"entities": entities, "success": 1}, indent=1,
                                                 ensure_ascii=False) + "\n", encoding="utf-8")
    (HERE / "users.json").write_text(json.dumps(USERS, indent=1) + "\n", encoding="utf-8")
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    print(f"wrote {len(rows)} recent changes in {len(pages)} pages, {len(BASE) + len(EDITS)} revisions; "
          f"folder {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
