"""The UI through gradio_client against a real server with the real default model (fp32 CPU)."""
import json
import re

import pytest

from backends.registry import backend_class, backend_names
from webui.chat_tab import NOTHING_TO_ADD, UNREADABLE_PARAMS, normalize_messages

QUESTION = "What is the capital of France?"
STATS_RE = re.compile(r"(\d+) tokens · ([\d.]+) tok/s · prompt (\d+) tokens")


def reply_of(chatbot_value) -> str:
    """Text of the last assistant message without the stats line the page adds under it."""
    messages = normalize_messages(chatbot_value)
    assert messages and messages[-1]["role"] == "assistant", messages
    return messages[-1]["content"].split('\n\n<span class="gen-stats">')[0]


def chat(client, message, **params):
    """Run /chat, return every streamed output tuple."""
    job = client.submit(message, api_name="/chat", **params)
    updates = list(job)
    return updates, job.outputs()[-1]


def load_args(name, backend, **options):
    """Positional arguments of /load_model: the option form is built from every backend's specs."""
    args = [name, backend]
    for b in backend_names():
        try:
            specs = backend_class(b).capabilities.options
        except Exception:
            continue
        for spec in specs:
            args.append(options.get(spec.name, spec.default) if b == backend else spec.default)
    return args


def test_the_queue_does_not_poll_every_millisecond(chat_server):
    """Gradio's default 1 ms idle poll costs 3.6% of a core idle and 2.5% of the reply speed on 2 cores."""
    from webui.app import PROGRESS_POLL_S, QUEUE_POLL_S
    queue = chat_server.demo._queue
    assert queue.sleep_when_free == QUEUE_POLL_S and queue.progress_update_sleep_when_free == PROGRESS_POLL_S


def test_chat_streams_paris_with_the_deterministic_preset(chat_server):
    client = chat_server.client()
    temperature, top_p, top_k, min_p, rep, max_new, seed = client.predict("Deterministic", api_name="/preset_values")
    assert temperature == 0.0
    updates, final = chat(client, QUESTION, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=rep, max_new_tokens=max_new, seed=seed)
    chatbot, stats, history, model, _ = final
    assert "Paris" in reply_of(chatbot)
    # streamed: the reply grew over several updates before the final one
    lengths = [len(reply_of(u[0])) for u in updates if normalize_messages(u[0])[-1]["role"] == "assistant"]
    assert len(lengths) >= 3 and lengths[0] < lengths[-1]
    generated, tok_s, prompt = STATS_RE.search(stats).groups()
    assert 1 <= int(generated) < max_new and float(tok_s) > 0 and int(prompt) > 5
    assert stats.endswith("done")
    assert model["value"] == "SmolLM2-135M-Instruct@transformers"
    # saved to the history folder, listed, and reopened with the same messages
    conv_id = history["value"]
    saved = json.loads((chat_server.ctx.data_dir / "history" / f"{conv_id}.json").read_text())
    assert saved["messages"][0]["content"] == QUESTION and "Paris" in saved["messages"][1]["content"]
    assert saved["params"]["temperature"] == 0.0
    reopened = chat_server.client().predict(conv_id, api_name="/open_conversation")
    assert "Paris" in reply_of(reopened[0]) and reopened[2] == ""  # (the State output is hidden)
    assert reopened[3]["value"] == "SmolLM2-135M-Instruct@transformers"   # the model it was had with
    assert reopened[1] == stats

    # had with a model that is not loaded any more: the page says so
    saved["model"] = "gone@llama.cpp"
    (chat_server.ctx.data_dir / "history" / f"{conv_id}.json").write_text(json.dumps(saved))
    reopened = chat_server.client().predict(conv_id, api_name="/open_conversation")
    assert reopened[1] == (f"{stats} · This conversation was with gone@llama.cpp, which is not loaded: "
                           "replies now come from the model picked above.")
    assert reopened[3] == {"__type__": "update"}


def test_a_reopened_conversation_brings_back_its_sampling_settings(chat_server):
    """Regenerate after Open should sample as the conversation did: its temperature, seed and the rest
    come back into the parameter widgets. A file whose settings are missing or out of range leaves them
    as they are and says so."""
    client = chat_server.client()
    used = dict(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, max_new_tokens=12, seed=42)
    _, final = chat(client, QUESTION, **used)
    conv_id = final[2]["value"]
    reopened = chat_server.client().predict(conv_id, api_name="/open_conversation")
    assert list(reopened[4:]) == pytest.approx(list(used.values()))
    path = chat_server.ctx.data_dir / "history" / f"{conv_id}.json"
    saved = json.loads(path.read_text())
    for broken in ({**saved["params"], "temperature": 7.5}, {"temperature": 0.5}, "hot"):
        path.write_text(json.dumps({**saved, "params": broken}))
        reopened = chat_server.client().predict(conv_id, api_name="/open_conversation")
        assert reopened[1].endswith(UNREADABLE_PARAMS) and reply_of(reopened[0]) == reply_of(final[0])
        assert all(value == {"__type__": "update"} for value in reopened[4:])


