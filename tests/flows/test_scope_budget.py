"""A night's edit budget and a deployment's scope through the nightly flow (Prefect, the
recorded day replayed from 127.0.0.1, a tiny model, a DuckDB file): at most
`max_edits_per_run` edits per run, oldest change first; the rest stays pending, is counted
in the run's summary and the drift report, and the next runs apply it, in order, without
reading Wikidata again. A sitelink floor keeps an item below it out of the model."""
from __future__ import annotations

from datetime import datetime, timezone


import tests.flows.flowkit  # noqa: F401  (registers the test editors)
from storage import ledger, wikidata_store
from storage.db import open_db
from tests.flows.conftest import flow_settings

DAY_END = datetime(2024, 5, 2, tzinfo=timezone.utc)


def _night(url: str, **extra) -> dict:
    from flows.prefect_flows import nightly_update

    return nightly_update(window_end=DAY_END, window_hours=24, settings=flow_settings(url, batch_size=3, **extra))


def _change_times(db) -> dict[str, datetime]:
    """case id -> the revision time of the change it came from."""
    times = {r["change_id"]: r["timestamp"] for r in wikidata_store.fact_change_rows(db)}
    return {r["case_id"]: times[r["change_id"]] for r in ledger.case_rows(db)}


def test_the_edit_budget_applies_the_oldest_changes_first_and_the_rest_waits_in_the_report(
        prefect_api, ledger_path, replay):
    first = _night(replay, max_edits_per_run=3)
    db = open_db(ledger_path)
    n = first["cases"]["new_cases"]
    assert n >= 5 and first["edits"]["applied_cases"] == 3
    assert first["edits"]["pending"] == n and first["edits"]["waiting"] == n - 3 and first["edits"]["budget"] == 3
    rows = {r["case_id"]: r for r in ledger.case_rows(db)}
    waiting = [r for r in rows.values() if r["status"] == "pending"]
    assert len(waiting) == n - 3
    assert all(r["reason"] == f"waiting: over run {first['run_id']}'s edit budget of 3" for r in waiting)
    times = _change_times(db)
    applied_first = {c for c, r in rows.items() if r["status"] == "applied"}
    assert max(times[c] for c in applied_first) <= min(times[r["case_id"]] for r in waiting)  # oldest first
    assert f"waiting for the next run: {n - 3} pending edit cases, {n - 3} of them over a run's edit budget" in (
        first["report"]["summary"])

    second = _night(replay, max_edits_per_run=3)  # no new window: the backlog only
    assert second["windows"] == [] and second["edits"]["applied_cases"] == 3
    assert second["edits"]["waiting"] == max(n - 6, 0)
    applied_second = {r["case_id"] for r in ledger.case_rows(db) if r["status"] == "applied"} - applied_first
    assert max(times[c] for c in applied_first) <= min(times[c] for c in applied_second)
    rest = _night(replay, max_edits_per_run=3)
    later = _night(replay, max_edits_per_run=3)
    assert rest["edits"]["applied_cases"] + later["edits"]["applied_cases"] == n - 6
    assert ledger.count_cases_by_status(db) == {"applied": n}
    assert all(r["reason"] is None for r in ledger.case_rows(db))  # no stale "waiting" reason once applied
    assert "waiting for the next run" not in later["report"]["summary"]


def test_a_sitelink_floor_keeps_an_item_below_it_out_of_the_model(prefect_api, ledger_path, replay):
    out = _night(replay, follow="sitelinks>=1")
    db = open_db(ledger_path)
    item_of = {r["change_id"]: r["subject"] for r in wikidata_store.fact_change_rows(db)}
    subjects = {item_of[r["change_id"]] for r in ledger.case_rows(db)}
    assert "Q999000101" not in subjects and "Q1040" in subjects  # Karlsruhe's new mayor (its value) stays
    assert out["edits"]["applied_cases"] == len(ledger.case_rows(db)) > 0
    reasons = {r["reason"] for r in wikidata_store.fact_change_rows(db) if r["subject"] == "Q999000101"}
    assert reasons == {"not followed: 0 sitelinks (follow: sitelinks>=1)"}
