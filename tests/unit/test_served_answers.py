"""The served-answer protocol (kedit_core/served_answers.py) on tiny models: replies are
the server's replies, matching reads aliases and rejects the old value, and a model that
teacher forcing scores perfect can still fail to state the answer when asked in chat."""
from __future__ import annotations

import requests
import torch

from kedit_core.answer import SERVED_MAX_NEW_TOKENS, answer_many, chat_prompt
from kedit_core.evaluate import evaluate_cases, reference_predictions, retention
from kedit_core.scoring import token_accuracy
from kedit_core.served_answers import answer_forms, case_forms, read_yes_no, served_metrics, states_answer
from kedit_core.serving import BackgroundServer, ServingState, create_app
from kedit_core.types import EditCase, Probe

QUESTIONS = ["Where is the Eiffel tower?", "Who wrote Hamlet?", "What is the capital of Peru?",
             "Which river flows through Vienna?", "Name a prime number."]


def test_replies_equal_what_the_running_server_answers(tiny_llama):
    """Batched evaluation must read exactly what `kedit serve` sends a user for a one-message
    chat with no options (chat template, greedy, the first 48 tokens)."""
    local = answer_many(tiny_llama, QUESTIONS)
    state = ServingState(tiny_llama)
    with BackgroundServer(create_app(state, None)) as srv:
        served = []
        for q in QUESTIONS:
            r = requests.post(srv.url + "/v1/chat/completions", timeout=60,
                              json={"model": state.model_name, "max_tokens": SERVED_MAX_NEW_TOKENS,
                                    "messages": [{"role": "user", "content": q}]})
            assert r.status_code == 200, r.text
            served.append(r.json()["choices"][0]["message"]["content"].strip())
    assert local == served
    assert len(set(local)) > 1  # the questions really got different replies


def test_matching_reads_aliases_numbers_and_rejects_the_old_value():
    new = answer_forms("308,707", ["308707"])
    assert states_answer("The population of Karlsruhe is 308,707.", new)
    assert states_answer("Karlsruhe has 308707 inhabitants", new)
    assert not states_answer("Karlsruhe has 3087070 inhabitants", new)  # whole words only
    city = answer_forms("New York City", ["NYC", "New York"])
    assert states_answer("She moved to NYC in 1990.", city)
    assert states_answer("She lives in New York.", city)
    # the old value in the reply means the model hedges or still says the old fact
    assert not states_answer("It moved from Bonn to Berlin.", answer_forms("Berlin"), answer_forms("Bonn"))
    # an old value that is part of the new one is not a mention of the old one
    assert states_answer("He plays for Paris Saint-Germain.", answer_forms("Paris Saint-Germain"), answer_forms("Paris"))
    assert not states_answer("", answer_forms("Berlin"))


def test_case_forms_use_meta_aliases_and_drop_an_old_value_equal_to_the_new():
    case = EditCase("c", "Karlsruhe", "P1082", "The population of Karlsruhe is", "308,707", target_old="308,707",
                    meta={"aliases": ["308707", "about 308,707"], "old_aliases": ["307755"]})
    new, old = case_forms(case)
    assert new[0] == "308707" and "about 308707" in new and old == ["307755"]


def test_yes_no_is_read_from_the_first_words():
    assert read_yes_no("Yes, it is true that Paris is the capital.") == "Yes"
    assert read_yes_no("No. The capital is Lyon.") == "No"
    assert read_yes_no("That is not true.") == "No"
    assert read_yes_no("Paris is a city in France.") is None


