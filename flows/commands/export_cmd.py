"""`kedit export VERSION DIR`: a ledger version's weights as a standard folder (flows/services/export.py, kedit_core/export.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.commands import DB_HELP, DEVICE_OPTION, DTYPE_OPTION


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        version: int = typer.Argument(..., help="The ledger version to export (see `kedit versions`)."),
        out_dir: Path = typer.Argument(..., help="The folder to write (new or empty; --force replaces its contents)."),
        fmt: str = typer.Option("hf", "--format", help="hf: Hugging Face folder (safetensors); gguf: model.gguf (llama architectures)."),
        force: bool = typer.Option(False, "--force", help="Replace a non-empty DIR."),
        model: Optional[str] = typer.Option(None, "--model", "-m",
                                            help="Where the base model is (default: the spec the ledger recorded for it; checked by fingerprint)."),
        db_path: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        device: Optional[str] = DEVICE_OPTION,
        dtype: Optional[str] = DTYPE_OPTION,
    ) -> None:
        """Write a version's weights (base + its deltas, bit for bit) with a model card; the ledger is only read."""
        from flows.services.export import export_version
        from storage.db import open_db

        db = open_db(db_path, create=False)  # read-only: an export never writes the ledger
        res = export_version(version, out_dir, db, fmt=fmt.lower(), force=force, spec=model, device=device, dtype=dtype)
        typer.echo(f"exported version {res.version_id} (chain {' -> '.join(map(str, res.chain))}, "
                   f"{res.n_cases} edit cases) to {res.path} [{res.format}]")
        for name, sha in res.files.items():
            typer.echo(f"  {name}  sha256 {sha}")
        typer.echo(f"  model card: {res.path / 'README.md'}")
        if res.relied_on:
            typer.echo(f"note: kedit serves this version with {', '.join(res.relied_on)}; the exported weights "
                       "carry none of it (see the model card)")
