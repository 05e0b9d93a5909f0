"""Evaluation speed on the embedded model, as ratios measured in one process.

1. Questions scored per second by the batched scorer (`kedit_core.evaluate.evaluate_cases`:
   every probe of a kind in a few large forward passes, vocabulary projection only at
   answer positions) vs. the same scorer fed one case at a time with batch size 1.
   Questions = efficacy prompts + paraphrase probes + locality probes of zsRE cases.
2. The regression gate's cost next to the editing it guards: the fast check (and the full
   check) after a MEMIT batch, as a fraction of that batch's edit time. MEMIT's key
   statistics are computed (or read from cache) in an untimed warm-up edit first.

    nice -n 5 python benchmarks/bench_eval.py --cases 64 --baseline-cases 16 --batch 10 --threads 1

`--threads 1` is usually faster on a shared 2-core machine (torch's thread pool spins
while other processes hold the cores); the figures printed are ratios, so either is fair.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.benchmarks import read_dataset  # noqa: E402
from kedit_core.evaluate import evaluate_cases, reference_predictions  # noqa: E402
from kedit_core.model import load_model  # noqa: E402
from kedit_core.regression import fast_check, freeze_suite, full_check  # noqa: E402

ZSRE = Path(__file__).resolve().parents[1] / "data" / "benchmarks" / "zsre_mend_train_1k.json"
KINDS = ("efficacy", "paraphrase", "locality")


def n_questions(cases) -> int:
    return sum(1 + sum(p.kind in ("paraphrase", "locality") for p in c.probes) for c in cases)


def bench_scorer(lm, cases, baseline_cases: int) -> dict:
    ref = reference_predictions(lm, cases)  # once per stream in the pipeline: not timed
    evaluate_cases(lm, cases[:4], ref, kinds=KINDS, greedy=False)  # warm-up
    t = time.perf_counter()
    batched = evaluate_cases(lm, cases, ref, kinds=KINDS, greedy=False)
    batched_s = time.perf_counter() - t
    one = cases[:baseline_cases]
    t = time.perf_counter()
    for c in one:
        evaluate_cases(lm, [c], ref, kinds=KINDS, greedy=False, batch_size=1)
    single_s = time.perf_counter() - t
    q_batched = n_questions(cases) / batched_s
    q_single = n_questions(one) / single_s
    # The same numbers come out either way (teacher-forced scoring is per pair).
    check = evaluate_cases(lm, one, ref, kinds=KINDS, greedy=False, batch_size=1)
    check_b = evaluate_cases(lm, one, ref, kinds=KINDS, greedy=False)
    same = all(abs(check[k] - check_b[k]) < 1e-4 for k in check)
    return {
        "questions_batched": n_questions(cases),
        "questions_one_at_a_time": n_questions(one),
        "batched_q_per_s": round(q_batched, 2),
        "one_at_a_time_q_per_s": round(q_single, 2),
        "speedup": round(q_batched / q_single, 2),
        "same_scores": same,
        "metrics": {k: round(v, 3) for k, v in batched.items()},
    }


def bench_gate(lm, cases, batch: int) -> dict:
    from kedit_core.editors import available_editors, get_editor

    if "memit" not in available_editors():
        return {"skipped": "MEMIT is not registered in this checkout; gate-vs-edit ratio not measured"}
    t = time.perf_counter()
    suite = freeze_suite(lm, cases[batch : batch + 32])
    freeze_s = time.perf_counter() - t
    editor = get_editor("memit")
    warm = editor.edit(lm, cases[-1:])  # computes or loads key statistics: not part of a batch's cost
    editor.rollback(lm, warm)
    todo = cases[:batch]
    before = reference_predictions(lm, todo)
    t = time.perf_counter()
    result = editor.edit(lm, todo)
    edit_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        fast = fast_check(lm, suite, todo, before)
        fast_s = time.perf_counter() - t
        t = time.perf_counter()
        full = full_check(lm, suite, todo, before)
        full_s = time.perf_counter() - t
    finally:
        editor.rollback(lm, result)
    return {
        "batch_size": batch,
        "suite": {"known_facts": len(suite.known_facts), "probe_cases": len(suite.probe_cases),
                  "freeze_s": round(freeze_s, 2)},
        "memit_edit_s": round(edit_s, 2),
        "fast_check_s": round(fast_s, 2),
        "full_check_s": round(full_s, 2),
        "fast_check_fraction_of_edit": round(fast_s / edit_s, 3),
        "full_check_fraction_of_edit": round(full_s / edit_s, 3),
        "fast_metrics": {k: round(v, 3) for k, v in fast.items()},
        "full_only_metrics": {k: round(v, 3) for k, v in full.items() if k not in fast},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=64)
    ap.add_argument("--baseline-cases", type=int, default=16)
    ap.add_argument("--batch", type=int, default=10, help="MEMIT batch size for the gate ratio")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-gate", action="store_true")
    ap.add_argument("--skip-scorer", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("smollm2", show_progress=False)
    cases = read_dataset(f"zsre:{ZSRE}")[: max(args.cases, args.batch + 40)]
    out = {"threads": torch.get_num_threads()}
    if not args.skip_scorer:
        out["scorer"] = bench_scorer(lm, cases[: args.cases], args.baseline_cases)
    print(json.dumps(out, indent=1), flush=True)
    if not args.skip_gate:
        out["gate"] = bench_gate(lm, cases, args.batch)
        print(json.dumps(out["gate"], indent=1))


if __name__ == "__main__":
    main()
