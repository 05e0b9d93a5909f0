"""One interface for every editor, PEFT-style: a config dataclass per method, a registry
by name, and `edit(lm, cases) -> EditResult`.

Weight editors (MEMIT, AlphaEdit, FT-L, LoRA) return a `WeightDelta`: additive updates to
named parameters. Memory editors (retrieval, LTE) return an empty delta and change how
questions are asked through `rewrite_prompt`.

`WeightDelta` and how it is applied, reverted and replayed exactly live in
`kedit_core/weights.py` (import it from there).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

from kedit_core.editors.update_gate import remove_update_gate
from kedit_core.model import LoadedModel
from kedit_core.types import EditCase
from kedit_core.weights import WeightDelta

__all__ = ["EDITORS", "CaseDiagnostics", "EditResult", "Editor", "EditorConfig", "available_editors", "get_editor",
           "register"]


@dataclass
class EditorConfig:
    """Settings shared by every method; each method subclasses this with its own.

    Settings of one concern can be grouped, PEFT-style, in a nested dataclass (MEMIT's
    `targets`, `solve`, `update_gate`, `scope`): a field whose default is a dataclass is a
    group, addressed with a dot in `--set` (`targets.steps=50`) and as a nested table in a
    config file and in `to_dict()`. A group given as a dict is read over that group's own
    defaults (a subclass re-defaults a group by subclassing its dataclass).

    `OLD_NAMES` maps the flat names of configs stored before the grouping to the new dotted
    names (None: a setting the method never read, dropped); `RETIRED` holds settled toggles
    and the one value they still accept. `from_dict` reads both; `from_settings` (what
    `--set` and `--config` give) refuses an old name with a line naming the new one.

    There is no device setting: an editor works where the model it edits is (`lm.device`,
    set with `--device` / KEDIT_DEVICE when the model is loaded), in the model's dtype."""

    method: ClassVar[str] = "base"
    OLD_NAMES: ClassVar[dict[str, str | None]] = {}
    RETIRED: ClassVar[dict[str, Any]] = {}
    seed: int = 0

    def __post_init__(self) -> None:
        for name, group_cls in self.groups().items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _group_from_dict(type(self), name, group_cls, value))

    @classmethod
    def groups(cls) -> dict[str, type]:
        """The nested groups: field name -> the group's dataclass (with this config's defaults)."""
        out = {}
        for f in fields(cls):
            if f.default_factory is not MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
                if is_dataclass(default):
                    out[f.name] = type(default)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditorConfig:
        """The config a dict describes: nested (`to_dict()`), or flat as stored before the
        grouping (old names mapped by `OLD_NAMES`, retired toggles checked by `RETIRED`)."""
        return cls._build(d, legacy=True)

    @classmethod
    def from_settings(cls, d: dict[str, Any]) -> EditorConfig:
        """The config `--set` / `--config` settings describe (dotted names already nested):
        only the current names; an old flat name is one error naming its new one."""
        return cls._build(d, legacy=False)

    @classmethod
    def _build(cls, d: dict[str, Any], legacy: bool) -> EditorConfig:
        # "device": configs saved before the setting was removed carry device="cpu" (it was
        # never read); any other value asks for something editors do not do
        if d.get("device", "cpu") != "cpu":
            raise ValueError(f"{cls.__name__}: device is not an editor setting: an editor edits the model where "
                             "it is loaded (--device / KEDIT_DEVICE)")
        names = {f.name for f in fields(cls)}
        groups = cls.groups()
        nested: dict[str, Any] = {}
        for key, value in d.items():
            if key in ("method", "device"):
                continue
            is_old = key in cls.OLD_NAMES and not (key in groups and isinstance(value, dict))
            if key in cls.RETIRED:
                kept = cls.RETIRED[key]
                if value != kept:
                    raise ValueError(f"{cls.__name__}: {key} is retired (docs/editing.md, \"Retired settings\"): "
                                     f"only {json.dumps(kept)} is kept, got {json.dumps(value, default=str)}")
                if not legacy:
                    raise ValueError(f"{cls.__name__}: {key} is retired (docs/editing.md, \"Retired settings\"); "
                                     "drop the setting")
                continue
            if is_old:
                new = cls.OLD_NAMES[key]
                if not legacy:
                    hint = f"it is now {new}" if new else "it was never read by this method"
                    raise ValueError(f"{cls.__name__}: {key} is an old name: {hint} (settings are grouped, docs/editing.md)")
                if new is None:
                    continue
                group, _, sub = new.partition(".")
                nested.setdefault(group, {})[sub] = value
                continue
            if key in groups:
                if not isinstance(value, dict):
                    raise ValueError(f"{cls.__name__}: {key} is a group of settings ({key}.NAME=VALUE), got {value!r}")
                nested.setdefault(key, {}).update(value)
            else:
                nested[key] = value
        if legacy:
            nested = cls.as_stored(d, nested)
        unknown = set(nested) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: (_group_from_dict(cls, k, groups[k], v) if k in groups else v) for k, v in nested.items()})

    @classmethod
    def as_stored(cls, d: dict[str, Any], nested: dict[str, Any]) -> dict[str, Any]:
        """A stored config (`from_dict`) written before a setting existed: give that setting
        the value that reproduces what the config did then (a method whose defaults moved
        overrides this), so a version rebuilt from the ledger serves as it was applied."""
        return nested

    def stronger(self) -> EditorConfig:
        """Settings for a retry when a batch's own cases did not take (the gate uses this)."""
        return self


