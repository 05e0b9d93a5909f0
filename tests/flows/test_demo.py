"""`kedit demo` (the README's main job) through Prefect on a tiny model: the recorded week
(data/wikidata_week) replayed from 127.0.0.1 night by night through the real nightly flow
and a DuckDB ledger on disk. The missed night is caught up by the next run, the vandal edit
undone 50 h later reaches the model as an edit back to the current value, the corrected
population is applied over the typo, the report holds one measurement per night, the chat
answers are printed, and a second run applies nothing."""
from __future__ import annotations

import re

from flows.services import steps
from flows.demo import NIGHTS, demo_db_path, run_demo
from storage import correction_store, ledger, report_queries, wikidata_store
from storage.db import open_db
from tests.flows import flowkit  # noqa: F401  (registers the `nudge` test editor)

VANDAL, TYPO, UNDO, CORRECTION = 2150000301, 2150000302, 2150000303, 2150000304
SETTINGS = {"gate_overrides": {"take_floor": 0.0}}


def _cases_by_revid(db) -> dict[int, dict]:
    rows = {r["case_id"]: r for r in ledger.case_rows(db)}
    return {int(c.meta["revid"]): {**rows[c.case_id], "case": c} for c in ledger.get_cases(db)
            if c.meta.get("revid")}


def test_the_demo_replays_the_week_night_by_night_and_a_second_run_applies_nothing(prefect_api, kedit_home):
    lines: list[str] = []
    summary = run_demo(model="tiny-llama", method="nudge", echo=lines.append, pipeline_settings=SETTINGS)
    out = "\n".join(lines)
    nights = summary["nights"]

    # Five nightly runs; the third catches up the missed night: two one-day windows in order.
    assert [n["night"] for n in nights] == [1, 2, 3, 4, 5], out
    assert [len(n["windows"]) for n in nights] == [1, 1, 2, 1, 1], out
    assert nights[2]["windows"] == [["2024-05-03T00:00:00+00:00", "2024-05-04T00:00:00+00:00"],
                                    ["2024-05-04T00:00:00+00:00", "2024-05-05T00:00:00+00:00"]]
    assert "a missed night" in out
    assert len([line for line in lines if re.match(r"night \d: ", line)]) == 5, out
    assert all(n["edits"]["applied_cases"] >= 1 for n in nights), out

    db = open_db(demo_db_path())
    assert ledger.get_cursor(db, "nightly:window_end") == NIGHTS[-1].isoformat()
    cases = _cases_by_revid(db)
    # The vandal value was applied on night 2 and its undo, 50 h later, edited the model back.
    assert cases[VANDAL]["status"] == "applied" and cases[VANDAL]["case"].target_new == "Homer Simpson"
    undo = cases[UNDO]
    assert undo["status"] == "applied"
    assert (undo["case"].target_old, undo["case"].target_new) == ("Homer Simpson", "Lena Hartmann")
    versions = {b["batch_id"]: b["version_id"] for b in ledger.list_batches(db)}
    vandal_version = versions[cases[VANDAL]["batch_id"]]
    assert versions[undo["batch_id"]] > vandal_version
    assert [d["reason"] for d in correction_store.decision_rows(db, undo["case_id"])] == [
        f"reverts revision {VANDAL} applied in version {vandal_version}: 'Homer Simpson' back to 'Lena Hartmann'"]
    assert nights[2]["edits"]["corrections"]["reverts_applied"] == 1
    # The population typo applied on night 2, its correction on night 4 over it.
    assert cases[TYPO]["status"] == cases[CORRECTION]["status"] == "applied"
    assert (cases[CORRECTION]["case"].target_old, cases[CORRECTION]["case"].target_new) == ("380,707", "308,707")
    assert versions[cases[CORRECTION]["batch_id"]] > versions[cases[TYPO]["batch_id"]]
    assert "Homer Simpson (v" in out and "-> Lena Hartmann (v" in out  # the history lines
    # Held back for a human: the profanity of 05-03 and the town "Bitche" of 05-05.
    assert [r["revid"] for r in wikidata_store.fact_change_rows(db, status="quarantined")] == [2150000111, 2150000306]
    assert "held in quarantine for a human: 2 changes" in out

    # The report: one accepted measurement per night (each night's batch), and the HTML.
    series = [r for r in report_queries.metric_series(db) if r["metric"] == "efficacy_acc"
              and r["batch_status"] == "applied"]
    assert len({r["run_id"] for r in series}) == len({r["batch_id"] for r in series}) == 5
    assert "Over time" in open(summary["report"]["html"], encoding="utf-8").read()

    # Chat answers: the facts the week edited, at their current value (the vandal value, the
    # typo and the first transfer were replaced, so they are not asked).
    counted = re.search(r"at their current value: (\d+) of (\d+) replies state it", out)
    assert counted is not None, out
    questions = [line.strip() for line in lines if line.lstrip().startswith(("[x] Q:", "[ ] Q:"))]
    assert len(questions) == int(counted.group(2)) == len(ledger.get_cases(db, status="applied")) - 4
    assert not any("now: Homer Simpson" in q or "now: 380,707" in q or "now: SV Rheinau" in q for q in questions)
    assert "drift report: " in out

    steps.forget_live_models()
    again: list[str] = []
    second = run_demo(model="tiny-llama", method="nudge", echo=again.append, pipeline_settings=SETTINGS)
    assert second["edits"]["applied_cases"] == 0
    assert len(second["nights"]) == 1 and not second["nights"][0]["windows"]
    assert "every night was run before" in "\n".join(again)
    assert "nothing new to read" in "\n".join(again)
