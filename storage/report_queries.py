"""SQL behind the drift report (`kedit report`): read-only queries over versions, cases,
fact changes, batches, metrics and per-probe results. Every function returns plain rows
(dicts), which `kedit_core.report` turns into text, tables and plots.

"Accepted" measurements are metric rows of batches whose status is 'applied': they
describe a model that was served. Rows of rolled-back attempts describe a model that
never went live; they are plotted as markers, never counted as "now".
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from storage.db import Database
from storage.ledger import _rows

_EPOCH = datetime(1970, 1, 1)


def counts_by_status(db: Database) -> dict[str, dict[str, int]]:
    """{'versions': {...}, 'cases': {...}, 'changes': {...}, 'batches': {...}} status -> count."""
    out: dict[str, dict[str, int]] = {}
    with db.connect(read_only=True) as con:
        for key, table in (
            ("versions", "model_versions"),
            ("cases", "edit_cases"),
            ("changes", "fact_changes"),
            ("batches", "edit_batches"),
        ):
            rows = con.execute(f"SELECT status, count(*) FROM {table} GROUP BY status ORDER BY status").fetchall()
            out[key] = {s: int(n) for s, n in rows}
    return out


def pending_backlog(db: Database) -> dict[str, Any]:
    """What waits for the next run: pending edit cases, those a run's edit budget left
    ('waiting: ...' reason), and the revision time of the oldest pending change."""
    with db.connect(read_only=True) as con:
        pending, waiting, oldest = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE c.reason LIKE 'waiting:%'), min(f.timestamp) "
            "FROM edit_cases c LEFT JOIN fact_changes f ON c.change_id = f.change_id WHERE c.status = 'pending'"
        ).fetchone()
    return {"pending": int(pending), "over_budget": int(waiting), "oldest_change": oldest}


def live_versions(db: Database) -> list[dict[str, Any]]:
    """The live (or, with nothing applied, base) version of every base model."""
    with db.connect(read_only=True) as con:
        return _rows(
            con,
            "SELECT * FROM model_versions v WHERE status = 'live' OR (status = 'base' AND NOT EXISTS "
            "(SELECT 1 FROM model_versions w WHERE w.base_fingerprint = v.base_fingerprint AND w.status = 'live')) "
            "ORDER BY version_id",
        )


def metric_series(db: Database, since: datetime | None = None) -> list[dict[str, Any]]:
    """Every metric row with its batch's status and attempt (NULL batch = a base measurement
    or a `kedit compare` row) and its run's kind, start and status, so the report can tell
    compare runs (kind 'compare': per method, per-batch steps then a final step) from the
    gated pipeline's measurements without a second pass over the metrics table."""
    with db.connect(read_only=True) as con:
        return _rows(
            con,
            "SELECT m.run_id, m.method, m.step, m.metric, m.value, m.version_id, m.batch_id, m.created, "
            "b.status AS batch_status, b.attempt, b.reason AS batch_reason, "
            "r.kind AS run_kind, r.started AS run_started, r.status AS run_status "
            "FROM metrics m LEFT JOIN edit_batches b ON m.batch_id = b.batch_id "
            "LEFT JOIN runs r ON m.run_id = r.run_id "
            "WHERE m.created >= ? ORDER BY m.created, m.step, m.metric",
            [since or _EPOCH],
        )


def metric_now_base_week(db: Database, week_ago: datetime) -> list[dict[str, Any]]:
    """Per method and metric: the latest accepted value (now), the base value (measured on
    a base version outside any batch: the suite's frozen base metrics), and the latest accepted value recorded on or before `week_ago`."""
    with db.connect(read_only=True) as con:
        return _rows(
            con,
            """
            WITH acc AS (
                SELECT m.* FROM metrics m JOIN edit_batches b ON m.batch_id = b.batch_id
                WHERE b.status = 'applied' AND m.value IS NOT NULL
            ),
            now AS (SELECT method, metric, arg_max(value, created) AS now, max(created) AS now_at, count(*) AS n
                    FROM acc GROUP BY method, metric),
            base AS (SELECT m.method, m.metric, arg_max(m.value, m.created) AS base
                     FROM metrics m JOIN model_versions v ON m.version_id = v.version_id
                     WHERE m.batch_id IS NULL AND v.status = 'base' GROUP BY m.method, m.metric),
            week AS (SELECT method, metric, arg_max(value, created) AS last_week FROM acc
                     WHERE created <= ? GROUP BY method, metric)
            SELECT coalesce(now.method, base.method) AS method, coalesce(now.metric, base.metric) AS metric,
                   now.now, base.base, week.last_week, now.now_at, coalesce(now.n, 0) AS n
            FROM now FULL OUTER JOIN base ON now.method IS NOT DISTINCT FROM base.method AND now.metric = base.metric
            LEFT JOIN week ON week.method IS NOT DISTINCT FROM coalesce(now.method, base.method)
                          AND week.metric = coalesce(now.metric, base.metric)
            ORDER BY method, metric
            """,
            [week_ago],
        )


