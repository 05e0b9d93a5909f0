"""`kedit publish DIR`: the live version into another engine's model folder, and the engine told (flows/services/publish.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.commands import DB_HELP, DEVICE_OPTION, DTYPE_OPTION


def register(app: typer.Typer) -> None:
    @app.command("publish")
    def publish(
        out_dir: Path = typer.Argument(..., help="The engine's model folder (llama-server --models-dir DIR)."),
        version: Optional[int] = typer.Option(None, "--version", help="The version to publish (default: the live one)."),
        fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp) or hf (vLLM, TGI: a Hugging Face folder)."),
        name: str = typer.Option("kedit-live", "--name", help="The model's name in the engine (DIR/NAME links to the version)."),
        llama_server: Optional[str] = typer.Option(None, "--llama-server",
                                                   help="A llama.cpp router's URL: unload and load NAME there."),
        command: Optional[str] = typer.Option(None, "--command",
                                              help="Shell command run after each new version (e.g. a process manager's restart)."),
        keep: int = typer.Option(2, "--keep", help="Published versions kept in DIR/versions (older ones removed)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Where the base model is (default: as the ledger recorded it)."),
        db_path: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        device: Optional[str] = DEVICE_OPTION,
        dtype: Optional[str] = DTYPE_OPTION,
    ) -> None:
        """Export the live version where another engine serves from, and tell the engine; again
        for the same version only re-announces what the engine did not take."""
        from flows.services.publish import publish_version
        from storage.db import open_db

        db = open_db(db_path, create=False)  # read-only: publishing never writes the ledger
        res = publish_version(out_dir, db, version_id=version, fmt=fmt.lower(), name=name, llama_server=llama_server,
                              command=command, keep=keep, spec=model, device=device, dtype=dtype)
        what = "exported" if res.exported else "already there:"
        typer.echo(f"{what} version {res.version_id} -> {res.folder}; {res.link} now points to it")
        for target, outcome in res.notified.items():
            typer.echo(f"  {target}: {outcome}")
        if res.removed:
            typer.echo(f"  removed older versions: {', '.join(f'v{v}' for v in res.removed)}")
        if not res.ok:
            raise typer.Exit(1)  # the engine did not take it: the next publish announces it again
