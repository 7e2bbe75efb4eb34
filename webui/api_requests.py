"""Parsing and checking OpenAI-style request bodies by hand: every bad input becomes an ApiError (a 4xx
in the OpenAI error shape) with a sentence naming the field and what to fix."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from backends.base import MAX_TOP_LOGPROBS, BackendError, SamplingParams

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16          # as OpenAI's legacy completions endpoint
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UNSUPPORTED = ("tools", "functions", "suffix")
MAX_LOGIT_BIAS = 300            # entries, as OpenAI allows


class ApiError(Exception):
    """An error the client caused (or can act on), sent in the OpenAI error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


async def read_json(request: Request, limit: int) -> dict:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "send the request body as JSON with the header 'Content-Type: application/json'",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, "the Content-Length header is not a number") from None
        if too_big:
            raise ApiError(413, f"the request body is larger than the limit of {limit} bytes",
                           code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than the limit of {limit} bytes",
                           code="request_too_large")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                            f"column {exc.colno}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _refuse_constant(name: str):
    raise ApiError(400, f"the request body is not valid JSON: {name} is not a JSON number")


def _number(data: dict, name: str, default, low: float, high: float, *, low_open: bool = False):
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(value)[:40]}", param=name)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ApiError(400, f"{name} must be in {bracket}{low:g}, {high:g}], got {value}", param=name)
    return float(value)


def _integer(data: dict, name: str, default, low: int, high: int | None = None):
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ApiError(400, f"{name} must be an integer, got {json.dumps(value)[:40]}", param=name)
    if value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"{name} must be {limit}, got {value}", param=name)
    return value


