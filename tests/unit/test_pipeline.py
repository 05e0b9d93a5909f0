"""The gated batch loop on a tiny model and a DuckDB file on disk, with test editors whose
updates we control (harmless nudge, deliberately harmful huge update)."""
from __future__ import annotations

import pytest
import torch

import gatekit as g
from gatekit import single_thread  # noqa: F401  (autouse fixture)
from flows.services.gated_batches import apply_gated_batches, state_path
from kedit_core.artifacts import delta_dir
from flows.services.runtime import open_live_model, rebuild_version
from kedit_core.artifacts import file_sha256
from kedit_core.errors import KeditError
from kedit_core.regression_gate import RegressionGateConfig
from kedit_core.model import fingerprint_model
from kedit_core.regression import freeze_suite
from storage import ledger

CFG = RegressionGateConfig(full_check_every=2)


def _setup(db):
    lm = g.knowing_tiny_llama()
    live = open_live_model(db=db, lm=lm)
    suite = freeze_suite(lm, g.edit_cases("old"), known_facts=g.known_facts(), reference_text=g.REFERENCE_TEXT)
    return live, suite


def _state(model):
    return {n: t.clone() for n, t in model.state_dict().items()}


def _statuses(db):
    return {r["case_id"]: (r["status"], r["reason"]) for r in ledger.case_rows(db)}


def test_harmful_batch_is_rolled_back_exactly_and_cases_rejected_with_reason(db):
    live, suite = _setup(db)
    before = _state(live.lm.model)
    editor = g.HarmfulEditor()
    keys_before = editor.keys.clone()
    rep = apply_gated_batches(live, editor, g.edit_cases("h", n=2), db, CFG, 2, "run-h", suite)
    assert [b.status for b in rep.batches] == ["rejected"] and rep.n_rejected == 2
    assert g.weights_equal(live.lm.model, before)  # exact restore
    assert torch.equal(editor.keys, keys_before)  # editor state restored too
    st = _statuses(db)
    assert {s for s, _ in st.values()} == {"rejected"}
    assert all("known_facts_acc" in r and "below base" in r for _, r in st.values())
    (batch,) = ledger.list_batches(db, run_id="run-h")
    assert batch["status"] == "rolled_back" and "known_facts_acc" in batch["reason"]
    assert [v["status"] for v in ledger.list_versions(db)] == ["base"]  # no version recorded
    rows = ledger.get_metrics(db, run_id="run-h", metric="known_facts_acc")
    assert [(r["step"], r["value"]) for r in rows][0] == (0, 1.0)  # the base value
    assert rows[1]["batch_id"] == batch["batch_id"] and rows[1]["value"] < 0.9
    assert rows[1]["version_id"] == live.base_version_id and rows[1]["method"] == "test_harmful"


def test_harmless_batch_is_accepted_with_a_recorded_delta_whose_sha_matches(db):
    live, suite = _setup(db)
    rep = apply_gated_batches(live, g.NudgeEditor(), g.edit_cases("ok", n=3), db, CFG, 3, "run-ok", suite)
    assert [b.status for b in rep.batches] == ["applied"] and rep.n_applied == 3
    v = ledger.get_version(db, live.version_id)
    assert v["status"] == "live" and v["parent_id"] == live.base_version_id and v["method"] == "test_nudge"
    assert file_sha256(v["delta_path"]) == v["delta_sha256"]
    assert v["weights_fingerprint"] == fingerprint_model(live.lm.model)
    assert {s for s, _ in _statuses(db).values()} == {"applied"}
    (batch,) = ledger.list_batches(db, run_id="run-ok")
    assert batch["status"] == "applied" and batch["version_id"] == v["version_id"]
    eff = ledger.get_metrics(db, run_id="run-ok", metric="efficacy_acc")
    assert eff[-1]["version_id"] == v["version_id"] and eff[-1]["value"] == 1.0
    assert eff[-1]["model_fingerprint"] == live.lm.fingerprint


