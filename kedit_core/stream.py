"""A sequential stream of edits on one model, measured the way the field measures lifelong
editing: batches are applied one after another to the same weights, and the metrics are
taken after the LAST batch (an edit that a later batch undid does not count).

- the unedited model's answers on locality probes are recorded before the first edit
  (`reference_predictions`), so locality is token agreement with the base model;
- efficacy / paraphrase / locality after the last batch are over every case that is still
  the latest edit of its fact (when a stream edits the same subject and relation twice,
  the later edit wins, `EditCase.fact_key`);
- retention is the efficacy of the first batch's (still-current) cases after the last batch;
- `immediate_efficacy_acc` / `immediate_paraphrase_acc` are each batch's efficacy and
  paraphrase right after it was applied, averaged: the gap between them and the final
  figures is what sequential editing forgets; `retention_paraphrase_acc` is the first
  batch's paraphrase after the last batch (erosion of generalisation, not just of the edit).
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from kedit_core.editors.base import Editor, EditResult
from kedit_core.model import LoadedModel
from kedit_core.types import EditCase

log = logging.getLogger(__name__)

FINAL_KINDS = ("efficacy", "paraphrase", "locality")
KEPT_KINDS = ("efficacy", "paraphrase")  # what retention measures on the first batch
# each batch's own figures right after it is applied (`immediate_*`)
IMMEDIATE = ("efficacy_acc", "paraphrase_acc", "served_efficacy", "served_paraphrase")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (tracemalloc does not see torch's allocations)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


@dataclass
class BatchRecord:
    index: int
    case_ids: list[str]
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamResult:
    method: str
    fingerprint: str
    n_cases: int
    batch_size: int
    metrics: dict[str, float]  # after the last batch, plus retention and immediate efficacy
    batches: list[BatchRecord]
    seconds_editing: float
    seconds_per_edit: float
    edits_per_minute: float
    seconds_total: float
    peak_rss_mb: float
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_stream(
    lm: LoadedModel,
    editor: Editor,
    cases: Sequence[EditCase],
    batch_size: int = 10,
    eval_each_batch: bool = False,
    greedy: bool = True,
    restore: bool = False,
    on_batch: Callable[[BatchRecord], None] | None = None,
    show_progress: bool = True,
) -> StreamResult:
    """Edit `cases` in order, `batch_size` at a time, then measure.

    `eval_each_batch` also scores all cases so far after every batch (slower; for curves).
    `restore=True` rolls every batch back at the end (exactly), leaving `lm` as it was.
    `on_batch` is called with each batch's record (the CLI writes metrics to the ledger).
    """
    from tqdm.auto import tqdm

    from kedit_core.evaluate import reference_predictions

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cases = list(cases)
    if not cases:
        raise ValueError("run_stream: no cases to edit")
    t_start = time.perf_counter()
    reference = reference_predictions(lm, cases)  # the unedited model, before any edit
    editor.attach(lm)  # e.g. a gate left on `lm` by an earlier method's stream comes off
    # Memory editors (retrieval, LTE) answer through their prompt rewriting, as served.
    rw = editor if editor.is_memory_editor else None
    batches = [cases[s : s + batch_size] for s in range(0, len(cases), batch_size)]
    records: list[BatchRecord] = []
    results: list[EditResult] = []
    editing = 0.0
    bar = tqdm(total=len(cases), desc=f"Editing ({editor.name})", unit="edit", disable=not show_progress)
    try:
        for b, batch in enumerate(batches):
            result, dt = _apply_batch(lm, editor, batch)
            editing += dt
            if restore:
                results.append(result)
            else:  # nothing will undo this batch: hold no copy of the old weights, no rollback record
                result.delta.release()
                editor.settle(result)
            rec = _batch_record(lm, b, batch, result, dt, rw)
            if eval_each_batch:
                rec.metrics.update(_scores_so_far(lm, cases[: (b + 1) * batch_size], batches[0], reference, rw))
            records.append(rec)
            if on_batch is not None:
                on_batch(rec)
            bar.update(len(batch))
            bar.set_postfix(s_per_edit=f"{editing / (bar.n or 1):.2f}", eff=f"{rec.metrics['immediate_efficacy_acc']:.2f}",
                            served=f"{rec.metrics.get('immediate_served_efficacy', float('nan')):.2f}")
        bar.close()
        metrics = _final_metrics(lm, cases, batches[0], reference, rw, greedy, records)
    finally:
        bar.close()
        if restore:
            for r in reversed(results):
                editor.rollback(lm, r)
    return _stream_result(lm, editor, len(cases), batch_size, metrics, records, editing, t_start)


def _apply_batch(lm: LoadedModel, editor: Editor, batch: list[EditCase]) -> tuple[EditResult, float]:
    """Edit one batch into `lm`; returns the result and the seconds it took."""
    t0 = time.perf_counter()
    result = editor.edit(lm, batch)
    if not result.applied and not result.delta.is_empty:
        result.delta.apply(lm.model)
        result.applied = True
    return result, time.perf_counter() - t0


def _batch_record(lm: LoadedModel, b: int, batch: list[EditCase], result: EditResult, dt: float,
                  rw: Editor | None) -> BatchRecord:
    """The batch's record with its own figures right after it was applied."""
    from kedit_core.evaluate import evaluate_cases

    rec = BatchRecord(index=b, case_ids=[c.case_id for c in batch], seconds=dt)
    now = evaluate_cases(lm, batch, kinds=("efficacy", "paraphrase"), rewriter=rw, greedy=False)
    for key in IMMEDIATE:
        if key in now:
            rec.metrics["immediate_" + key] = now[key]
    steps = [d.steps for d in result.diagnostics]
    rec.info = {"mean_steps": sum(steps) / len(steps) if steps else 0, "delta_norm": result.delta.norm()}
    return rec