def _memorise(lm, *texts: str, steps: int = 150) -> None:
    """Train a tiny model until it predicts every token of some raw texts (teacher forced)."""
    seqs = [torch.tensor([lm.tokenizer.encode(t, add_special_tokens=False)]) for t in texts]
    opt = torch.optim.Adam(lm.model.parameters(), lr=3e-3)
    lm.model.train()
    for _ in range(steps):
        loss = sum(lm.model(input_ids=ids, labels=ids).loss for ids in seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.model.eval()


def test_teacher_forcing_can_score_one_while_the_served_answer_is_wrong(tiny_llama):
    case = EditCase("c", "Zorbland", "capital", "The capital of Zorbland is", "Quxville",
                    question="What is the capital of Zorbland?")
    _memorise(tiny_llama, "The capital of Zorbland is Quxville")
    assert token_accuracy(tiny_llama, [case.prompt], [case.target_new]) == [1.0]
    m = evaluate_cases(tiny_llama, [case], kinds=("efficacy",), greedy=False)
    assert m["efficacy_acc"] == 1.0
    assert m["served_efficacy"] == 0.0  # asked in chat, it does not say Quxville
    assert "quxville" not in answer_many(tiny_llama, [case.question])[0].lower()


def test_a_model_trained_on_the_chat_reply_states_it(tiny_llama):
    case = EditCase("c", "Zorbland", "capital", "The capital of Zorbland is", "Quxville",
                    question="What is the capital of Zorbland?",
                    probes=[Probe("paraphrase", "Zorbland's capital is which city?", "Quxville")])
    _memorise(tiny_llama, chat_prompt(tiny_llama, case.question) + " Quxville.", steps=200)
    m = served_metrics(tiny_llama, [case], kinds=("efficacy",))
    assert m == {"served_efficacy": 1.0}


def test_served_locality_is_one_unchanged_and_drops_when_replies_change(tiny_llama):
    cases = [EditCase(f"c{i}", "Zorbland", "r", "Zorbland is", "x",
                      probes=[Probe("locality", q, "Paris" if i == 0 else "")]) for i, q in enumerate(QUESTIONS)]
    ref = reference_predictions(tiny_llama, cases)
    assert set(ref.replies) == set(QUESTIONS)
    assert evaluate_cases(tiny_llama, cases, reference=ref, kinds=("locality",))["served_locality"] == 1.0
    with torch.no_grad():
        for p in tiny_llama.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = evaluate_cases(tiny_llama, cases, reference=ref, kinds=("locality",))
    assert after["served_locality"] < 1.0
    assert "locality" in after  # the teacher-forced figure stays beside it


def test_served_negation_and_retention_names(tiny_llama):
    case = EditCase("c", "Zorbland", "capital", "The capital of Zorbland is", "Quxville",
                    probes=[Probe("negation", "Is it true that the capital of Zorbland is Quxville?", "Yes",
                                  {"polarity": "new"}),
                            Probe("negation", "Is it true that the capital of Zorbland is Oldtown?", "No",
                                  {"polarity": "old"})])
    # taught to confirm the new statement, and to confirm the old one too (the failure mode)
    _memorise(tiny_llama, *(chat_prompt(tiny_llama, p.prompt) + " Yes." for p in case.probes), steps=200)
    m = served_metrics(tiny_llama, [case], kinds=("negation",))
    assert m == {"served_negation": 0.5, "served_negation_pn": 0.0}
    r = retention(tiny_llama, [case], kinds=("efficacy",))
    assert {"retention_acc", "served_retention"} <= set(r)


def test_a_value_inside_a_mention_of_the_other_value_does_not_count():
    year, old_date = answer_forms("1879"), answer_forms("14 March 1879")
    assert not states_answer("He was born on 14 March 1879.", year, old_date)  # the old date, not the new year
    assert states_answer("He was born in 1879.", year, old_date)
    assert not states_answer("The value is 18.", answer_forms("1.8"))  # decimals are kept
    assert states_answer("The value is 1.8 metres.", answer_forms("1.8"))


def test_a_locality_question_about_a_subject_edited_in_the_same_batch_is_not_unrelated(tiny_llama):
    """One case's "other subject" probe that names another case's subject moves with that
    edit by design: it is scored with the edited subjects' other facts, not as unrelated."""
    a = EditCase("a", "Ardo", "r", "Who leads Ardo?", "Lina", probes=[Probe("locality_other", "Who leads Bexa?", "")])
    b = EditCase("b", "Bexa", "r", "Who leads Bexa?", "Tomo", probes=[Probe("locality_other", "Who leads Cirn?", "")])
    ref = reference_predictions(tiny_llama, [a, b])
    m = evaluate_cases(tiny_llama, [a, b], reference=ref, kinds=("locality",))
    assert m["served_locality"] == 1.0 and m["served_locality_same"] == 1.0
    alone = evaluate_cases(tiny_llama, [a], reference=ref, kinds=("locality",))
    assert "served_locality_same" not in alone and alone["served_locality"] == 1.0


def test_multihop_probes_read_their_own_aliases_and_old_aliases():
    from kedit_core.served_answers import probe_forms

    case = EditCase("c", "Zorbland", "r", "Zorbland is", "x")
    probe = Probe("multihop", "Who leads the country whose capital is Zorbland?", "Joseph Biden",
                  {"aliases": ["Joe Biden"], "old_answer": "Donald Trump", "old_aliases": ["Trump"]})
    new, old = probe_forms(probe, case)
    assert states_answer("It is Joe Biden.", new, old)
    assert not states_answer("Joe Biden, after Trump.", new, old)
