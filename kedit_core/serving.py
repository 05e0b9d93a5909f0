"""Serving the live model over HTTP in the OpenAI API shape, with hot version swaps.

Read top to bottom:
1. `VersionPlan` / `DeltaRef`: what a version is made of (the base plus an ordered chain of
   stored deltas, an optional prompt rewriter for memory editors, the ledger's recorded
   weights fingerprint). The flows side supplies a *version loader* (version id -> plan)
   because kedit_core never speaks SQL.
2. `move_to_chain` (kedit_core/weights.py): bring a model from one delta chain to another
   exactly (apply only the new links when the target extends the current chain, else
   restore the touched parameters' base values and replay; each delta's sha256 checked
   before it is read).
3. `ServingState`: at most two copies of the model ("slots"). Requests lease the current
   slot; a swap builds the new version on the idle slot (waiting until no request still
   holds it), checks its fingerprint, then flips the reference under a lock. A request is
   therefore answered wholly by one version, and no request waits for or fails during a swap.
4. Generation with token streaming (a `BaseStreamer` feeding a queue).
5. `create_app`: the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions (with
   server-sent events), /health, and bearer-token admin endpoints under /admin.
   Every error is an OpenAI-style error object with a 4xx status.
"""
from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import logging
import queue
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional, Union

import torch

from kedit_core.answer import TOKENIZER_LOCK as _TOKENIZER_LOCK
from kedit_core.answer import PromptRewriter, edit_routes, keep_checked, render_chat, served_asks, states_value
from kedit_core.editors.update_gate import routed, serve_as
from kedit_core.errors import KeditError
from kedit_core.model import LoadedModel, fingerprint_model
from kedit_core.weights import ChainState, DeltaIntegrityError, DeltaRef, UnknownParameters, move_to_chain

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "KEDIT_ADMIN_TOKEN"
API_KEY_ENV = "KEDIT_API_KEY"  # the bearer token inference endpoints require (kedit serve --api-key)
MAX_BODY_BYTES = 1_000_000  # a request body larger than this is refused (413) before it is parsed
MAX_PENDING = 64  # generation requests in flight or queued; one more is answered 429 with Retry-After
RETRY_AFTER_S = 1
# A prompt longer than context x this many characters cannot fit the context whatever the
# tokenizer does (no token in the served tokenizers spans more), so it is refused before
# it is tokenised.
MAX_CHARS_PER_TOKEN = 32
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


# --------------------------------------------------------------------------- errors


class ServingError(KeditError):
    """A request the server refuses; carries the HTTP status and OpenAI error fields."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class VersionNotFound(ServingError):
    status = 404
    code = "version_not_found"


class VersionIntegrityError(ServingError):
    """A delta's sha256 or the rebuilt weights' fingerprint disagrees with the ledger."""

    status = 409
    code = "integrity_check_failed"


class VersionConflict(ServingError):
    status = 409
    code = "version_conflict"


# --------------------------------------------------------------------------- versions


@dataclass
class VersionPlan:
    """Everything needed to serve one version, as the version loader describes it."""

    version_id: int
    chain: list[DeltaRef] = field(default_factory=list)  # from the base up to this version, in order
    base_fingerprint: str | None = None
    weights_fingerprint: str | None = None  # recorded by the ledger; checked after building
    parent_id: int | None = None
    rewriter: PromptRewriter | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # Prepares the model as the version's weight editor serves its edits (installs or
    # removes the update gate: `Editor.attach`); None = the plain weights, no gate.
    attach: Callable[[LoadedModel], None] | None = None


VersionLoader = Callable[[int], VersionPlan]
VersionLister = Callable[[], list[dict[str, Any]]]


def version_tag(version_id: int, weights_fingerprint: str) -> str:
    """The `system_fingerprint` every response carries: which version produced it."""
    return f"kedit-v{version_id}-{weights_fingerprint[:12]}"


@dataclass
class _Slot:
    """One copy of the model and the chain of deltas currently applied to it."""

    lm: LoadedModel
    chain: ChainState = field(default_factory=ChainState)
    version_id: int | None = None
    weights_fingerprint: str = ""
    rewriter: PromptRewriter | None = None
    plan: VersionPlan | None = None
    leases: int = 0


@dataclass(frozen=True)
class Lease:
    """A request's hold on one version; the weights cannot change until it is released."""

    lm: LoadedModel
    version_id: int
    weights_fingerprint: str
    rewriter: PromptRewriter | None
    _slot: _Slot

    @property
    def tag(self) -> str:
        return version_tag(self.version_id, self.weights_fingerprint)


