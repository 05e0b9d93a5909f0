"""AlphaEdit mechanics on tiny random Llama and GPT-2 models."""
from __future__ import annotations

import pytest
import torch

from kedit_core.editor_settings import merged
from kedit_core.editors import get_editor
from kedit_core.editors.alphaedit import AlphaEdit
from kedit_core.editors.memit import KEEP_FACTS_PER_SUBJECT
from kedit_core.anatomy import edit_site
from kedit_core.types import EditCase

# The closed form and its state on their own: the update gate (tested in test_update_gate.py)
# would mix in which token positions of a random model's text pass.
FAST = {"layers": [1, 2], "solve": {"keystats_samples": 600}, "targets": {"steps": 4, "bf16": False, "n_context_templates": 2},
        "update_gate": {"quantile": None}}


def _batch(tag: str, n: int = 3) -> list[EditCase]:
    subjects = ["Tessaly", "Borvik", "Quin", "Marrow", "Ilsan", "Pell"]
    return [
        EditCase(case_id=f"{tag}{i}", subject=s + tag, relation="capital", prompt=f"The capital of {s}{tag} is", target_new=t)
        for i, (s, t) in enumerate(zip(subjects[:n], ["Rome", "Oslo", "Lima", "Kyiv", "Bern", "Doha"]))
    ]


def _dW(tiny, result, layer: int) -> torch.Tensor:
    """The update as [H, inter] whatever the parameter's storage (Conv1D is transposed)."""
    site = edit_site(tiny.model, layer)
    d = result.delta.tensors[site.param_name].double()
    return d.T if site.transposed else d


def test_is_registered_and_the_pipeline_default_shape():
    ed = get_editor("alphaedit", FAST)
    assert isinstance(ed, AlphaEdit) and ed.name == "alphaedit"
    with pytest.raises(ValueError, match="keep_facts_per_subject is retired"):  # docs/editing.md, "Retired settings"
        get_editor("alphaedit", {"keep_facts_per_subject": -1})


def test_update_lies_in_the_null_space_of_preserved_keys(tiny):
    ed: AlphaEdit = get_editor("alphaedit", FAST)  # type: ignore[assignment]
    result = ed.edit(tiny, _batch("x"))
    assert result.applied and result.delta.norm() > 0
    for layer in (1, 2):
        cov = ed.covariance(tiny, layer)
        evals, evecs = torch.linalg.eigh(cov)
        kept = evecs[:, evals >= ed.config.solve.nullspace_threshold * evals.max()]  # preserved directions
        assert kept.shape[1] > 0
        dW = _dW(tiny, result, layer)
        # exact by construction (up to float32 storage of the delta)
        assert (dW @ kept).abs().max() <= 1e-4 * dW.abs().max()
        # and on the actual preserved keys: the layer's output barely moves
        k = torch.linalg.cholesky(cov + 1e-9 * torch.eye(cov.shape[0], dtype=cov.dtype))  # columns ~ typical keys
        site = edit_site(tiny.model, layer)
        W = dict(tiny.model.named_parameters())[site.param_name].detach().double()
        W = W.T if site.transposed else W
        assert (dW @ k).norm() <= 0.05 * ((W - dW) @ k).norm()
    ed.rollback(tiny, result)


def test_keys_accumulate_and_state_roundtrips(tiny):
    ed: AlphaEdit = get_editor("alphaedit", FAST)  # type: ignore[assignment]
    r1 = ed.edit(tiny, _batch("a"))
    c1 = {l: t.clone() for l, t in ed.prev_keys.items()}
    after_first = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    assert sorted(c1) == [1, 2] and ed.n_edits == 3
    r2 = ed.edit(tiny, _batch("b"))
    assert ed.n_edits == 6
    for layer in (1, 2):
        grew = ed.prev_keys[layer] - c1[layer]
        assert torch.linalg.eigvalsh(grew).max() > 0  # the second batch's keys were added

    fresh: AlphaEdit = get_editor("alphaedit", FAST)  # type: ignore[assignment]
    fresh.load_state_dict(ed.state_dict())
    assert fresh.n_edits == 6
    assert all(torch.equal(fresh.prev_keys[l], ed.prev_keys[l]) for l in (1, 2))

    ed.rollback(tiny, r2)  # forgets batch 2's keys and restores the weights exactly
    assert ed.n_edits == 3
    assert all(torch.allclose(ed.prev_keys[l], c1[l], rtol=1e-10, atol=1e-12) for l in (1, 2))
    assert all(torch.equal(after_first[k], v) for k, v in tiny.model.state_dict().items())
    ed.rollback(tiny, r1)


