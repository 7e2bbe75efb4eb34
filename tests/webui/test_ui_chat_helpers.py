"""Pure helpers of the chat tab: Gradio 6 message normalisation, stats line, Continue's prompt cut."""
import pytest

from backends.base import BackendError
from webui.chat_tab import continue_prompt, decode_rate, format_stats, normalize_messages, text_of, to_display


def test_gradio6_typed_parts_are_normalised():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
         "metadata": None, "options": None},
        {"role": "assistant", "content": [{"type": "file", "file": {"path": "/tmp/x.png"}}, {"text": "ok", "type": "text"}]},
        {"role": "assistant", "content": "plain string"},
        {"role": "tool", "content": "ignored"},
    ]
    assert normalize_messages(history) == [{"role": "user", "content": "Hello there"},
                                           {"role": "assistant", "content": "ok"},
                                           {"role": "assistant", "content": "plain string"}]
    assert text_of(None) == "" and text_of({"type": "component", "component": "image"}) == ""


def test_stats_line_and_display():
    stats = {"generated_tokens": 12, "tokens_per_s": 20.04, "prompt_tokens": 30, "ttft_s": 0.25,
             "finish_reason": "cancelled"}
    assert format_stats(stats) == "12 tokens · 20.0 tok/s · prompt 30 tokens · first token 0.25 s · stopped"
    assert format_stats(None) == ""
    shown = to_display([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "stats": stats}])
    assert [m["role"] for m in shown] == ["user", "assistant"]
    assert shown[1]["content"].startswith("a\n\n<span class=\"gen-stats\">12 tokens")


def test_decode_rate_excludes_time_to_first_token():
    assert decode_rate(11, started=0.0, first_token_at=1.0, now=3.0) == pytest.approx(5.0)
    assert decode_rate(1, started=0.0, first_token_at=0.5, now=0.5) == pytest.approx(2.0)
    assert decode_rate(0, started=0.0, first_token_at=None, now=0.0) == 0.0


def test_continue_prompt_drops_the_end_of_turn():
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nThe capital of<|im_end|>\n"
    assert continue_prompt(rendered, "The capital of") == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nThe capital of"
    assert continue_prompt(rendered.replace("of<", "of<"), "The capital of  ").endswith("The capital of")
    with pytest.raises(BackendError, match="cannot be continued"):
        continue_prompt(rendered, "something else")
