"""Where an edit's time goes: per batch, the target optimisation against the rest (keys,
closed form, gate and scope), and how many optimisation steps each case runs, with its
loss along the way and whether it reached `targets.early_stop_nll`.

Sequential batches of the first zsRE cases on the embedded model, one process; run it on
an idle machine (timings under load are not figures).

    python benchmarks/edit_steps.py --method alphaedit --batches 3 [--set targets.lr=1.0 ...]

Figures for kedit's settings are in docs/editing.md (eighth round).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.benchmarks import read_dataset  # noqa: E402
from kedit_core.editor_settings import editor_from_settings  # noqa: E402
from kedit_core.model import load_model  # noqa: E402

DATA = "zsre:data/benchmarks/zsre_mend_train_1k.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="alphaedit")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    lm = load_model(args.model, show_progress=False)
    cases = read_dataset(DATA, limit=args.batches * args.batch_size)
    editor = editor_from_settings(args.method, args.settings, "--set")
    editor.attach(lm)
    total, steps_all = 0.0, []
    for b in range(args.batches):
        batch = cases[b * args.batch_size : (b + 1) * args.batch_size]
        t0 = time.perf_counter()
        result = editor.edit(lm, batch)
        seconds = time.perf_counter() - t0
        total += seconds
        steps = [d.steps for d in result.diagnostics]
        steps_all += steps
        print(json.dumps({
            "batch": b, "seconds": round(seconds, 1),
            "targets_s": round(result.info.get("seconds_targets", 0.0), 1),
            "update_s": round(result.info.get("seconds_update", 0.0), 1),
            "mean_steps": statistics.mean(steps), "max_steps": max(steps),
        }), flush=True)
        for d in result.diagnostics:
            curve = d.loss_curve
            marks = " ".join(f"{curve[i]:.2f}" for i in range(0, len(curve), 10))
            print(f"  {d.case_id:>10} steps {d.steps:3d} converged {str(d.extra.get('converged')):5} "
                  f"final nll {d.extra.get('final_nll') or 0:.3f} |d|/|h| {(d.delta_norm or 0) / (d.extra.get('init_norm') or 1):.2f} loss every 10 steps {marks} end {curve[-1]:.3f}")
    n = args.batches * args.batch_size
    print(f"{n} edits: {total / n:.2f} s per edit ({60 * n / total:.1f} per minute), "
          f"mean steps {statistics.mean(steps_all):.1f}")


if __name__ == "__main__":
    main()
