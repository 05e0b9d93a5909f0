"""Answering questions with a model version: the one function the CLI, the evaluator of
served behaviour and the HTTP server all use.

Memory editors (retrieval, LTE) change *how* a question is asked (context prepended);
weight editors change the weights. `answer()` takes an optional `prompt_rewriter` so both
kinds are served by the same code path.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from kedit_core.model import LoadedModel


class PromptRewriter(Protocol):
    def rewrite_prompt(self, question: str) -> str: ...


def chat_prompt(lm: LoadedModel, question: str, system: str | None = None) -> str:
    """The model's own chat template around one user question (plain text if it has none)."""
    tok = lm.tokenizer
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"Question: {question}\nAnswer:"


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 32,
    stop_at_newline: bool = False,
    on_token: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Greedy continuations of raw prompts, batched with left padding."""
    tok = lm.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = old_side
    input_ids = enc["input_ids"].to(lm.device)
    mask = enc["attention_mask"].to(lm.device)
    out = lm.model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    texts = tok.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
    if stop_at_newline:
        texts = [t.strip().split("\n")[0] for t in texts]
    return [t.strip() for t in texts]


def answer(
    lm: LoadedModel,
    question: str,
    rewriter: PromptRewriter | None = None,
    max_new_tokens: int = 32,
    system: str | None = None,
) -> str:
    """Greedy answer to one question from the model as it is now (its current version)."""
    return answer_many(lm, [question], rewriter=rewriter, max_new_tokens=max_new_tokens, system=system)[0]


def answer_many(
    lm: LoadedModel,
    questions: list[str],
    rewriter: PromptRewriter | None = None,
    max_new_tokens: int = 32,
    system: str | None = None,
) -> list[str]:
    asked = [rewriter.rewrite_prompt(q) if rewriter is not None else q for q in questions]
    return generate(lm, [chat_prompt(lm, q, system) for q in asked], max_new_tokens=max_new_tokens)


def model_summary(lm: LoadedModel) -> dict[str, Any]:
    cfg = lm.model.config
    return {
        "spec": lm.spec,
        "architecture": cfg.model_type,
        "layers": getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)),
        "hidden_size": getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)),
        "parameters": lm.info.get("n_params"),
        "dtype": lm.info.get("dtype"),
        "fingerprint": lm.fingerprint,
        "path": lm.source_path,
        "device": str(lm.device),
    }
