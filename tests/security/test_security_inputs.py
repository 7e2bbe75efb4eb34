"""Hostile paths, chat templates and user data files: all refused or skipped safely. (Hostile model
files: test_security_model_files.py; oversized uploads: tests/api/test_api_cli_server.py.)"""
from __future__ import annotations

import json
import logging
import os

import httpx
import pytest

from backends.base import BackendError
from backends.chat_template import render_chat
from webui.history import HistoryStore
from webui.presets import PresetStore

# -- paths ----------------------------------------------------------------------------------------


def test_api_model_field_never_touches_the_filesystem(hostile_server):
    """`model` picks among loaded models only: path-like values are unknown ids, nothing gets loaded."""
    before = hostile_server.ctx.manager.loaded_ids()
    for model in ("../outside/valid.gguf", "/etc/passwd", "link-out.gguf", "good-hf", "good.gguf/../good.gguf"):
        response = httpx.post(hostile_server.base_url + "/completions", timeout=30,
                              json={"model": model, "prompt": "hi", "max_tokens": 1})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert hostile_server.ctx.manager.loaded_ids() == before


# -- chat templates -------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template", [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__.sys.modules.os.system('touch MARKER') }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
    "{% set _ = messages[0].update({'content': 'pwned'}) %}",
    "{{ messages|attr('__class__')|attr('__base__')|attr('__subclasses__')() }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch MARKER') }}",
])
def test_templates_cannot_reach_python_objects(template, tmp_path):
    marker = tmp_path / "PWNED"
    template = template.replace("MARKER", str(marker))
    with pytest.raises(BackendError, match="sandbox|template failed"):
        render_chat(template, MESSAGES)
    assert not marker.exists()


@pytest.mark.parametrize("template", [
    "{{ messages.__class__ }}{{ lipsum.__globals__ }}{{ range.__self__ }}{{ '{0.__class__}'.format(messages) }}",
    "{{ messages|attr('__class__') }}{{ self.__init__ }}",
])
def test_unsafe_lookups_render_as_nothing(template):
    """Where the sandbox answers an unsafe lookup with an undefined value, nothing leaks into the prompt."""
    assert render_chat(template, MESSAGES).strip() == ""


def test_message_text_is_data_not_template():
    text = "{{ 7*7 }}{% for x in range(3) %}X{% endfor %}{{ cycler.__init__.__globals__ }}"
    rendered = render_chat(None, [{"role": "user", "content": text}])
    assert text in rendered and "49" not in rendered


# -- user data files ------------------------------------------------------------------------------


def test_hostile_history_files_are_skipped_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "history"
    store = HistoryStore(folder)
    from webui.history import Conversation
    good = Conversation(id="20250101-000000-0000abcd", title="", messages=[{"role": "user", "content": "hello"}])
    store.save(good)
    hostile = {
        "20250101-000001-00000001.json": "[" * 100_000 + "]" * 100_000,          # nesting bomb
        "20250101-000002-00000002.json": b"\xff\xfe\x00garbage",                  # not UTF-8
        "20250101-000003-00000003.json": '{"id": "20250101-000003-00000003", "messages": "nope"}',
        "20250101-000004-00000004.json": '{"id": "../../etc/passwd", "messages": []}',
        "20250101-000005-00000005.json": json.dumps({"id": "20250101-000005-00000005",
                                                     "messages": [{"role": "root", "content": 1}]}),
        "20250101-000006-00000006.json": "",
    }
    for name, content in hostile.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    os.symlink("/etc/hostname", folder / "20250101-000007-00000007.json")
    with caplog.at_level(logging.WARNING):
        entries = store.list()
    assert [e.id for e in entries] == [good.id]
    assert sum("skipping conversation file" in r.message for r in caplog.records) == 7
    with pytest.raises(ValueError, match="damaged"):
        store.load("20250101-000001-00000001")
    for bad_id in ("../../etc/passwd", "/etc/passwd", "20250101-000000-0000abcd/../x"):
        with pytest.raises(ValueError, match="not a conversation id"):
            store.load(bad_id)


def test_hostile_preset_files_give_a_message(tmp_path):
    user = tmp_path / "presets"
    user.mkdir()
    (user / "Deep.yaml").write_text("[" * 50_000 + "]" * 50_000)
    (user / "Binary.yaml").write_bytes(b"temperature: \xff\xfe")
    (user / "Python.yaml").write_text("!!python/object/apply:os.system ['touch PWNED']")
    store = PresetStore(tmp_path / "shipped", user)
    for name in ("Deep", "Binary", "Python"):
        with pytest.raises(ValueError, match="cannot be read|not a mapping"):
            store.get(name)
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")
    for bad in ("../evil", "/abs", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            store.save_new(bad, {})
