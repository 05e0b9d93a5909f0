from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kedit_core.answer import answer

pytestmark = pytest.mark.integration


def test_embedded_model_knows_paris(embedded_lm):
    assert embedded_lm.arch == "llama"
    assert "Paris" in answer(embedded_lm, "What is the capital of France?")


def test_safetensors_cache_is_reused(embedded_lm, session_home, monkeypatch):
    from kedit_core.model import embedded_cache_dir, load_model

    monkeypatch.setenv("KEDIT_HOME", str(session_home))
    weights = embedded_cache_dir() / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = load_model("smollm2", show_progress=False)
    assert weights.stat().st_mtime_ns == mtime  # not rebuilt
    assert again.fingerprint == embedded_lm.fingerprint
    assert time.perf_counter() - t0 < 10  # generous: a rebuild de-quantises for ~20 s


def test_kedit_ask_cli(embedded_lm, session_home, tmp_path):
    env = dict(os.environ, KEDIT_HOME=str(session_home))
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ask", "What is the capital of France?"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_kedit_cli_clear_error_no_traceback(session_home):
    env = dict(os.environ, KEDIT_HOME=str(session_home))
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ask", "hi", "--model", "/no/such/model"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "neither the embedded model" in out.stderr