def test_regenerate_and_continue(chat_server):
    client = chat_server.client()
    _, first = chat(client, QUESTION, max_new_tokens=3)
    partial = reply_of(first[0])
    assert "tokens" in first[1] and "hit max tokens" in first[1] and "Paris" not in partial
    again = client.predict(max_new_tokens=3, api_name="/regenerate")
    assert reply_of(again[0]) == partial                            # greedy: same reply
    assert len(normalize_messages(again[0])) == 2                   # replaced, not appended
    continued = client.predict(max_new_tokens=40, api_name="/continue_reply")
    full = reply_of(continued[0])
    assert full.startswith(partial) and "Paris" in full and len(full) > len(partial)
    assert len(normalize_messages(continued[0])) == 2               # same message, extended


def test_continue_of_a_finished_reply_says_so_and_keeps_its_stats(chat_server):
    client = chat_server.client()
    _, first = chat(client, QUESTION)
    assert first[1].endswith("done"), first[1]
    continued = client.predict(api_name="/continue_reply")
    assert reply_of(continued[0]) == reply_of(first[0])
    assert continued[1] == f"{first[1]} · {NOTHING_TO_ADD}"          # the reply's own numbers, not "0 tokens"


def test_deleting_the_open_conversation_clears_the_chat_for_good(chat_server):
    client = chat_server.client()
    history_dir = chat_server.ctx.data_dir / "history"
    _, first = chat(client, QUESTION)
    conv_id = first[2]["value"]
    assert (history_dir / f"{conv_id}.json").exists()
    listed, chatbot, stats = client.predict(conv_id, api_name="/delete_conversation")
    assert chatbot == [] and stats == "" and listed["value"] is None
    assert all(value != conv_id for _, value in listed["choices"])
    _, after = chat(client, "And of Germany?")                        # a new conversation, not the old one again
    assert len(normalize_messages(after[0])) == 2 and after[2]["value"] != conv_id
    assert not (history_dir / f"{conv_id}.json").exists()

    # deleted while a reply streams into it: the reply stops, the chat clears, nothing is saved again
    client.predict(api_name="/clear")
    _, first = chat(client, QUESTION)
    conv_id = first[2]["value"]
    job = client.submit("Write a very long story about a dragon who learns to fly.", max_new_tokens=400,
                        api_name="/chat")
    for update in job:
        if len(normalize_messages(update[0])) == 4 and len(reply_of(update[0])) > 20:
            client.predict(conv_id, api_name="/delete_conversation")
            break
    else:
        pytest.fail("the long reply never streamed")
    job.result()
    chatbot, stats, listed, *_ = job.outputs()[-1]
    assert chatbot == [] and stats == "" and listed["value"] is None
    assert not (history_dir / f"{conv_id}.json").exists()


def test_stop_ends_a_long_reply_within_a_few_tokens(chat_server):
    client = chat_server.client()
    job = client.submit("Write a very long story about a dragon who learns to fly.",
                        max_new_tokens=400, api_name="/chat")
    for update in job:
        if normalize_messages(update[0])[-1]["role"] == "assistant" and len(reply_of(update[0])) > 20:
            client.predict(api_name="/stop")
            break
    job.result()
    stats = job.outputs()[-1][1]
    generated = int(STATS_RE.search(stats).group(1))
    assert stats.endswith("stopped")
    assert generated < 100, stats                                   # well short of 400


def test_no_text_and_bad_params_are_refused(chat_server):
    from gradio_client.exceptions import AppError
    client = chat_server.client()
    with pytest.raises(AppError, match="Type a message first"):
        client.predict("   ", api_name="/chat")
    with pytest.raises(AppError, match="less than minimum value 0.01"):
        client.predict(QUESTION, top_p=0.0, api_name="/chat")
    with pytest.raises(AppError, match="Nothing to continue"):
        client.predict(api_name="/continue_reply")


def test_models_tab_lists_loads_and_unloads(chat_server):
    client = chat_server.client()
    table, names, loaded, picked = client.predict(None, api_name="/list_models")
    assert picked["value"] == "SmolLM2-135M-Instruct@transformers"        # ready to unload
    rows = {r[0]: r for r in table["data"]}
    assert rows["SmolLM2-135M-Instruct"][1:4] == ["hf", "float16", pytest.approx(258, abs=5)]
    assert rows["SmolLM2-135M-Instruct.Q4_1.gguf"][1:3] == ["gguf", "Q4_1"]        # from the file's header
    status, loaded, picked = client.predict(*load_args("SmolLM2-135M-Instruct", "transformers",
                                                       dtype="float16", device="cpu"), api_name="/load_model")
    assert status.startswith("Loaded **SmolLM2-135M-Instruct@transformers#2**"), status
    mem = {r[0]: r for r in loaded["data"]}
    fp32, fp16 = mem["SmolLM2-135M-Instruct@transformers"], mem["SmolLM2-135M-Instruct@transformers#2"]
    assert fp16[2] > 0 and fp32[2] > 0 and fp16[5] == pytest.approx(16, abs=0.5) and fp32[5] == pytest.approx(32, abs=0.5)
    status, loaded, _ = client.predict("SmolLM2-135M-Instruct@transformers#2", api_name="/unload_model")
    assert status == "Unloaded SmolLM2-135M-Instruct@transformers#2."
    assert [r[0] for r in loaded["data"]] == ["SmolLM2-135M-Instruct@transformers"]
    status, _, _ = client.predict("nope@x", api_name="/unload_model")
    assert "no loaded model 'nope@x'" in status


