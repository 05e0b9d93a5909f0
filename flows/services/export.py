"""`kedit export` as an application service: read a ledger version, rebuild its weights
through the runtime (`flows.services.runtime.rebuild_version`, the exact chain move) and write them
with `kedit_core.export` (the folder, the model card, the GGUF writer). The domain module
imports neither the ledger nor the runtime; this one does (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.services.runtime import rebuild_version
from kedit_core.atomic import atomic_folder
from kedit_core.export import (
    CARD,
    EXPORT_INFO,
    FORMATS,
    ExportError,
    ExportResult,
    check_gguf_supported,
    check_target,
    kedit_version,
    model_card,
    serving_features,
    write_hf,
)
from kedit_core.model import LoadedModel
from storage import ledger, report_queries

__all__ = ["ExportError", "ExportResult", "describe_version", "export_version"]


def export_version(
    version_id: int,
    out_dir: str | os.PathLike[str],
    db: Any,
    fmt: str = "hf",
    force: bool = False,
    spec: str | None = None,
    lm: LoadedModel | None = None,
    show_progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
) -> ExportResult:
    """Write ledger version `version_id` of `db` (a read-only handle) to `out_dir`.

    The base model is the version's recorded `base_spec` unless `spec` names another
    location of the same base (checked by fingerprint), or `lm` is an unedited loaded base
    (tests: in-memory models); `lm` is given back unedited. `device` / `dtype`: how the base
    is loaded (the dtype must be the one the version was edited in: it is part of the base's
    fingerprint)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out_dir).expanduser()
    check_target(out, force, db)
    row = ledger.get_version(db, version_id)
    if row is None:
        raise ExportError(f"model version {version_id} is not in the ledger {db.path} (see `kedit versions`)")
    chain = ledger.version_chain(db, version_id)
    if lm is None:
        from kedit_core.model import load_model

        lm = load_model(spec or chain[0]["base_spec"], device=device, dtype=dtype, show_progress=show_progress)
    if fmt == "gguf":
        check_gguf_supported(lm)
    deltas = _apply_chain(lm, db, version_id)
    try:
        info = describe_version(db, chain, lm)
        with atomic_folder(out) as tmp:
            if fmt == "hf":
                files = write_hf(lm, tmp)
            else:
                from kedit_core.export_gguf import write_gguf

                files = write_gguf(lm, tmp / "model.gguf")
            info["export"] = {
                "format": fmt,
                "files": files,
                "exported": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "kedit_version": kedit_version(),
                "weights_checked": "every tensor of the written file(s) equals the rebuilt version's, bit for bit",
            }
            (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1, default=str) + "\n")
            (tmp / CARD).write_text(model_card(info))
    finally:
        for delta in reversed(deltas):  # the caller's model goes back to its base, exactly
            if not delta.is_empty:
                delta.revert(lm.model)
    return ExportResult(path=out, version_id=version_id, format=fmt, files=files, n_cases=info["n_cases"],
                        chain=[int(r["version_id"]) for r in chain], relied_on=info["serving"]["not_carried"])


def _apply_chain(lm: LoadedModel, db: Any, version_id: int) -> list:
    """Bring the unedited `lm` to `version_id` (the runtime's exact rebuild; no gate is
    attached: the export needs the weights only)."""
    return rebuild_version(lm, db, version_id)


# --------------------------------------------------------------------------- what the version is


def describe_version(db: Any, chain: list[dict[str, Any]], lm: LoadedModel) -> dict[str, Any]:
    """Everything the model card states, from the ledger (read-only)."""
    versions = []
    for row in chain:
        note = ledger.version_note(row)
        versions.append({
            "version_id": int(row["version_id"]),
            "parent_id": None if row["parent_id"] is None else int(row["parent_id"]),
            "status": row["status"],
            "method": row["method"],
            "batch_id": row["batch_id"],
            "created": str(row["created"])[:19],
            "n_cases": note.get("n_cases"),
            "delta_sha256": row["delta_sha256"],
            "weights_fingerprint": row["weights_fingerprint"],
            "config": note.get("config") if isinstance(note.get("config"), dict) else None,
        })
    batch_ids = [v["batch_id"] for v in versions if v["batch_id"]]
    cases = report_queries.applied_cases(db, batch_ids)
    n_cases = sum(int(v["n_cases"] or 0) for v in versions[1:])
    target = versions[-1]
    return {
        "version": target["version_id"],
        "ledger": str(db.path),
        "base": {"spec": chain[0]["base_spec"], "fingerprint": chain[0]["base_fingerprint"],
                 "architecture": lm.arch, "n_params": sum(p.numel() for p in lm.model.parameters()),
                 "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", "")},
        "chain": versions,
        "n_cases": n_cases,
        "cases": cases,
        "metrics": report_queries.latest_metrics_by_version(db, [v["version_id"] for v in versions]),
        "serving": serving_features(versions),
    }
