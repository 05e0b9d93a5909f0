"""Evaluation metrics on hand-checkable tiny cases: a tiny model is *edited* through a
WeightDelta that we control, so we know which answers must change."""
from __future__ import annotations

import pytest
import torch

from kedit_core.evaluate import evaluate_cases, latest_per_fact, reference_predictions, retention
from kedit_core.types import EditCase, Probe


def _case(cid, subj="Zed", rel="P1", new="ab", probes=()):
    return EditCase(case_id=cid, subject=subj, relation=rel, prompt=f"{subj} likes", target_new=new, probes=list(probes))


def test_locality_is_one_for_unchanged_model_and_drops_after_damage(tiny_llama):
    cases = [_case("c1", probes=[Probe("locality", "Unrelated question", ""), Probe("locality_same", "Zed lives in", "x")])]
    ref = reference_predictions(tiny_llama, cases)
    m = evaluate_cases(tiny_llama, cases, reference=ref, kinds=("locality",))
    assert m["locality"] == 1.0 and m["locality_same"] == 1.0
    with torch.no_grad():
        for p in tiny_llama.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    m2 = evaluate_cases(tiny_llama, cases, reference=ref, kinds=("locality",))
    assert m2["locality"] < 1.0


class _Rewriter:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seen: list[str] = []

    def rewrite_prompt(self, q: str) -> str:
        self.seen.append(q)
        return self.prefix + q


def test_rewriter_is_used_for_every_scored_prompt(tiny_gpt2):
    cases = [_case("c1", probes=[Probe("paraphrase", "Zed is fond of", "ab")])]
    rw = _Rewriter("ctx ")
    evaluate_cases(tiny_gpt2, cases, kinds=("efficacy", "paraphrase"), rewriter=rw, greedy=False)
    assert set(rw.seen) == {"Zed likes", "Zed is fond of"}


def test_negation_counts_yes_no_by_likelihood(tiny_llama):
    # Bias the output layer toward " Yes": every PP probe (answer Yes) right, every PN (No) wrong.
    yes_first = tiny_llama.tokenizer.encode(" Yes")[0]  # ' ' byte: shared by " Yes" and " No"
    y_id, n_id = tiny_llama.tokenizer.encode("Y")[0], tiny_llama.tokenizer.encode("N")[0]
    head = tiny_llama.model.get_output_embeddings()
    assert yes_first == tiny_llama.tokenizer.encode(" No")[0]
    probes = [
        Probe("negation", "Is it true that Zed likes ab?", "Yes", {"polarity": "new"}),
        Probe("negation", "Is it true that Zed likes cd?", "No", {"polarity": "old"}),
    ]
    cases = [_case("c1", probes=probes)]
    with torch.no_grad():
        head.weight[y_id] += 5 * head.weight[y_id].sign()  # larger logit for 'Y' on positive-aligned states
    m = evaluate_cases(tiny_llama, cases, kinds=("negation",))
    assert set(m) == {"negation_acc", "negation_pp", "negation_pn", "served_negation", "served_negation_pn"}
    assert m["negation_acc"] == pytest.approx((m["negation_pp"] + m["negation_pn"]) / 2)
    assert m["negation_pp"] != m["negation_pn"]  # the same answer to both polarities is half right


def test_latest_per_fact_and_retention_skip_overwritten(tiny_gpt2):
    a = _case("a", new="xx")
    b = _case("b", new="yy")  # same subject+relation: overwrites a
    c = _case("c", subj="Other", new="zz")
    assert [x.case_id for x in latest_per_fact([a, b, c])] == ["b", "c"]
    r = retention(tiny_gpt2, [a, c], all_cases_so_far=[a, b, c])
    direct = evaluate_cases(tiny_gpt2, [c], kinds=("efficacy",), greedy=False)
    assert r["retention_acc"] == pytest.approx(direct["efficacy_acc"])


def test_retention_of_paraphrases_scores_the_surviving_cases_paraphrases(tiny_gpt2):
    a = _case("a", new="xx", probes=[Probe("paraphrase", "Zed is fond of", "xx")])
    b = _case("b", new="yy", probes=[Probe("paraphrase", "Zed enjoys", "yy")])  # overwrites a
    c = _case("c", subj="Other", new="zz", probes=[Probe("paraphrase", "Other enjoys", "zz")])
    r = retention(tiny_gpt2, [a, c], all_cases_so_far=[a, b, c], kinds=("efficacy", "paraphrase"))
    direct = evaluate_cases(tiny_gpt2, [c], kinds=("efficacy", "paraphrase"), greedy=False)
    assert set(r) == {"retention_acc", "retention_paraphrase_acc", "served_retention", "served_retention_paraphrase"}
    assert r["retention_paraphrase_acc"] == pytest.approx(direct["paraphrase_acc"])


def test_absent_probe_kinds_are_not_reported_as_zero(tiny_gpt2):
    m = evaluate_cases(tiny_gpt2, [_case("c1")], greedy=True)
    assert set(m) == {"efficacy_acc", "efficacy_em", "served_efficacy"}


def test_same_subject_locality_is_reported_apart_from_unrelated_locality(tiny_llama):
    same_only = [_case("c1", probes=[Probe("locality_same", "Zed lives in", "x")])]
    ref = reference_predictions(tiny_llama, same_only)
    m = evaluate_cases(tiny_llama, same_only, reference=ref, kinds=("locality",))
    assert "locality" not in m and m["locality_same"] == 1.0
