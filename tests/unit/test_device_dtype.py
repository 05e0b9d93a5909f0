"""Device and dtype end to end (issue 21, point 1) on tiny models: names and environment
(`kedit_core/device.py`), one line from the CLI for a device this machine lacks, and a
bfloat16 model edited (AlphaEdit, MEMIT), rolled back bit for bit, rebuilt from the
ledger's deltas bit for bit and served. The same runs on CUDA where a GPU is present
(skipped otherwise)."""
from __future__ import annotations

import json

import pytest
import requests
import torch
from safetensors.torch import load_file

from kedit_core.answer import answer
from kedit_core.device import DeviceError, autocast_bf16, check_names, resolve
from kedit_core.editor_settings import merged
from kedit_core.editors import get_editor
from kedit_core.routing import installed_update_gate
from kedit_core.model import fingerprint_cached, load_model, tiny_model
from kedit_core.types import EditCase
from storage import ledger
from tests.unit.test_cli_errors import kedit, one_error_line

FAST = {"layers": [1, 2], "solve": {"keystats_samples": 600}, "targets": {"steps": 4, "n_context_templates": 2},
        "update_gate": {"quantile": 0.9, "positions": 400}}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
QUESTION = "The capital of Tessaly is"


@pytest.fixture(autouse=True)
def no_placement_env(monkeypatch):
    """A developer's own KEDIT_DEVICE / KEDIT_DTYPE must not leak into these tests."""
    monkeypatch.delenv("KEDIT_DEVICE", raising=False)
    monkeypatch.delenv("KEDIT_DTYPE", raising=False)


def _cases(tag: str = "") -> list[EditCase]:
    return [EditCase(case_id=f"c{tag}{i}", subject=s + tag, relation="capital", prompt=f"The capital of {s}{tag} is",
                     target_new=t)
            for i, (s, t) in enumerate([("Tessaly", "Rome"), ("Borvik", "Oslo")])]


def _state(lm) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in lm.model.state_dict().items()}


def _same(lm, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, state[n]) for n, t in lm.model.state_dict().items())


# --------------------------------------------------------------------------- names, environment, errors


def test_defaults_names_and_environment(monkeypatch):
    assert resolve() == (torch.device("cpu"), torch.float32)
    assert resolve("CPU", "torch.bfloat16") == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setenv("KEDIT_DTYPE", "bfloat16")
    monkeypatch.setenv("KEDIT_DEVICE", "cpu")
    assert resolve() == (torch.device("cpu"), torch.bfloat16)
    assert resolve(None, "float32")[1] == torch.float32  # an explicit value wins over the environment
    assert check_names("cuda:1", "float16") == ("cuda:1", "float16")  # names only: no device needed


@pytest.mark.parametrize("device,dtype,named", [("gpu", None, "'gpu'"), ("cpu:1", None, "'cpu:1'"),
                                                ("cuda:x", None, "'cuda:x'"), (None, "float8", "'float8'"),
                                                (None, "fp64", "'fp64'")])
def test_unknown_names_are_refused(device, dtype, named):
    with pytest.raises(DeviceError, match=named):
        resolve(device, dtype)


def test_float16_on_cpu_is_refused_with_the_alternative():
    with pytest.raises(DeviceError, match="bfloat16"):
        resolve("cpu", "float16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_missing_cuda_device_is_named():
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match=f"'{name}'.*no CUDA GPU"):
            resolve(name)


@CUDA
def test_a_cuda_index_beyond_the_gpus_is_named():
    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"cuda:{n}.*{n} CUDA GPU"):
        resolve(f"cuda:{n}")


@pytest.mark.skipif(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                    reason="this machine has an MPS device")
def test_a_missing_mps_device_is_named():
    with pytest.raises(DeviceError, match="'mps'"):
        resolve("mps")


def test_the_editors_bf16_autocast_is_for_float32_models_only():
    cpu = torch.device("cpu")
    assert autocast_bf16(cpu, torch.float32, True) and not autocast_bf16(cpu, torch.float32, False)
    assert not autocast_bf16(cpu, torch.bfloat16, True) and not autocast_bf16(torch.device("cuda"), torch.float16, True)


