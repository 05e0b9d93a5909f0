"""`kedit serve`, `kedit audit` and `kedit server ...`: serve the live model over HTTP,
check that what is served is what the ledger says, and drive a running server.

The commands only parse options and start things: the ledger-aware version loader is
flows/services/serving.py, the audit flows/services/audit.py, the HTTP app
kedit_core/serving/.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import typer

from flows.commands import DEVICE_OPTION, DTYPE_OPTION, MODEL_HELP
from kedit_core.serving import ADMIN_TOKEN_ENV, API_KEY_ENV, MAX_BODY_BYTES, MAX_PENDING

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- commands


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("audit")(audit)
    app.add_typer(_server_app(), name="server")


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

    from flows.services.serving import build_serving_state
    from kedit_core.atomic import clean_kedit_home
    from kedit_core.model import load_model
    from kedit_core.serving import create_app
    from storage.db import open_db

    token = _check_serve_options(host, no_admin, api_key, no_api_key, max_body_bytes, max_pending, device, dtype)
    db = open_db()
    clean_kedit_home(db.path.parent)  # temp files of writes a killed process left behind
    lm = load_model(model, device=device, dtype=dtype, show_progress=True)
    state = build_serving_state(lm, db, version, max_tokens_limit=max_tokens_limit)
    log.info("serving %s version %s (%s) on http://%s:%d/v1", state.model_name, state.version_id,
             state.tag, host, port)
    app = create_app(state, None if no_admin else token, api_key=api_key or None,
                     max_body_bytes=max_body_bytes, max_pending=max_pending)
    uvicorn.run(app, host=host, port=port, log_level="info")



def audit(
    server: Optional[str] = typer.Option(None, "--server", help="Audit the weights a running server holds."),
    model: str = typer.Option("smollm2", "--model", "-m", help=MODEL_HELP),
    version: Optional[list[int]] = typer.Option(None, "--version", help="Only these versions (local audit)."),
    device: Optional[str] = DEVICE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
) -> None:
    """Check served or stored weights against the ledger; exit 1 on any unexplained change."""
    from flows.services.audit import audit_ledger, audit_server
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

def _check_serve_options(host: str, no_admin: bool, api_key: str | None, no_api_key: bool, max_body_bytes: int,
                         max_pending: int, device: str | None, dtype: str | None) -> str | None:
    """Refuse a bad combination in one line before any model loads; returns the admin token."""
    from kedit_core.device import resolve
    from kedit_core.serving import check_admin_binding, check_inference_binding

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
    return token


def _server_app() -> typer.Typer:
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

    return server_app


def _echo(obj: Any) -> None:
    import json

    typer.echo(json.dumps(obj, indent=1, default=str))

