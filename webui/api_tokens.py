"""vLLM's tokenizer routes (`POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`), at the server's
root as vLLM serves them and under /v1: what lm-evaluation-harness's `local-completions` looks for to use
the server's own tokenizer (`tokenizer_backend=remote`, picked on its own when these answer), so a GGUF
file needs no Hugging Face folder beside it.

`model` may be left out while exactly one model is loaded (lm-eval's requests do not name it). These
only read the tokenizer, so they do not wait for the model's turn (a reply can hold it for minutes):
encoding and decoding beside a generation is safe (four threads encoding and decoding the same HF fast
tokenizer for 4 s raised nothing; llama.cpp's vocabulary is read-only), while the per-model lock
guards what is not (the weights' forward, the KV cache)."""
from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from backends.base import BackendError
from webui.api_requests import ApiError, bool_field, messages_from, read_json, resolve_model


class TokenizerRoutes:
    def __init__(self, api):
        self.api = api            # webui.api.OpenAIApi: its manager and body limit

    def _model(self, requested):
        manager = self.api.manager
        if requested is None:
            loaded = manager.loaded()
            if len(loaded) == 1:
                return loaded[0]
            if not loaded:
                raise ApiError(404, "no model is loaded (load one in the Models tab)", param="model",
                               code="model_not_found")
            raise ApiError(400, f"{len(loaded)} models are loaded; name one with \"model\": "
                                f"{', '.join(m.model_id for m in loaded)}", param="model")
        return manager.get(resolve_model(manager, requested))

    async def tokenize(self, request: Request) -> Response:
        data = await read_json(request, self.api.max_body_bytes)
        loaded = self._model(data.get("model"))
        backend = loaded.backend
        has_prompt, has_messages = data.get("prompt") is not None, data.get("messages") is not None
        if has_prompt == has_messages:
            raise ApiError(400, "send either \"prompt\" (a string) or \"messages\" (a chat)", param="prompt")
        add_special = data.get("add_special_tokens")
        if add_special is not None and not isinstance(add_special, bool):
            raise ApiError(400, "add_special_tokens must be true or false", param="add_special_tokens")
        if has_messages:
            generation_prompt = data.get("add_generation_prompt", True)
            if not isinstance(generation_prompt, bool):
                raise ApiError(400, "add_generation_prompt must be true or false", param="add_generation_prompt")
            messages = messages_from(data)
            text = await asyncio.to_thread(backend.render_chat, messages, generation_prompt)
            add_special = bool(add_special)          # the template writes the special tokens itself
        else:
            text = data["prompt"]
            if not isinstance(text, str):
                raise ApiError(400, "prompt must be a string", param="prompt")
            add_special = True if add_special is None else add_special
        ids = await asyncio.to_thread(backend.tokenize, text, add_special)
        body = {"count": len(ids), "max_model_len": int(backend.context_length), "tokens": ids}
        if bool_field(data, "return_token_strs"):
            body["token_strs"] = [backend.detokenize([t], special=True) for t in ids]
        return JSONResponse(body)

    async def detokenize(self, request: Request) -> Response:
        data = await read_json(request, self.api.max_body_bytes)
        loaded = self._model(data.get("model"))
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ApiError(400, "tokens must be a list of token ids (integers)", param="tokens")
        try:
            loaded.backend.check_token_ids(tokens)
        except BackendError as exc:
            raise ApiError(400, str(exc), param="tokens") from None
        text = await asyncio.to_thread(loaded.backend.detokenize, tokens, True)
        return JSONResponse({"prompt": text})

    async def tokenizer_info(self, request: Request) -> Response:
        loaded = self._model(request.query_params.get("model"))
        backend = loaded.backend
        special = backend.special_tokens()
        return JSONResponse({"tokenizer_class": f"{loaded.backend_name} tokenizer of {loaded.name}",
                             "model": loaded.model_id, "eos_token": special.get("eos_token"),
                             "bos_token": special.get("bos_token"), "pad_token": None,
                             "chat_template": backend.chat_template(),
                             "model_max_length": int(backend.context_length)})
