"""Retrieval augmentation (RAG): the baseline that never touches the weights.

`edit` writes each case's fact into an edit memory (kedit_core/memory.py, embedded with
all-MiniLM-L6-v2); `rewrite_prompt` retrieves the top-k facts whose question is similar
enough to the asked one and prepends them in a fixed template. The threshold is what
protects locality: an unrelated question retrieves nothing and is asked unchanged, so the
base model answers it exactly as before. `threshold=None` turns it off (always the top-k),
which is how the cost of no threshold is measured.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from kedit_core.editors.base import CaseDiagnostics, Editor, EditorConfig, EditResult, register
from kedit_core.memory import CONTEXT_TEMPLATE, EditMemory, MemoryStore
from kedit_core.model import LoadedModel
from kedit_core.types import EditCase
from kedit_core.weights import WeightDelta


@dataclass
class RAGConfig(EditorConfig):
    method: ClassVar[str] = "rag"
    k: int = 1  # facts shown per question
    threshold: float | None = 0.65  # cosine similarity of question and fact key; None = no threshold
    template: str = CONTEXT_TEMPLATE
    fact_separator: str = "\n"
    memory_name: str = "rag"


@register("rag")
class RAGEditor(Editor):
    config_class = RAGConfig
    is_memory_editor = True
    config: RAGConfig

    def __init__(self, config: RAGConfig | None = None, memory: EditMemory | None = None,
                 store: MemoryStore | None = None) -> None:
        super().__init__(config)
        self.memory = memory or EditMemory(self.config.memory_name, store=store)

    # The template is fixed per method; LTE overrides only this.
    def format_prompt(self, facts: list[str], question: str) -> str:
        return self.config.template.format(facts=self.config.fact_separator.join(facts), question=question)

    def edit(self, lm: LoadedModel, cases: list[EditCase], config: EditorConfig | None = None) -> EditResult:
        # Storing facts reads no setting: they act when a question is asked (k, threshold,
        # template), with the editor's own config; `config` is only checked.
        self.call_config(config)
        t0 = time.perf_counter()
        batch_id = uuid.uuid4().hex[:12]
        added, superseded = self.memory.add_cases(cases, batch_id=batch_id)
        return EditResult(
            method=self.name,
            delta=WeightDelta(),  # weights untouched
            diagnostics=[CaseDiagnostics(case_id=c.case_id, extra={"entry_id": e}) for c, e in zip(cases, added)],
            seconds=time.perf_counter() - t0,
            applied=True,
            info={"memory_batch": batch_id, "entry_ids": added, "superseded": superseded,
                  "memory_size": self.memory.n_active},
        )

    def retrieve(self, questions: list[str]) -> list[list[str]]:
        """The facts that would be shown for each question (empty: asked unchanged)."""
        hits = self.memory.search(questions, k=self.config.k, threshold=self.config.threshold)
        return [[h.entry.fact_text for h in row] for row in hits]

    def rewrite_prompt(self, question: str) -> str:
        return self.rewrite_prompts([question])[0]

    def rewrite_prompts(self, questions: list[str]) -> list[str]:
        """Batched form (one embedding pass for many questions), used by evaluators that have it."""
        return [self.format_prompt(f, q) if f else q for f, q in zip(self.retrieve(questions), questions)]

    def rollback(self, lm: LoadedModel, result: EditResult) -> None:
        if not result.applied:
            return
        self.memory.remove(result.info.get("entry_ids", []))
        superseded = [e for e in result.info.get("superseded", []) if e in self.memory]
        self.memory.set_active(superseded, True)
        result.applied = False

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "memory" in state:
            self.memory.load_state(state["memory"])
