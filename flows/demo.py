"""`kedit demo`: the nightly flow end to end on a recorded Wikidata day.

The recorded day (data/wikidata_day, see its SOURCES.md: real entity bodies, constructed
edits) is replayed from a server on 127.0.0.1, so the real `requests` client, the diff, the
filters, case generation, AlphaEdit in gated batches, the regression gate and the drift
report all run for real, on the embedded model. The demo keeps its own ledger
(`$KEDIT_HOME/demo/kedit.duckdb`) so its constructed edits never mix with a real one.
Running it again applies nothing new: every step is idempotent.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kedit_core.errors import KeditError
from kedit_core.model import kedit_home

REPO = Path(__file__).resolve().parents[1]
RECORDED_DAY = REPO / "data" / "wikidata_day"
# The recorded window (see data/wikidata_day/SOURCES.md): 2024-05-01, UTC.
DAY_END = datetime(2024, 5, 2, tzinfo=timezone.utc)


def demo_db_path() -> Path:
    return kedit_home() / "demo" / "kedit.duckdb"


def run_demo(
    model: str = "smollm2",
    method: str = "alphaedit",
    echo: Callable[[str], Any] = print,
    editor_settings: dict[str, Any] | None = None,
    pipeline_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from connectors.replay import ReplayServer
    from flows import steps
    from flows.pipelines import nightly_update
    from storage.lock import ledger_lock

    if not RECORDED_DAY.exists():
        raise KeditError(f"the recorded Wikidata day is missing ({RECORDED_DAY}); run the demo from a kedit checkout")
    os.environ["KEDIT_DB"] = str(demo_db_path())  # the demo's own ledger (and delta folder)
    steps.forget_live_models()
    html = demo_db_path().parent / "drift-report.html"
    t0 = time.perf_counter()
    wait = float((pipeline_settings or {}).get("lock_wait_s") or 0.0)
    with ledger_lock(demo_db_path(), "demo", wait_s=wait):  # the nightly flow inside takes it again
        echo(f"kedit demo: replaying the recorded Wikidata day {DAY_END.date()} (minus one) from 127.0.0.1")
        echo(f"ledger: {demo_db_path()}")
        with ReplayServer(RECORDED_DAY) as url:
            summary = nightly_update(
                window_end=DAY_END,
                window_hours=24,
                settings={"model": model, "method": method, "endpoint": url, "rate_limit_per_s": 0,
                          "editor_overrides": editor_settings or {}, **(pipeline_settings or {})},
                report_html=str(html),
            )
        _print(summary, echo)
        _show_answers(model, echo)
    echo(f"\ndrift report: {summary['report']['html']}")
    echo(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return summary


def _print(summary: dict[str, Any], echo: Callable[[str], Any]) -> None:
    ing, cases, edits = summary.get("ingest", {}), summary.get("cases", {}), summary.get("edits", {})
    echo("")
    echo(
        f"ingest : {ing.get('revisions_seen', 0)} revisions in the window, {ing.get('revisions_new', 0)} new, "
        f"{ing.get('revisions_filtered', 0)} filtered, {ing.get('revisions_failed', 0)} failed; "
        f"{ing.get('changes_accepted', 0)} fact changes accepted, {ing.get('changes_quarantined', 0)} quarantined"
    )
    echo(
        f"cases  : {cases.get('new_cases', 0)} new edit cases from {cases.get('changes', 0)} changes, "
        f"{cases.get('dropped', 0)} dropped {cases.get('dropped_reasons', {}) or ''}"
    )
    echo(
        f"edits  : {edits.get('applied_cases', 0)} applied, {edits.get('rejected_cases', 0)} rejected, "
        f"{edits.get('applied_batches', 0)} batches kept, {edits.get('rolled_back_batches', 0)} rolled back; "
        + (f"{edits['waiting']} wait for the next run (edit budget {edits.get('budget')}); " if edits.get("waiting") else "")
        + (f"live version {edits['live_version']}" if "live_version" in edits else "nothing pending, live version unchanged")
    )
    report = summary.get("report", {})
    if report.get("summary"):
        echo("")
        echo(report["summary"])


def _show_answers(model: str, echo: Callable[[str], Any]) -> None:
    """What a user of `kedit serve` now reads: each applied edit's question asked in chat
    to the live model (chat template, greedy, up to 48 tokens), and whether the reply
    states the new value (kedit_core/served_answers.py, the protocol every figure uses)."""
    from flows import steps
    from flows.settings import PipelineSettings
    from kedit_core.answer import answer_many
    from kedit_core.served_answers import case_forms, states_answer
    from storage import ledger

    applied = ledger.get_cases(steps.db(), status="applied")
    if not applied:
        return
    live = steps.live_model(PipelineSettings(model=model))
    questions = [c.question or c.prompt for c in applied]
    replies = answer_many(live.lm, questions, rewriter=live.rewriter)
    stated = [states_answer(r, *case_forms(c)) for c, r in zip(applied, replies)]
    echo(f"\nthe live model (version {live.version_id}) asked in chat about the applied edits: "
         f"{sum(stated)} of {len(applied)} replies state the new value")
    for case, question, reply, ok in zip(applied, questions, replies, stated):
        echo(f"  [{'x' if ok else ' '}] Q: {question}   (new: {case.target_new}; was: {case.target_old or '-'})")
        echo(f"      A: {' '.join(reply.split())}")
