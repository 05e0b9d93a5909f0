"""The edit memory of memory editors (retrieval, LTE): facts with embedding vectors and a
vectorised nearest-neighbour search.

Each applied case becomes one entry: `fact_text` (what is shown to the model, e.g.
"What is the product made by UniFirst? unmanned aircraft.") and `key_text` (what a
question is compared with: the case's own question). Search is brute-force cosine
similarity as one matrix product over all active vectors (unit vectors, so a dot
product), then a top-k partial sort and a similarity threshold, so an unrelated question
retrieves nothing. Brute force is exact and, vectorised, fast enough at 100k entries
(see benchmarks/bench_retrieval.py); an approximate index would only pay off far beyond
that.

The structure is pure in-memory; persistence goes through an optional `MemoryStore`
(storage/memory_store.py implements it on DuckDB), so kedit_core never speaks SQL.
A later fact about the same (subject, relation) supersedes the earlier one: the old
entry is deactivated, not deleted, so a rollback can bring it back.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kedit_core.types import EditCase


# How a retrieved fact is shown to the model, in front of the question (the retrieval
# baseline's default and the edit scope's context; the LTE format: on SmolLM2-135M it beat
# two plainer templates, and a previous chat turn stating the fact did worse,
# docs/editing.md "Served answers").
CONTEXT_TEMPLATE = "[Updated Information] {facts}\n[Question] {question}"


def render_fact(case: EditCase) -> str:
    """The fact a case states, as one sentence shown to the model: its prompt and new answer."""
    return fact_sentence(case.prompt, case.target_new)


def fact_sentence(prompt: str, answer: str) -> str:
    prompt, answer = prompt.strip(), answer.strip()
    return f"{prompt} {answer}" + ("" if answer.endswith((".", "!", "?")) else ".")


def case_key_text(case: EditCase) -> str:
    """What a question is compared with: the case's question form (the prompt if none)."""
    return (case.question or case.prompt).strip()


@dataclass
class MemoryEntry:
    entry_id: str
    fact_text: str
    key_text: str
    case_id: str | None = None
    fact_key: str | None = None  # "subject\x1frelation": a newer entry with the same key supersedes
    active: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Hit:
    entry: MemoryEntry
    score: float  # cosine similarity of the question with the entry's key


class MemoryStore(Protocol):
    """Where a memory is persisted (storage/memory_store.DuckDBMemoryStore)."""

    def add_entries(self, memory_name: str, entries: list[MemoryEntry], vectors: np.ndarray) -> None: ...

    def set_active(self, memory_name: str, entry_ids: list[str], active: bool) -> None: ...

    def delete_entries(self, memory_name: str, entry_ids: list[str]) -> None: ...

    def load(self, memory_name: str) -> tuple[list[MemoryEntry], np.ndarray]: ...


def fact_key_of(case: EditCase) -> str:
    return f"{case.subject}\x1f{case.relation}"