def _group_from_dict(owner: type, name: str, group_cls: type, d: dict[str, Any]) -> Any:
    """One group from its dict, over the group's own defaults; an unknown name is one error."""
    known = {f.name for f in fields(group_cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{owner.__name__}: unknown settings {sorted(f'{name}.{k}' for k in unknown)}; "
                         f"known in {name}: {sorted(known)}")
    hints = typing.get_type_hints(group_cls)
    for key, value in d.items():
        if not _fits(value, hints.get(key, Any)):
            raise ValueError(f"{owner.__name__}: {name}.{key} takes {_type_name(hints[key])}, got {value!r}")
    return group_cls(**d)


def _fits(value: Any, tp: Any) -> bool:
    """Whether a setting's value has its field's type, loosely: a number where a float is
    wanted, a list, tuple or comma string where a sequence is. Catches a word where a number belongs
    (`--set solve.l2=abc`) before it fails deep inside an edit; dataclasses do not check."""
    alternatives = _alternatives(tp)
    if len(alternatives) > 1:
        return any(_fits(value, arg) for arg in alternatives)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if typing.get_origin(tp) in (tuple, list) or tp in (tuple, list):  # (a group may split a comma string itself)
        return isinstance(value, (tuple, list, str))
    return True  # anything else is not checked here


def _type_name(tp: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in _alternatives(tp))


def _alternatives(tp: Any) -> tuple[Any, ...]:
    """The types a union (`int | None`, `Optional[int]`) allows; any other type alone."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


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
    def edit(self, lm: LoadedModel, cases: list[EditCase], config: EditorConfig | None = None) -> EditResult:
        """Apply `cases` to `lm` and return the result; the delta is already applied.

        `config` (of this editor's config class) is used for this one call instead of
        `self.config`, which stays as it is: the regression gate's retry edits with
        `editor.config.stronger()` this way."""

    def call_config(self, config: EditorConfig | None) -> EditorConfig:
        """The settings of one `edit` call: `config` when given, else the editor's own."""
        if config is None:
            return self.config
        if type(config) is not type(self.config):
            raise TypeError(f"{type(self).__name__}.edit: config must be a {type(self.config).__name__}, "
                            f"got a {type(config).__name__}")
        return config

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
        if result.info.get("settled"):
            raise RuntimeError("this batch was settled (its rollback records are gone); undo it through the "
                               "ledger's versions instead")
        if result.applied and not result.delta.is_empty:
            result.delta.revert(lm.model)
        result.applied = False

    def settle(self, result: EditResult) -> None:
        """`result` will not be undone through `rollback`: forget what undoing it would need.

        Why. An editor keeps a record per batch for an exact `rollback` (AlphaEdit: the
        batch's keys); a long stream or a backfill that never rolls back an accepted batch
        would otherwise hold every batch's record for the life of the process. Callers
        settle a batch once it is committed (a later undo goes through the ledger's
        versions) or when they never roll back; `rollback` refuses a settled batch."""
        result.info["settled"] = True

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
