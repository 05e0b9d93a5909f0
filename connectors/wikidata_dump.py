"""Streaming reader for Wikimedia XML revision dumps, e.g. the daily incremental
`wikidatawiki-YYYYMMDD-pages-meta-hist-incr.xml.bz2` (local path; .bz2, .gz or plain XML).

Reads with `xml.etree.ElementTree.iterparse` over a bz2 stream and clears each page once it
is read, so memory stays flat however large the file. Yields one `DumpRevision` per
revision of a namespace-0 item; the entity text is parsed later (`kedit_core.diff.parse_entity`
reads both the current JSON and the legacy pre-2014 internal format found in old revisions).

Dumps carry no tags and no bot flag: `is_bot` is guessed from a user name ending in "bot"
(Wikidata's bot naming convention), and revert tags are absent, so reverts are found from edit
summaries and by content (see kedit_core.filters).
"""
from __future__ import annotations

import bz2
import gzip
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from kedit_core.revision import RevisionRef


@dataclass
class DumpRevision:
    ref: RevisionRef
    text: str | None  # None when the content was deleted / suppressed
    model: str = ""


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class CountingReader(io.RawIOBase):
    """Counts compressed bytes read, for a progress bar over the file size."""

    def __init__(self, fh: io.BufferedReader):
        self.fh, self.bytes_read = fh, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self.fh.readinto(b)
        self.bytes_read += n or 0
        return n


def open_dump(path: str | Path) -> tuple[io.BufferedIOBase, CountingReader]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dump file {p} does not exist")
    raw = CountingReader(open(p, "rb"))  # noqa: SIM115 (closed by the caller through the wrapper)
    buffered = io.BufferedReader(raw)
    if p.suffix == ".bz2":
        return bz2.BZ2File(buffered), raw
    if p.suffix == ".gz":
        return gzip.GzipFile(fileobj=buffered), raw
    return buffered, raw


def read_dump(path: str | Path, counter: list[CountingReader] | None = None) -> Iterator[DumpRevision]:
    """Revisions of namespace-0 pages, in file order (pages, then revisions oldest first)."""
    fh, raw = open_dump(path)
    if counter is not None:
        counter.append(raw)
    title, ns = "", -1
    root: ET.Element | None = None
    try:
        context = ET.iterparse(fh, events=("start", "end"))
        for event, elem in context:
            tag = _local(elem.tag)
            if event == "start":
                if root is None:
                    root = elem
                if tag == "page":
                    title, ns = "", -1
                continue
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = int(elem.text or -1)
            elif tag == "revision":
                if ns == 0:
                    yield _revision(title, elem)
                elem.clear()
            elif tag == "page":
                elem.clear()
                if root is not None:
                    root.clear()  # drop the emptied page too: memory stays flat over millions of pages
    finally:
        fh.close()


def _revision(title: str, rev: ET.Element) -> DumpRevision:
    fields: dict[str, ET.Element] = {_local(c.tag): c for c in rev}

    def text_of(name: str) -> str:
        el = fields.get(name)
        return (el.text or "") if el is not None else ""

    user, anon = "", False
    contributor = fields.get("contributor")
    if contributor is not None:
        parts = {_local(c.tag): (c.text or "") for c in contributor}
        if "username" in parts:
            user = parts["username"]
        elif "ip" in parts:
            user, anon = parts["ip"], True
    text_el = fields.get("text")
    hidden = text_el is None or text_el.get("deleted") is not None
    parent = int(text_of("parentid") or 0)
    ref = RevisionRef(
        item=title, revid=int(text_of("id")), old_revid=parent, timestamp=text_of("timestamp"), user=user,
        is_bot=user.lower().endswith("bot"), is_anon=anon, tags=(), comment=text_of("comment"),
        kind="edit" if parent else "new",
    )
    return DumpRevision(ref=ref, text=None if hidden else (text_el.text or ""), model=text_of("model"))


# --------------------------------------------------------------------------- which files

DUMP_SUFFIXES = (".xml", ".xml.bz2", ".xml.gz")


def dump_files(path: str | Path) -> list[Path]:
    """The dump files `path` names: one file, or every `*.xml[.bz2|.gz]` in a folder (by name,
    so daily `wikidatawiki-YYYYMMDD-pages-meta-hist-incr` files come in date order)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(DUMP_SUFFIXES))
        if not found:
            raise FileNotFoundError(f"dump folder {p} holds no {', '.join(DUMP_SUFFIXES)} file")
        return found
    raise FileNotFoundError(f"dump file {p} does not exist")


def dump_date(path: str | Path) -> datetime | None:
    """The date in a Wikimedia dump's file name (`wikidatawiki-20240502-...`), or None."""
    m = re.search(r"-(\d{8})-", Path(path).name)
    if not m:
        return None
    try:
        return datetime.strptime(m.group(1), "%Y%m%d")
    except ValueError:
        return None


def dump_may_hold(path: str | Path, start: datetime | str) -> bool:
    """Whether a dump file can hold revisions at or after `start`: a dump made on day D holds
    none from day D+1 on. Files without a date in their name are always read."""
    made = dump_date(path)
    s = start if isinstance(start, datetime) else datetime.strptime(start[:19], "%Y-%m-%dT%H:%M:%S")
    s = s.astimezone(timezone.utc).replace(tzinfo=None) if s.tzinfo else s
    return made is None or s < made + timedelta(days=1)
