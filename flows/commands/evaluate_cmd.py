"""`kedit evaluate`: run a sequential stream of edits from a benchmark file and report the
field's metrics (efficacy, paraphrase, locality, retention of the first batch), speed and
the model fingerprint; JSON to stdout and optionally to a file; metrics into the ledger."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import List, Optional

import typer

from flows.commands import CONFIG_OPTION, DEVICE_OPTION, DTYPE_OPTION, MODEL_HELP, with_config
from kedit_core.editor_settings import editor_from_settings


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
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
        from connectors.benchmarks import ReadReport, read_dataset
        from kedit_core.device import resolve
        from kedit_core.errors import KeditError
        from kedit_core.model import load_model
        from kedit_core.stream import run_stream

        resolve(device, dtype)  # a missing device is one line before the data is read
        if batch_size < 1:
            raise KeditError(f"--batch-size must be >= 1, got {batch_size}")
        editor = editor_from_settings(method, with_config(config, method, settings))
        report = ReadReport(path=data)
        cases = read_dataset(data, limit=limit, report=report)
        if not cases:
            raise KeditError(f"{data}: no usable cases")
        lm = load_model(model, device=device, dtype=dtype)
        run_id = f"evaluate-{method}-{uuid.uuid4().hex[:8]}"
        db = None
        if record:
            from storage.db import open_db
            from storage.ledger import finish_run, start_run

            db = open_db()
            start_run(db, run_id, "evaluate", {"method": method, "data": data, "limit": limit,
                                               "batch_size": batch_size, "config": editor.config.to_dict()}, lm.fingerprint)

        def on_batch(rec) -> None:
            if db is not None:
                from storage.ledger import record_metrics

                record_metrics(db, {**rec.metrics, "seconds": rec.seconds}, run_id=run_id, method=method,
                               step=rec.index, model_fingerprint=lm.fingerprint)

        try:
            result = run_stream(lm, editor, cases, batch_size=batch_size, eval_each_batch=per_batch,
                                greedy=greedy, on_batch=on_batch)
        except BaseException:
            if db is not None:
                finish_run(db, run_id, "failed")
            raise
        summary = {
            "run_id": run_id,
            "method": method,
            "data": data,
            "model": model,
            "device": str(lm.device),
            "dtype": str(lm.dtype).removeprefix("torch."),
            "fingerprint": result.fingerprint,
            "n_cases": result.n_cases,
            "skipped_records": len(report.skipped),
            "batch_size": batch_size,
            "metrics": result.metrics,
            "seconds_per_edit": result.seconds_per_edit,
            "edits_per_minute": result.edits_per_minute,
            "seconds_total": result.seconds_total,
            "peak_rss_mb": result.peak_rss_mb,
            "hyperparameters": result.config,
            "batches": [{"index": b.index, "seconds": b.seconds, **b.metrics, **b.info} for b in result.batches],
        }
        if db is not None:
            from storage.ledger import record_metrics

            record_metrics(db, {**result.metrics, "seconds_per_edit": result.seconds_per_edit}, run_id=run_id,
                           method=method, step=len(result.batches) - 1, model_fingerprint=lm.fingerprint)
            finish_run(db, run_id, "done")
        text = json.dumps(summary, indent=2, default=str)
        typer.echo(text)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            from kedit_core.atomic import atomic_write_text

            atomic_write_text(output, text + "\n")
