"""`kedit versions` and `kedit rollback`: the ledger's model versions, and undoing some for good."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.commands import DB_HELP, WAIT_HELP


def register(app: typer.Typer) -> None:
    @app.command("versions")
    def versions(db_path: Optional[Path] = typer.Option(None, "--db", help=DB_HELP)) -> None:
        """Every model version in the ledger: parent, status, method, batch and its size."""
        from storage import ledger
        from storage.db import open_db

        rows = ledger.list_versions(open_db(db_path, create=False))  # read-only: never creates a ledger
        typer.echo(f"{'version':>7} {'parent':>6}  {'status':<11} {'method':<10} {'cases':>5}  {'created':<19}  batch")
        for v in rows:
            n_cases = ledger.version_note(v).get("n_cases")
            parent = "" if v["parent_id"] is None else v["parent_id"]
            typer.echo(f"{v['version_id']:>7} {parent:>6}  {v['status']:<11} {v['method'] or '':<10} "
                       f"{n_cases if n_cases is not None else '':>5}  {str(v['created'])[:19]:<19}  {v['batch_id'] or ''}")

    @app.command("rollback")
    def rollback(
        version: int = typer.Argument(..., help="The version to make live again (an ancestor of the live one)."),
        reason: str = typer.Option(..., "--reason", help="Why: recorded on every batch and case it undoes."),
        db_path: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        wait: float = typer.Option(0.0, "--wait", help=WAIT_HELP),
    ) -> None:
        """Make an earlier version live again; later versions' cases are rejected and never re-applied."""
        from storage import ledger
        from storage.db import open_db
        from storage.lock import ledger_lock

        db = open_db(db_path)
        with ledger_lock(db.path, "rollback", wait_s=wait):  # not under a running pipeline's batches
            undone = ledger.roll_back_to(db, version, reason)
        if not undone:
            typer.echo(f"version {version} is already live: nothing rolled back")
            return
        for v in undone:
            typer.echo(f"rolled back version {v['version_id']} ({v['method']}, batch {v['batch_id']})")
        typer.echo(f"version {version} is live. A running `kedit serve` keeps its weights until "
                   f"`kedit server load {version}`; the next pipeline run edits on top of version {version}.")
