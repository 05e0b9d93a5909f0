"""The gate's decisions: pure functions over metric dicts."""
from __future__ import annotations

import math

import pytest

from kedit_core.regression_gate import RegressionGateConfig, decide, harm_reasons, is_full_check

BASE = {"known_facts_acc": 1.0, "ref_ppl": 10.0, "fluency_ge": 5.0}


def test_healthy_batch_is_accepted():
    d = decide({"served_efficacy": 0.9, "known_facts_acc": 0.95, "ref_ppl": 11.0, "locality": 0.9}, BASE, RegressionGateConfig())
    assert d.accept and not d.retry and d.reasons == []


def test_relative_drop_and_rise_break_the_gate_with_named_reasons():
    cfg = RegressionGateConfig()
    d = decide({"served_efficacy": 1.0, "known_facts_acc": 0.8, "ref_ppl": 10.0}, BASE, cfg)
    assert not d.accept and not d.retry
    assert len(d.reasons) == 1 and "known_facts_acc" in d.reasons[0] and "20%" in d.reasons[0]
    d = decide({"served_efficacy": 1.0, "ref_ppl": 13.0}, BASE, cfg)  # +30% > 25%
    assert not d.accept and "ref_ppl" in d.reason
    assert decide({"served_efficacy": 1.0, "ref_ppl": 12.4}, BASE, cfg).accept  # +24%


def test_absolute_floor_and_ceiling():
    cfg = RegressionGateConfig(floors={"locality": 0.7}, ceilings={"ref_ppl": 20.0}, max_drop={})
    assert not decide({"locality": 0.69}, {}, cfg).accept
    assert decide({"locality": 0.7}, {}, cfg).accept
    assert "ceiling" in decide({"ref_ppl": 25.0}, {}, cfg).reason


def test_take_is_judged_on_served_answers_not_on_teacher_forcing():
    d = decide({"efficacy_acc": 1.0, "served_efficacy": 0.3}, BASE, RegressionGateConfig(retry_stronger=False))
    assert not d.accept and "did not take: served_efficacy 0.300" in d.reason
    assert decide({"efficacy_acc": 0.4, "served_efficacy": 0.9}, BASE, RegressionGateConfig()).accept


def test_changed_unrelated_chat_replies_are_harm():
    d = decide({"served_efficacy": 1.0, "served_locality": 0.6}, BASE, RegressionGateConfig())
    assert not d.accept and not d.retry and "served_locality 0.600 below floor 0.800" in d.reason
    d = decide({"served_efficacy": 1.0, "suite_served_locality": 0.7}, BASE, RegressionGateConfig())
    assert not d.accept and "suite_served_locality" in d.reason


def test_non_finite_metric_is_harm():
    d = decide({"ref_ppl": math.inf, "served_efficacy": 1.0}, BASE, RegressionGateConfig())
    assert not d.accept and "not a finite number" in d.reason


def test_did_not_take_retries_once_then_rejects():
    cfg = RegressionGateConfig(take_floor=0.5)
    first = decide({"served_efficacy": 0.2}, BASE, cfg, attempt=1)
    assert not first.accept and first.retry and "did not take" in first.reason
    second = decide({"served_efficacy": 0.2}, BASE, cfg, attempt=2)
    assert not second.accept and not second.retry and "after 2 attempts" in second.reason
    assert not decide({"served_efficacy": 0.2}, BASE, RegressionGateConfig(retry_stronger=False)).retry


def test_harm_is_never_retried_even_when_the_edit_did_not_take():
    d = decide({"served_efficacy": 0.1, "known_facts_acc": 0.1}, BASE, RegressionGateConfig())
    assert not d.accept and not d.retry
    assert harm_reasons({"served_efficacy": 0.1, "known_facts_acc": 0.1}, BASE, RegressionGateConfig()) == d.reasons


def test_missing_metrics_and_missing_base_are_not_failures():
    assert decide({}, {}, RegressionGateConfig()).accept
    assert decide({"known_facts_acc": 0.1}, {}, RegressionGateConfig()).accept  # no base: relative check skipped


def test_full_check_schedule_and_validation():
    cfg = RegressionGateConfig(full_check_every=3)
    assert [s for s in range(1, 10) if is_full_check(s, cfg)] == [3, 6, 9]
    with pytest.raises(ValueError, match="full_check_every"):
        RegressionGateConfig(full_check_every=0)
    with pytest.raises(ValueError, match="max_drop"):
        RegressionGateConfig(max_drop={"ref_ppl": -1})
    assert RegressionGateConfig.from_dict(cfg.to_dict()) == cfg
