"""Edit metrics, batched: what an edit must do and must not break.

For a list of cases, every probe of every case is scored in a few large batches (all
prompts of one kind together), never one question at a time:

- efficacy: the edit's own prompt -> new answer;
- paraphrase: held-out wordings -> new answer (generalisation);
- locality: unrelated prompts (other subjects, dataset locality questions) must get the
  same answer tokens as the unedited model (token agreement, the field's convention);
  other facts of the same subject are scored apart (`locality_same`); plus accuracy
  against the dataset answer where one exists;
- negation (PP/PN): "Is it true that ... NEW?" must be answered Yes, "... OLD?" No;
  the answer is whichever of " Yes" / " No" is more likely;
- multi-hop and portability: token accuracy on the two-hop / portability answer.

Teacher-forced token accuracy (`*_acc`) and greedy exact match (`*_em`) are both reported.
Memory editors are evaluated through `rewriter.rewrite_prompt`, exactly as they are served.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from kedit_core.answer import PromptRewriter
from kedit_core.model import LoadedModel
from kedit_core.scoring import (
    answer_logprob,
    greedy_exact_match,
    predicted_tokens,
    token_accuracy,
    token_agreement,
)
from kedit_core.served_answers import locality_questions, record_replies, served_metrics
from kedit_core.types import EditCase, Probe

LOCALITY_KINDS = ("locality", "locality_other", "locality_same")
ALL_KINDS = ("efficacy", "paraphrase", "locality", "negation", "multihop", "portability")


def _probe_key(p: Probe) -> tuple[str, str, str]:
    return (p.kind, p.prompt, p.answer)


@dataclass
class Reference:
    """What the unedited model predicts on every locality probe (token ids at the answer
    positions). Computed once, before the first edit of a stream."""

    predictions: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    answers: dict[tuple[str, str, str], str] = field(default_factory=dict)
    # the unedited model's chat replies to the same questions (served locality), if recorded
    replies: dict[str, str] = field(default_factory=dict)


def _locality_probes(cases: Iterable[EditCase]) -> list[Probe]:
    return [p for c in cases for p in c.probes if p.kind in LOCALITY_KINDS]


def reference_predictions(
    lm: LoadedModel,
    cases: Sequence[EditCase],
    batch_size: int = 32,
    served: bool = True,
    rewriter: PromptRewriter | None = None,
) -> Reference:
    """Record the unedited model's answers on the cases' locality probes: teacher-forced
    predictions and (with `served`) its chat replies, for `served_locality`.

    A probe with an empty expected answer means "whatever the base model says": its
    answer becomes the base model's own greedy continuation (a few tokens).
    """
    from kedit_core.answer import generate

    ref = Reference()
    probes = [p for p in _locality_probes(cases) if _probe_key(p) not in ref.predictions]
    blank = [p for p in probes if not p.answer.strip()]
    if blank:
        outs = generate(lm, [p.prompt for p in blank], max_new_tokens=6)
        for p, o in zip(blank, outs):
            ref.answers[_probe_key(p)] = o.split("\n")[0].strip() or "."
    answers = [ref.answers.get(_probe_key(p), p.answer) for p in probes]
    for p, a, pred in zip(probes, answers, predicted_tokens(lm, [p.prompt for p in probes], answers, batch_size)):
        ref.predictions[_probe_key(p)] = pred
        ref.answers[_probe_key(p)] = a
    if served:
        record_replies(lm, locality_questions(cases), ref.replies, rewriter)
    return ref


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _ask(prompts: list[str], rewriter: PromptRewriter | None) -> list[str]:
    return [rewriter.rewrite_prompt(p) for p in prompts] if rewriter is not None else prompts


def _acc_em(
    lm: LoadedModel, prompts: list[str], answers: list[str], rewriter: PromptRewriter | None, greedy: bool, bs: int
) -> tuple[list[float], list[bool] | None]:
    asked = _ask(prompts, rewriter)
    acc = token_accuracy(lm, asked, answers, bs)
    em = greedy_exact_match(lm, asked, answers, bs) if greedy else None
    return acc, em


def evaluate_cases(
    lm: LoadedModel,
    cases: Sequence[EditCase],
    reference: Reference | None = None,
    kinds: Sequence[str] = ALL_KINDS,
    rewriter: PromptRewriter | None = None,
    greedy: bool = True,
    batch_size: int = 32,
    per_case: dict[str, dict[str, float]] | None = None,
    served: bool = True,
) -> dict[str, float]:
    """Score `cases` on the current model. Returns metric name -> mean over probes.

    Teacher-forced (`*_acc`), greedy exact match (`*_em`, with `greedy`) and, with
    `served`, the served-answer metrics (`served_*`, kedit_core/served_answers.py: free
    chat replies, as users read them). Metrics whose probes are absent are left out (not
    reported as 0). Pass `per_case` (a dict) to also receive per-case efficacy values
    keyed by case id (used for retention and for the report's worst-hit tables).
    """
    out: dict[str, float] = {}
    cases = list(cases)
    if not cases:
        return out

    if "efficacy" in kinds:
        acc, em = _acc_em(lm, [c.prompt for c in cases], [c.target_new for c in cases], rewriter, greedy, batch_size)
        out["efficacy_acc"] = _mean(acc)
        if em is not None:
            out["efficacy_em"] = _mean([float(x) for x in em])
        if per_case is not None:
            for c, a in zip(cases, acc):
                per_case.setdefault(c.case_id, {})["efficacy_acc"] = a

    for kind in ("paraphrase", "multihop", "portability"):
        if kind not in kinds:
            continue
        probes = [p for c in cases for p in c.probes_of(kind)]
        if not probes:
            continue
        acc, em = _acc_em(lm, [p.prompt for p in probes], [p.answer for p in probes], rewriter, greedy, batch_size)
        out[f"{kind}_acc"] = _mean(acc)
        if em is not None:
            out[f"{kind}_em"] = _mean([float(x) for x in em])

    if "locality" in kinds:
        out.update(_locality(lm, cases, reference, rewriter, batch_size))

    if "negation" in kinds:
        out.update(_negation(lm, cases, rewriter, batch_size))
    if served:
        replies = reference.replies if reference is not None and reference.replies else None
        out.update(served_metrics(lm, cases, replies, kinds=kinds, rewriter=rewriter, per_case=per_case))
    return {k: v for k, v in out.items() if v is not None}


def _locality(
    lm: LoadedModel, cases: Sequence[EditCase], reference: Reference | None, rewriter: PromptRewriter | None, bs: int
) -> dict[str, float]:
    probes = _locality_probes(cases)
    if not probes:
        return {}
    out: dict[str, float] = {}
    if reference is not None:
        known = [p for p in probes if _probe_key(p) in reference.predictions]
        if known:
            answers = [reference.answers[_probe_key(p)] for p in known]
            now = predicted_tokens(lm, _ask([p.prompt for p in known], rewriter), answers, bs)
            agree = token_agreement([reference.predictions[_probe_key(p)] for p in known], now)
            unrelated, same = split_by_scope([p.kind for p in known], agree)
            if unrelated:
                out["locality"] = _mean(unrelated)
            if same:
                out["locality_same"] = _mean(same)
            other = [a for p, a in zip(known, agree) if p.kind == "locality_other"]
            if other:
                out["locality_other"] = _mean(other)
    with_answer = [p for p in probes if p.answer.strip()]
    if with_answer:
        acc = token_accuracy(lm, _ask([p.prompt for p in with_answer], rewriter), [p.answer for p in with_answer], bs)
        out["locality_answer_acc"] = _mean(acc)
    return out


def split_by_scope(kinds: Sequence[str], scores: Sequence[float]) -> tuple[list[float], list[float]]:
    """Locality scores split into (unrelated knowledge, other facts of an edited subject).

    `locality` means unrelated knowledge (other subjects, dataset locality prompts), the
    field's definition; `locality_same` is reported apart because it is the known weak spot
    of locate-then-edit methods, so one cannot hide the other in an average.
    """
    unrelated = [s for k, s in zip(kinds, scores) if k != "locality_same"]
    same = [s for k, s in zip(kinds, scores) if k == "locality_same"]
    return unrelated, same


def _negation(lm: LoadedModel, cases: Sequence[EditCase], rewriter: PromptRewriter | None, bs: int) -> dict[str, float]:
    """PP/PN: the model's Yes/No on "Is it true that ..." statements.

    A probe's `answer` is "Yes" or "No"; `meta["polarity"]` says whether the statement
    uses the new ("new") or the old ("old") answer. An edit that makes the model say Yes to
    both counts against it: `negation_acc` is the share answered correctly, and
    `negation_pn` (old statement rejected) is reported separately because it is where
    edited models fail.
    """
    probes = [p for c in cases for p in c.probes_of("negation")]
    if not probes:
        return {}
    asked = _ask([p.prompt for p in probes], rewriter)
    yes = answer_logprob(lm, asked, ["Yes"] * len(probes), bs)
    no = answer_logprob(lm, asked, ["No"] * len(probes), bs)
    said = ["Yes" if y >= n else "No" for y, n in zip(yes, no)]
    right = [float(s.lower() == p.answer.strip().lower()) for s, p in zip(said, probes)]
    out = {"negation_acc": _mean(right)}
    pp = [r for r, p in zip(right, probes) if p.meta.get("polarity") == "new"]
    pn = [r for r, p in zip(right, probes) if p.meta.get("polarity") == "old"]
    if pp:
        out["negation_pp"] = _mean(pp)
    if pn:
        out["negation_pn"] = _mean(pn)
    return out


def latest_per_fact(cases: Sequence[EditCase]) -> list[EditCase]:
    """Drop cases overwritten by a later case on the same subject and relation: when a
    stream edits one fact twice, the later edit wins and the earlier is not retained."""
    last: dict[tuple[str, str], int] = {c.fact_key: i for i, c in enumerate(cases)}
    return [c for i, c in enumerate(cases) if last[c.fact_key] == i]


def retention(
    lm: LoadedModel,
    earlier_cases: Sequence[EditCase],
    all_cases_so_far: Sequence[EditCase] | None = None,
    rewriter: PromptRewriter | None = None,
    greedy: bool = False,
    batch_size: int = 32,
    kinds: Sequence[str] = ("efficacy",),
    served: bool = True,
) -> dict[str, float]:
    """Efficacy of earlier edits now (`retention_acc`; served: `served_retention`),
    skipping facts a later case overwrote; with "paraphrase" in `kinds` also their
    paraphrases (`retention_paraphrase_acc`, `served_retention_paraphrase`), which tells
    sequential erosion of generalisation apart from cases that never generalised."""
    if all_cases_so_far is not None:
        alive = {c.case_id for c in latest_per_fact(all_cases_so_far)}
        earlier_cases = [c for c in earlier_cases if c.case_id in alive]
    m = evaluate_cases(lm, earlier_cases, kinds=kinds, rewriter=rewriter, greedy=greedy, batch_size=batch_size,
                       served=served)
    return {_retention_name(k): v for k, v in m.items()}


def _retention_name(metric: str) -> str:
    """efficacy_acc -> retention_acc, paraphrase_acc -> retention_paraphrase_acc,
    served_efficacy -> served_retention, served_paraphrase -> served_retention_paraphrase."""
    if metric.startswith("served_"):
        rest = metric[len("served_"):]
        return "served_retention" + ("" if rest == "efficacy" else "_" + rest)
    return "retention" + metric[len("efficacy"):] if metric.startswith("efficacy") else "retention_" + metric
