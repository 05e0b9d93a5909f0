"""The live model: a base model plus the ledger's chain of deltas, as one object.

Used by the CLI, the flows and the server, so "answer a question with model version V"
means the same thing everywhere. Version N is rebuilt from the base by replaying the
stored deltas in order (each checked against its recorded sha256), which gives the same
weights bit for bit as the model that was live when N was made.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kedit_core.answer import PromptRewriter, answer, model_summary
from kedit_core.atomic import atomic_target
from kedit_core.editors.base import EDITORS, WeightDelta, available_editors, file_sha256, get_editor
from kedit_core.editors.update_gate import serve_as
from kedit_core.errors import KeditError
from kedit_core.model import LoadedModel, load_model
from storage import ledger
from storage.db import Database, default_db_path, open_db


class VersionError(KeditError):
    """A model version cannot be loaded (unknown id, missing or tampered delta)."""


def delta_dir(base_fingerprint: str, create: bool = True) -> Path:
    """Deltas live beside the ledger that records them (one ledger, one delta folder).
    Readers pass `create=False`: looking a file up must not make folders."""
    path = default_db_path(create=create).parent / "deltas" / base_fingerprint[:16]
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class LiveModel:
    """The base model with the ledger's deltas applied.

    Memory stays flat however many versions accumulate: `base_originals` keeps ONE copy of
    the base value of every tensor any applied delta touched (captured before the first
    change), and applied deltas drop their own saved copies. `at_base()` uses it to
    measure the unedited model without reloading it.
    """

    lm: LoadedModel
    db: Database | None  # None: no ledger (a read-only look at the unedited base)
    version_id: int | None  # None: the base, which no ledger has recorded yet
    base_version_id: int | None
    applied: list[WeightDelta] = field(default_factory=list)
    rewriter: PromptRewriter | None = None
    base_originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def record_applied(self, delta: WeightDelta) -> None:
        """Keep an applied delta (already applied to the model) as part of the live version."""
        for name, original in delta.release().items():
            self.base_originals.setdefault(name, original)  # first touch = base value
        self.applied.append(delta)

    @torch.no_grad()
    def restore_base(self) -> None:
        """Put the base weights back exactly and forget the applied deltas."""
        params = dict(self.lm.model.named_parameters())
        for name, original in self.base_originals.items():
            params[name].copy_(original)
        self.base_originals.clear()
        self.applied = []

    def rebuild_to(self, version_id: int) -> None:
        """Put the model exactly at ledger version `version_id` (base weights, then its deltas)."""
        self.restore_base()
        for delta in rebuild_version(self.lm, self.db, version_id):
            self.record_applied(delta)
        attach_for_version(self.lm, self.db, version_id)
        self.version_id = version_id

    @contextlib.contextmanager
    def at_base(self) -> Iterator[None]:
        """Temporarily the exact base weights (e.g. to freeze a regression suite); the live
        weights come back bit for bit afterwards."""
        params = dict(self.lm.model.named_parameters())
        current = {n: params[n].detach().clone() for n in self.base_originals}
        with torch.no_grad():
            for name, original in self.base_originals.items():
                params[name].copy_(original)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in current.items():
                    params[name].copy_(value)

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
        return editor.attach
    return None


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


def attach_for_version(lm: LoadedModel, db: Database, version_id: int) -> None:
    """Serve version `version_id`'s edits as its weight editor meant (its update gate, if any)."""
    serve_as(lm, weight_editor_attach(ledger.version_chain(db, version_id)))


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


def rebuild_version(lm: LoadedModel, db: Database, version_id: int) -> list[WeightDelta]:
    """Apply the deltas from the base up to `version_id` to an unedited `lm`, in order.

    The returned deltas still hold their saved originals; hand them to
    `LiveModel.record_applied` (which keeps one base copy per tensor and frees the rest)."""
    try:
        chain = ledger.version_chain(db, version_id)
    except KeyError as exc:
        raise VersionError(str(exc)) from exc
    if chain[0]["base_fingerprint"] != lm.fingerprint:
        raise VersionError(
            f"version {version_id} belongs to base {chain[0]['base_fingerprint'][:12]}, "
            f"not the loaded model {lm.fingerprint[:12]}"
        )
    applied = []
    for row in chain[1:]:
        delta = load_delta(row)
        if not delta.is_empty:
            delta.apply(lm.model)
        applied.append(delta)
    return applied


def open_live_model(
    spec: str | None = "smollm2",
    version: int | None = None,
    db: Database | None = None,
    device: str = "cpu",
    lm: LoadedModel | None = None,
    read_only: bool = False,
) -> LiveModel:
    """Load the base model and bring it to the live version (or `version`).

    A writer (the pipeline, the server) records the base as version 0 of its chain the first
    time it sees it. `read_only=True` (`kedit ask`, `kedit model info`) writes nothing: `db`
    is a read-only handle or None (no ledger yet), and a base the ledger has never seen is
    answered as the unedited base with no version number."""
    if read_only:
        lm = lm or load_model(spec, device=device, show_progress=True)
        row = ledger.live_version(db, lm.fingerprint) if db is not None else None
        if row is None:
            if version is not None:
                where = f"the ledger {db.path}" if db is not None else "any ledger (there is none yet)"
                raise VersionError(f"model version {version} of base {lm.fingerprint[:12]} is not in {where}")
            return LiveModel(lm=lm, db=db, version_id=None, base_version_id=None)
        base_id = int(ledger.version_chain(db, int(row["version_id"]))[0]["version_id"])
    else:
        db = db or open_db()
        lm = lm or load_model(spec, device=device, show_progress=True)
        base_id = ledger.ensure_base_version(db, lm.fingerprint, lm.spec)
        row = ledger.live_version(db, lm.fingerprint)
    if version is None:
        version = int(row["version_id"]) if row else base_id
    live = LiveModel(lm=lm, db=db, version_id=base_id, base_version_id=base_id)
    live.rebuild_to(version)
    return live


# --------------------------------------------------------------------------- editor state files
# (beside the deltas: the pipeline writes them, the server and `kedit ask` read them)


def state_path(base_fingerprint: str, batch_id: str) -> Path:
    """Where an editor's sequential state after `batch_id` is kept (beside the delta).
    Only the path: the writer (`save_editor_state`) makes the folder."""
    return delta_dir(base_fingerprint, create=False) / f"{batch_id}.state.safetensors"


def save_editor_state(state: dict[str, Any], path: Path, method: str) -> str:
    """Tensors go into safetensors under their path in the dict; everything else into a
    JSON skeleton in the metadata, with {"__tensor__": key} where a tensor was. Returns the
    file's sha256 (recorded in the version's note and checked when the state is restored)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def strip(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj.detach().to("cpu").contiguous()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {str(k): strip(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [strip(v, f"{key}/{i}") for i, v in enumerate(obj)]
        return obj

    skeleton = strip(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata={"method": method, "skeleton": json.dumps(skeleton)})
    return file_sha256(path)


def load_editor_state(path: Path) -> tuple[str, dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def fill(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                return tensors[obj["__tensor__"]]
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fill(v) for v in obj]
        return obj

    return meta.get("method", ""), fill(json.loads(meta.get("skeleton", "{}")))


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