class ServingState:
    """The served model: the current version, swappable while requests are in flight.

    `lm` must hold the unedited base weights; the state brings it to `version_id` (or
    serves it as-is as version 0 when no loader is given). At most two model copies
    exist: the one being served and, after the first swap, the previous one, which makes
    a rollback to the previous version a pointer flip.
    """

    def __init__(
        self,
        lm: LoadedModel,
        version_loader: VersionLoader | None = None,
        version_id: int | None = None,
        version_lister: VersionLister | None = None,
        model_name: str | None = None,
        max_tokens_limit: int = 1024,
    ) -> None:
        self.loader = version_loader
        self.lister = version_lister
        self.model_name = model_name or lm.spec
        self.max_tokens_limit = max_tokens_limit
        self.created = int(time.time())
        self._cond = threading.Condition()  # guards _current, leases, _history
        self._swap_lock = threading.Lock()  # one swap at a time
        self._history: list[int] = []  # versions served before the current one (rollback stack)
        self.swaps = 0
        first = _Slot(lm=lm)
        if version_loader is None:
            first.version_id = version_id or 0
            first.weights_fingerprint = fingerprint_model(lm.model)
        else:
            if version_id is None:
                raise ValueError("ServingState: give the version to serve along with the version loader")
            plan = self._plan(version_id)
            self._build(first, plan)
        self._slots = [first]
        self._current = first

    # ------------------------------------------------------------------ reading

    @contextmanager
    def lease(self) -> Iterator[Lease]:
        held = self.acquire()
        try:
            yield held
        finally:
            self.release(held)

    def acquire(self) -> Lease:
        with self._cond:
            slot = self._current
            slot.leases += 1
            return Lease(slot.lm, slot.version_id, slot.weights_fingerprint, slot.rewriter, slot)

    def release(self, held: Lease) -> None:
        with self._cond:
            held._slot.leases -= 1
            self._cond.notify_all()

    @property
    def version_id(self) -> int:
        with self._cond:
            return self._current.version_id

    @property
    def weights_fingerprint(self) -> str:
        with self._cond:
            return self._current.weights_fingerprint

    @property
    def tag(self) -> str:
        with self._cond:
            return version_tag(self._current.version_id, self._current.weights_fingerprint)

    def describe(self) -> dict[str, Any]:
        with self._cond:
            cur = self._current
            return {
                "model": self.model_name,
                "version_id": cur.version_id,
                "weights_fingerprint": cur.weights_fingerprint,
                "system_fingerprint": version_tag(cur.version_id, cur.weights_fingerprint),
                "base_fingerprint": cur.lm.fingerprint,
                "memory_rewriter": type(cur.rewriter).__name__ if cur.rewriter is not None else None,
                "history": list(self._history),
                "copies_in_memory": len(self._slots),
                "swaps": self.swaps,
                "in_flight": sum(s.leases for s in self._slots),
            }

    def current_fingerprint(self) -> dict[str, Any]:
        """Hash the weights being served *now* (not a cached value: this is what audits read)."""
        with self.lease() as held:
            actual = fingerprint_model(held.lm.model)
            plan = held._slot.plan
            return {
                "version_id": held.version_id,
                "weights_fingerprint": actual,
                "fingerprint_at_load": held.weights_fingerprint,
                "recorded_fingerprint": plan.weights_fingerprint if plan else None,
                "base_fingerprint": held.lm.fingerprint,
                "changed_since_load": actual != held.weights_fingerprint,
            }

    def list_versions(self) -> list[dict[str, Any]]:
        return self.lister() if self.lister is not None else []

    # ------------------------------------------------------------------ swapping

    def load_version(self, version_id: int) -> dict[str, Any]:
        """Serve `version_id` from now on; requests in flight finish on the old weights."""
        with self._swap_lock:
            previous = self.version_id
            if previous == version_id:
                return {"version_id": version_id, "previous": previous, "changed": False, **self._timing(0.0)}
            t0 = time.perf_counter()
            self._switch(self._plan(version_id))
            with self._cond:
                self._history.append(previous)
            return {"version_id": version_id, "previous": previous, "changed": True,
                    **self._timing(time.perf_counter() - t0)}

    def rollback(self) -> dict[str, Any]:
        """Serve the version served before the current one (or, with no history, its parent)."""
        with self._swap_lock:
            with self._cond:
                previous = self._current.version_id
                from_history = bool(self._history)
                target = self._history[-1] if from_history else None
                plan = self._current.plan
            if target is None:
                if plan is None or plan.parent_id is None:
                    raise VersionConflict(f"version {previous} has no previous version to roll back to")
                target = plan.parent_id
            t0 = time.perf_counter()
            self._switch(self._plan(target))
            if from_history:
                with self._cond:
                    self._history.pop()
            return {"version_id": target, "previous": previous, "changed": True,
                    **self._timing(time.perf_counter() - t0)}

    def _timing(self, seconds: float) -> dict[str, Any]:
        return {"system_fingerprint": self.tag, "seconds": round(seconds, 4)}

    def _plan(self, version_id: int) -> VersionPlan:
        if self.loader is None:
            raise VersionConflict("this server was started without a version loader; it serves one fixed model")
        try:
            plan = self.loader(version_id)
        except ServingError:
            raise
        except (KeyError, LookupError) as exc:
            raise VersionNotFound(f"model version {version_id} is unknown: {exc}") from exc
        except KeditError as exc:
            raise VersionConflict(f"model version {version_id} cannot be loaded: {exc}") from exc
        if plan.version_id != version_id:
            raise VersionConflict(f"the version loader returned version {plan.version_id} for {version_id}")
        return plan

    def _switch(self, plan: VersionPlan) -> None:
        with self._cond:
            idle = next((s for s in self._slots if s is not self._current), None)
            current = self._current
        if idle is None:
            # The second copy, made once. Deep-copying while requests read the model is
            # safe: nothing writes to the current slot's tensors.
            lm_copy, chain_copy = copy.deepcopy((current.lm, current.chain))
            idle = _Slot(lm=lm_copy, chain=chain_copy, version_id=current.version_id,
                         weights_fingerprint=current.weights_fingerprint, rewriter=current.rewriter, plan=current.plan)
            with self._cond:
                self._slots.append(idle)
        with self._cond:
            # Requests that started on this copy before the previous swap must finish first.
            self._cond.wait_for(lambda: idle.leases == 0)
        # When the idle copy already holds this version (a rollback right after a swap)
        # the chain walk is empty and only the fingerprint is re-checked.
        self._build(idle, plan)
        with self._cond:
            self._current = idle
            self.swaps += 1
        log.info("now serving version %s (%s)", plan.version_id, idle.weights_fingerprint[:12])

    def _build(self, slot: _Slot, plan: VersionPlan) -> None:
        if plan.base_fingerprint and plan.base_fingerprint != slot.lm.fingerprint:
            raise VersionConflict(
                f"version {plan.version_id} belongs to base {plan.base_fingerprint[:12]}, "
                f"not the served model {slot.lm.fingerprint[:12]}"
            )
        slot.version_id = None  # unknown until the build succeeds
        try:
            move_to_chain(slot.lm.model, slot.chain, plan.chain)
        except DeltaIntegrityError as exc:
            raise VersionIntegrityError(str(exc)) from exc
        except UnknownParameters as exc:
            raise VersionConflict(str(exc)) from exc
        serve_as(slot.lm, plan.attach)
        fp = fingerprint_model(slot.lm.model)
        slot.weights_fingerprint = fp
        if plan.weights_fingerprint and fp != plan.weights_fingerprint:
            raise VersionIntegrityError(
                f"version {plan.version_id} rebuilt to weights {fp[:12]}, the ledger recorded "
                f"{plan.weights_fingerprint[:12]}: refusing to serve it"
            )
        slot.version_id, slot.rewriter, slot.plan = plan.version_id, plan.rewriter, plan


