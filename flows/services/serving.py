"""The served model's versions, as the ledger records them: what `kedit serve` loads.

The serving package (kedit_core/serving/) knows nothing about the ledger; this module gives
it a *version loader* that reads the ledger (version id -> delta chain with sha256s,
recorded weights fingerprint, memory-editor rewriter, the update gate to attach).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from flows.services.runtime import delta_refs, load_version_state, weight_editor_attach
from kedit_core.answer import PromptRewriter
from kedit_core.artifacts import state_path
from kedit_core.editors.base import EDITORS, available_editors, get_editor
from kedit_core.model import LoadedModel
from kedit_core.serving import VersionConflict, VersionNotFound, VersionPlan, ServingState
from storage import ledger
from storage.db import Database

RewriterFor = Callable[[dict[str, Any]], Optional[PromptRewriter]]


def memory_rewriter(db: Database, chain: list[dict[str, Any]]) -> PromptRewriter | None:
    """The prompt rewriter of the newest memory-editor version in the chain, if any.

    Restored from the editor state the pipeline saved with that version's batch (its
    config comes from the version's note). A memory version whose memory cannot be
    restored is refused: serving it without its memory would silently answer wrongly.
    """
    available_editors()  # registers the built-in methods
    for row in reversed(chain[1:]):
        cls = EDITORS.get(row.get("method") or "")
        if cls is None or not getattr(cls, "is_memory_editor", False):
            continue
        config = ledger.version_note(row).get("config")
        editor = get_editor(row["method"], config if isinstance(config, dict) else None)
        if not load_version_state(editor, row):
            path = state_path(row["base_fingerprint"], row["batch_id"]) if row.get("batch_id") else None
            raise VersionConflict(
                f"version {row['version_id']} was made by the memory editor {row['method']!r}, but its saved "
                f"memory ({path or 'no batch id'}) is missing, so it cannot be served"
            )
        return editor
    return None


def ledger_version_loader(
    db: Database, base_fingerprint: str, rewriter_for: RewriterFor | None = None
) -> tuple[Callable[[int], VersionPlan], Callable[[], list[dict[str, Any]]]]:
    """(loader, lister) for a ServingState, reading versions of one base from the ledger.

    `rewriter_for(version_row)` overrides how a version's prompt rewriter is found
    (tests and experiments); by default memory editors supply it (see `memory_rewriter`).
    """

    def load(version_id: int) -> VersionPlan:
        row = ledger.get_version(db, version_id)
        if row is None or row["base_fingerprint"] != base_fingerprint:
            raise VersionNotFound(f"model version {version_id} is not in the ledger for this base model",
                                  param="version_id")
        chain = ledger.version_chain(db, version_id)
        rewriter = rewriter_for(row) if rewriter_for is not None else memory_rewriter(db, chain)
        return VersionPlan(
            version_id=version_id,
            chain=delta_refs(chain),
            base_fingerprint=chain[0]["base_fingerprint"],
            weights_fingerprint=row["weights_fingerprint"],
            parent_id=row["parent_id"],
            rewriter=rewriter,
            info={k: row[k] for k in ("method", "status", "batch_id", "note")},
            attach=weight_editor_attach(chain),
        )

    def lister() -> list[dict[str, Any]]:
        return [{k: (str(v) if k == "created" else v) for k, v in r.items()}
                for r in ledger.list_versions(db, base_fingerprint)]

    return load, lister


def build_serving_state(
    lm: LoadedModel,
    db: Database,
    version: int | None = None,
    rewriter_for: RewriterFor | None = None,
    max_tokens_limit: int = 1024,
) -> ServingState:
    """A ServingState on an unedited `lm`, brought to `version` (default: the ledger's live one)."""
    base_id = ledger.ensure_base_version(db, lm.fingerprint, lm.spec)
    if version is None:
        row = ledger.live_version(db, lm.fingerprint)
        version = int(row["version_id"]) if row else base_id
    loader, lister = ledger_version_loader(db, lm.fingerprint, rewriter_for)
    return ServingState(lm, loader, version, lister, max_tokens_limit=max_tokens_limit)
