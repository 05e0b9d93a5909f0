"""The live model: a base model plus the ledger's chain of deltas, as one object.

Used by the CLI, the flows and the server, so "answer a question with model version V"
means the same thing everywhere. Version N is rebuilt from the base by replaying the
stored deltas in order (each checked against its recorded sha256), which gives the same
weights bit for bit as the model that was live when N was made.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kedit_core.answer import PromptRewriter, answer, model_summary
from kedit_core.editors.base import WeightDelta
from kedit_core.errors import KeditError
from kedit_core.model import LoadedModel, load_model
from storage import ledger
from storage.db import Database, open_db


class VersionError(KeditError):
    """A model version cannot be loaded (unknown id, missing or tampered delta)."""


def delta_dir(base_fingerprint: str) -> Path:
    """Deltas live beside the ledger that records them (one ledger, one delta folder)."""
    from storage.db import default_db_path

    path = default_db_path().parent / "deltas" / base_fingerprint[:16]
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
    db: Database
    version_id: int
    base_version_id: int
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
        out["live_version"] = self.version_id
        out["ledger"] = str(self.db.path)
        return out


def weight_editor_attach(chain: list[dict[str, Any]]) -> Callable[[LoadedModel], None] | None:
    """How the newest weight-editor version in the chain wants the model served (its update
    gate, `Editor.attach`), rebuilt from the config in that version's note; None when no
    version in the chain was made by a weight editor."""
    from kedit_core.editors.base import EDITORS, available_editors, get_editor

    available_editors()
    for row in reversed(chain[1:]):
        cls = EDITORS.get(row.get("method") or "")
        if cls is None or getattr(cls, "is_memory_editor", False) or not row.get("delta_path"):
            continue
        config = ledger.version_note(row).get("config")
        return get_editor(row["method"], config if isinstance(config, dict) else None).attach
    return None


def attach_for_version(lm: LoadedModel, db: Database, version_id: int) -> None:
    """Serve version `version_id`'s edits as its weight editor meant (its update gate, if any)."""
    from kedit_core.editors.update_gate import serve_as

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
) -> LiveModel:
    """Load the base model and bring it to the live version (or `version`)."""
    db = db or open_db()
    lm = lm or load_model(spec, device=device, show_progress=True)
    base_id = ledger.ensure_base_version(db, lm.fingerprint, lm.spec)
    if version is None:
        row = ledger.live_version(db, lm.fingerprint)
        version = int(row["version_id"]) if row else base_id
    live = LiveModel(lm=lm, db=db, version_id=base_id, base_version_id=base_id)
    live.rebuild_to(version)
    return live
