"""What the server refuses before a request reaches the app: binding checks at start (no
open inference or admin API on a public address by accident) and `RequestGuard`, the ASGI
middleware doing the cheap refusals (API key, admission limit, body size)."""
from __future__ import annotations

import ipaddress
import secrets
import threading
from typing import Any

from fastapi.responses import JSONResponse

from kedit_core.errors import KeditError
from kedit_core.serving.errors import error_body

ADMIN_TOKEN_ENV = "KEDIT_ADMIN_TOKEN"
API_KEY_ENV = "KEDIT_API_KEY"  # the bearer token inference endpoints require (kedit serve --api-key)
MAX_BODY_BYTES = 1_000_000  # a request body larger than this is refused (413) before it is parsed
MAX_PENDING = 64  # generation requests in flight or queued; one more is answered 429 with Retry-After
RETRY_AFTER_S = 1
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


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
