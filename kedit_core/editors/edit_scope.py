"""The edit scope: which questions a weight editor's edits are for.

Why. The update gate (update_gate.py) decides per token position, from the size of the
summed update alone, whether the edited layers act. Asked as users ask (a chat), that one
threshold has to serve two masters over a stream: low enough that the first batch's
facts still pass after ten batches, high enough that the chat template and unrelated
questions never do. It cannot be both (docs/editing.md, "Served answers": at the floor
that kept 81% of unrelated replies unchanged, half of the first batch was lost).

What. A served question is first put in or out of scope as a whole, the way SERAC's scope
classifier (Mitchell et al., 2022) and WISE's router do it: it is in scope when it names a
subject the editor wrote a fact about (whole words, normalised as answers are) or when
its embedding (all-MiniLM-L6-v2, the edit memory's) is close to one of the editor's
questions for those facts (cosine >= `threshold`). Out of scope, the edited layers give
the base model's output (the reply is the unedited model's, word for word); in scope,
the edits act through the update gate as before (ungated, the whole summed update garbled
replies). The scope is built from the facts the editor remembers (`MemitEditor.facts`,
persisted with each version's state), so a served version carries it.

The router never sees the answer: it reads only the user's question, as the server does.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from kedit_core.memory import CONTEXT_TEMPLATE, fact_sentence
from kedit_core.render import normalise_form


MAX_LABEL_WORDS = 8  # longer subject labels are matched by embedding only
# Only a question's first characters are read (the embedder reads 128 tokens anyway): a
# server's user can send megabytes, and every word-run of them would be a set entry.
MAX_QUESTION_CHARS = 2000


def _word_ngrams(text: str, n_max: int = MAX_LABEL_WORDS) -> set[str]:
    """Every run of 1..n_max consecutive words of a normalised text: a question names a
    subject when one of them equals its normalised label (a set lookup per run, so the
    cost does not grow with the number of edited subjects)."""
    words = text.split()
    return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, min(i + n_max, len(words)) + 1)}


class EditScope:
    """Questions in scope of a set of facts: a subject is named, or an edit question is near.
    With `context`, a question about an edited subject is also asked with that subject's
    nearest fact in front (`rewrite_prompts`, the retrieval baseline's template): the served
    memory, for what the weights miss. With `check`, `served` also names the value the reply
    to such a question is checked for (answer.py asks again on the base layers without it)."""

    def __init__(self, threshold: float = 0.6, context: float | None = None, embedder: Any = None,
                 check: bool = False) -> None:
        self.threshold = threshold
        self.context = context  # cosine a named subject's fact needs to be put in front; None: never
        # Check the reply to a question with a fact in front for that fact's value, and ask
        # again on the base layers where it is missing (`keep_checked` in answer.py; the check uses the fact's recorded value, not its aliases).
        self.check = check
        self._embedder = embedder
        self.subjects: set[str] = set()  # normalised subject labels
        self.keys: list[str] = []  # the edit questions (and prompts) a question is compared with
        self.fact_of_key: list[str] = []  # the fact sentence each key stands for
        self.answer_of_key: list[str] = []  # the value that fact states
        self._keys_of_name: dict[str, list[int]] = {}  # normalised subject name -> its facts' keys
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._cache: dict[str, np.ndarray] = {}  # key -> vector: a sync embeds only new facts

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from kedit_core.embedder import get_embedder

            self._embedder = get_embedder()
        return self._embedder

    def _embed_keys(self, texts: list[str]) -> np.ndarray:
        """The keys' vectors (remembered: a sync embeds only the new ones; asked questions
        are not remembered, a server would keep every one)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for t, v in zip(missing, np.asarray(self.embedder.encode(missing), dtype=np.float32)):
                self._cache[t] = v
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 0), dtype=np.float32)

    def sync(self, facts: dict[str, dict[str, Sequence[str]]]) -> "EditScope":
        """Scope = the facts an editor holds now (label -> relation -> [subject, prompt,
        answer, question]); a fact is keyed by its question and its prompt."""
        subjects: set[str] = set()
        fact_of: dict[str, tuple[str, frozenset[str], str]] = {}  # key -> (fact sentence, subject's names, value)
        for label, rels in facts.items():
            for fact in rels.values():
                subject, prompt, answer = (str(x).strip() for x in fact[:3])
                question = str(fact[3]).strip() if len(fact) > 3 else ""
                names = frozenset(normalise_form(s) for s in (label, subject))
                subjects.update(names)
                for key in dict.fromkeys(k for k in (question, prompt) if k):
                    fact_of[key] = (fact_sentence(prompt, answer), names, answer)
        self.subjects = {s for s in subjects if len(s) >= 2 and len(s.split()) <= MAX_LABEL_WORDS}
        self.keys = list(fact_of)
        self.fact_of_key = [f for f, _, _ in fact_of.values()]
        self.answer_of_key = [a for _, _, a in fact_of.values()]
        self._keys_of_name = {}
        for i, (_, names, _) in enumerate(fact_of.values()):
            for name in names:
                self._keys_of_name.setdefault(name, []).append(i)
        self._vectors = self._embed_keys(self.keys)
        self._cache = {t: v for t, v in self._cache.items() if t in fact_of}
        return self

    def __len__(self) -> int:
        return len(self.keys)

    def _similarities(self, questions: list[str]) -> np.ndarray:
        """[questions, keys] cosine similarities."""
        return np.asarray(self.embedder.encode(questions), dtype=np.float32) @ self._vectors.T

    def in_scope(self, questions: Sequence[str]) -> list[bool]:
        """Per question: do the edits answer it (True) or the base layers (False)?"""
        questions = [q[:MAX_QUESTION_CHARS] for q in questions]
        if not questions or not self.keys:
            return [False] * len(questions)
        named = [not self.subjects.isdisjoint(_word_ngrams(normalise_form(q))) for q in questions]
        rest = [i for i, n in enumerate(named) if not n]
        if rest:
            best = self._similarities([questions[i] for i in rest]).max(axis=1)
            for i, b in zip(rest, best):
                named[i] = bool(b >= self.threshold)
        return named

    def context_facts(self, questions: Sequence[str]) -> list[int | None]:
        """Per question, the key of the fact put in front of it (None: asked as it is). With
        `context`, a question that names an edited subject gets that subject's fact whose
        question is nearest to it, if the cosine reaches `context`. (Only a named subject's
        facts: "What is the capital of France?" is near an edited "What is the capital of
        Tessaly?", and Tessaly's capital in front of it would be a wrong answer.)"""
        questions = list(questions)
        out: list[int | None] = [None] * len(questions)
        if self.context is None or not questions or not self.keys:
            return out
        grams = [_word_ngrams(normalise_form(q[:MAX_QUESTION_CHARS])) for q in questions]
        asking = [i for i, g in enumerate(grams) if not self.subjects.isdisjoint(g)]
        if not asking:
            return out
        sims = self._similarities([questions[i][:MAX_QUESTION_CHARS] for i in asking])
        for row, i in zip(sims, asking):
            own = sorted({k for name in grams[i] & self.subjects for k in self._keys_of_name.get(name, ())})
            if not own:  # a subject whose facts have no question or prompt text
                continue
            best = own[int(row[own].argmax())]
            if row[best] >= self.context:
                out[i] = best
        return out

    def served(self, questions: Sequence[str]) -> list[tuple[str, str | None]]:
        """Per question, (the text the served model is asked, the value its reply is checked
        for): the fact `context_facts` picks in front (the retrieval baseline's template)
        and, with `check`, that fact's value; every other question as it is, unchecked."""
        out = []
        for q, k in zip(questions, self.context_facts(questions)):
            if k is None:
                out.append((q, None))
            else:
                asked = CONTEXT_TEMPLATE.format(facts=self.fact_of_key[k], question=q)
                out.append((asked, self.answer_of_key[k] if self.check else None))
        return out

    def rewrite_prompts(self, questions: Sequence[str]) -> list[str]:
        return [asked for asked, _ in self.served(list(questions))]

    def rewrite_prompt(self, question: str) -> str:
        return self.rewrite_prompts([question])[0]
