"""Edits per minute and peak memory of MEMIT/AlphaEdit on the embedded model, for batch
sizes 1, 10 and 50, next to the same edits done one case at a time the straightforward
way (measured in the same run), printed as ratios.

The straightforward baseline optimises each case's target vector on its own with a full
forward pass of the whole model every step (every layer, vocabulary logits at every
position, gradients for all weights), then applies the same closed-form update. The
batched path shares one forward/backward per step across the batch, runs the layers below
the edited ones once, computes logits only at answer positions, takes no weight gradients,
and (by default) holds the weights in bfloat16 for the target optimisation.

    nice -n 5 python benchmarks/bench_editors.py --cases 50 --baseline-cases 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kedit_core.anatomy import decoder_layers  # noqa: E402
from kedit_core.editors import EDITORS, get_editor  # noqa: E402
from kedit_core.editors.memit import MemitConfig, Targets  # noqa: E402
from kedit_core.editors.memit_rows import EditRows  # noqa: E402
from kedit_core.editors.memit_speedups import hidden_of  # noqa: E402


class PeakRSS:
    """Peak resident memory during a block, sampled every 20 ms from /proc (torch's
    allocations are invisible to tracemalloc; ru_maxrss only ever grows)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def naive_targets(lm, rows: EditRows, z_layer: int, cfg: MemitConfig) -> Targets:
    """One case at a time, full model forward every step, logits everywhere, weight grads on."""
    model = lm.model
    zs, z_inits, diags = [], [], []
    for c in range(rows.n_cases):
        sel = (rows.case_of_row == c).nonzero()[:, 0]
        ids, att, look = rows.input_ids[sel], rows.attention_mask[sel], rows.lookup[sel]
        is_kl = rows.template_of_row[sel] < 0
        tsel = (rows.case_of_row[rows.tgt_row] == c).nonzero()[:, 0]
        local = {int(r): i for i, r in enumerate(sel)}
        t_rows = torch.tensor([local[int(r)] for r in rows.tgt_row[tsel]])
        t_pos, t_tok, t_w = rows.tgt_pos[tsel], rows.tgt_tok[tsel], rows.tgt_weight[tsel]
        kl_r, kl_p = int(is_kl.nonzero()[0, 0]), int(rows.kl_pos[c])
        delta = torch.zeros(model.config.hidden_size, requires_grad=True)
        state: dict = {}

        def hook(_m, _i, out):
            h = hidden_of(out)
            state["z_init"] = h[0, look[0]].detach()
            h = h.index_put((torch.arange(len(sel)), look), delta.expand(len(sel), -1), accumulate=True)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

        handle = decoder_layers(model)[z_layer].register_forward_hook(hook)
        opt = torch.optim.Adam([delta], lr=cfg.targets.lr)
        kl_init, steps = None, 0
        try:
            for step in range(cfg.targets.steps + 1):
                logits = model(input_ids=ids, attention_mask=att).logits  # every position, every layer
                logp = torch.log_softmax(logits.float(), -1)
                nll = -(logp[t_rows, t_pos].gather(1, t_tok[:, None]).squeeze(1) * t_w).sum()
                k = logp[kl_r, kl_p]
                if kl_init is None:
                    kl_init = k.detach()
                kl = torch.nn.functional.kl_div(k, kl_init, log_target=True, reduction="sum")
                init_norm = state["z_init"].norm()
                loss = nll + cfg.targets.kl_factor * kl + cfg.targets.weight_decay * delta.norm() / init_norm**2
                if float(nll.detach()) < cfg.targets.early_stop_nll or step == cfg.targets.steps:
                    break
                opt.zero_grad()
                model.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    max_norm = cfg.targets.clamp_norm_factor * init_norm
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
                steps += 1
        finally:
            handle.remove()
            model.zero_grad(set_to_none=True)
        zs.append(state["z_init"] + delta.detach())
        z_inits.append(state["z_init"])
        diags.append({"loss_curve": [], "steps": steps, "target_norm": 0.0, "delta_norm": float(delta.detach().norm()),
                      "init_norm": 0.0, "final_nll": float(nll.detach()), "converged": steps < cfg.targets.steps})
    return Targets(z=torch.stack(zs), z_init=torch.stack(z_inits), diagnostics=diags)


def run(lm, method: str, cases, batch_size: int, settings: dict, naive: bool = False) -> dict:
    from kedit_core.scoring import token_accuracy

    editor = get_editor(method, EDITORS[method].config_class.from_settings(settings))  # --set names only
    if naive:  # the same editor and settings, step 1 swapped for the straightforward version
        editor = type(editor)(editor.config, compute_targets=naive_targets)  # type: ignore[call-arg]
    for layer in editor.config.layers or []:
        editor.covariance(lm, layer)  # key statistics are a one-off cost, not per edit
    results = []
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        for s in range(0, len(cases), batch_size):
            results.append(editor.edit(lm, cases[s : s + batch_size]))
        seconds = time.perf_counter() - t0
    eff = sum(token_accuracy(lm, [c.prompt for c in cases], [c.target_new for c in cases])) / len(cases)
    for r in reversed(results):
        editor.rollback(lm, r)
    return {
        "method": method + (" naive per-case" if naive else ""),
        "batch_size": 1 if naive else batch_size,
        "cases": len(cases),
        "seconds": seconds,
        "edits_per_min": 60 * len(cases) / seconds,
        "peak_rss_mb": mem.peak,
        "efficacy_acc": eff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="memit")
    ap.add_argument("--cases", type=int, default=50, help="edits per batched configuration")
    ap.add_argument("--baseline-cases", type=int, default=5, help="edits for the slow per-case baseline")
    ap.add_argument("--batch-sizes", default="1,10,50")
    ap.add_argument("--data", default="zsre:data/benchmarks/zsre_mend_train_1k.json")
    ap.add_argument("--set", action="append", default=[], help="editor setting key=value")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--model", default="smollm2", help="model spec (tiny-llama for a smoke run)")
    args = ap.parse_args()

    from connectors.benchmarks import read_dataset
    from kedit_core.editor_settings import parse_settings
    from kedit_core.editors.memit import resolve_layers
    from kedit_core.model import load_model

    lm = load_model(args.model, show_progress=False)
    settings = parse_settings(args.set)
    cases = read_dataset(args.data, limit=max(args.cases, args.baseline_cases))
    settings.setdefault("layers", resolve_layers(MemitConfig(), lm.model))
    print(f"torch threads={torch.get_num_threads()} model={lm.fingerprint[:12]} settings={settings}", flush=True)

    rows = [run(lm, args.method, cases[: args.baseline_cases], 1, settings, naive=True)]
    print(json.dumps(rows[-1]), flush=True)
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        n = args.cases if bs > 1 else min(args.cases, max(args.baseline_cases, 10))
        rows.append(run(lm, args.method, cases[:n], bs, settings))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print(f"\n{'configuration':<28}{'edits/min':>10}{'x naive':>9}{'peak MB':>9}{'efficacy':>9}")
    for r in rows:
        name = f"{r['method']} bs={r['batch_size']}"
        print(f"{name:<28}{r['edits_per_min']:>10.2f}{r['edits_per_min'] / base['edits_per_min']:>9.1f}"
              f"{r['peak_rss_mb']:>9.0f}{r['efficacy_acc']:>9.2f}")
    print(f"(process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
