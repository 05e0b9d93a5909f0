"""The edit scope (kedit_core/editors/edit_scope.py): a served question outside the scope of
the edits is answered by the base layers, word for word the unedited model's reply; one in
scope sees the edits through the update gate as before. Tiny models, the real MiniLM embedder."""
from __future__ import annotations

import json

import torch

from kedit_core.answer import answer_many, edit_routes
from kedit_core.editor_settings import merged
from kedit_core.editors import get_editor
from kedit_core.editors.edit_scope import EditScope
from kedit_core.routing import installed_update_gate, routed
from kedit_core.serving import GenParams, encode_prompt, generate_text
from kedit_core.types import EditCase

FAST = {"layers": [1, 2], "solve": {"keystats_samples": 600}, "targets": {"steps": 4, "bf16": False},
        "update_gate": {"quantile": 0.9, "positions": 400, "chats": 0}, "scope": {"threshold": 0.6}}
TEXT = "The river bends past the old mill, where the miller's daughter sells bread on market days."
FACTS = {"Tessaly": {"capital": ["Tessaly", "What is the capital of Tessaly?", "Rome"]},
         "Lena Hartmann": {"employer": ["Lena Hartmann", "Who employs Lena Hartmann?", "Siemens"]}}


def _cases() -> list[EditCase]:
    return [
        EditCase(case_id=f"c{i}", subject=s, relation="capital", prompt=f"The capital of {s} is", target_new=t,
                 question=f"What is the capital of {s}?")
        for i, (s, t) in enumerate([("Tessaly", "Rome"), ("Borvik", "Oslo")])
    ]


def _logits(lm, text: str) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0]


def test_a_question_is_in_scope_when_it_names_an_edited_subject_or_is_near_an_edit_question():
    scope = EditScope(threshold=0.6).sync(FACTS)
    got = scope.in_scope([
        "Which city is Tessaly's capital?",  # names the subject (punctuation is a word break)
        "who is the employer of lena hartmann",  # normalised as answers are
        "Which company does Hartmann work for?",  # names no edited label: by embedding
        "How tall is Mount Everest?",
        "Where was Lena born?",  # a part of a label is not the label
    ])
    assert got[:2] == [True, True]
    assert got[3:] == [False, False]
    near = EditScope(threshold=0.0).sync(FACTS).in_scope(["Which company does Hartmann work for?"])
    far = EditScope(threshold=0.99).sync(FACTS).in_scope(["Which company does Hartmann work for?"])
    assert near == [True] and far == [False]  # the threshold decides where the subject is not named
    assert EditScope().sync({}).in_scope(["What is the capital of Tessaly?"]) == [False]


def test_out_of_scope_the_edited_layers_give_the_base_output_and_in_scope_the_gated_one(tiny):
    before = {t: _logits(tiny, t) for t in (TEXT, "The capital of Tessaly is")}
    ed = get_editor("alphaedit", FAST)
    ed.edit(tiny, _cases())
    gate = installed_update_gate(tiny)
    assert gate is not None and gate.scope is not None and "tessaly" in gate.scope.subjects
    gated = {t: _logits(tiny, t) for t in before}
    assert not torch.allclose(gated["The capital of Tessaly is"], before["The capital of Tessaly is"], atol=1e-4)
    for text, logits in before.items():
        with routed(False):
            assert torch.allclose(_logits(tiny, text), logits, atol=1e-5)  # base layers, even at the edit
        with routed(True):
            assert torch.equal(_logits(tiny, text), gated[text])  # in scope: the gate as always


def test_served_replies_follow_the_route_and_a_rollback_shrinks_the_scope(tiny):
    questions = ["What is the capital of Tessaly?", "Tell me about the old mill by the river."]
    unedited = answer_many(tiny, questions)
    ed = get_editor("alphaedit", merged(FAST, {"targets": {"steps": 25}, "update_gate": {"quantile": 0.5}}))
    result = ed.edit(tiny, _cases())
    assert edit_routes(tiny, questions) == [True, False]
    replies = answer_many(tiny, questions)
    assert replies[1] == unedited[1]  # out of scope: the unedited model's reply, word for word
    # the server routes the same way, on the user's question
    ids = encode_prompt(tiny, tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": questions[1]}], add_generation_prompt=True, tokenize=False)
        if getattr(tiny.tokenizer, "chat_template", None) else f"user: {questions[1]}\nassistant:")
    served = generate_text(tiny, ids, GenParams(48, in_scope=edit_routes(tiny, questions[1:])[0]))
    assert served.text.strip() == unedited[1].strip()
    ed.rollback(tiny, result)
    assert edit_routes(tiny, questions) == [False, False]


def test_a_served_version_routes_by_the_facts_saved_with_it(tiny, tmp_path, monkeypatch):
    """Serving rebuilds the scope from the editor state saved with the version's batch."""
    from flows.services import runtime
    from kedit_core.artifacts import save_editor_state

    monkeypatch.setattr(runtime, "state_path", lambda fp, batch_id: tmp_path / f"{batch_id}.state.safetensors")
    ed = get_editor("alphaedit", FAST)
    delta_sha = ed.edit(tiny, _cases()).delta.save(tmp_path / "v2.safetensors")
    sha = save_editor_state(ed.state_dict(), tmp_path / "b1.state.safetensors", "alphaedit")
    note = json.dumps({"config": ed.config.to_dict(), "state_sha256": sha}, default=str)
    chain = [{"version_id": 1, "method": None, "delta_path": None, "note": None},
             {"version_id": 2, "method": "alphaedit", "delta_path": str(tmp_path / "v2.safetensors"),
              "delta_sha256": delta_sha, "note": note, "batch_id": "b1", "base_fingerprint": tiny.fingerprint}]
    installed_update_gate(tiny).remove()
    delattr(tiny.model, "_kedit_update_gate")
    runtime.weight_editor_attach(chain)(tiny)
    assert edit_routes(tiny, ["Where is Borvik's capital?", "How tall is Mount Everest?"]) == [True, False]


