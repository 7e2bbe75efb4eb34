"""OpenAI-compatible HTTP API (`/v1/models`, `/v1/chat/completions`, `/v1/completions`), served by the
same server as the Gradio page.

The API is a small Starlette app mounted at /v1 on Gradio's own FastAPI app, so its error handling,
auth and limits apply to it alone. Request bodies are parsed and checked by hand: every bad input
becomes a 4xx in the OpenAI error shape with a sentence saying what to fix, never a stack trace.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from backends.base import BackendError, GenerationChunk, SamplingParams
from webui.request_queue import Cancellation, ClientGone, FairQueue, QueueFull, run_queued

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16          # as OpenAI's legacy completions endpoint
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UNSUPPORTED = ("tools", "functions", "logit_bias", "suffix")


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


# -- auth -----------------------------------------------------------------------------------------
def bearer_matches(header_values: list[str], key: bytes) -> bool:
    """Exactly one `Authorization: Bearer <key>` header, compared in constant time."""
    if len(header_values) != 1:
        return False
    scheme, sep, token = header_values[0].partition(" ")
    if not sep or scheme.lower() != "bearer":
        return False
    try:
        given = token.encode("latin-1")    # the header's raw bytes, as Starlette decoded them
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given, key)


class BearerAuth:
    """ASGI middleware: every /v1 route (including unknown ones) needs the key before anything else."""

    def __init__(self, app, key: str | None):
        self.app = app
        self.key = key.encode("utf-8") if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None:
            return await self.app(scope, receive, send)
        values = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        if not bearer_matches(values, self.key):
            message = ("missing API key: send the header 'Authorization: Bearer <key>'" if not values
                       else "invalid API key")
            response = ApiError(401, message, type="invalid_request_error", code="invalid_api_key").response()
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


# -- request parsing ------------------------------------------------------------------------------
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
    if _integer(data, "n", 1, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if _integer(data, "best_of", 1, 1) != 1:
        raise ApiError(400, "only best_of=1 is supported", param="best_of")
    if data.get("logprobs") or data.get("top_logprobs") or data.get("echo"):
        name = next(n for n in ("logprobs", "top_logprobs", "echo") if data.get(n))
        raise ApiError(400, f"{name} is not supported by this server", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(data, name, 0.0, -2.0, 2.0) != 0.0:
            raise ApiError(400, f"{name} is not supported (use repetition_penalty)", param=name)
    response_format = data.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")


def _bool(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return value


def sampling_from(data: dict, default_max_tokens: int | None, context_length: int) -> SamplingParams:
    """OpenAI fields (plus top_k, min_p, repetition_penalty as vLLM and llama.cpp accept them)."""
    _refuse_unsupported(data)
    max_tokens = _integer(data, "max_completion_tokens", None, 1)
    max_tokens = _integer(data, "max_tokens", max_tokens, 1)
    if max_tokens is None:
        max_tokens = default_max_tokens or context_length
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
    )
    try:
        return params.validated()
    except BackendError as exc:
        raise ApiError(400, str(exc)) from None


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


def prompt_from(data: dict) -> str:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise ApiError(400, "prompt must be one string (batches and token arrays are not supported)",
                       param="prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string", param="prompt")
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return prompt


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


# -- responses ------------------------------------------------------------------------------------
def _error_for(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), type="rate_limit_error", code="queue_full")
    if isinstance(exc, BackendError):
        text = str(exc)
        if text.startswith("no loaded model"):
            return ApiError(404, text, param="model", code="model_not_found")
        code = "context_length_exceeded" if "context" in text and "token" in text else None
        return ApiError(400, text, code=code)
    log.error("API request failed", exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                    type="server_error", code="internal_error")


def _sse(payload) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n".encode("utf-8")


@dataclass
class _Call:
    """One generation request after parsing: what to run and how to shape its reply."""
    kind: str                 # "chat" | "completion"
    model_id: str
    params: SamplingParams
    payload: Any              # messages or prompt
    stream: bool
    include_usage: bool

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"


class OpenAIApi:
    """The /v1 routes over an AppContext's ModelManager, with one FairQueue for all of them."""

    def __init__(self, ctx, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_waiting: int = 64,
                 disconnect_poll_s: float = 0.1):
        self.ctx = ctx
        self.max_body_bytes = max_body_bytes
        self.queue = FairQueue(max_waiting=max_waiting)
        self.disconnect_poll_s = disconnect_poll_s

    @property
    def manager(self):
        return self.ctx.manager

    # -- routes ---------------------------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m in self.manager.loaded()]})

    async def get_model(self, request: Request) -> Response:
        model_id = resolve_model(self.manager, request.path_params["model_id"])
        return JSONResponse(self._model_card(self.manager.get(model_id)))

    @staticmethod
    def _model_card(loaded) -> dict:
        return {"id": loaded.model_id, "object": "model", "created": int(time.time() - loaded.load_seconds),
                "owned_by": "gptq-webui", "backend": loaded.backend_name, "name": loaded.name}

    async def chat_completions(self, request: Request) -> Response:
        data = await read_json(request, self.max_body_bytes)
        call = self._call(data, "chat")
        return await self._respond(request, call)

    async def completions(self, request: Request) -> Response:
        data = await read_json(request, self.max_body_bytes)
        call = self._call(data, "completion")
        return await self._respond(request, call)

    def _call(self, data: dict, kind: str) -> _Call:
        model_id = resolve_model(self.manager, data.get("model"))
        payload = messages_from(data) if kind == "chat" else prompt_from(data)
        try:
            context = int(self.manager.get(model_id).backend.context_length)
        except BackendError as exc:
            raise _error_for(exc) from None
        params = sampling_from(data, None if kind == "chat" else COMPLETIONS_DEFAULT_MAX_TOKENS, context)
        stream = _bool(data, "stream")
        options = data.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        include_usage = bool(stream and options and options.get("include_usage") is True)
        return _Call(kind, model_id, params, payload, stream, include_usage)

    # -- generation -----------------------------------------------------------------------------
    def _work(self, call: _Call):
        manager = self.manager
        if call.kind == "chat":
            return lambda stop: manager.chat(call.model_id, call.payload, call.params, stop)
        return lambda stop: manager.generate(call.model_id, call.payload, call.params, stop)

    async def _watch(self, request: Request, cancellation: Cancellation) -> None:
        """Cancel the request as soon as its client disconnects (queued, running or streaming)."""
        try:
            while not cancellation.cancelled:
                if await request.is_disconnected():
                    cancellation.cancel()
                    return
                await asyncio.sleep(self.disconnect_poll_s)
        except asyncio.CancelledError:
            pass

    async def _respond(self, request: Request, call: _Call) -> Response:
        cancellation = Cancellation()
        watcher = asyncio.ensure_future(self._watch(request, cancellation))
        chunks = run_queued(self.queue, call.model_id, self._work(call), cancellation)
        try:
            first = await chunks.__anext__()    # errors before the first token still get a real status
        except StopAsyncIteration:
            first = None
        except ClientGone:
            watcher.cancel()
            return Response(status_code=499)
        except BaseException as exc:
            watcher.cancel()
            await chunks.aclose()
            if isinstance(exc, asyncio.CancelledError):
                cancellation.cancel()
                raise
            return _error_for(exc).response()
        if call.stream:
            return StreamingResponse(self._sse_stream(call, first, chunks, watcher, cancellation),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await self._collect(call, first, chunks)
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            return _error_for(exc).response()
        finally:
            watcher.cancel()
            cancellation.stop.set()
            await chunks.aclose()

    async def _collect(self, call: _Call, first: GenerationChunk | None,
                       chunks: AsyncIterator[GenerationChunk]) -> Response:
        text, last = [], first
        if first is not None:
            text.append(first.text)
            async for chunk in chunks:
                text.append(chunk.text)
                last = chunk
        reply = "".join(text)
        reason = _finish_reason(last)
        usage = _usage(last)
        rid = _new_id(call.kind)
        if call.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": reply}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": reply, "logprobs": None, "finish_reason": reason}
        return JSONResponse({"id": rid, "object": call.object_name, "created": int(time.time()),
                             "model": call.model_id, "choices": [choice], "usage": usage})

    async def _sse_stream(self, call: _Call, first: GenerationChunk | None, chunks, watcher,
                          cancellation: Cancellation) -> AsyncIterator[bytes]:
        rid, created = _new_id(call.kind), int(time.time())
        obj = "chat.completion.chunk" if call.kind == "chat" else "text_completion"

        def event(delta_text: str | None, reason: str | None = None, role: bool = False) -> bytes:
            if call.kind == "chat":
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": reason}
            return _sse({"id": rid, "object": obj, "created": created, "model": call.model_id,
                         "choices": [choice]})

        last = first
        try:
            if call.kind == "chat":
                yield event("", role=True)
            if first is not None:
                if first.text:
                    yield event(first.text)
                async for chunk in chunks:
                    last = chunk
                    if chunk.text:
                        yield event(chunk.text)
            yield event(None if call.kind == "chat" else "", _finish_reason(last))
            if call.include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": call.model_id,
                            "choices": [], "usage": _usage(last)})
            yield _sse("[DONE]")
        except ClientGone:
            return
        except Exception as exc:    # after the headers went out: an error event ends the stream
            yield _sse(_error_for(exc).body())
        finally:
            watcher.cancel()
            cancellation.stop.set()
            await chunks.aclose()


