"""MEMIT mechanics on tiny random Llama and GPT-2 models (seconds, no downloads)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from kedit_core.anatomy import edit_site
from kedit_core.editor_settings import merged
from kedit_core.editors import get_editor
from kedit_core.editors.memit import MemitConfig, compute_targets, context_templates
from kedit_core.editors.memit_rows import encode_rows
from kedit_core.keystats import key_second_moment
from kedit_core.scoring import answer_logprob
from kedit_core.types import EditCase
from tests.conftest import sharpen, subject_final_cases

# Small, fast settings; the real defaults are tuned for the embedded model.
FAST = {"layers": [1, 2], "solve": {"keystats_samples": 600}, "targets": {"steps": 4, "bf16": False, "n_context_templates": 2}}


def _cases() -> list[EditCase]:
    return [
        EditCase(case_id="a", subject="Tessaly", relation="capital", prompt="The capital of Tessaly is", target_new="Rome"),
        EditCase(case_id="b", subject="Borvik", relation="capital", prompt="What is the capital of Borvik?", target_new="Oslo"),
        EditCase(case_id="c", subject="Quin", relation="river", prompt="Quin lies on the river", target_new="Kyiv Water"),
    ]


def test_edit_site_finds_mlp_output_by_architecture(tiny):
    site = edit_site(tiny.model, 1)
    names = dict(tiny.model.named_parameters())
    assert site.param_name in names
    w = names[site.param_name]
    hidden, inter = tiny.model.config.hidden_size, tiny.model.config.intermediate_size if tiny.arch == "llama" else 4 * 64
    if tiny.arch == "gpt2":
        assert site.transposed and tuple(w.shape) == (inter, hidden)  # Conv1D: [in, out]
    else:
        assert not site.transposed and tuple(w.shape) == (hidden, inter)  # Linear: [out, in]


def test_delta_names_shapes_applied_and_exact_revert(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    editor = get_editor("memit", FAST)
    result = editor.edit(tiny, _cases())
    params = dict(tiny.model.named_parameters())
    assert result.applied
    assert sorted(result.delta.tensors) == sorted(edit_site(tiny.model, i).param_name for i in (1, 2))
    for name, d in result.delta.tensors.items():
        assert d.shape == params[name].shape
        assert torch.equal(params[name].detach(), before[name] + d)  # applied as W + delta
        assert d.abs().max() > 0
    # embeddings (tied to the LM head) are never edited
    emb = [n for n, p in tiny.model.named_parameters() if p is tiny.model.get_input_embeddings().weight][0]
    assert torch.equal(params[emb].detach(), before[emb])
    assert len(result.diagnostics) == 3 and all(d.loss_curve for d in result.diagnostics)
    assert all(d.delta_norm is not None and d.target_norm is not None for d in result.diagnostics)
    editor.rollback(tiny, result)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit


def test_delta_roundtrips_through_safetensors(tiny, tmp_path):
    from kedit_core.weights import WeightDelta

    result = get_editor("memit", FAST).edit(tiny, _cases()[:1])
    sha = result.delta.save(tmp_path / "d.safetensors")
    loaded = WeightDelta.load(tmp_path / "d.safetensors", expected_sha256=sha)
    assert all(torch.equal(loaded.tensors[k], result.delta.tensors[k]) for k in result.delta.tensors)


def test_batched_targets_match_one_by_one(tiny):
    cfg = MemitConfig(**merged(FAST, {"targets": {"steps": 8}}))
    cases = _cases()
    templates = context_templates(tiny, cfg.targets.n_context_templates, cfg.targets.context_template_len, cfg.seed)
    together = compute_targets(tiny, encode_rows(tiny, cases, templates), 2, cfg)
    for i, case in enumerate(cases):
        alone = compute_targets(tiny, encode_rows(tiny, [case], templates), 2, cfg)
        assert torch.allclose(together.z[i], alone.z[0], rtol=1e-3, atol=1e-4)
        assert together.diagnostics[i]["steps"] == alone.diagnostics[0]["steps"]


def test_cases_of_one_subject_share_their_delta(tiny):
    """Two facts of one subject (a Wikidata revision often changes several) get one delta:
    where the subject opens the prompt their keys coincide, so two deltas would contradict.
    (Sharing is not a setting: `share_subject_delta` is retired, docs/editing.md.)"""
    cfg = MemitConfig(**merged(FAST, {"targets": {"steps": 6, "early_stop_nll": 0.0}}))
    cases = [
        EditCase(case_id="p", subject="Tessaly", relation="capital", prompt="Tessaly has the capital", target_new="Rome"),
        EditCase(case_id="q", subject="Tessaly", relation="river", prompt="Tessaly lies on the river", target_new="Kyiv"),
        EditCase(case_id="r", subject="Borvik", relation="capital", prompt="Borvik has the capital", target_new="Oslo"),
    ]
    templates = context_templates(tiny, cfg.targets.n_context_templates, cfg.targets.context_template_len, cfg.seed)
    rows = encode_rows(tiny, cases, templates)
    assert rows.subject_group.tolist() == [0, 0, 1]
    shared = compute_targets(tiny, rows, 2, cfg)
    d = shared.z - shared.z_init
    # each case alone: its own delta
    da = torch.cat([(t.z - t.z_init) for t in (compute_targets(tiny, encode_rows(tiny, [c], templates), 2, cfg)
                                               for c in cases)])
    assert torch.equal(d[0], d[1]) and d[0].norm() > 0
    assert not torch.allclose(da[0], da[1], atol=1e-3)  # apart, each fact pulls its own way
    assert torch.allclose(d[2], da[2], rtol=1e-3, atol=1e-4)  # a subject alone in the batch is optimised as alone
    assert shared.diagnostics[0]["steps"] == shared.diagnostics[1]["steps"] == 6


def test_edit_raises_target_probability(tiny):
    sharpen(tiny)
    cases = subject_final_cases()
    prompts, answers = [c.prompt for c in cases], [c.target_new for c in cases]
    before = answer_logprob(tiny, prompts, answers)
    cfg = merged(FAST, {"targets": {"steps": 25, "lr": 0.05, "weight_decay": 0.0, "kl_factor": 0.0, "clamp_norm_factor": 20.0},
                        "solve": {"cov_weight": 1.0}})
    get_editor("memit", cfg).edit(tiny, cases)
    after = answer_logprob(tiny, prompts, answers)
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)


def test_key_statistics_cached_by_samples(tiny, kedit_home):
    first = key_second_moment(tiny, [1, 2], samples=800, show_progress=False)
    files = sorted((kedit_home / "keystats").glob("*.safetensors"))
    assert len(files) == 2 and all("_800." in f.name for f in files)
    again = key_second_moment(tiny, [1], samples=800, show_progress=False)
    assert torch.equal(first[1], again[1])
    c = first[1]
    assert c.dtype == torch.float64 and torch.allclose(c, c.T)
    assert torch.linalg.eigvalsh(c).min() > -1e-8  # a second moment is positive semi-definite
    other = key_second_moment(tiny, [1], samples=400, show_progress=False)
    assert not torch.equal(other[1], first[1])


def test_sampled_key_text_is_cached_per_seed_corpus(tiny, kedit_home):
    from kedit_core.keystats import sampled_paragraphs

    a = sampled_paragraphs(tiny, ["The river flows past the old mill"], 40, max_new=8)
    assert sampled_paragraphs(tiny, ["The river flows past the old mill"], 40, max_new=8) == a  # read back
    b = sampled_paragraphs(tiny, ["A quiet market town in the hills"], 40, max_new=8)
    assert all(p.startswith("The river flows past the old") for p in a)
    assert all(p.startswith("A quiet market town in the") for p in b)  # not the first corpus's cached text
    assert len(list((kedit_home / "keystats").glob("generated_*.txt"))) == 2


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="unknown settings"):
        get_editor("memit", {"layerz": [1]})


def test_subject_first_variant_moves_the_subject_to_the_front(tiny):
    from kedit_core.editors.memit_rows import subject_first

    case = _cases()[1]
    text, end, answer = subject_first(tiny, case)
    assert text == "Borvik: What is the capital of it?" and text[:end] == "Borvik" and answer == " Oslo"
    templates = context_templates(tiny, 2, 4)
    rows = encode_rows(tiny, [case], templates, variants=("subject_first",))
    assert rows.n_templates == 3
    variant_row = int((rows.template_of_row == 2).nonzero()[0, 0])
    upto = tiny.tokenizer.decode(rows.input_ids[variant_row, : int(rows.lookup[variant_row]) + 1])
    assert upto.endswith("Borvik")
    # the answer is still scored after the (reworded) question
    assert int((rows.tgt_row == variant_row).sum()) == len(tiny.tokenizer.encode(" Oslo", add_special_tokens=False))


def test_chat_variant_asks_the_question_as_the_server_does(tiny):
    """The `chat` row is the server's rendering of the case's question; its key is read at
    the subject inside the user turn and the answer opens the assistant's reply."""
    from kedit_core.answer import chat_prompt
    from kedit_core.editors.memit_rows import chat

    case = _cases()[1]
    text, end, answer = chat(tiny, case)
    assert text == chat_prompt(tiny, case.question or case.prompt) and text[:end].endswith("Borvik")
    assert answer == "Oslo"  # no leading space: the reply starts with it
    rows = encode_rows(tiny, [case], context_templates(tiny, 2, 4), variants=("chat",))
    row = int((rows.template_of_row == 2).nonzero()[0, 0])
    assert tiny.tokenizer.decode(rows.input_ids[row, : int(rows.lookup[row]) + 1]).endswith("Borvik")
    scored = rows.tgt_tok[rows.tgt_row == row].tolist()
    assert scored == tiny.tokenizer.encode("Oslo", add_special_tokens=False)