# --------------------------------------------------------------------------- generation


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


# --------------------------------------------------------------------------- request models

# Module-level imports: FastAPI resolves the endpoints' (string) annotations in this
# module's globals.
from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are ignored, as OpenAI does


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None


class StreamOptions(_Req):
    include_usage: bool = False


# Sampling parameters in the ranges the OpenAI API accepts (a value outside is a 400 naming
# the parameter, never passed on to generate): temperature 0..2, top_p in (0, 1],
# penalties -2..2 (accepted and ignored), at most 4 stop sequences.
_TEMPERATURE = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
_TOP_P = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
_PENALTY = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)


class _Sampling(_Req):
    temperature: Optional[float] = _TEMPERATURE
    top_p: Optional[float] = _TOP_P
    presence_penalty: Optional[float] = _PENALTY
    frequency_penalty: Optional[float] = _PENALTY
    n: Optional[int] = 1
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ChatRequest(_Sampling):
    model: str
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None


class CompletionRequest(_Sampling):
    model: str
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = 16
    echo: bool = False


class LoadRequest(_Req):
    version_id: int


# --------------------------------------------------------------------------- the app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_inference_binding(host: str, api_key: str | None, require: bool | None = None) -> None:
    """Refuse inference endpoints without a bearer token on an address other machines can
    reach, unless explicitly allowed (`require=False`: kedit serve --no-api-key)."""
    if require is None:
        require = not is_loopback(host)
    if require and not api_key:
        raise KeditError(
            f"refusing to serve inference on {host} without an API key: set {API_KEY_ENV} or pass --api-key "
            "(or bind to 127.0.0.1, or pass --no-api-key to serve it open on purpose)"
        )


