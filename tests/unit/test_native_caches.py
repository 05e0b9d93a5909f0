"""Importing kedit_core bounds torch's oneDNN primitive caches (kedit_core/__init__.py): a
process that meets many sequence lengths, as a long edit stream or a server does, stops
growing once the caches are full, and at a bound far below the libraries' default. Each
case is its own process, since the caches are sized when torch first uses them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# bfloat16 linear forward and backward at 300 sequence lengths (what editing meets), after
# importing kedit_core; prints resident memory growth and the capacities in effect
WORKLOAD = """
import json, os, sys, torch
import kedit_core
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
w = torch.randn(1536, 576, dtype=torch.bfloat16)
(torch.randn(1, 8, 576, dtype=torch.bfloat16) @ w.T).sum()
start = rss()
for length in range(8, 308):
    x = torch.randn(2, length, 576, dtype=torch.bfloat16, requires_grad=True)
    torch.nn.functional.linear(x, w).sum().backward()
print(json.dumps({"growth_mb": rss() - start, "onednn": os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"],
                  "ideep": os.environ["LRU_CACHE_CAPACITY"]}))
"""


def _run(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    env.update(env_extra, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", WORKLOAD], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_kedit_core_bounds_the_onednn_caches_and_keeps_a_users_setting():
    bounded = _run({})
    assert (bounded["onednn"], bounded["ideep"]) == ("64", "64")
    library_default = _run({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"})
    assert (library_default["onednn"], library_default["ideep"]) == ("1024", "1024"), "a user's setting was overridden"
    # ~1 MB a cached shape: 300 shapes held at the default, 64 with kedit's bound
    assert bounded["growth_mb"] < 0.5 * library_default["growth_mb"], (bounded, library_default)