def test_a_settled_batch_keeps_no_rollback_record(tiny):
    """A batch's rollback record is its keys (rows x inter), not their inter x inter Gram
    matrix, and settling the batch drops it: a long stream holds no record per batch."""
    ed: AlphaEdit = get_editor("alphaedit", FAST)  # type: ignore[assignment]
    r1 = ed.edit(tiny, _batch("a"))
    record = ed._batch_keys[r1.info["batch_token"]]
    inter = ed.prev_keys[1].shape[0]
    assert all(k.shape[1] == inter and k.shape[0] < inter for k in record.values())
    r2 = ed.edit(tiny, _batch("b"))
    ed.settle(r1)
    assert list(ed._batch_keys) == [r2.info["batch_token"]] and r1.info["batch_token"] not in ed._batch_facts
    keys_now = {layer: t.clone() for layer, t in ed.prev_keys.items()}
    with pytest.raises(RuntimeError, match="settled"):
        ed.rollback(tiny, r1)
    assert all(torch.equal(keys_now[layer], ed.prev_keys[layer]) for layer in keys_now)  # refused: nothing touched
    ed.rollback(tiny, r2)  # the unsettled batch still rolls back, from its keys
    assert ed.n_edits == 3 and not ed._batch_keys


def test_accumulated_keys_protect_earlier_edits(tiny):
    """Batch 2's update disturbs batch 1's keys less when batch 1's keys are in the state."""
    from kedit_core.editors.memit import context_templates, keys_and_outputs
    from kedit_core.editors.memit_rows import encode_rows

    cfg = merged(FAST, {"solve": {"l2": 1.0}})
    first, second = _batch("a"), _batch("b")
    ed: AlphaEdit = get_editor("alphaedit", cfg)  # type: ignore[assignment]
    r1 = ed.edit(tiny, first)
    snapshot = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    templates = context_templates(tiny, ed.config.targets.n_context_templates, ed.config.targets.context_template_len, 0)
    k1, _ = keys_and_outputs(tiny, encode_rows(tiny, first, templates), [1], 2)

    with_state = ed.edit(tiny, second)
    moved_with = (_dW(tiny, with_state, 1) @ k1[1].T).norm()
    ed.rollback(tiny, with_state)
    assert all(torch.equal(snapshot[k], v) for k, v in tiny.model.state_dict().items())

    amnesic: AlphaEdit = get_editor("alphaedit", cfg)  # type: ignore[assignment]
    without_state = amnesic.edit(tiny, second)  # same weights, no memory of batch 1
    moved_without = (_dW(tiny, without_state, 1) @ k1[1].T).norm()
    assert moved_with < moved_without
    amnesic.rollback(tiny, without_state)
    ed.rollback(tiny, r1)


def test_preserve_weight_holds_earlier_edits_tighter(tiny):
    """A larger `preserve_weight` makes batch 2 move batch 1's key outputs less."""
    from kedit_core.editors.memit import context_templates, keys_and_outputs
    from kedit_core.editors.memit_rows import encode_rows

    first, second = _batch("a"), _batch("b")
    moved = {}
    for weight in (1.0, 10.0):
        ed: AlphaEdit = get_editor("alphaedit", merged(FAST, {"solve": {"l2": 1.0, "preserve_weight": weight}}))  # type: ignore[assignment]
        r1 = ed.edit(tiny, first)
        templates = context_templates(tiny, ed.config.targets.n_context_templates, ed.config.targets.context_template_len, 0)
        k1, _ = keys_and_outputs(tiny, encode_rows(tiny, first, templates), [1], 2)
        r2 = ed.edit(tiny, second)
        moved[weight] = float((_dW(tiny, r2, 1) @ k1[1].T).norm())
        ed.rollback(tiny, r2)
        ed.rollback(tiny, r1)
    assert moved[10.0] < moved[1.0]