def test_editors_have_no_device_setting_of_their_own():
    assert "device" not in get_editor("alphaedit").config.to_dict()
    assert get_editor("alphaedit", {"device": "cpu"}).config.seed == 0  # as saved in older version notes
    with pytest.raises(ValueError, match="--device"):
        get_editor("memit", {"device": "cuda"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("args", [
    ["ask", "hi", "-m", "tiny-llama", "--device", "cuda"],
    ["model", "info", "-m", "tiny-llama", "--device", "cuda:1"],
    ["evaluate", "--data", "zsre:nothing.json", "-m", "tiny-llama", "--device", "cuda"],
    ["serve", "-m", "tiny-llama", "--device", "cuda"],
    ["nightly", "--model", "tiny-llama", "--device", "cuda"],
    ["compare", "--data", "zsre:nothing.json", "-m", "tiny-llama", "--device", "cuda"],
])
def test_cli_a_missing_gpu_is_one_line_and_exit_2(capsys, args):
    code, _, err = kedit(capsys, *args)
    assert code == 2
    line = one_error_line(err)
    assert "'cuda" in line and "no CUDA GPU" in line


def test_cli_unknown_dtype_and_float16_on_cpu_are_one_line(capsys):
    code, _, err = kedit(capsys, "ask", "hi", "-m", "tiny-llama", "--dtype", "float8")
    assert code == 2 and "'float8'" in one_error_line(err)
    code, _, err = kedit(capsys, "ask", "hi", "-m", "tiny-llama", "--dtype", "float16")
    assert code == 2 and "float16 is not supported on cpu" in one_error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cli_reads_kedit_device_and_kedit_dtype(capsys, monkeypatch):
    code, out, _ = kedit(capsys, "model", "info", "-m", "tiny-llama", "--dtype", "bfloat16")
    assert code == 0 and "torch.bfloat16" in out
    monkeypatch.setenv("KEDIT_DTYPE", "bfloat16")
    code, out, _ = kedit(capsys, "model", "info", "-m", "tiny-llama")
    assert code == 0 and "torch.bfloat16" in out and "cpu" in out
    monkeypatch.setenv("KEDIT_DEVICE", "cuda")
    code, _, err = kedit(capsys, "model", "info", "-m", "tiny-llama")
    assert code == 2 and "'cuda'" in one_error_line(err)


def test_cli_evaluate_runs_and_scores_in_bfloat16(capsys, tmp_path):
    from tests.conftest import DATA

    out = tmp_path / "result.json"
    code, _, err = kedit(capsys, "evaluate", "--method", "alphaedit", "--data",
                         f"zsre:{DATA / 'benchmarks' / 'zsre_mend_train_1k.json'}", "--limit", "2", "--batch-size", "2",
                         "-m", "tiny-llama", "--no-greedy", "--no-record", "--output", out, "--dtype", "bfloat16",
                         "--set", "layers=1,2", "--set", "solve.keystats_samples=400", "--set", "targets.steps=2",
                         "--set", "update_gate.positions=400")
    assert code == 0, err
    data = json.loads(out.read_text())
    assert (data["device"], data["dtype"]) == ("cpu", "bfloat16")
    assert data["fingerprint"] == load_model("tiny-llama", dtype="bfloat16").fingerprint
    assert 0.0 <= data["metrics"]["efficacy_acc"] <= 1.0


def test_pipeline_settings_carry_device_and_dtype(monkeypatch):
    from flows.services import steps
    from flows.services.settings import PipelineSettings

    assert (PipelineSettings().device, PipelineSettings().dtype) == ("cpu", "float32")
    monkeypatch.setenv("KEDIT_DTYPE", "BFloat16")
    settings = PipelineSettings.from_env(model="tiny-llama")
    assert settings.dtype == "bfloat16" and settings.to_dict()["dtype"] == "bfloat16"  # recorded with each run
    with pytest.raises(DeviceError, match="'tpu'"):
        PipelineSettings.from_env(device="tpu")
    steps.forget_live_models()
    try:
        live = steps.live_model(settings)  # what the nightly and backfill flows edit
        assert live.lm.dtype == torch.bfloat16 and live.lm.device.type == "cpu"
    finally:
        steps.forget_live_models()


# --------------------------------------------------------------------------- bfloat16 models


def test_tiny_models_load_in_the_dtype_asked_for(monkeypatch):
    fp32 = load_model("tiny-llama")
    monkeypatch.setenv("KEDIT_DTYPE", "bfloat16")
    bf16 = load_model("tiny-llama")
    assert bf16.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert bf16.fingerprint != fp32.fingerprint  # the ledger keeps a bfloat16 base apart
    assert bf16.base_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.bfloat16


def test_the_fingerprint_memo_is_kept_per_dtype(tmp_path):
    lm = tiny_model("llama")
    lm.model.save_pretrained(str(tmp_path), safe_serialization=True)
    fp32 = fingerprint_cached(lm.model, tmp_path)
    lm.model.to(torch.bfloat16)
    bf16 = fingerprint_cached(lm.model, tmp_path, torch.bfloat16)
    assert bf16 != fp32
    assert fingerprint_cached(lm.model, tmp_path, torch.bfloat16) == bf16
    lm.model.to(torch.float32)
    assert fingerprint_cached(lm.model, tmp_path) == fp32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["alphaedit", "memit"])
def test_a_bfloat16_edit_rolls_back_bit_for_bit_and_answers(device, arch, method):
    lm = load_model(f"tiny-{arch}", device=device, dtype="bfloat16")
    before = _state(lm)
    base_answer = answer(lm, QUESTION, max_new_tokens=6)
    editor = get_editor(method, merged(FAST, {"targets": {"bf16": True}}))  # the optional autocast must not break a bf16 model
    result = editor.edit(lm, _cases())
    assert result.applied and result.delta.norm() > 0
    assert all(t.dtype == torch.bfloat16 for t in result.delta.tensors.values())
    assert not _same(lm, before)
    gate = installed_update_gate(lm)
    assert gate is not None
    taus = [v["tau"] for v in gate.stats().values()]
    assert all(t > 0 and t == t for t in taus), taus  # measured in float32: positive, not NaN
    edited = answer(lm, QUESTION, max_new_tokens=6)  # the gate's hooks run in bfloat16
    assert isinstance(edited, str) and edited == answer(lm, QUESTION, max_new_tokens=6)
    assert all(p.device.type == device for p in lm.model.parameters())
    editor.rollback(lm, result)
    assert _same(lm, before)
    assert answer(lm, QUESTION, max_new_tokens=6) == base_answer


def _record(db, lm, editor, result, parent: int, folder) -> tuple[int, str, str]:
    from kedit_core.model import fingerprint_model

    path = folder / f"{result.info['batch_token']}.safetensors"
    sha = result.delta.save(path)
    fp = fingerprint_model(lm.model)
    note = json.dumps({"config": editor.config.to_dict()}, default=str)
    vid = ledger.add_version(db, parent, lm.fingerprint, lm.spec, editor.name, None, str(path), sha,
                             weights_fingerprint=fp, note=note)
    return vid, str(path), fp


@pytest.mark.parametrize("device", DEVICES)
def test_a_bfloat16_version_rebuilds_from_the_ledger_bit_for_bit_and_is_served(device, db, tmp_path):
    from flows.services.audit import audit_ledger
    from flows.services.serving import build_serving_state
    from flows.services.runtime import VersionError, open_live_model
    from kedit_core.serving import BackgroundServer, create_app, version_tag

    lm = load_model("tiny-llama", device=device, dtype="bfloat16")
    base = ledger.ensure_base_version(db, lm.fingerprint, lm.spec)
    editor = get_editor("alphaedit", FAST)
    parent, paths = base, []
    for tag in ("a", "b"):  # two batches: the second builds on the first's rounded weights
        vid, path, fp = _record(db, lm, editor, editor.edit(lm, _cases(tag)), parent, tmp_path)
        parent = vid
        paths.append(path)
    expected = _state(lm)
    assert all(t.dtype == torch.bfloat16 for p in paths for t in load_file(p).values())  # stored in the model's dtype

    live = open_live_model("tiny-llama", db=db, device=device, dtype="bfloat16")
    assert live.version_id == vid and _same(live.lm, expected)
    assert all(f.status == "ok" for f in audit_ledger(load_model("tiny-llama", device=device, dtype="bfloat16"), db))
    with pytest.raises(VersionError, match="dtype"):  # a float32 load is another base
        open_live_model("tiny-llama", db=db, device=device, dtype="float32", version=vid)

    from flows.services.export import export_version
    from storage.db import open_db
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"  # `kedit export --dtype bfloat16`: the version's bf16 weights as they are served
    export_version(vid, out, open_db(db.path, create=False), lm=load_model("tiny-llama", device=device, dtype="bfloat16"),
                   show_progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto").state_dict()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, expected[n].cpu()) for n, t in reloaded.items())

    state = build_serving_state(load_model("tiny-llama", device=device, dtype="bfloat16"), db, version=vid,
                                max_tokens_limit=16)
    with BackgroundServer(create_app(state, None)) as srv:
        resp = requests.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["system_fingerprint"] == version_tag(vid, fp)  # the served weights are the ledger's, bit for bit
    assert isinstance(body["choices"][0]["message"]["content"], str)


def test_a_bfloat16_model_gates_the_summed_update_instead_of_each_batch_and_says_so(caplog):
    """bfloat16 rounding of W + dW is as large as a batch's change, so the per-batch gate
    (which reads each change off the weights) cannot work there: the summed update is gated,
    with one warning line, and the edit goes through."""
    lm = load_model("tiny-llama", dtype="bfloat16")
    before = _state(lm)
    with caplog.at_level("WARNING", logger="kedit_core.editors.update_gate"):
        result = get_editor("alphaedit", merged(FAST, {"update_gate": {"per_batch": True}})).edit(lm, _cases())
    assert not _same(lm, before) and result.delta is not None
    gate = installed_update_gate(lm)
    assert gate is not None and not gate.per_batch and all(g.segments is None for g in gate.gates)
    warned = [r.getMessage() for r in caplog.records if "per_batch needs float32" in r.getMessage()]
    assert len(warned) == 1 and "this model is bfloat16, so its summed update is gated" in warned[0]
