"""The update gate (kedit_core/editors/update_gate.py) on tiny models: where the summed
update is small the edited layer gives exactly the base layer's output, where it is large
exactly the edited one; rollback and removal leave the plain model."""
from __future__ import annotations

import json

import pytest
import torch

from kedit_core.editor_settings import merged
from kedit_core.editors import get_editor
from kedit_core.anatomy import edit_site
from kedit_core.routing import installed_update_gate
from kedit_core.types import EditCase
from tests.conftest import sharpen, subject_final_cases

FAST = {"layers": [1, 2], "solve": {"keystats_samples": 600}, "targets": {"steps": 4, "bf16": False},
        "update_gate": {"positions": 400, "per_batch": False}}  # the summed gate; per-batch tests say so
TEXT = "The river bends past the old mill, where the miller's daughter sells bread on market days."


def _cases() -> list[EditCase]:
    return [
        EditCase(case_id=f"c{i}", subject=s, relation="capital", prompt=f"The capital of {s} is", target_new=t)
        for i, (s, t) in enumerate([("Tessaly", "Rome"), ("Borvik", "Oslo"), ("Quin", "Lima")])
    ]


def _logits(lm, text: str) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0]


def _layer_outputs(lm, layers: list[int], text: str) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per edited layer: (what the gated layer output, W_live k, W_base k) at every position."""
    seen = {}
    handles = []
    for layer in layers:
        site = edit_site(lm.model, layer)
        w_live, w_base = site.module.weight.detach(), lm.base_tensor(site.param_name)

        def grab(_m, args, out, layer=layer, w_live=w_live, w_base=w_base, transposed=site.transposed):
            k = args[0][0]
            seen[layer] = (out[0].detach(), k @ w_live if transposed else k @ w_live.T, k @ w_base if transposed else k @ w_base.T)

        handles.append(site.module.register_forward_hook(grab))  # runs after the gate's hook
    try:
        _logits(lm, text)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_gated_layer_outputs_base_where_small_and_edited_where_large(tiny):
    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9}}))
    ed.edit(tiny, _cases())
    gate = installed_update_gate(tiny)
    assert gate is not None and gate.layers == [1, 2]
    subject_end = len(tiny.tokenizer.encode("The capital of Tessaly", add_special_tokens=False)) - 1
    at_edit = _layer_outputs(tiny, gate.layers, "The capital of Tessaly is")
    elsewhere = _layer_outputs(tiny, gate.layers, TEXT)
    for layer in gate.layers:
        for out, live, base in (at_edit[layer], elsewhere[layer]):
            passed = torch.isclose(out, live, atol=1e-5).all(-1)
            blocked = torch.isclose(out, base, atol=1e-5).all(-1)
            assert bool((passed | blocked).all()), f"layer {layer}: a position is neither the base nor the edited output"
        out, live, base = at_edit[layer]
        assert torch.isclose(out, live, atol=1e-5).all(-1)[subject_end], f"layer {layer}: blocked at the edited subject"
        out, live, base = elsewhere[layer]
        assert torch.isclose(out, base, atol=1e-5).all(-1).any(), f"layer {layer}: passed at every position of other text"
        assert not torch.allclose(live, base), "the edit changed nothing"
        assert gate.stats()[f"L{layer}"]["tau"] > 0


def test_a_gated_edit_raises_its_answer_as_the_plain_edit_does(tiny):
    from kedit_core.scoring import answer_logprob

    sharpen(tiny)
    cases = subject_final_cases()
    prompts, answers = [c.prompt for c in cases], [c.target_new for c in cases]
    before = answer_logprob(tiny, prompts, answers)
    cfg = merged(FAST, {"targets": {"steps": 25, "lr": 0.05, "weight_decay": 0.0, "kl_factor": 0.0, "clamp_norm_factor": 20.0},
                        "solve": {"cov_weight": 1.0}})
    plain = get_editor("memit", cfg)
    result = plain.edit(tiny, cases)
    after_plain = answer_logprob(tiny, prompts, answers)
    plain.rollback(tiny, result)
    get_editor("memit", merged(cfg, {"update_gate": {"quantile": 0.99}})).edit(tiny, cases)
    after_gated = answer_logprob(tiny, prompts, answers)
    for b, p, g in zip(before, after_plain, after_gated):
        assert p > b + 1.0 and g > b + 0.5 * (p - b), (before, after_plain, after_gated)


def test_rollback_and_removal_give_the_plain_model_back(tiny):
    before = _logits(tiny, TEXT)
    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9}}))
    result = ed.edit(tiny, _cases())
    ed.rollback(tiny, result)
    assert torch.equal(_logits(tiny, TEXT), before)  # the weights are back, the gate has nothing to pass
    result = ed.edit(tiny, _cases())
    gated = _logits(tiny, TEXT)
    plain = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": None}}))  # no gate configured: attach removes it
    plain.attach(tiny)
    assert installed_update_gate(tiny) is None
    assert not torch.equal(_logits(tiny, TEXT), gated)  # the ungated update leaks into this text
    ed.rollback(tiny, result)
    assert torch.equal(_logits(tiny, TEXT), before)


def test_bad_quantile_is_refused():
    with pytest.raises(ValueError, match="update_gate.quantile"):
        get_editor("alphaedit", {"update_gate": {"quantile": 1.5}})


def test_a_served_version_gets_the_gate_of_its_weight_editor(tiny):
    """Serving and the pipeline rebuild the gate from the config in the version's note."""
    from flows.services.runtime import weight_editor_attach

    note = json.dumps({"config": get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9}})).config.to_dict()}, default=str)
    chain = [
        {"version_id": 1, "method": None, "delta_path": None, "note": None},
        {"version_id": 2, "method": "alphaedit", "delta_path": "v2.safetensors", "note": note},
        {"version_id": 3, "method": "rag", "delta_path": None, "note": None},  # memory editors have no say
    ]
    attach = weight_editor_attach(chain)
    assert attach is not None
    attach(tiny)
    assert installed_update_gate(tiny) is not None and installed_update_gate(tiny).quantile == 0.9
    assert weight_editor_attach(chain[:1]) is None