def test_past_the_preserve_horizon_earlier_keys_share_a_fixed_weight(tiny):
    """Past `preserve_horizon` edits each earlier edit's keys weigh preserve_weight * horizon / n:
    batch 3 after 6 edits with horizon 3 and weight 10 solves exactly as with weight 5 and
    no horizon, from the same state; within the horizon the weight is the plain one."""
    cfg = merged(FAST, {"solve": {"l2": 1.0, "preserve_weight": 10.0, "preserve_horizon": 3}})
    ed: AlphaEdit = get_editor("alphaedit", cfg)  # type: ignore[assignment]
    r1 = ed.edit(tiny, _batch("a"))
    assert ed.preserve_weight_now(ed.config.solve) == 10.0  # 3 edits: within the horizon
    r2 = ed.edit(tiny, _batch("b"))
    assert ed.n_edits == 6 and ed.preserve_weight_now(ed.config.solve) == pytest.approx(5.0)
    third = _batch("c")
    horizon = ed.edit(tiny, third)
    dW_horizon = _dW(tiny, horizon, 1)
    ed.rollback(tiny, horizon)

    fixed: AlphaEdit = get_editor("alphaedit", merged(FAST, {"solve": {"l2": 1.0, "preserve_weight": 5.0,
                                                                       "preserve_horizon": None}}))  # type: ignore[assignment]
    fixed.load_state_dict(ed.state_dict())
    same = fixed.edit(tiny, third)
    assert torch.allclose(_dW(tiny, same, 1), dW_horizon, rtol=1e-4, atol=1e-7)
    fixed.rollback(tiny, same)

    plain: AlphaEdit = get_editor("alphaedit", merged(FAST, {"solve": {"l2": 1.0, "preserve_weight": 10.0,
                                                                       "preserve_horizon": None}}))  # type: ignore[assignment]
    plain.load_state_dict(ed.state_dict())
    other = plain.edit(tiny, third)  # weight 10: a different solve
    assert not torch.allclose(_dW(tiny, other, 1), dW_horizon, rtol=1e-3, atol=1e-6)
    plain.rollback(tiny, other)
    ed.rollback(tiny, r2)
    ed.rollback(tiny, r1)


def test_cov_weight_stays_in_the_null_space_and_moves_generic_keys_less(tiny):
    moved = {}
    for weight in (0.0, 50.0):
        ed: AlphaEdit = get_editor("alphaedit", merged(FAST, {"solve": {"l2": 1.0, "cov_weight": weight}}))  # type: ignore[assignment]
        result = ed.edit(tiny, _batch("c"))
        evals, evecs = torch.linalg.eigh(ed.covariance(tiny, 1))
        small = evals < ed.config.solve.nullspace_threshold * evals.max()
        dW = _dW(tiny, result, 1)
        assert (dW @ evecs[:, ~small]).abs().max() <= 1e-4 * dW.abs().max()  # still inside the null space
        generic = evecs[:, small] * evals[small].sqrt()  # generic keys' null-space part
        moved[weight] = float((dW @ generic).norm() / dW.norm())
        ed.rollback(tiny, result)
    assert moved[50.0] < moved[0.0]


def test_psd_part_keeps_the_positive_directions_only():
    from kedit_core.editors.alphaedit import psd_part

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    evals = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.0, 0.0, -0.1, -0.3], dtype=torch.float64)
    sym = (Q * evals) @ Q.T
    part = psd_part(sym)
    assert torch.allclose(part, (Q * evals.clamp_min(0)) @ Q.T, atol=1e-12)
    assert torch.linalg.eigvalsh(part).min() > -1e-12


def test_key_grams_are_what_after_edit_added_for_those_facts(tiny):
    """Right after a batch (no drift yet), re-computing its facts' keys gives exactly what
    the batch added to the preserved set, so the solve can take out just those facts."""
    ed: AlphaEdit = get_editor("alphaedit", FAST)  # type: ignore[assignment]
    first = _batch("a")
    r1 = ed.edit(tiny, first)
    grams = ed.key_grams(tiny, ed.remembered_facts(first))
    for layer in (1, 2):
        assert torch.allclose(grams[layer], ed.prev_keys[layer], rtol=1e-6, atol=1e-9 * float(ed.prev_keys[layer].abs().max()))
    ed.rollback(tiny, r1)


def _fact(case_id: str, subject: str, relation: str, prompt: str, answer: str) -> EditCase:
    return EditCase(case_id=case_id, subject=subject, relation=relation, prompt=prompt, target_new=answer)


