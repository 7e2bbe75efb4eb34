"""Many requests at once on the running server: one model's requests take turns, two models run at
the same time, and a client that disconnects (queued or streaming) frees its place at once."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from apitools import MODEL_ID

STORY = [{"role": "user", "content": "Write a very long story about a dragon who learns to fly."}]


def wait_until(condition, seconds: float = 60.0, what: str = "condition"):
    """Poll for an event the server reports (a deadline against hangs, not a speed check)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def open_stream(server, model, messages=STORY, max_tokens=400):
    client = httpx.Client(timeout=120)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    response = client.send(client.build_request("POST", server.base_url + "/chat/completions",
                                                 headers=server.headers(), content=json.dumps(body)), stream=True)
    assert response.status_code == 200
    return client, response, response.iter_lines()


def next_text(lines) -> str:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return delta["content"]
    raise AssertionError("the stream ended early")


def test_a_client_that_disconnects_mid_stream_frees_the_model_at_once(api_server):
    queue = api_server.api.queue
    before = len(queue.finished)
    client, response, lines = open_stream(api_server, MODEL_ID)
    for _ in range(3):
        next_text(lines)
    response.close()
    client.close()                                  # the client goes away mid-reply
    wait_until(queue.idle, 30, "the slot to be released")
    record = queue.finished[-1]
    assert len(queue.finished) == before + 1
    assert record.finish_reason == "cancelled" and 3 <= record.generated_tokens < 40, record
    # and the model serves the next request right away
    reply = api_server.client().completions.create(model=MODEL_ID, prompt="The password is apple. I repeat, "
                                                   "the password is", temperature=0, max_tokens=2)
    assert "apple" in reply.choices[0].text


def test_a_queued_client_that_gives_up_leaves_the_queue(api_server):
    queue = api_server.api.queue
    client, response, lines = open_stream(api_server, MODEL_ID)
    next_text(lines)                                # the model is busy with this stream
    impatient = api_server.client(timeout=1.0)
    with pytest.raises(Exception) as info:          # queued behind the stream, gives up after 1 s
        impatient.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2)
    assert "timed out" in str(info.value).lower()
    wait_until(lambda: queue.snapshot().get(MODEL_ID, {}).get("waiting") == 0, 10, "the waiter to leave")
    assert queue.snapshot()[MODEL_ID]["busy"]       # the stream is still running
    response.close()
    client.close()
    wait_until(queue.idle, 30, "the slot to be released")
    assert queue.finished[-1].finish_reason == "cancelled"   # the abandoned request never ran


def test_two_models_generate_at_the_same_time(api_server, default_gguf):
    manager, queue = api_server.ctx.manager, api_server.api.queue
    gguf_id = manager.load(default_gguf.name, "llama.cpp", {"n_ctx": 2048, "n_threads": 1})
    try:
        client, response, lines = open_stream(api_server, MODEL_ID, max_tokens=300)
        next_text(lines)                            # the transformers model is now generating
        reply = api_server.client().completions.create(
            model=gguf_id, prompt="The password is apple. I repeat, the password is", temperature=0, max_tokens=3)
        # the GGUF model answered while the other model was still busy with its long reply
        assert queue.snapshot()[MODEL_ID]["busy"]
        assert "apple" in reply.choices[0].text
        more = next_text(lines)
        assert more                                 # and the long stream goes on
        response.close()
        client.close()
        wait_until(queue.idle, 30, "both slots to be released")
    finally:
        manager.unload(gguf_id)
