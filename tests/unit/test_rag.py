"""Edit memory, its DuckDB store and the retrieval (RAG) editor, with the real MiniLM embedder."""
from __future__ import annotations

import numpy as np
import pytest

from connectors.benchmarks import read_zsre
from kedit_core.answer import answer
from kedit_core.editors import get_editor
from kedit_core.evaluate import evaluate_cases
from kedit_core.memory import EditMemory, MemoryEntry, render_fact
from kedit_core.model import fingerprint_model
from kedit_core.scoring import answer_logprob
from kedit_core.types import EditCase
from storage.memory_store import DuckDBMemoryStore

from tests.conftest import DATA

ZSRE = DATA / "benchmarks" / "zsre_mend_train_1k.json"


@pytest.fixture(scope="module")
def cases():
    return read_zsre(ZSRE, limit=20)


def _unit(rows: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_vectorised_search_matches_a_plain_loop_and_skips_inactive():
    vecs = _unit(200)
    mem = EditMemory("t", embedder=object())
    mem.add([MemoryEntry(f"t:{i}", f"fact {i}", f"key {i}") for i in range(200)], vecs)
    mem.set_active(["t:7"], False)
    queries = _unit(5, seed=1)
    hits = mem.search_vectors(queries, k=3)
    for q, row in zip(queries, hits):
        scored = sorted(((float(q @ v), i) for i, v in enumerate(vecs) if i != 7), reverse=True)[:3]
        assert [h.entry.entry_id for h in row] == [f"t:{i}" for _, i in scored]
        assert [h.score for h in row] == pytest.approx([s for s, _ in scored], abs=1e-5)
    # a query equal to the inactive vector does not get it back
    assert all(h.entry.entry_id != "t:7" for h in mem.search_vectors(vecs[7], k=5)[0])
    # the threshold drops weak hits
    assert mem.search_vectors(queries, k=3, threshold=0.99) == [[], [], [], [], []]


def test_memory_round_trips_through_duckdb(db):
    store = DuckDBMemoryStore(db)
    mem = EditMemory("rt", embedder=object(), store=store)
    vecs = _unit(50)
    mem.add([MemoryEntry(f"rt:{i:03d}", f"fact {i}", f"key {i}", case_id=f"c{i}") for i in range(50)], vecs)
    mem.set_active(["rt:004"], False)
    mem.remove(["rt:010"])
    again = EditMemory("rt", embedder=object(), store=store)
    assert again.load_from_store() == 49
    assert [e.entry_id for e in again.entries] == [e.entry_id for e in mem.entries]
    assert np.array_equal(again.vectors, mem.vectors)
    assert not again.entries[4].active and again.n_active == 48
    other = EditMemory("other", embedder=object(), store=store)
    assert other.load_from_store() == 0


def test_threshold_keeps_unrelated_questions_context_free(cases):
    rag = get_editor("rag")
    rag.edit(None, cases)
    paras = [c.probes_of("paraphrase")[0].prompt for c in cases]
    locs = [c.probes_of("locality")[0].prompt for c in cases]
    for c, para, shown in zip(cases, paras, rag.rewrite_prompts(paras)):
        assert render_fact(c) in shown, para
    assert rag.rewrite_prompts(locs) == locs  # unrelated: asked exactly as before
    # without the threshold the same unrelated questions do get (wrong) context
    loose = get_editor("rag", {"threshold": None})
    loose.edit(None, cases)
    loc = cases[0].probes_of("locality")[0].prompt
    assert loose.rewrite_prompt(loc) != loc


def test_later_fact_supersedes_and_rollback_restores(cases):
    rag = get_editor("rag", {"k": 2})
    first = EditCase("a1", "UniFirst", "P1", "What is the product made by UniFirst?", "unmanned aircraft")
    second = EditCase("a2", "UniFirst", "P1", "What is the product made by UniFirst?", "bicycles")
    r1 = rag.edit(None, [first])
    r2 = rag.edit(None, [second])
    shown = rag.rewrite_prompt("What does UniFirst make?")
    assert "bicycles" in shown and "unmanned aircraft" not in shown
    rag.rollback(None, r2)
    shown = rag.rewrite_prompt("What does UniFirst make?")
    assert "unmanned aircraft" in shown and "bicycles" not in shown
    rag.rollback(None, r1)
    assert len(rag.memory) == 0 and rag.rewrite_prompt("What does UniFirst make?") == "What does UniFirst make?"


def test_rag_changes_the_answer_and_leaves_weights_untouched(tiny_llama, cases):
    # A random tiny model cannot read context, so "the answer changes" is checked on the
    # model's scores for the new answer (the embedded-model test checks a real flip).
    lm = tiny_llama
    rag = get_editor("rag")
    batch = cases[:5]
    qs = [c.probes_of("paraphrase")[0].prompt for c in batch]
    targets = [c.target_new for c in batch]
    before = answer_logprob(lm, qs, targets)
    result = rag.edit(lm, batch)
    assert result.delta.is_empty and result.applied
    assert fingerprint_model(lm.model) == lm.fingerprint  # memory editor: weights untouched
    asked = rag.rewrite_prompts(qs)
    assert all(t in a for t, a in zip(targets, asked))  # the new answer is in what the model reads
    after = answer_logprob(lm, asked, targets)
    assert all(abs(x - y) > 1e-4 for x, y in zip(before, after))
    # the evaluator scores memory editors through the same hook as serving
    m = evaluate_cases(lm, batch, kinds=("efficacy", "paraphrase"), rewriter=rag, greedy=False)
    assert set(m) == {"efficacy_acc", "paraphrase_acc", "served_efficacy", "served_paraphrase"}
    rag.rollback(lm, result)
    assert rag.rewrite_prompts(qs) == qs
    assert answer(lm, qs[0], rewriter=rag, max_new_tokens=4) == answer(lm, qs[0], max_new_tokens=4)


def test_state_dict_carries_the_memory(cases, tmp_path):
    from kedit_core.artifacts import load_editor_state, save_editor_state  # how the pipeline persists editor state

    a = get_editor("rag")
    a.edit(None, cases[:3])
    save_editor_state(a.state_dict(), tmp_path / "state.safetensors", "rag")
    method, state = load_editor_state(tmp_path / "state.safetensors")
    b = get_editor(method)
    b.load_state_dict(state)
    q = cases[1].probes_of("paraphrase")[0].prompt
    assert b.rewrite_prompt(q) == a.rewrite_prompt(q) != q
