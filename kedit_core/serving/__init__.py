"""Serving the live model over HTTP in the OpenAI API shape, with hot version swaps.

Read in this order:
- `versions.py`: what a version is made of (`VersionPlan`: the base plus an ordered chain
  of stored deltas, moved along by `kedit_core.weights.move_to_chain`) and `ServingState`,
  at most two model copies ("slots") swapped under requests in flight;
- `generation.py`: one completion of one prompt, streamed token by token;
- `api_models.py`: the OpenAI request bodies;
- `guard.py`: refusals before the app (binding checks, API key, admission, body size);
- `app.py`: the FastAPI app (`create_app`); `errors.py`: the OpenAI error objects;
- `background.py`: uvicorn in a thread (tests, benchmarks).

The names other code imports are re-exported here, so `from kedit_core.serving import X`
keeps working. A test that replaces a function must patch the module that calls it (e.g.
`kedit_core.serving.generation.generate_text`), not this one.
"""
from __future__ import annotations

from kedit_core.answer import TOKENIZER_LOCK as _TOKENIZER_LOCK
from kedit_core.serving.api_models import ChatMessage, ChatRequest, CompletionRequest, LoadRequest, StreamOptions
from kedit_core.serving.app import MAX_CHARS_PER_TOKEN, create_app
from kedit_core.serving.background import BackgroundServer
from kedit_core.serving.errors import (
    ServingError,
    VersionConflict,
    VersionIntegrityError,
    VersionNotFound,
    error_body,
)
from kedit_core.serving.generation import (
    GenParams,
    Generation,
    TextAssembler,
    encode_prompt,
    generate_served,
    generate_text,
)
from kedit_core.serving.guard import (
    ADMIN_TOKEN_ENV,
    API_KEY_ENV,
    GENERATION_PATHS,
    MAX_BODY_BYTES,
    MAX_PENDING,
    RETRY_AFTER_S,
    RequestGuard,
    check_admin_binding,
    check_inference_binding,
    is_loopback,
)
from kedit_core.serving.versions import Lease, ServingState, VersionLister, VersionLoader, VersionPlan, version_tag
from kedit_core.weights import ChainState, DeltaRef, move_to_chain, read_delta

__all__ = [
    "ADMIN_TOKEN_ENV", "API_KEY_ENV", "GENERATION_PATHS", "MAX_BODY_BYTES", "MAX_CHARS_PER_TOKEN", "MAX_PENDING",
    "RETRY_AFTER_S", "_TOKENIZER_LOCK", "BackgroundServer", "ChainState", "ChatMessage", "ChatRequest",
    "CompletionRequest", "DeltaRef", "GenParams", "Generation", "Lease", "LoadRequest", "RequestGuard",
    "ServingError", "ServingState", "StreamOptions", "TextAssembler", "VersionConflict", "VersionIntegrityError",
    "VersionLister", "VersionLoader", "VersionNotFound", "VersionPlan", "check_admin_binding",
    "check_inference_binding", "create_app", "encode_prompt", "error_body", "generate_served", "generate_text",
    "is_loopback", "move_to_chain", "read_delta", "version_tag",
]
