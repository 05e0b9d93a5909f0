"""`kedit report`: the drift report (terminal summary, optional self-contained HTML)."""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

import typer

from flows.commands import DB_HELP
from kedit_core.errors import KeditError


class ReportError(KeditError):
    """The report cannot be made as asked (bad date, unwritable file)."""


def parse_since(text: str | None) -> datetime | None:
    """An ISO date or date-time (UTC), or 'Nd' for N days ago."""
    if not text:
        return None
    t = text.strip()
    if t.endswith("d") and t[:-1].isdigit():
        try:
            return datetime.utcnow() - timedelta(days=int(t[:-1]))
        except (OverflowError, ValueError):
            raise ReportError(f"--since {text!r} reaches before year 1: give fewer days or a date") from None
    try:
        return datetime.fromisoformat(t).replace(tzinfo=None)
    except ValueError:
        raise ReportError(f"--since {text!r} is not a date: use YYYY-MM-DD, YYYY-MM-DDTHH:MM or Nd (N days ago)")


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        since: Optional[str] = typer.Option(None, "--since", help="Only data from this date on (YYYY-MM-DD or Nd)."),
        html_file: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML report here."),
        db_path: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
    ) -> None:
        """Drift report: versions, edits applied/rejected/quarantined, each metric now vs base vs last week."""
        from kedit_core.report import render_html, terminal_summary
        from storage.db import open_db
        from storage.report_queries import collect_report

        from kedit_core.atomic import atomic_write_text

        start = parse_since(since)  # a bad date fails before the ledger is opened
        if html_file is not None and html_file.is_dir():
            raise ReportError(f"--html {html_file} is a directory: give a file name")
        data = collect_report(open_db(db_path, create=False), start)  # read-only: never creates a ledger
        typer.echo(terminal_summary(data))
        if html_file is not None:
            try:
                html_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(html_file, render_html(data))  # a reader never sees half a report
            except OSError as exc:
                raise ReportError(f"cannot write {html_file}: {exc}") from exc
            typer.echo(f"HTML report written to {html_file}")