def test_a_batch_users_would_not_see_is_rolled_back_although_teacher_forcing_reads_one(db):
    """The gate decides on served answers: facts the model holds as raw clozes (teacher-forced
    efficacy 1.0) but does not state when asked in chat did not take."""
    live, suite = _setup(db)
    before = _state(live.lm.model)
    cases = g.edit_cases("s", n=2, start=g.CHAT_TAUGHT)  # known as clozes, never as chat replies
    rep = apply_gated_batches(live, g.NudgeEditor(), cases, db, RegressionGateConfig(full_check_every=2, retry_stronger=False),
                              2, "run-s", suite)
    (outcome,) = rep.batches
    assert outcome.status == "rejected" and "did not take: served_efficacy 0.000" in outcome.reasons[0]
    assert outcome.metrics["efficacy_acc"] == 1.0 and outcome.metrics["served_efficacy"] == 0.0
    assert g.weights_equal(live.lm.model, before)
    assert {s for s, _ in _statuses(db).values()} == {"rejected"}


def test_did_not_take_is_retried_stronger_once_then_rejected(db):
    live, suite = _setup(db)
    before = _state(live.lm.model)
    editor = g.NudgeEditor()
    rep = apply_gated_batches(live, editor, g.edit_cases("x", n=2, take=False), db, CFG, 2, "run-x", suite)
    assert editor.calls == 2 and editor.config.scale == 1e-6  # the retry passed its settings to edit(); the editor's own never changed
    (outcome,) = rep.batches
    assert outcome.status == "rejected" and outcome.attempts == 2
    batches = ledger.list_batches(db, run_id="run-x")
    assert [(b["attempt"], b["status"]) for b in batches] == [(1, "rolled_back"), (2, "rolled_back")]
    assert "retrying with stronger settings" in batches[0]["reason"]
    norms = [r["value"] for r in ledger.get_metrics(db, run_id="run-x", metric="delta_norm")]
    assert norms[1] > 5 * norms[0]  # the retry really used stronger settings (10x scale)
    assert all(s == "rejected" and "after 2 attempts" in r for s, r in _statuses(db).values())
    assert g.weights_equal(live.lm.model, before)


def test_rerun_applies_nothing_twice(db):
    live, suite = _setup(db)
    cases = g.edit_cases("c", n=4)
    editor = g.NudgeEditor()
    first = apply_gated_batches(live, editor, cases, db, CFG, 2, "run-r", suite)
    assert first.n_applied == 4 and editor.calls == 2
    n_versions = len(ledger.list_versions(db))
    again = apply_gated_batches(live, editor, cases, db, CFG, 2, "run-r", suite)
    assert again.n_applied == 0 and again.n_skipped == 4 and again.batches == []
    assert editor.calls == 2 and len(ledger.list_versions(db)) == n_versions


def test_batch_left_applying_by_a_killed_process_is_retried(db):
    live, suite = _setup(db)
    cases = g.edit_cases("k", n=2)
    ledger.upsert_cases(db, cases)
    ledger.create_batch(db, "dead-b00001", "dead", "test_nudge", [c.case_id for c in cases])  # then the process died
    editor = g.NudgeEditor()
    rep = apply_gated_batches(live, editor, [], db, CFG, 2, "run-k", suite)
    assert rep.recovered_batches == ["dead-b00001"] and rep.n_applied == 2 and editor.calls == 1
    dead = [b for b in ledger.list_batches(db) if b["batch_id"] == "dead-b00001"][0]
    assert dead["status"] == "failed" and "interrupted" in dead["reason"]
    assert {s for s, _ in _statuses(db).values()} == {"applied"}