def test_per_template_keys_fit_every_context_not_only_their_mean(tiny):
    """One edited layer, almost no covariance penalty: the closed form can then fit its keys
    exactly, so with per-template keys EVERY template row moves by the case's own delta,
    while the mean key fits only the average of the rows."""
    from kedit_core.editors.memit import row_keys_and_outputs

    cases = _cases()
    spread = {}
    for per_template in (False, True):
        cfg = merged(FAST, {"layers": [2], "solve": {"cov_weight": 1e-6, "per_template_keys": per_template}})
        editor = get_editor("memit", cfg)
        rows = encode_rows(tiny, cases, context_templates(tiny, 2, 10))
        _, before = row_keys_and_outputs(tiny, rows, [], 2)
        result = editor.edit(tiny, cases)
        _, after = row_keys_and_outputs(tiny, rows, [], 2)
        editor.rollback(tiny, result)
        moved = after - before  # [rows, H]
        case_of = rows.case_of_row[rows.template_of_row >= 0]
        spread[per_template] = max(
            float((moved[case_of == c] - moved[case_of == c].mean(0)).norm(dim=1).max() / moved[case_of == c].norm(dim=1).mean())
            for c in range(len(cases))
        )
    assert spread[True] < 1e-3, spread
    assert spread[False] > 10 * spread[True], spread


