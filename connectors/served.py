"""HTTP client for a running `kedit serve`: ask it questions, read back what it serves,
and (with the admin token) tell it which version to serve.

Plain `requests` rather than the `openai` package: the flows need the admin endpoints
too, and one small client for both keeps the dependency optional.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import requests

from kedit_core.errors import KeditError

ADMIN_TOKEN_ENV = "KEDIT_ADMIN_TOKEN"
# The inference key a server started with `--api-key` requires on /v1 (the same variable as
# kedit_core.serving.API_KEY_ENV; not imported from there, which would load torch).
API_KEY_ENV = "KEDIT_API_KEY"


class ServedModelError(KeditError):
    """The server refused a request or could not be reached; the message says which."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class ServedAnswer:
    text: str
    version_id: int | None
    system_fingerprint: str | None
    finish_reason: str | None


class ServedModelClient:
    """Talks to one server. `admin_token` defaults to the KEDIT_ADMIN_TOKEN variable, and
    `api_key` (sent on the inference endpoints) to KEDIT_API_KEY."""

    def __init__(self, base_url: str, admin_token: str | None = None, timeout_s: float = 300.0,
                 model: str | None = None, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        self.admin_token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout_s = timeout_s
        self._model = model
        self.session = requests.Session()

    # ------------------------------------------------------------------ plumbing

    def _call(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if admin:
            if not self.admin_token:
                raise ServedModelError(f"the admin API needs a token: set {ADMIN_TOKEN_ENV}")
            headers["Authorization"] = f"Bearer {self.admin_token}"
        elif self.api_key and path.startswith("/v1/"):
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url + path
        try:
            resp = self.session.request(method, url, headers=headers, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as exc:
            raise ServedModelError(f"cannot reach the kedit server at {self.base_url}: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            err = (body or {}).get("error") if isinstance(body, dict) else None
            message = err.get("message") if isinstance(err, dict) else (resp.text[:200] or resp.reason)
            code = err.get("code") if isinstance(err, dict) else None
            raise ServedModelError(f"{method} {path} failed ({resp.status_code}): {message}", resp.status_code, code)
        if body is None:
            raise ServedModelError(f"{method} {path}: the server answered something that is not JSON")
        return body

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.models()[0]["id"]
        return self._model

    # ------------------------------------------------------------------ public endpoints

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models")["data"]

    def chat(self, question: str, max_tokens: int = 48, system: str | None = None) -> ServedAnswer:
        """One greedy chat answer, with the version that produced it."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        body = self._call("POST", "/v1/chat/completions",
                          json={"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        choice = body["choices"][0]
        return ServedAnswer(choice["message"]["content"] or "", _version_of(body.get("system_fingerprint")),
                            body.get("system_fingerprint"), choice.get("finish_reason"))

    def ask(self, question: str, max_tokens: int = 48) -> str:
        """The served model's answer text (stripped, as `kedit_core.answer.answer` returns it)."""
        return self.chat(question, max_tokens=max_tokens).text.strip()

    # ------------------------------------------------------------------ admin endpoints

    def versions(self) -> dict[str, Any]:
        """What the server serves now, its rollback history, and the ledger's versions."""
        return self._call("GET", "/admin/versions", admin=True)

    def load_version(self, version_id: int) -> dict[str, Any]:
        return self._call("POST", f"/admin/versions/{int(version_id)}/load", admin=True)

    def publish(self, version_id: int) -> dict[str, Any]:
        """Tell the server a new version is ready: it verifies and serves it from now on."""
        return self.load_version(version_id)

    def rollback(self) -> dict[str, Any]:
        return self._call("POST", "/admin/rollback", admin=True)

    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint of the weights the server holds right now (hashed on request)."""
        return self._call("GET", "/admin/fingerprint", admin=True)


def _version_of(system_fingerprint: str | None) -> int | None:
    """'kedit-v7-0123abcd...' -> 7."""
    if not system_fingerprint or not system_fingerprint.startswith("kedit-v"):
        return None
    try:
        return int(system_fingerprint.split("-")[1][1:])
    except (IndexError, ValueError):
        return None
