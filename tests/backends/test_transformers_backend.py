"""The transformers engine on the real default model (fp32, CPU)."""
import math
import threading

import pytest

from backends.base import BackendError, SamplingParams
from quantizer.evaluation import perplexity

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _reply(backend, messages, **params):
    chunks = list(backend.chat(messages, SamplingParams(**params)))
    return "".join(c.text for c in chunks), chunks


def test_greedy_answers_paris_and_is_deterministic(transformers_backend):
    first, chunks = _reply(transformers_backend, QUESTION, max_new_tokens=32)
    second, _ = _reply(transformers_backend, QUESTION, max_new_tokens=32)
    assert "Paris" in first
    assert first == second
    final = chunks[-1]
    assert final.finished and final.finish_reason == "stop"
    assert final.generated_tokens == sum(1 for c in chunks if not c.finished)
    assert final.prompt_tokens > 10


def test_stop_event_ends_stream_within_one_token(transformers_backend):
    stop = threading.Event()
    produced = 0
    chunks = []
    for chunk in transformers_backend.chat([{"role": "user", "content": "Write a long story about a dragon."}],
                                           SamplingParams(max_new_tokens=200), stop):
        chunks.append(chunk)
        if not chunk.finished:
            produced += 1
            if produced == 5:
                stop.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].generated_tokens == 5


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(transformers_backend):
    params = dict(temperature=0.9, top_p=0.9, top_k=40, min_p=0.05, seed=1234, max_new_tokens=20)
    a, _ = _reply(transformers_backend, QUESTION, **params)
    b, _ = _reply(transformers_backend, QUESTION, **params)
    assert a == b and a
    cut, chunks = _reply(transformers_backend, QUESTION, max_new_tokens=32, stop=("Paris",))
    assert "Paris" not in cut and chunks[-1].finish_reason == "stop"


def test_token_logprobs_give_finite_perplexity(transformers_backend, wikitext_path):
    text = wikitext_path.read_text()[:6000]
    result = perplexity(transformers_backend, text, seqlen=128, windows=4)
    assert result.windows == 4 and result.tokens == 4 * 127
    assert math.isfinite(result.ppl) and 5 < result.ppl < 200


def test_memory_report_counts_weights(transformers_backend):
    report = transformers_backend.memory_report()
    # 135M parameters in fp32 with tied embeddings: about 513 MB
    assert 450 < report.ram_mb < 600
    assert report.gpu_mb == 0 and report.bits_per_weight == 32


def test_invalid_sampling_and_oversized_prompt_are_refused(transformers_backend):
    with pytest.raises(BackendError, match="top_p"):
        list(transformers_backend.chat(QUESTION, SamplingParams(top_p=1.5)))
    with pytest.raises(BackendError, match="logprobs must be 0 to 20 alternatives, got 21"):
        list(transformers_backend.chat(QUESTION, SamplingParams(logprobs=21)))
    with pytest.raises(BackendError, match="refused"):
        list(transformers_backend.generate("word " * 9000, SamplingParams(max_new_tokens=4)))