def test_crash_after_the_version_was_recorded_completes_the_batch_without_reapplying(db):
    live, suite = _setup(db)
    cases = g.edit_cases("v", n=2)
    apply_gated_batches(live, g.NudgeEditor(), cases, db, CFG, 2, "run-v", suite)
    (batch,) = ledger.list_batches(db, run_id="run-v")
    # Simulate death between add_version and the status updates.
    ledger.finish_batch(db, batch["batch_id"], "applying")
    ledger.set_case_status(db, [c.case_id for c in cases], "pending")
    live2 = open_live_model(db=db, lm=g.knowing_tiny_llama())  # a new process: ledger rebuilds the model
    editor = g.NudgeEditor()
    rep = apply_gated_batches(live2, editor, cases, db, CFG, 2, "run-v", suite)
    assert rep.recovered_batches == [batch["batch_id"]] and editor.calls == 0 and rep.n_skipped == 2
    assert ledger.list_batches(db, run_id="run-v")[0]["status"] == "applied"
    assert g.weights_equal(live2.lm.model, _state(live.lm.model))


class _Interloper(g.NudgeEditor):
    """While making its first batch, another writer (one that ignores the ledger's lock)
    records a version of its own on top of the live one: a real delta file, a real row."""

    def __init__(self, db, folder) -> None:
        super().__init__()
        self.db, self.folder, self.other_version = db, folder, None

    def edit(self, lm, cases, config=None):
        if self.other_version is None:
            from kedit_core.weights import WeightDelta

            name = [n for n, p in lm.model.named_parameters() if "mlp" in n and p.dim() == 2][-1]
            shape = dict(lm.model.named_parameters())[name].shape
            delta = WeightDelta({name: torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 1e-6})
            path = self.folder / "other-writer.safetensors"
            sha = delta.save(path)
            live_row = ledger.live_version(self.db, lm.fingerprint)
            self.other_version = ledger.add_version(self.db, int(live_row["version_id"]), lm.fingerprint, lm.spec,
                                                    "other-writer", None, str(path), sha)
        return super().edit(lm, cases)


def test_a_batch_whose_live_version_moved_is_undone_and_made_again_on_the_new_one(db, tmp_path):
    live, suite = _setup(db)
    apply_gated_batches(live, g.NudgeEditor(), g.edit_cases("a", n=2), db, CFG, 2, "run-a", suite)
    first = live.version_id
    editor = _Interloper(db, tmp_path)
    rep = apply_gated_batches(live, editor, g.edit_cases("b", n=2, start=2), db, CFG, 2, "run-b", suite)
    other = editor.other_version
    # The first try lost the compare-and-set and left nothing behind; the retry was built on `other`.
    assert len(rep.conflicts) == 1 and editor.calls == 2
    lost = {b["batch_id"]: b for b in ledger.list_batches(db, run_id="run-b")}[rep.conflicts[0]]
    assert lost["status"] == "failed" and lost["version_id"] is None
    assert f"built on {first} but the live version is now {other}" in lost["reason"]
    assert not (delta_dir(live.lm.fingerprint) / f"{rep.conflicts[0]}.safetensors").exists()
    [kept] = rep.batches
    assert kept.status == "applied" and rep.n_applied == 2
    # One linear chain: base -> first -> the other writer's -> ours, every case applied once.
    chain = [v["version_id"] for v in ledger.version_chain(db, live.version_id)]
    assert chain == [live.base_version_id, first, other, kept.version_id]
    assert [v["status"] for v in ledger.list_versions(db)] == ["base", "superseded", "superseded", "live"]
    assert {s for s, _ in _statuses(db).values()} == {"applied"} and len(_statuses(db)) == 4
    applied = [b for b in ledger.list_batches(db) if b["status"] == "applied"]
    assert sum(b["n_cases"] for b in applied) == 4
    # The live weights are the ledger's rebuild, the other writer's delta included.
    fresh = g.knowing_tiny_llama()
    rebuild_version(fresh, db, live.version_id)
    assert g.weights_equal(fresh.model, _state(live.lm.model))


