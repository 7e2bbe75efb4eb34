"""Streaming text pieces shared by every engine."""
import pytest

from backends.text_stream import IncrementalDecoder, StopStringFilter


@pytest.fixture(scope="module")
def tokenizer(default_hf_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(default_hf_model))


@pytest.mark.parametrize("text", [
    "The capital of France is Paris.",
    "L'Étoile, la Cité — naïve café 😀 日本語  two  spaces\nnew line",
])
def test_deltas_rebuild_the_text_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(lambda t: tokenizer.decode(t))
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) == text == decoder.text
    assert not any("\ufffd" in d for d in deltas)  # never half a character


def test_decoding_window_stays_short(tokenizer):
    """Each token decodes a window of a few tokens, not the whole reply (quadratic otherwise)."""
    text = "word " * 300
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lengths = []
    decoder = IncrementalDecoder(lambda t: (lengths.append(len(t)), tokenizer.decode(t))[1])
    for i in ids:
        decoder.push(i)
    assert decoder.text == text
    assert max(lengths) <= 8


def test_stop_filter_never_shows_the_stop_string():
    stops = StopStringFilter(["###"])
    shown = [stops.feed(piece) for piece in ["Hello #", "#", " world", "##", "# after"]]
    assert [hit for _, hit in shown] == [False, False, False, False, True]
    assert "".join(text for text, _ in shown) == "Hello ## world"  # the engine stops at the hit
    assert stops.flush() == ""
