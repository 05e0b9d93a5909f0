"""`kedit compare`: one stream of edits through several methods, side by side (the logic
is `flows/services/comparison.py`, shared with the kedit-compare-methods flow)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from flows.commands import DEVICE_OPTION, DTYPE_OPTION, MODEL_HELP, WAIT_HELP
from flows.services.comparison import format_table, parse_methods, run_comparison


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare(
        methods: str = typer.Option("memit,alphaedit,lte,rag,ft", "--methods", help="Comma-separated methods (label=method to run one twice)."),
        data: str = typer.Option(..., "--data", help="Benchmark as KIND:PATH, e.g. zsre:data/benchmarks/zsre_mend_train_1k.json"),
        limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N cases."),
        batch_size: int = typer.Option(10, "--batch-size", help="Edits per batch."),
        model: str = typer.Option("smollm2", "--model", "-m", help=MODEL_HELP),
        settings: List[str] = typer.Option([], "--set", help="METHOD.key=value (repeatable), e.g. --set lte.steps=200"),
        per_batch: bool = typer.Option(False, "--per-batch", help="Score all edits so far after every batch too (slower)."),
        greedy: bool = typer.Option(True, "--greedy/--no-greedy", help="Also report greedy exact match."),
        output: Optional[Path] = typer.Option(None, "--output", help="Also write all results as JSON here."),
        markdown: bool = typer.Option(False, "--markdown", help="Print the table as Markdown."),
        wait: float = typer.Option(0.0, "--wait", help=WAIT_HELP),
        device: Optional[str] = DEVICE_OPTION,
        dtype: Optional[str] = DTYPE_OPTION,
    ) -> None:
        """Run the same edit stream through several methods and compare them side by side."""
        result = run_comparison(parse_methods(methods), settings, data, limit=limit, batch_size=batch_size,
                                model=model, per_batch=per_batch, greedy=greedy, output=output, lock_wait_s=wait,
                                device=device, dtype=dtype)
        typer.echo(format_table(result["rows"], markdown=markdown))
        typer.echo(f"run {result['run_id']}: {result['cases']} cases from {data}, batch size {batch_size}, model {model} "
                   f"({result['fingerprint'][:12]}); base restored after the last method: {result['restored']}; "
                   f"metrics in {result['ledger']}")
