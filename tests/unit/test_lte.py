"""LTE: alignment data never contain evaluation cases; alignment is cached and merged once;
after it, edits are memory operations (weights untouched)."""
from __future__ import annotations

import pytest

from connectors.benchmarks import read_zsre
from kedit_core.editors import get_editor
from kedit_core.editors.lte import (
    AlignExample,
    AlignmentLeakError,
    alignment_split,
    assert_no_leak,
    build_alignment_examples,
    examples_signature,
    leaks,
)
from kedit_core.memory import render_fact
from kedit_core.model import fingerprint_model
from kedit_core.scoring import normalise_answer
from kedit_core.types import EditCase, Probe

from tests.conftest import DATA

ZSRE = DATA / "benchmarks" / "zsre_mend_train_1k.json"
TINY = {"max_alignment_records": 6, "steps": 2, "batch_size": 4, "base_answer_tokens": 3}


def _texts(examples):
    return {normalise_answer(t) for ex in examples for t in [ex.question, *ex.facts]}


def test_alignment_data_from_the_real_slice_never_touch_evaluation_records():
    train, reserved = alignment_split(ZSRE, 500)
    assert {int(c.case_id.split("-")[1]) for c in train} >= {500} and min(int(c.case_id.split("-")[1]) for c in train) == 500
    assert max(int(c.case_id.split("-")[1]) for c in reserved) < 500
    examples = build_alignment_examples(train, reserved)
    assert {"in_scope", "out_scope", "plain"} == {e.kind for e in examples}
    used = {e.source_case for e in examples}
    assert not used & {c.case_id for c in reserved}
    texts = _texts(examples)
    for c in reserved:  # no evaluated question (edit prompt, paraphrase, locality) appears anywhere
        for q in [c.prompt] + [p.prompt for p in c.probes]:
            assert normalise_answer(q) not in texts
    # the slice shares four subjects across the split: those training records are dropped
    shared = {c.subject for c in train} & {c.subject for c in reserved}
    assert shared and not any(e.source_case in {c.case_id for c in train if c.subject in shared} for e in examples)


def test_builder_drops_a_training_case_that_is_an_evaluation_case():
    ev = EditCase("e1", "UniFirst", "P1", "What is the product made by UniFirst?", "drones",
                  probes=[Probe("locality", "Who wrote Hamlet?", "Shakespeare")])
    twin = EditCase("t1", "UniFirst", "P1", "What does UniFirst produce?", "drones")  # same subject
    same_q = EditCase("t2", "Acme Corp", "P1", "What is the product made by UniFirst? Acme Corp", "kites")
    loc_reuse = EditCase("t3", "Bolt", "P2", "Who founded Bolt?", "Ann",
                         probes=[Probe("locality", "who wrote hamlet", "Shakespeare")])
    clean = EditCase("t4", "Zed", "P3", "Who founded Zed?", "Bob")
    ex = build_alignment_examples([twin, same_q, loc_reuse, clean], [ev], max_distractors=1)
    used = {e.source_case for e in ex}
    assert "t1" not in used and "t3" not in used and "t4" in used
    assert "t2" not in used  # its prompt starts with an evaluation question
    assert normalise_answer("Who wrote Hamlet?") not in _texts(ex)  # reused NQ question skipped
    with pytest.raises(AlignmentLeakError):
        assert_no_leak([AlignExample("in_scope", [render_fact(ev)], "Who founded Zed?", "Bob")], [ev])
    with pytest.raises(AlignmentLeakError):
        assert_no_leak([AlignExample("out_scope", [], "what is the product made by unifirst", None)], [ev])


def test_seen_cases_are_those_the_examples_show_not_every_training_case():
    # compare-59eee638: zsre-50 (reserved for evaluation) was refused as "part of the alignment
    # data" because a training record that the builder had dropped shared its NQ locality question
    train, reserved = alignment_split(ZSRE, 500)
    examples = build_alignment_examples(train, reserved)
    seen = examples_signature(examples, train)
    assert all(leaks(c, seen) is None for c in reserved)
    used = [c for c in train if c.case_id in seen["ids"]]
    dropped = [c for c in train if c.case_id not in seen["ids"]]
    assert dropped and all(leaks(c, seen) is None for c in dropped if c.subject not in {u.subject for u in used})
    assert all(leaks(c, seen) for c in used)  # what the adapter was trained on stays refused
    editor = get_editor("lte", {})  # the editor's own check, on the full default alignment set
    editor.align_signature_only()
    editor.check_not_in_alignment(reserved)
    with pytest.raises(AlignmentLeakError, match=used[0].case_id):
        editor.check_not_in_alignment(used[:1])


def test_lte_aligns_once_caches_and_then_edits_only_memory(tiny_llama):
    lm = tiny_llama
    cases = read_zsre(ZSRE, limit=4)
    ed = get_editor("lte", TINY)
    r1 = ed.edit(lm, cases[:2])
    info = r1.info["alignment"]
    assert not info["cached"] and info["steps"] == 2 and len(r1.diagnostics[0].loss_curve) == 2
    assert not r1.delta.is_empty  # the merged adapter travels with the first batch
    aligned = fingerprint_model(lm.model)
    assert aligned != lm.fingerprint
    r2 = ed.edit(lm, cases[2:])
    assert r2.delta.is_empty and fingerprint_model(lm.model) == aligned  # memory edit: weights untouched
    para = cases[3].probes_of("paraphrase")[0].prompt
    shown = ed.rewrite_prompt(para)
    assert shown.startswith("[Updated Information] ") and shown.endswith(f"\n[Question] {para}")
    assert render_fact(cases[3]) in shown
    loc = cases[3].probes_of("locality")[0].prompt
    assert ed.rewrite_prompt(loc) == loc
    ed.rollback(lm, r2)
    ed.rollback(lm, r1)
    assert fingerprint_model(lm.model) == lm.fingerprint and len(ed.memory) == 0
    # a second editor finds the adapter in the cache: same weights, no training
    again = get_editor("lte", TINY)
    r3 = again.edit(lm, cases[:1])
    assert r3.info["alignment"]["cached"] and fingerprint_model(lm.model) == aligned
    # restored from its state (as after a restart, weights rebuilt from the ledger), it does not re-align
    restored = get_editor("lte", TINY)
    restored.load_state_dict(again.state_dict())
    lm.info.pop("lte_aligned")
    r4 = restored.edit(lm, cases[1:2])
    assert r4.delta.is_empty and fingerprint_model(lm.model) == aligned
    assert restored.rewrite_prompt(cases[0].prompt) != cases[0].prompt  # memory came back too


def test_editing_a_case_used_for_alignment_is_refused(tiny_llama):
    train = read_zsre(ZSRE, limit=520, skip_bad=True)
    used_case = next(c for c in train if int(c.case_id.split("-")[1]) >= 500)
    ed = get_editor("lte", TINY)
    with pytest.raises(AlignmentLeakError, match=used_case.case_id):
        ed.edit(tiny_llama, [used_case])
