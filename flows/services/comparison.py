"""The comparison behind `kedit compare` and the kedit-compare-methods flow: one stream of
edits through several methods, from the same base model, every metric per batch into the
ledger, then a side-by-side table.

Each method runs `kedit_core.stream.run_stream` on the same cases with the same batch
size and is rolled back exactly afterwards (`restore=True`); the base fingerprint is
checked before the next method and the model is reloaded if it ever differs, so every
method starts from the same weights. A method that fails is recorded as failed with its
reason and the comparison goes on.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Served answers first (free chat replies, as `kedit serve` answers: what users read), then
# the field's teacher-forced figures beside them.
TABLE_COLUMNS = [
    ("served_efficacy", "served eff."),
    ("served_paraphrase", "served para."),
    ("served_locality", "replies unchanged"),
    ("served_retention", "served retention"),
    ("served_negation", "served neg."),
    ("efficacy_acc", "efficacy"),
    ("paraphrase_acc", "paraphrase"),
    ("locality", "locality"),
    ("retention_acc", "retention"),
    ("immediate_efficacy_acc", "immediate eff."),
    ("efficacy_em", "efficacy EM"),
    ("paraphrase_em", "paraphrase EM"),
    ("seconds_per_edit", "s/edit"),
]


def parse_methods(spec: str) -> list[tuple[str, str]]:
    """`memit,rag,rag_nothr=rag` -> [(label, method)]: a label lets one method run twice
    with different settings (`--set rag_nothr.threshold=null`)."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        label, _, method = part.partition("=")
        out.append((label, method or label))
    labels = [lbl for lbl, _ in out]
    if len(set(labels)) != len(labels):
        from kedit_core.errors import KeditError

        raise KeditError(f"--methods {spec!r}: a label appears twice; use label=method to run a method twice")
    return out


def split_settings(pairs: list[str], labels: list[str]) -> dict[str, list[str]]:
    """`--set memit.layers=3,4 --set lte.steps=200` -> {"memit": ["layers=3,4"], "lte": ["steps=200"]}."""
    from kedit_core.errors import KeditError

    out: dict[str, list[str]] = {lbl: [] for lbl in labels}
    for pair in pairs:
        head, _, rest = pair.partition(".")
        if not rest or head not in out:
            raise KeditError(f"--set {pair!r}: expected METHOD.key=value with METHOD one of {', '.join(labels)}")
        out[head].append(rest)
    return out


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    # a column no method reported (e.g. exact match under --no-greedy) is left out
    columns = [(key, title) for key, title in TABLE_COLUMNS
               if key == "seconds_per_edit" or any(key in r.get("metrics", {}) for r in rows)]
    heads = ["method"] + [title for _, title in columns]
    lines = []
    for row in rows:
        if row.get("error"):
            lines.append([row["label"]] + ["failed: " + row["error"][:60]] + [""] * (len(columns) - 1))
            continue
        m = row["metrics"]
        cells = [row["label"]]
        for key, _ in columns:
            v = row.get(key) if key == "seconds_per_edit" else m.get(key)
            cells.append("-" if v is None else (f"{v:.2f}" if key == "seconds_per_edit" else f"{v:.3f}"))
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(str(r[i])) for r in [heads] + lines) for i in range(len(heads))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(heads), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def write_output(path: Path, run_id: str, data: str, limit: int | None, batch_size: int, model: str,
                 fingerprint: str, rows: list[dict[str, Any]], partial: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"run_id": run_id, "data": data, "limit": limit, "batch_size": batch_size, "model": model,
           "fingerprint": fingerprint, "partial": partial, "rows": rows,
           "table_markdown": format_table(rows, markdown=True)}
    from kedit_core.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")  # rewritten after each method


def run_comparison(plan: list[tuple[str, str]], settings: list[str], data: str, limit: int | None = None,
                   batch_size: int = 10, model: str = "smollm2", per_batch: bool = False, greedy: bool = True,
                   output: Path | None = None, lock_wait_s: float | None = None, device: str | None = None,
                   dtype: str | None = None) -> dict[str, Any]:
    """The comparison behind `kedit compare` and the kedit-compare-methods flow (one code path,
    so a scheduled comparison is the one the CLI runs): `plan` as from `parse_methods`,
    `settings` as `--set METHOD.key=value`. Returns the run id, status, rows (one per method)
    and whether the base weights were restored after the last method. Holds the ledger's
    writer lock throughout (waiting `lock_wait_s`, default KEDIT_LOCK_WAIT_S or 0). `device` /
    `dtype`: where the model runs (default KEDIT_DEVICE / KEDIT_DTYPE, else cpu / float32)."""
    from kedit_core.device import resolve
    from kedit_core.editor_settings import editor_from_settings
    from flows.services.settings import PipelineSettings
    from kedit_core.errors import KeditError
    from storage.db import open_db
    from storage.lock import ledger_lock

    if batch_size < 1:
        raise KeditError(f"--batch-size must be >= 1, got {batch_size}")
    resolve(device, dtype)  # a missing device stops the run before any work, in one line
    per_method = split_settings(list(settings), [lbl for lbl, _ in plan])
    editors = {}
    for label, method in plan:  # configuration errors stop the run before any work
        editors[label] = editor_from_settings(method, per_method[label], label)
    db = open_db()
    wait = PipelineSettings.from_env().lock_wait_s if lock_wait_s is None else lock_wait_s
    with ledger_lock(db.path, "compare", wait_s=wait):
        return _compare_locked(plan, editors, db, data, limit, batch_size, model, per_batch, greedy, output,
                               (device, dtype))


