"""Regression-suite metrics on hand-checkable tiny cases (a tiny Llama taught six facts)."""
from __future__ import annotations

import math

import pytest
import torch

import gatekit as g
from gatekit import single_thread  # noqa: F401  (autouse fixture)
from kedit_core.regression import (
    RegressionSuite,
    fast_check,
    freeze_suite,
    full_check,
    general_metrics,
    load_known_facts,
    load_reference_text,
    ngram_entropy,
)


def _suite(lm, **kw):
    return freeze_suite(lm, g.edit_cases(), known_facts=g.known_facts(), reference_text=g.REFERENCE_TEXT, **kw)


def test_ngram_entropy_by_hand():
    # words a b a b a b: bigrams ab x3, ba x2 -> H2 = H(3/5, 2/5); trigrams aba x2, bab x2 -> H3 = 1 bit
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b a b") == pytest.approx(expected)
    assert ngram_entropy("the the the the the the") == 0.0
    assert ngram_entropy("The river runs through the old valley, and farmers sow wheat.") > ngram_entropy(
        "the river the river the river the river"
    )


def test_shipped_data_sizes():
    facts = load_known_facts()
    assert 40 <= len(facts) <= 60 and all(f["prompt"] and f["answer"] for f in facts)
    assert len({f["prompt"] for f in facts}) == len(facts)
    assert len(load_reference_text()) >= 3


def test_freeze_keeps_only_facts_the_base_knows_and_starts_at_one():
    lm = g.knowing_tiny_llama()
    suite = _suite(lm)
    assert [f["prompt"] for f in suite.known_facts] == [p for p, _ in g.KNOWN]  # UNKNOWN dropped
    assert suite.base_metrics["known_facts_acc"] == 1.0
    assert suite.base_metrics["suite_locality"] == 1.0
    assert suite.base_metrics["ref_ppl"] > 1.0 and "fluency_ge" in suite.base_metrics
    assert len(suite.probe_cases) == len(g.EDITS) and len(suite.retention_cases) == len(g.EDITS)


def test_suite_json_round_trip_gives_the_same_numbers():
    lm = g.knowing_tiny_llama()
    suite = _suite(lm)
    again = RegressionSuite.from_json(suite.to_json())
    assert again.to_json() == suite.to_json()
    assert general_metrics(lm, again) == general_metrics(lm, suite)


def test_harmful_update_hurts_every_general_metric_and_at_base_is_exact(db):
    from flows.services.runtime import LiveModel

    lm = g.knowing_tiny_llama()
    suite = _suite(lm)
    base_state = {n: t.clone() for n, t in lm.model.state_dict().items()}
    result = g.HarmfulEditor().edit(lm, g.edit_cases(n=2))
    edited_state = {n: t.clone() for n, t in lm.model.state_dict().items()}
    m = general_metrics(lm, suite, full=True)
    assert m["known_facts_acc"] < 0.5
    assert m["ref_ppl"] > 2 * suite.base_metrics["ref_ppl"]
    assert m["suite_locality"] < 0.5
    live = LiveModel(lm=lm, db=db, version_id=1, base_version_id=0)
    live.record_applied(result.delta)
    with live.at_base():
        assert g.weights_equal(lm.model, base_state)
    assert g.weights_equal(lm.model, edited_state)  # re-applied bit for bit
    live.restore_base()
    assert g.weights_equal(lm.model, base_state)


def test_fast_check_is_teacher_forced_full_check_adds_generation_and_retention():
    lm = g.knowing_tiny_llama()
    suite = _suite(lm)
    batch = g.edit_cases("new", n=2)
    fast = fast_check(lm, suite, batch)
    assert fast["efficacy_acc"] == 1.0 and fast["known_facts_acc"] == 1.0
    assert not {"efficacy_em", "fluency_ge", "known_facts_em", "retention_acc"} & set(fast)
    full = full_check(lm, suite, batch)
    assert {"efficacy_em", "fluency_ge", "known_facts_em", "retention_acc"} <= set(full)
    # retention skips earlier edits of the facts this batch re-edits: 4 of the 6 remain, all kept
    assert full["retention_acc"] == 1.0


def test_retention_sample_stays_bounded():
    lm = g.knowing_tiny_llama()
    suite = _suite(lm, n_retention_cases=0)
    suite.max_run_applied = 3
    cases = g.edit_cases("r")
    suite.add_applied(cases[:2], seen_before=0)
    suite.add_applied(cases[2:], seen_before=2)
    assert len(suite.run_applied) == 3
    assert {c.case_id for c in suite.run_applied} <= {c.case_id for c in cases}
