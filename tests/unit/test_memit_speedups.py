"""The target optimisation's speed-ups (memit_speedups.py) compute what the plain forward
computes: rows run in two passes of similar length give the one-pass result, and the
bfloat16 steps leave the model's float32 weights exactly as they were."""
from __future__ import annotations

import torch

from kedit_core.editors.memit import context_templates
from kedit_core.editors.memit_rows import encode_rows
from kedit_core.editors.memit_speedups import UpperLayers, by_width, weights_in
from kedit_core.types import EditCase


def _rows(lm):
    """Rows of very different lengths: a short prompt, a long one, and the chat variant."""
    cases = [
        EditCase(case_id="a", subject="Tessaly", relation="capital", prompt="Tessaly has", target_new="Rome"),
        EditCase(case_id="b", subject="Borvik", relation="capital",
                 prompt="Borvik, as everybody who has ever been there will tell you at length, has the capital",
                 target_new="Oslo Fjord City"),
        EditCase(case_id="c", subject="Quin", relation="river", prompt="Quin lies on the river", target_new="Kyiv"),
    ]
    templates = context_templates(lm, 2, 4, 0)
    return encode_rows(lm, cases, templates)


def test_by_width_splits_only_where_padding_outweighs_a_pass():
    lengths = torch.tensor([3, 15, 4, 14, 3, 15, 3, 3])
    parts = by_width(lengths, pass_cost=10)
    assert len(parts) == 2
    assert sorted(torch.cat(parts).tolist()) == list(range(8))  # every row once
    assert set(lengths[parts[0]].tolist()) == {3, 4} and set(lengths[parts[1]].tolist()) == {14, 15}
    one = by_width(lengths, pass_cost=1000)  # a pass costs more than the padding it saves
    assert len(one) == 1 and one[0].tolist() == list(range(8))  # and in the rows' own order
    assert len(by_width(torch.tensor([5, 5, 6]), pass_cost=0)) in (1, 2)


def _answer_logprobs(lm, rows, pass_cost, bf16=False):
    up = UpperLayers(lm, rows, 1, bf16=bf16, pass_cost=pass_cost)
    delta = torch.randn(rows.n_cases, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    delta.requires_grad_(True)
    with up.optimising():
        out = up.run(delta, torch.ones(rows.n_cases, dtype=torch.bool))
        logp, token, _, _ = out.answer_logprobs()
        picked = logp.gather(1, token[:, None]).squeeze(1)
        picked.sum().backward()
    return picked.detach(), delta.grad.clone(), by_width(up.aligned.suffix_len, pass_cost)


def test_two_passes_give_the_one_pass_answer_and_gradient(tiny):
    rows = _rows(tiny)
    one, grad_one, parts_one = _answer_logprobs(tiny, rows, pass_cost=1e9)
    two, grad_two, parts_two = _answer_logprobs(tiny, rows, pass_cost=0)
    assert len(parts_one) == 1 and len(parts_two) == 2  # the comparison is between the two paths
    assert torch.allclose(one, two, atol=1e-5)
    assert torch.allclose(grad_one, grad_two, atol=1e-5)


def test_bfloat16_steps_are_close_and_leave_the_weights_bit_exact(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    rows = _rows(tiny)
    exact, grad, _ = _answer_logprobs(tiny, rows, pass_cost=1e9)
    fast, grad_bf16, _ = _answer_logprobs(tiny, rows, pass_cost=1e9, bf16=True)
    assert torch.allclose(exact, fast, atol=0.05)  # bfloat16 rounding, not another computation
    assert torch.nn.functional.cosine_similarity(grad.flatten(), grad_bf16.flatten(), dim=0) > 0.98
    after = tiny.model.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)


def test_weights_in_swaps_each_parameter_once_and_puts_the_originals_back(tiny):
    params = list(tiny.model.parameters())
    originals = [(p.data_ptr(), p.dtype) for p in params]
    head, emb = tiny.model.get_output_embeddings().weight, tiny.model.get_input_embeddings().weight
    with weights_in(tiny.model, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in params)
        if head is emb:  # tied: one Parameter, converted once
            assert head.data.data_ptr() == emb.data.data_ptr()
    assert [(p.data_ptr(), p.dtype) for p in params] == originals  # the same float32 tensors
    with weights_in(tiny.model, None):
        assert all(p.dtype == torch.float32 for p in params)


def test_weights_are_restored_when_a_step_fails(tiny):
    originals = [(p.data_ptr(), p.dtype) for p in tiny.model.parameters()]
    try:
        with weights_in(tiny.model, torch.bfloat16):
            raise RuntimeError("a step failed")
    except RuntimeError:
        pass
    assert [(p.data_ptr(), p.dtype) for p in tiny.model.parameters()] == originals

