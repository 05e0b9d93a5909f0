"""The OpenAI-style HTTP app: /v1/models, /v1/completions, /v1/chat/completions (with
server-sent events), /health, and bearer-token admin endpoints under /admin.

Every error is an OpenAI-style error object with a 4xx status (`_install_error_handlers`).
A generation request is *prepared* in a worker thread (checked, tokenised, a lease on one
version taken) and then either streamed (`_stream`) or run while the connection is watched
(`_respond`), so a client that goes away stops its generation at the next token.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kedit_core.answer import edit_routes, render_chat, served_asks
from kedit_core.serving.api_models import ChatRequest, CompletionRequest, LoadRequest
from kedit_core.serving.errors import ServingError, error_body
from kedit_core.serving.generation import GenParams, Generation, encode_prompt, generate_served
from kedit_core.serving.guard import ADMIN_TOKEN_ENV, MAX_BODY_BYTES, MAX_PENDING, RequestGuard
from kedit_core.serving.versions import Lease, ServingState

log = logging.getLogger(__name__)

# A prompt longer than context x this many characters cannot fit the context whatever the
# tokenizer does (no token in the served tokenizers spans more), so it is refused before
# it is tokenised.
MAX_CHARS_PER_TOKEN = 32

# A prepared request: a response to send as is (a stream), or the generation to run,
# given the event that cancels it.
Prepared = Any


def create_app(state: ServingState, admin_token: str | None, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_pending: int = MAX_PENDING) -> FastAPI:
    """The FastAPI app serving `state`. Admin endpoints answer only with `admin_token`
    (they are disabled when it is None); inference endpoints (/v1/...) only with `api_key`
    when one is given. Bodies over `max_body_bytes` are refused (413) and generation
    requests beyond `max_pending` in flight or queued are answered 429 (see RequestGuard)."""
    app = FastAPI(title="kedit serving", version="1", docs_url=None, redoc_url=None)
    app.state.serving = state
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes, max_pending=max_pending)
    _install_error_handlers(app)
    _add_public_routes(app, state)
    _add_admin_routes(app, state, admin_token)
    return app


# --------------------------------------------------------------------------- errors


def _error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every refusal and failure as an OpenAI error object, never FastAPI's own shape."""

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        type_ = exc.type if exc.status < 500 else "server_error"
        return _error_response(exc.status, str(exc), type_, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return _error_response(
                400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                code="invalid_json")
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', []) if p != 'body') or 'body'}: {e.get('msg')}" for e in problems[:5]
        )
        return _error_response(400, f"invalid request: {detail}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return _error_response(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")


# --------------------------------------------------------------------------- request checks


def _check_model(state: ServingState, name: str) -> None:
    if name != state.model_name:
        raise ServingError(f"The model '{name}' does not exist; this server serves '{state.model_name}'",
                           param="model", code="model_not_found", status=404)


def _context_length(held: Lease) -> int | None:
    cfg = held.lm.model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _check_tokens(state: ServingState, held: Lease, prompt_len: int, max_tokens: int | None, param: str) -> int:
    """The completion budget asked for, checked against the server's limit and the context."""
    if max_tokens is None:
        max_tokens = min(state.max_tokens_limit, 256)
    if max_tokens < 1:
        raise ServingError(f"max_tokens must be at least 1, got {max_tokens}", param=param, code="invalid_value")
    if max_tokens > state.max_tokens_limit:
        raise ServingError(f"max_tokens is {max_tokens}; this server allows at most {state.max_tokens_limit}",
                           param=param, code="invalid_value")
    context = _context_length(held)
    if context and prompt_len + max_tokens > context:
        raise ServingError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
            param=param, code="context_length_exceeded")
    return max_tokens


def _check_n(n: int | None) -> None:
    if n not in (None, 1):
        raise ServingError("only n=1 is supported", param="n", code="invalid_value")


def _stops(stop: str | list[str] | None) -> list[str]:
    given = [stop] if isinstance(stop, str) else list(stop or [])
    if len(given) > 4:
        raise ServingError(f"stop takes at most 4 sequences, got {len(given)}", param="stop", code="invalid_value")
    return given


def _check_chars(held: Lease, n_chars: int, param: str) -> None:
    """The context-length check on characters, before anything is tokenised: a prompt
    that cannot fit whatever its tokens is refused at once (a 10 MB chat took the
    tokenizer ~10 s and ~1 GB before the token count refused it)."""
    context = _context_length(held)
    if context and n_chars > context * MAX_CHARS_PER_TOKEN:
        raise ServingError(
            f"This model's maximum context length is {context} tokens. However, your prompt has {n_chars} "
            f"characters, more than {context} tokens can hold.", param=param, code="context_length_exceeded")


