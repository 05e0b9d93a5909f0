"""The gated batch loop: edit a batch, check it, keep it or roll it back, record everything.

A plain function (`apply_gated_batches`) so the Prefect flows, the CLI and tests all run
the same loop. For each batch of pending cases:

1. a batch row is created (status 'applying') and the model's predictions on the batch's
   locality probes are recorded *before* the edit;
2. the editor edits; the regression gate measures (fast check, full check every N) and
   decides (`kedit_core.regression_gate.decide`);
3. accepted: the delta is saved as safetensors (sha256 in the ledger), the editor's
   sequential state beside it, a new live model version is recorded, cases are 'applied';
   rejected: the edit is rolled back exactly, the editor's state restored, cases are
   'rejected' with the reason; a batch whose own cases did not take is retried once with
   `editor.config.stronger()` (a new batch row, attempt 2; the stronger config is passed
   to that edit call, the editor's own config never changes) before it is rejected;
4. every metric goes to DuckDB with run, method, step, version, batch and fingerprint.

Crash safety: a process killed mid-batch leaves the batch 'applying'. The next run looks
at the ledger (the truth): if the batch's version was recorded, the batch is completed;
otherwise it is marked 'failed' and its cases are retried. The model is brought to the
ledger's live version before any edit, and cases already applied are never applied again.

One writer: runs hold the ledger's lock (`storage.lock`) and this loop does not rely on it
alone. A batch claims its cases when it is created (a case in another 'applying' batch is
never claimed) and records its owner (pid, host, process start), so recovery never touches a
batch whose process still runs; a version is committed only on top of the live version it
was built from (compare-and-set): if the live version moved, the edit is undone, the model
rebuilt at the new live version and the batch made again from there.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from flows.services.runtime import LiveModel, ledger_link, load_version_state
from kedit_core.artifacts import delta_path, save_editor_state, state_path, suite_path
from kedit_core.atomic import atomic_write_text, clean_kedit_home
from kedit_core.editors.base import Editor, EditorConfig, EditResult
from kedit_core.errors import KeditError
from kedit_core.evaluate import reference_predictions
from kedit_core.regression_gate import RegressionGateConfig, RegressionDecision, decide, is_full_check
from kedit_core.model import fingerprint_model
from kedit_core.regression import RegressionSuite, fast_check, freeze_suite, full_check
from kedit_core.types import EditCase
from storage import ledger, pipeline_store
from storage.db import Database
from storage.lock import process_alive, this_process

log = logging.getLogger("kedit.pipeline")


@dataclass
class BatchOutcome:
    batch_id: str
    status: str  # applied | rejected | failed (| conflict: not committed, made again by the loop)
    n_cases: int
    attempts: int
    version_id: int | None
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PipelineReport:
    run_id: str | None
    method: str
    batches: list[BatchOutcome] = field(default_factory=list)
    n_applied: int = 0
    n_rejected: int = 0
    n_skipped: int = 0  # already applied / rejected / filtered before this run
    recovered_batches: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # batches made again: the live version had moved
    start_version: int | None = None
    final_version: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- editor state files


def restore_editor_state(editor: Editor, db: Database, live: LiveModel) -> int | None:
    """Load the editor's state saved with the newest version of its method in the live
    chain (the ledger's truth). Returns that version id, or None if there is none."""
    for row in reversed(ledger.version_chain(db, live.version_id)):
        if row.get("method") != editor.name or not row.get("batch_id"):
            continue
        return int(row["version_id"]) if load_version_state(editor, row) else None
    return None


# --------------------------------------------------------------------------- the frozen suite


def load_or_freeze_suite(live: LiveModel, db: Database, run_id: str, **freeze_kw: Any) -> RegressionSuite:
    """The run's regression suite: read back if this run froze one before (a restarted run
    keeps its thresholds' reference point), else frozen now on the BASE weights (the live
    deltas are reverted for the measurement and replayed bit for bit after it), with earlier
    applied edits from the ledger as the retention / locality-drift sample."""
    path = suite_path(run_id)
    if path.exists():
        suite = RegressionSuite.from_json(path.read_text(encoding="utf-8"))
        if suite.base_fingerprint == live.lm.fingerprint:
            return suite
        log.warning("suite %s belongs to another base model: freezing a new one", path)
    earlier = ledger.get_cases(db, status="applied")
    with live.at_base():
        suite = freeze_suite(live.lm, earlier, **freeze_kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, suite.to_json())
    return suite


# --------------------------------------------------------------------------- recovery


def recover_interrupted(db: Database, base_fingerprint: str) -> tuple[list[str], list[EditCase]]:
    """Settle batches a killed process left 'applying'. Returns (batch ids, cases to retry).

    A batch whose owner process is still alive (another run, which should not be writing
    without the ledger's lock) is left alone and logged, never recovered from under it."""
    recovered, retry = [], []
    for b in pipeline_store.batches_in_status(db, "applying"):
        bid = b["batch_id"]
        if _owned_by_another_live_process(b):
            log.warning("batch %s is 'applying' in run %s, whose process (pid %s on %s) is still running: left alone",
                        bid, b.get("run_id"), b.get("owner_pid"), b.get("owner_host"))
            continue
        cases = pipeline_store.cases_of_batch(db, bid)
        version = pipeline_store.version_of_batch(db, bid)
        if version is not None and version["base_fingerprint"] == base_fingerprint and version["status"] in (
            "live",
            "superseded",
        ):
            # The process died after recording the version: the edit is in the ledger's model.
            ledger.set_case_status(db, [c.case_id for c in cases], "applied", None, bid)
            ledger.finish_batch(db, bid, "applied", "completed on recovery", version_id=int(version["version_id"]))
        else:
            owner = f" (run {b.get('run_id')}, pid {b.get('owner_pid')})" if b.get("owner_pid") else ""
            ledger.finish_batch(db, bid, "failed", f"interrupted while applying{owner}; cases retried")
            ledger.set_case_status(db, [c.case_id for c in cases], "pending", f"retry after interrupted batch {bid}")
            retry.extend(cases)
        recovered.append(bid)
        log.warning("recovered interrupted batch %s of run %s (pid %s, %d cases)", bid, b.get("run_id"),
                    b.get("owner_pid"), len(cases))
    return recovered, retry


def _owned_by_another_live_process(batch: dict[str, Any]) -> bool:
    pid = batch.get("owner_pid")
    if pid is None or (int(pid) == os.getpid() and batch.get("owner_host") == socket.gethostname()):
        return False  # no owner recorded (older ledger), or this process: its earlier run died here
    return process_alive(int(pid), batch.get("owner_host"), batch.get("owner_start")) is True


def _owner() -> dict[str, Any]:
    me = this_process()
    return {"pid": me.pid, "host": me.host, "start": me.proc_start}


def sync_with_ledger(live: LiveModel, db: Database) -> None:
    """Bring the in-memory model to the ledger's live version if they differ."""
    row = ledger.live_version(db, live.lm.fingerprint)
    target = int(row["version_id"]) if row else live.base_version_id
    if target == live.version_id:
        return
    log.warning("model is at version %s but the ledger's live version is %s: rebuilding", live.version_id, target)
    live.rebuild_to(target)  # exact: base weights, then the ledger's deltas


def resync_after_conflict(live: LiveModel, editor: Editor, db: Database) -> None:
    """After another writer moved the live version: the model at the new live version, the
    editor's state as saved with it, and the editor serving the weights again."""
    sync_with_ledger(live, db)
    restore_editor_state(editor, db, live)
    editor.attach(live.lm)


# --------------------------------------------------------------------------- the loop


def apply_gated_batches(
    live: LiveModel,
    editor: Editor,
    cases: Sequence[EditCase],
    db: Database,
    gate_config: RegressionGateConfig,
    batch_size: int,
    run_id: str | None,
    suite: RegressionSuite,
    retry_rejected: bool = False,
) -> PipelineReport:
    """Apply `cases` to the live model in gated batches; see the module docstring."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lm = live.lm
    if suite.base_fingerprint != lm.fingerprint:
        raise ValueError(
            f"the regression suite was frozen on base {suite.base_fingerprint[:12]}, not {lm.fingerprint[:12]}"
        )
    t0 = time.perf_counter()
    method = editor.name
    report = PipelineReport(run_id=run_id, method=method)

    clean_kedit_home(db.path.parent)  # temp files of writes a killed run left behind
    report.recovered_batches, retry_cases = recover_interrupted(db, lm.fingerprint)
    sync_with_ledger(live, db)
    report.start_version = live.version_id
    restore_editor_state(editor, db, live)
    editor.attach(lm)  # tonight's weight editor decides how the live weights are served (its update gate)

    # Interrupted cases first, then the new ones; each case once.
    seen: set[str] = set()
    ordered = []
    for c in list(retry_cases) + list(cases):
        if c.case_id not in seen:
            seen.add(c.case_id)
            ordered.append(c)
    ledger.upsert_cases(db, ordered)
    statuses = pipeline_store.case_statuses(db, [c.case_id for c in ordered])
    runnable = ("pending", "rejected") if retry_rejected else ("pending",)
    todo = [c for c in ordered if statuses.get(c.case_id) in runnable]
    report.n_skipped = len(ordered) - len(todo)

    step = pipeline_store.count_metric_steps(db, run_id, method)
    if step == 0 and suite.base_metrics:
        ledger.record_metrics(db, suite.base_metrics, run_id, method, 0, live.base_version_id, None, lm.fingerprint)
    n_batches = (len(todo) + batch_size - 1) // batch_size
    log.info(
        "pipeline %s (%s): %d cases to apply in %d batches of %d, %d skipped (already settled), live version %s",
        run_id, method, len(todo), n_batches, batch_size, report.n_skipped, live.version_id,
    )
    run = _Run(live, editor, db, gate_config, run_id, suite, report, runnable)
    for i in range(n_batches):
        batch = todo[i * batch_size : (i + 1) * batch_size]
        outcome, step = _batch_until_committed(run, batch, step)
        if outcome is None:  # every case was taken by another run meanwhile
            report.n_skipped += len(batch)
            continue
        report.batches.append(outcome)
        report.n_skipped += len(batch) - outcome.n_cases
        if outcome.status == "applied":
            report.n_applied += outcome.n_cases
        else:
            report.n_rejected += outcome.n_cases
        elapsed = time.perf_counter() - t0
        done = sum(b.n_cases for b in report.batches)
        log.info(
            "batch %d/%d %s: %s after %d attempt(s)%s | applied %d, rejected %d, skipped %d | %.2f cases/s",
            i + 1, n_batches, outcome.batch_id, outcome.status, outcome.attempts,
            f" ({'; '.join(outcome.reasons)})" if outcome.reasons else "",
            report.n_applied, report.n_rejected, report.n_skipped, done / max(elapsed, 1e-9),
        )
    report.final_version = live.version_id
    report.seconds = time.perf_counter() - t0
    return report


MAX_CONFLICTS = 3  # live version moved under a batch this often: someone writes without the lock


class LiveVersionKeepsMoving(KeditError):
    """Batches keep losing the compare-and-set: another process writes the ledger without its lock."""


@dataclass
class _Run:
    """What every batch of one `apply_gated_batches` call shares."""

    live: LiveModel
    editor: Editor
    db: Database
    cfg: RegressionGateConfig
    run_id: str | None
    suite: RegressionSuite
    report: PipelineReport
    claimable: tuple[str, ...]  # case statuses this run may claim


def _batch_until_committed(run: _Run, batch: list[EditCase], step: int) -> tuple[BatchOutcome | None, int]:
    """One batch through the gate; made again on top of the new live version each time
    another writer moved it (compare-and-set lost)."""
    for _ in range(MAX_CONFLICTS + 1):
        outcome, step = _gated_batch(run, batch, step)
        if outcome is None or outcome.status != "conflict":
            return outcome, step
        run.report.conflicts.append(outcome.batch_id)
        resync_after_conflict(run.live, run.editor, run.db)
    raise LiveVersionKeepsMoving(
        f"the live version moved under {MAX_CONFLICTS + 1} batches in a row ({', '.join(run.report.conflicts[-3:])}): "
        "another process is writing the ledger without holding its lock"
    )


@dataclass
class _Claimed:
    """A batch whose cases this run claimed, and what every attempt at it shares."""

    run: _Run
    owner: dict[str, Any]
    base_id: str
    ids: list[str]
    cases: list[EditCase]
    full: bool  # the full regression check is due on this batch
    rewriter: Any  # how questions are asked of the model (the memory editor, or the live model's)
    before: Any  # the model's predictions on the batch's locality probes before the edit


def _gated_batch(run: _Run, batch: list[EditCase], step: int) -> tuple[BatchOutcome | None, int]:
    """Claim the batch's cases, then attempt it: attempt 2 (when the regression gate asks for
    a retry) edits with `editor.config.stronger()`, passed to that one edit call only."""
    claimed = _claim(run, batch)
    if claimed is None:
        return None, step
    config = None  # attempt 1: the editor's own settings
    for attempt in range(1, run.cfg.max_attempts + 1):
        batch_id = claimed.base_id if attempt == 1 else f"{claimed.base_id}-a{attempt}"
        if attempt > 1 and ledger.create_batch(run.db, batch_id, run.run_id, run.editor.name, claimed.ids, attempt,
                                               claimed.owner, run.claimable) != claimed.ids:
            ledger.release_batch(run.db, batch_id, "cases taken by another run between attempts")
            return BatchOutcome(batch_id, "conflict", len(claimed.cases), attempt, None, ["cases taken"]), step
        step += 1
        outcome, retry_with = _attempt(claimed, batch_id, attempt, config, step)
        if outcome is not None:
            return outcome, step
        config = retry_with
    raise AssertionError("unreachable: the last attempt never retries")


def _claim(run: _Run, batch: list[EditCase]) -> _Claimed | None:
    db, editor = run.db, run.editor
    batch_no = pipeline_store.count_batches(db, run.run_id) + 1
    base_id = f"{run.run_id or 'run'}-b{batch_no:05d}"
    owner = _owner()
    # Claim first: cases another run is applying, or applied since we read them, are not ours.
    ids = ledger.create_batch(db, base_id, run.run_id, editor.name, [c.case_id for c in batch], 1, owner,
                              run.claimable)
    if not ids:
        log.warning("batch %s: all %d cases were taken by another run; skipped", base_id, len(batch))
        return None
    cases = [c for c in batch if c.case_id in set(ids)]
    rewriter = editor if editor.is_memory_editor else run.live.rewriter
    return _Claimed(run, owner, base_id, ids, cases,
                    full=is_full_check(batch_no, run.cfg),  # the run's batch count, so the schedule survives restarts
                    rewriter=rewriter,
                    # what the model says on the batch's locality probes before the edit (locality reference)
                    before=reference_predictions(run.live.lm, cases, rewriter=rewriter))


def _attempt(c: _Claimed, batch_id: str, attempt: int, config: EditorConfig | None,
             step: int) -> tuple[BatchOutcome | None, EditorConfig | None]:
    """Edit, check, decide. Returns the batch's outcome, or (None, the config to retry with)."""
    run = c.run
    lm, editor, method, n = run.live.lm, run.editor, run.editor.name, len(c.cases)
    state_before = copy.deepcopy(editor.state_dict())
    t_edit = time.perf_counter()
    result = _edit(c, batch_id, attempt, config, state_before)
    if isinstance(result, BatchOutcome):
        return result, None
    edit_s = time.perf_counter() - t_edit

    t_check = time.perf_counter()
    details: dict[str, list[dict[str, Any]]] = {}
    check = full_check if c.full else fast_check
    metrics = check(lm, run.suite, c.cases, c.before, rewriter=c.rewriter, details=details)
    check_s = time.perf_counter() - t_check
    decision: RegressionDecision = decide(metrics, run.suite.base_metrics, run.cfg, attempt)
    timing = {"edit_seconds": edit_s, "check_seconds": check_s, "delta_norm": result.delta.norm(),
              "full_check": float(c.full), "accepted": float(decision.accept)}

    if decision.accept:
        try:
            vid = _commit(run.live, editor, config or editor.config, result, c.cases, batch_id, run.db, metrics)
        except ledger.VersionConflict as exc:
            # Another writer moved the live version: this edit sits on a stale parent.
            editor.rollback(lm, result)
            editor.load_state_dict(state_before)
            _forget_files(lm.fingerprint, batch_id)
            why = f"not committed: {exc}; made again on top of version {exc.live_id}"
            ledger.release_batch(run.db, batch_id, why)
            log.warning("batch %s: %s", batch_id, why)
            return BatchOutcome(batch_id, "conflict", n, attempt, None, [why]), None
        _record(run.db, metrics | timing, details, run.run_id, method, step, vid, batch_id, lm.fingerprint)
        run.suite.add_applied(c.cases, seen_before=run.report.n_applied)
        return BatchOutcome(batch_id, "applied", n, attempt, vid, [], metrics), None

    # Rejected: exact restore of weights and editor state, then maybe retry.
    editor.rollback(lm, result)
    editor.load_state_dict(state_before)
    _record(run.db, metrics | timing, details, run.run_id, method, step, run.live.version_id, batch_id, lm.fingerprint)
    reasons = list(decision.reasons)
    if decision.retry:
        current = config or editor.config
        stronger = current.stronger()
        if stronger is current or stronger == current:
            reasons.append(f"{method} has no stronger settings to retry with")
        else:
            ledger.finish_batch(run.db, batch_id, "rolled_back", "; ".join(reasons))
            return None, stronger
    why = "; ".join(reasons)
    ledger.finish_batch(run.db, batch_id, "rolled_back", why)
    ledger.set_case_status(run.db, c.ids, "rejected", why, batch_id)
    return BatchOutcome(batch_id, "rejected", n, attempt, None, reasons, metrics), None


