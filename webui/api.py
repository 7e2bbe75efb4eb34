"""OpenAI-compatible HTTP API (`/v1/models`, `/v1/chat/completions`, `/v1/completions`), served by the
same server as the Gradio page.

The API is a small Starlette app mounted at /v1 on Gradio's own FastAPI app, so its error handling,
auth and limits apply to it alone. Bodies are checked in `webui.api_requests`; generation goes
through the fair per-model queue of `webui.request_queue`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from backends.base import BackendError, GenerationChunk, SamplingParams
from webui.api_logprobs import ChoiceChunk, ScoredRequest, chat_logprobs, completion_logprobs, scored_work
from webui.api_requests import (COMPLETIONS_DEFAULT_MAX_TOKENS, DEFAULT_MAX_BODY_BYTES, ApiError, bool_field,
                                choices_from, logprobs_from, messages_from, prompts_from, read_json,
                                requested_max_tokens, resolve_model, sampling_from)
from webui.api_tokens import TokenizerRoutes
from webui.request_queue import Cancellation, ClientGone, FairQueue, QueueFull, run_queued

log = logging.getLogger(__name__)

API_PREFIX = "/v1"


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


LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def host_of(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The host name of the Host header, without port or IPv6 brackets (None when absent or repeated)."""
    values = [v.decode("latin-1") for k, v in headers if k.lower() == b"host"]
    if len(values) != 1:
        return None
    host = values[0].strip().lower()
    if host.startswith("["):                          # [v6]  or  [v6]:port, nothing else
        inside, _, rest = host[1:].partition("]")
        return inside if rest == "" or (rest[:1] == ":" and rest[1:].isdigit()) else None
    name, _, port = host.partition(":")
    return name if port == "" or port.isdigit() else None


class ApiGuard:
    """ASGI middleware, before any route (including unknown ones): on a local-only server the Host
    header must name this machine (a web page that rebinds its DNS name to 127.0.0.1 cannot reach the
    API), and with a key every request needs `Authorization: Bearer <key>`."""

    def __init__(self, app, key: str | None, local_only: bool):
        self.app = app
        self.key = key.encode("utf-8") if key else None
        self.local_only = local_only

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        error = None
        if self.local_only and host_of(headers) not in LOCAL_HOSTS:
            error = ApiError(403, "this server only answers requests addressed to 127.0.0.1 or localhost "
                                  "(start it with --listen to serve other names)", code="host_not_allowed")
        elif self.key is not None:
            values = [v.decode("latin-1") for k, v in headers if k.lower() == b"authorization"]
            if not bearer_matches(values, self.key):
                error = ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'"
                                 if not values else "invalid API key", code="invalid_api_key")
        if error is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":                  # no websocket routes here, and none unguarded
            return await send({"type": "websocket.close", "code": 1008})
        return await error.response()(scope, receive, send)


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
    scored: ScoredRequest | None = None   # log-probs, echo, token ids or several prompts (webui.api_logprobs)

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
        payload = messages_from(data) if kind == "chat" else prompts_from(data)
        top, echo = logprobs_from(data, kind)
        try:
            context = int(self.manager.get(model_id).backend.context_length)
        except BackendError as exc:
            raise _error_for(exc) from None
        params = sampling_from(data, None if kind == "chat" else COMPLETIONS_DEFAULT_MAX_TOKENS, context,
                               zero_ok=echo)
        stream = bool_field(data, "stream")
        options = data.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        include_usage = bool(stream and options and options.get("include_usage") is True)
        call = _Call(kind, model_id, params, payload, stream, include_usage)
        n = choices_from(data)
        one_text = kind == "chat" or (len(payload) == 1 and isinstance(payload[0], str))
        if top is None and not echo and n == 1 and one_text:
            if kind == "completion":
                call.payload = payload[0]
            return call
        prompts = [payload] if kind == "chat" else payload
        call.scored = ScoredRequest(model_id, prompts, kind == "chat", params,
                                    generate=requested_max_tokens(data, zero_ok=True) != 0, top=top, echo=echo, n=n)
        return call

    # -- generation -----------------------------------------------------------------------------
    def _work(self, call: _Call):
        manager = self.manager
        if call.scored is not None:
            return scored_work(manager, call.scored)
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
        if call.scored is not None:
            return await self._collect_scored(call, first, chunks)
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

    async def _collect_scored(self, call: _Call, first: GenerationChunk | None,
                              chunks: AsyncIterator[GenerationChunk]) -> Response:
        """One reply of every choice, gathered from its pieces (ChoiceChunk) in index order."""
        parts: dict[int, dict] = {}

        def take(chunk: GenerationChunk) -> None:
            if isinstance(chunk, ChoiceChunk):
                part = parts.setdefault(chunk.index, {"text": [], "tokens": [], "reason": "length"})
                part["text"] += [chunk.echo, chunk.text]
                part["tokens"] += chunk.tokens
                part["reason"] = chunk.choice_end or part["reason"]
        last = first
        if first is not None:
            take(first)
            async for chunk in chunks:
                take(chunk)
                last = chunk
        top = call.scored.top
        choices = []
        for index in sorted(parts):
            text, tokens, reason = "".join(parts[index]["text"]), parts[index]["tokens"], parts[index]["reason"]
            if call.kind == "chat":
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": chat_logprobs(tokens) if top is not None else None,
                                "finish_reason": _finish_reason_of(reason)})
            else:
                choices.append({"index": index, "text": text,
                                "logprobs": completion_logprobs(tokens) if top is not None else None,
                                "finish_reason": _finish_reason_of(reason)})
        return JSONResponse({"id": _new_id(call.kind), "object": call.object_name, "created": int(time.time()),
                             "model": call.model_id, "choices": choices, "usage": _usage(last)})

    async def _sse_stream(self, call: _Call, first: GenerationChunk | None, chunks, watcher,
                          cancellation: Cancellation) -> AsyncIterator[bytes]:
        """Server-sent events: each chunk's text (and log-probs) under its choice's index; a choice's
        finish reason when it ends (several choices, echo, batches: api_logprobs.ChoiceChunk), else at the end."""
        rid, created = _new_id(call.kind), int(time.time())
        obj = "chat.completion.chunk" if call.kind == "chat" else "text_completion"
        chat = call.kind == "chat"
        offsets: dict[int, int] = {}        # completions' text_offset runs on over each choice's text
        started: set[int] = set()           # chat choices that have sent their role

        def event(index: int, text: str | None, reason: str | None = None, tokens: list[dict] | None = None,
                  role: bool = False) -> bytes:
            logprobs = None
            if tokens and chat:
                logprobs = chat_logprobs(tokens)
            elif tokens:
                logprobs = completion_logprobs(tokens, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t["token"]) for t in tokens)
            if chat:
                delta = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
            return _sse({"id": rid, "object": obj, "created": created, "model": call.model_id,
                         "choices": [choice]})

        def events_of(chunk: GenerationChunk) -> Iterator[bytes]:
            index = getattr(chunk, "index", 0)
            if chat and index not in started:
                started.add(index)
                yield event(index, "", role=True)
            text = getattr(chunk, "echo", "") + chunk.text
            tokens = getattr(chunk, "tokens", None)
            if text or tokens:
                yield event(index, text, tokens=tokens)
            if getattr(chunk, "choice_end", None):
                yield event(index, None if chat else "", _finish_reason_of(chunk.choice_end))

        last = first
        try:
            if chat and call.scored is None:
                started.add(0)
                yield event(0, "", role=True)
            if first is not None:
                for out in events_of(first):
                    yield out
                async for chunk in chunks:
                    last = chunk
                    for out in events_of(chunk):
                        yield out
            if call.scored is None:
                yield event(0, None if chat else "", _finish_reason(last))
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
    return _finish_reason_of(chunk.finish_reason if chunk is not None else None)


