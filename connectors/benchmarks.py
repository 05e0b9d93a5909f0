"""Readers for public knowledge-editing benchmark files. Every reader maps records to the
one `EditCase` type, so every editor runs on Wikidata streams and benchmarks alike.

Bad records (missing fields, empty answers) raise `BenchmarkFormatError` naming the file,
the record and the field, unless `skip_bad=True`, in which case they are skipped and
counted in the returned `ReadReport`.

Where a record lists other names of an answer, they go to `meta["aliases"]` (new value)
and `meta["old_aliases"]` (old value) of the case or probe, for the served-answer protocol
(`kedit_core.served_answers`): zsRE's `answers`, KnowEdit's `ground_truth` list, MQuAKE's
per-hop `answer_alias` and `new_answer_alias`. CounterFact files carry none.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the record parsing shared with the domain (LTE reads its shipped zsRE slice with it)
from kedit_core.benchmark_records import BenchmarkFormatError, zsre_record_to_case
from kedit_core.benchmark_records import strings as _strs
from kedit_core.render import prune_aliases
from kedit_core.types import EditCase, Probe


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


def read_zsre(
    path: str | Path, limit: int | None = None, skip_bad: bool = False, report: ReadReport | None = None
) -> list[EditCase]:
    """zsRE in MEND format (e.g. data/benchmarks/zsre_mend_train_1k.json).

    The public file has a few records with an empty `alt`; with `skip_bad=True` they are
    skipped and listed in `report.skipped`.
    """
    return _read_records(path, lambda r, i, w: [zsre_record_to_case(r, i, w)], limit, skip_bad, report)


def _read_records(
    path: str | Path,
    to_cases: Any,
    limit: int | None,
    skip_bad: bool,
    report: ReadReport | None,
    whole_records: bool = False,
) -> list[EditCase]:
    """Shared loop: `to_cases(rec, index, where)` returns the record's cases; a bad record
    raises (naming file, record and field) or, with `skip_bad`, is skipped and reported."""
    records = _load_json_list(path)
    cases: list[EditCase] = []
    for i, rec in enumerate(records):
        if limit is not None and len(cases) >= limit:
            break
        try:
            if not isinstance(rec, dict):
                raise BenchmarkFormatError(f"{path} record {i}: expected an object, got {type(rec).__name__}")
            cases.extend(to_cases(rec, i, str(path)))
        except (BenchmarkFormatError, ValueError, TypeError, KeyError) as exc:
            msg = str(exc) if isinstance(exc, BenchmarkFormatError) else f"{path} record {i}: {exc}"
            if not skip_bad:
                raise BenchmarkFormatError(msg) from exc
            if report is not None:
                report.skipped.append(msg)
    if limit is not None and not whole_records:
        cases = cases[:limit]
    if report is not None:
        report.read = len(cases)
    return cases


def _first_str(value: Any) -> str | None:
    """Datasets give answers as a string or a list of strings; take the first non-empty."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        for v in value:
            if isinstance(v, str) and v.strip():
                return v.strip()
    return None


def _need_str(rec: dict[str, Any], key: str, where: str) -> str:
    value = _first_str(rec.get(key))
    if value is None:
        raise BenchmarkFormatError(f"{where}: missing or empty field {key!r}")
    return value


def _need_subject_in(subject: str, prompt: str, where: str, field_name: str = "prompt") -> None:
    if subject not in prompt:
        raise BenchmarkFormatError(f"{where}: subject {subject!r} does not occur in {field_name} {prompt!r}")


# --------------------------------------------------------------------------- KnowEdit ZsRE

