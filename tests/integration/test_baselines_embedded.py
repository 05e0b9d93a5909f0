"""Retrieval on the real embedded model: the served answer flips to the edited fact, an
unrelated question is answered exactly as before, and the weights never change."""
from __future__ import annotations

import pytest

from connectors.benchmarks import read_zsre
from kedit_core.answer import answer_many
from kedit_core.editors import get_editor
from kedit_core.model import fingerprint_model
from kedit_core.scoring import normalise_answer, token_accuracy

from tests.conftest import DATA

pytestmark = pytest.mark.integration


def test_rag_flips_served_answers_and_leaves_the_rest_alone(embedded_lm):
    lm = embedded_lm
    cases = read_zsre(DATA / "benchmarks" / "zsre_mend_train_1k.json", limit=4)
    paras = [c.probes_of("paraphrase")[0].prompt for c in cases]
    targets = [c.target_new for c in cases]
    locs = [c.probes_of("locality")[0].prompt for c in cases[:2]]
    before = answer_many(lm, paras + locs, max_new_tokens=20)
    acc_before = token_accuracy(lm, paras, targets)
    rag = get_editor("rag")
    result = rag.edit(lm, cases)
    try:
        after = answer_many(lm, paras + locs, rewriter=rag, max_new_tokens=20)
        acc_after = token_accuracy(lm, rag.rewrite_prompts(paras), targets)
        has = lambda text, t: normalise_answer(t) in normalise_answer(text)  # noqa: E731
        assert not any(has(b, t) for b, t in zip(before, targets))
        assert sum(has(a, t) for a, t in zip(after, targets)) >= 2, after  # the served answer flips
        assert sum(acc_after) / 4 > sum(acc_before) / 4 + 0.3
        assert after[4:] == before[4:]  # unrelated questions: same answer, no context shown
        assert fingerprint_model(lm.model) == lm.fingerprint
    finally:
        rag.rollback(lm, result)
