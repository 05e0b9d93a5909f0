"""kedit's Prefect flows. Thin on purpose: each task calls one plain function from
`flows.services.steps` (which wires the rooms) and returns a small dict of counts; Prefect decides
what runs when, retries network steps with backoff, and logs through the run logger.

- nightly_update: ingest the settled windows since the last run (a cursor in the ledger,
  flows/services/windows.py), build cases, edit in gated batches, publish, run the periodic full
  regression check, write the drift report.
- backfill: the same per day over a historical range, resumable through a cursor.
- compare_methods: one stream through several editors from the same base.
- drift_report: the report alone.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger, task

from flows.services import steps
from flows.services.settings import PipelineSettings
from flows.services.windows import WindowPlan, over_change_budget

NETWORK_RETRIES = dict(retries=3, retry_delay_seconds=[10, 60, 300], retry_jitter_factor=0.5)


def _settings(overrides: dict[str, Any] | None) -> PipelineSettings:
    return PipelineSettings.from_env(**(overrides or {}))


def _with_retries(task_fn, cfg: PipelineSettings):
    """A network task with the configured retry schedule (backoff with jitter)."""
    delays = list(cfg.network_retry_delays_s)
    return task_fn.with_options(retries=len(delays), retry_delay_seconds=delays or 0)


@task(name="ingest-wikidata-window", **NETWORK_RETRIES)
def ingest_task(settings: PipelineSettings, start: datetime, end: datetime) -> dict[str, Any]:
    counts = steps.ingest_window(settings, start, end)
    get_run_logger().info("ingested %s .. %s: %s", start.isoformat(), end.isoformat(), counts)
    return counts


@task(name="build-edit-cases", **NETWORK_RETRIES)
def cases_task(settings: PipelineSettings) -> dict[str, Any]:
    counts = steps.build_pending_cases(settings)
    get_run_logger().info("edit cases: %s", counts)
    return counts


@task(name="edit-gated-batches")
def edit_task(settings: PipelineSettings, run_id: str) -> dict[str, Any]:
    counts = steps.edit_pending(settings, run_id, log=get_run_logger().info)
    get_run_logger().info("edit batches: %s", counts)
    return counts


@task(name="publish-version", **NETWORK_RETRIES)
def publish_task(settings: PipelineSettings) -> dict[str, Any]:
    result = steps.publish_live_version(settings)
    get_run_logger().info("publish: %s", result)
    return result


@task(name="full-regression-check")
def full_check_task(settings: PipelineSettings, run_id: str) -> dict[str, Any]:
    result = steps.full_regression_check(settings, run_id)
    get_run_logger().info("full regression check: %s", result)
    return result


@task(name="write-drift-report")
def report_task(since: datetime | None, html: str | None) -> dict[str, Any]:
    result = steps.write_report(since=since, html=html)
    get_run_logger().info("drift report written to %s", result.get("html"))
    return result


@task(name="publish-to-engine")
def engine_publish_task(settings: PipelineSettings) -> dict[str, Any]:
    result = steps.publish_to_engine(settings)
    get_run_logger().info("publish to %s: %s", settings.publish_dir, result)
    return result


@flow(name="kedit-nightly-update", log_prints=False)
def nightly_update(
    window_end: datetime | None = None,
    window_hours: float = 24.0,
    settings: dict[str, Any] | None = None,
    report_html: str | None = None,
) -> dict[str, Any]:
    """Ingest the settled Wikidata edits since the last run and apply them to the live model.

    The windows continue from the ledger's cursor (flows/services/windows.py) up to `window_end`
    (default: now minus the settle time), `window_hours` at a time; the first run ever
    reads one window back from `window_end`."""
    cfg = _settings(settings)
    with steps.hold_ledger("nightly", cfg):  # one writer per ledger, for the whole run
        return _nightly(cfg, window_end, window_hours, report_html)


def _nightly(cfg: PipelineSettings, window_end: datetime | None, window_hours: float,
             report_html: str | None) -> dict[str, Any]:
    plan = steps.window_plan(cfg, window_end, window_hours)
    run_id = steps.begin_run("nightly", cfg, {"planned_windows": [[a.isoformat(), b.isoformat()] for a, b in plan.chunks],
                                              "target_end": plan.target_end.isoformat()})
    summary: dict[str, Any] = {"run_id": run_id}
    try:
        _ingest_windows(cfg, plan, summary)
        summary["edits"] = edit_task(cfg, run_id)
        if cfg.server_url:
            # Every run publishes the live version (idempotent on the server), so a server
            # that was down last night catches up now; a failure after the task's retries is
            # recorded in the summary and does not undo the night's edits.
            try:
                summary["publish"] = _with_retries(publish_task, cfg)(cfg)
            except Exception as exc:  # noqa: BLE001 - recorded, retried by the next run
                get_run_logger().error("publishing to %s failed: %s", cfg.server_url, exc)
                summary["publish"] = {"error": f"{type(exc).__name__}: {exc}", "server": cfg.server_url}
        if cfg.publish_dir:
            # Another engine's folder, the same way: a failure is recorded, the next run retries it
            try:
                summary["engine"] = engine_publish_task(cfg)
            except Exception as exc:  # noqa: BLE001 - recorded, retried by the next run
                get_run_logger().error("publishing to %s failed: %s", cfg.publish_dir, exc)
                summary["engine"] = {"error": f"{type(exc).__name__}: {exc}", "folder": cfg.publish_dir}
        if steps.full_check_due(cfg):
            summary["full_check"] = full_check_task(cfg, run_id)
        summary["report"] = report_task(None, report_html)
    except BaseException:
        steps.end_run(run_id, "failed")
        raise
    steps.end_run(run_id, "completed")
    return summary


def _ingest_windows(cfg: PipelineSettings, plan: WindowPlan, summary: dict[str, Any]) -> None:
    """Ingest and case the planned windows in order, moving the cursor after each, until the
    run's change budget is spent; the summary gets the windows done, summed counts and the
    hours left for the next run."""
    logger = get_run_logger()
    summary.update(windows=[], ingest=steps.empty_ingest_counts(), cases={})
    done_until: datetime | None = None
    for start, end in plan.chunks:
        if over_change_budget(summary["ingest"]["changes_accepted"], cfg.max_changes_per_run):
            break
        steps.add_counts(summary["ingest"], _with_retries(ingest_task, cfg)(cfg, start, end))
        steps.add_counts(summary["cases"], _with_retries(cases_task, cfg)(cfg))
        steps.advance_window_cursor(end)
        summary["windows"].append([start.isoformat(), end.isoformat()])
        done_until = end
    if done_until is None:  # nothing new to read: still case changes an earlier run left accepted
        summary["cases"] = _with_retries(cases_task, cfg)(cfg)
    summary["window"] = [summary["windows"][0][0], summary["windows"][-1][1]] if summary["windows"] else None
    left = plan.left_after(done_until)
    summary["backlog_hours"] = round(left.total_seconds() / 3600, 2)
    if left.total_seconds() > 0:
        logger.warning("%.1f h of Wikidata edits (up to %s) left for the next run (max_span_hours=%s, "
                       "max_changes_per_run=%s)", summary["backlog_hours"], plan.target_end.isoformat(),
                       cfg.max_span_hours, cfg.max_changes_per_run)
    elif not plan.chunks:
        logger.info("no new window: the cursor is already at %s", plan.target_end.isoformat())


@flow(name="kedit-backfill")
def backfill(
    start: datetime,
    end: datetime,
    chunk_hours: float = 24.0,
    source: str = "api",
    dump_path: str | None = None,
    items: list[str] | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Historical edits by day over [start, end): resumable through a stored cursor, so a
    re-run after a crash continues where it stopped and applies nothing twice.

    `source`: "api" (recent changes, which Wikidata keeps ~30 days, or per-item history when
    `items` are named) or "dump" (`dump_path`: an incremental XML dump file or a folder of
    them). A backfill that cannot work (a dump that is not there, recent changes older than
    Wikidata keeps without items) fails before its run starts, in one line."""
    cfg = _settings(settings)
    warnings = steps.check_backfill(cfg, start, end, source, dump_path, items)
    with steps.hold_ledger("backfill", cfg):
        out = _backfill(cfg, start, end, chunk_hours, source, dump_path, items)
    if warnings:
        out["warnings"] = warnings
    return out


