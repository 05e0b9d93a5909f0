"""Serving speed of the embedded model: tokens per second and time to first token over
HTTP (streamed through the official openai client), against a baseline measured in the
same process: the same greedy `model.generate` called directly, with no server.

Runs alternate (direct, served, direct, served ...) so shared-CPU noise hits both alike;
the figures to read are the ratios. The direct baseline runs each generation in a fresh
thread, as the server's streamed generations do: on an oversubscribed CPU, the same
generate call was measured several times slower in a long-lived thread than in a fresh
one (OpenMP thread teams per calling thread), which would flatter one side.

    python benchmarks/bench_serving.py [--repeats 2] [--max-tokens 48] [--model smollm2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "Name a programming language created in the 1990s.",
]


class FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt itself
            self.first = time.perf_counter()

    def end(self) -> None:
        return None


@torch.no_grad()
def direct(lm, question: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, new tokens) for one plain greedy generate."""
    tok = lm.tokenizer
    t0 = time.perf_counter()
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    clock = FirstTokenClock()
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                            do_sample=False, temperature=None, top_p=None, top_k=None,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, streamer=clock)
    total = time.perf_counter() - t0
    return clock.first - t0, total, int(out.shape[1] - ids.shape[1])


def in_fresh_thread(fn, *args):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args)))
    t.start()
    t.join()
    return out["r"]


def served(client, model: str, question: str, max_tokens: int) -> tuple[float, float, int]:
    """The same over HTTP: streamed chat completion, first content chunk = first token."""
    t0 = time.perf_counter()
    first = None
    n = 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return (first or total) - t0, total, n


def summarise(rows: list[tuple[float, float, int]]) -> dict[str, float]:
    return {
        "ttft_ms": statistics.median(r[0] for r in rows) * 1000,
        "tok_per_s": sum(r[2] for r in rows) / sum(r[1] for r in rows),
        "tokens": sum(r[2] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-seconds", type=float, default=240, help="stop early after this long (shared CPU)")
    args = ap.parse_args()

    import openai

    from kedit_core.model import load_model
    from kedit_core.serving import BackgroundServer, ServingState, create_app

    lm = load_model(args.model, show_progress=True)
    state = ServingState(lm)  # the base weights as loaded, served as version 0
    direct_rows, served_rows = [], []
    t_start = time.perf_counter()
    with BackgroundServer(create_app(state, None)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        in_fresh_thread(direct, lm, QUESTIONS[0], 4)  # warm-up, not counted
        served(client, state.model_name, QUESTIONS[0], 4)
        done = 0
        for rep in range(args.repeats):
            for q in QUESTIONS:
                if time.perf_counter() - t_start > args.max_seconds:
                    break
                direct_rows.append(in_fresh_thread(direct, lm, q, args.max_tokens))
                served_rows.append(served(client, state.model_name, q, args.max_tokens))
                done += 1
                print(f"  {done}/{args.repeats * len(QUESTIONS)} pairs", file=sys.stderr, flush=True)
    d, s = summarise(direct_rows), summarise(served_rows)
    assert d["tokens"] == s["tokens"], "served and direct greedy runs must produce the same number of tokens"
    import os

    # Per-pair ratios (each served run against the direct run just before it) are steadier
    # than ratios of totals when other work on the machine comes and goes.
    pair_tps = statistics.median((s_[2] / s_[1]) / (d_[2] / d_[1]) for d_, s_ in zip(direct_rows, served_rows))
    pair_ttft = statistics.median(s_[0] / d_[0] for d_, s_ in zip(direct_rows, served_rows))
    print(f"model {lm.spec}, {len(direct_rows)} generations each, max_tokens {args.max_tokens}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'':>22}{'direct generate':>18}{'HTTP (openai, SSE)':>20}{'ratio':>8}")
    print(f"{'tokens per second':>22}{d['tok_per_s']:>18.1f}{s['tok_per_s']:>20.1f}{s['tok_per_s'] / d['tok_per_s']:>8.2f}")
    print(f"{'time to first token ms':>22}{d['ttft_ms']:>18.1f}{s['ttft_ms']:>20.1f}{s['ttft_ms'] / d['ttft_ms']:>8.2f}")
    print(f"median per-pair ratio (served / direct): tokens per second {pair_tps:.2f}, "
          f"time to first token {pair_ttft:.2f}")


if __name__ == "__main__":
    main()