def knowedit_record_to_case(rec: dict[str, Any], index: int, where: str = "knowedit") -> EditCase:
    """KnowEdit ZsRE: `prompt` -> `target_new`; `rephrase_prompt` paraphrase; locality
    `Relation_Specificity` (other facts of the same subject, so `locality_same`); portability
    `Reasoning` / `Subject_Aliasing` / `Logical_Generalization` (kind "portability", the
    family in meta)."""
    at = f"{where} record {index}"
    subject = _need_str(rec, "subject", at)
    prompt = _need_str(rec, "prompt", at)
    target = _need_str(rec, "target_new", at)
    _need_subject_in(subject, prompt, at)
    probes: list[Probe] = []
    if _first_str(rec.get("rephrase_prompt")):
        probes.append(Probe("paraphrase", rec["rephrase_prompt"].strip(), target))
    for family, items in (rec.get("locality") or {}).items():
        for j, item in enumerate(items or []):
            q, a = _first_str((item or {}).get("prompt")), _first_str((item or {}).get("ground_truth"))
            if q is None or a is None:
                raise BenchmarkFormatError(f"{at}: locality.{family}[{j}] needs 'prompt' and 'ground_truth'")
            kind = "locality_same" if family == "Relation_Specificity" else "locality"
            probes.append(Probe(kind, q, a, {"family": family}))
    for family, items in (rec.get("portability") or {}).items():
        for j, item in enumerate(items or []):
            q, a = _first_str((item or {}).get("prompt")), _first_str((item or {}).get("ground_truth"))
            if q is None or a is None:
                raise BenchmarkFormatError(f"{at}: portability.{family}[{j}] needs 'prompt' and 'ground_truth'")
            # a list of answers (the shipped subset has plain strings): the others are aliases
            port_aliases, _ = prune_aliases(a, _strs((item or {}).get("ground_truth"))[1:])
            probes.append(Probe("portability", q, a, {"family": family, "aliases": port_aliases}))
    target_old = _first_str(rec.get("ground_truth"))
    # `ground_truth` is a list of true answers: all are old values
    _, old_aliases = prune_aliases(target, [], target_old, _strs(rec.get("ground_truth")))
    return EditCase(
        case_id=f"knowedit-{index}",
        subject=subject,
        relation=rec.get("relation") or "zsre",
        prompt=prompt,
        question=prompt,
        target_new=target,
        target_old=target_old,
        probes=probes,
        source="knowedit",
        meta={"aliases": [], "old_aliases": old_aliases},
    )


def read_knowedit(path: str | Path, limit: int | None = None, skip_bad: bool = False,
                  report: ReadReport | None = None) -> list[EditCase]:
    """KnowEdit ZsRE (EasyEdit data/knowedit/ZsRE/ZsRE-test-all.json shape)."""
    return _read_records(path, lambda r, i, w: [knowedit_record_to_case(r, i, w)], limit, skip_bad, report)


# --------------------------------------------------------------------------- CounterFact

def counterfact_edit_record_to_case(rec: dict[str, Any], index: int, where: str = "counterfact") -> EditCase:
    """EasyEdit "counterfact-edit": `prompt` -> `target_new` (old: `ground_truth`);
    `rephrase_prompt`; `locality_prompt` -> `locality_ground_truth` (another subject with
    the same relation: `locality_other`)."""
    at = f"{where} record {index}"
    subject = _need_str(rec, "subject", at)
    prompt = _need_str(rec, "prompt", at)
    target = _need_str(rec, "target_new", at)
    _need_subject_in(subject, prompt, at)
    probes: list[Probe] = []
    if _first_str(rec.get("rephrase_prompt")):
        probes.append(Probe("paraphrase", rec["rephrase_prompt"].strip(), target))
    loc_q, loc_a = _first_str(rec.get("locality_prompt")), _first_str(rec.get("locality_ground_truth"))
    if loc_q and loc_a:
        probes.append(Probe("locality_other", loc_q, loc_a))
    return EditCase(
        case_id=f"counterfact-{rec.get('case_id', index)}",
        subject=subject,
        relation=rec.get("relation_id") or "counterfact",
        prompt=prompt,
        question=None,
        target_new=target,
        target_old=_first_str(rec.get("ground_truth")),
        probes=probes,
        source="counterfact",
    )


