"""Ingest Wikidata revisions into the ledger: fetch, diff, filter, store. Plain functions with
small return values; Prefect flows call them and decide when.

- `ingest_window(client, db, start, end, filter_config)`: recent changes in [start, end);
- `backfill_items(client, db, items, start, end, ...)`: per-item revision history, one day at a time;
- `ingest_dump(path, db, ...)`: a local incremental XML dump.

All three share `_Processor`, which works in batches of 50 revisions (the API's content
limit): one request for the batch's contents, one transaction for its results, then the
cursor moves. Idempotent on revision id (stored revisions are skipped) and resumable: a run
killed anywhere restarts from its cursor and, at worst, re-reads one batch that is then skipped.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flows.services.labels import CachedLabelLookup
from connectors.wikidata import BATCH, RevisionBatch, WikidataClient, iso
from connectors.wikidata_dump import read_dump
from kedit_core.diff import EntityFormatError, diff_entities, english_label, parse_entity, term_changes
from kedit_core.filters import (
    FilterConfig,
    RevertTracker,
    Verdict,
    candidate_mass_users,
    change_verdict,
    follow_verdict,
    mass_change_users,
    reverted_revisions,
    revision_verdict,
    scope_verdict,
)
from kedit_core.labels import LabelLookup
from kedit_core.revision import RevisionOutcome, RevisionRef
from storage import ledger, wikidata_store
from storage.db import Database

log = logging.getLogger(__name__)

# How far back Wikidata's `list=recentchanges` reaches ($wgRCMaxAge); older ranges need
# per-item history (`backfill_items`) or dumps (`ingest_dump`).
RECENT_CHANGES_DAYS = 30


@dataclass
class IngestReport:
    """Counts of one ingestion run (small, JSON-friendly: flows log and store it)."""

    revisions_seen: int = 0  # in the window
    revisions_already_stored: int = 0
    revisions_new: int = 0  # stored by this run
    revisions_filtered: int = 0
    revisions_failed: int = 0
    changes_new: int = 0
    changes_accepted: int = 0
    changes_filtered: int = 0
    changes_quarantined: int = 0
    requests: int = 0
    seconds: float = 0.0
    resumed_from: str | None = None
    reasons: dict[str, int] = field(default_factory=dict)  # top reasons, revision and change level

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reason_key(reason: str) -> str:
    # Group "reverted within 48h by revision 123" and friends under one key.
    return reason.split(" by revision")[0].split(":")[0].split(" (")[0][:60]


class _Processor:
    def __init__(self, db: Database, config: FilterConfig, labels: LabelLookup, report: IngestReport,
                 fetch: Callable[[list[int]], RevisionBatch], diff_filtered: bool = False,
                 commit_revisions: int = 1):
        self.db, self.config, self.labels, self.report, self.fetch = db, config, labels, report, fetch
        self.diff_filtered = diff_filtered
        # Batches are written together once this many revisions wait: each DuckDB transaction
        # costs a connection and a commit (~20-40 ms here), too much to pay every 50 revisions.
        self.commit_revisions = commit_revisions
        self._outcomes: list[RevisionOutcome] = []
        self._corrections: list[tuple[str, str]] = []
        self._cursor: tuple[str, str] | None = None
        self.tracker = RevertTracker(config)
        self.reasons: Counter[str] = Counter()
        # Entities of the previous batch: an item edited twice in a row needs its middle revision once.
        self._recent: dict[int, dict[str, Any] | None] = {}

    def needed(self, refs: Sequence[RevisionRef], reverted: dict[int, str], exclude: set[int]) -> list[int]:
        """Revisions whose content a batch will need (its judged-worthy revisions and their parents)."""
        want = set()
        for r in refs:
            if self.diff_filtered or revision_verdict(r, self.config, reverted).accepted:
                want |= {r.revid, r.old_revid}
        return sorted(x for x in want if x and x not in exclude)

    def _entities(self, revids: Iterable[int], prefetched: RevisionBatch | None = None) -> RevisionBatch:
        want = {r for r in revids if r}
        batch = RevisionBatch()
        for r in want:
            if r in self._recent:
                batch.entities[r] = self._recent[r]
            elif prefetched is not None and r in prefetched.entities:
                batch.entities[r] = prefetched.entities[r]
            elif prefetched is not None and r in prefetched.problems:
                batch.problems[r] = prefetched.problems[r]
        missing = sorted(want - set(batch.entities) - set(batch.problems))
        if missing:
            fetched = self.fetch(missing)
            batch.entities.update(fetched.entities)
            batch.problems.update(fetched.problems)
        return batch

    def process(self, refs: Sequence[RevisionRef], reverted: dict[int, str], suspicious: dict[str, str],
                cursor: tuple[str, str] | None = None, prefetched: RevisionBatch | None = None) -> None:
        """Diff, judge and store one batch; the cursor moves in the same transaction."""
        outcomes: list[RevisionOutcome] = []
        verdicts = {r.revid: revision_verdict(r, self.config, reverted) for r in refs}
        need = [r for r in refs if verdicts[r.revid].accepted or self.diff_filtered]
        batch = self._entities([x for r in need for x in (r.revid, r.old_revid)], prefetched)
        diffs: dict[int, tuple[list, set[str]]] = {}
        local_labels: dict[str, str] = {}
        for r in need:
            why = batch.problems.get(r.revid) or (batch.problems.get(r.old_revid) if r.old_revid else None)
            if why:
                continue
            new, old = batch.entities.get(r.revid), batch.entities.get(r.old_revid) if r.old_revid else None
            try:
                changes = diff_entities(old, new, revid=r.revid, timestamp=r.timestamp, old_revid=r.old_revid or None,
                                        subject=r.item)
                parts, lab = term_changes(old, new), english_label(new)
            except EntityFormatError as exc:
                batch.problems[r.revid] = f"cannot diff: {exc}"
                continue
            except (AttributeError, IndexError, KeyError, TypeError, ValueError, RecursionError) as exc:
                # A shape the entity checks do not know yet: this revision fails with the
                # reason, the window goes on (a crash here would fail the night on every retry).
                log.warning("revision %d of %s: cannot diff (%s: %s)", r.revid, r.item, type(exc).__name__, exc)
                batch.problems[r.revid] = f"cannot diff: {type(exc).__name__}: {exc}"
                continue
            diffs[r.revid] = (changes, parts)
            if lab:
                local_labels[r.item] = lab  # the body we hold names its own subject: no API call
        ids = {c.subject for ch, _ in diffs.values() for c in ch}
        ids |= {v["id"] for ch, _ in diffs.values() for c in ch for v in (c.old_value, c.new_value)
                if v and "id" in v and str(v["id"])[:1] in "QPL"}
        if isinstance(self.labels, CachedLabelLookup) and local_labels:
            self.labels.remember(local_labels)
        labels = dict(local_labels)
        missing = sorted(ids - set(labels))
        if missing:
            labels.update(self.labels(missing))
        late_reverts: list[tuple[str, str]] = []
        for r in refs:
            rv = verdicts[r.revid]
            why = batch.problems.get(r.revid) or (batch.problems.get(r.old_revid) if r.old_revid else None)
            if r.revid not in diffs and (rv.accepted or self.diff_filtered):
                side = "" if batch.problems.get(r.revid) else f"parent {r.old_revid}: "
                outcomes.append(RevisionOutcome(r, "failed", f"{side}{why or 'content unavailable'}"))
                continue
            if not rv.accepted and r.revid not in diffs:
                outcomes.append(RevisionOutcome(r, "filtered", rv.reason))
                continue
            changes, parts = diffs[r.revid]
            if rv.accepted:  # the sitelink floor needs the revision's entity, so it is judged here
                rv = follow_verdict(batch.entities.get(r.revid) or batch.entities.get(r.old_revid), self.config)
            if rv.accepted:
                rv = scope_verdict(changes, parts)
            judged = []
            for c in changes:
                v = rv if not rv.accepted else change_verdict(c, r, self.config, labels, suspicious)
                if v.accepted:
                    hit = self.tracker.observe(c)
                    if hit:
                        prior, why_prior, why_this = hit
                        late_reverts.append((prior.change_id, why_prior))
                        v = Verdict("filtered", why_this)
                judged.append((c, v.status, v.reason))
            outcomes.append(RevisionOutcome(r, "diffed" if rv.accepted else "filtered", rv.reason, judged))
        self._recent = {k: v for k, v in batch.entities.items() if k in {r.revid for r in refs}}
        self._outcomes.extend(outcomes)
        self._corrections.extend(late_reverts)
        self._cursor = cursor or self._cursor
        if len(self._outcomes) >= self.commit_revisions:
            self.flush()

    def flush(self) -> None:
        """Write waiting outcomes, their corrections, labels and the cursor in ONE transaction.
        A change stored accepted (now or earlier) and undone later is corrected here too."""
        if not self._outcomes and not self._corrections and self._cursor is None:
            return
        pending_labels = self.labels.drain() if isinstance(self.labels, CachedLabelLookup) else []
        new_revs, new_changes = wikidata_store.record_outcomes(
            self.db, self._outcomes, cursor=self._cursor, labels=pending_labels,
            corrections=[(cid, "filtered", why) for cid, why in self._corrections])
        self._count(self._outcomes, new_revs, new_changes, self._corrections)
        self._outcomes, self._corrections, self._cursor = [], [], None

    def _count(self, outcomes: list[RevisionOutcome], new_revs: int, new_changes: int,
               late: list[tuple[str, str]]) -> None:
        rep = self.report
        rep.revisions_new += new_revs
        rep.changes_new += new_changes
        for o in outcomes:
            if o.status == "filtered":
                rep.revisions_filtered += 1
            elif o.status == "failed":
                rep.revisions_failed += 1
            if o.reason:
                self.reasons[_reason_key(o.reason)] += 1
            for _, status, reason in o.changes:
                setattr(rep, f"changes_{status}", getattr(rep, f"changes_{status}") + 1)
                if reason and o.status != "filtered":
                    self.reasons[_reason_key(reason)] += 1
        for _, why in late:
            rep.changes_accepted -= 1
            rep.changes_filtered += 1
            self.reasons[_reason_key(why)] += 1
        rep.reasons = dict(self.reasons.most_common(12))


def _default_labels(client: WikidataClient | None, db: Database, labels: LabelLookup | None) -> LabelLookup:
    return labels if labels is not None else CachedLabelLookup(client, db)


def _parse(ts: datetime | str) -> datetime:
    if isinstance(ts, datetime):
        return ts.replace(tzinfo=None) if ts.tzinfo is None else ts
    return datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")


def _run_batches(proc: _Processor, todo: list[RevisionRef], reverted: dict[int, str], suspicious: dict[str, str],
                 batch_size: int, cursor_of: Callable[[RevisionRef], tuple[str, str] | None], desc: str,
                 progress: bool, prefetch: bool = False) -> None:
    """Process `todo` in batches. With `prefetch`, the next batch's contents are fetched while
    this one is diffed and stored: the API's latency hides behind our CPU work. Still one
    request at a time: the client serialises its requests."""
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    t0, done = time.monotonic(), 0
    with tqdm(total=len(todo), desc=desc, unit="rev", disable=not progress, leave=False) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="wikidata-prefetch") as pool:
        ahead: Future | None = None
        if prefetch and chunks:
            ahead = pool.submit(proc.fetch, proc.needed(chunks[0], reverted, set()))
        for i, chunk in enumerate(chunks):
            pre = ahead.result() if ahead is not None else None
            ahead = None
            if prefetch and i + 1 < len(chunks):
                # Revisions of this chunk reach the next one through the processor's memory.
                ahead = pool.submit(proc.fetch, proc.needed(chunks[i + 1], reverted, {r.revid for r in chunk}))
            proc.process(chunk, reverted, suspicious, cursor_of(chunk[-1]), pre)
            bar.update(len(chunk))
            done += len(chunk)
            if not progress and i % 200 == 199:
                log.info("%s: %d/%d revisions, %.0f rev/s", desc, done, len(todo), done / (time.monotonic() - t0))
    proc.flush()


# --------------------------------------------------------------------------- recent changes


def ingest_window(client: WikidataClient, db: Database, start: datetime | str, end: datetime | str,
                  filter_config: FilterConfig | None = None, *, labels: LabelLookup | None = None,
                  cursor_name: str = "wikidata:recentchanges", batch_size: int = BATCH,
                  diff_filtered: bool = False, resume: bool = True, prefetch: bool = True,
                  commit_revisions: int = 500, progress: bool = False) -> IngestReport:
    """Fetch, diff, filter and store every revision of [start, end). Re-running adds nothing;
    a killed run resumes from its cursor (`resume=False` re-reads the whole window, still
    skipping stored revisions). Results are committed every `commit_revisions` revisions
    (with the cursor, in one transaction); a kill loses at most that much work, redone on resume. Edits up to `settle_hours` after `end` are read
    too, only to see whether an edit of the window was reverted."""
    cfg = filter_config or FilterConfig()
    t0, req0 = time.monotonic(), client.stats.requests
    start_s, end_s = iso(_parse(start)), iso(_parse(end))
    report = IngestReport()
    cursor = ledger.get_cursor(db, cursor_name)
    begin = start_s
    if cursor and resume:
        state = json.loads(cursor)
        if state.get("start") == start_s and state.get("end") == end_s and state.get("done_until"):
            begin = state["done_until"]
            report.resumed_from = begin
    lookahead = iso(_parse(end_s) + timedelta(hours=cfg.settle_hours))
    refs = sorted(client.recent_changes(begin, lookahead), key=lambda r: (r.timestamp, r.revid))
    in_window = [r for r in refs if r.timestamp < end_s]
    report.revisions_seen = len(in_window)
    if not in_window and _parse(start_s) < datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(
            days=RECENT_CHANGES_DAYS):
        log.warning("no recent changes in %s..%s: the API keeps ~%d days; use backfill_items or ingest_dump "
                    "for older ranges", start_s, end_s, RECENT_CHANGES_DAYS)
    reverted = reverted_revisions(refs, cfg)
    candidates = candidate_mass_users(in_window, cfg)
    suspicious = mass_change_users(in_window, client.users_info(candidates), cfg) if candidates else {}
    known = wikidata_store.known_revids(db, [r.revid for r in in_window])
    report.revisions_already_stored = len(known)
    todo = [r for r in in_window if r.revid not in known]
    proc = _Processor(db, cfg, _default_labels(client, db, labels), report, client.fetch_revisions, diff_filtered,
                      commit_revisions)

    def cursor_of(last: RevisionRef) -> tuple[str, str]:
        return cursor_name, json.dumps({"start": start_s, "end": end_s, "done_until": last.timestamp})

    _run_batches(proc, todo, reverted, suspicious, batch_size, cursor_of, f"wikidata {start_s[:10]}", progress,
                 prefetch=prefetch)
    ledger.set_cursor(db, cursor_name, json.dumps({"start": start_s, "end": end_s, "done_until": end_s}))
    report.requests = client.stats.requests - req0
    report.seconds = round(time.monotonic() - t0, 3)
    return report


# --------------------------------------------------------------------------- backfill


def _days(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    out, day = [], start
    while day < end:
        out.append((day, min(end, day + timedelta(days=1))))
        day += timedelta(days=1)
    return out


def backfill_items(client: WikidataClient, db: Database, items: Sequence[str], start: datetime | str,
                   end: datetime | str, filter_config: FilterConfig | None = None, *,
                   labels: LabelLookup | None = None, cursor_name: str = "wikidata:backfill",
                   progress: bool = True) -> IngestReport:
    """Revision history of `items` in [start, end), one day at a time (older than recent changes'
    30 days). Resumes at the first day not finished; each day is idempotent on revision id."""
    cfg = filter_config or FilterConfig()
    t0, req0 = time.monotonic(), client.stats.requests
    s, e = _parse(start), _parse(end)
    key = {"items": sorted(items), "start": iso(s), "end": iso(e)}
    report = IngestReport()
    cursor = ledger.get_cursor(db, cursor_name)
    done_until = s
    if cursor:
        state = json.loads(cursor)
        if {k: state.get(k) for k in key} == key:
            done_until = _parse(state["done_until"])
            report.resumed_from = state["done_until"]
    proc = _Processor(db, cfg, _default_labels(client, db, labels), report, client.fetch_revisions)
    days = [d for d in _days(s, e) if d[1] > done_until]
    for day_start, day_end in tqdm(days, desc="backfill days", unit="day", disable=not progress):
        refs: list[RevisionRef] = []
        contents = RevisionBatch()
        for item in items:
            for page in client.item_revisions(item, day_start, day_end):
                refs.extend(page.refs.values())
                contents.entities.update(page.entities)
                contents.problems.update(page.problems)
        refs.sort(key=lambda r: (r.timestamp, r.revid))

        def fetch(revids: list[int], contents: RevisionBatch = contents) -> RevisionBatch:
            got = RevisionBatch()
            missing = [r for r in revids if r not in contents.entities and r not in contents.problems]
            if missing:  # parents from before the day
                extra = client.fetch_revisions(missing)
                contents.entities.update(extra.entities)
                contents.problems.update(extra.problems)
            for r in revids:
                if r in contents.problems:
                    got.problems[r] = contents.problems[r]
                elif r in contents.entities:
                    got.entities[r] = contents.entities[r]
            return got

        proc.fetch = fetch
        report.revisions_seen += len(refs)
        known = wikidata_store.known_revids(db, [r.revid for r in refs])
        report.revisions_already_stored += len(known)
        todo = [r for r in refs if r.revid not in known]
        _run_batches(proc, todo, reverted_revisions(refs, cfg), {}, BATCH, lambda _r: None,
                     f"backfill {iso(day_start)[:10]}", False)
        if isinstance(proc.labels, CachedLabelLookup):
            proc.labels.flush()
        ledger.set_cursor(db, cursor_name, json.dumps({**key, "done_until": iso(day_end)}))
    report.requests = client.stats.requests - req0
    report.seconds = round(time.monotonic() - t0, 3)
    return report


# --------------------------------------------------------------------------- dumps

def ingest_dump(path: str | Path, db: Database, filter_config: FilterConfig | None = None, *,
                client: WikidataClient | None = None, labels: LabelLookup | None = None,
                start: datetime | str | None = None, end: datetime | str | None = None,
                cursor_name: str | None = None, progress: bool = True) -> IngestReport:
    """Ingest the revisions of one local XML dump (e.g. a daily `pages-meta-hist-incr.xml.bz2`).

    A revision whose parent is not in the file (the first of each page in an incremental dump)
    is diffed against the parent fetched with `client` at that revision (the ledger keeps
    revisions and fact changes, not entity bodies); without a client it is recorded as failed
    with that reason. A parent earlier in the file is read from the file, even when it lies
    before `start`. `start`/`end` keep only revisions in that range. Resumable: the cursor
    holds the number of dump revisions already committed (and, once the file is read to its
    end, that it is complete: a re-run returns at once), so a caller reading one file in
    several ranges gives each range its own `cursor_name` (the default names the file only)."""
    cfg = filter_config or FilterConfig()
    t0 = time.monotonic()
    req0 = client.stats.requests if client else 0
    report = IngestReport()
    p = Path(path)
    cursor_name = cursor_name or f"wikidata:dump:{p.name}"
    skip, complete = _dump_cursor(db, cursor_name)
    if complete:  # read to its end before: nothing to do, not even reading it
        report.resumed_from = f"the end of {p.name} (revision #{skip})"
        return report
    if skip:
        report.resumed_from = f"revision #{skip} of {p.name}"
    texts = _DumpTexts(client)
    proc = _Processor(db, cfg, _default_labels(client, db, labels), report, texts.fetch)
    position = _read_dump_in_batches(p, proc, texts, cfg, cursor_name, skip,
                                     iso(_parse(start)) if start else "", iso(_parse(end)) if end else "\uffff",
                                     progress)
    # The whole file is read: a re-run with this cursor (a resumed chunk) skips it outright.
    ledger.set_cursor(db, cursor_name, json.dumps({"done": position, "complete": True}))
    report.requests = (client.stats.requests - req0) if client else 0
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _dump_cursor(db: Database, cursor_name: str) -> tuple[int, bool]:
    """(dump revisions already committed, whether the file was read to its end)."""
    cursor = ledger.get_cursor(db, cursor_name)
    state = json.loads(cursor) if cursor else {}
    return int(state.get("done", 0)), bool(state.get("complete"))


class _DumpTexts:
    """The entity texts of the dump's recent revisions, and `fetch` for the processor: a
    revision's text from the file when it holds it, else from the API client (a parent from
    before the incremental dump), else a recorded problem."""

    def __init__(self, client: WikidataClient | None) -> None:
        self.client = client
        self.texts: dict[int, str | None] = {}

    def add(self, revid: int, text: str | None) -> None:
        self.texts[revid] = text
        # Bounded memory: parents come just before their children in a dump, and a batch
        # holds at most BATCH revisions, so the last few hundred texts are all ever needed.
        while len(self.texts) > 4 * BATCH:
            del self.texts[next(iter(self.texts))]

    def fetch(self, revids: list[int]) -> RevisionBatch:
        got = RevisionBatch()
        remote = []
        for r in revids:
            if r not in self.texts:
                remote.append(r)
            elif self.texts[r] is None:
                got.problems[r] = "content hidden (revision deleted or suppressed)"
            else:
                try:
                    got.entities[r] = parse_entity(self.texts[r])
                except EntityFormatError as exc:
                    got.problems[r] = f"unreadable entity JSON: {exc}"
        if remote and self.client is not None:
            extra = self.client.fetch_revisions(remote)
            got.entities.update(extra.entities)
            got.problems.update(extra.problems)
        else:
            for r in remote:
                got.problems[r] = "revision not in the dump and no API client to fetch it"
        return got


def _read_dump_in_batches(p: Path, proc: _Processor, texts: _DumpTexts, cfg: FilterConfig, cursor_name: str,
                          skip: int, lo: str, hi: str, progress: bool) -> int:
    """Read the file once, processing its revisions in [lo, hi) after the first `skip` in
    batches of BATCH (each batch commits with the cursor at its position); returns the
    number of revisions the file holds."""
    db, report = proc.db, proc.report
    counters: list = []
    pending: list[RevisionRef] = []
    position = 0
    bar = tqdm(total=p.stat().st_size, desc=f"dump {p.name}", unit="B", unit_scale=True, disable=not progress)

    def flush() -> None:
        nonlocal pending
        if not pending:
            return
        known = wikidata_store.known_revids(db, [r.revid for r in pending])
        report.revisions_already_stored += len(known)
        todo = [r for r in pending if r.revid not in known]
        proc.process(todo, reverted_revisions(pending, cfg), {}, (cursor_name, json.dumps({"done": position})))
        proc.flush()
        pending = []
        if counters:
            bar.n = counters[0].bytes_read
            bar.refresh()

    try:
        for rev in read_dump(p, counters):
            position += 1
            texts.add(rev.ref.revid, rev.text)
            if position <= skip or not (lo <= rev.ref.timestamp < hi):
                continue
            report.revisions_seen += 1
            pending.append(rev.ref)
            if len(pending) >= BATCH:
                flush()
        flush()
    finally:
        bar.close()
    return position
