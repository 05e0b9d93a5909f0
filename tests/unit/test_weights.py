"""kedit_core/weights.py: every way of putting weights at a version gives the same tensors
bit for bit (one delta applied and reverted, a chain moved along, extended or replayed),
and a missing or tampered link leaves the model untouched."""
from __future__ import annotations

import pytest
import torch

from kedit_core.weights import (
    ChainState,
    DeltaIntegrityError,
    DeltaRef,
    UnknownParameters,
    WeightDelta,
    move_to_chain,
)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, state[n]) for n, t in model.state_dict().items())


def _deltas(model: torch.nn.Module, n: int = 3) -> list[WeightDelta]:
    """Deltas in several dtypes over overlapping parameters (the dtype cast is part of the rule)."""
    params = dict(model.named_parameters())
    names = sorted(params)[:4]
    g = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    return [WeightDelta({name: (torch.randn(params[name].shape, generator=g) * 1e-3).to(dtypes[k % 4])
                         for i, name in enumerate(names) if (i + k) % 2 == 0}) for k in range(n)]


@pytest.fixture
def chain(tiny_llama, tmp_path):
    deltas = _deltas(tiny_llama.model)
    refs = []
    for k, d in enumerate(deltas):
        path = tmp_path / f"d{k}.safetensors"
        refs.append(DeltaRef(f"v{k + 1}", str(path), d.save(path)))
    return deltas, refs


def test_a_moved_chain_equals_the_deltas_applied_one_by_one(tiny_llama, chain):
    model, (deltas, refs) = tiny_llama.model, chain
    base = _state(model)
    expected = []
    for d in deltas:
        d.apply(model)
        expected.append(_state(model))
    for d in reversed(deltas):
        d.revert(model)
    assert _same(model, base)

    state = ChainState()
    move_to_chain(model, state, refs[:1])
    assert _same(model, expected[0])
    move_to_chain(model, state, refs)  # extends: only the new links are added
    assert _same(model, expected[2])
    move_to_chain(model, state, refs[:2])  # not an extension: restored to the base and replayed
    assert _same(model, expected[1])
    move_to_chain(model, state, [])
    assert _same(model, base) and state.links == []


def test_at_base_and_adopted_deltas_are_exact(tiny_llama, chain):
    model, (deltas, refs) = tiny_llama.model, chain
    base = _state(model)
    state = ChainState()
    deltas[0].apply(model)  # as an editor does
    state.adopt(deltas[0], refs[0])
    move_to_chain(model, state, refs[:2])
    live = _state(model)
    with state.at_base(model):
        assert _same(model, base)
    assert _same(model, live)
    state.restore_base(model)
    assert _same(model, base)


def test_a_tampered_or_foreign_link_leaves_the_model_as_it_was(tiny_llama, chain, tmp_path):
    model, refs = tiny_llama.model, chain[1]
    state = ChainState()
    move_to_chain(model, state, refs[:1])
    before = _state(model)
    bad = DeltaRef("v9", refs[1].path, "0" * 64)
    with pytest.raises(DeltaIntegrityError, match="sha256"):
        move_to_chain(model, state, [refs[0], bad])
    with pytest.raises(DeltaIntegrityError, match="missing"):
        move_to_chain(model, state, [DeltaRef("v8", str(tmp_path / "gone.safetensors"), "0" * 64)])
    foreign = tmp_path / "foreign.safetensors"
    ref = DeltaRef("v7", str(foreign), WeightDelta({"no.such.weight": torch.ones(2)}).save(foreign))
    with pytest.raises(UnknownParameters):
        move_to_chain(model, state, [ref])
    assert _same(model, before) and state.links == refs[:1]
