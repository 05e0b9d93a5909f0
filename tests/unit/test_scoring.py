from __future__ import annotations

import pytest
from kedit_core.scoring import (
    encode_pairs,
    exact_match,
    normalise_answer,
    perplexity,
    predicted_tokens,
    token_accuracy,
    token_agreement,
)


def test_encode_pairs_marks_exactly_the_answer_positions(tiny_llama):
    enc = encode_pairs(tiny_llama, ["ab", "abcd"], ["xy", "z"])
    # ByteTokenizer: " xy" = 3 tokens, " z" = 2 tokens
    assert enc.answer_mask.sum(1).tolist() == [3, 2]
    row = enc.input_ids[0]
    predicted_from = enc.answer_mask[0].nonzero().squeeze(1)
    assert [int(enc.targets[0, j]) for j in predicted_from] == [int(row[j + 1]) for j in predicted_from]
    assert tiny_llama.tokenizer.decode(enc.targets[0][enc.answer_mask[0]]) == " xy"


def test_token_accuracy_matches_full_logits_argmax(tiny_gpt2):
    prompts, answers = ["hello there", "a"], ["world", "bc"]
    acc = token_accuracy(tiny_gpt2, prompts, answers)
    # Reference: full-vocabulary logits, one pair at a time.
    for p, a, got in zip(prompts, answers, acc):
        enc = encode_pairs(tiny_gpt2, [p], [a])
        logits = tiny_gpt2.model(input_ids=enc.input_ids).logits[0]
        m = enc.answer_mask[0]
        ref = (logits[m].argmax(-1) == enc.targets[0][m]).float().mean().item()
        assert got == pytest.approx(ref)


def test_accuracy_agrees_with_predicted_tokens(tiny_llama):
    prompts, answers = ["q1", "question two"], ["abc", "de"]
    acc = token_accuracy(tiny_llama, prompts, answers)
    preds = predicted_tokens(tiny_llama, prompts, answers)
    for a, pred, got in zip(answers, preds, acc):
        gold = tiny_llama.tokenizer.encode(" " + a)
        assert len(pred) == len(gold)
        assert got == pytest.approx(sum(x == y for x, y in zip(pred, gold)) / len(gold))


def test_token_agreement_and_exact_match():
    assert token_agreement([[1, 2, 3]], [[1, 9, 3]]) == [pytest.approx(2 / 3)]
    assert normalise_answer("The  Paris!") == "paris"
    assert exact_match("Paris, France.", "Paris")
    assert not exact_match("Parisian", "Paris")
    assert not exact_match("", "Paris")


def test_perplexity_is_finite_and_lower_on_seen_pattern(tiny_llama):
    ppl = perplexity(tiny_llama, ["hello world", "abc abc abc"])
    assert 1.0 < ppl < 10_000