def read_counterfact(path: str | Path, limit: int | None = None, skip_bad: bool = False,
                     report: ReadReport | None = None) -> list[EditCase]:
    """CounterFact in the EasyEdit "counterfact-edit" shape."""
    return _read_records(path, lambda r, i, w: [counterfact_edit_record_to_case(r, i, w)], limit, skip_bad, report)


def _rewrite_target(rw: dict[str, Any], key: str, at: str) -> str:
    target = rw.get(key)
    text = _first_str(target.get("str") if isinstance(target, dict) else target)
    if text is None:
        raise BenchmarkFormatError(f"{at}: missing or empty field 'requested_rewrite.{key}.str'")
    return text


def _rewrite_prompt(rw: dict[str, Any], at: str) -> tuple[str, str]:
    """ROME-style `prompt` with "{}" for the subject -> (filled prompt, subject)."""
    subject = _need_str(rw, "subject", at + " requested_rewrite")
    template = _need_str(rw, "prompt", at + " requested_rewrite")
    if "{}" not in template:
        raise BenchmarkFormatError(f"{at}: requested_rewrite.prompt {template!r} has no '{{}}' for the subject")
    return template.replace("{}", subject), subject


def counterfact_rome_record_to_case(rec: dict[str, Any], index: int, where: str = "counterfact_rome") -> EditCase:
    """Original CounterFact (ROME): `requested_rewrite` {prompt with "{}", subject,
    target_new.str, target_true.str}; `paraphrase_prompts`; `neighborhood_prompts` (other
    subjects that share the true object: expected to keep `target_true`, `locality_other`);
    `attribute_prompts` (subjects that truly have the new object, kept in meta);
    `generation_prompts` in meta."""
    at = f"{where} record {index}"
    rw = rec.get("requested_rewrite")
    if not isinstance(rw, dict):
        raise BenchmarkFormatError(f"{at}: missing or malformed field 'requested_rewrite'")
    prompt, subject = _rewrite_prompt(rw, at)
    target = _rewrite_target(rw, "target_new", at)
    old = _rewrite_target(rw, "target_true", at)
    probes = [Probe("paraphrase", p, target) for p in rec.get("paraphrase_prompts") or [] if _first_str(p)]
    probes += [Probe("locality_other", p, old) for p in rec.get("neighborhood_prompts") or [] if _first_str(p)]
    return EditCase(
        case_id=f"counterfact-{rec.get('case_id', index)}",
        subject=subject,
        relation=rw.get("relation_id") or "counterfact",
        prompt=prompt,
        question=None,
        target_new=target,
        target_old=old,
        probes=probes,
        source="counterfact",
        meta={
            "attribute_prompts": list(rec.get("attribute_prompts") or []),
            "generation_prompts": list(rec.get("generation_prompts") or []),
            "target_new_id": (rw.get("target_new") or {}).get("id"),
            "target_true_id": (rw.get("target_true") or {}).get("id"),
        },
    )


def read_counterfact_rome(path: str | Path, limit: int | None = None, skip_bad: bool = False,
                          report: ReadReport | None = None) -> list[EditCase]:
    """CounterFact in the original ROME record shape."""
    return _read_records(path, lambda r, i, w: [counterfact_rome_record_to_case(r, i, w)], limit, skip_bad, report)


# --------------------------------------------------------------------------- MQuAKE

