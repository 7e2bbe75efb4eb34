"""The llama.cpp engine on the real default GGUF."""
import math
import threading

import pytest

from backends.base import BackendError, SamplingParams
from quantizer.evaluation import perplexity

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (./start.sh installs it)")

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]


def _reply(backend, messages, **params):
    chunks = list(backend.chat(messages, SamplingParams(**params)))
    return "".join(c.text for c in chunks), chunks


def test_template_comes_from_gguf_metadata(llamacpp_backend):
    template = llamacpp_backend.chat_template()
    assert template and "<|im_start|>" in template
    rendered = llamacpp_backend.render_chat(QUESTION)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")


def test_greedy_answers_paris_deterministically(llamacpp_backend):
    first, chunks = _reply(llamacpp_backend, QUESTION, max_new_tokens=32)
    second, _ = _reply(llamacpp_backend, QUESTION, max_new_tokens=32)
    assert "Paris" in first and first == second
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].generated_tokens == sum(1 for c in chunks if not c.finished)


def test_an_answer_does_not_depend_on_what_the_cache_held(llamacpp_backend):
    """llama.cpp's batched and single-token kernels round differently; the backend evaluates a prompt
    the same way whether the KV cache is empty, holds this prompt, or holds another conversation."""
    params = dict(temperature=0.8, top_p=0.9, top_k=40, seed=3, max_new_tokens=12)
    llamacpp_backend.llm.reset()
    fresh = _reply(llamacpp_backend, QUESTION, **params)[0]
    again = _reply(llamacpp_backend, QUESTION, **params)[0]                       # prompt cached
    _reply(llamacpp_backend, [SYSTEM, {"role": "user", "content": "Name a fruit."}], max_new_tokens=4)
    after_other = _reply(llamacpp_backend, QUESTION, **params)[0]                # shares only the system turn
    assert fresh and fresh == again == after_other, (fresh, again, after_other)


def test_stop_event_ends_stream_within_one_token(llamacpp_backend):
    stop = threading.Event()
    chunks, produced = [], 0
    for chunk in llamacpp_backend.chat([{"role": "user", "content": "Write a long story about a dragon."}],
                                       SamplingParams(max_new_tokens=300), stop):
        chunks.append(chunk)
        if not chunk.finished:
            produced += 1
            if produced == 4:
                stop.set()
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].generated_tokens == 4


def test_seeded_sampling_reproducible(llamacpp_backend):
    params = dict(temperature=0.8, top_p=0.9, top_k=40, seed=7, max_new_tokens=16)
    assert _reply(llamacpp_backend, QUESTION, **params)[0] == _reply(llamacpp_backend, QUESTION, **params)[0]


def test_perplexity_agrees_with_transformers_on_same_weights(llamacpp_backend, transformers_backend, wikitext_path):
    """The HF folder is the GGUF dequantized, so both engines score the same weights."""
    from quantizer.evaluation import wikitext2_from_raw
    text = wikitext2_from_raw(wikitext_path.read_text())[:8000]
    assert llamacpp_backend.tokenize(text) == transformers_backend.tokenize(text)
    ours = perplexity(llamacpp_backend, text, seqlen=256, windows=3)
    theirs = perplexity(transformers_backend, text, seqlen=256, windows=3)
    assert math.isfinite(ours.ppl) and ours.tokens == theirs.tokens == 3 * 255
    assert abs(ours.ppl - theirs.ppl) / theirs.ppl < 0.10, (ours.ppl, theirs.ppl)


def test_memory_report_and_bits(llamacpp_backend):
    report = llamacpp_backend.memory_report()
    assert 90 < report.file_mb < 100
    assert 4.5 < report.bits_per_weight < 7  # Q4_1 plus unquantized tensors
    assert report.gpu_mb == 0


def test_garbage_gguf_refused(tmp_path):
    from backends.registry import create_backend
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 100)
    backend = create_backend("llama.cpp")
    with pytest.raises(BackendError, match="corrupt|truncated|GGUF"):
        backend.load(bad, backend.validate_options({}))


def test_llama_cpp_is_built_without_amx():
    """start.sh builds llama.cpp without AMX on x86-64: with -march=native on a Xeon with AMX, ggml's AMX
    matmul segfaulted on the default model's first decode (llama-cpp-python 0.3.36), taking the whole test
    run down with it. This says so by name instead. It fails on AMX CPUs only (elsewhere nothing turns
    AMX on), which is where it matters."""
    llama_cpp = pytest.importorskip("llama_cpp")
    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info, f"this llama-cpp-python uses AMX; rebuild it with ./start.sh: {info}"
