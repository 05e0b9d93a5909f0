"""Ledger reads/writes the gated batch pipeline needs beyond `storage.ledger`: case
statuses by id, the cases of a batch, the version a batch produced, batch attempts, and
per-probe regression scores. Each function is one transaction."""
from __future__ import annotations

from typing import Any, Iterable

from kedit_core.types import EditCase
from storage.db import Database
from storage.ledger import _rows, utcnow


def case_statuses(db: Database, case_ids: Iterable[str]) -> dict[str, str]:
    """case_id -> status for the ids present in the ledger."""
    ids = list(case_ids)
    if not ids:
        return {}
    with db.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT case_id, status FROM edit_cases WHERE list_contains(?, case_id)", [ids]
        ).fetchall()
    return {cid: status for cid, status in rows}


def pending_cases_by_priority(db: Database) -> list[EditCase]:
    """Pending cases in the order a budgeted run edits them: the oldest fact change first (its
    revision's time; a case without a change, e.g. a benchmark's, by its creation), then by
    subject, relation and case id, so the order is the same on every run."""
    with db.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT c.body FROM edit_cases c LEFT JOIN fact_changes f ON c.change_id = f.change_id "
            "WHERE c.status = 'pending' "
            "ORDER BY coalesce(f.timestamp, c.created), c.subject, c.relation, c.case_id"
        ).fetchall()
    return [EditCase.from_json(r[0]) for r in rows]


def cases_of_batch(db: Database, batch_id: str) -> list[EditCase]:
    with db.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT body FROM edit_cases WHERE batch_id = ? ORDER BY created, case_id", [batch_id]
        ).fetchall()
    return [EditCase.from_json(r[0]) for r in rows]


def batches_in_status(db: Database, status: str, method: str | None = None) -> list[dict[str, Any]]:
    sql, params = "SELECT * FROM edit_batches WHERE status = ?", [status]
    if method:
        sql += " AND method = ?"
        params.append(method)
    with db.connect(read_only=True) as con:
        return _rows(con, sql + " ORDER BY created, batch_id", params)


def version_of_batch(db: Database, batch_id: str) -> dict[str, Any] | None:
    """The model version a batch produced, if it got that far."""
    with db.connect(read_only=True) as con:
        rows = _rows(con, "SELECT * FROM model_versions WHERE batch_id = ? ORDER BY version_id DESC LIMIT 1", [batch_id])
    return rows[0] if rows else None


def count_batches(db: Database, run_id: str | None) -> int:
    with db.connect(read_only=True) as con:
        if run_id is None:
            return int(con.execute("SELECT count(*) FROM edit_batches WHERE run_id IS NULL AND attempt = 1").fetchone()[0])
        return int(con.execute("SELECT count(*) FROM edit_batches WHERE run_id = ? AND attempt = 1", [run_id]).fetchone()[0])


def count_metric_steps(db: Database, run_id: str | None, method: str | None) -> int:
    """The highest step recorded for a run+method (0 if none): a re-run continues after it."""
    with db.connect(read_only=True) as con:
        row = con.execute(
            "SELECT coalesce(max(step), 0) FROM metrics WHERE run_id IS NOT DISTINCT FROM ? "
            "AND method IS NOT DISTINCT FROM ?",
            [run_id, method],
        ).fetchone()
    return int(row[0])


def record_probe_results(
    db: Database,
    rows: list[dict[str, Any]],
    run_id: str | None,
    method: str | None,
    step: int | None,
    batch_id: str | None,
    version_id: int | None,
) -> None:
    """Per-probe scores (`kind`, `prompt`, `expected`, `score`) of one check."""
    if not rows:
        return
    now = utcnow()
    with db.connect() as con:
        con.executemany(
            "INSERT INTO probe_results (run_id, method, step, batch_id, version_id, kind, prompt, expected, score, "
            "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                [run_id, method, step, batch_id, version_id, r["kind"], r["prompt"], r.get("expected"), r["score"], now]
                for r in rows
            ],
        )


def probe_rows(db: Database, batch_id: str) -> list[dict[str, Any]]:
    """The per-probe scores recorded for one batch attempt."""
    with db.connect(read_only=True) as con:
        return _rows(con, "SELECT * FROM probe_results WHERE batch_id = ? ORDER BY kind, prompt", [batch_id])
