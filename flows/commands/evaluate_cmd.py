"""`kedit evaluate`: run a sequential stream of edits from a benchmark file and report the
field's metrics (efficacy, paraphrase, locality, retention of the first batch), speed and
the model fingerprint; JSON to stdout and optionally to a file; metrics into the ledger
(the work: flows/services/evaluation.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from flows.commands import CONFIG_OPTION, DEVICE_OPTION, DTYPE_OPTION, MODEL_HELP, with_config
from kedit_core.editor_settings import editor_from_settings


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


def evaluate(
    method: str = typer.Option("alphaedit", "--method", help="Editing method (any registered editor)."),
    data: str = typer.Option(..., "--data", help="Benchmark as KIND:PATH, e.g. zsre:data/benchmarks/zsre_mend_train_1k.json"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N cases."),
    batch_size: int = typer.Option(10, "--batch-size", help="Edits per batch."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write the JSON result here."),
    model: str = typer.Option("smollm2", "--model", "-m", help=MODEL_HELP),
    settings: List[str] = typer.Option([], "--set", help="Editor setting key=value (repeatable)."),
    config: Optional[Path] = CONFIG_OPTION,
    per_batch: bool = typer.Option(False, "--per-batch", help="Also score all edits so far after every batch."),
    greedy: bool = typer.Option(True, "--greedy/--no-greedy", help="Also report greedy exact match."),
    record: bool = typer.Option(True, "--record/--no-record", help="Write metrics to the DuckDB ledger."),
    device: Optional[str] = DEVICE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
) -> None:
    """Edit a benchmark stream in batches on one model and print the metrics as JSON."""
    from flows.services.evaluation import evaluate_benchmark
    from kedit_core.device import resolve

    resolve(device, dtype)  # a missing device is one line before the data is read
    editor = editor_from_settings(method, with_config(config, method, settings))
    summary = evaluate_benchmark(editor, data, model=model, limit=limit, batch_size=batch_size,
                                 per_batch=per_batch, greedy=greedy, record=record, device=device, dtype=dtype)
    text = json.dumps(summary, indent=2, default=str)
    typer.echo(text)
    if output is not None:
        from kedit_core.atomic import atomic_write_text

        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, text + "\n")
