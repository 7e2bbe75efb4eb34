"""Bad requests get a 4xx in the OpenAI error shape with a sentence, never a 500 or a stack trace, and
the server keeps answering good requests afterwards."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from apitools import MODEL_ID

CHAT = "/chat/completions"


def post(server, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=data, headers=headers or server.headers(), timeout=120)


def assert_error(response, status, *words, param=None):
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    text = error["message"]
    for word in words:
        assert word in text, text
    assert "Traceback" not in response.text and 'File "' not in response.text
    if param is not None:
        assert error["param"] == param
    return error


def chat_body(**fields):
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


def test_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-4o" in error["message"] and MODEL_ID in error["message"]  # says what is loaded


def test_unknown_route_and_wrong_method(api_server):
    assert_error(httpx.get(api_server.base_url + "/engines", headers=api_server.headers()), 404, "no such API route")
    assert_error(httpx.get(api_server.base_url + CHAT, headers=api_server.headers()), 405, "GET is not allowed")


@pytest.mark.parametrize("raw, words", [
    (b"{not json", ("not valid JSON",)),
    (b"", ("not valid JSON",)),
    (b'["a", "list"]', ("must be a JSON object",)),
    (b'{"model": NaN}', ("NaN is not a JSON number",)),
    (b"[" * 100000 + b"]" * 100000, ("nested too deeply",)),
    (b'{"model": "\xff\xfe\x80"}', ("not valid UTF-8",)),
    ('{"model": "caf\u00e9"}'.encode("latin-1"), ("not valid UTF-8",)),
])
def test_malformed_bodies(api_server, raw, words):
    assert_error(post(api_server, CHAT, raw), 400, *words)


def test_wrong_content_type_is_415(api_server):
    response = post(api_server, CHAT, chat_body(), api_server.headers(**{"Content-Type": "text/plain"}))
    assert_error(response, 415, "Content-Type: application/json")


def test_oversized_body_is_413_before_it_is_read(api_server):
    huge = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * (9 * 2**20)}])).encode()
    assert_error(post(api_server, CHAT, huge), 413, "larger than the limit")


@pytest.mark.parametrize("fields, param, words", [
    ({"temperature": -1}, "temperature", ("temperature must be in [0, 2]",)),
    ({"temperature": 3.5}, "temperature", ("temperature must be in [0, 2]",)),
    ({"temperature": "hot"}, "temperature", ("temperature must be a number",)),
    ({"temperature": True}, "temperature", ("temperature must be a number",)),
    ({"top_p": 0}, "top_p", ("top_p must be in (0, 1]",)),
    ({"top_p": 1.5}, "top_p", ("top_p must be in (0, 1]",)),
    ({"max_tokens": 0}, "max_tokens", ("max_tokens must be >= 1",)),
    ({"max_tokens": 2.5}, "max_tokens", ("max_tokens must be an integer",)),
    ({"top_k": -3}, "top_k", ("top_k must be >= 0",)),
    ({"seed": "abc"}, "seed", ("seed must be an integer",)),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ("at most 4",)),
    ({"stop": 5}, "stop", ("stop must be a string or a list",)),
    ({"n": 17}, "n", ("n must be in [1, 16]",)),
    ({"n": 0}, "n", ("n must be in [1, 16]",)),
    ({"stream": "yes"}, "stream", ("stream must be true or false",)),
    ({"tools": [{"type": "function"}]}, "tools", ("not supported",)),
    ({"top_logprobs": 2}, "top_logprobs", ("needs", "logprobs")),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ("top_logprobs must be in [0, 20]",)),
    ({"logprobs": "yes"}, "logprobs", ("logprobs must be true or false",)),
    ({"echo": True}, "echo", ("/v1/completions field",)),
    ({"presence_penalty": 2.5}, "presence_penalty", ("presence_penalty must be",)),
    ({"frequency_penalty": "a"}, "frequency_penalty", ("frequency_penalty must be a number",)),
    ({"logit_bias": {"abc": 1}}, "logit_bias", ("logit_bias must map token ids", '"abc"')),
    ({"logit_bias": {"5": 101}}, "logit_bias", ("[-100, 100]", "101")),
    ({"logit_bias": [5, 1]}, "logit_bias", ("at most 300 entries",)),
    ({"logit_bias": {"99999999": 5}}, None, ("token id 99999999 is outside",)),
    ({"messages": []}, "messages", ("non-empty list",)),
    ({"messages": "hello"}, "messages", ("non-empty list",)),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", ("role must be one of",)),
    ({"messages": [{"role": "user", "content": ""}]}, "messages", ("empty",)),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", ("only text content",)),
    ({"model": None}, "model", ("model is required",)),
    ({"model": ["a"]}, "model", ("model is required",)),
])
def test_invalid_fields_are_400_with_the_field_named(api_server, fields, param, words):
    assert_error(post(api_server, CHAT, chat_body(**fields)), 400, *words, param=param)


@pytest.mark.parametrize("prompt, words", [
    ("", ("prompt is empty",)),
    ([], ("prompt is empty",)),
    (["a", ""], ("prompt[1] is empty",)),
    ([[1, 2], []], ("prompt[1] is empty",)),
    (["a", [1, 2]], ("list of token-id lists",)),
    ([1, -2], ("integers >= 0",)),
    ([True, 2], ("integers >= 0",)),
    ([[1.5]], ("integers >= 0",)),
    (["x"] * 129, ("at most 128 prompts",)),
    (None, ("prompt must be a string",)),
])
def test_bad_completion_prompts(api_server, prompt, words):
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 2}
    assert_error(post(api_server, "/completions", body), 400, *words, param="prompt")


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_the_context_is_refused_with_a_message(client, stream):
    prompt = "hello " * 9000                       # > 8192 tokens of context
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=2, stream=stream)
    error = info.value.body
    assert error["code"] == "context_length_exceeded"
    assert "refused, not truncated" in error["message"] and "8192" in error["message"]


def test_the_server_still_answers_after_bad_input(client):
    reply = client.completions.create(model=MODEL_ID, prompt="The password is apple. I repeat, the password is",
                                      temperature=0, max_tokens=2)
    assert "apple" in reply.choices[0].text


@pytest.fixture
def engine_fails_mid_reply(api_server, monkeypatch):
    """The real engine, made to fail after two tokens (as a driver error or a bug would)."""
    backend = api_server.ctx.manager.get(MODEL_ID).backend
    real = backend.generate

    def failing(prompt, params, stop_event=None):
        for i, chunk in enumerate(real(prompt, params, stop_event)):
            if i == 2:
                raise RuntimeError("simulated engine failure at /secret/path.py line 42")
            yield chunk

    monkeypatch.setattr(backend, "generate", failing)


def test_engine_failure_mid_stream_ends_with_an_error_event(api_server, client, engine_fails_mid_reply):
    with pytest.raises(openai.APIError) as info:
        for _ in client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, temperature=0, stream=True):
            pass
    assert "internal error (RuntimeError)" in str(info.value)
    assert "/secret/path.py" not in str(info.value)           # details stay in the server log
    deadline = time.monotonic() + 30                          # the worker ends and hands the model on
    while not api_server.api.queue.idle() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert api_server.api.queue.idle()


def test_engine_failure_without_streaming_is_a_500_in_openai_shape(api_server, engine_fails_mid_reply):
    response = post(api_server, CHAT, chat_body(max_tokens=8))
    error = assert_error(response, 500, "internal error (RuntimeError)")
    assert error["type"] == "server_error" and "/secret/path.py" not in response.text
