"""Generation for the server: one completion of one prompt with token streaming (a
`BaseStreamer`-shaped object feeding a callback), stop sequences cut on decoded text, prompts
encoded outside the shared tokenizer lock, and the served memory's check of a reply.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kedit_core.answer import TOKENIZER_LOCK as _TOKENIZER_LOCK
from kedit_core.answer import keep_checked, states_value
from kedit_core.model import LoadedModel
from kedit_core.routing import routed


class _QueueStreamer:
    """Receives token ids from `generate` (skipping the prompt) and calls `on_tokens`."""

    def __init__(self, on_tokens: Callable[[list[int]], None]) -> None:
        self.on_tokens = on_tokens
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first pushes the prompt itself
            self.prompt_seen = True
            return
        self.on_tokens(value.reshape(-1).tolist())

    def end(self) -> None:
        return None


@dataclass
class GenParams:
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    in_scope: bool | None = None  # the request's edit route (kedit_core.answer.edit_routes)
    check: str | None = None  # the value the served memory checks the reply for (answer.served_asks)


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class TextAssembler:
    """Turns a growing list of token ids into text pieces safe to send.

    Decodes the whole completion each time (token boundaries can split UTF-8 characters),
    holds back an incomplete character and any tail that could still become a stop
    sequence, and cuts the text at the first stop sequence.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self.text = ""

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        with _TOKENIZER_LOCK:
            text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text = text[:at]
                self.stopped = True
        self.text = text
        if self.stopped:
            return self.flush()
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = max(self.sent, min(safe, len(text) - hold))
        piece, self.sent = text[self.sent:safe], safe
        return piece

    def flush(self) -> str:
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


_ENCODER_ATTR = "_kedit_prompt_encoder"
_ENCODER_INIT = threading.Lock()


def _prompt_encoder(tok: Any) -> Any | None:
    """A private copy of a fast tokenizer's Rust tokenizer, used only to encode prompts: no
    call ever changes its padding or truncation state, so concurrent encodes need no lock."""
    enc = getattr(tok, _ENCODER_ATTR, None)
    if enc is None:
        rust = getattr(tok, "_tokenizer", None)
        if rust is None or not hasattr(rust, "encode_batch"):
            return None
        with _ENCODER_INIT:
            enc = getattr(tok, _ENCODER_ATTR, None)
            if enc is None:
                with _TOKENIZER_LOCK:  # reading the shared tokenizer's state
                    enc = copy.deepcopy(rust)
                enc.no_padding()
                enc.no_truncation()
                setattr(tok, _ENCODER_ATTR, enc)
    return enc


def encode_prompt(lm: LoadedModel, prompt: str) -> torch.Tensor:
    """The prompt's token ids, encoded *outside* the shared tokenizer lock (which every
    streaming request takes per token to decode): a long prompt delays no other request.
    A fast tokenizer encodes through `encode_batch`, which also releases the GIL."""
    enc = _prompt_encoder(lm.tokenizer)
    if enc is None:  # a Python ("slow") tokenizer: no Rust state to borrow
        return lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = enc.encode_batch([prompt], add_special_tokens=False)[0].ids
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def generate_text(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    params: GenParams,
    on_piece: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> Generation:
    """One completion of one prompt, pushing text pieces to `on_piece` as tokens arrive.

    Greedy unless a positive temperature is asked for (the same decoding as
    `kedit_core.answer.generate`, so served answers equal local ones).
    """
    # imported here, as in kedit_core/model.py: importing transformers takes seconds, and
    # commands that never generate (kedit versions, audit) import this package
    from transformers import StoppingCriteria, StoppingCriteriaList

    tok = lm.tokenizer
    asm = TextAssembler(tok, params.stop)
    n_new = [0]
    last = [None]

    def on_tokens(ids: list[int]) -> None:
        n_new[0] += len(ids)
        last[0] = ids[-1]
        piece = asm.add(ids)
        if piece and on_piece is not None:
            on_piece(piece)

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001
            done = asm.stopped or (cancel is not None and cancel.is_set())
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    sample = params.temperature is not None and params.temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample}
    if sample:
        kwargs["temperature"] = params.temperature
        kwargs["top_p"] = params.top_p if params.top_p is not None else 1.0
    else:  # the model's own sampling defaults would only raise warnings under greedy decoding
        kwargs.update(temperature=None, top_p=None, top_k=None)
    input_ids = input_ids.to(lm.device)
    with routed(params.in_scope):  # set in this thread: a streamed request generates in its own
        lm.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=params.max_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            streamer=_QueueStreamer(on_tokens),
            stopping_criteria=StoppingCriteriaList([_Stop()]),
            **kwargs,
        )
    tail = asm.flush()
    if tail and on_piece is not None:
        on_piece(tail)
    eos = tok.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    finish = "stop" if asm.stopped or last[0] in eos_ids else "length"
    return Generation(asm.text, int(input_ids.shape[1]), n_new[0], finish)


def generate_served(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    params: GenParams,
    on_piece: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> Generation:
    """`generate_text` with the served memory's check (kedit_core.answer.keep_checked): a
    reply to a question with a fact in front (`params.check`) is held back until checked,
    and one that misses the fact's value is generated again on the base layers; the reply
    kept is then sent as one piece. Every other request streams token by token."""
    if params.check is None:
        return generate_text(lm, input_ids, params, on_piece=on_piece, cancel=cancel)
    gen = generate_text(lm, input_ids, params, cancel=cancel)
    if not states_value(gen.text, params.check) and not (cancel is not None and cancel.is_set()):
        second = generate_text(lm, input_ids, replace(params, in_scope=False), cancel=cancel)
        if keep_checked(gen.text, second.text, params.check)[1]:
            gen = second
    if gen.text and on_piece is not None:
        on_piece(gen.text)
    return gen
