"""`kedit nightly`, `kedit backfill`, `kedit schedule` and `kedit demo`: the commands that
start kedit's Prefect flows."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, List, Optional

import typer

from flows.commands import CONFIG_OPTION, DEVICE_OPTION, DTYPE_OPTION, WAIT_HELP, with_config

SET_HELP = "Editor setting KEY=VALUE (repeatable), as for `kedit evaluate`, e.g. --set targets.steps=50."
# Options nightly and backfill share (one definition, one help text).
MODEL_OPTION = typer.Option(None, help="Model spec (default: smollm2, the embedded model).")
METHOD_OPTION = typer.Option(None, help="Editing method (default: alphaedit).")
ENDPOINT_OPTION = typer.Option(None, help="Wikidata API endpoint (default: the real one).")
SET_OPTION = typer.Option([], "--set", help=SET_HELP)
WAIT_OPTION = typer.Option(None, "--wait", help=WAIT_HELP)


def _utc(value: Optional[datetime]) -> Optional[datetime]:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _settings_overrides(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def _placement(device: Optional[str], dtype: Optional[str]) -> dict[str, str]:
    """`--device` / `--dtype` as pipeline settings, checked now (this machine must have the
    device), so a missing GPU is one line before a night's ingest rather than after it."""
    from flows.services.settings import PipelineSettings
    from kedit_core.device import resolve

    s = PipelineSettings.from_env(**_settings_overrides(device=device, dtype=dtype))
    resolve(s.device, s.dtype)
    return {"device": s.device, "dtype": s.dtype}


def editor_overrides(method: Optional[str], pairs: List[str]) -> Optional[dict[str, Any]]:
    """`--set` pairs as the pipeline's `editor_overrides`, checked against the method's
    config now, so a typo fails before a night's ingest rather than at its first batch."""
    if not pairs:
        return None
    from kedit_core.editor_settings import editor_from_settings, parse_settings
    from flows.services.settings import PipelineSettings

    editor_from_settings(method or PipelineSettings.from_env().method, pairs)  # raises, naming a bad setting
    return parse_settings(pairs)


def register(app: typer.Typer) -> None:
    app.command("nightly")(nightly)
    app.command("backfill")(backfill_cmd)
    app.command("schedule")(schedule)
    app.command("demo")(demo)


def nightly(
    window_end: Optional[datetime] = typer.Option(
        None, help="Read edits up to this time (UTC). Default: now minus the settle delay. Windows start where "
                   "the last run ended (a cursor in the ledger)."),
    window_hours: float = typer.Option(24.0, help="Hours per window (a missed night is caught up one window at "
                                                  "a time); the first run ever reads one window."),
    model: Optional[str] = MODEL_OPTION,
    method: Optional[str] = METHOD_OPTION,
    endpoint: Optional[str] = ENDPOINT_OPTION,
    server: Optional[str] = typer.Option(None, "--server", help="Publish new versions to this `kedit serve` URL."),
    html: Optional[str] = typer.Option(None, help="Where to write the HTML drift report."),
    settings: List[str] = SET_OPTION,
    config: Optional[Path] = CONFIG_OPTION,
    wait: Optional[float] = WAIT_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
) -> None:
    """Run the nightly update once: ingest, build cases, edit in gated batches, report."""
    from flows.prefect_flows import nightly_update

    overrides = editor_overrides(method, with_config(config, method, settings))
    pipeline = _settings_overrides(model=model, method=method, endpoint=endpoint, server_url=server,
                                   editor_overrides=overrides, lock_wait_s=wait, **_placement(device, dtype))
    with _ledger_held("nightly", pipeline):  # refused here, in one line, before Prefect starts a run
        summary = nightly_update(window_end=_utc(window_end), window_hours=window_hours, settings=pipeline,
                                 report_html=html)
    _print_summary(summary)


