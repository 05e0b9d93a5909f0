"""`kedit evaluate`'s service: one editor over a benchmark stream, metrics into the ledger.

The stream itself (batches, scoring, timing) is the domain's `kedit_core.stream.run_stream`;
this module reads the benchmark file, records the run and its metrics in the ledger, and
turns the result into the JSON summary the command prints.
"""
from __future__ import annotations

import uuid
from typing import Any

from connectors.benchmarks import ReadReport, read_dataset
from kedit_core.editors.base import Editor
from kedit_core.errors import KeditError
from kedit_core.model import LoadedModel, load_model
from kedit_core.stream import StreamResult, run_stream
from storage.db import open_db
from storage.ledger import finish_run, record_metrics, start_run


def evaluate_benchmark(editor: Editor, data: str, *, model: str = "smollm2", limit: int | None = None,
                       batch_size: int = 10, per_batch: bool = False, greedy: bool = True, record: bool = True,
                       device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Edit the benchmark `data` (KIND:PATH) in batches with `editor`; the summary as a dict."""
    if batch_size < 1:
        raise KeditError(f"--batch-size must be >= 1, got {batch_size}")
    report = ReadReport(path=data)
    cases = read_dataset(data, limit=limit, report=report)
    if not cases:
        raise KeditError(f"{data}: no usable cases")
    lm = load_model(model, device=device, dtype=dtype)
    method = editor.name
    run_id = f"evaluate-{method}-{uuid.uuid4().hex[:8]}"
    run = _LedgerRun(run_id, method, lm) if record else None
    if run is not None:
        run.start({"method": method, "data": data, "limit": limit, "batch_size": batch_size,
                   "config": editor.config.to_dict()})
    try:
        result = run_stream(lm, editor, cases, batch_size=batch_size, eval_each_batch=per_batch, greedy=greedy,
                            on_batch=run.record_batch if run is not None else None)
    except BaseException:
        if run is not None:
            run.finish("failed")
        raise
    if run is not None:
        run.record({**result.metrics, "seconds_per_edit": result.seconds_per_edit}, len(result.batches) - 1)
        run.finish("done")
    return _summary(result, run_id, method, data, model, lm, len(report.skipped), batch_size)


class _LedgerRun:
    """The evaluate run's rows in the ledger: the run, each batch's metrics, the final ones."""

    def __init__(self, run_id: str, method: str, lm: LoadedModel) -> None:
        self.run_id, self.method, self.fingerprint = run_id, method, lm.fingerprint
        self.db = open_db()

    def start(self, params: dict[str, Any]) -> None:
        start_run(self.db, self.run_id, "evaluate", params, self.fingerprint)

    def record(self, values: dict[str, float], step: int) -> None:
        record_metrics(self.db, values, run_id=self.run_id, method=self.method, step=step,
                       model_fingerprint=self.fingerprint)

    def record_batch(self, rec: Any) -> None:
        self.record({**rec.metrics, "seconds": rec.seconds}, rec.index)

    def finish(self, status: str) -> None:
        finish_run(self.db, self.run_id, status)


def _summary(result: StreamResult, run_id: str, method: str, data: str, model: str, lm: LoadedModel,
             skipped: int, batch_size: int) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "method": method,
        "data": data,
        "model": model,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "fingerprint": result.fingerprint,
        "n_cases": result.n_cases,
        "skipped_records": skipped,
        "batch_size": batch_size,
        "metrics": result.metrics,
        "seconds_per_edit": result.seconds_per_edit,
        "edits_per_minute": result.edits_per_minute,
        "seconds_total": result.seconds_total,
        "peak_rss_mb": result.peak_rss_mb,
        "hyperparameters": result.config,
        "batches": [{"index": b.index, "seconds": b.seconds, **b.metrics, **b.info} for b in result.batches],
    }
