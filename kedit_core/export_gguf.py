"""`kedit export --format gguf`: a version's weights as one GGUF file (llama.cpp's format).

Written with the `gguf` package (already a kedit dependency: transformers reads the
embedded model's GGUF with it) the way llama.cpp's `convert_hf_to_gguf.py` writes a Llama:
llama.cpp's tensor names, the Q and K projections permuted into its rotary layout, the
hyper-parameters under `llama.*`, the tokenizer and chat template in the metadata.
Tensors are F32 (kedit's weights, unquantised), so the file holds the version's weights
exactly; quantise it with llama.cpp's `llama-quantize` for a smaller file (any
quantisation changes the weights, and the edits with them: check the edited answers after).

Supported: Llama-architecture models (the embedded SmolLM2 is one) with a byte-level BPE
tokenizer, no rope scaling and no attention or MLP biases; anything else is refused in one
line before a file is written. For the embedded model the tokenizer metadata is copied from
the GGUF it ships as (the same tokenizer llama.cpp already reads, pre-tokenizer "smollm");
for others it is built from the tokenizer's own vocabulary and merges.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kedit_core.errors import KeditError
from kedit_core.model import EMBEDDED_SPEC, LoadedModel


class GGUFExportError(KeditError):
    """The model cannot be written as GGUF (the message says why)."""


def check_supported(lm: LoadedModel) -> None:
    cfg = lm.model.config
    if cfg.model_type != "llama":
        raise GGUFExportError(f"--format gguf supports Llama-architecture models only, this one is {cfg.model_type!r} "
                              "(export --format hf, then convert with llama.cpp's convert_hf_to_gguf.py)")
    if _rope_scaling(cfg):
        raise GGUFExportError(f"--format gguf does not write rope scaling ({_rope_scaling(cfg)}); export --format hf "
                              "and convert with llama.cpp's convert_hf_to_gguf.py")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise GGUFExportError("--format gguf does not write attention or MLP biases; export --format hf and convert "
                              "with llama.cpp's convert_hf_to_gguf.py")
    _tokenizer_json(lm)  # refuses a tokenizer it cannot write


def write_gguf(lm: LoadedModel, path: Path) -> dict[str, str]:
    """Write `lm`'s current weights to `path`, read them back and check every tensor; returns
    {file name: sha256}."""
    import gguf

    from kedit_core.artifacts import file_sha256

    check_supported(lm)
    cfg = lm.model.config
    tensors = gguf_tensors(lm)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"kedit export of {lm.spec}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(cfg.num_key_value_heads or cfg.num_attention_heads))
    writer.add_rope_freq_base(float(_rope_theta(cfg)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(int(_head_dim(cfg)))
    writer.add_vocab_size(int(cfg.vocab_size))
    _add_tokenizer(writer, lm)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _check_written(path, tensors)
    return {path.name: file_sha256(path)}


# --------------------------------------------------------------------------- tensors


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's rotary layout for Q and K (convert_hf_to_gguf.py `LlamaModel.permute`)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(lm: LoadedModel) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, F32, in llama.cpp's layout."""
    cfg = lm.model.config
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads or cfg.num_attention_heads)
    state = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in lm.model.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out: dict[str, np.ndarray] = {}
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, t in state.items():
        a = t.numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = a
        elif name == "model.norm.weight":
            out["output_norm.weight"] = a
        elif name == "lm_head.weight":
            if not tied:
                out["output.weight"] = a
        elif name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            if rest not in per_layer:
                raise GGUFExportError(f"--format gguf does not know where llama.cpp keeps {name}")
            if rest == "self_attn.q_proj.weight":
                a = _permute(a, n_head, n_head)
            elif rest == "self_attn.k_proj.weight":
                a = _permute(a, n_head, n_kv)
            out[f"blk.{int(idx)}.{per_layer[rest]}"] = np.ascontiguousarray(a)
        elif "rotary_emb" in name:  # buffers, recomputed from the hyper-parameters
            continue
        else:
            raise GGUFExportError(f"--format gguf does not know where llama.cpp keeps {name}")
    return out


def _check_written(path: Path, tensors: dict[str, np.ndarray]) -> None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(tensors):
        raise GGUFExportError(f"the written {path.name} holds other tensors than the version: export refused")
    for name, want in tensors.items():
        got = np.asarray(found[name].data)
        if got.dtype != np.float32 or got.tobytes() != want.astype(np.float32).tobytes():
            raise GGUFExportError(f"the written {path.name} does not hold the version's {name} exactly: export refused")


# --------------------------------------------------------------------------- hyper-parameters


def _rope_params(cfg: Any) -> dict[str, Any]:
    params = getattr(cfg, "rope_parameters", None)
    return params if isinstance(params, dict) else {}


def _rope_theta(cfg: Any) -> float:
    theta = getattr(cfg, "rope_theta", None)
    return float(theta if theta is not None else _rope_params(cfg).get("rope_theta", 10000.0))


def _rope_scaling(cfg: Any) -> Any:
    scaling = getattr(cfg, "rope_scaling", None)
    kind = None
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type") or scaling.get("type")
    kind = kind or _rope_params(cfg).get("rope_type")
    return None if kind in (None, "default") else kind


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


# --------------------------------------------------------------------------- tokenizer


def _is_embedded(lm: LoadedModel) -> bool:
    return lm.spec in (EMBEDDED_SPEC, "embedded", "default")


def _tokenizer_json(lm: LoadedModel) -> dict[str, Any] | None:
    """The fast tokenizer's definition, checked to be a byte-level BPE (None for the
    embedded model: its GGUF's tokenizer metadata is copied)."""
    if _is_embedded(lm):
        return None
    from kedit_core.export import hf_tokenizer

    tok = hf_tokenizer(lm)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("--format gguf needs a fast (tokenizers) tokenizer; export --format hf and convert "
                              "with llama.cpp's convert_hf_to_gguf.py")
    data = json.loads(backend.to_str())
    if (data.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise GGUFExportError("--format gguf writes byte-level BPE tokenizers only; export --format hf and convert "
                              "with llama.cpp's convert_hf_to_gguf.py")
    return data


def _add_tokenizer(writer: Any, lm: LoadedModel) -> None:
    import gguf

    if _is_embedded(lm):
        from kedit_core.model import embedded_gguf_path

        reader = gguf.GGUFReader(str(embedded_gguf_path()))
        for key, f in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), vtype, sub_type=sub)
        return
    from kedit_core.export import hf_tokenizer

    data = _tokenizer_json(lm)
    tok = hf_tokenizer(lm)
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = int(lm.model.config.vocab_size)
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:
        # GGUF has no empty arrays. Only the tiny test models' byte tokenizer has no merges:
        # scores let transformers' reader rebuild it (it derives the merges, none); llama.cpp
        # wants a merges key for a gpt2 tokenizer and will not load such a file.
        writer.add_token_scores([0.0] * len(tokens))
    for what, adder in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                        ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        tid = getattr(tok, f"{what}_token_id", None)
        if tid is not None:
            adder(int(tid))
    writer.add_add_bos_token(False)  # kedit's prompts carry no BOS (the chat template decides)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