def _finish_reason_of(reason: str | None) -> str:
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
                             "this server has /v1/models, /v1/chat/completions, /v1/completions and "
                             "/v1/tokenize, /v1/detokenize, /v1/tokenizer_info",
                        code="not_found").response()
    if exc.status_code == 405:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                        code="method_not_allowed").response()
    return ApiError(exc.status_code, str(exc.detail)).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error_for(exc).response()


def create_api_app(ctx, api_key: str | None = None, local_only: bool = True, **options) -> Starlette:
    """The /v1 app. `api_key`: when set, every route needs `Authorization: Bearer <api_key>`.
    `local_only`: refuse requests whose Host is not this machine (the server binds 127.0.0.1)."""
    api = OpenAIApi(ctx, **options)
    tokens = TokenizerRoutes(api)
    app = Starlette(routes=[
        Route("/models", _guard(api.list_models), methods=["GET"]),
        Route("/models/{model_id:path}", _guard(api.get_model), methods=["GET"]),
        Route("/chat/completions", _guard(api.chat_completions), methods=["POST"]),
        Route("/completions", _guard(api.completions), methods=["POST"]),
        *_tokenizer_routes(tokens),
    ], exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.api = api
    app.state.tokens = tokens
    app.add_middleware(ApiGuard, key=api_key, local_only=local_only)
    return app


def _tokenizer_routes(tokens: TokenizerRoutes) -> list[Route]:
    return [Route("/tokenize", _guard(tokens.tokenize), methods=["POST"]),
            Route("/detokenize", _guard(tokens.detokenize), methods=["POST"]),
            Route("/tokenizer_info", _guard(tokens.tokenizer_info), methods=["GET"])]


def api_routes(ctx, api_key: str | None = None, local_only: bool = True, **options) -> list:
    """Routes to hand to Gradio's FastAPI app (`demo.launch(app_kwargs={"routes": ...})`), so the API
    is served by the same server and exists from its first request on: /v1, and vLLM's tokenizer
    routes at the root (where lm-evaluation-harness looks for them), behind the same guard."""
    app = create_api_app(ctx, api_key, local_only, **options)
    tokenizer_routes = _tokenizer_routes(app.state.tokens)
    root = Starlette(routes=tokenizer_routes,
                     exception_handlers={HTTPException: _http_error, Exception: _server_error})
    guarded = ApiGuard(root, key=api_key, local_only=local_only)
    return [Mount(API_PREFIX, app=app, name="openai-api"),
            *(Route(route.path, guarded, methods=sorted(route.methods)) for route in tokenizer_routes)]