def check_admin_binding(host: str, admin_token: str | None, admin_enabled: bool = True) -> None:
    """Refuse an admin API without a token on an address other machines can reach."""
    if admin_enabled and not admin_token and not is_loopback(host):
        raise KeditError(
            f"refusing to serve the admin API on {host} without a token: set {ADMIN_TOKEN_ENV} "
            "(or bind to 127.0.0.1, or disable the admin API)"
        )


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _bearer_ok(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and bool(given) and secrets.compare_digest(given.strip().encode(), token.encode())


class RequestGuard:
    """ASGI middleware in front of the app, doing the cheap refusals before any body is
    read, parsed or tokenised:

    - the inference API key (`api_key`; /health and /admin are not covered: /admin has its
      own token), checked in constant time, 401 without it;
    - admission: at most `max_pending` generation requests in flight or queued (counted
      until their response, streamed or not, has ended); one more is answered 429 with
      Retry-After at once instead of waiting in an unbounded queue;
    - the body size: a Content-Length above `max_body_bytes` is 413 before reading, and a
      body without one is read only up to the limit.
    """

    def __init__(self, app: Any, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 max_pending: int = MAX_PENDING) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.max_pending = max_pending
        self.pending = 0
        self.refused_busy = 0
        self._lock = threading.Lock()

    async def _refuse(self, scope: Any, receive: Any, send: Any, status: int, message: str, code: str,
                      type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        await JSONResponse(error_body(message, type_, None, code), status_code=status, headers=headers)(scope, receive, send)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and path.startswith("/v1/") and not _bearer_ok(headers.get("authorization", ""), self.api_key):
            await self._refuse(scope, receive, send, 401, "a valid API key is required: send 'Authorization: Bearer "
                               f"<key>' (the server's {API_KEY_ENV})", "invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
            return
        admitted = path in GENERATION_PATHS and scope.get("method") == "POST"
        if admitted:
            with self._lock:
                if self.pending >= self.max_pending:
                    self.refused_busy += 1
                    admitted = False
                    busy = True
                else:
                    self.pending += 1
                    busy = False
            if busy:
                await self._refuse(scope, receive, send, 429, f"the server is busy ({self.max_pending} requests in "
                                   "flight or queued): retry later", "server_busy", "server_error",
                                   headers={"Retry-After": str(RETRY_AFTER_S)})
                return
        try:
            length = headers.get("content-length")
            if length is not None and (not length.strip().isdigit() or int(length) > self.max_body_bytes):
                await self._refuse(scope, receive, send, 413, f"the request body is larger than this server's limit "
                                   f"of {self.max_body_bytes} bytes", "request_too_large")
                return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                receive = await self._bounded(scope, receive, send)
                if receive is None:
                    return
            await self.app(scope, receive, send)
        finally:
            if admitted:
                with self._lock:
                    self.pending -= 1

    async def _bounded(self, scope: Any, receive: Any, send: Any) -> Any:
        """Read the body (up to the limit) and hand the app a receive that replays it."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send, 413, f"the request body is larger than this server's limit "
                                   f"of {self.max_body_bytes} bytes", "request_too_large")
                return None
            if not message.get("more_body", False):
                break

        async def replay() -> Any:
            if messages:
                return messages.pop(0)
            return await receive()

        return replay


def create_app(state: ServingState, admin_token: str | None, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_pending: int = MAX_PENDING) -> FastAPI:
    """The FastAPI app serving `state`. Admin endpoints answer only with `admin_token`
    (they are disabled when it is None); inference endpoints (/v1/...) only with `api_key`
    when one is given. Bodies over `max_body_bytes` are refused (413) and generation
    requests beyond `max_pending` in flight or queued are answered 429 (see RequestGuard)."""
    app = FastAPI(title="kedit serving", version="1", docs_url=None, redoc_url=None)
    app.state.serving = state
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes, max_pending=max_pending)

    def err(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
            code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        type_ = exc.type if exc.status < 500 else "server_error"
        return err(exc.status, str(exc), type_, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return err(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                       code="invalid_json")
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', []) if p != 'body') or 'body'}: {e.get('msg')}" for e in problems[:5]
        )
        return err(400, f"invalid request: {detail}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return err(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return err(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")

    def require_admin(request: Request) -> None:
        if not admin_token:
            raise ServingError(f"the admin API is disabled: start the server with {ADMIN_TOKEN_ENV} set",
                               status=403, code="admin_disabled")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ServingError("missing admin token: send 'Authorization: Bearer <token>'", status=401,
                               code="missing_api_key")
        if not secrets.compare_digest(given.strip().encode(), admin_token.encode()):
            raise ServingError("the admin token is not valid", status=401, code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != state.model_name:
            raise ServingError(f"The model '{name}' does not exist; this server serves '{state.model_name}'",
                               param="model", code="model_not_found", status=404)

    def check_tokens(held: Lease, prompt_len: int, max_tokens: int | None, param: str) -> int:
        if max_tokens is None:
            max_tokens = min(state.max_tokens_limit, 256)
        if max_tokens < 1:
            raise ServingError(f"max_tokens must be at least 1, got {max_tokens}", param=param, code="invalid_value")
        if max_tokens > state.max_tokens_limit:
            raise ServingError(f"max_tokens is {max_tokens}; this server allows at most {state.max_tokens_limit}",
                               param=param, code="invalid_value")
        cfg = held.lm.model.config
        context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if context and prompt_len + max_tokens > context:
            raise ServingError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
                param=param, code="context_length_exceeded")
        return max_tokens

    def check_n(n: int | None) -> None:
        if n not in (None, 1):
            raise ServingError("only n=1 is supported", param="n", code="invalid_value")

    def stops(stop: str | list[str] | None) -> list[str]:
        given = [stop] if isinstance(stop, str) else list(stop or [])
        if len(given) > 4:
            raise ServingError(f"stop takes at most 4 sequences, got {len(given)}", param="stop", code="invalid_value")
        return given

    def headers_for(held: Lease) -> dict[str, str]:
        return {"X-Kedit-Version": str(held.version_id), "X-Kedit-Weights": held.weights_fingerprint}

    def check_chars(held: Lease, n_chars: int, param: str) -> None:
        """The context-length check on characters, before anything is tokenised: a prompt
        that cannot fit whatever its tokens is refused at once (a 10 MB chat took the
        tokenizer ~10 s and ~1 GB before the token count refused it)."""
        cfg = held.lm.model.config
        context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if context and n_chars > context * MAX_CHARS_PER_TOKEN:
            raise ServingError(
                f"This model's maximum context length is {context} tokens. However, your prompt has {n_chars} "
                f"characters, more than {context} tokens can hold.", param=param, code="context_length_exceeded")

    async def respond(request: Request, prepared: Any) -> Any:
        """Run a prepared request: a streaming response is returned as is; a non-streaming
        generation runs in a worker thread while this coroutine watches the connection, and
        a client that goes away cancels it (it stops at the next token, its lease released)."""
        if not callable(prepared) or isinstance(prepared, Response):
            return prepared
        cancel = threading.Event()
        task = asyncio.ensure_future(run_in_threadpool(prepared, cancel))
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                return task.result()
            if not cancel.is_set() and await request.is_disconnected():
                log.info("client left %s: generation cancelled", request.url.path)
                cancel.set()

    # ---------------------------------------------------------------- public endpoints

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **state.describe()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id}")
    def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return _model_card(state)

    def prepare_chat(req: ChatRequest) -> Any:
        check_model(req.model)
        check_n(req.n)
        if not req.messages:
            raise ServingError("messages must hold at least one message", param="messages", code="invalid_value")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                    for m in req.messages]
        stop = stops(req.stop)
        held = state.acquire()
        try:
            check_chars(held, sum(len(m["content"]) for m in messages), "messages")
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            # the edits answer only a question in their scope, judged on what the user asked
            in_scope = edit_routes(held.lm, [messages[last_user]["content"]])[0] if last_user is not None else None
            check = None
            if last_user is not None:
                # Memory editors (and an edit scope's served memory) answer through the same
                # endpoint by rewriting the question.
                messages[last_user]["content"], check = served_asks(
                    held.lm, [messages[last_user]["content"]], held.rewriter)[0]
            input_ids = encode_prompt(held.lm, render_chat(held.lm, messages))
            limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            params = GenParams(check_tokens(held, input_ids.shape[1], limit,
                                            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"),
                               req.temperature, req.top_p, stop, in_scope, check)
        except BaseException:
            state.release(held)
            raise
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": state.model_name, "system_fingerprint": held.tag}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            events = _stream(state, held, input_ids, params, first=chunk({"role": "assistant", "content": ""}, None),
                             piece=lambda text: chunk({"content": text}, None),
                             last=lambda g: chunk({}, g.finish_reason),
                             usage=(lambda g: {**base, "object": "chat.completion.chunk", "choices": [],
                                               "usage": _usage(g)}) if include_usage else None)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers_for(held))

        def run(cancel: threading.Event) -> JSONResponse:
            try:
                gen = generate_served(held.lm, input_ids, params, cancel=cancel)
            finally:
                state.release(held)
            body = {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                                 "logprobs": None, "finish_reason": gen.finish_reason}],
                    "usage": _usage(gen)}
            return JSONResponse(body, headers=headers_for(held))

        return run

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        return await respond(request, await run_in_threadpool(prepare_chat, req))

    def prepare_completion(req: CompletionRequest) -> Any:
        check_model(req.model)
        check_n(req.n)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise ServingError("prompt must not be empty", param="prompt", code="invalid_value")
        if req.stream and len(prompts) > 1:
            raise ServingError("streaming takes one prompt", param="prompt", code="invalid_value")
        stop = stops(req.stop)
        held = state.acquire()
        try:
            for p in prompts:
                check_chars(held, len(p), "prompt")
            encoded = []
            asks = served_asks(held.lm, prompts, held.rewriter)
            for p, in_scope, (asked, check) in zip(prompts, edit_routes(held.lm, prompts), asks):
                ids = encode_prompt(held.lm, asked)
                encoded.append((p, ids, GenParams(check_tokens(held, ids.shape[1], req.max_tokens, "max_tokens"),
                                                  req.temperature, req.top_p, stop, in_scope, check)))
        except BaseException:
            state.release(held)
            raise
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": state.model_name, "system_fingerprint": held.tag}
        if req.stream:
            prompt, input_ids, params = encoded[0]
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                return {**base, "object": "text_completion",
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

            events = _stream(state, held, input_ids, params, first=chunk(prompt, None) if req.echo else None,
                             piece=lambda text: chunk(text, None), last=lambda g: chunk("", g.finish_reason),
                             usage=(lambda g: {**base, "object": "text_completion", "choices": [],
                                               "usage": _usage(g)}) if include_usage else None)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers_for(held))

        def run(cancel: threading.Event) -> JSONResponse:
            try:
                gens = [(p, generate_served(held.lm, ids, params, cancel=cancel)) for p, ids, params in encoded]
            finally:
                state.release(held)
            body = {**base, "object": "text_completion",
                    "choices": [{"index": i, "text": (p if req.echo else "") + g.text, "logprobs": None,
                                 "finish_reason": g.finish_reason} for i, (p, g) in enumerate(gens)],
                    "usage": {k: sum(_usage(g)[k] for _, g in gens)
                              for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
            return JSONResponse(body, headers=headers_for(held))

        return run

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await respond(request, await run_in_threadpool(prepare_completion, req))

    # ---------------------------------------------------------------- admin endpoints

    admin = [Depends(require_admin)]

    @app.get("/admin/versions", dependencies=admin)
    def versions() -> dict[str, Any]:
        return {**state.describe(), "versions": state.list_versions()}

    @app.post("/admin/versions/{version_id}/load", dependencies=admin)
    def load(version_id: int) -> dict[str, Any]:
        return state.load_version(version_id)

    @app.post("/admin/load", dependencies=admin)
    def load_body(req: LoadRequest) -> dict[str, Any]:
        return state.load_version(req.version_id)

    @app.post("/admin/rollback", dependencies=admin)
    def rollback() -> dict[str, Any]:
        return state.rollback()

    @app.get("/admin/fingerprint", dependencies=admin)
    def fingerprint() -> dict[str, Any]:
        return state.current_fingerprint()

    return app


def _model_card(state: ServingState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "kedit",
            "kedit_version": state.version_id, "system_fingerprint": state.tag}


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ServingError("only text content parts are supported", param="messages", code="invalid_value")
        parts.append(part["text"])
    return "".join(parts)


def _usage(g: Generation) -> dict[str, int]:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


_END = object()


def _stream(
    state: ServingState,
    held: Lease,
    input_ids: torch.Tensor,
    params: GenParams,
    first: dict[str, Any] | None,
    piece: Callable[[str], dict[str, Any]],
    last: Callable[[Generation], dict[str, Any]],
    usage: Callable[[Generation], dict[str, Any]] | None,
) -> Iterator[str]:
    """Server-sent events for one generation. The generation runs in its own thread and
    owns the lease, so the weights stay fixed until it ends even if the client goes away
    (a departed client sets `cancel`, which stops generation at the next token)."""
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["gen"] = generate_served(held.lm, input_ids, params, on_piece=events.put, cancel=cancel)
        except Exception as exc:  # reported to the client as an error event
            log.exception("generation failed")
            result["error"] = exc
        finally:
            state.release(held)
            events.put(_END)

    def sse(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    # Started now, not on first read: the worker must release the lease even if the
    # response is never iterated (a client that disconnects at once).
    threading.Thread(target=work, name="kedit-generate", daemon=True).start()

    def gen() -> Iterator[str]:
        try:
            if first is not None:
                yield sse(first)
            while (item := events.get()) is not _END:
                yield sse(piece(item))
            if "error" in result:
                yield sse(error_body(f"generation failed ({type(result['error']).__name__})", "server_error"))
            else:
                yield sse(last(result["gen"]))
                if usage is not None:
                    yield sse(usage(result["gen"]))
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()

    return gen()


# --------------------------------------------------------------------------- running it


class BackgroundServer:
    """uvicorn in a thread on an already-bound socket (port 0 = any free port): used by
    tests and benchmarks, so the port is known before the server starts and never races."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
