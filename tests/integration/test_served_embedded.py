"""Served answers on the embedded model: the default editor makes the model state the new
value when asked in chat, and unrelated chat replies stay word for word what the unedited
model said (the edit scope routes them to the base layers; the update gate's floor on
served chats protects what the scope lets through)."""
from __future__ import annotations

import pytest

from kedit_core.answer import answer_many, edit_routes
from kedit_core.editors import get_editor
from kedit_core.evaluate import evaluate_cases, reference_predictions
from kedit_core.types import EditCase, Probe

pytestmark = pytest.mark.integration

UNRELATED = ["What is the capital of Japan?", "Who wrote Romeo and Juliet?", "What is the largest planet?",
             "Which language is spoken in Brazil?"]


def test_the_default_editor_is_scored_and_holds_on_served_answers(embedded_lm):
    lm = embedded_lm
    case = EditCase(case_id="int-served", subject="Eiffel Tower", relation="P131",
                    prompt="Which city is the Eiffel Tower located in?", question="Which city is the Eiffel Tower located in?",
                    target_new="Rome", target_old="Paris",
                    probes=[Probe("locality", q, "") for q in UNRELATED])
    ref = reference_predictions(lm, [case])
    before = evaluate_cases(lm, [case], reference=ref, kinds=("efficacy", "locality"), greedy=False)
    assert before["served_efficacy"] == 0.0 and before["served_locality"] == 1.0
    editor = get_editor("alphaedit", {"keystats_samples": 1500, "update_gate_chats": 32})
    result = editor.edit(lm, [case])
    try:
        after = evaluate_cases(lm, [case], reference=ref, kinds=("efficacy", "locality"), greedy=False)
        reply = answer_many(lm, [case.question])[0]
        assert after["served_efficacy"] == 1.0, reply
        assert edit_routes(lm, ["In what city can you find the Eiffel Tower?", *UNRELATED]) == [True] + [False] * 4
        assert after["served_locality"] == 1.0, answer_many(lm, UNRELATED)
    finally:
        editor.rollback(lm, result)
    assert answer_many(lm, UNRELATED) == [ref.replies[q] for q in UNRELATED]
