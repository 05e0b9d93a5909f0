"""The errors a server answers with: each carries its HTTP status and the OpenAI error
fields (`type`, `param`, `code`), so every refusal is an OpenAI-style error object."""
from __future__ import annotations

from typing import Any

from kedit_core.errors import KeditError

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



def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