def test_unknown_prompt_variant_is_named_when_configured():
    with pytest.raises(ValueError, match="unknown prompt variants \\['reversed'\\].*subject_first"):
        get_editor("memit", merged(FAST, {"targets": {"prompt_variants": ["reversed"]}}))
    # a comma list from the command line (`--set targets.prompt_variants=subject_first,chat`)
    variants = merged(FAST, {"targets": {"prompt_variants": "subject_first,chat"}})
    assert get_editor("memit", variants).config.targets.prompt_variants == (
        "subject_first", "chat")


def test_remembers_its_facts_and_keeps_a_revisited_subjects_earlier_ones(tiny):
    first = [EditCase(case_id="a", subject="Borvik", relation="capital", prompt="Borvik has the capital", target_new="Oslo")]
    second = [EditCase(case_id="b", subject="Borvik", relation="river", prompt="Borvik lies on the river", target_new="Nile")]
    ed = get_editor("memit", FAST)
    r1 = ed.edit(tiny, first)
    assert ed.state_dict()["facts"] == {"Borvik": {"capital": ["Borvik", "Borvik has the capital", "Oslo", ""]}}
    r2 = ed.edit(tiny, second)  # the capital is optimised alongside (one shared subject delta) ...
    assert r2.info["kept_facts"] == ["kept:Borvik:capital"]
    assert [d.case_id for d in r2.diagnostics] == ["b"]  # ... but it is not this batch's edit
    assert list(ed.facts["Borvik"]) == ["capital", "river"]
    fresh = get_editor("memit", FAST)
    fresh.load_state_dict(ed.state_dict())
    assert fresh.facts == ed.facts
    ed.rollback(tiny, r2)
    assert list(ed.facts["Borvik"]) == ["capital"]
    ed.rollback(tiny, r1)
    assert ed.facts == {}
    without = get_editor("memit", {**FAST, "revisit_subjects": False})
    r1 = without.edit(tiny, first)
    r2 = without.edit(tiny, second)
    assert "kept_facts" not in r2.info
    without.rollback(tiny, r2)
    without.rollback(tiny, r1)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_a_per_call_config_edits_as_an_editor_built_with_it_and_leaves_the_editor_s_own(tiny, method):
    """`edit(lm, cases, config=cfg.stronger())` (the regression gate's retry) gives the delta
    a fresh editor with the stronger config gives, bit for bit, and `editor.config` stays."""
    settings = merged(FAST, {"update_gate": {"quantile": None}})
    editor = get_editor(method, settings)
    own = copy.deepcopy(editor.config)
    stronger = editor.config.stronger()
    assert stronger.targets.steps == 2 * own.targets.steps and stronger.targets.clamp_norm_factor == 1.5 * own.targets.clamp_norm_factor
    original = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    result = editor.edit(tiny, _cases(), config=stronger)
    assert editor.config == own and result.delta.meta["config"] == stronger.to_dict()
    editor.rollback(tiny, result)
    assert all(torch.equal(original[k], v) for k, v in tiny.model.state_dict().items())
    fresh = get_editor(method, stronger).edit(tiny, _cases())
    assert sorted(result.delta.tensors) == sorted(fresh.delta.tensors)
    assert all(torch.equal(result.delta.tensors[k], fresh.delta.tensors[k]) for k in fresh.delta.tensors)
    # settings that serve every batch follow the editor's own config
    with pytest.raises(ValueError, match="update_gate"):
        editor.edit(tiny, _cases(), config=get_editor(method, merged(settings, {"update_gate": {"quantile": 0.9}})).config)
    with pytest.raises(TypeError, match="config must be"):
        editor.edit(tiny, _cases(), config=get_editor("ft").config)


