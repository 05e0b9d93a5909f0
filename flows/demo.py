"""`kedit demo`: a recorded Wikidata week through the nightly flow, night by night.

The recorded week (data/wikidata_week, see its SOURCES.md: real entity bodies, constructed
edits) is replayed from a server on 127.0.0.1, so the real `requests` client, the diff, the
filters, case generation, corrections, AlphaEdit in gated batches, the regression gate and
the drift report all run for real, on the embedded model. Each night is one run of the
`kedit-nightly-update` flow whose windows continue from the ledger's cursor
(flows/services/windows.py); the demo misses one night on purpose, so the next run catches up both
days. The week holds a vandal edit undone after the settle window (a correction must edit
the model back), a subject edited on several nights, a value corrected after it was
applied, and a change held in quarantine (`kedit quarantine list`).

The demo keeps its own ledger (`$KEDIT_HOME/demo/kedit.duckdb`) so its constructed edits
never mix with a real one. Running it again applies nothing new: nights whose windows the
ledger's cursor has passed are not run again, and the last night is run once more to show
that the flow finds nothing to read or edit.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kedit_core.errors import KeditError
from kedit_core.home import kedit_home

REPO = Path(__file__).resolve().parents[1]
RECORDED_WEEK = REPO / "data" / "wikidata_week"


def _day(d: int) -> datetime:
    return datetime(2024, 5, d, tzinfo=timezone.utc)


# The recorded windows are the days 2024-05-01 .. 2024-05-06 (UTC). A night's run reads up to
# its window end; the run that would have read 2024-05-03 never happens.
NIGHTS = [_day(2), _day(3), _day(5), _day(6), _day(7)]
MISSED = _day(4)


def demo_db_path() -> Path:
    return kedit_home() / "demo" / "kedit.duckdb"


def run_demo(
    model: str = "smollm2",
    method: str = "alphaedit",
    echo: Callable[[str], Any] = print,
    editor_settings: dict[str, Any] | None = None,
    pipeline_settings: dict[str, Any] | None = None,
    week: str | Path | None = None,
) -> dict[str, Any]:
    """Run the recorded week's nights; returns {"nights": [per-night summaries], "edits": the
    applied/rejected totals of this demo run, "report": the last night's report}."""
    from connectors.replay import ReplayServer
    from flows.services import steps
    from flows.prefect_flows import nightly_update
    from flows.services.windows import CURSOR
    from storage import ledger
    from storage.lock import ledger_lock

    folder = Path(week) if week else RECORDED_WEEK
    if not folder.exists():
        raise KeditError(f"the recorded Wikidata week is missing ({folder}); run the demo from a kedit checkout")
    os.environ["KEDIT_DB"] = str(demo_db_path())  # the demo's own ledger (and delta folder)
    steps.forget_live_models()
    html = demo_db_path().parent / "drift-report.html"
    t0 = time.perf_counter()
    settings = {"model": model, "method": method, "rate_limit_per_s": 0, "editor_overrides": editor_settings or {},
                **(pipeline_settings or {})}
    wait = float(settings.get("lock_wait_s") or 0.0)
    nights: list[dict[str, Any]] = []
    with ledger_lock(demo_db_path(), "demo", wait_s=wait):  # the nightly flow inside takes it again
        echo(f"kedit demo: replaying the recorded Wikidata week {NIGHTS[0].date() - (NIGHTS[1] - NIGHTS[0])} .. "
             f"{(NIGHTS[-1] - (NIGHTS[1] - NIGHTS[0])).date()} from 127.0.0.1, one nightly run per night")
        echo(f"ledger: {demo_db_path()}")
        echo("")
        stored = ledger.get_cursor(steps.db(), CURSOR)
        cursor = datetime.fromisoformat(stored) if stored else None
        todo = [end for end in NIGHTS if cursor is None or end > cursor]
        if not todo:  # a second run: show that the last night finds nothing to read or edit
            echo(f"every night was run before (the ledger's cursor is at {cursor:%Y-%m-%d %H:%M}); "
                 "the last night once more:")
            todo = NIGHTS[-1:]
        with ReplayServer(folder) as url:
            settings["endpoint"] = url
            for end in todo:
                before = nights[-1]["end"] if nights else cursor
                if before is not None and before < MISSED < end:
                    echo(f"night -: no run read up to {MISSED:%m-%d} (a missed night): the next run catches up")
                started = time.perf_counter()
                summary = nightly_update(window_end=end, window_hours=24, settings=dict(settings),
                                         report_html=str(html))
                night = {"night": NIGHTS.index(end) + 1, "end": end, "seconds": time.perf_counter() - started,
                         **summary}
                nights.append(night)
                echo(_night_line(night))
        last = nights[-1]
        echo("")
        if last.get("report", {}).get("summary"):
            echo(last["report"]["summary"])
        _show_history(echo)
        _show_answers(settings, echo)
        _show_quarantine(echo)
    echo(f"\ndrift report: {last['report']['html']}")
    echo(f"demo finished in {time.perf_counter() - t0:.0f} s")
    edits = {"applied_cases": sum(n.get("edits", {}).get("applied_cases", 0) for n in nights),
             "rejected_cases": sum(n.get("edits", {}).get("rejected_cases", 0) for n in nights)}
    return {"nights": nights, "edits": edits, "report": last.get("report", {})}


