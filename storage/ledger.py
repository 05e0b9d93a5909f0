"""Plain read/write functions for model versions, edit cases and batches, metrics,
flow cursors and runs. Each function is one transaction."""
from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from typing import Any, Iterable

from kedit_core.types import EditCase
from storage.db import Database, StorageError


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _rows(con, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


# --------------------------------------------------------------------------- model versions


def ensure_base_version(db: Database, base_fingerprint: str, base_spec: str) -> int:
    """The version row of an unedited base (created once per base fingerprint)."""
    with db.connect() as con:
        row = con.execute(
            "SELECT version_id FROM model_versions WHERE base_fingerprint = ? AND status = 'base'",
            [base_fingerprint],
        ).fetchone()
        if row:
            return int(row[0])
        vid = con.execute("SELECT coalesce(max(version_id), -1) + 1 FROM model_versions").fetchone()[0]
        con.execute(
            "INSERT INTO model_versions (version_id, parent_id, base_fingerprint, base_spec, created, status, "
            "weights_fingerprint, note) VALUES (?, NULL, ?, ?, ?, 'base', ?, 'unedited base')",
            [vid, base_fingerprint, base_spec, utcnow(), base_fingerprint],
        )
        return int(vid)


class VersionConflict(StorageError):
    """A version was to be recorded on top of a version that is no longer live: another
    writer moved the live version while the batch was being made."""

    def __init__(self, parent_id: int, live_id: int | None):
        super().__init__(f"version built on {parent_id} but the live version is now {live_id}")
        self.parent_id, self.live_id = parent_id, live_id


def add_version(
    db: Database,
    parent_id: int,
    base_fingerprint: str,
    base_spec: str,
    method: str,
    batch_id: str | None,
    delta_path: str | None,
    delta_sha256: str | None,
    weights_fingerprint: str | None = None,
    status: str = "live",
    note: str | None = None,
    expected_live: int | None = None,
) -> int:
    """Record a version. With `expected_live`, compare-and-set: only if that version is
    still the base's live one (else `VersionConflict`, nothing written)."""
    with db.connect() as con:
        if expected_live is not None:
            _check_live(con, base_fingerprint, expected_live)
        return _insert_version(con, parent_id, base_fingerprint, base_spec, method, batch_id, delta_path,
                               delta_sha256, weights_fingerprint, status, note)


def _check_live(con, base_fingerprint: str, expected: int) -> None:
    live = _live_row(con, base_fingerprint)
    live_id = int(live["version_id"]) if live else None
    if live_id != expected:
        raise VersionConflict(expected, live_id)


def _insert_version(con, parent_id, base_fingerprint, base_spec, method, batch_id, delta_path, delta_sha256,
                    weights_fingerprint, status, note) -> int:
    vid = con.execute("SELECT coalesce(max(version_id), -1) + 1 FROM model_versions").fetchone()[0]
    if status == "live":
        con.execute(
            "UPDATE model_versions SET status = 'superseded' WHERE base_fingerprint = ? AND status = 'live'",
            [base_fingerprint],
        )
    con.execute(
        "INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [vid, parent_id, base_fingerprint, base_spec, utcnow(), status, method, batch_id, delta_path,
         delta_sha256, weights_fingerprint, note],
    )
    return int(vid)


def commit_batch(
    db: Database,
    batch_id: str,
    parent_id: int,
    base_fingerprint: str,
    base_spec: str,
    method: str,
    case_ids: list[str],
    delta_path: str | None,
    delta_sha256: str | None,
    weights_fingerprint: str | None,
    note: str | None = None,
) -> int:
    """An accepted batch's commit point, in one transaction: its version becomes live on top
    of `parent_id` only if `parent_id` is still live (compare-and-set, else `VersionConflict`
    and nothing is written), its cases become 'applied' and the batch 'applied'."""
    now = utcnow()
    with db.connect() as con:
        _check_live(con, base_fingerprint, parent_id)
        vid = _insert_version(con, parent_id, base_fingerprint, base_spec, method, batch_id, delta_path,
                              delta_sha256, weights_fingerprint, "live", note)
        con.executemany(
            "UPDATE edit_cases SET status = 'applied', reason = NULL, batch_id = ?, updated = ? WHERE case_id = ?",
            [[batch_id, now, cid] for cid in case_ids],
        )
        con.execute(
            "UPDATE edit_batches SET status = 'applied', reason = NULL, version_id = ?, finished = ? WHERE batch_id = ?",
            [vid, now, batch_id],
        )
        return vid