def test_the_server_installs_a_versions_gate_and_removes_it_for_an_ungated_one(tiny):
    from kedit_core.serving import ServingState, VersionPlan

    editor = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9}}))
    plans = {
        0: VersionPlan(version_id=0),
        1: VersionPlan(version_id=1, attach=editor.attach),
    }
    state = ServingState(tiny, plans.__getitem__, version_id=1)
    with state.lease() as held:
        gate = installed_update_gate(held.lm)
        assert gate is not None and gate.quantile == 0.9
        assert all(g.version is not None for g in gate.gates)  # tau computed before serving
    state.load_version(0)
    with state.lease() as held:
        assert installed_update_gate(held.lm) is None
    state.rollback()
    with state.lease() as held:
        assert held.version_id == 1 and installed_update_gate(held.lm) is not None


def _more_cases() -> list[EditCase]:
    return [
        EditCase(case_id=f"d{i}", subject=s, relation="capital", prompt=f"The capital of {s} is", target_new=t)
        for i, (s, t) in enumerate([("Varnholm", "Cairo"), ("Ostrel", "Quito")])
    ]


def test_per_batch_gate_gates_each_batch_on_its_own_and_forgets_a_rolled_back_one(tiny):
    """Per-batch mode: each batch's update keeps its own tau; where every change passes the
    layer gives the edited output, where none does the base output; a rollback of the last
    batch removes exactly its change."""
    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9, "per_batch": True}}))
    ed.edit(tiny, _cases())
    gate = installed_update_gate(tiny)
    gate.refresh()
    first = {g.layer: (len(g.segments.taus), g.segments.taus[0]) for g in gate.gates}
    assert all(n == 1 for n, _ in first.values())
    second = ed.edit(tiny, _more_cases())
    gate.refresh()
    for g in gate.gates:
        assert len(g.segments.taus) == 2
        assert g.segments.taus[0] == first[g.layer][1], "an earlier batch's tau moved when a new batch came"
        rebuilt = sum(u @ v for u, v in zip(g.segments.us, g.segments.vs))
        assert torch.allclose(rebuilt, g.delta, atol=1e-5 * float(g.delta.abs().max())), "the changes do not sum to the update"
    for text, subject in (("The capital of Tessaly is", "The capital of Tessaly"), ("The capital of Ostrel is", "The capital of Ostrel")):
        outs = _layer_outputs(tiny, gate.layers, text)
        end = len(tiny.tokenizer.encode(subject, add_special_tokens=False)) - 1
        for layer in gate.layers:
            out, live, base = outs[layer]
            assert not torch.isclose(out[end], base[end], atol=1e-5).all(), f"layer {layer}: nothing passed at {subject!r}"
    elsewhere = _layer_outputs(tiny, gate.layers, TEXT)
    for layer in gate.layers:
        out, live, base = elsewhere[layer]
        assert torch.isclose(out, base, atol=1e-5).all(-1).any(), f"layer {layer}: passed at every position of other text"
    ed.rollback(tiny, second)
    gate.refresh()
    for g in gate.gates:
        assert len(g.segments.taus) == 1 and g.segments.taus[0] == first[g.layer][1]