def test_recovery_leaves_a_batch_of_a_live_run_alone_and_takes_it_once_that_run_died(db):
    import socket
    import subprocess
    import sys

    from storage.lock import process_start

    live, suite = _setup(db)
    cases = g.edit_cases("o", n=2)
    ledger.upsert_cases(db, cases)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        owner = {"pid": other.pid, "host": socket.gethostname(), "start": process_start(other.pid)}
        ledger.create_batch(db, "other-b00001", "other", "test_nudge", [c.case_id for c in cases], owner=owner)
        editor = g.NudgeEditor()
        rep = apply_gated_batches(live, editor, cases, db, CFG, 2, "run-o", suite)
        assert rep.recovered_batches == [] and rep.n_applied == 0 and rep.n_skipped == 2 and editor.calls == 0
        assert ledger.list_batches(db, run_id="other")[0]["status"] == "applying"  # untouched
    finally:
        other.kill()
        other.wait()
    rep = apply_gated_batches(live, editor, [], db, CFG, 2, "run-o", suite)
    assert rep.recovered_batches == ["other-b00001"] and rep.n_applied == 2
    dead = ledger.list_batches(db, run_id="other")[0]
    assert dead["status"] == "failed" and f"run other, pid {other.pid}" in dead["reason"]
    assert {s for s, _ in _statuses(db).values()} == {"applied"}


def test_rebuild_from_base_and_deltas_equals_live_weights_and_editor_state_resumes(db):
    live, suite = _setup(db)
    editor = g.NudgeEditor()
    apply_gated_batches(live, editor, g.edit_cases("a", n=2), db, CFG, 1, "run-b", suite)
    rejected = apply_gated_batches(live, g.HarmfulEditor(), g.edit_cases("bad", n=1), db, CFG, 1, "run-bad", suite)
    assert rejected.batches[0].status == "rejected"
    apply_gated_batches(live, editor, g.edit_cases("c", n=2)[1:], db, CFG, 1, "run-b", suite)
    versions = [v for v in ledger.list_versions(db) if v["status"] != "base"]
    assert len(versions) == 3 and [v["status"] for v in versions] == ["superseded", "superseded", "live"]
    fresh = g.knowing_tiny_llama()
    rebuild_version(fresh, db, live.version_id)
    assert g.weights_equal(fresh.model, _state(live.lm.model))  # bit for bit
    assert fingerprint_model(fresh.model) == versions[-1]["weights_fingerprint"]
    # A restarted process resumes the editor's sequential state from the live version.
    assert state_path(live.lm.fingerprint, versions[-1]["batch_id"]).exists()
    restarted = g.NudgeEditor()
    apply_gated_batches(open_live_model(db=db, lm=g.knowing_tiny_llama()), restarted, [], db, CFG, 1, "run-b", suite)
    assert torch.equal(restarted.keys, editor.keys) and len(restarted.keys) == 3
    # A state file changed behind the ledger's back is refused, naming the file.
    state_file = state_path(live.lm.fingerprint, versions[-1]["batch_id"])
    state_file.write_bytes(state_file.read_bytes().replace(b"nudge", b"nudgf"))
    with pytest.raises(KeditError, match=r"editor state .*state\.safetensors has sha256"):
        apply_gated_batches(open_live_model(db=db, lm=g.knowing_tiny_llama()), g.NudgeEditor(), [], db, CFG, 1,
                            "run-b", suite)


