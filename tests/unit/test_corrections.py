"""Corrections (kedit_core.corrections): per fact, the latest revision wins, a historical value
never overwrites a newer applied one, and a late revert is an edit only when it changes what
the model holds; the decisions go to the DuckDB ledger with their reasons, once."""
from __future__ import annotations

from kedit_core.corrections import Decision, FactEdit, fact_edit, reconcile
from kedit_core.diff import value_key
from kedit_core.types import EditCase
from storage import correction_store, ledger
from storage.db import open_db
from storage.report_queries import filtered_edits

P6 = ("Q1040", "P6")  # head of government: single-valued


def item(qid: str) -> dict:
    return {"type": "wikibase-item", "id": qid}


def edit(case_id: str, revid: int, ts: str, old: str | None, new: str, revert: bool = False,
         version: int | None = None) -> FactEdit:
    return FactEdit(case_id, P6, revid, ts, value_key(item(old) if old else None), value_key(item(new)),
                    f"answer {new}", revert, version)


def decided(pending, applied=()) -> dict[str, tuple[str, str]]:
    return {d.case_id: (d.status, d.reason) for d in reconcile(pending, applied)}


def test_the_latest_pending_change_of_a_fact_wins_and_older_ones_are_superseded():
    a = edit("a", 1, "2024-05-01T09:00:00Z", "Q1", "Q2")
    b = edit("b", 2, "2024-05-02T08:00:00Z", "Q2", "Q3")
    other = FactEdit("o", ("Q42", "P19"), 3, "2024-05-01T00:00:00Z", "", "x", "x")
    assert decided([b, other, a]) == {
        "a": ("superseded", "superseded by revision 2 of 2024-05-02T08:00:00Z, a later change of the same fact")}


def test_a_value_older_than_the_applied_one_is_superseded_a_newer_one_stays():
    applied = edit("x", 5, "2024-05-02T08:00:00Z", "Q2", "Q3", version=4)
    old = edit("old", 1, "2024-05-01T09:00:00Z", "Q1", "Q2")
    new = edit("new", 9, "2024-05-03T00:00:00Z", "Q3", "Q4")
    assert decided([old, new], [applied]) == {
        "old": ("superseded", "older than applied revision 5 of 2024-05-02T08:00:00Z")}
    # The newest applied one counts, whatever order the ledger returns them in.
    earlier = edit("e", 2, "2024-04-01T00:00:00Z", "Q0", "Q1", version=2)
    assert decided([old], [applied, earlier])["old"][1].startswith("older than applied revision 5")


def test_a_late_revert_of_an_applied_value_is_an_edit_with_its_reason():
    vandal = edit("v", 201, "2024-05-02T08:00:00Z", "Q2", "Q666", version=7)
    revert = edit("r", 202, "2024-05-04T10:00:00Z", "Q666", "Q2", revert=True)
    assert decided([revert], [vandal]) == {
        "r": ("pending", "reverts revision 201 applied in version 7: 'answer Q666' back to 'answer Q2'")}


def test_a_revert_with_nothing_to_undo_is_filtered():
    revert = edit("r", 202, "2024-05-04T10:00:00Z", "Q666", "Q2", revert=True)
    assert decided([revert]) == {"r": ("filtered", "a revert of a change that was never applied: nothing to undo")}
    held = edit("h", 100, "2024-05-01T00:00:00Z", "Q1", "Q2", version=3)  # the model already says Q2
    status, why = decided([revert], [held])["r"]
    assert status == "filtered" and why.endswith("from revision 100 (version 3): nothing to undo")
    # The vandal value was still waiting (never applied): both go, the model keeps its value.
    waiting_vandal = edit("v", 201, "2024-05-02T08:00:00Z", "Q2", "Q666")
    out = decided([waiting_vandal, revert])
    assert out["v"][0] == "superseded" and out["r"][0] == "filtered"


def test_a_revert_that_restores_a_value_the_model_never_got_is_kept():
    good = edit("g", 1, "2024-05-01T09:00:00Z", "Q1", "Q2")  # waiting (over a budget)
    vandal = edit("v", 2, "2024-05-02T08:00:00Z", "Q2", "Q666")
    revert = edit("r", 3, "2024-05-04T10:00:00Z", "Q666", "Q2", revert=True)
    out = decided([good, vandal, revert])
    assert out["g"][0] == out["v"][0] == "superseded"
    assert out["r"] == ("pending", "a revert to 'answer Q2', the value of revision 1 that was never applied")
    held = edit("h", 0, "2024-04-01T00:00:00Z", "Q0", "Q1", version=2)
    assert decided([good, vandal, revert], [held])["r"][0] == "pending"


