"""One real MEMIT edit on the embedded model: the answer flips, an unrelated answer stays,
and the session model is restored bit for bit afterwards."""
from __future__ import annotations

import pytest
import torch

from kedit_core.editors import get_editor
from kedit_core.anatomy import edit_site
from kedit_core.editors.memit import default_layers
from kedit_core.scoring import greedy_exact_match, predicted_tokens, token_accuracy
from kedit_core.types import EditCase

pytestmark = pytest.mark.integration


def test_one_edit_flips_the_answer_and_keeps_an_unrelated_one(embedded_lm):
    lm = embedded_lm
    case = EditCase(
        case_id="int-eiffel",
        subject="Eiffel Tower",
        relation="P131",
        prompt="The Eiffel Tower is located in the city of",
        target_new="Rome",
    )
    unrelated_prompt, unrelated_answer = "The capital of Japan is", "Tokyo"
    assert token_accuracy(lm, [case.prompt], [case.target_new])[0] < 1.0  # not already known
    unrelated_before = predicted_tokens(lm, [unrelated_prompt], [unrelated_answer])

    layers = default_layers(lm.model.config.num_hidden_layers)
    names = [edit_site(lm.model, l).param_name for l in layers]
    params = dict(lm.model.named_parameters())
    snapshot = {n: params[n].detach().clone() for n in names}
    # 1500 key-statistics positions fit in the shipped corpus (no sampling: keeps the test short).
    editor = get_editor("memit", {"solve": {"keystats_samples": 1500}})
    result = None
    try:
        result = editor.edit(lm, [case])
        assert result.applied and sorted(result.delta.tensors) == sorted(names)
        assert token_accuracy(lm, [case.prompt], [case.target_new])[0] == 1.0
        assert greedy_exact_match(lm, [case.prompt], [case.target_new])[0]
        assert predicted_tokens(lm, [unrelated_prompt], [unrelated_answer]) == unrelated_before
    finally:
        if result is not None:
            editor.rollback(lm, result)
    params = dict(lm.model.named_parameters())
    assert all(torch.equal(params[n].detach(), snapshot[n]) for n in names)


def test_alphaedit_adds_a_later_fact_of_an_edited_subject_and_keeps_the_first(embedded_lm):
    """The nightly pipeline keeps meeting subjects it edited before. Two facts of
    Karlsruhe from the demo's Wikidata day, one batch apart: the later one must land and
    the earlier one must stay. Without `revisit_subjects` the later fact fights the
    earlier fact's preserved key (the `subject_first` row's key is the same for both)."""
    lm = embedded_lm
    population = EditCase(case_id="int-pop", subject="Karlsruhe", relation="P1082",
                          prompt="The population of Karlsruhe is", target_new="308,707")
    mayor = EditCase(case_id="int-mayor", subject="Karlsruhe", relation="P6",
                     prompt="The head of government of Karlsruhe is", target_new="Lena Hartmann")
    both = [population, mayor]
    scores = {}
    for revisit in (False, True):
        editor = get_editor("alphaedit", {"solve": {"keystats_samples": 1500}, "revisit_subjects": revisit,
                                         "update_gate": {"chats": 32}})
        results = []
        try:
            results.append(editor.edit(lm, [population]))
            results.append(editor.edit(lm, [mayor]))
            scores[revisit] = token_accuracy(lm, [c.prompt for c in both], [c.target_new for c in both])
        finally:
            for r in reversed(results):
                editor.rollback(lm, r)
    kept, added = scores[True]
    assert kept >= 0.75 and added >= 0.75, scores
    assert sum(scores[True]) >= sum(scores[False]) + 0.3, scores


def test_the_update_gate_keeps_unrelated_text_at_the_base_model(embedded_lm):
    """AlphaEdit's default update gate: the edit still flips its answer, and on unrelated
    text the gated model stays (much) closer to the unedited one than the same edit without
    the gate (docs/editing.md, "The update gate")."""
    lm = embedded_lm
    case = EditCase(case_id="int-gate", subject="Eiffel Tower", relation="P131",
                    prompt="The Eiffel Tower is located in the city of", target_new="Rome")
    text = "Rivers carry water from the hills to the sea, and most towns were built beside one."
    ids = torch.tensor([lm.tokenizer.encode(text, add_special_tokens=False)])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return lm.model(input_ids=ids).logits[0]

    before = logits()
    moved = {}
    for gate in (0.999, None):
        editor = get_editor("alphaedit", {"solve": {"keystats_samples": 1500}, "update_gate": {"quantile": gate, "chats": 32}})
        result = editor.edit(lm, [case])
        try:
            assert token_accuracy(lm, [case.prompt], [case.target_new])[0] == 1.0
            moved[gate] = float((logits() - before).abs().max())
        finally:
            editor.rollback(lm, result)
    assert moved[0.999] < 0.5 * moved[None], moved
    assert torch.equal(logits(), before)
