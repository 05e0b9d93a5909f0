"""SQL for the Wikidata connector: revisions seen, fact changes with their verdicts, and the
English label cache. Writes are idempotent on their keys (revision id, change id, entity id)
and one batch is one transaction, so a killed ingestion leaves whole batches or nothing."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from kedit_core.revision import RevisionOutcome
from kedit_core.types import FactChange
from storage.db import Database


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _ts(iso: str | None) -> datetime | None:
    if not iso:
        return None
    return datetime.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S")


def _iso(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ") if ts else ""


def _insert_many(con, head: str, rows: Sequence[Sequence[Any]], chunk: int = 250) -> None:
    """INSERT with one multi-row VALUES list per chunk: DuckDB's executemany runs row by row and
    is ~15x slower for a batch of 50 revisions."""
    if not rows:
        return
    width = len(rows[0])
    marks = "(" + ", ".join(["?"] * width) + ")"
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        con.execute(f"{head} VALUES {', '.join([marks] * len(part))}", [x for r in part for x in r])


def known_revids(db: Database, revids: Iterable[int]) -> set[int]:
    ids = sorted({int(r) for r in revids})
    if not ids:
        return set()
    with db.connect(read_only=True) as con:
        rows = con.execute("SELECT revid FROM revisions WHERE revid IN (SELECT unnest(?::BIGINT[]))", [ids]).fetchall()
    return {int(r[0]) for r in rows}


def record_outcomes(db: Database, outcomes: Sequence[RevisionOutcome], cursor: tuple[str, str] | None = None,
                    labels: Sequence[tuple[str, str | None, str | None, Sequence[str]]] = (),
                    corrections: Sequence[tuple[str, str, str | None]] = (), lang: str = "en") -> tuple[int, int]:
    """Store revisions and their changes, status corrections of earlier changes (change_id, status,
    reason), labels to cache and the run's cursor, all in ONE transaction: a crash leaves the
    batch and its cursor either both written or both absent. Rows already present are kept as
    they are. Returns (new revisions, new changes)."""
    now = _utcnow()
    rev_rows = [[o.ref.revid, o.ref.item, o.ref.old_revid, _ts(o.ref.timestamp), o.ref.user, o.ref.is_bot,
                 o.ref.is_anon, json.dumps(list(o.ref.tags)), o.ref.comment, o.status, o.reason, now] for o in outcomes]
    change_rows = [
        [c.change_id, c.revid, c.old_revid, c.subject, c.property, c.datatype, c.kind,
         json.dumps(c.old_value, sort_keys=True) if c.old_value is not None else None,
         json.dumps(c.new_value, sort_keys=True) if c.new_value is not None else None,
         json.dumps(c.qualifiers, sort_keys=True), _ts(c.timestamp), status, reason, now]
        for o in outcomes for c, status, reason in o.changes
    ]
    new_revs = new_changes = 0
    with db.connect() as con:
        if rev_rows:
            ids = [r[0] for r in rev_rows]
            present = con.execute("SELECT count(*) FROM revisions WHERE revid IN (SELECT unnest(?::BIGINT[]))",
                                  [ids]).fetchone()[0]
            new_revs = len(set(ids)) - present
            _insert_many(con, "INSERT OR IGNORE INTO revisions (revid, item, old_revid, timestamp, user_name, is_bot, "
                              "is_anon, tags, comment, status, reason, seen_at)", rev_rows)
        if change_rows:
            cids = [r[0] for r in change_rows]
            present = con.execute("SELECT count(*) FROM fact_changes WHERE change_id IN (SELECT unnest(?::TEXT[]))",
                                  [cids]).fetchone()[0]
            new_changes = len(set(cids)) - present
            # A change id seen twice in one batch (identical change) would break a multi-row insert.
            unique = list({r[0]: r for r in change_rows}.values())
            _insert_many(con, "INSERT OR IGNORE INTO fact_changes (change_id, revid, old_revid, subject, property, "
                              "datatype, kind, old_value, new_value, qualifiers, timestamp, status, reason, created)",
                         unique)
        for change_id, status, reason in corrections:
            con.execute("UPDATE fact_changes SET status = ?, reason = ? WHERE change_id = ?", [status, reason, change_id])
        if labels:
            _put_labels(con, labels, lang)
        if cursor is not None:
            con.execute("INSERT OR REPLACE INTO flow_cursors (name, value, updated) VALUES (?, ?, ?)",
                        [cursor[0], cursor[1], now])
    return new_revs, new_changes


def set_change_statuses(db: Database, updates: Sequence[tuple[str, str, str | None]]) -> None:
    """Many (change_id, status, reason) updates in one transaction."""
    if not updates:
        return
    with db.connect() as con:
        con.executemany(
            "UPDATE fact_changes SET status = ?, reason = ? WHERE change_id = ?",
            [[status, reason, cid] for cid, status, reason in updates],
        )


def _row_to_change(r: dict[str, Any]) -> FactChange:
    return FactChange(
        subject=r["subject"], property=r["property"],
        old_value=json.loads(r["old_value"]) if r["old_value"] else None,
        new_value=json.loads(r["new_value"]) if r["new_value"] else None,
        kind=r["kind"], revid=int(r["revid"]), timestamp=_iso(r["timestamp"]),
        qualifiers=json.loads(r["qualifiers"]) if r["qualifiers"] else {},
        old_revid=None if r["old_revid"] is None else int(r["old_revid"]), datatype=r["datatype"],
    )


def fact_change_rows(db: Database, status: str | None = None, since: str | None = None,
                     until: str | None = None) -> list[dict[str, Any]]:
    """Stored changes (oldest first) with status and reason; values decoded from JSON."""
    sql, params = "SELECT * FROM fact_changes WHERE 1=1", []
    if status:
        sql, params = sql + " AND status = ?", params + [status]
    if since:
        sql, params = sql + " AND timestamp >= ?", params + [_ts(since)]
    if until:
        sql, params = sql + " AND timestamp < ?", params + [_ts(until)]
    with db.connect(read_only=True) as con:
        cur = con.execute(sql + " ORDER BY timestamp, revid, property, change_id", params)
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    for r in rows:
        r["change"] = _row_to_change(r)
    return rows


def get_fact_changes(db: Database, status: str | None = "accepted", since: str | None = None,
                     until: str | None = None) -> list[FactChange]:
    return [r["change"] for r in fact_change_rows(db, status, since, until)]


def revision_rows(db: Database, status: str | None = None) -> list[dict[str, Any]]:
    sql, params = "SELECT * FROM revisions", []
    if status:
        sql, params = sql + " WHERE status = ?", [status]
    with db.connect(read_only=True) as con:
        cur = con.execute(sql + " ORDER BY timestamp, revid", params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]


# --------------------------------------------------------------------------- label cache


def get_labels(db: Database, ids: Iterable[str], lang: str = "en",
               max_age: timedelta | None = None) -> dict[str, str | None]:
    """Cached labels: {id: label}, with None for ids known to have no label in `lang`."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    sql = "SELECT entity_id, label FROM entity_labels WHERE lang = ? AND entity_id IN (SELECT unnest(?::TEXT[]))"
    params: list[Any] = [lang, wanted]
    if max_age is not None:
        sql, params = sql + " AND fetched_at >= ?", params + [_utcnow() - max_age]
    with db.connect(read_only=True) as con:
        return {r[0]: r[1] for r in con.execute(sql, params).fetchall()}


def put_labels(db: Database, labels: Iterable[tuple[str, str | None, str | None, Sequence[str]]],
               lang: str = "en") -> int:
    """Cache (id, label, description, aliases); a label of None records "asked, none"."""
    labels = list(labels)
    if not labels:
        return 0
    with db.connect() as con:
        _put_labels(con, labels, lang)
    return len(labels)


def _put_labels(con, labels: Sequence[tuple[str, str | None, str | None, Sequence[str]]], lang: str) -> None:
    rows = [[eid, label, desc, json.dumps(list(aliases)), lang, _utcnow()] for eid, label, desc, aliases in labels]
    rows = list({r[0]: r for r in rows}.values())  # last label wins within one write
    _insert_many(con, "INSERT OR REPLACE INTO entity_labels (entity_id, label, description, aliases, lang, fetched_at)",
                 rows)
