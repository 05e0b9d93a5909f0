"""FT-L and LoRA on tiny models: the edit takes, the norm bound holds, deltas are exact."""
from __future__ import annotations

import pytest
import torch

from kedit_core.editors import get_editor
from kedit_core.weights import WeightDelta
from kedit_core.editors.finetune import default_layer, lora_target_regex, mlp_out_params
from kedit_core.model import fingerprint_model, tiny_model
from kedit_core.scoring import token_accuracy
from kedit_core.types import EditCase

CASES = [
    EditCase("c1", "Tokyo", "P17", "Tokyo is located in", "Peru"),
    EditCase("c2", "Danube", "P885", "The Danube flows into the", "Nile"),
]
PROMPTS = [c.prompt for c in CASES]
TARGETS = [c.target_new for c in CASES]


def _acc(lm) -> float:
    return sum(token_accuracy(lm, PROMPTS, TARGETS)) / len(CASES)


def test_layer_lookup_by_architecture(tiny_llama, tiny_gpt2):
    assert mlp_out_params(tiny_llama.model)[2] == "model.layers.2.mlp.down_proj.weight"
    assert mlp_out_params(tiny_gpt2.model)[0] == "transformer.h.0.mlp.c_proj.weight"
    assert default_layer(tiny_llama.model) == 2
    rx = lora_target_regex(tiny_gpt2.model, ["down_proj"], [1, 3])
    import re

    names = [n for n, _ in tiny_gpt2.model.named_modules() if re.fullmatch(rx, n)]
    assert names == ["transformer.h.1.mlp.c_proj", "transformer.h.3.mlp.c_proj"]


@pytest.mark.parametrize("norm,bound", [("linf", 0.3), ("l2", 4.0)])
def test_ft_edit_takes_within_the_norm_bound_and_rolls_back_exactly(tiny_llama, norm, bound):
    lm = tiny_llama
    before = _acc(lm)
    ed = get_editor("ft", {"norm": norm, "norm_bound": bound, "lr": 2e-2, "steps": 20})
    res = ed.edit(lm, CASES)
    assert _acc(lm) > before + 0.3
    assert list(res.delta.tensors) == ["model.layers.2.mlp.down_proj.weight"]  # one MLP layer only
    d = res.delta.tensors["model.layers.2.mlp.down_proj.weight"]
    if norm == "linf":
        assert float(d.abs().max()) <= bound * (1 + 1e-5)
    else:
        assert float(d.norm()) <= bound * (1 + 1e-4)
    assert res.diagnostics[0].loss_curve[-1] < res.diagnostics[0].loss_curve[0]
    assert fingerprint_model(lm.model) != lm.fingerprint
    ed.rollback(lm, res)
    assert fingerprint_model(lm.model) == lm.fingerprint
    assert all(p.requires_grad for p in lm.model.parameters())  # flags restored


def test_ft_is_continual_across_batches(tiny_llama):
    lm = tiny_llama
    ed = get_editor("ft", {"norm_bound": 0.3, "lr": 1e-2, "steps": 8})
    r1 = ed.edit(lm, CASES[:1])
    after_first = fingerprint_model(lm.model)
    r2 = ed.edit(lm, CASES[1:])
    assert fingerprint_model(lm.model) != after_first  # second batch trains on top of the first
    ed.rollback(lm, r2)
    assert fingerprint_model(lm.model) == after_first
    ed.rollback(lm, r1)
    assert fingerprint_model(lm.model) == lm.fingerprint


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_edit_takes_and_its_delta_replays_exactly(arch, tmp_path):
    lm = tiny_model(arch)
    names = [n for n, _ in lm.model.named_parameters()]
    before = _acc(lm)
    ed = get_editor("lora", {"lr": 5e-2, "steps": 20, "rank": 4})
    res = ed.edit(lm, CASES)
    assert _acc(lm) > before + 0.3
    assert [n for n, _ in lm.model.named_parameters()] == names  # adapters unloaded, nothing left behind
    assert len(res.delta.tensors) == 4 and all("mlp" in n for n in res.delta.tensors)
    edited = fingerprint_model(lm.model)
    # the saved delta rebuilds the same weights from a fresh base, bit for bit
    sha = res.delta.save(tmp_path / "d.safetensors")
    fresh = tiny_model(arch)
    WeightDelta.load(tmp_path / "d.safetensors", expected_sha256=sha).apply(fresh.model)
    assert fingerprint_model(fresh.model) == edited
    ed.rollback(lm, res)
    assert fingerprint_model(lm.model) == lm.fingerprint


def test_stronger_settings_for_a_retry():
    cfg = get_editor("ft").config
    assert cfg.stronger().steps > cfg.steps and cfg.stronger().norm_bound > cfg.norm_bound
    with pytest.raises(ValueError, match="unknown settings"):
        get_editor("lora", {"rnak": 4})
    with pytest.raises(ValueError, match="norm must be"):
        get_editor("ft", {"norm": "l1"}).edit(tiny_model("llama"), CASES)
