"""The served-answer protocol: score an edit by what a user of `kedit serve` reads.

Teacher-forced token accuracy feeds the model the answer's tokens and scores each one
given the ones before: it hands the model the answer's content and its length, and on
edited models it reads about twice as high as what users see ("The Mirage of Model
Editing", Yang et al., ACL 2025). Every figure here is instead taken from a free reply:

- each question is put in the model's chat template exactly as the server renders a
  one-message chat (`kedit_core.answer.chat_prompt`: the template's own default system
  prompt, the assistant's turn opened), decoded greedily for at most 48 new tokens,
  stopping at the end of the turn; nothing about the answer is given to the model;
- a reply *states* the new value when the normalised value or one of its aliases occurs
  in the normalised reply as whole words, and the old value does not (outside the new
  value: "Paris Saint-Germain" is not a mention of an old "Paris");
- locality: an unrelated question's reply must be *unchanged* from the unedited model's
  reply (`served_locality`); apart from that, the share of replies that were correct
  before and still are (`served_locality_correct`), since a changed reply is not
  always a wrong one;
- negation: "Is it true that ...?" asked in chat; the reply's yes/no is read off its
  first words (`served_negation`; `served_negation_pn` for the statements with the old
  value, where edited models fail).

Memory editors (retrieval, LTE) are scored through their prompt rewriting, exactly as
the server answers with them; a weight editor's served memory and its check (a reply that
misses the fact put in front is asked again on the base layers) are in `answer_many`, the
server's own path, and `served_second_try` is the share of questions that took the second reply.
"""
from __future__ import annotations

import re
from typing import Sequence

from kedit_core.answer import PromptRewriter, answer_many
from kedit_core.matching import answer_forms, states_answer
from kedit_core.model import LoadedModel
from kedit_core.render import normalise_form as normalise

__all__ = ["answer_forms", "states_answer"]  # the matching rules live in kedit_core/matching.py
from kedit_core.types import EditCase, Probe

# Locality probe kinds: unrelated knowledge is `served_locality`; other facts of an edited
# subject are reported apart (`served_locality_same`), as the teacher-forced figures are.
UNRELATED_KINDS = ("locality", "locality_other")
SAME_SUBJECT_KIND = "locality_same"


def case_forms(case: EditCase) -> tuple[list[str], list[str]]:
    """(new forms, old forms) of a case: its answers plus the aliases in its meta."""
    new = answer_forms(case.target_new, _aliases(case.meta, "aliases"))
    old = answer_forms(case.target_old or "", _aliases(case.meta, "old_aliases")) if case.target_old else []
    # An old value that is also a rendering of the new one (a re-edit to the same value)
    # cannot count against the reply.
    return new, [f for f in old if f not in new]


def probe_forms(probe: Probe, case: EditCase) -> tuple[list[str], list[str]]:
    """Forms for a probe that asks for the case's new value in other words (paraphrase),
    or for its own answer (multi-hop, portability: aliases in the probe's meta)."""
    if probe.kind == "paraphrase" and normalise(probe.answer) == normalise(case.target_new):
        return case_forms(case)
    new = answer_forms(probe.answer, _aliases(probe.meta, "aliases"))
    old_answer = probe.meta.get("old_answer")
    old = answer_forms(old_answer, _aliases(probe.meta, "old_aliases")) if old_answer else []
    return new, [f for f in old if f not in new]


