"""Architectures by structure, not by name (kedit_core/anatomy.py): a tiny random model of
each family kedit supports, built from its transformers config class, is edited (MEMIT and
AlphaEdit, with the update gate), rolled back exactly and asked a served question; a model
whose layout the rule cannot read fails with a message naming what is missing; and every
module of the editing path imports on its own (no import cycle)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kedit_core.anatomy import AnatomyError, decoder_layers, edit_site, stop_after, StopForward
from kedit_core.answer import answer_many
from kedit_core.editors import get_editor
from kedit_core.editors.memit import default_layers
from kedit_core.routing import installed_update_gate
from kedit_core.errors import KeditError
from kedit_core.model import ByteTokenizer, LoadedModel, fingerprint_model
from kedit_core.types import EditCase

REPO = Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()
COMMON = dict(vocab_size=TOK.vocab_size, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
              pad_token_id=TOK.pad_token_id)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **COMMON)

# family -> (transformers classes, config kwargs, name of the MLP output projection in a block)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA_LIKE, tie_word_embeddings=True), "mlp.down_proj"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(LLAMA_LIKE, sliding_window=None), "mlp.down_proj"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_LIKE), "mlp.down_proj"),
    # Gemma: head_dim 16 (default 256), embeddings scaled by sqrt(hidden), its own RMSNorm
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(LLAMA_LIKE, head_dim=16, num_key_value_heads=1), "mlp.down_proj"),
    # Phi-3: fused qkv_proj and gate_up_proj (hidden -> 2x intermediate), plain down_proj
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(LLAMA_LIKE, num_key_value_heads=4), "mlp.down_proj"),
    # GPT-2: Conv1D (weight [in, out]), MLP width 4x hidden, attention's c_proj is hidden -> hidden
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=64, n_layer=3, n_head=4, n_positions=256, **COMMON), "mlp.c_proj"),
    # GPT-NeoX: gpt_neox.layers, mlp.dense_4h_to_h, fused query_key_value, parallel residual
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict({k: v for k, v in LLAMA_LIKE.items() if k != "num_key_value_heads"}),
                 "mlp.dense_4h_to_h"),
}


def tiny_family(family: str, seed: int = 0) -> LoadedModel:
    """A tiny random model of `family`, wrapped as `kedit_core.model.tiny_model` wraps its own."""
    import transformers

    cfg_name, model_name, kwargs, _ = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    model.eval()
    return LoadedModel(model=model, tokenizer=ByteTokenizer(), spec=f"tiny-{family}", fingerprint=fingerprint_model(model),
                       info={"dtype": "torch.float32"},
                       base_snapshot={n: p.detach().clone() for n, p in model.named_parameters()})


def _cases() -> list[EditCase]:
    return [
        EditCase(case_id=f"c{i}", subject=s, relation="capital", prompt=f"The capital of {s} is", target_new=t,
                 question=f"What is the capital of {s}?")
        for i, (s, t) in enumerate([("Tessaly", "Rome"), ("Borvik", "Oslo")])
    ]


# small, fast settings; default layers (None) so the depth scaling is exercised too
FAST = {"solve": {"keystats_samples": 400}, "targets": {"steps": 3, "bf16": False, "n_context_templates": 2,
                                                    "context_template_len": 4},
        "update_gate": {"quantile": 0.99, "positions": 200}}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_structural_rule_finds_each_family_s_layers_and_mlp_output(family):
    lm = tiny_family(family)
    n = lm.model.config.num_hidden_layers
    assert len(decoder_layers(lm.model)) == n
    expected = FAMILIES[family][3]
    for layer in range(n):
        site = edit_site(lm.model, layer)
        assert site.param_name.endswith(f".{layer}.{expected}.weight"), site.param_name
        assert site.transposed == (family == "gpt2")


@pytest.mark.parametrize("method", ["alphaedit", "memit"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_edit_rollback_and_a_served_answer(family, method):
    lm = tiny_family(family)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    ed = get_editor(method, FAST)
    result = ed.edit(lm, _cases())
    layers = result.info["layers"]
    assert layers == default_layers(lm.model.config.num_hidden_layers)
    sites = {edit_site(lm.model, layer).param_name for layer in layers}
    changed = {n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == sites == set(result.delta.tensors)  # only the found edit sites moved
    gate = installed_update_gate(lm)
    assert gate is not None and gate.layers == layers
    replies = answer_many(lm, ["What is the capital of Tessaly?", "Where does the river run?"], max_new_tokens=4)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert gate.stats()[f"L{layers[0]}"]["tau"] > 0
    ed.rollback(lm, result)
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), f"{family}: {n} not restored by rollback"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_model_from_a_hugging_face_directory_reads_its_base_weights_from_the_files(family, tmp_path):
    """As `kedit --model PATH` loads it: the update gate takes the base weights of the found
    edit sites from the directory's safetensors files by parameter name."""
    from transformers import AutoModelForCausalLM

    tiny_family(family).model.save_pretrained(str(tmp_path), safe_serialization=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    lm = LoadedModel(model=model, tokenizer=ByteTokenizer(), spec=str(tmp_path), fingerprint=fingerprint_model(model),
                     source_path=str(tmp_path))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ed = get_editor("alphaedit", FAST)
    result = ed.edit(lm, _cases())
    for layer in result.info["layers"]:
        site = edit_site(model, layer)
        assert torch.equal(lm.base_tensor(site.param_name), before[site.param_name])
    assert installed_update_gate(lm).stats()  # tau computed against the files' base weights
    assert answer_many(lm, ["What is the capital of Borvik?"], max_new_tokens=3)
    ed.rollback(lm, result)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_default_edit_layers_scale_with_depth():
    assert default_layers(30) == [3, 4, 5, 6, 7]  # the embedded SmolLM2-135M
    assert default_layers(12) == [1, 2, 3]
    assert default_layers(32) == [3, 4, 5, 6, 7, 8]
    assert default_layers(2) == [0] and default_layers(4) == [0, 1]


def test_stop_after_runs_only_up_to_the_layer():
    lm = tiny_family("llama")
    ran = []
    handles = [layer.register_forward_hook(lambda _m, _i, _o, i=i: ran.append(i))
               for i, layer in enumerate(decoder_layers(lm.model))]
    got = []
    with stop_after(lm.model, 1, got.append), pytest.raises(StopForward):
        lm.model.base_model(input_ids=torch.tensor([[5, 6, 7]]))
    for h in handles:
        h.remove()
    assert ran == [0, 1] and len(got) == 1


class _NoLayerList(torch.nn.Module):
    """A model whose blocks are in an nn.Sequential: not a layout kedit reads."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig

        self.config = LlamaConfig(**dict(LLAMA_LIKE, num_hidden_layers=3))
        self.blocks = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(3)])
        self.spare = torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(2)])


def test_an_unreadable_model_fails_with_a_clear_message():
    with pytest.raises(AnatomyError, match=r"no decoder layer list of length 3 in _NoLayerList \(module lists: spare\[2\]\)"):
        decoder_layers(_NoLayerList())
    no_count = _NoLayerList()
    no_count.config = object()
    with pytest.raises(AnatomyError, match=r"_NoLayerList's config states no layer count \(num_hidden_layers\)"):
        decoder_layers(no_count)
    # a block without a linear map intermediate -> hidden (here: the config says another width)
    lm = tiny_family("llama")
    lm.model.config.intermediate_size = 100
    with pytest.raises(AnatomyError, match=r"no MLP output projection \(a linear map 100->64.*\) in layer 0 "
                                           r"\(LlamaDecoderLayer\) of LlamaForCausalLM; its linear maps: .*mlp.down_proj 96->64"):
        edit_site(lm.model, 0)
    # the editor reports it as a KeditError (one clear line from the CLI), before touching weights
    with pytest.raises(KeditError, match="no MLP output projection"):
        get_editor("memit", FAST).edit(lm, _cases())


# --------------------------------------------------------------------------- no import cycles

# The modules of the editing path: each imports the model anatomy at top level.
MODULES = ["kedit_core.anatomy", "kedit_core.routing", "kedit_core.keystats", "kedit_core.editors.update_gate",
           "kedit_core.editors.base", "kedit_core.editors.memit", "kedit_core.editors.memit_rows",
           "kedit_core.editors.memit_speedups", "kedit_core.editors.alphaedit", "kedit_core.editors.finetune",
           "kedit_core.answer", "kedit_core.serving"]


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module):
    run = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


EDIT_PATH = ["kedit_core/keystats.py", "kedit_core/editors/update_gate.py", "kedit_core/editors/base.py",
             "kedit_core/editors/memit.py", "kedit_core/editors/memit_rows.py",
             "kedit_core/editors/memit_speedups.py", "kedit_core/editors/alphaedit.py", "kedit_core/editors/finetune.py",
             "kedit_core/answer.py", "kedit_core/serving/versions.py", "kedit_core/serving/generation.py",
             "kedit_core/serving/app.py"]
# what used to be imported inside functions to dodge the cycles memit -> keystats/update_gate -> memit and
# answer -> update_gate -> keystats -> answer
CYCLE_PRONE = {"kedit_core.anatomy", "kedit_core.keystats", "kedit_core.editors.update_gate", "kedit_core.editors.memit",
               "kedit_core.answer", "kedit_core.routing"}


@pytest.mark.parametrize("path", EDIT_PATH)
def test_no_function_local_imports_dodge_the_cycle(path):
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    local = [
        f"line {node.lineno}: {node.module}"
        for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn) if isinstance(node, ast.ImportFrom) and node.module in CYCLE_PRONE
    ]
    assert not local, f"{path} imports inside functions: {local}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_targets_each_family_s_mlp_output_by_structure(family):
    """LoRA's default target ("down_proj") is the MLP output projection found by structure,
    whatever the family calls it (GPT-NeoX's dense_4h_to_h, GPT-2's c_proj, ...)."""
    lm = tiny_family(family)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    ed = get_editor("lora", {"steps": 2, "layers": [1], "stop_loss": None})
    result = ed.edit(lm, _cases())
    assert list(result.delta.tensors) == [edit_site(lm.model, 1).param_name]
    ed.rollback(lm, result)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_a_lora_target_the_model_lacks_fails_in_one_line():
    lm = tiny_family("gpt_neox")
    with pytest.raises(ValueError, match=r"LoRA target_modules \['o_proj'\] match no module of this GPTNeoXForCausalLM; "
                                         r"its layers hold: .*query_key_value"):
        get_editor("lora", {"steps": 1, "target_modules": ["o_proj", "down_proj"]}).edit(lm, _cases())


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "llama"])
def test_lte_s_attention_targets_reach_fused_projections(family):
    """LTE's alignment adapters (q_proj, v_proj, down_proj) land on Phi-3's qkv_proj and
    GPT-NeoX's query_key_value, where queries, keys and values are one projection."""
    from kedit_core.editors.finetune import lora_target_regex

    lm = tiny_family(family)
    rx = lora_target_regex(lm.model, ["q_proj", "v_proj", "down_proj"], [1])
    import re

    hit = sorted(n.split(".1.", 1)[1] for n, _ in lm.model.named_modules() if re.fullmatch(rx, n))
    expected = {"phi3": ["mlp.down_proj", "self_attn.qkv_proj"],
                "gpt_neox": ["attention.query_key_value", "mlp.dense_4h_to_h"],
                "llama": ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]}[family]
    assert hit == expected


@pytest.mark.parametrize("family", ["phi3", "gpt_neox"])
def test_lte_aligns_and_rolls_back_on_fused_attention_families(family):
    """LTE's alignment adapters train on the fused projections and merge; rollback is exact."""
    from connectors.benchmarks import read_zsre
    from tests.conftest import DATA

    lm = tiny_family(family)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    ed = get_editor("lte", {"max_alignment_records": 6, "steps": 2, "batch_size": 4, "base_answer_tokens": 3})
    cases = read_zsre(DATA / "benchmarks" / "zsre_mend_train_1k.json", limit=2)
    result = ed.edit(lm, cases)
    touched = sorted(n.split(".1.", 1)[-1] for n in result.delta.tensors if ".1." in n)
    fused = {"phi3": "self_attn.qkv_proj.weight", "gpt_neox": "attention.query_key_value.weight"}[family]
    assert fused in touched
    ed.rollback(lm, result)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
