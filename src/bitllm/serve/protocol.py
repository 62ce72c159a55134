"""OpenAI API shapes: request bodies (validated), responses, stream chunks and the error JSON.

Reference: https://platform.openai.com/docs/api-reference (completions, chat, errors). Fields that
bitllm does not implement (penalties, tools, response formats, logit bias, suffix, best_of) are
refused with a 400 that names them, never silently ignored. Several prompts in one completions
request, and `n` choices per prompt, are separate sequences of the running batch. `null` means
"not given", as in OpenAI's API. Log-probabilities (`logprobs`, chat's `top_logprobs`) are the model's own
(log-softmax of its logits, before temperature and top-k/top-p), as in vLLM; `echo` with `logprobs`
scores the prompt too (lm-eval's `local-completions` log-likelihood requests).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from starlette.exceptions import HTTPException


class ApiError(HTTPException):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}. An
    HTTPException, so that FastAPI lets it through when it is raised while the body is read."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Nullable(BaseModel):
    """OpenAI's optional fields are nullable: a field sent as `null` (clients do) gets its default."""

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Nullable):
    include_usage: bool = False


MAX_STOP = 16  # stop strings per request: OpenAI takes 4, but lm-eval sends a task's whole `until` list (5-6)


class _Sampling(_Nullable):
    """Fields shared by both endpoints. Unknown fields (e.g. `user`) are accepted and ignored;
    known ones that would change the answer are refused in `unsupported`."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0 (OpenAI accepts it): only the most likely token, i.e. greedy
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)  # choices per prompt (the server caps prompts x n at its queue size)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Any = None
    tools: Any = None
    functions: Any = None
    response_format: Any = None
    # extensions (as in vLLM's OpenAI server)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        return v if v is None or v >= 0 else v % (1 << 64)  # numpy wants >= 0; each int64 stays its own seed

    def unsupported(self) -> None:
        """400 for OpenAI features this server does not implement."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by this server (use 0)", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ApiError(400, "tool and function calling are not supported by this server", param=name)
        fmt = self.response_format
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise ApiError(400, "response_format other than {\"type\": \"text\"} is not supported by this server "
                           "(no JSON mode or structured outputs)", param="response_format")


MAX_LOGPROBS = 20  # alternatives per position (OpenAI: 5 for completions, 20 for chat; vLLM: 20)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)  # alternatives per position
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_ids(cls, v):
        """A token id is a JSON integer: pydantic's lax mode would read true, 1.0 and "1" as 1."""
        if isinstance(v, list) and not all(isinstance(one, str) for one in v):
            for one in v:
                for t in one if isinstance(one, list) else [one]:
                    if type(t) is not int:
                        raise ValueError(f"{json.dumps(t)} is not a token id (token ids are integers)")
        return v

    def unsupported(self) -> None:
        super().unsupported()
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by this server", param="suffix")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of must be 1: this server returns the one completion it samples", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: a string, a token-id list, or a list of either."""
        p = self.prompt
        many = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        for i, one in enumerate(many):
            if one == "" or one == []:
                raise ApiError(400, "the prompt is empty" if len(many) == 1 else f"prompt {i} is empty", param="prompt")
        return many


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, "only text content parts are supported", param="messages")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class TokenizeRequest(_Nullable):
    """POST /tokenize (vLLM's shape, which lm-eval's remote tokenizer uses): text or chat messages."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "send exactly one of prompt (text) and messages (chat)", param="prompt")


class DetokenizeRequest(BaseModel):
    tokens: list[StrictInt]  # not true or 1.0 (pydantic's lax mode reads them as 1)


# --- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def body(id_: str, model: str, chat: bool, choices: list[dict], prompt_tokens: int,
         completion_tokens: int) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(id_: str, model: str, text: str, finish_reason: str | None,
                     logprobs: dict | None = None, index: int = 0) -> dict[str, Any]:
    return {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(id_: str, model: str, delta: dict[str, str], finish_reason: str | None,
               logprobs: dict | None = None, index: int = 0) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


# --- log-probabilities ---------------------------------------------------------------------------
# A position is (piece, record, alternative pieces, offset): its token's text, its TokenLogprob (None
# for the first prompt token, which nothing predicts), the texts of record.top, and where the piece
# starts in the answer's text.


def completion_logprobs(positions: list[tuple]) -> dict[str, list]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs ({text: logprob}), text_offset.
    As OpenAI's (and vLLM's), top_logprobs holds the position's own token too: up to logprobs + 1 entries."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for piece, rec, alts, offset in positions:
        top = None
        if rec is not None:  # two tokens with one text (e.g. two partial characters): the likelier one
            top = {}
            for a, (_, lp) in zip(alts, rec.top):
                top.setdefault(a, lp)
            top.setdefault(piece, rec.logprob)
        out["tokens"].append(piece)
        out["token_logprobs"].append(None if rec is None else rec.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
    return out


def chat_logprobs(positions: list[tuple]) -> dict[str, list]:
    """The chat shape: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    def entry(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(entry(piece, rec.logprob),
                             top_logprobs=[entry(a, lp) for a, (_, lp) in zip(alts, rec.top)])
                        for piece, rec, alts, _ in positions]}


def usage_chunk(id_: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The final chunk of a stream when stream_options.include_usage is set: empty choices + usage."""
    return {"id": id_, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
