"""Plain functions the Prefect flows call, one per step of the pipeline. Each wires the
rooms (connectors -> kedit_core -> storage) and returns a small dict of counts, so a flow
only decides what runs when. Nothing here imports Prefect: the same steps run from tests,
from the CLI and from flows.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from flows.services.runtime import LiveModel, open_live_model
from flows.services.settings import PipelineSettings
from kedit_core.atomic import atomic_write_text
from storage import ledger
from storage.db import Database, open_db

log = logging.getLogger("kedit.flows")

# One live model per process and ledger: loading and rebuilding it once per flow run is
# enough, and tasks of one flow run share it. The pipeline keeps it in sync with the ledger.
_LIVE: dict[tuple[str, str], LiveModel] = {}


def db() -> Database:
    return open_db()


def live_model(settings: PipelineSettings) -> LiveModel:
    database = db()
    key = (settings.model, str(database.path), settings.device, settings.dtype)
    live = _LIVE.get(key)
    if live is None:
        live = open_live_model(settings.model, db=database, device=settings.device, dtype=settings.dtype)
        _LIVE[key] = live
    return live


def forget_live_models() -> None:
    """Drop the process's cached models (tests that switch ledgers call this)."""
    _LIVE.clear()


def hold_ledger(kind: str, settings: PipelineSettings):
    """The ledger's writer lock for a run of `kind` (a context manager; re-entrant, so the
    CLI can take it before the flow starts and the flow takes it again)."""
    from storage.lock import ledger_lock

    return ledger_lock(db().path, kind, wait_s=settings.lock_wait_s)


# --------------------------------------------------------------------------- runs


def begin_run(kind: str, settings: PipelineSettings, extra: dict[str, Any]) -> str:
    run_id = f"{kind}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    ledger.start_run(db(), run_id, kind, {**settings.to_dict(), **extra}, None)
    return run_id


def end_run(run_id: str, status: str) -> None:
    ledger.finish_run(db(), run_id, status)


# --------------------------------------------------------------------------- Wikidata


def filter_config(settings: PipelineSettings):
    from kedit_core.filters import FilterConfig, parse_follow

    items, min_sitelinks = parse_follow(settings.follow)
    return FilterConfig(
        settle_hours=settings.settle_hours, allow_bots=settings.allow_bots, allow_anonymous=settings.allow_anonymous,
        follow_items=items, min_sitelinks=min_sitelinks,
    )


def _counts(report: Any) -> dict[str, Any]:
    d = report.to_dict()
    d["seconds"] = round(float(d.get("seconds", 0.0)), 2)
    return d


def window_plan(settings: PipelineSettings, window_end: datetime | None, window_hours: float,
                now: datetime | None = None):
    """The nightly run's windows: from the ledger's cursor to `window_end` (default: now minus
    the settle time), in chunks of `window_hours`, bounded by `max_span_hours`."""
    from flows.services.windows import CURSOR, plan_windows, target_end

    stored = ledger.get_cursor(db(), CURSOR)
    cursor = datetime.fromisoformat(stored) if stored else None
    end = target_end(now or datetime.now(timezone.utc), settings.settle_hours, window_end)
    return plan_windows(cursor, end, window_hours, settings.max_span_hours)


def advance_window_cursor(end: datetime) -> None:
    """Record that every window up to `end` is ingested and cased (never moves backwards)."""
    from flows.services.windows import CURSOR, utc

    database = db()
    stored = ledger.get_cursor(database, CURSOR)
    if stored and datetime.fromisoformat(stored) >= utc(end):
        return
    ledger.set_cursor(database, CURSOR, utc(end).isoformat())


def empty_ingest_counts() -> dict[str, Any]:
    from flows.services.ingest import IngestReport

    return IngestReport().to_dict()


