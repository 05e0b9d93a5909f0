"""The live model: a base model plus the ledger's chain of deltas, as one object.

Used by the CLI, the flows and the server, so "answer a question with model version V"
means the same thing everywhere. Version N is rebuilt from the base by replaying the
stored deltas in order (each checked against its recorded sha256), which gives the same
weights bit for bit as the model that was live when N was made.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    lm: LoadedModel
    db: Database
    version_id: int
    base_version_id: int
    applied: list[WeightDelta] = field(default_factory=list)
    rewriter: PromptRewriter | None = None

    def answer(self, question: str, max_new_tokens: int = 48) -> str:
        return answer(self.lm, question, rewriter=self.rewriter, max_new_tokens=max_new_tokens)

    def summary(self) -> dict[str, Any]:
        out = model_summary(self.lm)
        out["live_version"] = self.version_id
        out["ledger"] = str(self.db.path)
        return out


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
    """Apply the deltas from the base up to `version_id` to an unedited `lm`, in order."""
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
    applied = rebuild_version(lm, db, version)
    return LiveModel(lm=lm, db=db, version_id=version, base_version_id=base_id, applied=applied)
