"""Command-line arguments shared by the diagnostics that run a sequential edit stream
(`locality_flips.py`, `paraphrase_gap.py`): which editor, which benchmark, how many edits."""
from __future__ import annotations

import argparse
from pathlib import Path

ZSRE = Path(__file__).resolve().parents[1] / "data" / "benchmarks" / "zsre_mend_train_1k.json"


def stream_parser(description: str, limit: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--method", default="alphaedit")
    ap.add_argument("--data", default=f"zsre:{ZSRE}")
    ap.add_argument("--limit", type=int, default=limit)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--set", dest="settings", action="append", default=[], help="editor setting key=value")
    return ap