class EditMemory:
    """Facts + unit vectors; `search` returns, per question, the top-k active entries whose
    similarity reaches `threshold`."""

    def __init__(self, name: str = "memory", embedder: Any = None, store: MemoryStore | None = None,
                 dim: int | None = None) -> None:
        self.name = name
        self._embedder = embedder
        self.store = store
        self.entries: list[MemoryEntry] = []
        self._dim = dim
        self._vectors = np.zeros((0, dim or 0), dtype=np.float32)  # grown by doubling
        self._active = np.zeros((0,), dtype=bool)
        self._index: dict[str, int] = {}
        self._cache: dict[str, np.ndarray] = {}
        self.cache_size = 100_000

    # ------------------------------------------------------------------ basics

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from kedit_core.embedder import get_embedder

            self._embedder = get_embedder()
        return self._embedder

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._index

    @property
    def n_active(self) -> int:
        return int(self._active[: len(self.entries)].sum())

    @property
    def vectors(self) -> np.ndarray:
        return self._vectors[: len(self.entries)]

    def embed(self, texts: list[str]) -> np.ndarray:
        """Vectors for texts, batched; remembered, because evaluation asks the same probe
        questions after every batch and one embedding call costs more than the search."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
                missing = list(dict.fromkeys(texts))
            for t, v in zip(missing, np.asarray(self.embedder.encode(missing), dtype=np.float32)):
                self._cache[t] = v
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    # ------------------------------------------------------------------ changes

    def add_cases(self, cases: list[EditCase], batch_id: str | None = None) -> tuple[list[str], list[str]]:
        """Add one entry per case; returns (new entry ids, ids of entries they superseded)."""
        batch_id = batch_id or uuid.uuid4().hex[:12]
        entries = [
            MemoryEntry(
                entry_id=f"{self.name}:{uuid.uuid4().hex}",
                fact_text=render_fact(c),
                key_text=case_key_text(c),
                case_id=c.case_id,
                fact_key=fact_key_of(c),
                meta={"batch_id": batch_id, "subject": c.subject, "relation": c.relation},
            )
            for c in cases
        ]
        # Within one batch the later case of a fact wins, as everywhere else in kedit.
        last_of_key = {e.fact_key: i for i, e in enumerate(entries)}
        superseded_in_batch = [e for i, e in enumerate(entries) if last_of_key[e.fact_key] != i]
        for e in superseded_in_batch:
            e.active = False
        keys = set(last_of_key)
        superseded = [e.entry_id for e in self.entries if e.active and e.fact_key in keys]
        self.set_active(superseded, False)
        self.add(entries, self.embed([e.key_text for e in entries]))
        return [e.entry_id for e in entries], superseded

    def add(self, entries: list[MemoryEntry], vectors: np.ndarray, persist: bool = True) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(entries) != len(vectors):
            raise ValueError(f"{len(entries)} entries but {len(vectors)} vectors")
        if not entries:
            return
        if self._dim is None or self._vectors.shape[1] == 0:
            self._dim = vectors.shape[1]
            self._vectors = np.zeros((0, self._dim), dtype=np.float32)
        if vectors.shape[1] != self._dim:
            raise ValueError(f"vector size {vectors.shape[1]} does not match the memory's {self._dim}")
        dup = [e.entry_id for e in entries if e.entry_id in self._index]
        if dup:
            raise ValueError(f"memory {self.name!r} already holds entries {dup[:3]}")
        n, m = len(self.entries), len(entries)
        if n + m > len(self._vectors):  # amortised growth: appends stay O(1) per entry
            cap = max(n + m, 2 * len(self._vectors), 64)
            grown = np.zeros((cap, self._dim), dtype=np.float32)
            grown[:n] = self._vectors[:n]
            self._vectors = grown
            active = np.zeros((cap,), dtype=bool)
            active[:n] = self._active[:n]
            self._active = active
        self._vectors[n : n + m] = vectors
        self._active[n : n + m] = [e.active for e in entries]
        for i, e in enumerate(entries):
            self._index[e.entry_id] = n + i
        self.entries.extend(entries)
        if persist and self.store is not None:
            self.store.add_entries(self.name, entries, vectors)

    def set_active(self, entry_ids: list[str], active: bool, persist: bool = True) -> None:
        for eid in entry_ids:
            i = self._index[eid]
            self.entries[i].active = active
            self._active[i] = active
        if persist and entry_ids and self.store is not None:
            self.store.set_active(self.name, entry_ids, active)

    def remove(self, entry_ids: list[str], persist: bool = True) -> None:
        """Delete entries (a rolled-back batch's facts). O(N): rollbacks are rare."""
        drop = {eid for eid in entry_ids if eid in self._index}
        if not drop:
            return
        keep = [i for i, e in enumerate(self.entries) if e.entry_id not in drop]
        self._vectors = self._vectors[keep].copy()
        self._active = self._active[keep].copy()
        self.entries = [self.entries[i] for i in keep]
        self._index = {e.entry_id: i for i, e in enumerate(self.entries)}
        if persist and self.store is not None:
            self.store.delete_entries(self.name, sorted(drop))

    def clear(self) -> None:
        self.remove([e.entry_id for e in self.entries])

    # ------------------------------------------------------------------ search

    def search(self, questions: list[str], k: int = 1, threshold: float | None = None) -> list[list[Hit]]:
        """Top-k active entries per question with similarity >= threshold (None: no threshold)."""
        if not questions:
            return []
        if self.n_active == 0:
            return [[] for _ in questions]
        return self.search_vectors(self.embed(questions), k=k, threshold=threshold)

    def search_vectors(self, queries: np.ndarray, k: int = 1, threshold: float | None = None) -> list[list[Hit]]:
        """The vectorised core: one [Q, N] matrix product, then a partial sort per row."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        n = len(self.entries)
        if n == 0 or k <= 0:
            return [[] for _ in range(len(queries))]
        scores = queries @ self._vectors[:n].T  # cosine: all vectors are unit length
        scores[:, ~self._active[:n]] = -np.inf
        k = min(k, n)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # O(N) per row, not a full sort
        out: list[list[Hit]] = []
        for row, idx in zip(scores, top):
            idx = idx[np.argsort(-row[idx], kind="stable")]
            hits = [
                Hit(self.entries[i], float(row[i]))
                for i in idx
                if np.isfinite(row[i]) and (threshold is None or row[i] >= threshold)
            ]
            out.append(hits)
        return out

    # ------------------------------------------------------------------ persistence hooks

    def state(self) -> dict[str, Any]:
        """Plain data for carrying the memory between processes without a store: JSON-able
        entries and one torch tensor (the pipeline saves editor state as safetensors)."""
        import torch

        return {
            "name": self.name,
            "entries": [{**vars(e), "meta": dict(e.meta)} for e in self.entries],
            "vectors": torch.from_numpy(self.vectors.copy()),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.entries, self._index = [], {}
        self._vectors = np.zeros((0, self._dim or 0), dtype=np.float32)
        self._active = np.zeros((0,), dtype=bool)
        entries = [MemoryEntry(**e) for e in state.get("entries", [])]
        if entries:
            vectors = state["vectors"]
            vectors = vectors.numpy() if hasattr(vectors, "numpy") else vectors
            self.add(entries, np.asarray(vectors, dtype=np.float32), persist=False)

    def load_from_store(self) -> int:
        """Replace the in-memory contents with the store's; returns the number of entries."""
        if self.store is None:
            raise RuntimeError(f"memory {self.name!r} has no store to load from")
        entries, vectors = self.store.load(self.name)
        self.load_state({"entries": [vars(e) for e in entries], "vectors": vectors})
        return len(entries)
