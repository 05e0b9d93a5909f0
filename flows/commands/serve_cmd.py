"""`kedit serve`, `kedit audit` and `kedit server ...`: serve the live model over HTTP,
check that what is served is what the ledger says, and drive a running server.

The serving app lives in kedit_core/serving/ and knows nothing about the ledger; this
module gives it a *version loader* that reads the ledger (version id -> delta chain with
sha256s, recorded weights fingerprint, memory-editor rewriter).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import typer

from flows.commands import DEVICE_OPTION, DTYPE_OPTION, MODEL_HELP
from flows.services.runtime import delta_refs, load_version_state, weight_editor_attach
from kedit_core.answer import PromptRewriter
from kedit_core.artifacts import state_path
from kedit_core.editors.base import EDITORS, available_editors, get_editor
from kedit_core.model import LoadedModel, fingerprint_model
from kedit_core.serving import (
    ADMIN_TOKEN_ENV,
    API_KEY_ENV,
    MAX_BODY_BYTES,
    MAX_PENDING,
    VersionConflict,
    VersionNotFound,
    VersionPlan,
    ServingState,
)
from kedit_core.weights import ChainState, DeltaIntegrityError, move_to_chain
from storage import ledger
from storage.db import Database

log = logging.getLogger(__name__)

RewriterFor = Callable[[dict[str, Any]], Optional[PromptRewriter]]


# --------------------------------------------------------------------------- ledger -> plans


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


# --------------------------------------------------------------------------- audit


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


# --------------------------------------------------------------------------- commands


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        host: str = typer.Option("127.0.0.1", help="Address to bind (non-loopback needs KEDIT_ADMIN_TOKEN and an API key)."),
        port: int = typer.Option(8000, help="Port to listen on."),
        model: str = typer.Option("smollm2", "--model", "-m", help=MODEL_HELP),
        version: Optional[int] = typer.Option(None, "--version", help="Version to serve (default: the live one)."),
        no_admin: bool = typer.Option(False, "--no-admin", help="Serve without the admin API."),
        max_tokens_limit: int = typer.Option(1024, help="Largest max_tokens a request may ask for."),
        api_key: Optional[str] = typer.Option(
            None, "--api-key", envvar=API_KEY_ENV, show_envvar=True,
            help="Bearer token the inference endpoints (/v1/...) require; required on a non-loopback address."),
        no_api_key: bool = typer.Option(False, "--no-api-key",
                                        help="Serve inference without a token even on a public address (on purpose)."),
        max_body_bytes: int = typer.Option(MAX_BODY_BYTES, help="Largest request body; a larger one is refused (413)."),
        max_pending: int = typer.Option(MAX_PENDING, help="Generation requests in flight or queued at most; "
                                                          "one more is answered 429 with Retry-After."),
        device: Optional[str] = DEVICE_OPTION,
        dtype: Optional[str] = DTYPE_OPTION,
    ) -> None:
        """Serve the live model version with the OpenAI API shape (hot swaps via the admin API)."""
        import uvicorn

        from kedit_core.atomic import clean_kedit_home
        from kedit_core.device import resolve
        from kedit_core.model import load_model
        from kedit_core.serving import check_admin_binding, check_inference_binding, create_app
        from storage.db import open_db

        resolve(device, dtype)  # a missing device is one line before anything else
        token = os.environ.get(ADMIN_TOKEN_ENV) or None
        check_admin_binding(host, token, admin_enabled=not no_admin)
        if no_api_key and api_key:
            raise typer.BadParameter("give --api-key or --no-api-key, not both")
        check_inference_binding(host, api_key, require=False if no_api_key else None)
        if max_body_bytes < 1 or max_pending < 1:
            raise typer.BadParameter("--max-body-bytes and --max-pending must be at least 1")
        if not no_admin and not token:
            log.warning("admin API disabled: set %s to enable version loading and rollback", ADMIN_TOKEN_ENV)
        db = open_db()
        clean_kedit_home(db.path.parent)  # temp files of writes a killed process left behind
        lm = load_model(model, device=device, dtype=dtype, show_progress=True)
        state = build_serving_state(lm, db, version, max_tokens_limit=max_tokens_limit)
        log.info("serving %s version %s (%s) on http://%s:%d/v1", state.model_name, state.version_id,
                 state.tag, host, port)
        app = create_app(state, None if no_admin else token, api_key=api_key or None,
                         max_body_bytes=max_body_bytes, max_pending=max_pending)
        uvicorn.run(app, host=host, port=port, log_level="info")

    @app.command("audit")
    def audit(
        server: Optional[str] = typer.Option(None, "--server", help="Audit the weights a running server holds."),
        model: str = typer.Option("smollm2", "--model", "-m", help=MODEL_HELP),
        version: Optional[list[int]] = typer.Option(None, "--version", help="Only these versions (local audit)."),
        device: Optional[str] = DEVICE_OPTION,
        dtype: Optional[str] = DTYPE_OPTION,
    ) -> None:
        """Check served or stored weights against the ledger; exit 1 on any unexplained change."""
        from kedit_core.model import load_model
        from storage.db import open_db

        db = open_db(create=False)  # an audit only reads the ledger
        if server:
            from connectors.served import ServedModelClient

            findings = audit_server(ServedModelClient(server), db,
                                    rebuild_model=lambda spec: load_model(spec, device=device, dtype=dtype,
                                                                          show_progress=False))
        else:
            findings = audit_ledger(load_model(model, device=device, dtype=dtype, show_progress=True), db,
                                    version or None)
        for f in findings:
            typer.echo(f.line())
        problems = [f for f in findings if f.is_problem]
        typer.echo(f"{len(findings)} checked, {len(problems)} problem(s)")
        if problems:
            raise typer.Exit(1)

    server_app = typer.Typer(help="Drive a running `kedit serve` (needs KEDIT_ADMIN_TOKEN).", no_args_is_help=True)
    url_opt = typer.Option("http://127.0.0.1:8000", "--server", help="Server URL.")

    def _client(url: str):
        from connectors.served import ServedModelClient

        return ServedModelClient(url)

    @server_app.command("status")
    def status(server: str = url_opt) -> None:
        """What the server serves now and its rollback history."""
        _echo(_client(server).versions())

    @server_app.command("load")
    def load(version_id: int = typer.Argument(...), server: str = url_opt) -> None:
        """Serve VERSION_ID from now on (sha256 and fingerprint checked by the server)."""
        _echo(_client(server).load_version(version_id))

    @server_app.command("rollback")
    def rollback(server: str = url_opt) -> None:
        """Go back to the version served before the current one."""
        _echo(_client(server).rollback())

    app.add_typer(server_app, name="server")


def _echo(obj: Any) -> None:
    import json

    typer.echo(json.dumps(obj, indent=1, default=str))


__all__ = ["audit_ledger", "audit_server", "build_serving_state", "ledger_version_loader"]
