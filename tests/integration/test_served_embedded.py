"""Served answers on the embedded model: the default editor makes the model state the new
value when asked in chat, and unrelated chat replies stay word for word what the unedited
model said (the edit scope routes them to the base layers; the update gate's floor on
served chats protects what the scope lets through)."""
from __future__ import annotations

import pytest

from kedit_core.answer import answer_many, chat_prompt, edit_routes, generate, served_asks
from kedit_core.routing import installed_update_gate, routed
from kedit_core.matching import answer_forms, states_answer
from kedit_core.serving import GenParams, encode_prompt, generate_served
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
    editor = get_editor("alphaedit", {"solve": {"keystats_samples": 1500}, "update_gate": {"chats": 32}})
    result = editor.edit(lm, [case])
    try:
        after = evaluate_cases(lm, [case], reference=ref, kinds=("efficacy", "locality"), greedy=False)
        reply = answer_many(lm, [case.question])[0]
        assert after["served_efficacy"] == 1.0, reply
        assert edit_routes(lm, ["In what city can you find the Eiffel Tower?", *UNRELATED]) == [True] + [False] * 4
        assert after["served_locality"] == 1.0, answer_many(lm, UNRELATED)
        _second_try_is_served_where_only_it_states_the_value(lm, case.question)
    finally:
        editor.rollback(lm, result)
    assert answer_many(lm, UNRELATED) == [ref.replies[q] for q in UNRELATED]


def _second_try_is_served_where_only_it_states_the_value(lm, question: str) -> None:
    """The served memory's check on a real model: the edited model states the value, so its
    reply is served unchecked-again; then, with a value only the base layers' reply to the
    same prompt states (the ledger's value is whatever it recorded), the second reply is
    served, by `answer_many` and by the server's generation alike."""
    [(asked, value)] = served_asks(lm, [question], None)
    assert value == "Rome" and asked != question  # the fact in front, its value checked
    checks: dict = {}
    first = answer_many(lm, [question], checks=checks)[0]
    assert checks == {"checked": 1, "asked_again": 0, "replaced": 0}, first
    prompt = chat_prompt(lm, asked)
    with routed(False):
        base = generate(lm, [prompt], max_new_tokens=48)[0]
    words = [w for w in dict.fromkeys(base.split()) if w.isalpha() and len(w) > 3]
    word = next((w for w in words if not states_answer(first, answer_forms(w))), None)
    assert word is not None, (first, base)  # the two routes reply differently
    scope = installed_update_gate(lm).scope
    k = scope.keys.index(question)
    old, scope.answer_of_key[k] = scope.answer_of_key[k], word
    try:
        checks = {}
        assert answer_many(lm, [question], checks=checks) == [base]
        assert checks == {"checked": 1, "asked_again": 1, "replaced": 1}
        pieces: list[str] = []
        gen = generate_served(lm, encode_prompt(lm, prompt), GenParams(48, in_scope=True, check=word),
                              on_piece=pieces.append)
        assert gen.text.strip() == base.strip() and pieces == [gen.text]
    finally:
        scope.answer_of_key[k] = old
