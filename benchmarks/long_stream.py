"""How quality and cost grow over a long sequential stream of edits (issue 20).

The pipeline's default method edits the first N cases of a benchmark in order, `--batch`
at a time, on one model, as the nightly flow would over months. At each checkpoint (after
10, 100, 250, 500, 1000, ... edits) it measures, on the model as it then is:

- efficacy / paraphrase of the edits so far, teacher-forced (`*_acc`) and as served
  (`served_*`: free chat answers, kedit_core/served_answers.py), on an evenly spread sample
  of up to `--eval-cases` of them (the latest edit of each fact);
- locality on a fixed pool of unrelated questions (the locality probes of `--locality-cases`
  cases): token agreement with the unedited model, and served replies unchanged;
- retention: the first batch's efficacy / paraphrase now;
- perplexity on kedit's reference text, as a ratio to the unedited model's;
- seconds per edit over the window since the previous checkpoint (edit time only, no
  evaluation) and over the whole stream, and resident memory.

Resumable: the state (edited weights, the editor's sequential state, the unedited model's
reference answers, the figures so far) is saved in `--state` every `--save-every` batches
and when `--max-minutes` of editing is spent, and a rerun with the same arguments goes on
from there. That lets a 1,000-edit stream run in chunks on a shared machine, each chunk
timed alone, e.g. (one heavy job at a time on the cores):

    for i in $(seq 12); do flock /tmp/kedit-heavy.lock \\
        python benchmarks/long_stream.py --limit 1000 --max-minutes 7 || break; done

Figures go to `--state`/figures.json and, with matplotlib, figures.png; `--report` prints
the table of a finished or partial run without editing.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stream_args import ZSRE  # noqa: E402
from kedit_core.routing import installed_update_gate  # noqa: E402

log = logging.getLogger("long_stream")

DEFAULT_CHECKPOINTS = (10, 100, 250, 500, 1000, 2500, 5000, 10000)
SHOWN = ("efficacy_acc", "served_efficacy", "paraphrase_acc", "served_paraphrase", "locality",
         "served_locality", "retention_acc", "served_retention", "ppl_ratio", "window_s_per_edit", "rss_mb")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default=None, help="editing method (default: the pipeline's)")
    ap.add_argument("--data", default=f"zsre:{ZSRE}", help="benchmark as KIND:PATH")
    ap.add_argument("--limit", type=int, default=1000, help="edits in the stream")
    ap.add_argument("--batch", type=int, default=10, help="edits per batch")
    ap.add_argument("--checkpoints", default=",".join(map(str, DEFAULT_CHECKPOINTS)),
                    help="measure after this many edits (rounded up to a whole batch; the last edit always)")
    ap.add_argument("--eval-cases", type=int, default=100, help="edits scored at a checkpoint (evenly spread)")
    ap.add_argument("--locality-cases", type=int, default=50, help="cases whose locality probes form the fixed pool")
    ap.add_argument("--set", dest="settings", action="append", default=[], help="editor setting key=value")
    ap.add_argument("--model", default="smollm2", help="model spec (tiny-llama for a smoke run)")
    ap.add_argument("--state", type=Path, default=None, help="state folder (default: long_stream/ in the kedit home)")
    ap.add_argument("--save-every", type=int, default=10, help="save the state every N batches")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this much editing")
    ap.add_argument("--max-batches", type=int, default=None, help="stop (resumably) after this many batches")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep the state saved at each checkpoint (weights, editor, gate: ~150 MB each on SmolLM2) "
                         "for evaluations on it later; by default only the latest state is kept")
    ap.add_argument("--fresh", action="store_true", help="discard a saved state and start over")
    ap.add_argument("--report", action="store_true", help="print the saved figures and exit")
    return ap.parse_args(argv)


def state_folder(args: argparse.Namespace, method: str) -> Path:
    if args.state is not None:
        return args.state
    from kedit_core.home import kedit_home

    kind, _, path = args.data.partition(":")
    tag = "-".join([method, kind, Path(path).stem, f"n{args.limit}", f"bs{args.batch}", args.model,
                    *sorted(s.replace("=", "_") for s in args.settings)])
    return kedit_home() / "long_stream" / tag


def checkpoints(spec: str, limit: int, batch: int) -> list[int]:
    """Edit counts at which to measure, each rounded up to a batch boundary, plus the end."""
    wanted = {min(limit, -(-int(x) // batch) * batch) for x in spec.split(",") if x.strip()}
    return sorted(wanted | {limit})


# --------------------------------------------------------------------------- saved state


def save_reference(ref: Any, path: Path) -> None:
    from kedit_core.atomic import atomic_write_text

    rows = [[*key, ref.predictions[key], ref.answers.get(key)] for key in ref.predictions]
    atomic_write_text(path, json.dumps({"predictions": rows, "replies": ref.replies}))


def load_reference(path: Path) -> Any:
    from kedit_core.evaluate import Reference

    raw = json.loads(path.read_text())
    ref = Reference(replies=dict(raw["replies"]))
    for kind, prompt, answer, pred, shown in raw["predictions"]:
        ref.predictions[(kind, prompt, answer)] = pred
        if shown is not None:
            ref.answers[(kind, prompt, answer)] = shown
    return ref


def save_state(folder: Path, lm: Any, editor: Any, touched: set[str], progress: dict[str, Any],
               keep: frozenset[str] = frozenset()) -> None:
    """The edited tensors' current values (exact, not deltas), the editor's sequential state,
    then the progress file last: a crash mid-save leaves the previous consistent state. The
    previous save's files are removed unless its tag is in `keep` (`--keep-checkpoints`)."""
    from safetensors.torch import save_file

    from kedit_core.artifacts import save_editor_state
    from kedit_core.atomic import atomic_target, atomic_write_text

    params = dict(lm.model.named_parameters())
    tag = f"{progress['n_done']:06d}"
    with atomic_target(folder / f"weights-{tag}.safetensors") as tmp:
        save_file({n: params[n].detach().cpu().contiguous() for n in sorted(touched)}, str(tmp))
    save_editor_state(editor.state_dict(), folder / f"editor-{tag}.safetensors", editor.name)
    gate = installed_update_gate(lm)
    if gate is not None and any(g.per_batch for g in gate.gates):  # per-batch changes: not in the weights
        with atomic_target(folder / f"gate-{tag}.pt") as tmp:
            torch.save(gate.segments_state(), tmp)
    previous = progress.get("saved")
    progress["saved"] = tag
    atomic_write_text(folder / "progress.json", json.dumps(progress, indent=1))
    if previous and previous != tag and previous not in keep:
        for old in (folder / f"weights-{previous}.safetensors", folder / f"editor-{previous}.safetensors",
                    folder / f"gate-{previous}.pt"):
            old.unlink(missing_ok=True)


