"""Batched scoring primitives every evaluator builds on.

The field's convention for knowledge-editing metrics is teacher-forced token accuracy: feed
`prompt + " " + answer`, and count the answer tokens the model predicts as its argmax. We
also report greedy exact match (generate, compare), which is stricter and closer to what a
user of the served model sees.

Speed: evaluation is often the pipeline's biggest cost, so every function here scores many
pairs per forward pass, and projects onto the vocabulary only at the answer positions (a
49k-entry vocabulary times every position would dominate the cost).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kedit_core.model import LoadedModel
from kedit_core.render import normalise_form as normalise_answer  # noqa: F401  (re-exported)


@dataclass
class EncodedPairs:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    answer_mask: torch.Tensor  # [B, T] True where the *next* token is an answer token
    targets: torch.Tensor  # [B, T] the next token at each position (pad elsewhere)


def encode_pairs(lm: LoadedModel, prompts: list[str], answers: list[str], max_len: int = 256) -> EncodedPairs:
    """Tokenise `prompt` and `" " + answer` separately and join them, so answer tokens are
    the same whatever the prompt (editors tokenise targets the same way)."""
    tok = lm.tokenizer
    seqs: list[list[int]] = []
    n_prompt: list[int] = []
    for p, a in zip(prompts, answers):
        p_ids = tok.encode(p, add_special_tokens=False)
        a_ids = tok.encode(" " + a.strip(), add_special_tokens=False)
        if not a_ids:
            raise ValueError(f"empty answer for prompt {p!r}")
        ids = (p_ids + a_ids)[-max_len:]
        n_prompt.append(len(ids) - len(a_ids))
        seqs.append(ids)
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    B = len(seqs)
    input_ids = torch.full((B, width), pad, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    answer_mask = torch.zeros((B, width), dtype=torch.bool)
    targets = torch.full((B, width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.tensor(s, dtype=torch.long)
        input_ids[i, : len(s)] = t
        attention[i, : len(s)] = 1
        # position j predicts token j+1: answer tokens are s[n_prompt:], predicted from n_prompt-1 ..
        start = max(n_prompt[i] - 1, 0)
        answer_mask[i, start : len(s) - 1] = True
        targets[i, : len(s) - 1] = t[1:]
    return EncodedPairs(input_ids, attention, answer_mask, targets)


def hidden_and_head(lm: LoadedModel):
    """The decoder stack (returns final-normed hidden states) and the vocabulary projection."""
    return lm.model.base_model, lm.model.get_output_embeddings()


@torch.no_grad()
def answer_logits_stats(lm: LoadedModel, prompts: list[str], answers: list[str], batch_size: int = 32):
    """Per pair: (token accuracy, sum of answer log-probs, number of answer tokens)."""
    body, head = hidden_and_head(lm)
    device = lm.device
    out: list[tuple[float, float, int]] = []
    for s in range(0, len(prompts), batch_size):
        enc = encode_pairs(lm, prompts[s : s + batch_size], answers[s : s + batch_size])
        ids, att = enc.input_ids.to(device), enc.attention_mask.to(device)
        hidden = body(input_ids=ids, attention_mask=att).last_hidden_state
        mask = enc.answer_mask.to(device)
        logits = head(hidden[mask]).float()  # only the answer positions hit the vocabulary
        tgt = enc.targets.to(device)[mask]
        logp = torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None]).squeeze(1)
        hit = (logits.argmax(-1) == tgt).float()
        row_of = torch.nonzero(mask, as_tuple=False)[:, 0]
        for i in range(ids.shape[0]):
            sel = row_of == i
            n = int(sel.sum())
            out.append((float(hit[sel].mean()), float(logp[sel].sum()), n))
    return out


def token_accuracy(lm: LoadedModel, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
    """Teacher-forced token accuracy of each answer after its prompt (the field's metric)."""
    if not prompts:
        return []
    return [a for a, _, _ in answer_logits_stats(lm, prompts, answers, batch_size)]


def answer_logprob(lm: LoadedModel, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
    """Sum of log-probabilities of each answer's tokens after its prompt."""
    if not prompts:
        return []
    return [lp for _, lp, _ in answer_logits_stats(lm, prompts, answers, batch_size)]


@torch.no_grad()
def predicted_tokens(lm: LoadedModel, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[list[int]]:
    """The model's argmax token at each answer position (teacher-forced). Locality compares
    these between the edited and the unedited model (token agreement)."""
    body, head = hidden_and_head(lm)
    device = lm.device
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        enc = encode_pairs(lm, prompts[s : s + batch_size], answers[s : s + batch_size])
        hidden = body(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device)).last_hidden_state
        mask = enc.answer_mask.to(device)
        pred = head(hidden[mask]).argmax(-1).tolist()
        counts = mask.sum(1).tolist()
        k = 0
        for c in counts:
            out.append(pred[k : k + c])
            k += c
    return out


def token_agreement(before: list[list[int]], after: list[list[int]]) -> list[float]:
    """Share of positions where two predicted-token lists agree (locality's convention)."""
    return [sum(x == y for x, y in zip(a, b)) / max(len(a), 1) for a, b in zip(before, after)]


def exact_match(prediction: str, answer: str) -> bool:
    """Greedy output starts with the normalised answer (the model may keep talking after it)."""
    p, a = normalise_answer(prediction), normalise_answer(answer)
    return bool(a) and (p == a or p.startswith(a + " "))


@torch.no_grad()
def greedy_exact_match(
    lm: LoadedModel, prompts: list[str], answers: list[str], batch_size: int = 32, extra_tokens: int = 2
) -> list[bool]:
    """Generate greedily after each raw prompt, as many tokens as the answer has (+ a little),
    and check the continuation starts with the answer."""
    from kedit_core.answer import generate

    results: list[bool] = []
    tok = lm.tokenizer
    for s in range(0, len(prompts), batch_size):
        ps, ans = prompts[s : s + batch_size], answers[s : s + batch_size]
        n_new = max(len(tok.encode(" " + a.strip(), add_special_tokens=False)) for a in ans) + extra_tokens
        outs = generate(lm, ps, max_new_tokens=n_new)
        results.extend(exact_match(o, a) for o, a in zip(outs, ans))
    return results


@torch.no_grad()
def perplexity(lm: LoadedModel, texts: list[str], batch_size: int = 8, max_len: int = 256) -> float:
    """Token-level perplexity over texts (general-ability check on a fixed reference text)."""
    tok = lm.tokenizer
    total_nll, total_n = 0.0, 0
    body, head = hidden_and_head(lm)
    for s in range(0, len(texts), batch_size):
        seqs = [tok.encode(t, add_special_tokens=False)[:max_len] for t in texts[s : s + batch_size]]
        seqs = [x for x in seqs if len(x) > 1]
        if not seqs:
            continue
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id or 0, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
            att[i, : len(x)] = 1
        ids, att = ids.to(lm.device), att.to(lm.device)
        hidden = body(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
        mask = att[:, 1:].bool()
        logits = head(hidden[mask]).float()
        nll = torch.nn.functional.cross_entropy(logits, ids[:, 1:][mask], reduction="sum")
        total_nll += float(nll)
        total_n += int(mask.sum())
    return math.exp(total_nll / max(total_n, 1))
