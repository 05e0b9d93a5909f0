"""benchmarks/long_stream.py: a stream run in chunks (stopped and resumed from its saved
state) measures exactly what the same stream run in one go measures, on a tiny model."""
from __future__ import annotations

import json

import pytest

from benchmarks import long_stream

TIMING = {"window_s_per_edit", "s_per_edit", "rss_mb"}
ARGS = ["--model", "tiny-llama", "--limit", "30", "--batch", "10", "--checkpoints", "10,20", "--eval-cases", "6",
        "--locality-cases", "4", "--set", "targets.steps=4", "--set", "layers=[0]"]


def figures(progress: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in progress["rows"]]


def test_a_stream_resumed_in_chunks_measures_what_one_run_measures(tmp_path, kedit_home):
    whole = long_stream.run(long_stream.parse_args([*ARGS, "--state", str(tmp_path / "whole"), "--keep-checkpoints"]))
    assert [r["n_edits"] for r in whole["rows"]] == [10, 20, 30] and whole["n_done"] == 30
    kept = sorted(p.name for p in (tmp_path / "whole").glob("weights-*"))
    assert kept == ["weights-000010.safetensors", "weights-000020.safetensors", "weights-000030.safetensors"]
    assert whole["rows"][-1]["s_per_edit"] > 0 and "served_efficacy" in whole["rows"][-1]

    chunked = {}
    for chunk in range(4):  # one batch per run, then a run with nothing left to do
        chunked = long_stream.run(long_stream.parse_args([*ARGS, "--state", str(tmp_path / "chunks"),
                                                          "--max-batches", "1"]))
        assert chunked["n_done"] == min(30, 10 * (chunk + 1))
    assert chunked["chunks"] == 4
    assert [p.name for p in (tmp_path / "chunks").glob("weights-*")] == ["weights-000030.safetensors"]  # the latest only
    assert figures(chunked) == figures(whole)
    # the saved edited weights are the same bits
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / f"weights-{whole['saved']}.safetensors"))
    b = load_file(str(tmp_path / "chunks" / f"weights-{chunked['saved']}.safetensors"))
    assert a.keys() == b.keys() and a and all(a[k].equal(b[k]) for k in a)
    assert json.loads((tmp_path / "chunks" / "figures.json").read_text())[-1]["n_edits"] == 30
    # a state made with other settings is not silently reused
    with pytest.raises(SystemExit, match="was edited with --set"):
        long_stream.run(long_stream.parse_args([*ARGS, "--state", str(tmp_path / "chunks"), "--set", "targets.lr=0.1"]))
    # --report reads the saved figures without editing
    report = long_stream.run(long_stream.parse_args([*ARGS, "--state", str(tmp_path / "chunks"), "--report"]))
    assert report["n_done"] == 30