def _share_where_any_change_passes(g, keys: torch.Tensor) -> float:
    seg = g.segments
    per_change = torch.stack([(keys @ (u @ v).T).norm(dim=-1) for u, v in zip(seg.us, seg.vs)], dim=1)  # [P, B]
    return float((per_change > seg.scale * torch.tensor(seg.taus)).any(dim=1).float().mean())


@pytest.mark.parametrize("union", [True, False])
def test_per_batch_gate_bounds_where_any_change_passes_on_ordinary_text(tiny, union):
    """With `per_batch_union` (the default) the changes' taus are raised together until the
    share of ordinary positions where any of them passes is the gate's 1 - quantile, as the
    summed gate's is; without it each change passes on its own share."""
    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9, "per_batch": True, "chats": 0,
                                                               "per_batch_union": union}}))
    for cases in (_cases(), _more_cases(), [EditCase(case_id="e0", subject="Quin", relation="capital",
                                                     prompt="The capital of Quin is", target_new="Paris")]):
        ed.edit(tiny, cases)
    gate = installed_update_gate(tiny)
    gate.refresh()
    for g in gate.gates:
        assert len(g.segments.taus) == 3
        share = _share_where_any_change_passes(g, g.keys)
        if union:
            assert g.segments.scale >= 1.0
            assert share <= 0.1 + 1.5 / len(g.keys), f"layer {g.layer}: changes pass on {share:.3f} of ordinary positions"
        else:
            assert g.segments.scale == 1.0
            alone = [float(((g.keys @ (u @ v).T).norm(dim=-1) > tau).float().mean())
                     for u, v, tau in zip(g.segments.us, g.segments.vs, g.segments.taus)]
            assert max(alone) <= 0.1 + 1.5 / len(g.keys) and share >= max(alone)
    stats = gate.stats()
    assert all(stats[f"L{g.layer}"]["changes"] == 3 for g in gate.gates)


def test_the_union_scale_kept_across_batches_is_the_one_computed_afresh(tiny):
    """The union scale keeps each change's ratios from the batch it came with; after more
    batches and after a rollback it is the scale a fresh gate computes over all changes."""
    from kedit_core.editors.update_gate import _Segments

    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9, "per_batch": True}}))
    gate = None
    for cases in (_cases(), _more_cases()):
        last = ed.edit(tiny, cases)
        gate = installed_update_gate(tiny)
        gate.refresh()

    def afresh(g) -> float:
        return _Segments.from_state(g.segments.state()).union_scale(g)

    for g in gate.gates:
        assert g.segments._worst["ordinary"][0] == 2  # both changes' ratios, kept
        assert g.segments.scale == pytest.approx(afresh(g), rel=1e-6)
    ed.rollback(tiny, last)
    gate.refresh()
    for g in gate.gates:
        assert len(g.segments.taus) == 1 and g.segments.scale == pytest.approx(afresh(g), rel=1e-6)


def test_a_bfloat16_stand_in_of_the_weights_leaves_the_gate_as_the_float32_weights_gave_it(tiny):
    """While targets are optimised the float32 weights are held in bfloat16 (`weights_in`):
    the same weights rounded. The gate must not read the rounding as a new batch's change
    (it once pushed a full-rank 'change', rescaled the union, and took it out again after)."""
    from kedit_core.editors.memit_speedups import weights_in

    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9, "per_batch": True, "chats": 0}}))
    ed.edit(tiny, _cases())
    gate = installed_update_gate(tiny)
    gate.refresh()
    before = {g.layer: (list(g.segments.taus), g.segments.scale, g.version) for g in gate.gates}
    with weights_in(tiny.model, torch.bfloat16):
        assert edit_site(tiny.model, gate.layers[0]).module.weight.dtype == torch.bfloat16
        _logits(tiny, TEXT)  # every gate hook runs on the stand-in
        during = {g.layer: (list(g.segments.taus), g.segments.scale, g.version) for g in gate.gates}
    _logits(tiny, TEXT)
    assert during == before
    assert {g.layer: (list(g.segments.taus), g.segments.scale, g.version) for g in gate.gates} == before