def _backfill(cfg: PipelineSettings, start: datetime, end: datetime, chunk_hours: float, source: str,
              dump_path: str | None, items: list[str] | None) -> dict[str, Any]:
    run_id = steps.begin_run("backfill", cfg, {"start": str(start), "end": str(end), "source": source,
                                              "dump_path": dump_path, "items": items})
    logger = get_run_logger()
    chunks = steps.pending_chunks("backfill", start, end, timedelta(hours=chunk_hours))
    logger.info("backfill %s .. %s: %d chunks to do", start, end, len(chunks))
    done: list[dict[str, Any]] = []
    try:
        for i, (a, b) in enumerate(chunks, 1):
            counts = _with_retries(backfill_chunk_task, cfg)(cfg, a, b, source, dump_path, items)
            cases = _with_retries(cases_task, cfg)(cfg)
            edits = edit_task(cfg, run_id)
            steps.mark_chunk_done("backfill", start, end, b)
            done.append({"chunk": a.isoformat(), **counts, "cases": cases.get("new_cases", 0),
                         "applied": edits.get("applied_cases", 0)})
            logger.info("backfill chunk %d/%d (%s) done", i, len(chunks), a.date())
    except BaseException:
        steps.end_run(run_id, "failed")
        raise
    steps.end_run(run_id, "completed")
    return {"run_id": run_id, "chunks": done}


@task(name="backfill-chunk", **NETWORK_RETRIES)
def backfill_chunk_task(
    settings: PipelineSettings, start: datetime, end: datetime, source: str, dump_path: str | None, items: list[str] | None
) -> dict[str, Any]:
    return steps.backfill_chunk(settings, start, end, source=source, dump_path=dump_path, items=items)


@flow(name="kedit-compare-methods")
def compare_methods(
    stream: str,
    methods: list[str],
    limit: int = 100,
    batch_size: int = 10,
    model: str = "smollm2",
    settings: list[str] | None = None,
    greedy: bool = True,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """`kedit compare` as a flow: one stream of edits (e.g. "zsre:data/benchmarks/zsre_mend_train_1k.json")
    through several editors, each from the same base, in one ledger run (so the drift report
    shows them side by side); metrics per batch go to DuckDB. `settings`: METHOD.key=value.
    `device` / `dtype`: default KEDIT_DEVICE / KEDIT_DTYPE, else cpu / float32."""
    return compare_task(stream, methods, limit, batch_size, model, settings, greedy, device, dtype)


@task(name="compare-methods")
def compare_task(stream: str, methods: list[str], limit: int, batch_size: int, model: str,
                 settings: list[str] | None, greedy: bool, device: str | None = None,
                 dtype: str | None = None) -> dict[str, Any]:
    result = steps.compare(stream, methods, limit, batch_size, model, settings=settings, greedy=greedy,
                           device=device, dtype=dtype)
    get_run_logger().info("compare run %s: %s", result["run_id"], result["status"])
    return result


@flow(name="kedit-drift-report")
def drift_report(since: datetime | None = None, html: str | None = None) -> dict[str, Any]:
    return report_task(since, html)