def set_version_status(db: Database, version_id: int, status: str, note: str | None = None) -> None:
    with db.connect() as con:
        con.execute(
            "UPDATE model_versions SET status = ?, note = coalesce(?, note) WHERE version_id = ?",
            [status, note, version_id],
        )


def set_live_version(db: Database, base_fingerprint: str, version_id: int) -> None:
    """Mark `version_id` live and any other live version of the base superseded."""
    with db.connect() as con:
        con.execute(
            "UPDATE model_versions SET status = 'superseded' WHERE base_fingerprint = ? AND status = 'live'",
            [base_fingerprint],
        )
        con.execute(
            "UPDATE model_versions SET status = 'live' WHERE version_id = ? AND status <> 'base'", [version_id]
        )


class RollbackError(StorageError):
    """An operator's rollback cannot be done as asked (unknown version, not in the live line)."""


def roll_back_to(db: Database, version_id: int, reason: str) -> list[dict[str, Any]]:
    """Make `version_id` the live version of its base again: an operator's rollback, e.g.
    of a vandal edit found after it passed the gate.

    Every version after it in the live line is marked `rolled_back`, its batch
    `rolled_back` and its applied cases `rejected` with `reason`, so no later run applies
    them again; deltas and state files stay on disk (the audit can still explain them).
    Weights are not touched: whoever opens the live model next rebuilds it from the base
    and the deltas up to `version_id` (a running server keeps serving what it loaded until
    told to load another version). Returns the rolled-back version rows, newest first; none
    when `version_id` is already live. One transaction: all of it or nothing.
    """
    if not reason.strip():
        raise RollbackError("a rollback needs a reason (it is recorded on every case it rejects)")
    why = f"rolled back to version {version_id} by the operator: {reason.strip()}"
    now = utcnow()
    # Reads and writes on one connection (one transaction, holding the file's lock), so a
    # pipeline run cannot add a version between finding the live line and rewriting it.
    with db.connect() as con:
        found = _rows(con, "SELECT * FROM model_versions WHERE version_id = ?", [version_id])
        if not found:
            raise RollbackError(f"model version {version_id} is not in the ledger")
        target = found[0]
        live = _live_row(con, target["base_fingerprint"]) or target
        line = _chain(con, int(live["version_id"]))
        ids = [int(v["version_id"]) for v in line]
        if version_id not in ids:
            raise RollbackError(
                f"model version {version_id} ({target['status']}) is not in the live line of its base "
                f"(live version {ids[-1]}: {' -> '.join(map(str, ids))}); only an ancestor of the live version "
                "can be made live again"
            )
        undone = list(reversed(line[ids.index(version_id) + 1 :]))
        for v in undone:
            con.execute("UPDATE model_versions SET status = 'rolled_back' WHERE version_id = ?", [v["version_id"]])
            if v.get("batch_id"):
                con.execute(
                    "UPDATE edit_batches SET status = 'rolled_back', reason = ?, finished = ? WHERE batch_id = ?",
                    [why, now, v["batch_id"]],
                )
                con.execute(
                    "UPDATE edit_cases SET status = 'rejected', reason = ?, updated = ? "
                    "WHERE batch_id = ? AND status = 'applied'",
                    [why, now, v["batch_id"]],
                )
        if target["status"] != "base":
            con.execute("UPDATE model_versions SET status = 'live' WHERE version_id = ?", [version_id])
    return undone


def get_version(db: Database, version_id: int) -> dict[str, Any] | None:
    with db.connect(read_only=True) as con:
        rows = _rows(con, "SELECT * FROM model_versions WHERE version_id = ?", [version_id])
    return rows[0] if rows else None


def list_versions(db: Database, base_fingerprint: str | None = None) -> list[dict[str, Any]]:
    with db.connect(read_only=True) as con:
        if base_fingerprint:
            return _rows(
                con, "SELECT * FROM model_versions WHERE base_fingerprint = ? ORDER BY version_id", [base_fingerprint]
            )
        return _rows(con, "SELECT * FROM model_versions ORDER BY version_id")


def _live_row(con, base_fingerprint: str) -> dict[str, Any] | None:
    rows = _rows(
        con,
        "SELECT * FROM model_versions WHERE base_fingerprint = ? AND status IN ('live', 'base') "
        "ORDER BY CASE status WHEN 'live' THEN 0 ELSE 1 END, version_id DESC LIMIT 1",
        [base_fingerprint],
    )
    return rows[0] if rows else None


