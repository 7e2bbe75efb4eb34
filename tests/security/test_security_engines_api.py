"""Every engine behind the same API: answers come back, and an engine's refusals (a prompt over its
context) come back as a 4xx with the engine's sentence, not a 500."""
from __future__ import annotations

import openai
import pytest

PASSWORD = "The password is apple. I repeat, the password is"
ENGINES = [
    ("good.gguf", "llama.cpp", {"n_ctx": 2048, "n_threads": 1}, 2048),
    ("good-gptq", "gptq", {"device": "cpu"}, 8192),
    ("good-hf", "bitsandbytes", {"quant": "nf4", "device": "cpu"}, 8192),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, backend, options, context", ENGINES, ids=[e[1] for e in ENGINES])
def test_each_engine_answers_and_refuses_through_the_api(hostile_server, name, backend, options, context):
    manager = hostile_server.ctx.manager
    loaded_here = backend != "llama.cpp"                      # the server already holds the GGUF
    model_id = manager.load(name, backend, options) if loaded_here else hostile_server.good_id
    try:
        client = hostile_server.client()
        reply = client.completions.create(model=model_id, prompt=PASSWORD, temperature=0, max_tokens=2)
        assert "apple" in reply.choices[0].text
        chunks = list(client.chat.completions.create(
            model=model_id, messages=[{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=12, stream=True))
        assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=model_id, prompt="hello " * (context + 100), max_tokens=2)
        assert info.value.body["code"] == "context_length_exceeded"
        assert str(context) in info.value.body["message"]
    finally:
        if loaded_here:
            manager.unload(model_id)
    assert manager.loaded_ids() == [hostile_server.good_id]
