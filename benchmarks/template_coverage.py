"""Template coverage: the share of fact changes whose property has its own template in
kedit_core/data/property_templates.txt rather than the generic label fallback.

Inputs (any mix): entity JSON files (wbgetentities / EntityData / revision content; every
current statement counts as one change, as if the item were created), pairs of revisions
(`--pair OLD NEW`: the real diff), and JSONL files of FactChange dicts (a recorded window,
e.g. data/wikidata_day/*.jsonl). With no input it reads the recorded fixtures in
tests/fixtures/wikidata/ (real recorded answers) and data/wikidata_day/ when that exists.

    python benchmarks/template_coverage.py [PATHS...] [--pair OLD NEW] [--json]

Reported per datatype, because the table targets item-valued, date and quantity
properties; identifiers (external-id, and 2015-era ids typed "string") are expected to
stay uncovered: they are filtered out of QA, not templated.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kedit_core.diff import EntityFormatError, diff_entities, parse_entity  # noqa: E402
from kedit_core.templates import coverage, templates  # noqa: E402
from kedit_core.types import FactChange  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUTS = [REPO / "tests" / "fixtures" / "wikidata", REPO / "data" / "wikidata_day"]
TARGET_DATATYPES = ("wikibase-item", "time", "quantity")


def _items(obj: dict) -> list[str]:
    ents = obj.get("entities") if isinstance(obj, dict) else None
    if isinstance(ents, dict):
        return [k for k, e in ents.items() if k.startswith("Q") and "missing" not in e]
    return [obj["id"]] if isinstance(obj, dict) and obj.get("id") else []


def changes_from_file(path: Path) -> list[FactChange]:
    if path.suffix == ".jsonl":
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                out.append(FactChange.from_dict(d.get("change", d)))
        return out
    obj = json.loads(path.read_text(encoding="utf-8"))
    ids = [k for k, e in (obj.get("entities") or {}).items() if "missing" not in e] if isinstance(obj, dict) else []
    out = []
    for eid in ids or [None]:
        try:
            entity = parse_entity(obj, eid)
        except EntityFormatError:
            continue
        if entity is not None and str(entity.get("id", "Q")).startswith("Q"):
            out.extend(diff_entities(None, entity))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--pair", nargs=2, type=Path, action="append", default=[], metavar=("OLD", "NEW"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    files: list[Path] = []
    for p in args.paths or ([] if args.pair else DEFAULT_INPUTS):
        if p.is_dir():
            files += sorted(x for x in p.iterdir() if x.suffix in (".json", ".jsonl") and not x.name.startswith("error"))
        elif p.exists():
            files.append(p)
    changes: list[FactChange] = []
    per_file: dict[str, int] = {}
    for f in files:
        try:
            got = changes_from_file(f)
        except (ValueError, EntityFormatError) as exc:
            print(f"skipped {f.name}: {exc}", file=sys.stderr)
            continue
        per_file[f.name] = len(got)
        changes += got
    for old, new in args.pair:
        a, b = json.loads(old.read_text()), json.loads(new.read_text())
        shared = sorted(set(_items(a)) & set(_items(b))) or [None]
        got = [c for eid in shared for c in diff_entities(parse_entity(a, eid), parse_entity(b, eid))]
        per_file[f"{old.name} -> {new.name}"] = len(got)
        changes += got

    by_type: dict[str, list[str]] = defaultdict(list)
    for ch in changes:
        by_type[ch.datatype or "?"].append(ch.property)
    overall = coverage(ch.property for ch in changes)
    target = coverage(ch.property for ch in changes if ch.datatype in TARGET_DATATYPES)
    result = {
        "table_properties": len(templates()),
        "inputs": per_file,
        "all_changes": overall.to_dict(),
        "item_date_quantity_changes": target.to_dict(),
        "by_datatype": {t: coverage(p).to_dict() for t, p in sorted(by_type.items())},
        "datatypes": dict(Counter({t: len(p) for t, p in by_type.items()}).most_common()),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"template table: {result['table_properties']} properties; {len(changes)} fact changes from {len(per_file)} inputs")
    print(f"all changes:                  {overall.specific}/{overall.total} specific = {overall.share:.1%}")
    print(f"item/date/quantity changes:   {target.specific}/{target.total} specific = {target.share:.1%}")
    for t, pids in sorted(by_type.items(), key=lambda kv: -len(kv[1])):
        c = coverage(pids)
        print(f"  {t:<18} {c.specific:>5}/{c.total:<5} {c.share:6.1%}")
    print("most frequent item/date/quantity properties without a template:",
          ", ".join(f"{p}x{n}" for p, n in target.uncovered.most_common(12)) or "none")


if __name__ == "__main__":
    main()
