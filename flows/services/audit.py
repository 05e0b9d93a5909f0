"""`kedit audit`: do the weights (stored deltas rebuilt, or a running server's) match what
the ledger recorded for each version?"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from flows.services.runtime import delta_refs
from kedit_core.model import LoadedModel, fingerprint_model
from kedit_core.weights import ChainState, DeltaIntegrityError, move_to_chain
from storage import ledger
from storage.db import Database


@dataclass
class Finding:
    version_id: int | None
    status: str  # ok | unrecorded | mismatch | tampered | unknown
    detail: str
    weights: str | None = None  # the fingerprint the audit found, when it computed one

    @property
    def is_problem(self) -> bool:
        return self.status not in ("ok",)

    def line(self) -> str:
        who = f"version {self.version_id}" if self.version_id is not None else "model"
        return f"{self.status.upper():>10}  {who}: {self.detail}"


def audit_ledger(lm: LoadedModel, db: Database, versions: list[int] | None = None) -> list[Finding]:
    """Rebuild every version of `lm`'s base from the stored deltas and compare each with the
    ledger: delta files must match their sha256 and the weights their recorded fingerprint.

    `lm` must be the unedited base; it is returned to the base weights exactly afterwards.
    """
    findings: list[Finding] = []
    fresh = fingerprint_model(lm.model)
    if fresh != lm.fingerprint:
        findings.append(Finding(None, "mismatch", f"base weights hash to {fresh[:12]}, not the {lm.fingerprint[:12]} "
                                                  "recorded when the model files were first read"))
    rows = ledger.list_versions(db, lm.fingerprint)
    if not rows:
        return findings + [Finding(None, "unknown", f"the ledger has no versions of base {lm.fingerprint[:12]}")]
    wanted = set(versions) if versions else None
    applied = ChainState()
    try:
        for row in rows:
            vid = int(row["version_id"])
            if wanted is not None and vid not in wanted:
                continue
            try:
                move_to_chain(lm.model, applied, delta_refs(ledger.version_chain(db, vid)))
            except DeltaIntegrityError as exc:
                findings.append(Finding(vid, "tampered", str(exc)))
                continue
            fp = fingerprint_model(lm.model)
            recorded = row["weights_fingerprint"]
            if recorded is None:
                findings.append(Finding(vid, "unrecorded", f"rebuilds to {fp[:12]}; the ledger recorded no fingerprint", fp))
            elif recorded != fp:
                findings.append(Finding(vid, "mismatch", f"rebuilds to {fp[:12]}, the ledger recorded {recorded[:12]}", fp))
            else:
                findings.append(Finding(vid, "ok", f"weights {fp[:12]} as recorded ({row['status']})", fp))
    finally:
        move_to_chain(lm.model, applied, [])  # back to the base, bit for bit
    return findings


def audit_server(client: Any, db: Database, rebuild_model: Callable[[str], LoadedModel] | None = None) -> list[Finding]:
    """Compare the weights a server holds right now with the ledger's record of its version.

    When the ledger recorded no fingerprint for that version, the version is rebuilt
    locally (`rebuild_model(base_spec)` gives an unedited base) and that is compared.
    """
    served = client.fingerprint()
    vid = int(served["version_id"])
    fp = served["weights_fingerprint"]
    row = ledger.get_version(db, vid)
    if row is None:
        return [Finding(vid, "unknown", f"the server serves version {vid}, which this ledger does not have")]
    findings = []
    if served.get("base_fingerprint") and served["base_fingerprint"] != row["base_fingerprint"]:
        findings.append(Finding(vid, "mismatch", f"served base {served['base_fingerprint'][:12]} is not the ledger's "
                                                 f"{row['base_fingerprint'][:12]}"))
    recorded = row["weights_fingerprint"]
    source = "recorded in the ledger"
    if recorded is None and rebuild_model is not None:
        lm = rebuild_model(row["base_spec"])
        local = {f.version_id: f for f in audit_ledger(lm, db, [vid])}
        got = local.get(vid)
        if got is None or got.weights is None:
            return findings + [got or Finding(vid, "unknown", "could not rebuild the version locally")]
        recorded = got.weights
        source = "rebuilt locally from the ledger's deltas"
    if recorded is None:
        return findings + [Finding(vid, "unrecorded", f"served weights {fp[:12]}; the ledger recorded no fingerprint")]
    if fp != recorded:
        findings.append(Finding(vid, "mismatch", f"SERVED weights {fp[:12]} differ from {recorded[:12]} {source}: "
                                                 "the model was changed outside the pipeline"))
    elif served.get("changed_since_load"):
        findings.append(Finding(vid, "mismatch", "served weights changed since the server loaded them"))
    else:
        findings.append(Finding(vid, "ok", f"served weights {fp[:12]} match {source}"))
    return findings