def _mentions_subject(question: str, subject: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", question) is not None


def _aliases(meta: dict, key: str) -> list[str]:
    vals = meta.get(key) or []
    return [v for v in vals if isinstance(v, str)] if isinstance(vals, list) else []


_YES = re.compile(r"^(yes|yeah|correct|true|that is true|thats true|it is true|indeed)\b")
_NO = re.compile(r"^(no|nope|not|false|incorrect|that is not|thats not|it is not|that is false|thats false)\b")


def read_yes_no(reply: str) -> str | None:
    """"Yes", "No" or None (no verdict) from the first words of a chat reply."""
    text = normalise(reply)
    if _NO.match(text):
        return "No"
    if _YES.match(text):
        return "Yes"
    return None


# --------------------------------------------------------------------------- metrics


def locality_questions(cases: Sequence[EditCase]) -> list[str]:
    """The distinct locality questions of `cases` (unrelated and same-subject), sorted."""
    kinds = (*UNRELATED_KINDS, SAME_SUBJECT_KIND)
    return sorted({p.prompt for c in cases for p in c.probes if p.kind in kinds})


def record_replies(
    lm: LoadedModel,
    questions: Sequence[str],
    into: dict[str, str],
    rewriter: PromptRewriter | None = None,
) -> dict[str, str]:
    """Add the current model's replies to `questions` not yet in `into` (the reference
    that `served_locality` compares against: the model before a stream or batch)."""
    todo = [q for q in dict.fromkeys(questions) if q not in into]
    into.update(zip(todo, answer_many(lm, todo, rewriter)))
    return into


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def served_metrics(
    lm: LoadedModel,
    cases: Sequence[EditCase],
    reference_replies: dict[str, str] | None = None,
    kinds: Sequence[str] = ("efficacy", "paraphrase", "locality", "negation"),
    rewriter: PromptRewriter | None = None,
    per_case: dict[str, dict[str, float]] | None = None,
    replies: dict[str, list[dict[str, str]]] | None = None,
) -> dict[str, float]:
    """Served-answer metrics of `cases` on the model as it is now.

    All questions of all kinds are generated in one call (one set of batches). Metrics
    whose questions are absent are left out. `per_case` receives each case's
    `served_efficacy` (retention, worst-hit tables); `replies` receives question/reply
    rows per kind (the report shows them).
    """
    cases = list(cases)
    asks: list[tuple[str, str, EditCase, Probe | None]] = []  # (kind, question, case, probe)
    if "efficacy" in kinds:
        asks += [("efficacy", c.question or c.prompt, c, None) for c in cases]
    for kind in ("paraphrase", "multihop", "portability", "negation"):
        if kind in kinds:
            asks += [(kind, p.prompt, c, p) for c in cases for p in c.probes_of(kind)]
    if "locality" in kinds and reference_replies:  # a reply is only "unchanged" against a reference
        asks += [("locality", p.prompt, c, p) for c in cases for p in c.probes
                 if p.kind in (*UNRELATED_KINDS, SAME_SUBJECT_KIND) and p.prompt in reference_replies]
    if not asks:
        return {}
    # A locality question about a subject that one of these cases edits is not unrelated to
    # them (a Wikidata batch often edits several items, and one case's "other subject" probe
    # can name another case's subject): it counts with the edited subjects' other facts.
    edited = {c.subject.strip() for c in cases if c.subject.strip()}
    unique = list(dict.fromkeys(q for _, q, _, _ in asks))
    checks: dict[str, int] = {}
    got = dict(zip(unique, answer_many(lm, unique, rewriter, checks=checks)))

    scores: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        scores.setdefault(name, []).append(value)

    for kind, q, case, probe in asks:
        reply = got[q]
        if replies is not None:
            replies.setdefault(kind, []).append({"case_id": case.case_id, "question": q, "reply": reply})
        if kind == "efficacy":
            ok = float(states_answer(reply, *case_forms(case)))
            add("served_efficacy", ok)
            if per_case is not None:
                per_case.setdefault(case.case_id, {})["served_efficacy"] = ok
        elif kind in ("paraphrase", "multihop", "portability"):
            add(f"served_{kind}", float(states_answer(reply, *probe_forms(probe, case))))
        elif kind == "negation":
            right = float(read_yes_no(reply) == probe.answer.strip().capitalize())
            add("served_negation", right)
            if probe.meta.get("polarity") == "old":
                add("served_negation_pn", right)
        elif kind == "locality":
            same = probe.kind == SAME_SUBJECT_KIND or any(_mentions_subject(q, subj) for subj in edited)
            before = reference_replies[q]
            add("served_locality_same" if same else "served_locality", float(reply.strip() == before.strip()))
            if not same and probe.answer.strip():
                forms = answer_forms(probe.answer)
                if states_answer(before, forms):
                    add("served_locality_correct", float(states_answer(reply, forms)))
    out = {k: v for k, v in ((k, _mean(v)) for k, v in scores.items()) if v is not None}
    if checks.get("checked"):  # the served memory's second tries: how much of what users read they wrote
        out["served_second_try"] = checks["replaced"] / len(unique)
    return out
