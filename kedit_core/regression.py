"""General-ability regression checks for lifelong editing, and the suite they run on.

Each batch of edits can look fine on its own while the model slowly forgets how to do
everything else. The `RegressionSuite` is frozen when a pipeline starts, on the *base*
(unedited) model, and every later check compares against it:

- known facts: ~50 well-known cloze facts, kept only if the base model gets them right,
  so `known_facts_acc` starts at 1.0 and any drop is damage;
- reference perplexity (`ref_ppl`) on a few paragraphs of plain encyclopedic English;
- generation fluency (`fluency_ge`): weighted bi/tri-gram entropy of greedy continuations
  of fixed prompts (the "GE" metric of the ROME/MEMIT papers; a broken model repeats
  itself and its entropy collapses);
- locality drift (`suite_locality`): locality probes of earlier edits, scored as token
  agreement with what the base model predicted;
- retention (`retention_acc`): efficacy of a sample of earlier edits now.

`fast_check` runs after every batch (teacher-forced metrics only: a few batched forward
passes); `full_check` every N batches adds greedy generation (fluency, exact match) and
retention. Both build on the batched scorers in `kedit_core.evaluate`/`scoring`.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Sequence

from kedit_core.answer import PromptRewriter, answer_many, generate
from kedit_core.evaluate import (
    Reference,
    evaluate_cases,
    latest_per_fact,
    reference_predictions,
    retention,
    split_by_scope,
)
from kedit_core.model import LoadedModel
from kedit_core.scoring import greedy_exact_match, perplexity, predicted_tokens, token_accuracy, token_agreement
from kedit_core.types import EditCase

SUITE_FORMAT = 1

# Fixed prompts whose greedy continuations measure fluency (generic, no edited subject).
FLUENCY_PROMPTS = (
    "The history of the city begins",
    "In the morning, the farmers",
    "Scientists have long studied the ocean because",
    "The most important invention of the last century was",
    "My grandmother used to tell me that",
)

# ROME/MEMIT's GE: bigram and trigram entropies weighted 2/3 and 4/3, averaged.
GE_NGRAMS = (2, 3)
GE_WEIGHTS = (2 / 3, 4 / 3)


# --------------------------------------------------------------------------- shipped data


def load_known_facts() -> list[dict[str, str]]:
    """The shipped well-known facts (prompt/answer pairs), before filtering."""
    text = resources.files("kedit_core.data").joinpath("known_facts.json").read_text(encoding="utf-8")
    return [{"prompt": f["prompt"], "answer": f["answer"]} for f in json.loads(text)["facts"]]


def load_reference_text() -> list[str]:
    """The shipped reference text, one paragraph per item."""
    text = resources.files("kedit_core.data").joinpath("reference_text.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


# --------------------------------------------------------------------------- fluency


def ngram_entropy(text: str, ns: Sequence[int] = GE_NGRAMS, weights: Sequence[float] = GE_WEIGHTS) -> float:
    """Weighted n-gram entropy (bits) of one text, ROME/MEMIT's generation-entropy metric.

    Words are lower-cased alphanumeric runs and punctuation marks (a simple stand-in for
    NLTK's tokenizer, which we do not want as a dependency for one regex). Each n-gram
    entropy is -sum p log2 p over the text's n-gram frequency distribution; the result
    is the mean of the weighted entropies. Repetitive text scores low.
    """
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    vals = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum((c / total) * math.log2(c / total) for c in grams.values()) if total else 0.0
        vals.append(w * h)
    return sum(vals) / len(vals)


def fluency(lm: LoadedModel, prompts: Sequence[str] = FLUENCY_PROMPTS, max_new_tokens: int = 48) -> tuple[float, list[str]]:
    """Mean GE over greedy continuations of `prompts` (one batched generate call)."""
    outs = generate(lm, list(prompts), max_new_tokens=max_new_tokens)
    return sum(ngram_entropy(o) for o in outs) / max(len(outs), 1), outs


# --------------------------------------------------------------------------- the suite


def _reference_to_json(ref: Reference) -> list[dict[str, Any]]:
    return [
        {"kind": k[0], "prompt": k[1], "answer": k[2], "pred": ref.predictions[k], "ref_answer": ref.answers[k],
         **({"reply": ref.replies[k[1]]} if k[1] in ref.replies else {})}
        for k in ref.predictions
    ]


def _reference_from_json(rows: list[dict[str, Any]]) -> Reference:
    ref = Reference()
    for r in rows:
        key = (r["kind"], r["prompt"], r["answer"])
        ref.predictions[key] = list(r["pred"])
        ref.answers[key] = r["ref_answer"]
        if "reply" in r:  # suites frozen before served answers have none: no served drift for them
            ref.replies[r["prompt"]] = r["reply"]
    return ref


@dataclass
class RegressionSuite:
    """Everything the gate compares against, frozen on the base model (JSON-serialisable)."""

    base_fingerprint: str
    known_facts: list[dict[str, str]]  # only facts the base model gets right
    reference_text: list[str]
    fluency_prompts: list[str]
    probe_cases: list[EditCase]  # sampled earlier edits whose locality probes are watched
    locality_reference: Reference  # base model's predictions on those probes
    retention_cases: list[EditCase]  # sampled earlier edits whose efficacy must stay
    base_metrics: dict[str, float] = field(default_factory=dict)
    run_applied: list[EditCase] = field(default_factory=list)  # sample of edits applied since freezing
    max_run_applied: int = 64
    fluency_tokens: int = 48  # tokens generated per fluency prompt
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    # -- growth during a run: a bounded reservoir sample of this run's accepted edits.
    def add_applied(self, cases: Sequence[EditCase], seen_before: int) -> None:
        """Reservoir-sample accepted cases for retention checks (`seen_before` = how many
        accepted cases the run had before these), so the suite stays small however long the run."""
        rng = random.Random(self.seed * 1_000_003 + seen_before)
        for i, c in enumerate(cases):
            n = seen_before + i
            if len(self.run_applied) < self.max_run_applied:
                self.run_applied.append(c)
            else:
                j = rng.randint(0, n)
                if j < self.max_run_applied:
                    self.run_applied[j] = c

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": SUITE_FORMAT,
                "base_fingerprint": self.base_fingerprint,
                "known_facts": self.known_facts,
                "reference_text": self.reference_text,
                "fluency_prompts": self.fluency_prompts,
                "probe_cases": [c.to_dict() for c in self.probe_cases],
                "locality_reference": _reference_to_json(self.locality_reference),
                "retention_cases": [c.to_dict() for c in self.retention_cases],
                "base_metrics": self.base_metrics,
                "run_applied": [c.to_dict() for c in self.run_applied],
                "max_run_applied": self.max_run_applied,
                "fluency_tokens": self.fluency_tokens,
                "seed": self.seed,
                "info": self.info,
            },
            ensure_ascii=False,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> RegressionSuite:
        d = json.loads(text)
        if d.get("format") != SUITE_FORMAT:
            raise ValueError(f"regression suite format {d.get('format')!r} is not {SUITE_FORMAT}; re-freeze the suite")
        return cls(
            base_fingerprint=d["base_fingerprint"],
            known_facts=d["known_facts"],
            reference_text=d["reference_text"],
            fluency_prompts=d["fluency_prompts"],
            probe_cases=[EditCase.from_dict(c) for c in d["probe_cases"]],
            locality_reference=_reference_from_json(d["locality_reference"]),
            retention_cases=[EditCase.from_dict(c) for c in d["retention_cases"]],
            base_metrics=d["base_metrics"],
            run_applied=[EditCase.from_dict(c) for c in d["run_applied"]],
            max_run_applied=d["max_run_applied"],
            fluency_tokens=d.get("fluency_tokens", 48),
            seed=d["seed"],
            info=d.get("info", {}),
        )


def filter_known_facts(lm: LoadedModel, facts: Sequence[dict[str, str]], batch_size: int = 32) -> list[dict[str, str]]:
    """Keep the facts whose every answer token is the model's argmax (teacher-forced)."""
    if not facts:
        return []
    acc = token_accuracy(lm, [f["prompt"] for f in facts], [f["answer"] for f in facts], batch_size)
    return [dict(f) for f, a in zip(facts, acc) if a >= 1.0]


def freeze_suite(
    base_lm: LoadedModel,
    earlier_cases: Sequence[EditCase] = (),
    known_facts: Sequence[dict[str, str]] | None = None,
    reference_text: Sequence[str] | None = None,
    fluency_prompts: Sequence[str] = FLUENCY_PROMPTS,
    fluency_tokens: int = 48,
    n_probe_cases: int = 16,
    n_retention_cases: int = 32,
    seed: int = 0,
    batch_size: int = 32,
) -> RegressionSuite:
    """Freeze the suite on the UNEDITED model `base_lm` (see `flows.services.runtime.LiveModel.at_base` for a live one).

    Earlier edits are sampled (seeded) for locality drift and retention; the base model's
    predictions on their locality probes and its general-ability metrics are recorded.
    """
    rng = random.Random(seed)
    facts = filter_known_facts(base_lm, load_known_facts() if known_facts is None else known_facts, batch_size)
    texts = list(load_reference_text() if reference_text is None else reference_text)
    earlier = latest_per_fact(list(earlier_cases))
    with_loc = [c for c in earlier if any(p.kind.startswith("locality") for p in c.probes)]
    probe_cases = rng.sample(with_loc, min(n_probe_cases, len(with_loc)))
    retention_cases = rng.sample(earlier, min(n_retention_cases, len(earlier)))
    suite = RegressionSuite(
        base_fingerprint=base_lm.fingerprint,
        known_facts=facts,
        reference_text=texts,
        fluency_prompts=list(fluency_prompts),
        probe_cases=probe_cases,
        locality_reference=reference_predictions(base_lm, probe_cases, batch_size),
        retention_cases=retention_cases,
        fluency_tokens=fluency_tokens,
        seed=seed,
        info={"known_facts_offered": len(load_known_facts()) if known_facts is None else len(known_facts)},
    )
    base = general_metrics(base_lm, suite, full=True, batch_size=batch_size)
    # Locality of the suite's own probes is 1.0 on the base by construction.
    suite.base_metrics = {k: v for k, v in base.items()}
    return suite



# --------------------------------------------------------------------------- checks


def general_metrics(
    lm: LoadedModel,
    suite: RegressionSuite,
    full: bool = False,
    rewriter: PromptRewriter | None = None,
    batch_size: int = 32,
    details: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, float]:
    """Known-facts accuracy, reference perplexity, locality drift; with `full` also
    known-facts exact match and fluency. Pass `details` to receive per-fact/per-probe rows
    (the report's worst-hit tables)."""
    out: dict[str, float] = {}
    if suite.known_facts:
        prompts = [f["prompt"] for f in suite.known_facts]
        asked = [rewriter.rewrite_prompt(p) for p in prompts] if rewriter is not None else prompts
        answers = [f["answer"] for f in suite.known_facts]
        acc = token_accuracy(lm, asked, answers, batch_size)
        out["known_facts_acc"] = sum(acc) / len(acc)
        if details is not None:
            details["known_fact"] = [
                {"kind": "known_fact", "prompt": p, "expected": a, "score": s} for p, a, s in zip(prompts, answers, acc)
            ]
        if full:
            em = greedy_exact_match(lm, asked, answers, batch_size)
            out["known_facts_em"] = sum(map(float, em)) / len(em)
    if suite.reference_text:
        out["ref_ppl"] = perplexity(lm, suite.reference_text)
    ref = suite.locality_reference
    if ref.predictions:
        keys = list(ref.predictions)
        prompts = [k[1] for k in keys]
        asked = [rewriter.rewrite_prompt(p) for p in prompts] if rewriter is not None else prompts
        now = predicted_tokens(lm, asked, [ref.answers[k] for k in keys], batch_size)
        agree = token_agreement([ref.predictions[k] for k in keys], now)
        # Unrelated knowledge is gated; other facts of already-edited subjects are reported
        # apart (they moved when those edits landed).
        unrelated, same = split_by_scope([k[0] for k in keys], agree)
        if unrelated:
            out["suite_locality"] = sum(unrelated) / len(unrelated)
        if same:
            out["suite_locality_same"] = sum(same) / len(same)
        if details is not None:
            details["suite_locality"] = [
                {"kind": k[0], "prompt": k[1], "expected": ref.answers[k], "score": s} for k, s in zip(keys, agree)
            ]
    if ref.replies:
        out.update(served_drift(lm, suite, rewriter))
    if full and suite.fluency_prompts:
        out["fluency_ge"], _ = fluency(lm, suite.fluency_prompts, suite.fluency_tokens)
    return out


def served_drift(lm: LoadedModel, suite: RegressionSuite, rewriter: PromptRewriter | None = None) -> dict[str, float]:
    """`suite_served_locality`: the share of the suite's unrelated questions whose chat reply
    is still the base model's (`suite_served_locality_same` for edited subjects' other facts)."""
    kinds = {k[1]: k[0] for k in suite.locality_reference.predictions}
    questions = [q for q in suite.locality_reference.replies if q in kinds]
    now = answer_many(lm, questions, rewriter)
    out: dict[str, float] = {}
    for name, same in (("suite_served_locality", False), ("suite_served_locality_same", True)):
        kept = [float(r.strip() == suite.locality_reference.replies[q].strip())
                for q, r in zip(questions, now) if (kinds[q] == "locality_same") == same]
        if kept:
            out[name] = sum(kept) / len(kept)
    return out


def fast_check(
    lm: LoadedModel,
    suite: RegressionSuite,
    batch_cases: Sequence[EditCase],
    batch_reference: Reference | None = None,
    rewriter: PromptRewriter | None = None,
    batch_size: int = 32,
    details: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, float]:
    """After every batch: the batch's own efficacy, paraphrase, locality (vs the model
    before the batch, `batch_reference`) and negation, teacher-forced and as served chat
    replies (what the gate decides on); plus known facts, reference perplexity and
    locality drift (teacher-forced and served)."""
    out = evaluate_cases(
        lm,
        batch_cases,
        reference=batch_reference,
        kinds=("efficacy", "paraphrase", "locality", "negation"),
        rewriter=rewriter,
        greedy=False,
        batch_size=batch_size,
    )
    out.update(general_metrics(lm, suite, full=False, rewriter=rewriter, batch_size=batch_size, details=details))
    return out


def full_check(
    lm: LoadedModel,
    suite: RegressionSuite,
    batch_cases: Sequence[EditCase],
    batch_reference: Reference | None = None,
    rewriter: PromptRewriter | None = None,
    batch_size: int = 32,
    details: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, float]:
    """Every N batches: everything in the fast check, greedy exact match, multi-hop and
    portability for the batch, fluency, and retention of sampled earlier edits."""
    out = evaluate_cases(
        lm, batch_cases, reference=batch_reference, rewriter=rewriter, greedy=True, batch_size=batch_size
    )
    out.update(general_metrics(lm, suite, full=True, rewriter=rewriter, batch_size=batch_size, details=details))
    # Earlier edits that this batch overwrote (same subject+relation) are not expected to stay.
    batch_keys = {c.fact_key for c in batch_cases}
    earlier = [c for c in latest_per_fact(list(suite.retention_cases) + list(suite.run_applied)) if c.fact_key not in batch_keys]
    if earlier:
        out.update(retention(lm, earlier, rewriter=rewriter, greedy=False, batch_size=batch_size))
    return out