def test_remembers_facts_keeps_earlier_ones_of_a_revisited_subject_and_rolls_back(tiny, tmp_path):
    ed: AlphaEdit = get_editor("alphaedit", FAST)  # type: ignore[assignment]
    first = [_fact("a", "Borvik", "capital", "Borvik has the capital", "Oslo"),
             _fact("b", "Borvik", "river", "Borvik lies on the river", "Nile"),
             _fact("c", "Quin", "capital", "Quin has the capital", "Lima")]
    r1 = ed.edit(tiny, first)
    assert ed.facts["Borvik"] == {"capital": ["Borvik", "Borvik has the capital", "Oslo", ""],  # no question form
                                  "river": ["Borvik", "Borvik lies on the river", "Nile", ""]}
    second = [_fact("d", "Borvik", "capital", "Borvik has the capital", "Rome"), _fact("e", "Pell", "capital", "Pell has the capital", "Bern")]
    keep = ed.facts_to_keep(second)
    assert [(k.subject, k.relation, k.target_new) for k in keep] == [("Borvik", "river", "Nile")]  # the replaced fact is not kept
    r2 = ed.edit(tiny, second)
    assert [d.case_id for d in r2.diagnostics] == ["d", "e"] and r2.delta.meta["cases"] == ["d", "e"]
    assert r2.info["kept_facts"] == [keep[0].case_id]
    assert ed.n_edits == 5  # kept facts are not new edits
    assert ed.facts["Borvik"]["capital"][2] == "Rome" and "Pell" in ed.facts

    from kedit_core.artifacts import load_editor_state, save_editor_state  # how the pipeline persists it

    save_editor_state(ed.state_dict(), tmp_path / "state.safetensors", ed.name)
    fresh: AlphaEdit = get_editor("alphaedit", FAST)  # type: ignore[assignment]
    fresh.load_state_dict(load_editor_state(tmp_path / "state.safetensors")[1])
    assert fresh.facts == ed.facts and list(fresh.facts["Borvik"]) == ["river", "capital"]  # most recent last
    assert all(torch.equal(fresh.prev_keys[l], ed.prev_keys[l]) for l in (1, 2))

    ed.rollback(tiny, r2)
    assert ed.facts["Borvik"]["capital"][2] == "Oslo" and "Pell" not in ed.facts and ed.n_edits == 3
    ed.rollback(tiny, r1)
    assert ed.facts == {} and ed.n_edits == 0


def test_a_later_edit_of_the_same_fact_wins(tiny):
    """Batch 2 re-edits batch 1's fact. Without revisiting, the solve holds the fact's
    earlier key (the same prompt) at its old output with preserve_weight, so the edited
    layers deliver a fraction of the new target's delta; with it, about all of it.
    (P = I and preserve_weight 100 make the conflict plain on a tiny random model.)"""
    from kedit_core.editors.memit import context_templates, keys_and_outputs
    from kedit_core.editors.memit_rows import encode_rows

    cfg = merged(FAST, {"targets": {"steps": 8},
                        "solve": {"l2": 1e-3, "cov_weight": 0.0, "nullspace_threshold": 1.01, "preserve_weight": 100.0}})
    old = [_fact("a", "Borvik", "capital", "The capital of Borvik is", "Oslo"), _fact("b", "Quin", "capital", "The capital of Quin is", "Lima")]
    new = [_fact("a2", "Borvik", "capital", "The capital of Borvik is", "Rome")]
    delivered = {}
    for revisit in (False, True):
        ed: AlphaEdit = get_editor("alphaedit", {**cfg, "revisit_subjects": revisit})  # type: ignore[assignment]
        r1 = ed.edit(tiny, old)
        rows = encode_rows(tiny, new, context_templates(tiny, 2, ed.config.targets.context_template_len, 0))
        _, z_before = keys_and_outputs(tiny, rows, [1], 2)
        r2 = ed.edit(tiny, new)
        _, z_after = keys_and_outputs(tiny, rows, [1], 2)
        # how much of the target's delta the layer-2 output at the subject now carries
        delivered[revisit] = float((z_after - z_before).norm()) / r2.diagnostics[0].delta_norm
        ed.rollback(tiny, r2)
        ed.rollback(tiny, r1)
    assert delivered[True] > 0.5 and delivered[False] < 0.5 * delivered[True], delivered


def test_kept_facts_are_the_most_recent_few_of_the_batch_subjects():
    ed: AlphaEdit = get_editor("alphaedit", FAST)  # type: ignore[assignment]
    assert KEEP_FACTS_PER_SUBJECT == 8
    ed.facts = {"Borvik": {f"r{i}": ["Borvik", f"Borvik r{i} is", f"a{i}"] for i in range(10)},
                "Quin": {"r0": ["Quin", "Quin r0 is", "b0"]}}
    keep = ed.facts_to_keep([_fact("x", " Borvik ", "r9", "The Borvik r9 is", "new")])  # outer spaces: same subject
    # r9 is replaced, r0 is one too many, Quin is not in the batch
    assert [(k.relation, k.target_new) for k in keep] == [(f"r{i}", f"a{i}") for i in range(1, 9)]