def _stop(data: dict) -> tuple[str, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if len(value) > 4:
        raise ApiError(400, f"stop takes at most 4 strings, got {len(value)}", param="stop")
    return tuple(s for s in value if s)


def _refuse_unsupported(data: dict) -> None:
    for name in _UNSUPPORTED:
        if data.get(name):
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    if data.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tool_choice is not supported by this server", param="tool_choice")
    if _integer(data, "best_of", 1, 1) != 1:
        raise ApiError(400, "only best_of=1 is supported", param="best_of")
    response_format = data.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")


def bool_field(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return value


def sampling_from(data: dict, default_max_tokens: int | None, context_length: int,
                  zero_ok: bool = False) -> SamplingParams:
    """OpenAI fields (plus top_k, min_p, repetition_penalty as vLLM and llama.cpp accept them).
    `zero_ok`: max_tokens 0 is allowed (an echoed prompt scored without generating; the caller
    checks `requested_max_tokens(data, True) == 0`), and the params then say 1."""
    _refuse_unsupported(data)
    max_tokens = requested_max_tokens(data, zero_ok)
    if max_tokens is None or max_tokens == 0:
        max_tokens = (default_max_tokens or context_length) if max_tokens is None else 1
    seed = _integer(data, "seed", None, -2**63, 2**64 - 1)
    params = SamplingParams(
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(data, "top_k", 0, 0),
        min_p=_number(data, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(data, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        max_new_tokens=min(max_tokens, max(1, context_length)),
        seed=None if seed is None else seed % 2**32,   # engines take 32-bit seeds: same seed, same reply
        stop=_stop(data),
        presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(data),
    )
    try:
        return params.validated()
    except BackendError as exc:
        raise ApiError(400, str(exc)) from None


def _logit_bias(data: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: {"token id": bias in [-100, 100]} (ids as strings, as JSON keys are)."""
    value = data.get("logit_bias")
    if value is None:
        return ()
    what = 'logit_bias must map token ids to numbers in [-100, 100], e.g. {"1234": -100}'
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"{what}, at most {MAX_LOGIT_BIAS} entries", param="logit_bias")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) < 12) or isinstance(bias, bool) \
                or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ApiError(400, f"{what}; got {json.dumps(key)[:20]}: {json.dumps(bias)[:20]}", param="logit_bias")
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"{where}: only text content is supported, got a {kind!s:.30} part",
                               param="messages")
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", param="messages")


def messages_from(data: dict) -> list[dict]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        if role not in _ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of system, user, assistant "
                                f"(got {json.dumps(role)[:30]})", param="messages")
        clean.append({"role": _ROLES[role], "content": _content_text(message.get("content"), f"messages[{i}]")})
    if not any(m["content"].strip() for m in clean):
        raise ApiError(400, "the messages are empty: nothing to answer", param="messages")
    return clean


MAX_PROMPTS = 128


def requested_max_tokens(data: dict, zero_ok: bool = False) -> int | None:
    """The reply budget the client asked for: `max_tokens`, else `max_completion_tokens`, else None."""
    low = 0 if zero_ok else 1
    return _integer(data, "max_tokens", _integer(data, "max_completion_tokens", None, low), low)


def prompts_from(data: dict) -> list[str | list[int]]:
    """The completions prompt as a list of prompts, each a string or a list of token ids: a string, a
    list of strings, a list of token ids, or a list of token-id lists (what lm-evaluation-harness sends)."""
    prompt = data.get("prompt")
    what = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        if all(_is_token(t) for t in prompt):
            prompts = [prompt]
        elif all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif all(isinstance(p, list) and all(_is_token(t) for t in p) for p in prompt):
            prompts = list(prompt)
        else:
            raise ApiError(400, what + " (token ids are integers >= 0)", param="prompt")
    elif isinstance(prompt, list):
        raise ApiError(400, "the prompt is empty", param="prompt")
    else:
        raise ApiError(400, what, param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    for i, one in enumerate(prompts):
        if not one:
            where = "the prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise ApiError(400, f"{where} is empty", param="prompt")
    return prompts


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


MAX_CHOICES = 16


def choices_from(data: dict) -> int:
    """`n`: how many replies to sample for each prompt."""
    return _integer(data, "n", 1, 1, MAX_CHOICES)


def logprobs_from(data: dict, kind: str) -> tuple[int | None, bool]:
    """(how many alternatives to report per token, or None for no log-probs; echo). Chat takes
    `logprobs: true` and `top_logprobs: n`; completions take `logprobs: n` and `echo`, as OpenAI's do."""
    if kind == "chat":
        if data.get("echo") is not None:
            raise ApiError(400, "echo is a /v1/completions field; chat replies never repeat the messages",
                           param="echo")
        wanted = bool_field(data, "logprobs")
        top = _integer(data, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not wanted:
            raise ApiError(400, "top_logprobs needs \"logprobs\": true", param="top_logprobs")
        return (top or 0) if wanted else None, False
    if data.get("top_logprobs") is not None:
        raise ApiError(400, "top_logprobs is a chat field; /v1/completions takes \"logprobs\": <count of "
                            "alternatives>", param="top_logprobs")
    if data.get("logprobs") is False:
        return None, bool_field(data, "echo")
    return _integer(data, "logprobs", None, 0, MAX_TOP_LOGPROBS), bool_field(data, "echo")


def resolve_model(manager, requested: Any) -> str:
    """A loaded model's id; its folder or file name (with or without .gguf) when that is unambiguous."""
    if not isinstance(requested, str) or not requested.strip():
        raise ApiError(400, "model is required: one of the ids from GET /v1/models", param="model")
    loaded = manager.loaded()
    ids = [m.model_id for m in loaded]
    if requested in ids:
        return requested
    names = {requested, requested.removesuffix(".gguf")}
    matches = [m.model_id for m in loaded
               if m.name in names or m.name.removesuffix(".gguf") in names or Path(m.name).name in names]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ApiError(400, f"model {requested!r} is loaded more than once; pick one id: {', '.join(matches)}",
                       param="model", code="model_ambiguous")
    raise ApiError(404, f"the model {requested[:200]!r} is not loaded; loaded: {', '.join(ids) or 'none'} "
                        "(load models in the Models tab)", param="model", code="model_not_found")