def _compare_locked(plan, editors, db, data, limit, batch_size, model, per_batch, greedy, output,
                    placement=(None, None)) -> dict[str, Any]:
    from connectors.benchmarks import ReadReport, read_dataset
    from kedit_core.errors import KeditError
    from kedit_core.model import fingerprint_model, load_model
    from storage.ledger import finish_run, start_run

    report = ReadReport(path=data)
    cases = read_dataset(data, limit=limit, report=report)
    if not cases:
        raise KeditError(f"{data}: no usable cases")
    device, dtype = placement
    lm = load_model(model, device=device, dtype=dtype)
    base_fp = lm.fingerprint
    run_id = f"compare-{uuid.uuid4().hex[:8]}"
    methods = ",".join(lbl if lbl == m else f"{lbl}={m}" for lbl, m in plan)
    start_run(db, run_id, "compare", {"methods": methods, "data": data, "limit": limit, "batch_size": batch_size,
                                      "configs": {lbl: e.config.to_dict() for lbl, e in editors.items()},
                                      "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch.")}, base_fp)
    rows: list[dict[str, Any]] = []
    try:
        with _sigterm_as_interrupt():
            status, lm = _run_methods(plan, editors, cases, lm, model, base_fp, db, run_id, batch_size, per_batch,
                                      greedy, output, data, limit, rows, placement)
    except BaseException:
        finish_run(db, run_id, "interrupted")
        raise
    finish_run(db, run_id, status)
    restored = fingerprint_model(lm.model) == base_fp
    if output is not None:
        write_output(output, run_id, data, limit, batch_size, model, base_fp, rows, partial=False)
    return {"run_id": run_id, "status": status, "rows": rows, "cases": len(cases), "fingerprint": base_fp,
            "restored": restored, "ledger": str(db.path)}


@contextmanager
def _sigterm_as_interrupt():
    """`timeout` and service managers stop with SIGTERM: turn it into an exception so the run
    is marked interrupted in the ledger instead of staying "running" forever. Only the main
    thread may set a handler: inside a Prefect task (a worker thread) there is none, so a
    cancelled flow run shows as cancelled in Prefect, not in the ledger."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run_methods(plan, editors, cases, lm, model, base_fp, db, run_id, batch_size, per_batch, greedy, output, data,
                 limit, rows, placement=(None, None)) -> tuple[str, Any]:
    """Each method in turn from the same base weights; returns the run's status and the model."""
    from kedit_core.model import fingerprint_model, load_model
    from kedit_core.stream import run_stream
    from storage.ledger import record_metrics

    status = "done"
    for label, method in plan:
        editor = editors[label]
        print(f"== {label} ({method}): {len(cases)} edits in batches of {batch_size}", file=sys.stderr, flush=True)
        if fingerprint_model(lm.model) != base_fp:  # never compare from a drifted model
            log.warning("model differs from the base before %s: reloading", label)
            lm = load_model(model, device=placement[0], dtype=placement[1])

        def on_batch(rec, label=label) -> None:
            values = {**rec.metrics, "seconds": rec.seconds}
            values.update({k: v for k, v in rec.info.items() if isinstance(v, (int, float))})
            record_metrics(db, values, run_id=run_id, method=label, step=rec.index, model_fingerprint=base_fp)

        if hasattr(editor, "memory"):  # one batched embedding pass for every question the evaluator asks
            editor.memory.embed(sorted({p.prompt for c in cases for p in c.probes} | {c.prompt for c in cases}))
        kwargs: dict[str, Any] = dict(batch_size=batch_size, eval_each_batch=per_batch, greedy=greedy,
                                      restore=True, on_batch=on_batch)
        try:  # run_stream scores memory editors through their rewrite_prompt, as served
            result = run_stream(lm, editor, cases, **kwargs)
        except Exception as exc:  # recorded and skipped: the other methods still run
            log.exception("%s failed", label)
            status = "partial"
            rows.append({"label": label, "method": method, "error": f"{type(exc).__name__}: {exc}"})
            record_metrics(db, {"failed": 1.0}, run_id=run_id, method=label, model_fingerprint=base_fp)
            continue
        final = {**result.metrics, "seconds_per_edit": result.seconds_per_edit,
                 "edits_per_minute": result.edits_per_minute, "peak_rss_mb": result.peak_rss_mb}
        record_metrics(db, final, run_id=run_id, method=label, step=len(result.batches), model_fingerprint=base_fp)
        extra = {}
        if method == "lte" and result.batches and "alignment" in (getattr(editor, "alignment_info", None) or {}):
            extra["alignment"] = editor.alignment_info
        elif getattr(editor, "alignment_info", None):
            extra["alignment"] = {k: v for k, v in editor.alignment_info.items() if k != "loss_curve"}
        rows.append({"label": label, "method": method, "metrics": result.metrics,
                     "seconds_per_edit": result.seconds_per_edit, "seconds_total": result.seconds_total,
                     "config": result.config, **extra})
        print(format_table(rows[-1:]), file=sys.stderr, flush=True)  # each method's row as soon as it is known
        if output is not None:  # partial results survive an interrupted comparison
            write_output(output, run_id, data, limit, batch_size, model, base_fp, rows, partial=True)
    return status, lm
