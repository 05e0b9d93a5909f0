"""One interface for every editor, PEFT-style: a config dataclass per method, a registry
by name, and `edit(lm, cases) -> EditResult`.

Weight editors (MEMIT, AlphaEdit, FT-L, LoRA) return a `WeightDelta`: additive updates to
named parameters. Memory editors (retrieval, LTE) return an empty delta and change how
questions are asked through `rewrite_prompt`.

Exactness matters more than elegance here: rolling back a batch must restore the previous
weights bit for bit, and rebuilding version N from the base plus stored deltas must give
the live weights bit for bit. Float addition is not invertible ((w + d) - d != w in
general), so `apply` keeps the exact original tensors for `revert`, and a rebuild replays
the same additions in the same order, which is deterministic.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from kedit_core.editors.update_gate import remove_gate
from kedit_core.model import LoadedModel
from kedit_core.types import EditCase


@dataclass
class EditorConfig:
    """Settings shared by every method; each method subclasses this with its own."""

    method: ClassVar[str] = "base"
    device: str = "cpu"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditorConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"method"}
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def stronger(self) -> EditorConfig:
        """Settings for a retry when a batch's own cases did not take (the gate uses this)."""
        return self


@dataclass
class WeightDelta:
    """Additive updates to named parameters: W_new = W_old + delta[name]."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _saved: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def is_empty(self) -> bool:
        return not self.tensors

    def norm(self) -> float:
        return float(sum(t.double().pow(2).sum() for t in self.tensors.values()) ** 0.5) if self.tensors else 0.0

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Add the delta in place, keeping exact copies of the touched tensors for `revert`."""
        if self._saved is not None:
            raise RuntimeError("delta is already applied to a model; revert it first")
        params = dict(model.named_parameters())
        missing = [n for n in self.tensors if n not in params]
        if missing:
            raise KeyError(f"delta names parameters the model does not have: {missing}")
        self._saved = {n: params[n].detach().clone() for n in sorted(self.tensors)}
        for name in sorted(self.tensors):  # fixed order: replaying deltas is deterministic
            p = params[name]
            p.add_(self.tensors[name].to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def revert(self, model: torch.nn.Module) -> None:
        """Restore the exact weights from before `apply`."""
        if self._saved is None:
            raise RuntimeError("delta was not applied through this object; rebuild from the ledger instead")
        params = dict(model.named_parameters())
        for name, original in self._saved.items():
            params[name].copy_(original)
        self._saved = None

    def release(self) -> dict[str, torch.Tensor]:
        """Hand over the saved originals and forget them: the delta can no longer revert
        itself. A long-lived model keeps one copy of each touched tensor's base value
        (see `flows.runtime.LiveModel`) instead of one copy per applied delta."""
        saved, self._saved = self._saved or {}, None
        return saved

    def save(self, path: str | Path) -> str:
        """Write as safetensors (never pickle); returns the file's sha256."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from kedit_core.atomic import atomic_target

        with atomic_target(path) as tmp:  # a crash mid-write never leaves a truncated delta under the real name
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()},
                str(tmp),
                metadata={"kedit_meta": json.dumps(self.meta, default=str)},
            )
        return file_sha256(path)

    @classmethod
    def load(cls, path: str | Path, expected_sha256: str | None = None) -> WeightDelta:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if expected_sha256 is not None:
            actual = file_sha256(path)
            if actual != expected_sha256:
                raise ValueError(f"delta {path} has sha256 {actual}, the ledger says {expected_sha256}: refusing it")
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kedit_meta", "{}"))
        return cls(tensors=tensors, meta=meta)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CaseDiagnostics:
    case_id: str
    loss_curve: list[float] = field(default_factory=list)
    steps: int = 0
    target_norm: float | None = None
    delta_norm: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EditResult:
    """What one `edit` call produced: a delta (empty for memory editors) and diagnostics."""

    method: str
    delta: WeightDelta
    diagnostics: list[CaseDiagnostics] = field(default_factory=list)
    seconds: float = 0.0
    applied: bool = False  # True when `edit` already applied the delta to the model
    info: dict[str, Any] = field(default_factory=dict)


class Editor(ABC):
    """An editing method. `edit` applies the change to the model (weights or memory)."""

    config_class: ClassVar[type[EditorConfig]] = EditorConfig
    is_memory_editor: ClassVar[bool] = False

    def __init__(self, config: EditorConfig | None = None) -> None:
        self.config = config or self.config_class()

    @property
    def name(self) -> str:
        return self.config.method

    @abstractmethod
    def edit(self, lm: LoadedModel, cases: list[EditCase]) -> EditResult:
        """Apply `cases` to `lm` and return the result; the delta is already applied."""

    def attach(self, lm: LoadedModel) -> None:
        """Prepare `lm` to serve edits the way this editor means them: MEMIT/AlphaEdit
        install their update gate when configured (`kedit_core/editors/update_gate.py`),
        other weight editors remove one (their updates act everywhere), memory editors
        leave the weights' serving alone. Called before a stream or a night's edits, and
        wherever a version is loaded: the newest weight editor's config decides."""
        if not self.is_memory_editor:
            remove_gate(lm)

    def rewrite_prompt(self, question: str) -> str:
        """How a question is asked of the edited model. Weight editors leave it unchanged."""
        return question

    def rollback(self, lm: LoadedModel, result: EditResult) -> None:
        """Undo one `edit` exactly. Weight editors revert the delta; memory editors override."""
        if result.applied and not result.delta.is_empty:
            result.delta.revert(lm.model)
        result.applied = False

    def state_dict(self) -> dict[str, Any]:
        """Sequential state carried between batches (e.g. AlphaEdit's accumulated keys)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


EDITORS: dict[str, type[Editor]] = {}


def register(name: str):
    """Class decorator: make an editor available by name (`get_editor("memit")`)."""

    def wrap(cls: type[Editor]) -> type[Editor]:
        EDITORS[name] = cls
        return cls

    return wrap


def get_editor(name: str, config: EditorConfig | dict[str, Any] | None = None) -> Editor:
    import kedit_core.editors  # noqa: F401  (registers the built-in methods)

    if name not in EDITORS:
        raise ValueError(f"unknown editing method {name!r}; available: {', '.join(sorted(EDITORS))}")
    cls = EDITORS[name]
    if isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    return cls(config)


def available_editors() -> list[str]:
    import kedit_core.editors  # noqa: F401

    return sorted(EDITORS)