@torch.no_grad()
def restore_state(folder: Path, lm: Any, editor: Any, progress: dict[str, Any]) -> set[str]:
    from safetensors.torch import load_file

    from kedit_core.artifacts import load_editor_state

    tag = progress["saved"]
    weights = load_file(str(folder / f"weights-{tag}.safetensors"))
    params = dict(lm.model.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value)
    method, state = load_editor_state(folder / f"editor-{tag}.safetensors")
    if method != editor.name:
        raise SystemExit(f"error: state in {folder} was made by {method}, not {editor.name}; use --fresh")
    editor.load_state_dict(state)
    return set(weights)


# --------------------------------------------------------------------------- measuring


def current_rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def spread(items: list[Any], n: int) -> list[Any]:
    """Up to n items evenly spread over the list, first and last included."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def measure(lm: Any, editor: Any, cases: list[Any], n_done: int, batch: int, pool: list[Any], reference: Any,
            eval_cases: int, base_ppl: float, reference_text: list[str]) -> dict[str, float]:
    from kedit_core.evaluate import evaluate_cases, latest_per_fact, retention
    from kedit_core.scoring import perplexity

    rw = editor if editor.is_memory_editor else None
    so_far = cases[:n_done]
    sample = spread(latest_per_fact(so_far), eval_cases)
    out: dict[str, float] = {"n_edits": n_done, "n_scored": len(sample)}
    out.update(evaluate_cases(lm, sample, kinds=("efficacy", "paraphrase"), rewriter=rw, greedy=False))
    out.update(evaluate_cases(lm, pool, reference=reference, kinds=("locality",), rewriter=rw, greedy=False))
    out.update(retention(lm, cases[:batch], all_cases_so_far=so_far, rewriter=rw, kinds=("efficacy", "paraphrase")))
    out["ppl"] = perplexity(lm, reference_text)
    out["ppl_ratio"] = out["ppl"] / base_ppl
    return out


# --------------------------------------------------------------------------- the stream


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from connectors.benchmarks import read_dataset
    from kedit_core.editor_settings import editor_from_settings
    from flows.services.settings import PipelineSettings
    from kedit_core.evaluate import reference_predictions
    from kedit_core.model import load_model
    from kedit_core.regression import load_reference_text
    from kedit_core.scoring import perplexity

    method = args.method or PipelineSettings().method
    folder = state_folder(args, method)
    if args.fresh and folder.exists():
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    progress_file = folder / "progress.json"
    progress: dict[str, Any] = json.loads(progress_file.read_text()) if progress_file.exists() else {}
    if args.report:
        return progress

    cases = read_dataset(args.data, limit=args.limit)
    if len(cases) < args.limit:
        log.warning("the benchmark has %d usable cases, fewer than --limit %d", len(cases), args.limit)
    marks = checkpoints(args.checkpoints, len(cases), args.batch)
    keep = frozenset(f"{m:06d}" for m in marks) if args.keep_checkpoints else frozenset()
    lm = load_model(args.model, show_progress=True)
    editor = editor_from_settings(method, args.settings, "--set")
    pool = cases[: args.locality_cases]
    reference_text = load_reference_text()
    ref_file = folder / "reference.json"
    if progress and progress.get("fingerprint") != lm.fingerprint:
        raise SystemExit(f"error: state in {folder} is for model {progress.get('fingerprint', '?')[:12]}; use --fresh")
    if progress and sorted(progress.get("settings", [])) != sorted(args.settings):
        # (a longer --limit is fine: it extends the same stream)
        raise SystemExit(f"error: state in {folder} was edited with --set {progress.get('settings')}, not "
                         f"{args.settings}; use the same settings, or --fresh")
    if not progress:
        t0 = time.perf_counter()
        reference = reference_predictions(lm, pool)
        save_reference(reference, ref_file)
        progress = {"method": method, "data": args.data, "batch": args.batch, "limit": len(cases),
                    "settings": args.settings, "fingerprint": lm.fingerprint, "n_done": 0, "edit_seconds": 0.0,
                    "base_ppl": perplexity(lm, reference_text), "rows": [], "window": [0, 0.0],
                    "torch_threads": torch.get_num_threads(), "chunks": 0}
        log.info("unedited model measured in %.0fs (ppl %.2f)", time.perf_counter() - t0, progress["base_ppl"])
        touched: set[str] = set()
    else:
        progress["limit"] = len(cases)  # a longer --limit extends the stream
        reference = load_reference(ref_file)
        touched = restore_state(folder, lm, editor, progress) if progress.get("saved") else set()
    editor.attach(lm)  # the update gate as it now stands, as the server would serve it
    gate_file = folder / f"gate-{progress.get('saved')}.pt"
    if progress.get("saved") and gate_file.exists() and installed_update_gate(lm) is not None:
        installed_update_gate(lm).load_segments_state(torch.load(gate_file))
    progress["chunks"] += 1

    n_done, started = progress["n_done"], time.perf_counter()
    bar = tqdm(total=len(cases), initial=n_done, desc=f"Editing ({method})", unit="edit")
    batches_since_save = done_here = 0
    try:
        while n_done < len(cases):
            if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
                log.info("--max-minutes %.1f spent: stopping at %d edits (rerun to go on)", args.max_minutes, n_done)
                break
            if args.max_batches is not None and done_here >= args.max_batches:
                break
            batch = cases[n_done : n_done + args.batch]
            t0 = time.perf_counter()
            result = editor.edit(lm, batch)
            if not result.applied and not result.delta.is_empty:
                result.delta.apply(lm.model)
            dt = time.perf_counter() - t0
            result.delta.release()  # the stream never rolls back: keep no copies of old weights
            editor.settle(result)  # ... and no rollback records
            touched |= set(result.delta.tensors)
            n_done += len(batch)
            progress["edit_seconds"] += dt
            progress["window"] = [progress["window"][0] + len(batch), progress["window"][1] + dt]
            bar.update(len(batch))
            bar.set_postfix(s_per_edit=f"{progress['window'][1] / max(1, progress['window'][0]):.2f}")
            batches_since_save += 1
            done_here += 1
            if n_done in marks:
                progress["n_done"] = n_done
                row = measure(lm, editor, cases, n_done, args.batch, pool, reference, args.eval_cases,
                              progress["base_ppl"], reference_text)
                w_edits, w_seconds = progress["window"]
                row.update(window_s_per_edit=w_seconds / w_edits, s_per_edit=progress["edit_seconds"] / n_done,
                           rss_mb=current_rss_mb())
                progress["rows"].append(row)
                progress["window"] = [0, 0.0]
                log.info("after %d edits: %s", n_done, json.dumps({k: round(row[k], 3) for k in SHOWN if k in row}))
            if n_done in marks or batches_since_save >= args.save_every:
                progress["n_done"] = n_done
                save_state(folder, lm, editor, touched, progress, keep)
                batches_since_save = 0
    finally:
        bar.close()
    if batches_since_save:
        progress["n_done"] = n_done
        save_state(folder, lm, editor, touched, progress, keep)
    write_figures(folder, progress)
    return progress


def write_figures(folder: Path, progress: dict[str, Any]) -> None:
    from kedit_core.atomic import atomic_write_text

    atomic_write_text(folder / "figures.json", json.dumps(progress["rows"], indent=1))
    rows = progress["rows"]
    if len(rows) < 2:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    x = [r["n_edits"] for r in rows]
    fig, (quality, cost, memory) = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("served_efficacy", "served_paraphrase", "served_locality", "served_retention", "efficacy_acc",
                "paraphrase_acc", "locality"):
        if all(key in r for r in rows):
            quality.plot(x, [r[key] for r in rows], marker="o", label=key, linestyle="-" if "served" in key else ":")
    quality.set(xscale="log", xlabel="sequential edits", ylim=(0, 1.02), title=f"{progress['method']}: quality")
    quality.legend(fontsize=7)
    # axes from zero (cost) and around the +10% bar (perplexity), so that flat reads flat
    seconds = [r["window_s_per_edit"] for r in rows]
    cost.plot(x, seconds, marker="o", label="s per edit (window)")
    cost.set(xscale="log", xlabel="sequential edits", ylabel="seconds per edit", title="cost",
             ylim=(0, 1.2 * max(seconds)))
    twin = cost.twinx()
    ppl = [r["ppl_ratio"] for r in rows]
    twin.plot(x, ppl, marker="s", color="tab:red", label="perplexity / base")
    twin.set(ylabel="perplexity / base (red)", ylim=(min(0.95, min(ppl)), max(1.15, max(ppl))))
    if all("rss_mb" in r for r in rows):
        memory.plot(x, [r["rss_mb"] / 1024 for r in rows], marker="o", color="tab:green")
    memory.set(xscale="log", xlabel="sequential edits", ylabel="GiB", title="resident memory", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(folder / "figures.png", dpi=110)
    plt.close(fig)


def print_table(progress: dict[str, Any]) -> None:
    rows = progress.get("rows", [])
    print(f"{progress.get('method')} on {progress.get('data')}, batches of {progress.get('batch')}, "
          f"{progress.get('n_done', 0)} of {progress.get('limit')} edits done in {progress.get('chunks', 0)} chunk(s)")
    print("edits " + "".join(f"{k[:17]:>18}" for k in SHOWN))
    for r in rows:
        print(f"{int(r['n_edits']):>5} " + "".join(f"{r.get(k, float('nan')):>18.3f}" for k in SHOWN))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    progress = run(args)
    print_table(progress)


if __name__ == "__main__":
    main()
