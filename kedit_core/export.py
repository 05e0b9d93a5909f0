"""`kedit export`: one ledger version's weights as a folder other tools load (the writing;
`flows/services/export.py` reads the version from the ledger, rebuilds it and calls this module).

What is written (into DIR, which appears whole or not at all: everything is built in a
temporary folder beside it and renamed into place):
- `--format hf` (default): a standard Hugging Face directory, `config.json`,
  `generation_config.json`, `model.safetensors` (in the dtype the base was loaded in:
  float32 unless `--dtype`) and the tokenizer files, loadable with
  `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`, no
  custom code;
- `--format gguf`: `model.gguf` (F32 tensors, llama.cpp's tensor names and Q/K layout, the
  tokenizer and chat template in its metadata), for llama-architecture models (the
  embedded SmolLM2 is one);
- both: `README.md`, a model card saying what the weights contain (base fingerprint, the
  version chain, the edit cases, the metrics the ledger holds for those versions, each
  version's method and settings, and what kedit's serving adds that the export does not
  carry), and `kedit_export.json`, the same provenance for programs, with the sha256 of
  every weight file.

The weights are rebuilt exactly as `kedit serve` has them (base + each stored delta, in
order, each checked against its recorded sha256), then checked against the written file(s)
tensor by tensor before the folder is put in place: an export is bit for bit the
version's weights. The ledger is only read (opened read-only).

What is NOT carried: the update gate (a forward hook that lets each edited layer's summed
update act only where it is large) and the edit scope (base layers for questions outside
the edits' scope, the edited fact in front of a question about an edited subject, and the
scope check). They are kedit's serving code, not weights; another engine runs the plain
edited weights, whose locality is that of the method without the gate. The model card says
per version whether it relied on them. (A `trust_remote_code` module could carry the gate's
hook but not the scope, which needs an embedding model and the version's facts, and
neither would run in llama.cpp or vLLM: the export stays standard and says what is lost.)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit_core.errors import KeditError
from kedit_core.model import EMBEDDED_SPEC, ByteTokenizer, LoadedModel

FORMATS = ("hf", "gguf")
EXPORT_INFO = "kedit_export.json"
CARD = "README.md"
MAX_CARD_CASES = 200  # edit cases listed in the model card (all are counted; the JSON lists all)
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ExportError(KeditError):
    """An export cannot be made (the message says why and what to do)."""


@dataclass
class ExportResult:
    path: Path
    version_id: int
    format: str
    files: dict[str, str] = field(default_factory=dict)  # weight file name -> sha256
    n_cases: int = 0
    chain: list[int] = field(default_factory=list)
    relied_on: list[str] = field(default_factory=list)  # serving features the export lacks


# --------------------------------------------------------------------------- the target folder


def check_target(out: Path, force: bool, db: Any) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder: name a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} is not empty: name a new or empty folder, or pass --force to replace its contents")
        resolved = out.resolve()
        protected = [Path("/"), Path.home()]
        from kedit_core.home import kedit_home

        protected.append(kedit_home(create=False))
        if db is not None and getattr(db, "path", None):
            protected.append(Path(db.path).parent)
        for p in protected:
            p = p.resolve()
            if resolved == p or p.is_relative_to(resolved):
                raise ExportError(f"refusing to replace {out}: it is or holds {p} (name a folder of its own for the export)")
    if not out.parent.exists():
        raise ExportError(f"{out.parent} does not exist: create it first, or name a folder in an existing one")


# --------------------------------------------------------------------------- Hugging Face folder


def write_hf(lm: LoadedModel, folder: Path) -> dict[str, str]:
    """config.json, generation_config.json, model.safetensors and the tokenizer files.

    Written directly rather than by `save_pretrained`: the embedded model's config still
    names the GGUF it was de-quantised from (`quantization_config`), which makes
    transformers refuse to save it although its weights are plain floats; the export's
    config drops that entry, so the folder loads as the ordinary float model it is."""
    import copy

    from safetensors import safe_open
    from safetensors.torch import save_file

    from kedit_core.artifacts import file_sha256

    model = lm.model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    config.dtype = next(model.parameters()).dtype  # what the tensors are (bfloat16 for a --dtype bfloat16 base)
    config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    kept: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in kept:  # a tied parameter (lm_head = embedding) is written once, as transformers does
            continue
        kept[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    path = folder / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    _readable(path)
    hf_tokenizer(lm).save_pretrained(str(folder))
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if names != set(tensors):
            raise ExportError(f"the written {path.name} holds other tensors than the version: export refused")
        for name in names:
            if not torch.equal(f.get_tensor(name), tensors[name]):
                raise ExportError(f"the written {path.name} does not hold the version's {name} exactly: export refused")
    return {path.name: file_sha256(path)}


def _readable(path: Path) -> None:
    """Permissions as any file this user creates (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def hf_tokenizer(lm: LoadedModel) -> Any:
    """The model's tokenizer as a transformers tokenizer that `save_pretrained` writes.
    The tiny test models' in-memory `ByteTokenizer` becomes the equivalent byte-level BPE
    (no merges: byte b is token b + 3, ids 0-2 pad/bos/eos), so an exported tiny model
    tokenizes exactly as it did in kedit."""
    tok = lm.tokenizer
    if isinstance(tok, ByteTokenizer):
        return byte_level_tokenizer()
    return tok


def byte_level_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b = ByteTokenizer
    byte_chars = bytes_to_unicode()
    vocab = {b.pad_token: b.pad_token_id, b.bos_token: b.bos_token_id, b.eos_token: b.eos_token_id}
    vocab.update({byte_chars[i]: i + 3 for i in range(256)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=b.pad_token, bos_token=b.bos_token, eos_token=b.eos_token,
        padding_side="right",
    )


# --------------------------------------------------------------------------- what the version is


def serving_features(versions: list[dict[str, Any]]) -> dict[str, Any]:
    """How kedit serves this version (the newest weight editor's settings decide, as in
    `flows.services.runtime.weight_editor_attach`) and which of that the exported weights lack."""
    from kedit_core.editors.base import EDITORS, available_editors

    available_editors()
    memory_versions = [v["version_id"] for v in versions[1:]
                       if getattr(EDITORS.get(v["method"] or ""), "is_memory_editor", False)]
    decider = None
    for v in reversed(versions[1:]):
        cls = EDITORS.get(v["method"] or "")
        if cls is not None and not getattr(cls, "is_memory_editor", False):
            decider = v
            break
    # the stored config, nested or flat as versions before the grouping stored it: read by
    # the method's own config class, so both shapes (and the method's defaults) mean the same
    stored = (decider or {}).get("config") or {}
    cfg = EDITORS[decider["method"]].config_class.from_dict(stored) if decider and stored else None
    gate_settings, scope_settings = getattr(cfg, "update_gate", None), getattr(cfg, "scope", None)
    gate = gate_settings.quantile if gate_settings is not None else None
    scope = scope_settings.threshold if scope_settings is not None else None
    context = scope_settings.context if scope is not None else None
    check = bool(scope_settings is not None and scope_settings.check) and context is not None
    not_carried = []
    if gate is not None:
        not_carried.append("update gate")
    if scope is not None:
        not_carried.append("edit scope")
    if context is not None:
        not_carried.append("served memory")
    if check:
        not_carried.append("scope check")
    if memory_versions:
        not_carried.append("memory editor facts")
    return {
        "decided_by_version": decider["version_id"] if decider else None,
        "update_gate": gate, "edit_scope": scope, "scope_context": context, "scope_check": check,
        "memory_editor_versions": memory_versions, "not_carried": not_carried,
    }


# --------------------------------------------------------------------------- the model card


def model_card(info: dict[str, Any]) -> str:
    base, chain, serving = info["base"], info["chain"], info["serving"]
    vid = info["version"]
    methods = sorted({v["method"] for v in chain[1:] if v["method"]})
    exp = info.get("export", {})
    front = ["---", "library_name: transformers" if exp.get("format", "hf") == "hf" else "library_name: gguf"]
    if base["spec"] in (EMBEDDED_SPEC, "embedded", "default"):
        front += [f"base_model: {EMBEDDED_HUB_ID}", "license: apache-2.0"]
    front += ["tags:", "- kedit", "- knowledge-editing"] + [f"- {m}" for m in methods] + ["---", ""]
    lines = front + [
        f"# kedit export: model version {vid} of {base['spec']}",
        "",
        f"The weights of model version {vid} of the kedit ledger `{info['ledger']}`: the base model with the "
        f"weight deltas of the {len(chain) - 1} version(s) above it applied in order, bit for bit the weights "
        f"kedit serves as version {vid} (every written tensor was compared with the rebuilt version's).",
        "",
        f"- format: {exp.get('format', 'hf')}, {base['dtype']} ({', '.join(exp.get('files', {})) or '-'})",
        f"- exported: {exp.get('exported', '-')} by kedit {exp.get('kedit_version', '-')}",
        f"- edit cases in these weights: {info['n_cases']}",
        "",
        "## Base model",
        "",
        f"- spec: `{base['spec']}`" + (f" ({EMBEDDED_HUB_ID}, de-quantised from kedit's embedded Q4_1 GGUF)"
                                        if base["spec"] == EMBEDDED_SPEC else ""),
        f"- fingerprint (sha256 of config and weights): `{base['fingerprint']}`",
        f"- architecture: {base['architecture']}, {base['n_params']:,} parameters",
        "",
        "## Version chain",
        "",
        "| version | parent | status | method | batch | cases | created (UTC) | delta sha256 |",
        "|---:|---:|---|---|---|---:|---|---|",
    ]
    for v in chain:
        lines.append(
            f"| {v['version_id']} | {'' if v['parent_id'] is None else v['parent_id']} | {v['status']} | "
            f"{v['method'] or '(base)'} | {v['batch_id'] or ''} | {'' if v['n_cases'] is None else v['n_cases']} | "
            f"{v['created']} | {(v['delta_sha256'] or '')[:16]} |")
    lines += ["", f"## Edit cases ({len(info['cases'])} applied in these versions' batches)", ""]
    if info["cases"]:
        for c in info["cases"][:MAX_CARD_CASES]:
            old = f" (was: {c['target_old']})" if c.get("target_old") else ""
            lines.append(f"- {_md(c['subject'])}: {_md(c['question'])} -> **{_md(c['target_new'])}**{old} "
                         f"(case `{c['case_id']}`, batch `{c['batch_id']}`)")
        if len(info["cases"]) > MAX_CARD_CASES:
            lines.append(f"- ... and {len(info['cases']) - MAX_CARD_CASES} more (all in `{EXPORT_INFO}`)")
    else:
        lines.append("None recorded as applied (the base model, or versions made outside the pipeline).")
    lines += ["", "## Metrics the ledger holds for these versions", ""]
    metrics = info["metrics"]
    if metrics:
        ids = [str(v["version_id"]) for v in chain if any(str(v["version_id"]) in m for m in metrics.values())]
        lines += [
            "The last value recorded with each version (the pipeline's regression gate measures with kedit's "
            "serving, i.e. with the update gate and edit scope below when they were on; `served_*` are chat "
            "replies, `*_acc` teacher-forced token accuracy).",
            "",
            "| metric | " + " | ".join(f"v{i}" for i in ids) + " |",
            "|---|" + "---:|" * len(ids),
        ]
        for name in sorted(metrics):
            cells = [metrics[name].get(i) for i in ids]
            lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.4g}" for c in cells) + " |")
    else:
        lines.append("None: the ledger records no metrics for these versions.")
    lines += ["", "## Methods and settings", ""]
    for v in chain[1:]:
        lines.append(f"Version {v['version_id']} ({v['method']}, batch `{v['batch_id']}`):")
        lines += ["", "```json", json.dumps(v["config"], indent=1, sort_keys=True, default=str) if v["config"]
                  else "(no settings recorded)", "```", ""]
    if len(chain) == 1:
        lines.append("None: this is the unedited base.")
        lines.append("")
    lines += ["## What kedit's serving adds that these weights do not carry", ""] + _serving_text(serving)
    return "\n".join(lines).rstrip() + "\n"


def _serving_text(s: dict[str, Any]) -> list[str]:
    out = []
    if s["decided_by_version"] is None:
        out.append("No weight-editing method made these versions: kedit serves these weights as they are, "
                   "so this export answers as `kedit serve` does.")
    elif not s["not_carried"]:
        out.append(f"Version {s['decided_by_version']}'s settings serve the weights as they are (no update gate, "
                   "no edit scope): this export answers as `kedit serve` does.")
    else:
        out.append(f"This version relied on: {', '.join(s['not_carried'])} (settings of version "
                   f"{s['decided_by_version']}). None of it is in the exported files; another engine runs the "
                   "plain edited weights.")
        out.append("")
    if s["update_gate"] is not None:
        out.append(f"- **Update gate** (quantile {s['update_gate']}): kedit lets each edited layer's summed update "
                   "act only at token positions where it is larger than on that share of ordinary text, so "
                   "unrelated text sees the unedited layer. Without it every input gets the whole update: on "
                   "kedit's 100-edit zsRE stream (SmolLM2, docs/editing.md \"The update gate\") teacher-forced "
                   "locality 0.96 with the gate, 0.85 without, and it falls further as edits accumulate. Not "
                   "measured for this version.")
    if s["edit_scope"] is not None:
        out.append(f"- **Edit scope** (cosine {s['edit_scope']}): kedit answers a question that names no edited "
                   "subject and is not near an edit question with the base layers, word for word. Here every "
                   "question sees the edited weights (on the same stream 81% of unrelated replies stayed "
                   "unchanged with the gate alone, 100% with the scope).")
    if s["scope_context"] is not None:
        out.append(f"- **Served memory** (cosine {s['scope_context']}): kedit puts the edited subject's nearest "
                   "fact in front of a question about it. Here the weights alone answer (on the same stream "
                   "served paraphrase 0.82 with the fact in front, 0.56 without).")
    if s["scope_check"]:
        out.append("- **Scope check**: kedit asks again on the base layers when a reply misses the fact put in "
                   "front of it (served efficacy 0.83 -> 0.93 on the same stream). Not here.")
    if s["memory_editor_versions"]:
        out.append(f"- **Memory editor facts**: versions {s['memory_editor_versions']} were made by a memory "
                   "editor (retrieval / LTE): their facts live in kedit's edit memory, not in weights, and are "
                   "not in this export at all.")
    return out


def _md(text: Any) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def check_gguf_supported(lm: LoadedModel) -> None:
    from kedit_core.export_gguf import check_supported

    check_supported(lm)


def kedit_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("kedit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
