"""How a MEMIT batch becomes token rows: every (case, context) row and one KL row per case.

MEMIT optimises each case's target in several contexts (step 1 in `memit.py`): the prompt
after each context template, plus kedit's prompt variants (rewordings such as the
subject moved to the front, or the question in the served chat template). This module
encodes all of them, for all cases of a batch, into one right-padded tensor with the
index bookkeeping the optimisation and the key fits need: where each row's subject ends,
which case and context it belongs to, and which positions predict which answer tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kedit_core.answer import chat_prompt
from kedit_core.model import LoadedModel
from kedit_core.types import EditCase


@dataclass
class EditRows:
    """Every (case, template) row of a batch, plus one KL row "{subject} is a" per case."""

    input_ids: torch.Tensor  # [R, T] right-padded
    attention_mask: torch.Tensor  # [R, T]
    lookup: torch.Tensor  # [R] position of the subject's last token
    case_of_row: torch.Tensor  # [R]
    template_of_row: torch.Tensor  # [R]; -1 for KL rows
    tgt_row: torch.Tensor  # [N] answer-token predictions: row, position, token, weight
    tgt_pos: torch.Tensor
    tgt_tok: torch.Tensor
    tgt_weight: torch.Tensor  # 1 / (answer length * templates): the case NLL is a mean of means
    kl_row: torch.Tensor  # [n_cases] the KL row of each case
    kl_pos: torch.Tensor  # [n_cases] its last position
    n_cases: int
    n_templates: int
    subject_group: torch.Tensor | None = None  # [n_cases] index of the case's subject among the batch's subjects

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)

    @property
    def per_context_scale(self) -> float:
        """sqrt(1/contexts): per-template keys and outputs are scaled by it, so that fitting
        every context's key keeps the K K^T scale of fitting their mean."""
        return (1.0 / self.n_templates) ** 0.5


def subject_last_token(tok: Any, text: str, subject_end: int) -> int:
    # Token count of the text up to the subject's end, minus one (ROME/MEMIT convention).
    return len(tok.encode(text[:subject_end], add_special_tokens=False)) - 1


def subject_first(lm: LoadedModel, case: EditCase) -> tuple[str, int, str]:
    """The prompt with the subject moved to the front ("Munich: Who was the head of
    government of it?"), so the answer must be read from the subject across the whole
    question, as in rewordings where the subject is not the question's last word."""
    s0, s1 = case.subject_span
    rest = case.prompt[:s0] + ("It" if s0 == 0 else "it") + case.prompt[s1:]
    return f"{case.subject}: {rest}", len(case.subject), " " + case.target_new.strip()


def chat(lm: LoadedModel, case: EditCase) -> tuple[str, int, str]:
    """The case's question as `kedit serve` puts it to the model (its chat template, the
    assistant's turn opened), answered by the new value as the reply's first words: the
    served answer is what users read, and the raw prompt's answer position does not carry
    over to the assistant's turn (docs/editing.md, "Served answers")."""
    question = case.question if case.question and case.subject in case.question else case.prompt
    text = chat_prompt(lm, question)
    at = text.rindex(question)
    return text, at + question.rindex(case.subject) + len(case.subject), case.target_new.strip()


# name -> (lm, case) -> (text, end of the subject in it, answer text as it follows the text)
PROMPT_VARIANTS = {"subject_first": subject_first, "chat": chat}


def subject_groups(cases: list[EditCase]) -> list[int]:
    """For each case, the index of its subject among the batch's distinct subjects (the
    exact label, outer spaces aside: "May" and "may" may be different things), in order of
    first appearance."""
    index: dict[str, int] = {}
    return [index.setdefault(c.subject.strip(), len(index)) for c in cases]


def check_prompt_variants(variants: Any) -> None:
    unknown = [v for v in variants if v not in PROMPT_VARIANTS]
    if unknown:
        raise ValueError(f"unknown prompt variants {unknown}; known: {sorted(PROMPT_VARIANTS)}")


def encode_rows(lm: LoadedModel, cases: list[EditCase], templates: list[str], variants: tuple[str, ...] = ()) -> EditRows:
    """Each case after each context template, then in each prompt variant (with its answer
    tokens as the positions to predict), then one "{subject} is a" KL row per case."""
    check_prompt_variants(variants)
    tok = lm.tokenizer
    seqs: list[list[int]] = []
    lookup, case_of, tmpl_of = [], [], []
    tr, tp, tt, tw = [], [], [], []
    n_contexts = len(templates) + len(variants)
    for ci, case in enumerate(cases):
        s0, s1 = case.subject_span
        answer = " " + case.target_new.strip()
        if not tok.encode(answer, add_special_tokens=False):
            raise ValueError(f"case {case.case_id}: target {case.target_new!r} has no tokens")
        contexts = [(tmpl.format(case.prompt), tmpl.index("{}") + s1, answer) for tmpl in templates]
        contexts += [PROMPT_VARIANTS[v](lm, case) for v in variants]
        for ti, (text, subject_end, answer_text) in enumerate(contexts):
            a_ids = tok.encode(answer_text, add_special_tokens=False)
            p_ids = tok.encode(text, add_special_tokens=False)
            r = len(seqs)
            # position j predicts token j+1; the last answer token is never an input
            seqs.append(p_ids + a_ids[:-1])
            lookup.append(min(subject_last_token(tok, text, subject_end), len(p_ids) - 1))
            case_of.append(ci)
            tmpl_of.append(ti)
            for k, a in enumerate(a_ids):
                tr.append(r)
                tp.append(len(p_ids) - 1 + k)
                tt.append(a)
                tw.append(1.0 / (len(a_ids) * n_contexts))
    kl_row, kl_pos = [], []
    for ci, case in enumerate(cases):
        text = f"{case.subject} is a"
        ids = tok.encode(text, add_special_tokens=False)
        kl_row.append(len(seqs))
        kl_pos.append(len(ids) - 1)
        seqs.append(ids)
        lookup.append(subject_last_token(tok, text, len(case.subject)))
        case_of.append(ci)
        tmpl_of.append(-1)
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
    L = torch.tensor
    return EditRows(
        ids, att, L(lookup), L(case_of), L(tmpl_of), L(tr), L(tp), L(tt), L(tw, dtype=torch.float32),
        L(kl_row), L(kl_pos), len(cases), n_contexts, L(subject_groups(cases)),
    )