def test_suite_is_frozen_on_base_weights_of_an_edited_live_model_and_reloaded(db):
    from flows.services.gated_batches import load_or_freeze_suite, suite_path

    live, suite = _setup(db)
    rep = apply_gated_batches(live, g.NudgeEditor(g.NudgeConfig(scale=1e-2)), g.edit_cases("a", n=2), db,
                              g.gate_without_served_locality(full_check_every=2), 1, "r0", suite)
    assert rep.n_applied == 2
    edited = _state(live.lm.model)
    kw = dict(known_facts=g.known_facts(), reference_text=g.REFERENCE_TEXT)
    frozen = load_or_freeze_suite(live, db, "r1", **kw)
    assert g.weights_equal(live.lm.model, edited)  # deltas replayed bit for bit after measuring the base
    on_base = freeze_suite(g.knowing_tiny_llama(), ledger.get_cases(db, status="applied"), **kw)
    assert frozen.base_metrics == on_base.base_metrics  # measured on the base, not the edited weights
    assert {c.case_id for c in frozen.retention_cases} == {"a0", "a1"}
    assert suite_path("r1").exists()
    assert load_or_freeze_suite(live, db, "r1").to_json() == frozen.to_json()  # reloaded, not re-frozen


def test_operator_rollback_makes_an_earlier_version_live_and_its_later_cases_are_never_reapplied(db):
    from typer.testing import CliRunner

    from flows.cli import _register_commands, app

    live, suite = _setup(db)
    editor = g.NudgeEditor()
    cases = g.edit_cases("v", n=3)
    apply_gated_batches(live, editor, cases, db, CFG, 1, "run-v", suite)  # three versions, one case each
    first, second, third = [v for v in ledger.list_versions(db) if v["status"] != "base"]
    after_first = g.knowing_tiny_llama()
    rebuild_version(after_first, db, first["version_id"])

    for bad, why in [(999, "not in the ledger"), (live.base_version_id, "")]:
        with pytest.raises(ledger.RollbackError, match=why or "needs a reason"):
            ledger.roll_back_to(db, bad, why)
    undone = ledger.roll_back_to(db, first["version_id"], "vandalism found in review")
    assert [v["version_id"] for v in undone] == [third["version_id"], second["version_id"]]
    status = {v["version_id"]: v["status"] for v in ledger.list_versions(db)}
    assert status[first["version_id"]] == "live"
    assert status[second["version_id"]] == status[third["version_id"]] == "rolled_back"
    rows = {r["case_id"]: r for r in ledger.case_rows(db)}
    assert rows[cases[0].case_id]["status"] == "applied"
    for case in cases[1:]:
        assert rows[case.case_id]["status"] == "rejected" and "vandalism found in review" in rows[case.case_id]["reason"]
    batches = {b["batch_id"]: b for b in ledger.list_batches(db, run_id="run-v")}
    assert batches[second["batch_id"]]["status"] == "rolled_back"
    # A rolled-back version is out of the live line; rolling back to the live one is a no-op.
    with pytest.raises(ledger.RollbackError, match="not in the live line"):
        ledger.roll_back_to(db, third["version_id"], "again")
    assert ledger.roll_back_to(db, first["version_id"], "again") == []

    # The next process serves version 1's weights, resumes version 1's editor state and
    # applies none of the undone cases again.
    reopened = open_live_model(db=db, lm=g.knowing_tiny_llama())
    assert reopened.version_id == first["version_id"]
    assert g.weights_equal(reopened.lm.model, _state(after_first.model))
    restarted = g.NudgeEditor()
    again = apply_gated_batches(reopened, restarted, cases, db, CFG, 1, "run-v2", suite)
    assert again.n_applied == 0 and again.n_skipped == 3 and len(restarted.keys) == 1

    # The CLI: versions lists the statuses, rollback reports what it undid.
    if "rollback" not in {c.name for c in app.registered_commands}:
        _register_commands()
    listing = CliRunner().invoke(app, ["versions", "--db", str(db.path)])
    assert listing.exit_code == 0 and listing.output.count("rolled_back") == 2
    out = CliRunner().invoke(app, ["rollback", str(live.base_version_id), "--reason", "start over", "--db", str(db.path)])
    assert out.exit_code == 0, out.output
    assert f"rolled back version {first['version_id']}" in out.output
    assert ledger.live_version(db, live.lm.fingerprint)["version_id"] == live.base_version_id
