"""Hostile model files: each gives a clear message, nothing is loaded half-way, no pickle is ever
unpickled, and the server keeps serving the model that is loaded."""
from __future__ import annotations

import gc

import openai
import pytest

from backends.base import BackendError
from backends.process_memory import resident_mb

PASSWORD = "The password is apple. I repeat, the password is"


@pytest.mark.parametrize("name, backend, words", [
    ("truncated-safetensors", None, ("model.safetensors is truncated",)),
    ("bad-header-safetensors", None, ("not a valid safetensors file",)),
    ("garbage.gguf", None, ("not a GGUF file",)),
    ("magic-then-garbage.gguf", None, ("corrupt or truncated GGUF",)),
    ("empty.gguf", None, ("empty.gguf is not a GGUF file",)),
    ("truncated.gguf", None, ("truncated.gguf is a corrupt or truncated GGUF",)),
    ("missing-tokenizer", None, ("no tokenizer files",)),
    ("pickle-weights", None, ("no .safetensors weights", "pickle")),
    ("pickle-weights", "transformers", ("no .safetensors weights", "pickle")),
    ("evil.pt", None, ("not a model",)),
    ("evil.pkl", None, ("not a model",)),
    ("gptq-bits-5", None, ("bits must be one of", "got 5")),
    ("gptq-wrong-group-size", None, ("group_size 32",)),
    ("link-out.gguf", None, ("outside the models folder",)),
    ("link-out-folder", None, ("outside the models folder",)),
    ("link-to-etc", None, ("outside the models folder",)),
    ("../outside/valid.gguf", None, ("outside the models folder",)),
    ("/etc/passwd", None, ("outside the models folder",)),
    ("good.gguf/../../outside/valid.gguf", None, ("outside the models folder",)),
    ("", None, ("no model name",)),
    (".", None, ("not the folder itself",)),
    ("no-such-model", None, ("no such model",)),
])
def test_hostile_model_is_refused_and_the_server_keeps_serving(hostile, hostile_server, name, backend, words):
    assert_refused(hostile, hostile_server, name, backend, None, words)


@pytest.mark.parametrize("name, backend, options, words", [
    ("truncated-safetensors", "bitsandbytes", None, ("model.safetensors is truncated",)),
    ("missing-tokenizer", "bitsandbytes", None, ("no tokenizer files",)),
    ("pickle-weights", "bitsandbytes", None, ("pickle",)),
    ("good-hf", "gptq", None, ("load it with transformers or bitsandbytes, not gptq",)),
    ("good-hf", "llama.cpp", None, ("not llama.cpp",)),
    ("good.gguf", "transformers", None, ("load it with llama.cpp",)),
    ("gptq-wrong-group-size", "transformers", None, ("load it with gptq",)),
    ("good-hf", "no-such-engine", None, ("not no-such-engine",)),
    ("good-hf", "bitsandbytes", {"quant": "nf3"}, ("quant must be one of nf4, fp4, int8",)),
    ("good.gguf", "llama.cpp", {"n_ctx": -1}, ("n_ctx must be >= 0",)),
    ("good.gguf", "llama.cpp", {"n_threads": "many"}, ("n_threads must be int",)),
    ("good-hf", "transformers", {"evil": 1}, ("unknown option(s) evil",)),
    ("good-hf", "transformers", {"dtype": "float8"}, ("dtype must be one of",)),
])
def test_wrong_engine_or_options_are_refused_before_loading(hostile, hostile_server, name, backend, options, words):
    assert_refused(hostile, hostile_server, name, backend, options, words)


def assert_refused(hostile, hostile_server, name, backend, options, words):
    manager = hostile_server.ctx.manager
    before = manager.loaded_ids()
    with pytest.raises(BackendError) as info:
        manager.load(name, backend, options)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert "Traceback" not in message and len(message) < 600
    assert manager.loaded_ids() == before == [hostile_server.good_id]     # nothing half-loaded
    assert not hostile.marker.exists(), "a pickle or template ran code"
    reply = hostile_server.client().completions.create(model=hostile_server.good_id, prompt=PASSWORD,
                                                       temperature=0, max_tokens=2)
    assert "apple" in reply.choices[0].text


def test_failed_loads_leave_no_memory_behind(hostile, hostile_server):
    """Loads that fail after reading weights (GPTQ shape checks, truncated files) release them."""
    manager = hostile_server.ctx.manager

    def rss():
        gc.collect()
        return resident_mb()

    names = ["gptq-wrong-group-size", "truncated-safetensors", "magic-then-garbage.gguf"]
    for name in names:                                  # once to warm up imports and allocator pools
        with pytest.raises(BackendError):
            manager.load(name)
    baseline = rss()
    for _ in range(3):
        for name in names:
            with pytest.raises(BackendError):
                manager.load(name)
    assert rss() < baseline + 60
    assert manager.loaded_ids() == [hostile_server.good_id]


def test_listing_a_hostile_folder_flags_each_problem(hostile, hostile_server):
    entries = {e.name: e for e in hostile_server.ctx.manager.list_models()}
    assert entries["good.gguf"].format == "gguf" and entries["good-hf"].format == "hf"
    for name in ("link-out.gguf", "link-out-folder", "link-to-etc"):
        assert entries[name].format is None and "outside the models folder" in entries[name].problem
    assert entries["evil.pt"].format is None and "not a model" in entries["evil.pt"].problem
    assert entries["pickle-weights"].format is None and "pickle" in entries["pickle-weights"].problem


def test_hostile_chat_template_cannot_reach_python(hostile, hostile_server):
    """The template is the model's own (chat_template.jinja): the sandbox refuses it, the API says so
    with a 400, raw completions on that model still work, and no command ran."""
    manager = hostile_server.ctx.manager
    model_id = manager.load("hostile-template", "transformers", {"dtype": "bfloat16", "device": "cpu"})
    try:
        client = hostile_server.client()
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert "refused by the sandbox" in info.value.body["message"]
        assert "__init__" in info.value.body["message"]
        reply = client.completions.create(model=model_id, prompt=PASSWORD, temperature=0, max_tokens=2)
        assert "apple" in reply.choices[0].text
    finally:
        manager.unload(model_id)
    assert not hostile.marker.exists()


def test_code_shipped_with_a_model_does_not_run(hostile, hostile_server):
    """trust_remote_code is off by default: a config's auto_map never imports the model's evil.py.
    The model either loads with the library's own code or is refused with a message."""
    manager = hostile_server.ctx.manager
    try:
        model_id = manager.load("remote-code", "transformers", {"dtype": "bfloat16", "device": "cpu"})
    except BackendError as exc:
        assert "remote" in str(exc).lower() or "trust" in str(exc).lower(), str(exc)
    else:
        manager.unload(model_id)
    assert not hostile.marker.exists(), "the model's own Python code ran"
    assert manager.loaded_ids() == [hostile_server.good_id]