def _finish_reason(chunk: GenerationChunk | None) -> str:
    reason = chunk.finish_reason if chunk is not None else None
    return "length" if reason == "length" else "stop"


def _usage(chunk: GenerationChunk | None) -> dict:
    prompt = chunk.prompt_tokens if chunk else 0
    completion = chunk.generated_tokens if chunk else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


# -- the app --------------------------------------------------------------------------------------
def _guard(handler):
    """Every route returns the OpenAI error shape, whatever goes wrong."""
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except HTTPException as exc:
            return ApiError(exc.status_code, str(exc.detail)).response()
        except Exception as exc:
            return _error_for(exc).response()
    return wrapped


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        return ApiError(404, f"no such API route: {request.method} {request.url.path}; "
                             "this server has /v1/models, /v1/chat/completions and /v1/completions",
                        code="not_found").response()
    if exc.status_code == 405:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                        code="method_not_allowed").response()
    return ApiError(exc.status_code, str(exc.detail)).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error_for(exc).response()


def create_api_app(ctx, api_key: str | None = None, **options) -> Starlette:
    """The /v1 app. `api_key`: when set, every route needs `Authorization: Bearer <api_key>`."""
    api = OpenAIApi(ctx, **options)
    app = Starlette(routes=[
        Route("/models", _guard(api.list_models), methods=["GET"]),
        Route("/models/{model_id:path}", _guard(api.get_model), methods=["GET"]),
        Route("/chat/completions", _guard(api.chat_completions), methods=["POST"]),
        Route("/completions", _guard(api.completions), methods=["POST"]),
    ], exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.api = api
    app.add_middleware(BearerAuth, key=api_key)
    return app


def api_routes(ctx, api_key: str | None = None, **options) -> list[Mount]:
    """Routes to hand to Gradio's FastAPI app (`demo.launch(app_kwargs={"routes": ...})`), so the API
    is served by the same server and exists from its first request on."""
    return [Mount(API_PREFIX, app=create_api_app(ctx, api_key, **options), name="openai-api")]
