"""`kedit quarantine list|release|reject`: act on the fact changes ingestion held back.

A quarantined change (profanity, keyboard mash, a mass change by a new account) is never
applied on its own. `release` sends it on: the next run makes an edit case of it. `reject`
keeps it out for good. Every decision is recorded in the ledger with who decided and why
(`storage/quarantine_store.py`); `list --all` shows them.
"""
from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any, List, Optional

import typer

from flows.commands import DB_HELP, WAIT_HELP

BY_HELP = "Who decides (recorded with the decision; default: $KEDIT_OPERATOR, else the login name)."


def _operator() -> str:
    try:
        return os.environ.get("KEDIT_OPERATOR") or getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return "unknown"


def _value(v: dict[str, Any] | None, labels: dict[str, str | None]) -> str:
    from flows.commands.diff_cmd import render_value

    if v is None:
        return "-"
    if "id" in v:
        label = labels.get(v["id"])
        return f"{label} ({v['id']})" if label else str(v["id"])
    if "text" in v:
        return repr(v["text"])
    return render_value(v)


def format_rows(db, rows: list[dict[str, Any]]) -> list[str]:
    from storage import wikidata_store

    ids = [v["id"] for r in rows for v in (r["old_value"], r["new_value"]) if v and "id" in v]
    labels = wikidata_store.get_labels(db, ids)
    out = []
    for r in rows:
        subject = f"{r['subject_label']} ({r['subject']})" if r["subject_label"] else r["subject"]
        out.append(f"{r['change_id']}  {subject}  {r['property']}  {r['kind']}  "
                   f"{_value(r['old_value'], labels)} -> {_value(r['new_value'], labels)}")
        when = str(r["timestamp"])[:19] if r["timestamp"] else "?"
        held = r["quarantine_reason"] if r["decision"] else r["reason"]
        out.append(f"    revision {r['revid']} by {r['user_name'] or '?'} at {when}: {held}")
        if r["decision"]:
            out.append(f"    {r['decision']} by {r['decided_by']} at {str(r['decided'])[:19]}: {r['decision_reason']}"
                       f" (status now: {r['status']})")
    return out


def register(app: typer.Typer) -> None:
    quarantine_app = typer.Typer(help="Fact changes held back for a human: list, release or reject them.",
                                 no_args_is_help=True)

    @quarantine_app.command("list")
    def list_(
        all_: bool = typer.Option(False, "--all", help="Also the changes already released or rejected, with the decision."),
        db_path: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
    ) -> None:
        """The changes in quarantine: id, subject, property, old -> new value, the revision and why it is held."""
        from storage import quarantine_store
        from storage.db import open_db

        db = open_db(db_path, create=False)  # read-only: never creates a ledger
        rows = quarantine_store.quarantined(db, decided=all_)
        held = sum(r["status"] == "quarantined" for r in rows)
        typer.echo(f"{held} change{'s' if held != 1 else ''} in quarantine"
                   + (f", {len(rows) - held} decided" if all_ else "") + f" (ledger {db.path})")
        for line in format_rows(db, rows):
            typer.echo(line)
        if held:
            typer.echo("act on one: kedit quarantine release ID --reason TEXT | kedit quarantine reject ID --reason TEXT")

    def _decide(action: str, change_ids: list[str], reason: str, by: str | None, db_path: Path | None,
                wait: float) -> None:
        from storage import quarantine_store
        from storage.db import open_db
        from storage.lock import ledger_lock

        db = open_db(db_path)
        with ledger_lock(db.path, f"quarantine {action}", wait_s=wait):  # not under a running pipeline
            done = quarantine_store.decide(db, change_ids, action, by or _operator(), reason)
        for d in done:
            if d["decision"] == "released":
                typer.echo(f"released {d['change_id']}: the next run makes an edit case of it "
                           f"(it was held: {d['quarantine_reason']})")
            else:
                typer.echo(f"rejected {d['change_id']}: it is never applied (it was held: {d['quarantine_reason']})")

    @quarantine_app.command("release")
    def release(
        change_ids: List[str] = typer.Argument(..., help="Change ids from `kedit quarantine list` (or unique prefixes)."),
        reason: str = typer.Option(..., "--reason", help="Why it may be applied: recorded with the decision."),
        by: Optional[str] = typer.Option(None, "--by", help=BY_HELP),
        db_path: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        wait: float = typer.Option(0.0, "--wait", help=WAIT_HELP),
    ) -> None:
        """Let quarantined changes become edit cases on the next run."""
        _decide("release", change_ids, reason, by, db_path, wait)

    @quarantine_app.command("reject")
    def reject(
        change_ids: List[str] = typer.Argument(..., help="Change ids from `kedit quarantine list` (or unique prefixes)."),
        reason: str = typer.Option(..., "--reason", help="Why it is kept out: recorded with the decision."),
        by: Optional[str] = typer.Option(None, "--by", help=BY_HELP),
        db_path: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
        wait: float = typer.Option(0.0, "--wait", help=WAIT_HELP),
    ) -> None:
        """Keep quarantined changes out of the model for good."""
        _decide("reject", change_ids, reason, by, db_path, wait)

    app.add_typer(quarantine_app, name="quarantine")