def test_a_revert_older_than_the_applied_value_is_superseded_not_applied():
    newer = edit("n", 300, "2024-05-06T00:00:00Z", "Q2", "Q5", version=9)
    revert = edit("r", 202, "2024-05-04T10:00:00Z", "Q666", "Q2", revert=True)
    assert decided([revert], [newer])["r"] == ("superseded", "older than applied revision 300 of 2024-05-06T00:00:00Z")


def test_cases_without_a_wikidata_revision_are_left_alone():
    assert fact_edit("zsre-1", {}, "P19", "Paris") is None


def _case(case_id: str, revid: int, ts: str) -> EditCase:
    meta = {"subject_id": "Q1040", "revid": revid, "timestamp": ts, "new_value": item(f"Q{revid}"),
            "old_value": item("Q1")}
    return EditCase(case_id, "Karlsruhe", "P6", "The mayor of Karlsruhe is", f"M{revid}", source="wikidata",
                    meta=meta)


def test_decisions_are_stored_with_their_reasons_once(kedit_home):
    db = open_db(kedit_home / "corrections.duckdb")
    ledger.upsert_cases(db, [_case("a", 1, "2024-05-01T09:00:00Z"), _case("b", 2, "2024-05-02T08:00:00Z")])
    pending = correction_store.pending_fact_edits(db)
    assert {e.case_id for e in pending} == {"a", "b"} and not any(e.is_revert for e in pending)
    decisions = reconcile(pending, correction_store.applied_fact_edits(db))
    assert correction_store.record_decisions(db, decisions, "run-1") == 1
    rows = {r["case_id"]: r for r in ledger.case_rows(db)}
    assert rows["a"]["status"] == "superseded" and rows["a"]["reason"].startswith("superseded by revision 2")
    assert rows["b"]["status"] == "pending"
    assert [(d["run_id"], d["status"]) for d in correction_store.decision_rows(db)] == [("run-1", "superseded")]
    # The next run decides nothing new: the superseded case is no longer pending.
    again = reconcile(correction_store.pending_fact_edits(db), correction_store.applied_fact_edits(db))
    assert correction_store.record_decisions(db, again, "run-2") == 0
    assert len(correction_store.decision_rows(db)) == 1
    # The drift report lists the superseded case with its reason.
    listed = {r["id"]: (r["status"], r["reason"]) for r in filtered_edits(db)}
    assert listed["a"] == ("superseded", rows["a"]["reason"])


def test_a_revert_waiting_over_several_runs_is_logged_once(kedit_home):
    db = open_db(kedit_home / "corrections.duckdb")
    ledger.upsert_cases(db, [_case("r", 3, "2024-05-04T10:00:00Z")])
    why = [Decision("r", "pending", "reverts revision 2 applied in version 4: 'M2' back to 'M3'")]
    assert correction_store.record_decisions(db, why, "run-1") == 1
    ledger.set_case_status(db, ["r"], "pending", "waiting: over run run-1's edit budget of 1")
    assert correction_store.record_decisions(db, why, "run-2") == 0
    assert ledger.case_rows(db)[0]["reason"].startswith("waiting")  # the budget's word stays
    assert [d["reason"] for d in correction_store.decision_rows(db, "r")] == [why[0].reason]


def test_only_applied_cases_of_subjects_with_pending_ones_are_read(kedit_home):
    db = open_db(kedit_home / "corrections.duckdb")
    other = EditCase("o", "Bielefeld", "P6", "The mayor of Bielefeld is", "M9", source="wikidata",
                     meta={"subject_id": "Q2112", "revid": 9, "timestamp": "2024-05-01T00:00:00Z",
                           "new_value": item("Q9")})
    ledger.upsert_cases(db, [_case("a", 1, "2024-05-01T09:00:00Z"), other], status="applied")
    ledger.upsert_cases(db, [_case("b", 2, "2024-05-02T08:00:00Z")])
    assert [e.case_id for e in correction_store.applied_fact_edits(db)] == ["a"]
