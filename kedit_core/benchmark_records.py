"""Benchmark records -> `EditCase`: the pure parsing of a record already read from a file.

`connectors/benchmarks.py` reads the public benchmark files with it (and owns the file
reading, limits and skip reports); LTE (`kedit_core/editors/lte.py`) reads the zsRE slice it
aligns on with it, so the domain needs no connector for its own shipped data.
"""
from __future__ import annotations

from typing import Any

from kedit_core.errors import KeditError
from kedit_core.render import prune_aliases
from kedit_core.types import EditCase, Probe

__all__ = ["BenchmarkFormatError", "need_field", "strings", "zsre_record_to_case"]


class BenchmarkFormatError(KeditError):
    """A benchmark file or record does not have the expected shape."""


def need_field(rec: dict[str, Any], key: str, where: str) -> Any:
    """`rec[key]`, which must be present and (for a string) not blank."""
    value = rec.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BenchmarkFormatError(f"{where}: missing or empty field {key!r}")
    return value


def strings(value: Any) -> list[str]:
    """The non-empty strings of a string-or-list field, stripped, in order."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [v.strip() for v in items if isinstance(v, str) and v.strip()]


def zsre_record_to_case(rec: dict[str, Any], index: int, where: str = "zsre") -> EditCase:
    """One MEND-format zsRE record: edit `src` -> `alt`; paraphrase `rephrase`; locality `loc` -> `loc_ans`."""
    at = f"{where} record {index}"
    subject = need_field(rec, "subject", at)
    src = need_field(rec, "src", at)
    alt = need_field(rec, "alt", at)
    if subject not in src:
        raise BenchmarkFormatError(f"{at}: subject {subject!r} does not occur in question {src!r}")
    probes = []
    if rec.get("rephrase"):
        probes.append(Probe("paraphrase", rec["rephrase"], alt))
    if rec.get("loc") and rec.get("loc_ans"):
        loc = rec["loc"]
        # MEND prefixes NQ questions with "nq question: "; the question itself follows.
        loc = loc.split("nq question:", 1)[-1].strip()
        loc = loc[0].upper() + loc[1:] + ("?" if not loc.endswith("?") else "")
        probes.append(Probe("locality", loc, rec["loc_ans"]))
    answers = rec.get("answers") or []
    target_old = answers[0] if answers else rec.get("pred")
    # `answers` lists every true answer (often several objects of one relation): all of them
    # are old values; one that is the new value too is left out by `prune_aliases`.
    _, old_aliases = prune_aliases(alt.strip(), [], target_old, strings(answers))
    return EditCase(
        case_id=f"zsre-{index}",
        subject=subject,
        relation=rec.get("relation", "zsre"),
        prompt=src,
        question=src,
        target_new=alt.strip(),
        target_old=target_old,
        probes=probes,
        source="zsre",
        meta={"aliases": [], "old_aliases": old_aliases},
    )
