"""`kedit ask` and `kedit model ...`: load the current model version and use it."""
from __future__ import annotations

import json
from typing import Optional

import typer

from flows.commands import DEVICE_OPTION, DTYPE_OPTION, MODEL_HELP


def register(app: typer.Typer) -> None:
    model_app = typer.Typer(help="Inspect and prepare the model kedit edits.", no_args_is_help=True)

    @model_app.command("info")
    def info(
        model: str = typer.Option("smollm2", "--model", "-m", help=MODEL_HELP),
        device: Optional[str] = DEVICE_OPTION,
        dtype: Optional[str] = DTYPE_OPTION,
    ) -> None:
        """What is loaded: architecture, size, fingerprint, cache path, live version."""
        from flows.services.runtime import open_live_model
        from storage.db import open_if_exists

        live = open_live_model(model, db=open_if_exists(), read_only=True, device=device, dtype=dtype)
        summary = live.summary()
        for key, value in summary.items():
            typer.echo(f"{key:>20}: {value}")

    @model_app.command("prepare")
    def prepare() -> None:
        """De-quantise the embedded GGUF once and cache it as safetensors."""
        from kedit_core.model import build_embedded_cache

        path = build_embedded_cache(show_progress=True)
        typer.echo(f"embedded model cached at {path}")

    app.add_typer(model_app, name="model")

    @app.command("ask")
    def ask(
        question: str = typer.Argument(..., help="The question to answer."),
        model: str = typer.Option("smollm2", "--model", "-m", help=MODEL_HELP),
        version: Optional[int] = typer.Option(None, "--version", help="Model version (default: the live one)."),
        server: Optional[str] = typer.Option(None, "--server", help="Ask a running `kedit serve` at this URL instead."),
        max_new_tokens: int = typer.Option(48, help="Longest answer in tokens."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON object with the version used."),
        device: Optional[str] = DEVICE_OPTION,
        dtype: Optional[str] = DTYPE_OPTION,
    ) -> None:
        """Greedy answer from the current model version (or a given one)."""
        if server:
            from connectors.served import ServedModelClient

            text = ServedModelClient(server).ask(question, max_tokens=max_new_tokens)
            typer.echo(text)
            return
        from flows.services.runtime import open_live_model
        from kedit_core.device import resolve
        from kedit_core.errors import KeditError
        from storage import ledger
        from storage.db import default_db_path, open_if_exists

        resolve(device, dtype)
        db = open_if_exists()
        if version is not None and db is None:
            raise KeditError(f"model version {version}: there is no ledger at {default_db_path(create=False)} "
                             "(a pipeline run creates it; check KEDIT_DB / KEDIT_HOME)")
        if version is not None and ledger.get_version(db, version) is None:
            # checked before the model loads (tens of seconds), not after
            known = [int(v["version_id"]) for v in ledger.list_versions(db)]
            raise KeditError(f"model version {version} is not in the ledger {db.path} "
                             f"(it has {_ranges(known) if known else 'no versions'}; see kedit versions)")
        live = open_live_model(model, version=version, db=db, read_only=True, device=device, dtype=dtype)
        text = live.answer(question, max_new_tokens=max_new_tokens)
        if as_json:
            typer.echo(json.dumps({"answer": text, "version": live.version_id, "fingerprint": live.lm.fingerprint}))
        else:
            typer.echo(text)


def _ranges(ids: list[int]) -> str:
    """[1, 2, 3, 7] -> 'versions 1-3, 7'."""
    ids, parts = sorted(set(ids)), []
    for i in ids:
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return "versions " + ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in parts)