def test_per_batch_gate_state_restores_over_the_same_weights(tiny):
    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9, "per_batch": True}}))
    ed.edit(tiny, _cases())
    ed.edit(tiny, _more_cases())
    gate = installed_update_gate(tiny)
    state = gate.segments_state()
    before = _logits(tiny, TEXT + " The capital of Tessaly is")
    for g in gate.gates:  # as a fresh process would see it: one merged change
        g.segments, g.version = None, None
    gate.load_segments_state(state)
    assert all(len(g.segments.taus) == 2 for g in gate.gates)
    assert torch.equal(_logits(tiny, TEXT + " The capital of Tessaly is"), before)


def test_per_batch_gate_rebuilt_from_the_chains_deltas_serves_as_the_live_one(tiny):
    """A server or a new night rebuilds a version from the ledger's deltas: the per-batch
    gate takes its changes from those links and answers as the process that applied them."""
    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9, "per_batch": True}}))
    links = [ed.edit(tiny, _cases()).delta.tensors, ed.edit(tiny, _more_cases()).delta.tensors]
    gate = installed_update_gate(tiny)
    text = TEXT + " The capital of Tessaly is"
    live = _logits(tiny, text)
    live_taus = {g.layer: list(g.segments.taus) for g in gate.gates}
    live_scale = {g.layer: g.segments.scale for g in gate.gates}
    for g in gate.gates:  # a fresh process: one merged change
        g.segments, g.version = None, None
    gate.refresh()
    assert all(len(g.segments.taus) == 1 for g in gate.gates)
    reads = []
    gate.load_links([(f"v{i}", lambda t=t, i=i: reads.append(i) or t) for i, t in enumerate(links)])
    gate.load_links([(f"v{i}", lambda t=t, i=i: reads.append(i) or t) for i, t in enumerate(links)])
    assert reads == [0, 1], "a link already factored was read again"
    for g in gate.gates:
        assert len(g.segments.taus) == 2
        assert g.segments.taus == pytest.approx(live_taus[g.layer], rel=1e-4)
        assert g.segments.scale == pytest.approx(live_scale[g.layer], rel=1e-4)
    assert torch.allclose(_logits(tiny, text), live, atol=1e-4)


def test_a_server_moving_forward_adds_only_the_new_links_and_holds_each_factor_once(tiny):
    """A server moves to the next night's version: the gate keeps the changes it loaded and
    adds the new link (the union scale's ratios of earlier changes are not recomputed), the
    result serves as a full rebuild does, and the cached factors of the links in use are
    views of the gate's stack, not a second copy of it."""
    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9, "per_batch": True}}))
    third = [EditCase(case_id="e0", subject="Pellin", relation="capital", prompt="The capital of Pellin is",
                      target_new="Berlin")]
    results = [ed.edit(tiny, cases) for cases in (_cases(), _more_cases(), third)]
    gate = installed_update_gate(tiny)
    text = TEXT + " The capital of Pellin is"
    live = _logits(tiny, text)
    live_taus = {g.layer: list(g.segments.taus) for g in gate.gates}
    links = [r.delta.tensors for r in results]
    reads: list[int] = []
    chain = [(f"v{i}", lambda t=t, i=i: reads.append(i) or t) for i, t in enumerate(links)]

    results[2].delta.revert(tiny.model)  # the server is at the second night's version
    gate.load_links(chain[:2])
    first = {g.layer: g.segments for g in gate.gates}
    results[2].delta.apply(tiny.model)  # and moves to the third's
    gate.load_links(chain)
    assert reads == [0, 1, 2], "a link already factored was read again"
    for g in gate.gates:
        assert g.segments is first[g.layer], "the gate was rebuilt instead of extended"
        assert g.segments.taus == pytest.approx(live_taus[g.layer], rel=1e-4)
        v_store = g.segments.v_all.untyped_storage().data_ptr()
        assert {gate.link_cache[key][g.layer][1].untyped_storage().data_ptr() for key, _ in chain} == {v_store}, \
            "the cached factors are a second copy of the stack"
    assert torch.allclose(_logits(tiny, text), live, atol=1e-4)
    extended = {g.layer: g.segments.scale for g in gate.gates}

    results[2].delta.revert(tiny.model)  # back a night: not a prefix move, rebuilt
    gate.load_links(chain[:2])
    for g in gate.gates:
        assert g.segments is not first[g.layer] and len(g.segments.taus) == 2
        third_v = gate.link_cache["v2"][g.layer][1]
        assert third_v._base is None, "a link off the chain keeps a view of the old stack alive"
    results[2].delta.apply(tiny.model)
    for g in gate.gates:  # a full rebuild of the three links gives the extended gate's scale
        g.segments, g.version = None, None
    gate.load_links(chain)
    assert reads == [0, 1, 2]
    assert {g.layer: g.segments.scale for g in gate.gates} == pytest.approx(extended, rel=1e-6)
    assert torch.allclose(_logits(tiny, text), live, atol=1e-4)

    results[2].delta.revert(tiny.model)
    gate.load_links(chain[:2])
    loaded = {g.layer: g.segments for g in gate.gates}
    results[2].delta.apply(tiny.model)
    _logits(tiny, text)  # a request sees the new weights first: the gate takes them as a change of its own
    gate.load_links(chain)
    for g in gate.gates:  # so the loaded prefix no longer describes the gate: rebuilt, not extended
        assert g.segments is not loaded[g.layer] and len(g.segments.taus) == 3
    assert torch.allclose(_logits(tiny, text), live, atol=1e-4)


