"""One interface for every editor, PEFT-style: a config dataclass per method, a registry
by name, and `edit(lm, cases) -> EditResult`.

Weight editors (MEMIT, AlphaEdit, FT-L, LoRA) return a `WeightDelta`: additive updates to
named parameters. Memory editors (retrieval, LTE) return an empty delta and change how
questions are asked through `rewrite_prompt`.

`WeightDelta` and how it is applied, reverted and replayed exactly live in
`kedit_core/weights.py`; it is re-exported here because every editor returns one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from kedit_core.artifacts import file_sha256
from kedit_core.editors.update_gate import remove_update_gate
from kedit_core.model import LoadedModel
from kedit_core.types import EditCase
from kedit_core.weights import WeightDelta

__all__ = ["EDITORS", "CaseDiagnostics", "EditResult", "Editor", "EditorConfig", "WeightDelta", "available_editors",
           "file_sha256", "get_editor", "register"]


@dataclass
class EditorConfig:
    """Settings shared by every method; each method subclasses this with its own.

    There is no device setting: an editor works where the model it edits is (`lm.device`,
    set with `--device` / KEDIT_DEVICE when the model is loaded), in the model's dtype."""

    method: ClassVar[str] = "base"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditorConfig:
        names = {f.name for f in fields(cls)}
        # "device": configs saved before the setting was removed carry device="cpu" (it was
        # never read); any other value asks for something editors do not do
        if d.get("device", "cpu") != "cpu":
            raise ValueError(f"{cls.__name__}: device is not an editor setting: an editor edits the model where "
                             "it is loaded (--device / KEDIT_DEVICE)")
        unknown = set(d) - names - {"method", "device"}
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def stronger(self) -> EditorConfig:
        """Settings for a retry when a batch's own cases did not take (the gate uses this)."""
        return self


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
            remove_update_gate(lm)

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
