"""`kedit export` (flows/services/export.py, kedit_core/export.py): a ledger version written as a standard Hugging Face
folder (and GGUF) holds the version's weights bit for bit, reloads with plain transformers,
carries a model card saying what it contains and what kedit's serving adds, and never
touches the ledger (issue 21, point 3)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import gatekit as g
from gatekit import single_thread  # noqa: F401  (autouse fixture)
from flows.services.runtime import open_live_model
from kedit_core.artifacts import delta_dir
from kedit_core.editors import get_editor
from kedit_core.errors import KeditError
from flows.services.export import export_version
from kedit_core.model import ByteTokenizer, fingerprint_model, tiny_model
from kedit_core.types import EditCase
from storage import ledger
from storage.db import open_db
from tests.unit.test_cli_errors import kedit, one_error_line

FAST = {"layers": [1, 2], "solve": {"keystats_samples": 600}, "targets": {"steps": 4, "bf16": False},
        "update_gate": {"quantile": 0.9, "positions": 400}}


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cases() -> list[EditCase]:
    return [
        EditCase(case_id=f"c{i}", subject=s, relation="capital", prompt=f"The capital of {s} is",
                 question=f"What is the capital of {s}?", target_new=t, target_old="Nowhere")
        for i, (s, t) in enumerate([("Tessaly", "Rome"), ("Borvik", "Oslo")])
    ]


def _alphaedit_ledger(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """A ledger with one real AlphaEdit version (update gate and edit scope on) of the
    `tiny-llama` spec, as the pipeline records one: (version id, edited weights, base weights,
    the parameter names the delta touched)."""
    db = open_db(path)
    lm = tiny_model("llama", seed=0)
    base = {n: t.clone() for n, t in lm.model.state_dict().items()}
    base_id = ledger.ensure_base_version(db, lm.fingerprint, lm.spec)
    editor = get_editor("alphaedit", FAST)
    cases = _cases()
    result = editor.edit(lm, cases)
    delta_path = delta_dir(lm.fingerprint) / "b-export-1.safetensors"
    sha = result.delta.save(delta_path)
    ledger.upsert_cases(db, cases)
    ledger.set_case_status(db, [c.case_id for c in cases], "applied", batch_id="b-export-1")
    note = json.dumps({"n_cases": len(cases), "config": editor.config.to_dict()}, default=str)
    vid = ledger.add_version(db, base_id, lm.fingerprint, lm.spec, "alphaedit", "b-export-1", str(delta_path), sha,
                             fingerprint_model(lm.model), note=note)
    ledger.record_metrics(db, {"efficacy_acc": 0.5, "locality": 0.75}, run_id="r1", method="alphaedit",
                          version_id=vid, batch_id="b-export-1")
    ledger.record_metrics(db, {"locality": 1.0}, run_id="r1", method="alphaedit", step=0, version_id=base_id)
    edited = {n: t.clone() for n, t in lm.model.state_dict().items()}
    return vid, edited, base, sorted(result.delta.tensors)


def _reload(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(folder))


def test_an_exported_version_reloads_with_plain_transformers_bit_for_bit(kedit_home, tmp_path):
    ledger_path = kedit_home / "kedit.duckdb"
    vid, edited, base, touched = _alphaedit_ledger(ledger_path)
    before = _sha(ledger_path)
    out = tmp_path / "export"
    res = export_version(vid, out, open_db(ledger_path, create=False), show_progress=False)
    assert _sha(ledger_path) == before  # the ledger is only read

    model, tok = _reload(out)
    state = model.state_dict()
    assert set(state) == set(edited)
    assert all(torch.equal(state[n], edited[n]) for n in edited)  # the version's weights, bit for bit
    assert touched and all(not torch.equal(state[n], base[n]) for n in touched)  # the delta is in them
    untouched = [n for n in edited if n not in touched]
    assert all(torch.equal(state[n], base[n]) for n in untouched)
    # the tiny model's byte tokenizer, as a standard one that tokenizes the same
    text = "The capital of Tessaly is Rome. Ünïcödé!"
    assert tok(text)["input_ids"] == ByteTokenizer().encode(text)
    assert tok.decode(ByteTokenizer().encode(text)) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert res.files == {"model.safetensors": _sha(out / "model.safetensors")}
    assert res.relied_on == ["update gate", "edit scope", "served memory", "scope check"]


def test_the_model_card_says_what_the_weights_contain(kedit_home, tmp_path):
    ledger_path = kedit_home / "kedit.duckdb"
    vid, _, _, _ = _alphaedit_ledger(ledger_path)
    db = open_db(ledger_path, create=False)
    chain = ledger.version_chain(db, vid)
    export_version(vid, tmp_path / "e", db, show_progress=False)
    card = (tmp_path / "e" / "README.md").read_text()
    info = json.loads((tmp_path / "e" / "kedit_export.json").read_text())

    assert chain[0]["base_fingerprint"] in card
    assert "| 0 |  | base | (base) |" in card and "| 1 | 0 | live | alphaedit | b-export-1 | 2 |" in card
    assert str(chain[1]["created"])[:19] in card and chain[1]["delta_sha256"][:16] in card
    assert "edit cases in these weights: 2" in card
    assert "- Tessaly: What is the capital of Tessaly? -> **Rome** (was: Nowhere)" in card
    assert "| efficacy_acc |  | 0.5 |" in card and "| locality | 1 | 0.75 |" in card  # base, then v1
    assert '"quantile": 0.9' in card and '"steps": 4' in card  # the method's settings, grouped
    assert "This version relied on: update gate, edit scope, served memory, scope check" in card
    assert "**Update gate** (quantile 0.9)" in card and "Not measured for this version" in card
    assert card.startswith("---\nlibrary_name: transformers\n") and "- alphaedit" in card
    assert info["version"] == vid and info["n_cases"] == 2 and len(info["cases"]) == 2
    assert info["serving"]["update_gate"] == 0.9 and info["export"]["files"]["model.safetensors"]


def test_a_pipeline_version_equals_the_live_models_weights_and_says_it_needs_no_gate(db, tmp_path):
    """A version made by the gated batch loop (a test editor without update gate): the
    export equals `open_live_model`'s weights at that version, and the card says the
    weights are served as they are."""
    from flows.services.gated_batches import apply_gated_batches
    from kedit_core.regression_gate import RegressionGateConfig
    from kedit_core.regression import freeze_suite

    lm = g.knowing_tiny_llama()
    live = open_live_model(db=db, lm=lm)
    suite = freeze_suite(lm, g.edit_cases("old"), known_facts=g.known_facts(), reference_text=g.REFERENCE_TEXT)
    rep = apply_gated_batches(live, g.NudgeEditor(), g.edit_cases("ok", n=2), db,
                              RegressionGateConfig(full_check_every=2), 2, "run-x", suite)
    assert rep.n_applied == 2
    vid = live.version_id
    ro = open_db(db.path, create=False)
    reference = open_live_model(version=vid, db=ro, lm=g.knowing_tiny_llama(), read_only=True)
    base = g.knowing_tiny_llama()
    res = export_version(vid, tmp_path / "p", ro, lm=base, show_progress=False)
    model, _ = _reload(tmp_path / "p")
    ref = reference.lm.model.state_dict()
    assert all(torch.equal(t, ref[n]) for n, t in model.state_dict().items())
    assert g.weights_equal(base.model, g.knowing_tiny_llama().model.state_dict())  # given back unedited
    card = (tmp_path / "p" / "README.md").read_text()
    assert res.relied_on == [] and "| efficacy_acc |" in card and "test_nudge" in card
    assert "No weight-editing method made these versions" in card  # the test editor is unregistered


def test_export_refuses_a_missing_version_and_a_non_empty_folder_in_one_line(kedit_home, tmp_path, capsys):
    ledger_path = kedit_home / "kedit.duckdb"
    vid, _, _, _ = _alphaedit_ledger(ledger_path)
    before = _sha(ledger_path)
    code, _, err = kedit(capsys, "export", "7", tmp_path / "x", "--db", ledger_path)
    assert code == 2 and "model version 7 is not in the ledger" in one_error_line(err)
    assert not (tmp_path / "x").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, _, err = kedit(capsys, "export", str(vid), full, "--db", ledger_path)
    assert code == 2 and "is not empty" in one_error_line(err) and "--force" in err
    assert (full / "keep.txt").read_text() == "mine"
    code, _, err = kedit(capsys, "export", str(vid), tmp_path / "y", "--db", ledger_path, "--format", "onnx")
    assert code == 2 and "unknown export format 'onnx'" in one_error_line(err)
    code, _, err = kedit(capsys, "export", str(vid), kedit_home, "--db", ledger_path, "--force")
    assert code == 2 and "refusing to replace" in one_error_line(err)
    assert _sha(ledger_path) == before


def test_the_cli_exports_from_the_recorded_spec_and_force_replaces(kedit_home, tmp_path, capsys):
    ledger_path = kedit_home / "kedit.duckdb"
    vid, edited, _, _ = _alphaedit_ledger(ledger_path)
    before = _sha(ledger_path)
    out = tmp_path / "cli"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    code, stdout, err = kedit(capsys, "export", str(vid), out, "--db", ledger_path, "--force")
    assert code == 0, err
    assert f"exported version {vid} (chain 0 -> 1, 2 edit cases) to {out} [hf]" in stdout
    assert "note: kedit serves this version with update gate" in stdout
    assert not (out / "stale.txt").exists() and (out / "README.md").exists()
    model, _ = _reload(out)
    assert all(torch.equal(t, edited[n]) for n, t in model.state_dict().items())
    assert _sha(ledger_path) == before
    assert not list(tmp_path.glob("*.tmp"))  # no temporary folder left beside it


def test_a_gguf_export_holds_the_versions_weights_in_llama_cpps_layout(kedit_home, tmp_path, capsys):
    """`--format gguf`: F32 tensors under llama.cpp's names with Q/K in its rotary layout;
    transformers' own GGUF reader (which undoes that layout) gives back the version's
    weights bit for bit and the same logits; the tokenizer is in the metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ledger_path = kedit_home / "kedit.duckdb"
    vid, edited, base, touched = _alphaedit_ledger(ledger_path)
    before = _sha(ledger_path)
    out = tmp_path / "gg"
    code, stdout, err = kedit(capsys, "export", str(vid), out, "--db", ledger_path, "--format", "gguf")
    assert code == 0, err
    assert _sha(ledger_path) == before
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "kedit_export.json", "model.gguf"]
    assert f"model.gguf  sha256 {_sha(out / 'model.gguf')}" in stdout
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32)
    state = model.state_dict()
    assert set(state) == set(edited) and all(torch.equal(state[n], edited[n]) for n in edited)
    assert all(not torch.equal(state[n], base[n]) for n in touched)
    lm = tiny_model("llama", seed=0)
    lm.model.load_state_dict(edited)
    ids = torch.tensor([ByteTokenizer().encode("The capital of Tessaly is")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, lm.model(input_ids=ids).logits)
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    text = "The capital of Borvik is Oslo. Ünï!"
    assert tok(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: gguf\n") and "format: gguf, float32 (model.gguf)" in card


def test_gguf_refuses_an_architecture_it_cannot_write_in_one_line(tmp_path, db):
    lm = tiny_model("gpt2", seed=0)
    vid = ledger.ensure_base_version(db, lm.fingerprint, lm.spec)
    with pytest.raises(KeditError, match="Llama-architecture models only, this one is 'gpt2'") as exc:
        export_version(vid, tmp_path / "g2", open_db(db.path, create=False), fmt="gguf", lm=lm, show_progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "g2").exists()


def test_serving_features_read_a_stored_config_of_either_shape():
    """Versions stored before the settings were grouped hold flat configs; both shapes (and
    the method's defaults for what a stored config leaves out) give the same features."""
    from kedit_core.editors import get_editor
    from kedit_core.export import serving_features

    nested = get_editor("alphaedit", {"update_gate": {"quantile": 0.9}, "scope": {"context": None}}).config.to_dict()
    flat = {"method": "alphaedit", "v_steps": 50, "update_gate": 0.9, "edit_scope": 0.6, "scope_context": None,
            "scope_check": True, "nullspace_relative": True, "share_subject_delta": True}
    base = {"version_id": 1, "method": None, "config": None}
    for config in (nested, flat):
        got = serving_features([base, {"version_id": 2, "method": "alphaedit", "config": config}])
        assert (got["update_gate"], got["edit_scope"], got["scope_context"], got["scope_check"]) == (0.9, 0.6, None, False)
        assert got["not_carried"] == ["update gate", "edit scope"]
    plain = serving_features([base, {"version_id": 2, "method": "ft", "config": {"method": "ft", "steps": 40}}])
    assert plain["update_gate"] is None and plain["not_carried"] == []