def test_a_version_rebuilt_from_the_ledger_gates_each_of_its_batches_on_its_own(tiny, tmp_path):
    """The runtime and the server serve a version through `weight_editor_attach`: with a
    per-batch gate in the version's config, the chain's stored deltas become its changes."""
    from flows.services import runtime
    from kedit_core.editors.update_gate import remove_update_gate

    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9, "per_batch": True}}))
    note = json.dumps({"config": ed.config.to_dict()}, default=str)
    chain = [{"version_id": 1, "method": None, "delta_path": None, "delta_sha256": None, "note": None}]
    for version, cases in ((2, _cases()), (3, _more_cases())):
        path = tmp_path / f"v{version}.safetensors"
        sha = ed.edit(tiny, cases).delta.save(path)
        chain.append({"version_id": version, "method": "alphaedit", "delta_path": str(path), "delta_sha256": sha,
                      "note": note, "batch_id": None, "base_fingerprint": tiny.fingerprint})
    text = TEXT + " The capital of Ostrel is"
    live = _logits(tiny, text)
    live_taus = {g.layer: list(g.segments.taus) for g in installed_update_gate(tiny).gates}
    remove_update_gate(tiny)  # as a new process finds it: the weights at version 3, no gate
    runtime.weight_editor_attach(chain)(tiny)
    gate = installed_update_gate(tiny)
    assert gate is not None and gate.per_batch
    for g in gate.gates:
        assert g.segments.taus == pytest.approx(live_taus[g.layer], rel=1e-4)
    assert torch.allclose(_logits(tiny, text), live, atol=1e-4)


def test_per_batch_gate_holds_each_changes_factors_once(tiny):
    """The hook reads every change's factors stacked; the per-change factors are views of
    that one stack, not a second copy (a copy doubled the gate's memory, which grows with
    every batch of a lifelong stream), and a rollback leaves no dropped factor behind."""
    ed = get_editor("alphaedit", merged(FAST, {"update_gate": {"quantile": 0.9, "per_batch": True}}))
    ed.edit(tiny, _cases())
    last = ed.edit(tiny, _more_cases())
    gate = installed_update_gate(tiny)
    _logits(tiny, TEXT)  # the hook builds what it reads
    for g in gate.gates:
        seg = g.segments
        v_all, u_all = seg._stacked()[:2]
        storages = {t.untyped_storage().data_ptr() for t in seg.vs + [v_all]}
        assert storages == {seg.v_all.untyped_storage().data_ptr()}, "V held twice"
        assert {t.untyped_storage().data_ptr() for t in seg.us + [u_all]} == {seg.u_all.untyped_storage().data_ptr()}
        assert seg.v_all.shape[0] == sum(v.shape[0] for v in seg.vs) == u_all.shape[1]
    ranks = {g.layer: g.segments.ranks[0] for g in gate.gates}
    ed.rollback(tiny, last)
    gate.refresh()
    for g in gate.gates:
        assert g.segments.v_all.untyped_storage().nbytes() == ranks[g.layer] * g.segments.v_all.shape[1] * 4
