"""vLLM's tokenizer routes (/tokenize, /detokenize, /tokenizer_info) at the root and under /v1: the
model's own tokenizer, the checks lm-evaluation-harness makes before it uses them, and the same guard
(key, Host) as the rest of the API."""
from __future__ import annotations

import json

import httpx
import pytest

from apitools import API_KEY, MODEL_ID

SPECIAL = "<|im_start|>user\nHi<|im_end|>"


def call(server, method, path, body=None, headers=None, params=None):
    headers = server.headers() if headers is None else headers
    content = None if body is None else json.dumps(body).encode()
    return httpx.request(method, server.url + path, content=content, headers=headers, params=params, timeout=60)


def backend(server):
    return server.ctx.manager.get(MODEL_ID).backend


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_and_detokenize_round_trip_with_the_models_tokenizer(api_server, prefix):
    engine = backend(api_server)
    reply = call(api_server, "POST", prefix + "/tokenize", {"prompt": SPECIAL, "add_special_tokens": False,
                                                             "return_token_strs": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["tokens"] == engine.tokenize(SPECIAL) and body["count"] == len(body["tokens"])
    assert body["tokens"][0] == engine.tokenize("<|im_start|>")[0] and len(body["tokens"]) < 10
    assert body["max_model_len"] == 8192 and "".join(body["token_strs"]) == SPECIAL
    text = call(api_server, "POST", prefix + "/detokenize", {"tokens": body["tokens"], "model": MODEL_ID})
    assert text.status_code == 200 and text.json() == {"prompt": SPECIAL}


def test_lm_eval_finds_the_remote_tokenizer(api_server):
    """lm-evaluation-harness's check_remote_tokenizer_support: tokenizer_info with an eos_token, and
    /tokenize answering {"prompt": "test", "add_special_tokens": false} with a list (no model named)."""
    info = call(api_server, "GET", "/tokenizer_info")
    assert info.status_code == 200, info.text
    info = info.json()
    assert info["eos_token"] == "<|im_end|>" and "<|im_start|>" in info["chat_template"]
    assert info["model"] == MODEL_ID and info["model_max_length"] == 8192
    tokens = call(api_server, "POST", "/tokenize", {"prompt": "test", "add_special_tokens": False}).json()["tokens"]
    assert tokens == backend(api_server).tokenize("test")
    eos = call(api_server, "POST", "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"] == [backend(api_server).tokenizer.eos_token_id]


def test_chat_messages_count_as_the_chat_route_counts_its_prompt(api_server, client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    counted = call(api_server, "POST", "/tokenize", {"messages": messages, "model": MODEL_ID}).json()["count"]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=1, temperature=0)
    assert counted == reply.usage.prompt_tokens


def test_several_loaded_models_must_be_named(api_server):
    manager = api_server.ctx.manager
    other = manager.load("SmolLM2-135M-Instruct.Q4_1.gguf", "llama.cpp", {})
    try:
        reply = call(api_server, "POST", "/tokenize", {"prompt": "Hi"})
        assert reply.status_code == 400 and "2 models are loaded" in reply.json()["error"]["message"]
        assert other in reply.json()["error"]["message"]
        named = call(api_server, "POST", "/tokenize", {"prompt": "Hi", "model": other})
        assert named.status_code == 200 and named.json()["tokens"] == manager.get(other).backend.tokenize("Hi")
        info = call(api_server, "GET", "/tokenizer_info", params={"model": "SmolLM2-135M-Instruct.Q4_1"})
        assert info.status_code == 200 and info.json()["model"] == other
    finally:
        manager.unload(other)


@pytest.mark.parametrize("path, body, words", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "either"),
    ("/tokenize", {}, "either"),
    ("/tokenize", {"prompt": 5}, "prompt must be a string"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "no"}, "add_special_tokens must be true or false"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, "not loaded"),
    ("/detokenize", {"tokens": "1 2"}, "tokens must be a list"),
    ("/detokenize", {"tokens": [1, 10_000_000]}, "token id 10000000 is outside"),
])
def test_bad_tokenizer_requests_get_a_sentence(api_server, path, body, words):
    reply = call(api_server, "POST", path, body)
    assert reply.status_code in (400, 404), reply.text
    assert words in reply.json()["error"]["message"]


def test_root_tokenizer_routes_keep_the_api_guard(api_server):
    for path, method in (("/tokenize", "POST"), ("/detokenize", "POST"), ("/tokenizer_info", "GET")):
        body = {"prompt": "Hi"} if path == "/tokenize" else {"tokens": [1]} if path == "/detokenize" else None
        no_key = call(api_server, method, path, body, headers={"Content-Type": "application/json"})
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        rebound = call(api_server, method, path, body,
                       headers={**api_server.headers(), "Host": "evil.example"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert call(api_server, "GET", "/tokenizer_info", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