def backfill_cmd(
    start: datetime = typer.Option(..., help="First day (UTC), e.g. 2026-10-01."),
    end: datetime = typer.Option(..., help="End (exclusive, UTC), e.g. 2026-10-08."),
    source: str = typer.Option(
        "api", help="api: Wikidata's recent changes, which reach back about 30 days (older ranges need --items "
                    "or dumps); dump: incremental XML dumps (--dump)."),
    dump: Optional[str] = typer.Option(
        None, help="A wikidatawiki-YYYYMMDD-pages-meta-hist-incr.xml.bz2 file, or a folder of them (source=dump). "
                   "Each page's first revision in a file is diffed against its parent fetched from the API."),
    items: Optional[str] = typer.Option(
        None, help="Comma-separated item ids (source=api): their revision history, any age."),
    chunk_hours: float = typer.Option(24.0, help="Chunk size in hours."),
    model: Optional[str] = MODEL_OPTION,
    method: Optional[str] = METHOD_OPTION,
    endpoint: Optional[str] = ENDPOINT_OPTION,
    settings: List[str] = SET_OPTION,
    config: Optional[Path] = CONFIG_OPTION,
    wait: Optional[float] = WAIT_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
) -> None:
    """Backfill historical Wikidata edits by date range, a chunk at a time (resumable).

    Recent changes reach back about 30 days: older ranges need --items or --source dump.
    """
    from flows.services import steps
    from flows.prefect_flows import backfill
    from flows.services.settings import PipelineSettings

    overrides = editor_overrides(method, with_config(config, method, settings))
    pipeline = _settings_overrides(model=model, method=method, endpoint=endpoint, editor_overrides=overrides,
                                   lock_wait_s=wait, **_placement(device, dtype))
    item_list = [i.strip() for i in items.split(",") if i.strip()] if items else None
    # A backfill that cannot work is refused here, in one line, before Prefect starts a run.
    steps.check_backfill(PipelineSettings.from_env(**pipeline), _utc(start), _utc(end), source, dump, item_list)
    with _ledger_held("backfill", pipeline):
        summary = backfill(
            start=_utc(start),
            end=_utc(end),
            chunk_hours=chunk_hours,
            source=source,
            dump_path=dump,
            items=item_list,
            settings=pipeline,
        )
    _print_summary(summary)


def schedule(
    cron: Optional[str] = typer.Option(None, help="Nightly cron (UTC). Default 0 2 * * * or KEDIT_NIGHTLY_CRON."),
) -> None:
    """Serve kedit's deployments: nightly on a cron; backfill and report on demand.

    Runs until stopped. Against a standalone Prefect server set PREFECT_API_URL first.
    """
    from prefect import serve

    from flows.services.settings import PipelineSettings

    cron = cron or PipelineSettings.from_env().nightly_cron
    typer.echo(f"serving kedit deployments; nightly at '{cron}' UTC (Ctrl-C to stop)")
    serve(*deployments(cron))


def demo(
    model: str = typer.Option("smollm2", help="Model spec (default: the embedded model)."),
    method: str = typer.Option("alphaedit", help="Editing method."),
    settings: List[str] = typer.Option([], "--set", help=SET_HELP),
    config: Optional[Path] = CONFIG_OPTION,
    wait: float = typer.Option(0.0, "--wait", help=WAIT_HELP),
    device: Optional[str] = DEVICE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
) -> None:
    """The main job: the nightly flow night by night on a recorded Wikidata week, on the embedded model.

    The week is replayed from 127.0.0.1 (one night missed on purpose, a late revert, a
    correction, changes held in quarantine); a second run applies nothing new.
    """
    from flows.demo import run_demo

    editor_settings = editor_overrides(method, with_config(config, method, settings))
    run_demo(model=model, method=method, echo=typer.echo, editor_settings=editor_settings,
             pipeline_settings={"lock_wait_s": wait, **_placement(device, dtype)})


def deployments(cron: str) -> list:
    """What `kedit schedule` serves: nightly on `cron`, the others on demand. One list, so the
    test that starts every deployment's flow sees exactly these."""
    from flows.prefect_flows import backfill, compare_methods, drift_report, nightly_update

    # One run at a time per writing deployment (Prefect queues the next); across deployments
    # the ledger's lock decides (a run that finds it held fails, naming the holder).
    return [
        nightly_update.to_deployment(name="nightly", cron=cron, concurrency_limit=1),
        backfill.to_deployment(name="backfill", concurrency_limit=1),
        compare_methods.to_deployment(name="compare", concurrency_limit=1),
        drift_report.to_deployment(name="report"),
    ]


def _ledger_held(kind: str, pipeline: dict[str, Any]):
    """The ledger's writer lock, taken by the command before it starts the flow, so a held
    ledger is one line from the CLI (the flow takes the same lock again, re-entrantly)."""
    from flows.services import steps
    from flows.services.settings import PipelineSettings

    return steps.hold_ledger(kind, PipelineSettings.from_env(**pipeline))


def _print_summary(summary: dict) -> None:
    import json

    typer.echo(json.dumps(summary, indent=2, default=str))