def test_settings_are_grouped_and_round_trip_nested():
    cfg = get_editor("memit", merged(FAST, {"update_gate": {"quantile": 0.99, "per_batch": True},
                                            "scope": {"threshold": 0.6}})).config
    d = cfg.to_dict()
    assert d["targets"]["steps"] == 4 and d["update_gate"] == {**d["update_gate"], "quantile": 0.99, "per_batch": True}
    assert d["scope"]["threshold"] == 0.6 and d["solve"]["keystats_samples"] == 600 and "v_steps" not in d
    assert MemitConfig.from_dict(json.loads(json.dumps(d))) == cfg
    # a group given in part keeps the method's own defaults for the rest (AlphaEdit's re-defaults)
    alpha = get_editor("alphaedit", {"targets": {"steps": 4}}).config
    assert (alpha.targets.steps, alpha.targets.kl_factor, alpha.targets.prompt_variants) == (4, 0.5, ("chat",))
    with pytest.raises(ValueError, match=r"unknown settings \['targets.stepz'\]"):
        get_editor("memit", {"targets": {"stepz": 4}})
    with pytest.raises(ValueError, match="update_gate.quantile must be between 0 and 1"):
        get_editor("memit", {"update_gate": {"quantile": 1.5}})
    # a value of the wrong type is one error naming the setting, before any edit runs
    with pytest.raises(ValueError, match=r"solve.l2 takes float, got 'abc'"):
        get_editor("alphaedit", {"solve": {"l2": "abc"}})
    with pytest.raises(ValueError, match=r"solve.preserve_horizon takes int or null, got 2.5"):
        get_editor("alphaedit", {"solve": {"preserve_horizon": 2.5}})
    with pytest.raises(ValueError, match=r"update_gate.per_batch takes bool"):
        get_editor("alphaedit", {"update_gate": {"per_batch": "yes"}})
    with pytest.raises(ValueError, match=r"solve.preserve_horizon is a number of edits \(>= 1"):
        get_editor("alphaedit", {"solve": {"preserve_horizon": 0}})
    ok = get_editor("alphaedit", {"solve": {"l2": 3, "preserve_horizon": None}, "update_gate": {"quantile": None}}).config
    assert (ok.solve.l2, ok.solve.preserve_horizon, ok.update_gate.quantile) == (3, None, None)


