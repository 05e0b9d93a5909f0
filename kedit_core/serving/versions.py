"""Versions and slots: what a served version is made of, and swapping it while requests
are in flight.

`VersionPlan` describes a version (the base plus an ordered chain of stored deltas, an
optional prompt rewriter for memory editors, the ledger's recorded weights fingerprint).
The flows side supplies a *version loader* (version id -> plan) because kedit_core never
speaks SQL. The weights are moved along the chain by `kedit_core.weights.move_to_chain`.

`ServingState` keeps at most two copies of the model ("slots"). Requests lease the current
slot; a swap builds the new version on the idle slot (waiting until no request still holds
it), checks its fingerprint, then flips the reference under a lock. A request is therefore
answered wholly by one version, and no request waits for or fails during a swap.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kedit_core.answer import PromptRewriter
from kedit_core.editors.update_gate import serve_as
from kedit_core.errors import KeditError
from kedit_core.model import LoadedModel, fingerprint_model
from kedit_core.serving.errors import ServingError, VersionConflict, VersionIntegrityError, VersionNotFound
from kedit_core.weights import ChainState, DeltaIntegrityError, DeltaRef, UnknownParameters, move_to_chain

log = logging.getLogger(__name__)


@dataclass
class VersionPlan:
    """Everything needed to serve one version, as the version loader describes it."""

    version_id: int
    chain: list[DeltaRef] = field(default_factory=list)  # from the base up to this version, in order
    base_fingerprint: str | None = None
    weights_fingerprint: str | None = None  # recorded by the ledger; checked after building
    parent_id: int | None = None
    rewriter: PromptRewriter | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # Prepares the model as the version's weight editor serves its edits (installs or
    # removes the update gate: `Editor.attach`); None = the plain weights, no gate.
    attach: Callable[[LoadedModel], None] | None = None


VersionLoader = Callable[[int], VersionPlan]
VersionLister = Callable[[], list[dict[str, Any]]]


def version_tag(version_id: int, weights_fingerprint: str) -> str:
    """The `system_fingerprint` every response carries: which version produced it."""
    return f"kedit-v{version_id}-{weights_fingerprint[:12]}"


@dataclass
class _Slot:
    """One copy of the model and the chain of deltas currently applied to it."""

    lm: LoadedModel
    chain: ChainState = field(default_factory=ChainState)
    version_id: int | None = None
    weights_fingerprint: str = ""
    rewriter: PromptRewriter | None = None
    plan: VersionPlan | None = None
    leases: int = 0


@dataclass(frozen=True)
class Lease:
    """A request's hold on one version; the weights cannot change until it is released."""

    lm: LoadedModel
    version_id: int
    weights_fingerprint: str
    rewriter: PromptRewriter | None
    _slot: _Slot

    @property
    def tag(self) -> str:
        return version_tag(self.version_id, self.weights_fingerprint)


