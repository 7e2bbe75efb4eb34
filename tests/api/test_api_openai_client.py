"""The OpenAI-compatible API through the real `openai` client against the running server."""
from __future__ import annotations

from apitools import DEFAULT_NAME, MODEL_ID

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PASSWORD_PROMPT = "The password is apple. I repeat, the password is"


def test_models_lists_the_loaded_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].owned_by == "gptq-webui"
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    assert client.models.retrieve(DEFAULT_NAME).id == MODEL_ID      # folder name, unambiguous


def test_chat_greedy_answers_paris_and_streaming_gives_the_same_text(client):
    reply = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0, max_tokens=24)
    text = reply.choices[0].message.content
    assert "Paris" in text and reply.choices[0].message.role == "assistant"
    assert reply.object == "chat.completion" and reply.model == MODEL_ID and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].finish_reason == "stop"                  # ended on EOS before 24 tokens
    usage = reply.usage
    assert 1 <= usage.completion_tokens < 24 and usage.prompt_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    stream = client.chat.completions.create(model=DEFAULT_NAME, messages=QUESTION, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for d in deltas if d) >= 3                          # really streamed, token by token
    assert "".join(deltas) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_completion_streaming_and_not_with_length_limit(client):
    reply = client.completions.create(model=MODEL_ID, prompt=PASSWORD_PROMPT, temperature=0, max_tokens=3)
    text = reply.choices[0].text
    assert "apple" in text and reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    stream = client.completions.create(model=MODEL_ID, prompt=PASSWORD_PROMPT, temperature=0, max_tokens=3,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_the_reply_and_is_not_shown(client):
    full = client.completions.create(model=MODEL_ID, prompt=PASSWORD_PROMPT, temperature=0, max_tokens=4)
    assert "." in full.choices[0].text                                 # " apple. I repeat": a '.' comes
    cut = client.completions.create(model=MODEL_ID, prompt=PASSWORD_PROMPT, temperature=0, max_tokens=4,
                                    stop=["."])
    assert cut.choices[0].text == full.choices[0].text.split(".")[0]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        reply = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Tell me a story."}],
            temperature=1.0, top_p=1.0, max_tokens=6, seed=seed)
        return reply.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2)}) >= 2                     # other seeds, other samples
