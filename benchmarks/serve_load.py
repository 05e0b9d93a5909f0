"""Load test of `kedit serve` (not a timed test): p50/p95 latency and errors at 1, 8 and 32
concurrent clients while the served version is swapped back and forth through the admin
API, on the real app and HTTP stack (uvicorn on 127.0.0.1).

A throw-away ledger (temporary folder) gets the base version and one child version made
of a random delta, recorded with its sha256 and weights fingerprint as the pipeline
records them. Each client sends non-streaming chat completions back to back; one more
thread loads the other version every `--swap-every` seconds. Every answer must carry the
system_fingerprint of one of the two versions; 429s (the admission limit, --max-pending)
are counted apart from errors.

    python benchmarks/serve_load.py [--model tiny-llama] [--levels 1,8,32] [--requests 8]
                                    [--max-tokens 8] [--swap-every 0.5] [--max-pending 64]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ADMIN = "load-test-admin"
QUESTIONS = ["Where is the Eiffel tower?", "Who wrote Hamlet?", "What is the capital of Italy?",
             "Name a large river."]


def make_two_versions(lm, db, folder: Path) -> tuple[int, int]:
    """(base version id, child version id): the child adds a small random delta to one matrix."""
    import torch

    from kedit_core.weights import WeightDelta
    from kedit_core.model import fingerprint_model
    from storage import ledger

    base = ledger.ensure_base_version(db, lm.fingerprint, lm.spec)
    params = [(n, p) for n, p in lm.model.named_parameters() if p.ndim == 2 and n.endswith("weight")]
    name, param = params[len(params) // 2]
    gen = torch.Generator().manual_seed(0)
    delta = WeightDelta({name: torch.randn(param.shape, generator=gen) * 0.05 * param.detach().float().std()},
                        meta={"load_test": True})
    path = folder / "delta_load.safetensors"
    sha = delta.save(path)
    work = copy.deepcopy(lm)
    delta.apply(work.model)
    fp = fingerprint_model(work.model)
    del work
    child = ledger.add_version(db, base, lm.fingerprint, lm.spec, "load-test", None, str(path), sha,
                               weights_fingerprint=fp)
    return base, child


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def run_level(url: str, model: str, clients: int, per_client: int, max_tokens: int, tags: set[str],
              swap_every: float) -> dict:
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    busy = [0]
    lock = threading.Lock()
    stop_swapping = threading.Event()
    swaps = [0]

    def client(i: int) -> None:
        s = requests.Session()
        for k in range(per_client):
            body = {"model": model, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": QUESTIONS[(i + k) % len(QUESTIONS)]}]}
            t0 = time.perf_counter()
            try:
                r = s.post(url + "/v1/chat/completions", json=body, timeout=600)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 429:
                        busy[0] += 1
                    elif r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:120]}")
                    elif r.json().get("system_fingerprint") not in tags:
                        errors.append(f"unknown version {r.json().get('system_fingerprint')}")
                    else:
                        latencies.append(dt)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:160])

    def swapper(ids: list[int]) -> None:
        s = requests.Session()
        k = 0
        wait = min(0.05, swap_every)  # the first swap while the first requests are in flight
        while not stop_swapping.wait(wait):
            wait = swap_every
            r = s.post(f"{url}/admin/versions/{ids[k % 2]}/load", headers={"Authorization": f"Bearer {ADMIN}"},
                       timeout=600)
            if r.status_code == 200 and r.json().get("changed"):
                swaps[0] += 1
            elif r.status_code != 200:
                with lock:
                    errors.append(f"swap HTTP {r.status_code}: {r.text[:120]}")
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    sw = threading.Thread(target=swapper, args=(run_level.ids,), daemon=True)
    t0 = time.perf_counter()
    sw.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop_swapping.set()
    sw.join(timeout=600)
    return {"clients": clients, "requests": clients * per_client, "ok": len(latencies), "errors": errors,
            "busy_429": busy[0], "p50": pct(latencies, 0.5), "p95": pct(latencies, 0.95),
            "mean": statistics.fmean(latencies) if latencies else float("nan"), "swaps": swaps[0],
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama", help="tiny-llama (default), smollm2 or a model folder")
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=8, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--swap-every", type=float, default=0.5, help="seconds between version swaps")
    ap.add_argument("--max-pending", type=int, default=64, help="the server's admission limit")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared CPU)")
    args = ap.parse_args()

    import torch

    from flows.services.serving import build_serving_state
    from kedit_core.model import load_model
    from kedit_core.serving import BackgroundServer, create_app, version_tag
    from storage.db import open_db

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kedit-load-") as tmp:
        db = open_db(Path(tmp) / "load.duckdb")
        lm = load_model(args.model, show_progress=False)
        base, child = make_two_versions(lm, db, Path(tmp))
        state = build_serving_state(lm, db, version=base, max_tokens_limit=max(64, args.max_tokens))
        tags = {version_tag(base, lm.fingerprint)}
        state.load_version(child)  # builds the second copy once, records the child's tag
        tags.add(state.tag)
        state.load_version(base)
        run_level.ids = [child, base]
        app = create_app(state, ADMIN, max_pending=args.max_pending)
        print(f"model {args.model}; versions {base} <-> {child} swapped every {args.swap_every}s; "
              f"{args.requests} non-streaming chats per client, max_tokens {args.max_tokens}; "
              f"torch threads {args.threads}")
        print(f"{'clients':>7} {'requests':>8} {'ok':>5} {'errors':>6} {'429':>5} {'p50 s':>7} {'p95 s':>7} "
              f"{'mean s':>7} {'swaps':>5} {'wall s':>7}")
        with BackgroundServer(app) as srv:
            for level in [int(x) for x in args.levels.split(",") if x.strip()]:
                r = run_level(srv.url, state.model_name, level, args.requests, args.max_tokens, tags, args.swap_every)
                print(f"{r['clients']:>7} {r['requests']:>8} {r['ok']:>5} {len(r['errors']):>6} {r['busy_429']:>5} "
                      f"{r['p50']:>7.3f} {r['p95']:>7.3f} {r['mean']:>7.3f} {r['swaps']:>5} {r['seconds']:>7.1f}",
                      flush=True)
                for e in r["errors"][:3]:
                    print(f"        error: {e}")


if __name__ == "__main__":
    main()