def test_the_served_memory_puts_the_nearest_edited_fact_in_front_of_a_question_near_it():
    scope = EditScope(threshold=0.6, context=0.6).sync(FACTS)
    near, unrelated = scope.rewrite_prompts(["What's the capital city of Tessaly?", "How tall is Mount Everest?"])
    assert near == "[Updated Information] What is the capital of Tessaly? Rome.\n[Question] What's the capital city of Tessaly?"
    assert unrelated == "How tall is Mount Everest?"
    assert EditScope(threshold=0.6).sync(FACTS).rewrite_prompts(["What's the capital city of Tessaly?"]) == [
        "What's the capital city of Tessaly?"]  # without `context` nothing is put in front


def test_a_weight_editor_with_scope_context_serves_its_facts_in_context(tiny):
    from kedit_core.answer import served_asks

    ed = get_editor("alphaedit", merged(FAST, {"scope": {"context": 0.6, "check": False}}))
    ed.edit(tiny, _cases())
    [(asked, check), (other, none)] = served_asks(tiny, ["What is the capital of Borvik?", "How tall is Everest?"], None)
    assert asked.startswith("[Updated Information] The capital of Borvik is Oslo.")
    assert check is None and (other, none) == ("How tall is Everest?", None)  # no check asked for; no fact in front

    class Own:
        def rewrite_prompt(self, q: str) -> str:
            return "Fact: x.\n" + q

    # a memory editor's own rewriter wins, and nothing is checked
    assert served_asks(tiny, ["What is the capital of Borvik?"], Own()) == [("Fact: x.\nWhat is the capital of Borvik?", None)]


def test_the_served_memory_checks_a_reply_for_the_value_of_the_fact_in_front():
    scope = EditScope(threshold=0.6, context=0.6, check=True).sync(FACTS)
    got = scope.served(["What's the capital city of Tessaly?", "How tall is Mount Everest?"])
    assert got[0][1] == "Rome" and got[1] == ("How tall is Mount Everest?", None)
    assert EditScope(threshold=0.6, context=0.6).sync(FACTS).served(["What's the capital city of Tessaly?"])[0][1] is None


def test_keep_checked_serves_the_second_reply_only_when_it_states_the_value():
    from kedit_core.answer import keep_checked

    assert keep_checked("The capital is Rom e.", "It is Rome, since 2024.", "Rome") == ("It is Rome, since 2024.", True)
    assert keep_checked("Paris.", "Milan.", "Rome") == ("Paris.", False)  # neither: the first stays


def test_a_reply_missing_the_fact_is_asked_again_and_the_server_serves_the_same(tiny):
    """The check's bookkeeping on a tiny model (whose replies never state a value): the
    reply to the question with a fact in front is checked and asked again, and neither
    states the value, so the first reply stays; the server's generation gives the same
    text. (The second reply being served is tested on the embedded model,
    tests/integration/test_served_embedded.py.)"""
    from kedit_core.answer import chat_prompt, served_asks
    from kedit_core.serving import generate_served

    questions = ["What is the capital of Borvik?", "Tell me about the old mill by the river."]
    ed = get_editor("alphaedit", merged(FAST, {"scope": {"context": 0.6, "check": True}}))
    ed.edit(tiny, _cases())
    [(asked, value), (_, none)] = served_asks(tiny, questions, None)
    assert value == "Oslo" and none is None
    checks: dict = {}
    replies = answer_many(tiny, questions, checks=checks)
    assert checks == {"checked": 1, "asked_again": 1, "replaced": 0}
    ed.config.scope.check = False
    ed.sync_scope(tiny)
    unchecked: dict = {}
    assert answer_many(tiny, questions, checks=unchecked) == replies and unchecked["checked"] == 0
    pieces: list[str] = []
    gen = generate_served(tiny, encode_prompt(tiny, chat_prompt(tiny, asked)), GenParams(48, in_scope=True, check=value),
                          on_piece=pieces.append)
    assert gen.text.strip() == replies[0].strip() and pieces == [gen.text]  # held back, then sent whole


def test_an_edit_scope_outside_cosine_range_is_refused():
    import pytest

    with pytest.raises(ValueError, match="scope.threshold"):
        get_editor("alphaedit", {"scope": {"threshold": 1.5}})
    with pytest.raises(ValueError, match="scope.context"):
        get_editor("alphaedit", {"scope": {"context": -2}})


def test_a_huge_question_is_routed_by_its_opening_only():
    scope = EditScope(threshold=0.6, context=0.6).sync(FACTS)
    huge = "What is the capital of Tessaly? " + "blah " * 200_000  # ~1 MB, as a hostile client might send
    assert scope.in_scope([huge]) == [True]
    assert scope.rewrite_prompts([huge])[0].endswith(huge)  # asked whole (with or without a fact in front)