def _edit(c: _Claimed, batch_id: str, attempt: int, config: EditorConfig | None,
          state_before: dict[str, Any]) -> EditResult | BatchOutcome:
    """The edit, applied to the model; a failing editor is recorded and ends the batch."""
    run = c.run
    editor, lm = run.editor, run.live.lm
    try:
        result = editor.edit(lm, c.cases, config=config)
    except Exception as exc:  # an editor bug or bad case must not stop the stream
        log.exception("editor %s failed on batch %s", editor.name, batch_id)
        why = f"editor failed: {type(exc).__name__}: {exc}"
        editor.load_state_dict(state_before)
        ledger.finish_batch(run.db, batch_id, "failed", why)
        ledger.set_case_status(run.db, c.ids, "rejected", why, batch_id)
        return BatchOutcome(batch_id, "failed", len(c.cases), attempt, None, [why])
    if not result.applied and not result.delta.is_empty:
        result.delta.apply(lm.model)
        result.applied = True
    return result


def _commit(
    live: LiveModel,
    editor: Editor,
    config: EditorConfig,
    result: EditResult,
    batch: list[EditCase],
    batch_id: str,
    db: Database,
    metrics: dict[str, float],
) -> int:
    """Persist an accepted batch: delta file, editor state, version row (with the `config` the
    batch was edited with), case and batch status.

    Order matters for crash recovery: files first, then one transaction (the commit point:
    version row, cases and batch 'applied', only if the version we built on is still live;
    `ledger.VersionConflict` otherwise, with nothing written).
    """
    lm = live.lm
    fp = lm.fingerprint
    delta_file, sha = None, None
    if not result.delta.is_empty:
        path = delta_path(fp, batch_id)
        sha = result.delta.save(path)
        delta_file = str(path)
    state = editor.state_dict()
    state_sha = save_editor_state(state, state_path(fp, batch_id), editor.name) if state else None
    note = json.dumps({"n_cases": len(batch), "efficacy_acc": metrics.get("efficacy_acc"),
                       "config": config.to_dict(), "state_sha256": state_sha}, default=str)
    # The commit point, one transaction, compare-and-set on the live version we built on.
    vid = ledger.commit_batch(
        db, batch_id, live.version_id, fp, lm.spec, editor.name, [c.case_id for c in batch], delta_file, sha,
        weights_fingerprint=fingerprint_model(lm.model), note=note,
    )
    live.record_applied(result.delta, ledger_link(vid, delta_file, sha))
    live.version_id = vid
    editor.settle(result)  # from here on the batch is undone through the ledger's versions
    if editor.is_memory_editor:
        live.rewriter = editor
    return vid


def _forget_files(base_fingerprint: str, batch_id: str) -> None:
    """A batch that was not committed leaves no delta or state file behind."""
    for path in (delta_path(base_fingerprint, batch_id, create=False), state_path(base_fingerprint, batch_id)):
        path.unlink(missing_ok=True)


def _record(
    db: Database,
    values: dict[str, float],
    details: dict[str, list[dict[str, Any]]],
    run_id: str | None,
    method: str,
    step: int,
    version_id: int | None,
    batch_id: str,
    fingerprint: str,
) -> None:
    ledger.record_metrics(db, values, run_id, method, step, version_id, batch_id, fingerprint)
    rows = [r for group in details.values() for r in group]
    pipeline_store.record_probe_results(db, rows, run_id, method, step, batch_id, version_id)