def mquake_record_to_cases(rec: dict[str, Any], index: int, where: str = "mquake") -> list[EditCase]:
    """One MQuAKE record -> one `EditCase` per `requested_rewrite` (applied together, in
    order, as one batch: meta["group"]). Each case's own single-hop question is a
    paraphrase; the multi-hop `questions` -> `new_answer` are multi-hop probes on the last
    edit of the chain (the one after which every hop has its new value)."""
    at = f"{where} record {index}"
    rewrites = rec.get("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise BenchmarkFormatError(f"{at}: missing or empty field 'requested_rewrite'")
    questions = [q for q in rec.get("questions") or [] if _first_str(q)]
    if not questions:
        raise BenchmarkFormatError(f"{at}: missing or empty field 'questions'")
    new_answer = _need_str(rec, "new_answer", at)
    group = f"mquake-{rec.get('case_id', index)}"
    alias_of = _mquake_aliases(rec)
    cases: list[EditCase] = []
    for j, rw in enumerate(rewrites):
        where_rw = f"{at} requested_rewrite[{j}]"
        if not isinstance(rw, dict):
            raise BenchmarkFormatError(f"{where_rw}: expected an object")
        prompt, subject = _rewrite_prompt(rw, where_rw)
        target = _rewrite_target(rw, "target_new", where_rw)
        old = _rewrite_target(rw, "target_true", where_rw)
        probes = []
        if _first_str(rw.get("question")):
            probes.append(Probe("paraphrase", rw["question"].strip(), target))
        new_aliases, old_aliases = prune_aliases(target, alias_of(rw.get("target_new"), target),
                                                 old, alias_of(rw.get("target_true"), old))
        cases.append(
            EditCase(
                case_id=f"{group}-{j}",
                subject=subject,
                relation=rw.get("relation_id") or "mquake",
                prompt=prompt,
                question=_first_str(rw.get("question")),
                target_new=target,
                target_old=old,
                probes=probes,
                source="mquake",
                meta={"group": group, "step": j, "steps": len(rewrites),
                      "aliases": new_aliases, "old_aliases": old_aliases},
            )
        )
    old_answer = _first_str(rec.get("answer"))
    aliases, old_aliases = prune_aliases(new_answer, _strs(rec.get("new_answer_alias")),
                                         old_answer, _strs(rec.get("answer_alias")))
    cases[-1].probes.extend(
        Probe("multihop", q.strip(), new_answer, {"aliases": aliases, "old_answer": old_answer,
                                                  "old_aliases": old_aliases,
                                                  "hops": len(rec.get("new_single_hops") or rewrites)})
        for q in questions
    )
    return cases


def _mquake_aliases(rec: dict[str, Any]) -> Any:
    """(target {"str", "id"}, its text) -> that entity's `answer_alias` list, from the record's
    hops: `single_hops` / `new_single_hops` answer the chains `orig.triples` /
    `orig.new_triples`, so hop k's aliases belong to triple k's object id; without those
    ids, the hop whose answer is the same text. A value no hop answers
    (an edit's old object off both chains) has none."""
    by_id: dict[str, list[str]] = {}
    by_text: dict[str, list[str]] = {}
    orig = rec.get("orig") if isinstance(rec.get("orig"), dict) else {}
    for hops_key, triples_key in (("single_hops", "triples"), ("new_single_hops", "new_triples")):
        hops = rec.get(hops_key) if isinstance(rec.get(hops_key), list) else []
        triples = orig.get(triples_key) if isinstance(orig.get(triples_key), list) else []
        for k, hop in enumerate(hops):
            if not isinstance(hop, dict):
                continue
            answer, aliases = _first_str(hop.get("answer")), _strs(hop.get("answer_alias"))
            if answer is None:
                continue
            by_text.setdefault(answer, aliases)
            if len(triples) == len(hops) and isinstance(triples[k], list) and len(triples[k]) == 3:
                by_id.setdefault(str(triples[k][2]), aliases)

    def alias_of(target: Any, text: str) -> list[str]:
        tid = target.get("id") if isinstance(target, dict) else None
        if tid and by_id:  # ids known: only the same entity's aliases, never a namesake's
            return list(by_id.get(str(tid), []))
        return list(by_text.get(text, []))

    return alias_of


def read_mquake(path: str | Path, limit: int | None = None, skip_bad: bool = False,
                report: ReadReport | None = None) -> list[EditCase]:
    """MQuAKE (multi-hop; several edits per record). `limit` counts cases, but a record's
    cases are never split: the limit is rounded to whole records."""
    return _read_records(path, mquake_record_to_cases, limit, skip_bad, report, whole_records=True)


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
    return {
        "zsre": read_zsre,
        "knowedit": read_knowedit,
        "counterfact": read_counterfact,
        "counterfact_rome": read_counterfact_rome,
        "mquake": read_mquake,
    }