def _chain(con, version_id: int) -> list[dict[str, Any]]:
    chain: list[dict[str, Any]] = []
    current: int | None = version_id
    while current is not None:
        rows = _rows(con, "SELECT * FROM model_versions WHERE version_id = ?", [current])
        if not rows:
            raise KeyError(f"model version {current} is not in the ledger")
        chain.append(rows[0])
        current = rows[0]["parent_id"]
    return list(reversed(chain))


def live_version(db: Database, base_fingerprint: str) -> dict[str, Any] | None:
    """The newest live version of a base, or its base row when nothing is applied."""
    with db.connect(read_only=True) as con:
        return _live_row(con, base_fingerprint)


def version_chain(db: Database, version_id: int) -> list[dict[str, Any]]:
    """Versions from the base (first) to `version_id` (last), following parent links."""
    with db.connect(read_only=True) as con:
        return _chain(con, version_id)


def version_note(row: dict[str, Any]) -> dict[str, Any]:
    """A version's `note` JSON (config, case count, state sha256) as a dict; {} if absent or unreadable."""
    try:
        note = json.loads(row.get("note") or "{}")
    except ValueError:
        return {}
    return note if isinstance(note, dict) else {}


# --------------------------------------------------------------------------- edit cases


def upsert_cases(db: Database, cases: Iterable[EditCase], status: str = "pending", reason: str | None = None) -> int:
    """Insert new cases; a case id already present is left as it is (idempotent). Returns new rows."""
    added = 0
    now = utcnow()
    with db.connect() as con:
        for c in cases:
            exists = con.execute("SELECT 1 FROM edit_cases WHERE case_id = ?", [c.case_id]).fetchone()
            if exists:
                continue
            con.execute(
                "INSERT INTO edit_cases (case_id, change_id, source, subject, relation, body, status, reason, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [c.case_id, c.change_id, c.source, c.subject, c.relation, c.to_json(), status, reason, now],
            )
            added += 1
    return added


def set_case_status(
    db: Database, case_ids: Iterable[str], status: str, reason: str | None = None, batch_id: str | None = None
) -> None:
    ids = list(case_ids)
    if not ids:
        return
    with db.connect() as con:
        con.executemany(
            "UPDATE edit_cases SET status = ?, reason = ?, batch_id = coalesce(?, batch_id), updated = ? "
            "WHERE case_id = ?",
            [[status, reason, batch_id, utcnow(), cid] for cid in ids],
        )


def get_cases(db: Database, status: str | None = None, limit: int | None = None) -> list[EditCase]:
    sql = "SELECT body FROM edit_cases"
    params: list[Any] = []
    if status:
        sql += " WHERE status = ?"
        params.append(status)
    sql += " ORDER BY created, case_id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    with db.connect(read_only=True) as con:
        return [EditCase.from_json(r[0]) for r in con.execute(sql, params).fetchall()]


def case_rows(db: Database, status: str | None = None) -> list[dict[str, Any]]:
    with db.connect(read_only=True) as con:
        if status:
            return _rows(con, "SELECT * EXCLUDE (body) FROM edit_cases WHERE status = ? ORDER BY created", [status])
        return _rows(con, "SELECT * EXCLUDE (body) FROM edit_cases ORDER BY created")


def count_cases_by_status(db: Database) -> dict[str, int]:
    with db.connect(read_only=True) as con:
        return {s: int(n) for s, n in con.execute("SELECT status, count(*) FROM edit_cases GROUP BY status").fetchall()}


# --------------------------------------------------------------------------- batches


def create_batch(
    db: Database,
    batch_id: str,
    run_id: str | None,
    method: str,
    case_ids: list[str],
    attempt: int = 1,
    owner: dict[str, Any] | None = None,
    claimable: tuple[str, ...] | None = None,
) -> list[str]:
    """Create a batch ('applying') and claim its cases, in one transaction. Returns the ids
    claimed: a case in another batch still 'applying' is never claimed (two runs cannot edit
    the same case), nor, with `claimable`, a case whose status is not one of those (it was
    applied or rejected since the caller read it). No batch row when nothing is claimed.
    `owner`: {"pid", "host", "start"} of the process making the batch."""
    owner = owner or {}
    with db.connect() as con:
        rows = con.execute(
            "SELECT c.case_id, c.status, b.status FROM edit_cases c LEFT JOIN edit_batches b "
            "ON c.batch_id = b.batch_id WHERE list_contains(?, c.case_id)",
            [list(case_ids)],
        ).fetchall()
        free = {cid for cid, status, batch_status in rows
                if batch_status != "applying" and (claimable is None or status in claimable)}
        claimed = [cid for cid in case_ids if cid in free]
        if not claimed:
            return []
        now = utcnow()
        con.execute(
            "INSERT INTO edit_batches (batch_id, run_id, method, status, n_cases, attempt, created, owner_pid, "
            "owner_host, owner_start) VALUES (?, ?, ?, 'applying', ?, ?, ?, ?, ?, ?)",
            [batch_id, run_id, method, len(claimed), attempt, now, owner.get("pid"), owner.get("host"),
             owner.get("start")],
        )
        con.executemany(
            "UPDATE edit_cases SET batch_id = ?, updated = ? WHERE case_id = ?",
            [[batch_id, now, cid] for cid in claimed],
        )
    return claimed


