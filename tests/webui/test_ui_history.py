"""History store: conversations round-trip through JSON files, newest first, damaged files skipped."""
import json
import logging
import time

import pytest

from webui.history import Conversation, HistoryStore, new_conversation_id, title_from


def make(store: HistoryStore, text: str) -> Conversation:
    conv = Conversation(id=new_conversation_id(), title="", system_prompt="be brief", model="m@transformers",
                        params={"temperature": 0.0},
                        messages=[{"role": "user", "content": text},
                                  {"role": "assistant", "content": "ok", "stats": {"generated_tokens": 1}}])
    store.save(conv)
    return conv


def test_save_list_reopen(tmp_path):
    store = HistoryStore(tmp_path / "history")
    first = make(store, "What is the capital of France?")
    time.sleep(0.01)
    second = make(store, "Tell me a story " + "x" * 100)
    entries = store.list()
    assert [e.id for e in entries] == [second.id, first.id]          # newest first
    assert entries[1].title == "What is the capital of France?"
    assert entries[0].title.endswith("…") and len(entries[0].title) == 61
    assert entries[1].turns == 1
    again = store.load(first.id)
    assert again.messages == first.messages
    assert again.system_prompt == "be brief" and again.model == "m@transformers"
    assert again.messages[1]["stats"] == {"generated_tokens": 1}
    assert not list((tmp_path / "history").glob("*.partial"))


def test_resave_keeps_created_and_id(tmp_path):
    store = HistoryStore(tmp_path)
    conv = make(store, "hello")
    created = conv.created
    conv.messages.append({"role": "user", "content": "again"})
    store.save(conv)
    assert len(store.list()) == 1
    assert store.load(conv.id).created == created
    assert len(store.load(conv.id).messages) == 3


def test_corrupt_files_are_skipped_with_a_warning(tmp_path, caplog):
    store = HistoryStore(tmp_path)
    good = make(store, "fine")
    (tmp_path / "20250101-000000-deadbeef.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "20250101-000001-deadbeef.json").write_text(json.dumps({"id": "20250101-000001-deadbeef",
                                                                       "messages": [{"role": "hacker"}]}))
    (tmp_path / "20250101-000002-deadbeef.json").write_bytes(b"\xff\xfe\x00garbage")
    with caplog.at_level(logging.WARNING, logger="webui.history"):
        entries = store.list()
    assert [e.id for e in entries] == [good.id]
    assert sum("skipping conversation file" in r.getMessage() for r in caplog.records) == 3
    with pytest.raises(ValueError, match="damaged"):
        store.load("20250101-000000-deadbeef")


def test_ids_cannot_escape_the_folder(tmp_path):
    store = HistoryStore(tmp_path / "h")
    for bad in ("../../etc/passwd", "/etc/passwd", "", "abc"):
        with pytest.raises(ValueError):
            store.load(bad)


def test_title_from_first_user_message():
    assert title_from([{"role": "system", "content": "x"}, {"role": "user", "content": "  hi\n there "}]) == "hi there"
    assert title_from([]) == "(empty conversation)"
