"""Moving a model's weights to a version, exactly: the one place weights are added to,
restored and replayed.

A version is the base weights plus an ordered chain of additive deltas (`WeightDelta`).
Exactness matters more than elegance here: rolling back a batch must restore the previous
weights bit for bit, and rebuilding version N from the base plus stored deltas must give
the live weights bit for bit. Float addition is not invertible ((w + d) - d != w in
general), so nothing here ever subtracts: undoing copies back an exact saved tensor, and
rebuilding replays the same additions in the same order (`add_delta`), which is
deterministic.

Two ways to hold weights, one addition rule:
- an editor applies one batch's delta and can revert it (`WeightDelta.apply`/`revert`,
  which keep the touched tensors' values from before);
- a long-lived model (the pipeline's live model, each of the server's model copies)
  carries a `ChainState`: which links of a chain are applied, and ONE base copy of every
  tensor any of them touched (keeping each delta's own undo copies would grow with every
  nightly batch). `move_to_chain` takes it from one chain to another.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kedit_core.artifacts import file_sha256
from kedit_core.atomic import atomic_target
from kedit_core.errors import KeditError

Params = dict[str, torch.nn.Parameter]


class DeltaIntegrityError(KeditError):
    """A stored delta is missing, has no recorded sha256, or is not the file recorded."""


class UnknownParameters(KeditError):
    """A delta names parameters the model does not have (it belongs to another model)."""


# --------------------------------------------------------------------------- the addition rule


@torch.no_grad()
def add_delta(params: Params, tensors: dict[str, torch.Tensor]) -> None:
    """W += delta for each named tensor, in sorted name order and in the parameter's own
    dtype and device: every apply and every replay goes through here, so replaying a chain
    gives the live weights bit for bit."""
    for name in sorted(tensors):
        p = params[name]
        p.add_(tensors[name].to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def copy_back(params: Params, originals: dict[str, torch.Tensor]) -> None:
    """Put saved exact values back (the only way weights are ever undone)."""
    for name, original in originals.items():
        params[name].copy_(original)


def _check_names(params: Params, names: Any) -> list[str]:
    return sorted({n for n in names if n not in params})


# --------------------------------------------------------------------------- one delta


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
        """Add the delta in place, keeping exact copies of the touched tensors for `revert`.

        The delta's tensors are first cast to their parameters' dtype (what `add_delta` adds
        anyway), so a delta saved after it was applied stores exactly the tensors that were
        added, in the model's dtype: a bfloat16 model's deltas are bfloat16, and replaying
        them from the ledger gives the served weights bit for bit."""
        if self._saved is not None:
            raise RuntimeError("delta is already applied to a model; revert it first")
        params = dict(model.named_parameters())
        missing = _check_names(params, self.tensors)
        if missing:
            raise KeyError(f"delta names parameters the model does not have: {missing}")
        if any(t.dtype != params[n].dtype for n, t in self.tensors.items()):
            self.tensors = {n: t.to(dtype=params[n].dtype) for n, t in self.tensors.items()}
        self._saved = {n: params[n].detach().clone() for n in sorted(self.tensors)}
        add_delta(params, self.tensors)

    @torch.no_grad()
    def revert(self, model: torch.nn.Module) -> None:
        """Restore the exact weights from before `apply`."""
        if self._saved is None:
            raise RuntimeError("delta was not applied through this object; rebuild from the ledger instead")
        copy_back(dict(model.named_parameters()), self._saved)
        self._saved = None

    def release(self) -> dict[str, torch.Tensor]:
        """Hand over the saved originals and forget them: the delta can no longer revert
        itself. A long-lived model keeps one copy of each touched tensor's base value
        (`ChainState.adopt`) instead of one copy per applied delta."""
        saved, self._saved = self._saved or {}, None
        return saved

    def save(self, path: str | Path) -> str:
        """Write as safetensors (never pickle); returns the file's sha256."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(path) as tmp:  # a crash mid-write never leaves a truncated delta under the real name
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()},
                str(tmp),
                metadata={"kedit_meta": json.dumps(self.meta, default=str)},
            )
        return file_sha256(path)

    @classmethod
    def load(cls, path: str | Path, expected_sha256: str | None = None) -> WeightDelta:
        path = Path(path)
        if expected_sha256 is not None:
            actual = file_sha256(path)
            if actual != expected_sha256:
                raise ValueError(f"delta {path} has sha256 {actual}, the ledger says {expected_sha256}: refusing it")
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kedit_meta", "{}"))
        return cls(tensors=tensors, meta=meta)