def release_batch(db: Database, batch_id: str, reason: str) -> None:
    """A batch that will not be committed and whose cases stay pending (e.g. the live version
    moved under it): the batch 'failed' with `reason`, its cases free to be claimed again."""
    with db.connect() as con:
        con.execute(
            "UPDATE edit_batches SET status = 'failed', reason = ?, finished = ? WHERE batch_id = ?",
            [reason, utcnow(), batch_id],
        )


def finish_batch(db: Database, batch_id: str, status: str, reason: str | None = None, version_id: int | None = None) -> None:
    with db.connect() as con:
        con.execute(
            "UPDATE edit_batches SET status = ?, reason = ?, version_id = coalesce(?, version_id), finished = ? "
            "WHERE batch_id = ?",
            [status, reason, version_id, utcnow(), batch_id],
        )


def list_batches(db: Database, run_id: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
    sql, params = "SELECT * FROM edit_batches WHERE 1=1", []
    if run_id:
        sql += " AND run_id = ?"
        params.append(run_id)
    if status:
        sql += " AND status = ?"
        params.append(status)
    with db.connect(read_only=True) as con:
        return _rows(con, sql + " ORDER BY created, batch_id", params)


# --------------------------------------------------------------------------- metrics


def record_metrics(
    db: Database,
    values: dict[str, float],
    run_id: str | None = None,
    method: str | None = None,
    step: int | None = None,
    version_id: int | None = None,
    batch_id: str | None = None,
    model_fingerprint: str | None = None,
) -> None:
    now = utcnow()
    with db.connect() as con:
        con.executemany(
            "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                [run_id, method, step, name, None if v is None else float(v), version_id, batch_id, model_fingerprint, now]
                for name, v in values.items()
            ],
        )


def get_metrics(db: Database, run_id: str | None = None, metric: str | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
    sql, params = "SELECT * FROM metrics WHERE 1=1", []
    if run_id:
        sql += " AND run_id = ?"
        params.append(run_id)
    if metric:
        sql += " AND metric = ?"
        params.append(metric)
    if since:
        sql += " AND created >= ?"
        params.append(since)
    with db.connect(read_only=True) as con:
        return _rows(con, sql + " ORDER BY created, step", params)


# --------------------------------------------------------------------------- cursors and runs


def get_cursor(db: Database, name: str) -> str | None:
    with db.connect(read_only=True) as con:
        row = con.execute("SELECT value FROM flow_cursors WHERE name = ?", [name]).fetchone()
    return row[0] if row else None


def set_cursor(db: Database, name: str, value: str) -> None:
    with db.connect() as con:
        con.execute(
            "INSERT OR REPLACE INTO flow_cursors (name, value, updated) VALUES (?, ?, ?)", [name, value, utcnow()]
        )


def start_run(db: Database, run_id: str, kind: str, config: dict[str, Any], model_fingerprint: str | None) -> None:
    with db.connect() as con:
        con.execute(
            "INSERT OR REPLACE INTO runs (run_id, kind, started, finished, status, config, model_fingerprint, pid, "
            "host) VALUES (?, ?, ?, NULL, 'running', ?, ?, ?, ?)",
            [run_id, kind, utcnow(), json.dumps(config, default=str), model_fingerprint, os.getpid(),
             socket.gethostname()],
        )


def finish_run(db: Database, run_id: str, status: str) -> None:
    with db.connect() as con:
        con.execute("UPDATE runs SET finished = ?, status = ? WHERE run_id = ?", [utcnow(), status, run_id])


def list_runs(db: Database, kind: str | None = None) -> list[dict[str, Any]]:
    with db.connect(read_only=True) as con:
        if kind:
            return _rows(con, "SELECT * FROM runs WHERE kind = ? ORDER BY started", [kind])
        return _rows(con, "SELECT * FROM runs ORDER BY started")
