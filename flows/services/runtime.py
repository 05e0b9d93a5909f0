"""The live model: a base model plus the ledger's chain of deltas, as one object.

Used by the CLI, the flows and the server, so "answer a question with model version V"
means the same thing everywhere. Version N is rebuilt from the base by replaying the
stored deltas in order (each checked against its recorded sha256), which gives the same
weights bit for bit as the model that was live when N was made.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kedit_core.answer import PromptRewriter, answer, model_summary
from kedit_core.artifacts import file_sha256, load_editor_state, state_path
from kedit_core.editors.base import EDITORS, available_editors, get_editor
from kedit_core.editors.update_gate import serve_as
from kedit_core.errors import KeditError
from kedit_core.model import LoadedModel, load_model
from kedit_core.routing import installed_update_gate
from kedit_core.weights import ChainState, DeltaRef, UnknownParameters, WeightDelta, move_to_chain
from storage import ledger
from storage.db import Database, open_db

class VersionError(KeditError):
    """A model version cannot be loaded (unknown id, missing or tampered delta)."""


@dataclass
class LiveModel:
    """The base model with the ledger's deltas applied.

    Memory stays flat however many versions accumulate: `weights` (a `ChainState`) keeps
    ONE copy of the base value of every tensor any applied delta touched (captured before
    the first change), and applied deltas drop their own saved copies. `at_base()` uses it
    to measure the unedited model without reloading it.
    """

    lm: LoadedModel
    db: Database | None  # None: no ledger (a read-only look at the unedited base)
    version_id: int | None  # None: the base, which no ledger has recorded yet
    base_version_id: int | None
    rewriter: PromptRewriter | None = None
    weights: ChainState = field(default_factory=ChainState, repr=False)

    def record_applied(self, delta: WeightDelta, link: DeltaRef | None = None) -> None:
        """Keep an applied delta (already applied to the model) as part of the live version.
        `link`: the delta as the ledger recorded it (`ledger_link`), so a later `rebuild_to`
        that extends this chain applies only the new links; without one, the next rebuild
        replays the whole chain from the base."""
        self.weights.adopt(delta, link or DeltaRef(f"unrecorded-{len(self.weights.links)}", None, None))

    def restore_base(self) -> None:
        """Put the base weights back exactly and forget the applied deltas."""
        self.weights.restore_base(self.lm.model)

    def rebuild_to(self, version_id: int) -> None:
        """Put the model exactly at ledger version `version_id` (base weights, then its deltas;
        only the missing deltas when the model already holds a prefix of its chain)."""
        chain = checked_chain(self.db, version_id, self.lm.fingerprint)
        rows = {link.key: row for link, row in zip(delta_refs(chain), chain[1:])}
        try:
            move_to_chain(self.lm.model, self.weights, delta_refs(chain), read=lambda link: load_delta(rows[link.key]))
        except UnknownParameters as exc:
            raise VersionError(f"version {version_id}: {exc}") from exc
        serve_as(self.lm, weight_editor_attach(chain))
        self.version_id = version_id

    def at_base(self) -> contextlib.AbstractContextManager[None]:
        """Temporarily the exact base weights (e.g. to freeze a regression suite); the live
        weights come back bit for bit afterwards."""
        return self.weights.at_base(self.lm.model)

    def answer(self, question: str, max_new_tokens: int = 48) -> str:
        return answer(self.lm, question, rewriter=self.rewriter, max_new_tokens=max_new_tokens)

    def summary(self) -> dict[str, Any]:
        out = model_summary(self.lm)
        out["live_version"] = self.version_id if self.version_id is not None else "none (unedited base)"
        out["ledger"] = str(self.db.path) if self.db is not None else "none"
        return out


def weight_editor_attach(chain: list[dict[str, Any]]) -> Callable[[LoadedModel], None] | None:
    """How the newest weight-editor version in the chain wants the model served (its update
    gate, `Editor.attach`), rebuilt from the config in that version's note; None when no
    version in the chain was made by a weight editor."""
    available_editors()
    for row in reversed(chain[1:]):
        cls = EDITORS.get(row.get("method") or "")
        if cls is None or getattr(cls, "is_memory_editor", False) or not row.get("delta_path"):
            continue
        config = ledger.version_note(row).get("config")
        editor = get_editor(row["method"], config if isinstance(config, dict) else None)
        load_version_state(editor, row)  # the facts its edit scope routes by
        return _attach_with_links(editor, chain)
    return None


def _attach_with_links(editor: Any, chain: list[dict[str, Any]]) -> Callable[[LoadedModel], None]:
    """`editor.attach`, then, for a per-batch update gate, the chain's links as its changes
    (each version's delta gated on its own; read only for links the gate has not factored)."""
    links = [(f"v{row['version_id']}:{row.get('delta_sha256')}", lambda row=row: load_delta(row).tensors)
             for row in chain[1:] if row.get("delta_path")]

    def attach(lm: LoadedModel) -> None:
        editor.attach(lm)
        gate = installed_update_gate(lm)
        if gate is not None and gate.per_batch:
            gate.load_links(links)

    return attach


def load_version_state(editor: Any, row: dict[str, Any]) -> bool:
    """Load into `editor` the state saved with version `row`'s batch, if one was saved."""
    path = state_path(row["base_fingerprint"], row["batch_id"]) if row.get("batch_id") else None
    if path is None or not path.exists():
        return False
    check_state_sha(path, row)
    method, state = load_editor_state(path)
    if method != row.get("method"):
        return False
    editor.load_state_dict(state)
    return True


def load_delta(row: dict[str, Any]) -> WeightDelta:
    if not row.get("delta_path"):
        return WeightDelta()
    path = Path(row["delta_path"])
    if not path.exists():
        raise VersionError(f"version {row['version_id']}: delta file {path} is missing")
    try:
        return WeightDelta.load(path, expected_sha256=row["delta_sha256"])
    except ValueError as exc:
        raise VersionError(f"version {row['version_id']}: {exc}") from exc


def ledger_link(version_id: int, delta_path: str | None, delta_sha256: str | None) -> DeltaRef:
    """A ledger version as one link of a delta chain (the key is what two chains compare)."""
    return DeltaRef(key=f"v{version_id}", path=delta_path or None, sha256=delta_sha256)


def delta_refs(chain: list[dict[str, Any]]) -> list[DeltaRef]:
    """The links after the base row of a ledger chain."""
    return [ledger_link(r["version_id"], r["delta_path"], r["delta_sha256"]) for r in chain[1:]]


def checked_chain(db: Database, version_id: int, base_fingerprint: str) -> list[dict[str, Any]]:
    """The ledger rows from the base up to `version_id`, refused unless they belong to the
    loaded base model."""
    try:
        chain = ledger.version_chain(db, version_id)
    except KeyError as exc:
        raise VersionError(str(exc)) from exc
    if chain[0]["base_fingerprint"] != base_fingerprint:
        raise VersionError(
            f"version {version_id} belongs to base {chain[0]['base_fingerprint'][:12]}, "
            f"not the loaded model {base_fingerprint[:12]} (the fingerprint covers the weights' dtype: "
            "load the base with the --dtype it was edited in)"
        )
    return chain


def rebuild_version(lm: LoadedModel, db: Database, version_id: int) -> list[WeightDelta]:
    """Apply the deltas from the base up to `version_id` to an unedited `lm`, in order.

    The returned deltas still hold their saved originals (revert them in reverse order to
    get the base back, as the export does)."""
    applied = []
    for row in checked_chain(db, version_id, lm.fingerprint)[1:]:
        delta = load_delta(row)
        if not delta.is_empty:
            delta.apply(lm.model)
        applied.append(delta)
    return applied


def open_live_model(
    spec: str | None = "smollm2",
    version: int | None = None,
    db: Database | None = None,
    device: str | None = None,
    lm: LoadedModel | None = None,
    read_only: bool = False,
    dtype: str | None = None,
) -> LiveModel:
    """Load the base model and bring it to the live version (or `version`).

    `device` / `dtype` (names; default KEDIT_DEVICE / KEDIT_DTYPE, else cpu / float32): where
    the base is loaded and its weights' type. The ledger knows a base by its fingerprint,
    which covers the dtype: a bfloat16 load has its own version chain.

    A writer (the pipeline, the server) records the base as version 0 of its chain the first
    time it sees it. `read_only=True` (`kedit ask`, `kedit model info`) writes nothing: `db`
    is a read-only handle or None (no ledger yet), and a base the ledger has never seen is
    answered as the unedited base with no version number."""
    if read_only:
        lm = lm or load_model(spec, device=device, dtype=dtype, show_progress=True)
        row = ledger.live_version(db, lm.fingerprint) if db is not None else None
        if row is None:
            if version is not None:
                where = f"the ledger {db.path}" if db is not None else "any ledger (there is none yet)"
                raise VersionError(f"model version {version} of base {lm.fingerprint[:12]} is not in {where}")
            return LiveModel(lm=lm, db=db, version_id=None, base_version_id=None)
        base_id = int(ledger.version_chain(db, int(row["version_id"]))[0]["version_id"])
    else:
        db = db or open_db()
        lm = lm or load_model(spec, device=device, dtype=dtype, show_progress=True)
        base_id = ledger.ensure_base_version(db, lm.fingerprint, lm.spec)
        row = ledger.live_version(db, lm.fingerprint)
    if version is None:
        version = int(row["version_id"]) if row else base_id
    live = LiveModel(lm=lm, db=db, version_id=base_id, base_version_id=base_id)
    live.rebuild_to(version)
    return live


# --------------------------------------------------------------------------- editor state files
# (the file format and paths are in kedit_core/artifacts.py; which file a version's
# note vouches for is the ledger's business, here)


def check_state_sha(path: Path, row: dict[str, Any]) -> None:
    """Refuse a state file that is not the one saved with the version: a changed AlphaEdit
    key store would silently weaken the protection of every earlier edit. (Versions saved
    before the hash was recorded carry none and are not checked.)"""
    expected = ledger.version_note(row).get("state_sha256")
    actual = file_sha256(path) if expected else None
    if actual != expected:
        raise KeditError(
            f"editor state {path} has sha256 {actual}, version {row['version_id']} recorded "
            f"{expected}: refusing to use it (restore the file, or roll the version back)"
        )