def _admin_check(admin_token: str | None) -> Callable[[Request], None]:
    """The dependency every admin endpoint runs: the admin bearer token, in constant time."""

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

    return require_admin


# --------------------------------------------------------------------------- routes


def _add_public_routes(app: FastAPI, state: ServingState) -> None:
    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **state.describe()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id}")
    def model(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        return await _respond(request, await run_in_threadpool(_prepare_chat, state, req))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await _respond(request, await run_in_threadpool(_prepare_completion, state, req))


def _add_admin_routes(app: FastAPI, state: ServingState, admin_token: str | None) -> None:
    admin = [Depends(_admin_check(admin_token))]

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


async def _respond(request: Request, prepared: Prepared) -> Any:
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


def _headers_for(held: Lease) -> dict[str, str]:
    return {"X-Kedit-Version": str(held.version_id), "X-Kedit-Weights": held.weights_fingerprint}


# --------------------------------------------------------------------------- chat completions


def _prepare_chat(state: ServingState, req: ChatRequest) -> Prepared:
    _check_model(state, req.model)
    _check_n(req.n)
    if not req.messages:
        raise ServingError("messages must hold at least one message", param="messages", code="invalid_value")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                for m in req.messages]
    stop = _stops(req.stop)
    held, (input_ids, params) = _leased(state, lambda held: _chat_inputs(state, held, req, messages, stop))
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
        return StreamingResponse(events, media_type="text/event-stream", headers=_headers_for(held))

    def run(cancel: threading.Event) -> JSONResponse:
        try:
            gen = generate_served(held.lm, input_ids, params, cancel=cancel)
        finally:
            state.release(held)
        body = {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                             "logprobs": None, "finish_reason": gen.finish_reason}],
                "usage": _usage(gen)}
        return JSONResponse(body, headers=_headers_for(held))

    return run


def _leased(state: ServingState, prepare: Callable[[Lease], Any]) -> tuple[Lease, Any]:
    """Take a lease on the served copy and prepare the request on it; a request refused
    while preparing gives the lease back (a held lease blocks the next version swap)."""
    held = state.acquire()
    try:
        return held, prepare(held)
    except BaseException:
        state.release(held)
        raise


def _chat_inputs(state: ServingState, held: Lease, req: ChatRequest, messages: list[dict[str, str]],
                 stop: list[str]) -> tuple[torch.Tensor, GenParams]:
    """The prompt's token ids and the generation settings for a chat on `held`'s version."""
    _check_chars(held, sum(len(m["content"]) for m in messages), "messages")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    # the edits answer only a question in their scope, judged on what the user asked
    in_scope = edit_routes(held.lm, [messages[last_user]["content"]])[0] if last_user is not None else None
    check = None
    if last_user is not None:
        # Memory editors (and an edit scope's served memory) answer through the same
        # endpoint by rewriting the question.
        messages[last_user]["content"], check = served_asks(held.lm, [messages[last_user]["content"]], held.rewriter)[0]
    input_ids = encode_prompt(held.lm, render_chat(held.lm, messages))
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = GenParams(_check_tokens(state, held, input_ids.shape[1], limit, param),
                       req.temperature, req.top_p, stop, in_scope, check)
    return input_ids, params


# --------------------------------------------------------------------------- text completions


def _prepare_completion(state: ServingState, req: CompletionRequest) -> Prepared:
    _check_model(state, req.model)
    _check_n(req.n)
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise ServingError("prompt must not be empty", param="prompt", code="invalid_value")
    if req.stream and len(prompts) > 1:
        raise ServingError("streaming takes one prompt", param="prompt", code="invalid_value")
    stop = _stops(req.stop)
    held, encoded = _leased(state, lambda held: _completion_inputs(state, held, req, prompts, stop))
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
        return StreamingResponse(events, media_type="text/event-stream", headers=_headers_for(held))

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
        return JSONResponse(body, headers=_headers_for(held))

    return run


def _completion_inputs(state: ServingState, held: Lease, req: CompletionRequest, prompts: list[str],
                       stop: list[str]) -> list[tuple[str, torch.Tensor, GenParams]]:
    """(prompt, token ids, generation settings) for each prompt, on `held`'s version."""
    for p in prompts:
        _check_chars(held, len(p), "prompt")
    encoded = []
    asks = served_asks(held.lm, prompts, held.rewriter)
    for p, in_scope, (asked, check) in zip(prompts, edit_routes(held.lm, prompts), asks):
        ids = encode_prompt(held.lm, asked)
        encoded.append((p, ids, GenParams(_check_tokens(state, held, ids.shape[1], req.max_tokens, "max_tokens"),
                                          req.temperature, req.top_p, stop, in_scope, check)))
    return encoded


# --------------------------------------------------------------------------- response pieces


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