# --------------------------------------------------------------------------- a chain of deltas


@dataclass(frozen=True)
class DeltaRef:
    """One link of a version's chain: the stored delta and the sha256 the ledger recorded.

    `key` identifies the link (e.g. "v7") so two chains can share their common prefix.
    `path` is None for a link that changed no weights (a memory editor's version).
    """

    key: str
    path: str | None
    sha256: str | None


def read_delta(ref: DeltaRef) -> WeightDelta:
    """Load one chain link, refusing a file whose sha256 is not the recorded one."""
    if ref.path is None:
        return WeightDelta()
    if not ref.sha256:
        raise DeltaIntegrityError(f"delta {ref.key} ({ref.path}) has no recorded sha256: refusing to apply it")
    try:
        return WeightDelta.load(ref.path, expected_sha256=ref.sha256)
    except FileNotFoundError as exc:
        raise DeltaIntegrityError(f"delta {ref.key}: file {ref.path} is missing") from exc
    except ValueError as exc:  # sha256 mismatch
        raise DeltaIntegrityError(f"delta {ref.key}: {exc}") from exc


@dataclass
class ChainState:
    """Which chain links a model copy carries, and the base value of every parameter any of
    them touched (one copy of the touched tensors, however long the chain grows)."""

    links: list[DeltaRef] = field(default_factory=list)
    base: dict[str, torch.Tensor] = field(default_factory=dict)

    def adopt(self, delta: WeightDelta, ref: DeltaRef) -> None:
        """Count a delta already applied to the model (through `WeightDelta.apply`) as the
        next link, keeping its saved originals only where they are a first touch (= the base
        value) and freeing the rest."""
        for name, original in delta.release().items():
            self.base.setdefault(name, original)
        self.links.append(ref)

    @torch.no_grad()
    def restore_base(self, model: torch.nn.Module) -> None:
        """The exact base weights, no links applied."""
        copy_back(dict(model.named_parameters()), self.base)
        self.links = []

    @contextlib.contextmanager
    def at_base(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily the exact base weights; the current weights come back bit for bit."""
        params = dict(model.named_parameters())
        current = {n: params[n].detach().clone() for n in self.base}
        copy_back(params, self.base)
        try:
            yield
        finally:
            copy_back(params, current)


@torch.no_grad()
def move_to_chain(model: torch.nn.Module, state: ChainState, target: list[DeltaRef],
                  read: Callable[[DeltaRef], WeightDelta] = read_delta) -> None:
    """Take `model` from the chain in `state` to the chain `target`, exactly.

    When `target` extends the current chain (the usual case: a new nightly version) only
    the new links are applied. Otherwise the touched parameters are restored to their base
    values and the whole target chain is replayed, which is exactly what a rebuild from the
    ledger does. Every needed delta is read (`read`: by default sha-checked) first, so a
    missing or tampered file leaves the model as it was.
    """
    common = 0
    while common < min(len(state.links), len(target)) and state.links[common] == target[common]:
        common += 1
    start = common if common == len(state.links) else 0
    incoming = [(ref, read(ref)) for ref in target[start:]]
    params = dict(model.named_parameters())
    unknown = _check_names(params, (n for _, d in incoming for n in d.tensors))
    if unknown:
        raise UnknownParameters(f"a delta names parameters the model does not have: {unknown[:5]}")
    if start == 0 and state.links:
        state.restore_base(model)
    for ref, delta in incoming:
        for name in delta.tensors:  # first touch: keep the base value
            if name not in state.base:
                state.base[name] = params[name].detach().clone()
        add_delta(params, delta.tensors)
        state.links.append(ref)