def batch_rows(db: Database, since: datetime | None = None) -> list[dict[str, Any]]:
    with db.connect(read_only=True) as con:
        return _rows(
            con, "SELECT * FROM edit_batches WHERE created >= ? ORDER BY created, batch_id", [since or _EPOCH]
        )


def worst_hit_probes(db: Database, since: datetime | None = None, limit: int = 15) -> list[dict[str, Any]]:
    """Known facts and locality probes that the served (accepted) versions damaged most:
    latest score below 1, lowest first, with the batch where the score was lowest."""
    with db.connect(read_only=True) as con:
        return _rows(
            con,
            """
            SELECT p.kind, p.prompt, p.expected,
                   arg_max(p.score, p.created) AS latest, min(p.score) AS worst,
                   arg_min(p.batch_id, p.score) AS worst_batch, count(*) AS checks
            FROM probe_results p JOIN edit_batches b ON p.batch_id = b.batch_id
            WHERE b.status = 'applied' AND p.created >= ?
            GROUP BY p.kind, p.prompt, p.expected
            HAVING arg_max(p.score, p.created) < 1
            ORDER BY latest, worst, p.prompt
            LIMIT ?
            """,
            [since or _EPOCH, int(limit)],
        )


def filtered_edits(db: Database, since: datetime | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Fact changes filtered, quarantined or rejected from quarantine (`kedit quarantine`),
    and edit cases rejected, filtered or superseded (a later or applied value of the same
    fact, `kedit_core.corrections`), with reasons."""
    with db.connect(read_only=True) as con:
        return _rows(
            con,
            """
            SELECT * FROM (
                SELECT 'fact change' AS what, change_id AS id, subject, property AS relation, status, reason,
                       created AS happened
                FROM fact_changes WHERE status IN ('filtered', 'quarantined', 'rejected') AND created >= ?
                UNION ALL
                SELECT 'edit case', case_id, subject, relation, status, reason, coalesce(updated, created) AS happened
                FROM edit_cases WHERE status IN ('rejected', 'filtered', 'superseded') AND coalesce(updated, created) >= ?
            ) ORDER BY happened DESC, id LIMIT ?
            """,
            [since or _EPOCH, since or _EPOCH, int(limit)],
        )


def collect_report(db: Database, since: datetime | None = None, now: datetime | None = None) -> Any:
    """Everything the drift report shows, read from the ledger into a `ReportData`
    (`kedit report` and the report flow step both call this)."""
    from datetime import timedelta

    from kedit_core.report import ReportData

    now = now or datetime.utcnow()
    return ReportData(
        generated=now,
        since=since,
        ledger=str(db.path),
        counts=counts_by_status(db),
        live=live_versions(db),
        summary=metric_now_base_week(db, now - timedelta(days=7)),
        series=metric_series(db, since),
        batches=batch_rows(db, since),
        worst_probes=worst_hit_probes(db, since),
        filtered=filtered_edits(db, since),
        backlog=pending_backlog(db),
    )


# --------------------------------------------------------------------------- an exported version


def applied_cases(db: Database, batch_ids: list[str]) -> list[dict[str, Any]]:
    """The applied cases of these batches, in the order they were made (what an export's card lists)."""
    if not batch_ids:
        return []
    marks = ", ".join("?" for _ in batch_ids)
    with db.connect(read_only=True) as con:
        rows = con.execute(
            f"SELECT case_id, batch_id, body FROM edit_cases WHERE status = 'applied' AND batch_id IN ({marks}) "
            "ORDER BY created, case_id", batch_ids).fetchall()
    out = []
    for case_id, batch_id, body in rows:
        try:
            d = json.loads(body)
        except ValueError:
            d = {}
        out.append({"case_id": case_id, "batch_id": batch_id, "subject": d.get("subject"),
                    "relation": d.get("relation"), "question": d.get("question") or d.get("prompt"),
                    "target_new": d.get("target_new"), "target_old": d.get("target_old")})
    return out


def latest_metrics_by_version(db: Database, version_ids: list[int]) -> dict[str, dict[str, float | None]]:
    """{metric: {version id: the latest value recorded with that version}}."""
    marks = ", ".join("?" for _ in version_ids)
    with db.connect(read_only=True) as con:
        rows = con.execute(
            f"SELECT metric, version_id, value FROM metrics WHERE version_id IN ({marks}) ORDER BY created",
            version_ids).fetchall()
    out: dict[str, dict[str, float | None]] = {}
    for metric, vid, value in rows:
        out.setdefault(metric, {})[str(vid)] = value
    return out
