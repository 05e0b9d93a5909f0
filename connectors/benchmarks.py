"""Readers for public knowledge-editing benchmark files. Every reader maps records to the
one `EditCase` type, so every editor runs on Wikidata streams and benchmarks alike.

Bad records (missing fields, empty answers) raise `BenchmarkFormatError` naming the file,
the record and the field, unless `skip_bad=True`, in which case they are skipped and
counted in the returned `ReadReport`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedit_core.errors import KeditError
from kedit_core.types import EditCase, Probe


class BenchmarkFormatError(KeditError):
    """A benchmark file or record does not have the expected shape."""


@dataclass
class ReadReport:
    path: str
    read: int = 0
    skipped: list[str] = field(default_factory=list)  # "record N: reason"


def _load_json_list(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise BenchmarkFormatError(f"benchmark file {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BenchmarkFormatError(f"{p} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _need(rec: dict[str, Any], key: str, where: str) -> Any:
    value = rec.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BenchmarkFormatError(f"{where}: missing or empty field {key!r}")
    return value


def zsre_record_to_case(rec: dict[str, Any], index: int, where: str = "zsre") -> EditCase:
    """One MEND-format zsRE record: edit `src` -> `alt`; paraphrase `rephrase`; locality `loc` -> `loc_ans`."""
    at = f"{where} record {index}"
    subject = _need(rec, "subject", at)
    src = _need(rec, "src", at)
    alt = _need(rec, "alt", at)
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
    return EditCase(
        case_id=f"zsre-{index}",
        subject=subject,
        relation=rec.get("relation", "zsre"),
        prompt=src,
        question=src,
        target_new=alt.strip(),
        target_old=(answers[0] if answers else rec.get("pred")),
        probes=probes,
        source="zsre",
    )


def read_zsre(
    path: str | Path, limit: int | None = None, skip_bad: bool = False, report: ReadReport | None = None
) -> list[EditCase]:
    """zsRE in MEND format (e.g. data/benchmarks/zsre_mend_train_1k.json).

    The public file has a few records with an empty `alt`; with `skip_bad=True` they are
    skipped and listed in `report.skipped`.
    """
    records = _load_json_list(path)
    cases: list[EditCase] = []
    for i, rec in enumerate(records):
        if limit is not None and len(cases) >= limit:
            break
        try:
            cases.append(zsre_record_to_case(rec, i, where=str(path)))
        except (BenchmarkFormatError, ValueError) as exc:
            if not skip_bad:
                raise BenchmarkFormatError(str(exc)) from exc
            if report is not None:
                report.skipped.append(str(exc))
    if report is not None:
        report.read = len(cases)
    return cases


def read_dataset(spec: str, limit: int | None = None, report: ReadReport | None = None) -> list[EditCase]:
    """`KIND:PATH`, e.g. `zsre:data/benchmarks/zsre_mend_train_1k.json`. Bad records are
    skipped (a stream should not stop on one broken record) and listed in `report`."""
    if ":" not in spec:
        raise BenchmarkFormatError(f"dataset {spec!r}: expected KIND:PATH, e.g. zsre:data/benchmarks/zsre_mend_train_1k.json")
    kind, path = spec.split(":", 1)
    readers = dataset_readers()
    if kind not in readers:
        raise BenchmarkFormatError(f"unknown dataset kind {kind!r}; known: {', '.join(sorted(readers))}")
    report = report if report is not None else ReadReport(path=path)
    cases = readers[kind](path, limit=limit, skip_bad=True, report=report)
    if report.skipped:
        import logging

        logging.getLogger(__name__).warning("%s: skipped %d bad records, e.g. %s", path, len(report.skipped), report.skipped[0])
    return cases


def dataset_readers() -> dict[str, Any]:
    """Name -> reader(path, limit=..., skip_bad=..., report=...). Extend here when adding a reader."""
    return {"zsre": read_zsre}