@pytest.mark.parametrize("name, message", [
    ("corrupt.gguf", "corrupt"),
    ("empty-folder", "not a model"),
    ("notes.txt", "not a model"),
    ("bad-config", "not valid JSON"),
    ("fake-weights", "fake-weights"),
    ("../../etc/passwd", "outside the models folder"),
    ("/etc", "outside the models folder"),
    ("missing-model", "no such model"),
])
def test_bad_model_inputs_show_a_message_and_the_server_keeps_serving(bad_models_server, name, message):
    client = bad_models_server.client()
    status, loaded, _ = client.predict(*load_args(name, "auto"), api_name="/load_model")
    assert status.startswith(f"**Could not load {name}:**") and message in status, status
    assert loaded["data"] == [] and not bad_models_server.ctx.manager.loaded()
    table, *_ = client.predict(None, api_name="/list_models")         # still serving
    problems = {r[0]: r[4] for r in table["data"]}
    assert problems["empty-folder"].startswith("empty-folder is not a model")
    assert set(problems) == {"bad-config", "corrupt.gguf", "empty-folder", "fake-weights", "notes.txt"}


def test_wrong_backend_for_a_format_is_explained(chat_server):
    status, _, _ = chat_server.client().predict(*load_args("SmolLM2-135M-Instruct.Q4_1.gguf", "transformers"),
                                                api_name="/load_model")
    assert "is a gguf model: load it with llama.cpp" in status


def test_hub_download_offline_gives_a_clear_message(bad_models_server):
    status, table, _ = bad_models_server.client().predict("HuggingFaceTB/SmolLM2-360M-Instruct", "",
                                                          api_name="/download_model")
    assert status.startswith("**Download failed:** Cannot download HuggingFaceTB/SmolLM2-360M-Instruct: "
                             "the Hugging Face Hub is not reachable"), status
    assert not any(r[0].startswith("SmolLM2-360M") for r in table["data"])
    status, _, _ = bad_models_server.client().predict("../etc", "", api_name="/download_model")
    assert "is not a Hub repo id" in status


def test_save_preset_from_the_page(chat_server):
    client = chat_server.client()
    values = client.predict("Balanced", api_name="/preset_values")
    dropdown, status = client.predict("../escape", *values, api_name="/save_preset")
    assert status.startswith("Not saved: Preset name '../escape' is not allowed")
    dropdown, status = client.predict("Deterministic", *values, api_name="/save_preset")
    assert "already exists" in status
    dropdown, status = client.predict("UI test preset", *values, api_name="/save_preset")
    saved = chat_server.ctx.data_dir / "presets" / "UI test preset.yaml"
    assert status == f"Saved preset UI test preset to {saved}" and saved.exists()
    assert dropdown["value"] == "UI test preset" and ["UI test preset", "UI test preset"] in dropdown["choices"]
    assert client.predict("UI test preset", api_name="/preset_values") == values


def test_a_prompt_longer_than_the_context_is_explained_and_not_kept(chat_server):
    client = chat_server.client()
    chatbot, stats, _, _, back_in_input = client.predict("word " * 9000, api_name="/chat")
    assert normalize_messages(chatbot) == []                         # neither the prompt nor an empty reply kept
    assert back_in_input == "word " * 9000                          # handed back for editing
    assert stats.startswith("Generation failed: the prompt has") and "context holds 8192" in stats, stats
    _, final = chat(client, QUESTION)                                 # the server and session go on
    assert "Paris" in reply_of(final[0])


def test_damaged_history_file_gives_a_message_and_can_be_deleted(chat_server):
    from gradio_client.exceptions import AppError
    history_dir = chat_server.ctx.data_dir / "history"
    history_dir.mkdir(parents=True, exist_ok=True)
    broken = history_dir / "20240101-000000-0badf00d.json"
    broken.write_text('{"id": "20240101-000000-0badf00d", "messages": [', encoding="utf-8")
    client = chat_server.client()
    with pytest.raises(AppError, match="is damaged"):
        client.predict("20240101-000000-0badf00d", api_name="/open_conversation")
    with pytest.raises(AppError, match="not a conversation id"):
        client.predict("../../secrets", api_name="/open_conversation")
    remaining, *_ = client.predict("20240101-000000-0badf00d", api_name="/delete_conversation")
    assert not broken.exists()
    assert all(value != "20240101-000000-0badf00d" for _, value in remaining["choices"])