def _scores_so_far(lm: LoadedModel, so_far: list[EditCase], first: list[EditCase], reference: Any,
                   rw: Editor | None) -> dict[str, float]:
    """`eval_each_batch`: every case edited so far, scored now (for curves)."""
    from kedit_core.evaluate import evaluate_cases, latest_per_fact, retention

    scores = evaluate_cases(lm, latest_per_fact(so_far), reference=reference, kinds=FINAL_KINDS, rewriter=rw,
                            greedy=False)
    scores.update(retention(lm, first, all_cases_so_far=so_far, rewriter=rw, kinds=KEPT_KINDS))
    return scores


def _final_metrics(lm: LoadedModel, cases: list[EditCase], first: list[EditCase], reference: Any,
                   rw: Editor | None, greedy: bool, records: list[BatchRecord]) -> dict[str, float]:
    """After the last batch: the current cases, retention of the first batch, and each
    batch's immediate figures averaged."""
    from kedit_core.evaluate import evaluate_cases, latest_per_fact, retention

    current = latest_per_fact(cases)
    metrics = evaluate_cases(lm, current, reference=reference, kinds=FINAL_KINDS, rewriter=rw, greedy=greedy)
    metrics.update(retention(lm, first, all_cases_so_far=cases, rewriter=rw, greedy=greedy, kinds=KEPT_KINDS))
    for key in ("immediate_" + k for k in IMMEDIATE):
        vals = [r.metrics[key] for r in records if key in r.metrics]
        if vals:
            metrics[key] = sum(vals) / len(vals)
    return metrics


def _stream_result(lm: LoadedModel, editor: Editor, n: int, batch_size: int, metrics: dict[str, float],
                   records: list[BatchRecord], editing: float, t_start: float) -> StreamResult:
    cfg = editor.config.to_dict() if hasattr(editor.config, "to_dict") else {}
    return StreamResult(
        method=editor.name,
        fingerprint=lm.fingerprint,
        n_cases=n,
        batch_size=batch_size,
        metrics=metrics,
        batches=records,
        seconds_editing=editing,
        seconds_per_edit=editing / n,
        edits_per_minute=60.0 * n / editing if editing > 0 else float("inf"),
        seconds_total=time.perf_counter() - t_start,
        peak_rss_mb=peak_rss_mb(),
        config=cfg,
    )