def test_a_stored_config_keeps_the_update_gate_it_was_applied_with():
    """AlphaEdit's default gate became per-batch with the union held (thirteenth round): a
    version stored before keeps its gate when rebuilt; a config stored now round-trips; and
    partial settings take today's defaults."""
    current = get_editor("alphaedit").config
    assert (current.update_gate.per_batch, current.update_gate.per_batch_union) == (True, True)
    assert get_editor("alphaedit", current.to_dict()).config == current
    stored = current.to_dict()
    before_union = {**stored, "update_gate": {k: v for k, v in stored["update_gate"].items() if k != "per_batch_union"}}
    assert get_editor("alphaedit", {**before_union, "update_gate": {**before_union["update_gate"], "per_batch": False}}
                      ).config.update_gate.per_batch is False  # a summed-gate version stays summed
    opted_in = get_editor("alphaedit", before_union).config.update_gate
    assert (opted_in.per_batch, opted_in.per_batch_union) == (True, False)  # the eleventh round's per-batch gate
    flat = get_editor("alphaedit", {"method": "alphaedit", "update_gate": 0.999}).config.update_gate
    assert (flat.quantile, flat.per_batch) == (0.999, False)
    partial = get_editor("alphaedit", {"update_gate": {"positions": 400}}).config.update_gate
    assert (partial.per_batch, partial.per_batch_union) == (True, True)


def test_flat_configs_stored_before_the_grouping_still_load():
    """Ledgers and editor states written before the grouping store flat dicts; each old name
    maps to one new name, and a retired toggle is accepted only with the value kept."""
    old = {"method": "memit", "layers": [1, 2], "v_steps": 50, "v_lr": 0.5, "update_gate": 0.999,
           "update_gate_per_batch": True, "edit_scope": 0.6, "scope_context": None, "scope_check": False,
           "mom2_update_weight": 1500.0, "keystats_samples": 600, "prompt_variants": ["chat"],
           "share_subject_delta": True, "keep_facts_per_subject": 8, "device": "cpu"}
    cfg = MemitConfig.from_dict(old)
    assert (cfg.targets.steps, cfg.update_gate.quantile, cfg.update_gate.per_batch, cfg.scope.threshold) == (50, 0.999, True, 0.6)
    assert (cfg.solve.cov_weight, cfg.solve.keystats_samples, cfg.targets.prompt_variants) == (1500.0, 600, ("chat",))
    with pytest.raises(ValueError, match="share_subject_delta is retired.*only true is kept, got false"):
        MemitConfig.from_dict({**old, "share_subject_delta": False})
    with pytest.raises(ValueError, match="keep_facts_per_subject is retired"):
        MemitConfig.from_dict({**old, "keep_facts_per_subject": 2})
    # AlphaEdit never read MEMIT's covariance weight; its own was cov_weight
    alpha_old = {"method": "alphaedit", "mom2_update_weight": 1500.0, "cov_weight": 0.0, "nullspace_threshold": 0.02,
                 "nullspace_relative": True, "preserve_weight": 10.0, "l2": 10.0, "update_gate": 0.999}
    alpha = get_editor("alphaedit", alpha_old).config
    # stored before the per-batch gate existed: the summed gate it was applied with
    assert alpha == get_editor("alphaedit", {"update_gate": {"per_batch": False, "per_batch_union": False}}).config
    with pytest.raises(ValueError, match="nullspace_relative is retired"):
        get_editor("alphaedit", {**alpha_old, "nullspace_relative": False})