class ServingState:
    """The served model: the current version, swappable while requests are in flight.

    `lm` must hold the unedited base weights; the state brings it to `version_id` (or
    serves it as-is as version 0 when no loader is given). At most two model copies
    exist: the one being served and, after the first swap, the previous one, which makes
    a rollback to the previous version a pointer flip.
    """

    def __init__(
        self,
        lm: LoadedModel,
        version_loader: VersionLoader | None = None,
        version_id: int | None = None,
        version_lister: VersionLister | None = None,
        model_name: str | None = None,
        max_tokens_limit: int = 1024,
    ) -> None:
        self.loader = version_loader
        self.lister = version_lister
        self.model_name = model_name or lm.spec
        self.max_tokens_limit = max_tokens_limit
        self.created = int(time.time())
        self._cond = threading.Condition()  # guards _current, leases, _history
        self._swap_lock = threading.Lock()  # one swap at a time
        self._history: list[int] = []  # versions served before the current one (rollback stack)
        self.swaps = 0
        first = _Slot(lm=lm)
        if version_loader is None:
            first.version_id = version_id or 0
            first.weights_fingerprint = fingerprint_model(lm.model)
        else:
            if version_id is None:
                raise ValueError("ServingState: give the version to serve along with the version loader")
            plan = self._plan(version_id)
            self._build(first, plan)
        self._slots = [first]
        self._current = first

    # ------------------------------------------------------------------ reading

    @contextmanager
    def lease(self) -> Iterator[Lease]:
        held = self.acquire()
        try:
            yield held
        finally:
            self.release(held)

    def acquire(self) -> Lease:
        with self._cond:
            slot = self._current
            slot.leases += 1
            return Lease(slot.lm, slot.version_id, slot.weights_fingerprint, slot.rewriter, slot)

    def release(self, held: Lease) -> None:
        with self._cond:
            held._slot.leases -= 1
            self._cond.notify_all()

    @property
    def version_id(self) -> int:
        with self._cond:
            return self._current.version_id

    @property
    def weights_fingerprint(self) -> str:
        with self._cond:
            return self._current.weights_fingerprint

    @property
    def tag(self) -> str:
        with self._cond:
            return version_tag(self._current.version_id, self._current.weights_fingerprint)

    def describe(self) -> dict[str, Any]:
        with self._cond:
            cur = self._current
            return {
                "model": self.model_name,
                "version_id": cur.version_id,
                "weights_fingerprint": cur.weights_fingerprint,
                "system_fingerprint": version_tag(cur.version_id, cur.weights_fingerprint),
                "base_fingerprint": cur.lm.fingerprint,
                "memory_rewriter": type(cur.rewriter).__name__ if cur.rewriter is not None else None,
                "history": list(self._history),
                "copies_in_memory": len(self._slots),
                "swaps": self.swaps,
                "in_flight": sum(s.leases for s in self._slots),
            }

    def current_fingerprint(self) -> dict[str, Any]:
        """Hash the weights being served *now* (not a cached value: this is what audits read)."""
        with self.lease() as held:
            actual = fingerprint_model(held.lm.model)
            plan = held._slot.plan
            return {
                "version_id": held.version_id,
                "weights_fingerprint": actual,
                "fingerprint_at_load": held.weights_fingerprint,
                "recorded_fingerprint": plan.weights_fingerprint if plan else None,
                "base_fingerprint": held.lm.fingerprint,
                "changed_since_load": actual != held.weights_fingerprint,
            }

    def list_versions(self) -> list[dict[str, Any]]:
        return self.lister() if self.lister is not None else []

    # ------------------------------------------------------------------ swapping

    def load_version(self, version_id: int) -> dict[str, Any]:
        """Serve `version_id` from now on; requests in flight finish on the old weights."""
        with self._swap_lock:
            previous = self.version_id
            if previous == version_id:
                return {"version_id": version_id, "previous": previous, "changed": False, **self._timing(0.0)}
            t0 = time.perf_counter()
            self._switch(self._plan(version_id))
            with self._cond:
                self._history.append(previous)
            return {"version_id": version_id, "previous": previous, "changed": True,
                    **self._timing(time.perf_counter() - t0)}

    def rollback(self) -> dict[str, Any]:
        """Serve the version served before the current one (or, with no history, its parent)."""
        with self._swap_lock:
            with self._cond:
                previous = self._current.version_id
                from_history = bool(self._history)
                target = self._history[-1] if from_history else None
                plan = self._current.plan
            if target is None:
                if plan is None or plan.parent_id is None:
                    raise VersionConflict(f"version {previous} has no previous version to roll back to")
                target = plan.parent_id
            t0 = time.perf_counter()
            self._switch(self._plan(target))
            if from_history:
                with self._cond:
                    self._history.pop()
            return {"version_id": target, "previous": previous, "changed": True,
                    **self._timing(time.perf_counter() - t0)}

    def _timing(self, seconds: float) -> dict[str, Any]:
        return {"system_fingerprint": self.tag, "seconds": round(seconds, 4)}

    def _plan(self, version_id: int) -> VersionPlan:
        if self.loader is None:
            raise VersionConflict("this server was started without a version loader; it serves one fixed model")
        try:
            plan = self.loader(version_id)
        except ServingError:
            raise
        except (KeyError, LookupError) as exc:
            raise VersionNotFound(f"model version {version_id} is unknown: {exc}") from exc
        except KeditError as exc:
            raise VersionConflict(f"model version {version_id} cannot be loaded: {exc}") from exc
        if plan.version_id != version_id:
            raise VersionConflict(f"the version loader returned version {plan.version_id} for {version_id}")
        return plan

    def _switch(self, plan: VersionPlan) -> None:
        with self._cond:
            idle = next((s for s in self._slots if s is not self._current), None)
            current = self._current
        if idle is None:
            # The second copy, made once. Deep-copying while requests read the model is
            # safe: nothing writes to the current slot's tensors.
            lm_copy, chain_copy = copy.deepcopy((current.lm, current.chain))
            idle = _Slot(lm=lm_copy, chain=chain_copy, version_id=current.version_id,
                         weights_fingerprint=current.weights_fingerprint, rewriter=current.rewriter, plan=current.plan)
            with self._cond:
                self._slots.append(idle)
        with self._cond:
            # Requests that started on this copy before the previous swap must finish first.
            self._cond.wait_for(lambda: idle.leases == 0)
        # When the idle copy already holds this version (a rollback right after a swap)
        # the chain walk is empty and only the fingerprint is re-checked.
        self._build(idle, plan)
        with self._cond:
            self._current = idle
            self.swaps += 1
        log.info("now serving version %s (%s)", plan.version_id, idle.weights_fingerprint[:12])

    def _build(self, slot: _Slot, plan: VersionPlan) -> None:
        if plan.base_fingerprint and plan.base_fingerprint != slot.lm.fingerprint:
            raise VersionConflict(
                f"version {plan.version_id} belongs to base {plan.base_fingerprint[:12]}, "
                f"not the served model {slot.lm.fingerprint[:12]}"
            )
        slot.version_id = None  # unknown until the build succeeds
        try:
            move_to_chain(slot.lm.model, slot.chain, plan.chain)
        except DeltaIntegrityError as exc:
            raise VersionIntegrityError(str(exc)) from exc
        except UnknownParameters as exc:
            raise VersionConflict(str(exc)) from exc
        serve_as(slot.lm, plan.attach)
        fp = fingerprint_model(slot.lm.model)
        slot.weights_fingerprint = fp
        if plan.weights_fingerprint and fp != plan.weights_fingerprint:
            raise VersionIntegrityError(
                f"version {plan.version_id} rebuilt to weights {fp[:12]}, the ledger recorded "
                f"{plan.weights_fingerprint[:12]}: refusing to serve it"
            )
        slot.version_id, slot.rewriter, slot.plan = plan.version_id, plan.rewriter, plan
