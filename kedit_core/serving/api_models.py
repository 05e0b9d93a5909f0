"""The request bodies of the OpenAI-style API, as pydantic models (validation errors
become 400s naming the parameter; see `kedit_core.serving.app`)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


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
