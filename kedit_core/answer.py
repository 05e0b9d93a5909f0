"""Answering questions with a model version: the one function the CLI, the evaluator of
served behaviour and the HTTP server all use.

Memory editors (retrieval, LTE) change *how* a question is asked (context prepended);
weight editors change the weights. `answer()` takes an optional `prompt_rewriter` so both
kinds are served by the same code path.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

import torch

from kedit_core.matching import answer_forms, states_answer
from kedit_core.model import LoadedModel
from kedit_core.routing import installed_update_gate, routed


class PromptRewriter(Protocol):
    def rewrite_prompt(self, question: str) -> str: ...


# Hugging Face fast tokenizers are Rust objects that refuse concurrent mutable use
# ("Already borrowed") when a call changes their padding/truncation state; the server's
# requests run in parallel threads, so its tokenizer calls go through this lock (~0.1 ms each).
TOKENIZER_LOCK = threading.Lock()


def render_chat(lm: LoadedModel, messages: list[dict[str, str]]) -> str:
    """The model's chat template around a conversation, the assistant's turn opened (plain
    "role: text" lines for a tokenizer without one). The server renders every chat with
    this, and the served-answer evaluators ask through it, so both see the same prompt."""
    tok = lm.tokenizer
    try:
        with TOKENIZER_LOCK:
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (ValueError, AttributeError):  # a tokenizer with no chat template
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_prompt(lm: LoadedModel, question: str, system: str | None = None) -> str:
    """One user question as the server renders a one-message chat (the template's own
    default system prompt unless `system` is given)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return render_chat(lm, messages)


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


SERVED_MAX_NEW_TOKENS = 48  # the server's default reply length, and what every evaluator asks for


def answer(
    lm: LoadedModel,
    question: str,
    rewriter: PromptRewriter | None = None,
    max_new_tokens: int = SERVED_MAX_NEW_TOKENS,
    system: str | None = None,
) -> str:
    """Greedy answer to one question from the model as it is now (its current version)."""
    return answer_many(lm, [question], rewriter=rewriter, max_new_tokens=max_new_tokens, system=system)[0]


def rewrite_all(questions: list[str], rewriter: PromptRewriter | None) -> list[str]:
    """The questions as a memory editor would send them to the model (batched if it can)."""
    if rewriter is None:
        return list(questions)
    batched = getattr(rewriter, "rewrite_prompts", None)
    return list(batched(questions)) if callable(batched) else [rewriter.rewrite_prompt(q) for q in questions]


def answer_many(
    lm: LoadedModel,
    questions: list[str],
    rewriter: PromptRewriter | None = None,
    max_new_tokens: int = SERVED_MAX_NEW_TOKENS,
    system: str | None = None,
    batch_size: int = 16,
    checks: dict[str, int] | None = None,
) -> list[str]:
    """Greedy chat replies to one-message chats, as `kedit serve` gives them.

    Prompts are batched only with prompts of the same token length, so no row is padded
    and each reply is the one the server (one request at a time, no padding) produces:
    padding changes float rounding, and a greedy reply of 48 tokens can flip on it, which
    would show up as a changed answer that no user would ever see.

    A reply the served memory checks (`served_asks`) and finds without its fact's value is
    asked again on the base layers, as the server does (`keep_checked`). `checks` receives
    how many replies were checked, asked again, and replaced by the second reply.
    """
    questions = list(questions)
    if not questions:
        return []
    asks = served_asks(lm, questions, rewriter)
    prompts = [chat_prompt(lm, asked, system) for asked, _ in asks]
    routes = edit_routes(lm, questions)  # decided on the user's question, as the server does
    replies = _generate_unpadded(lm, prompts, routes, max_new_tokens, batch_size)
    missed = [i for i, (_, value) in enumerate(asks) if value is not None and not states_value(replies[i], value)]
    again = _generate_unpadded(lm, [prompts[i] for i in missed], [False] * len(missed), max_new_tokens, batch_size)
    replaced = 0
    for i, second in zip(missed, again):
        replies[i], took = keep_checked(replies[i], second, asks[i][1])
        replaced += took
    if checks is not None:
        for key, n in (("checked", sum(v is not None for _, v in asks)), ("asked_again", len(missed)),
                       ("replaced", replaced)):
            checks[key] = checks.get(key, 0) + n
    return replies


def _generate_unpadded(lm: LoadedModel, prompts: list[str], routes: list[bool | None], max_new_tokens: int,
                       batch_size: int) -> list[str]:
    """Greedy replies, batching only prompts of one token length and one route."""
    groups: dict[tuple[int, bool | None], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((len(lm.tokenizer.encode(p, add_special_tokens=False)), routes[i]), []).append(i)
    replies = [""] * len(prompts)
    for (_, route), idx in groups.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            with routed(route):
                got = generate(lm, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens)
            for i, reply in zip(chunk, got):
                replies[i] = reply
    return replies


def served_asks(lm: LoadedModel, questions: list[str], rewriter: PromptRewriter | None) -> list[tuple[str, str | None]]:
    """Per question, (the text the served model is asked, the value its reply is checked
    for or None). A memory editor's rewriter, if given, rewrites and nothing is checked;
    else the live weight editor's edit scope, when it puts facts in context, puts a fact
    in front of a question about an edited subject and (its `check`) names that fact's
    value (kedit_core/editors/edit_scope.py)."""
    if rewriter is not None:
        return [(q, None) for q in rewrite_all(list(questions), rewriter)]
    gate = installed_update_gate(lm)
    scope = gate.scope if gate is not None else None
    if scope is None or getattr(scope, "context", None) is None:
        return [(q, None) for q in questions]
    return scope.served(list(questions))


def states_value(reply: str, value: str) -> bool:
    """Does the reply state `value` (the served-answer protocol's whole-word match)?"""
    return states_answer(reply, answer_forms(value))


def keep_checked(first: str, second: str, value: str) -> tuple[str, bool]:
    """The reply the server gives when its first reply to a question with a fact in front
    missed the fact's value and it asked again on the base layers: the second reply if it
    states the value, else the first (a question about another fact of the subject keeps
    the edited model's own reply). (reply, True when the second was taken.)

    Why a second try: where the edit rewrote the subject's last token, the edited layers
    garble the name the reply copies from the prompt (docs/editing.md, eighth round); the
    base layers read the same fact in front without that damage."""
    if states_value(second, value):
        return second, True
    return first, False


def edit_routes(lm: LoadedModel, questions: list[str]) -> list[bool | None]:
    """Per user question: in (True) or out of (False) the scope of the live version's edits,
    None where its weight editor routes nothing (kedit_core/editors/edit_scope.py)."""
    gate = installed_update_gate(lm)
    return gate.in_scope(list(questions)) if gate is not None else [None] * len(questions)


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