def add_counts(total: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
    """Sum one step's counts into a run's: numbers add up, dicts of reasons merge."""
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
            total[key] = value
        elif isinstance(value, dict):
            merged = dict(total.get(key) or {})
            for k, v in value.items():
                merged[k] = merged.get(k, 0) + v
            total[key] = merged
        else:
            total[key] = (total.get(key) or 0) + value
    return total


def ingest_window(settings: PipelineSettings, start: datetime, end: datetime) -> dict[str, Any]:
    from flows.services.ingest import ingest_window as ingest

    client = settings.wikidata_client()
    try:
        return _counts(ingest(client, db(), start, end, filter_config(settings), progress=True))
    finally:
        client.close()


def _iso(t: datetime) -> str:
    from connectors.wikidata import iso

    return iso(t)


def _check_source(source: str, dump_path: str | None) -> None:
    from connectors.wikidata_dump import dump_files
    from kedit_core.errors import KeditError

    if source not in ("api", "dump"):
        raise KeditError(f"unknown backfill source {source!r}; use 'api' or 'dump'")
    if source == "dump":
        if not dump_path:
            raise KeditError("backfill --source dump needs --dump FILE|FOLDER (pages-meta-hist-incr.xml.bz2 files)")
        try:
            dump_files(dump_path)
        except FileNotFoundError as exc:
            raise KeditError(str(exc)) from None


def check_backfill(settings: PipelineSettings, start: datetime, end: datetime, source: str = "api",
                   dump_path: str | None = None, items: list[str] | None = None,
                   now: datetime | None = None) -> list[str]:
    """Refuse, in one line (a KeditError), a backfill that cannot work, before any run starts:
    an unknown source, a dump that is not there, an empty range, or recent changes asked for
    a range older than Wikidata keeps them (~30 days) without `items`. Against another
    endpoint (a replayed recording, a mirror) that limit is a warning: they keep what they
    hold. Returns the warnings (also logged)."""
    from flows.services.ingest import RECENT_CHANGES_DAYS
    from flows.services.settings import WIKIDATA_API
    from kedit_core.errors import KeditError

    if end <= start:
        raise KeditError(f"backfill range is empty: start {start} is not before end {end}")
    _check_source(source, dump_path)
    if source == "dump" or items:
        return []
    now = now or datetime.now(timezone.utc)
    oldest = now - timedelta(days=RECENT_CHANGES_DAYS)
    start_utc = start if start.tzinfo else start.replace(tzinfo=timezone.utc)
    if start_utc >= oldest:
        return []
    msg = (f"Wikidata's recent changes reach back about {RECENT_CHANGES_DAYS} days (to {oldest:%Y-%m-%d}); "
           f"a backfill from {start_utc:%Y-%m-%d} needs --items Q42,... or --source dump --dump FILE")
    if settings.endpoint.rstrip("/") == WIKIDATA_API:
        raise KeditError(msg)
    msg = f"{msg} (going on: {settings.endpoint} is not Wikidata's API and keeps what it holds)"
    log.warning(msg)
    return [msg]


def backfill_chunk(
    settings: PipelineSettings,
    start: datetime,
    end: datetime,
    source: str = "api",
    dump_path: str | None = None,
    items: list[str] | None = None,
) -> dict[str, Any]:
    """One chunk of a backfill, with cursors of its own (named with the chunk's bounds, so
    chunks never skip each other's work). `api`: per-item revision history for `items`;
    without items, the recent-changes window (Wikidata keeps ~30 days of them: see
    `check_backfill`). `dump`: a local incremental dump file, or a folder of them; the first
    revision of a page in a file is diffed against its parent fetched through the API."""
    from connectors.wikidata_dump import dump_files, dump_may_hold
    from flows.services import ingest

    _check_source(source, dump_path)
    bounds = f"{_iso(start)}..{_iso(end)}"
    client = settings.wikidata_client()
    try:
        if source == "dump":
            assert dump_path is not None  # check_backfill refused it otherwise
            total = empty_ingest_counts()
            files = [f for f in dump_files(dump_path) if dump_may_hold(f, start)]
            for f in files:
                report = ingest.ingest_dump(f, db(), filter_config(settings), client=client, start=start, end=end,
                                            cursor_name=f"wikidata:dump:{f.name}:{bounds}", progress=False)
                add_counts(total, _counts(report))
            total["dump_files"] = [f.name for f in files]
            return total
        if items:
            report = ingest.backfill_items(client, db(), items, start, end, filter_config(settings),
                                           cursor_name=f"wikidata:backfill-items:{bounds}", progress=False)
        else:
            report = ingest.ingest_window(client, db(), start, end, filter_config(settings),
                                          cursor_name=f"wikidata:backfill-window:{bounds}")
        return _counts(report)
    finally:
        client.close()


def chunk_cursor_name(kind: str, start: datetime, end: datetime) -> str:
    return f"{kind}:{start.isoformat()}:{end.isoformat()}"


def pending_chunks(kind: str, start: datetime, end: datetime, step: timedelta) -> list[tuple[datetime, datetime]]:
    """Chunks of [start, end) not yet finished according to the range's cursor."""
    if end <= start:
        raise ValueError(f"backfill range is empty: start {start} is not before end {end}")
    done = ledger.get_cursor(db(), chunk_cursor_name(kind, start, end))
    t = datetime.fromisoformat(done) if done else start
    out = []
    while t < end:
        out.append((t, min(t + step, end)))
        t = t + step
    return out


def mark_chunk_done(kind: str, start: datetime, end: datetime, chunk_end: datetime) -> None:
    ledger.set_cursor(db(), chunk_cursor_name(kind, start, end), chunk_end.isoformat())


# --------------------------------------------------------------------------- cases


def build_pending_cases(settings: PipelineSettings) -> dict[str, Any]:
    """Turn accepted fact changes into edit cases (labels from the cache or the API).

    A change leaves 'accepted' only when it became a case ('cased') or was dropped with a
    reason ('filtered'); a failure half-way (API down) leaves it for the next run.
    """
    from flows.services.labels import CachedLabelLookup
    from kedit_core.qa import SubjectFacts, build_cases
    from storage import wikidata_store

    database = db()
    changes = wikidata_store.get_fact_changes(database, status="accepted")
    if not changes:
        return {"changes": 0, "new_cases": 0, "dropped": 0}
    client = settings.wikidata_client()
    try:
        # The subjects' own entities at their revision feed same-subject locality probes,
        # other-subject probes with the same relation, and multi-hop questions.
        entities = client.entities_at_revisions({c.revid for c in changes if c.revid})
        facts = SubjectFacts.from_entities(entities.values())
        labels = CachedLabelLookup(client, database)
        report = build_cases(changes, labels, facts)
        labels.flush()
    finally:
        client.close()
    new = ledger.upsert_cases(database, report.cases)
    wikidata_store.set_change_statuses(
        database,
        [(c.change_id, "cased", None) for c in report.cases if c.change_id]
        + [(d.change_id, "filtered", f"{d.reason}: {d.detail}" if d.detail else d.reason) for d in report.dropped],
    )
    return {
        "changes": len(changes),
        "new_cases": new,
        "dropped": len(report.dropped),
        "dropped_reasons": dict(report.reasons().most_common(8)),
        "specific_template": report.specific_template,
        "fallback_template": report.fallback_template,
    }


# --------------------------------------------------------------------------- editing


def split_budget(pending: list, budget: int | None) -> tuple[list, list]:
    """(what this run edits, what waits): the first `budget` of cases already in priority order."""
    if not budget or budget < 0 or len(pending) <= budget:
        return list(pending), []
    return list(pending[:budget]), list(pending[budget:])


def reconcile_pending(run_id: str | None, log: Callable[[str], Any] = log.info) -> dict[str, int]:
    """Before editing: per fact, pending cases older than the applied value or than a later
    pending one are superseded, and a late revert becomes an edit only if it undoes what the
    model holds (`kedit_core.corrections`); every decision goes to the ledger with its reason."""
    from kedit_core.corrections import reconcile
    from storage import correction_store

    database = db()
    decisions = reconcile(correction_store.pending_fact_edits(database), correction_store.applied_fact_edits(database))
    correction_store.record_decisions(database, decisions, run_id)
    counts = {"superseded": sum(d.status == "superseded" for d in decisions),
              "reverts_applied": sum(d.status == "pending" for d in decisions),
              "reverts_filtered": sum(d.status == "filtered" for d in decisions)}
    for d in decisions:
        log(f"case {d.case_id}: {d.status}: {d.reason}")
    return counts


def edit_pending(settings: PipelineSettings, run_id: str, log: Callable[[str], Any] = log.info) -> dict[str, Any]:
    """Apply pending cases to the live model in gated batches: first the corrections'
    decisions (`reconcile_pending`), then at most `max_edits_per_run`, oldest change first
    (then subject, relation, case id); the others stay pending with a reason saying they
    wait for the next run."""
    from flows.services.gated_batches import apply_gated_batches, load_or_freeze_suite
    from kedit_core.editors import get_editor
    from kedit_core.regression_gate import RegressionGateConfig
    from storage import pipeline_store

    database = db()
    corrections = reconcile_pending(run_id, log)
    pending = pipeline_store.pending_cases_by_priority(database)
    if not pending:
        return {"pending": 0, "waiting": 0, "applied_cases": 0, "rejected_cases": 0, "applied_batches": 0,
                "corrections": corrections}
    todo, waiting = split_budget(pending, settings.max_edits_per_run)
    if waiting:
        ledger.set_case_status(database, [c.case_id for c in waiting], "pending",
                               f"waiting: over run {run_id}'s edit budget of {settings.max_edits_per_run}")
        log(f"edit budget {settings.max_edits_per_run}: {len(waiting)} pending cases wait for the next run")
    live = live_model(settings)
    editor = get_editor(settings.method, settings.editor_overrides or None)
    suite = load_or_freeze_suite(live, database, run_id)
    gate = RegressionGateConfig.from_dict({"full_check_every": settings.full_check_every, **settings.gate_overrides})
    log(f"editing {len(todo)} pending cases with {settings.method} in batches of {settings.batch_size}")
    report = apply_gated_batches(live, editor, todo, database, gate, settings.batch_size, run_id, suite)
    return {
        "pending": len(pending),
        "waiting": len(waiting),
        "budget": settings.max_edits_per_run,
        "applied_cases": report.n_applied,
        "rejected_cases": report.n_rejected,
        "applied_batches": sum(1 for b in report.batches if b.status == "applied"),
        "rolled_back_batches": sum(1 for b in report.batches if b.status != "applied"),
        "live_version": report.final_version,
        "seconds": round(report.seconds, 1),
        "corrections": corrections,
    }


def publish_live_version(settings: PipelineSettings) -> dict[str, Any]:
    """Tell the configured `kedit serve` that a new version is live (it verifies and loads it)."""
    from connectors.served import ServedModelClient

    live = live_model(settings)
    client = ServedModelClient(settings.server_url, admin_token=settings.admin_token)
    return {"published": live.version_id, "server": settings.server_url, "answer": client.publish(live.version_id)}


def publish_to_engine(settings: PipelineSettings) -> dict[str, Any]:
    """Export the live version into another engine's folder and tell the engine
    (flows/services/publish.py; a version it took already is left alone, one it did not is retried)."""
    from flows.services.publish import publish_version

    res = publish_version(settings.publish_dir, db(), fmt=settings.publish_format, name=settings.publish_name,
                          llama_server=settings.publish_llama_server, command=settings.publish_command,
                          spec=settings.model, show_progress=False, device=settings.device, dtype=settings.dtype)
    return {"version": res.version_id, "folder": str(res.folder), "exported": res.exported, "notified": res.notified}


def full_check_due(settings: PipelineSettings) -> bool:
    """The full regression check runs every `full_check_every` nightly runs (and the first)."""
    n = len(ledger.list_runs(db(), kind="nightly"))
    return n <= 1 or n % max(settings.full_check_every, 1) == 0


def full_regression_check(settings: PipelineSettings, run_id: str) -> dict[str, Any]:
    from flows.services.gated_batches import load_or_freeze_suite
    from kedit_core.regression import full_check

    database = db()
    live = live_model(settings)
    suite = load_or_freeze_suite(live, database, run_id)
    recent = ledger.get_cases(database, status="applied")[-32:]
    metrics = full_check(live.lm, suite, recent)
    ledger.record_metrics(
        database,
        {f"full_{k}": v for k, v in metrics.items()},
        run_id=run_id,
        method=settings.method,
        version_id=live.version_id,
        model_fingerprint=live.lm.fingerprint,
    )
    return {k: round(v, 4) for k, v in metrics.items()}


# --------------------------------------------------------------------------- reports and comparisons


def write_report(since: datetime | None = None, html: str | None = None) -> dict[str, Any]:
    from storage.report_queries import collect_report
    from kedit_core.report import render_html, terminal_summary

    database = db()
    data = collect_report(database, since=since.replace(tzinfo=None) if since else None)
    path = Path(html) if html else database.path.parent / "reports" / f"drift-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_html(data))  # a reader never sees half a report
    return {"html": str(path), "summary": terminal_summary(data)}


def compare(stream: str, methods: list[str], limit: int | None, batch_size: int, model: str,
            settings: list[str] | None = None, greedy: bool = True, device: str | None = None,
            dtype: str | None = None) -> dict[str, Any]:
    """`kedit compare` as a step: one ledger run, every method from the same base. `methods`
    entries may be `label=method`, `settings` are `METHOD.key=value`, as on the command line.
    Returns per method its final metrics (or its error), not the full rows."""
    from flows.services.comparison import parse_methods, run_comparison

    result = run_comparison(parse_methods(",".join(methods)), settings or [], stream, limit=limit,
                            batch_size=batch_size, model=model, greedy=greedy, device=device, dtype=dtype)
    methods_out = {r["label"]: ({"error": r["error"]} if r.get("error") else
                                {"metrics": r["metrics"], "seconds_per_edit": r["seconds_per_edit"]})
                   for r in result["rows"]}
    return {"run_id": result["run_id"], "status": result["status"], "cases": result["cases"],
            "restored": result["restored"], "methods": methods_out}