def _night_line(n: dict[str, Any]) -> str:
    ing, cases, edits = n.get("ingest", {}), n.get("cases", {}), n.get("edits", {})
    windows = n.get("windows") or []
    if windows:
        a, b = datetime.fromisoformat(windows[0][0]), datetime.fromisoformat(windows[-1][1])
        span = f"{a:%m-%d} .. {b:%m-%d}" + (f" ({len(windows)} days)" if len(windows) > 1 else "")
    else:
        span = "nothing new to read"
    corr = edits.get("corrections") or {}
    live = f"live v{edits['live_version']}" if "live_version" in edits else "live version unchanged"
    return (
        f"night {n['night']}: {span:<22} {ing.get('revisions_seen', 0):>2} revisions, "
        f"{cases.get('new_cases', 0):>2} new cases, {edits.get('applied_cases', 0)} applied, "
        f"{edits.get('rejected_cases', 0)} rejected, {ing.get('changes_quarantined', 0)} quarantined; "
        f"corrections: {corr.get('reverts_applied', 0)} late revert, {corr.get('superseded', 0)} superseded; "
        f"{live}  ({n['seconds']:.0f} s)"
    )


def _applied_chain() -> tuple[list[Any], dict[str, Any]]:
    """The applied Wikidata cases in revision order with their versions, and the ones the
    model should state now: a case is outdated when a later applied case of the same subject
    and relation set the same fact again or changed its value away from it."""
    from flows.services import steps
    from kedit_core.qa import fact_key
    from storage import correction_store

    rows = correction_store.applied_case_versions(steps.db())
    order = sorted(rows, key=lambda r: (str(r["case"].meta.get("timestamp")), int(r["case"].meta.get("revid") or 0)))
    current = {}
    for i, r in enumerate(order):
        c = r["case"]
        key = fact_key(str(c.meta.get("subject_id")), c.relation, c.meta.get("new_value"))
        later = [o["case"] for o in order[i + 1:]
                 if (o["case"].meta.get("subject_id"), o["case"].relation) == (c.meta.get("subject_id"), c.relation)]
        if not any(o.target_old == c.target_new
                   or fact_key(str(o.meta.get("subject_id")), o.relation, o.meta.get("new_value")) == key
                   for o in later):
            current[c.case_id] = c
    return order, current


def _show_history(echo: Callable[[str], Any]) -> None:
    """Facts the week changed on more than one night, as the ledger applied them."""
    order, _ = _applied_chain()
    chains: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in order:
        chains[(r["case"].subject, r["case"].relation)].append(r)
    several = {k: v for k, v in chains.items() if len({r["version_id"] for r in v}) > 1}
    if not several:
        return
    echo("\nfacts edited on more than one night (value -> value (model version that got it)):")
    for (subject, _relation), rows in several.items():
        first = rows[0]["case"].target_old or "-"
        steps_ = " -> ".join(f"{r['case'].target_new} (v{r['version_id']})" for r in rows)
        echo(f"  {subject}, {rows[0]['case'].question or rows[0]['case'].prompt}  {first} -> {steps_}")


def _show_answers(settings: dict[str, Any], echo: Callable[[str], Any]) -> None:
    """What a user of `kedit serve` now reads: the question of each fact the week edited, at
    its current value, asked in chat to the live model (chat template, greedy, up to 48
    tokens), and whether the reply states that value (kedit_core/served_answers.py, the
    protocol every figure uses)."""
    from flows.services import steps
    from flows.services.settings import PipelineSettings
    from kedit_core.answer import answer_many
    from kedit_core.served_answers import case_forms, states_answer

    _, current = _applied_chain()
    cases = list(current.values())
    if not cases:
        return
    live = steps.live_model(PipelineSettings.from_env(**settings))  # the nights' model: same spec, device, dtype
    questions = [c.question or c.prompt for c in cases]
    replies = answer_many(live.lm, questions, rewriter=live.rewriter)
    stated = [states_answer(r, *case_forms(c)) for c, r in zip(cases, replies)]
    echo(f"\nthe live model (version {live.version_id}) asked in chat about the facts the week edited, at their "
         f"current value: {sum(stated)} of {len(cases)} replies state it")
    for case, question, reply, ok in zip(cases, questions, replies, stated):
        echo(f"  [{'x' if ok else ' '}] Q: {question}   (now: {case.target_new}; was: {case.target_old or '-'})")
        echo(f"      A: {' '.join(reply.split())}")


def _show_quarantine(echo: Callable[[str], Any]) -> None:
    """What waits for a human: the changes held in quarantine and the command to act on them."""
    from flows.services import steps
    from storage import quarantine_store

    held = quarantine_store.quarantined(steps.db())
    if not held:
        return
    echo(f"\nheld in quarantine for a human: {len(held)} change{'s' if len(held) != 1 else ''}")
    for r in held:
        echo(f"  {r['change_id']}  {r['subject_label'] or r['subject']} {r['property']}: {r['reason']}")
    echo(f"act on them: kedit quarantine list|release|reject --db {demo_db_path()}")
