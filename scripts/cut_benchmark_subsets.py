"""Cut the small benchmark subsets shipped in data/benchmarks/ from the public files in
../shared/data/ (provenance: data/benchmarks/SOURCES.md).

Each subset is the first N records of its source, unchanged, re-serialised as a JSON list
(indent 1, UTF-8), so every file stays under 300 KB. Run from the repository root:

    python scripts/cut_benchmark_subsets.py [--source ../shared/data]
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

# source file -> (subset file, number of leading records kept)
SUBSETS = {
    "knowedit_zsre_test.json": ("knowedit_zsre_test_200.json", 200),
    "counterfact_edit.json": ("counterfact_edit_200.json", 200),
    "counterfact_rome_format_20.json": ("counterfact_rome_format_20.json", 20),
    "mquake_hard.json": ("mquake_hard_40.json", 40),
}
MAX_BYTES = 300_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--dest", default=str(Path(__file__).resolve().parents[1] / "data" / "benchmarks"))
    args = ap.parse_args()
    src, dest = Path(args.source), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, (out_name, n) in SUBSETS.items():
        raw = (src / name).read_bytes()
        records = json.loads(raw)
        text = json.dumps(records[:n], ensure_ascii=False, indent=1) + "\n"
        if len(text.encode()) > MAX_BYTES:
            raise SystemExit(f"{out_name}: {len(text.encode())} bytes > {MAX_BYTES}; keep fewer records")
        (dest / out_name).write_text(text, encoding="utf-8")
        print(f"{out_name}: first {min(n, len(records))} of {len(records)} records of {name} "
              f"(source sha256 {hashlib.sha256(raw).hexdigest()[:16]}), {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
