"""bitsandbytes backend on CPU with the real default model: nf4 and int8 load, chat, score close to
the fp32 model, report their real storage cost, and keep bitsandbytes' per-call int8 notice out of
the log."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from backends.base import BackendError, SamplingParams
from backends.registry import create_backend
from quantizer.evaluation import load_eval_text, perplexity

SEQLEN, WINDOWS = 128, 4
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _load(path, **options):
    backend = create_backend("bitsandbytes")
    backend.load(path, backend.validate_options({"device": "cpu", **options}))
    return backend


@pytest.fixture(scope="module")
def nf4(default_hf_model):
    backend = _load(default_hf_model, quant="nf4")
    yield backend
    backend.unload()


@pytest.fixture(scope="module")
def int8(default_hf_model):
    backend = _load(default_hf_model, quant="int8")
    yield backend
    backend.unload()


@pytest.fixture(scope="module")
def eval_text(wikitext_path):
    return load_eval_text("wikitext2")


@pytest.fixture(scope="module")
def fp_ppl(transformers_backend, eval_text):
    return perplexity(transformers_backend, eval_text, SEQLEN, WINDOWS)


def _answer(backend) -> str:
    return "".join(c.text for c in backend.chat(QUESTION, SamplingParams(max_new_tokens=12)))


def test_options_are_checked_before_any_file(tmp_path):
    cls = type(create_backend("bitsandbytes"))
    with pytest.raises(BackendError, match="quant must be one of"):
        cls.validate_options({"quant": "int4"})
    with pytest.raises(BackendError, match="unknown option"):
        cls.validate_options({"bits": 4})
    backend = create_backend("bitsandbytes")
    with pytest.raises(BackendError, match="double_quant applies to nf4/fp4 only"):
        backend.quantization_config(cls.validate_options({"quant": "int8", "double_quant": True}))
    with pytest.raises(BackendError, match="no config.json|not a folder"):
        backend.load(tmp_path, cls.validate_options({}))
    names = {o.name for o in cls.capabilities.options}
    assert {"quant", "double_quant", "compute_dtype", "device"} <= names
    assert cls.capabilities.bits == (4, 8)


@pytest.mark.skipif("__import__('torch').cuda.is_available()")
def test_cuda_refused_clearly_without_a_gpu(default_hf_model):
    backend = create_backend("bitsandbytes")
    with pytest.raises(BackendError, match="no CUDA GPU"):
        backend.load(default_hf_model, backend.validate_options({"device": "cuda"}))


def test_nf4_chat_memory_and_perplexity(nf4, transformers_backend, eval_text, fp_ppl):
    assert "Paris" in _answer(nf4)
    report = nf4.memory_report()
    # 4-bit codes + one absmax per 64 weights: float32 (4.5 bits), or bfloat16 (4.25) once bitsandbytes
    # >= 0.50.2 has repacked the layer for its CPU kernel on the first forward pass
    import bitsandbytes as bnb
    layer = next(m for m in nf4.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    absmax = layer.weight.quant_state.absmax
    assert absmax.dtype in (torch.float32, torch.bfloat16), absmax.dtype
    assert report.bits_per_weight == pytest.approx(4 + absmax.element_size() * 8 / 64, abs=0.01)
    fp_report = transformers_backend.memory_report()
    assert report.ram_mb < 0.5 * fp_report.ram_mb
    assert report.file_mb == pytest.approx(fp_report.file_mb)
    result = perplexity(nf4, eval_text, SEQLEN, WINDOWS)
    assert math.isfinite(result.ppl) and result.tokens == fp_ppl.tokens
    assert result.ppl != fp_ppl.ppl  # it really is a different (quantized) model
    assert abs(result.ppl / fp_ppl.ppl - 1) < 0.30, (result.ppl, fp_ppl.ppl)


def test_nf4_streams_and_stops(nf4):
    chunks = list(nf4.generate("Once upon a time", SamplingParams(max_new_tokens=5)))
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert [c.generated_tokens for c in chunks[:-1]] == [1, 2, 3, 4, 5]
    import threading
    stop = threading.Event()
    stop.set()
    cancelled = list(nf4.generate("Once upon a time", SamplingParams(max_new_tokens=5), stop))
    assert cancelled[-1].finish_reason == "cancelled" and cancelled[-1].generated_tokens == 0
    ids = nf4.tokenize("The quick brown fox jumps over the lazy dog.")
    logprobs = nf4.token_logprobs(ids)
    assert len(logprobs) == len(ids) - 1 and all(lp <= 0 for lp in logprobs)


def test_int8_chat_perplexity_and_quiet_log(int8, eval_text, fp_ppl, caplog):
    with caplog.at_level(logging.DEBUG):
        answer = _answer(int8)
        result = perplexity(int8, eval_text, SEQLEN, WINDOWS)
    assert "Paris" in answer
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    report = int8.memory_report()
    # int8 codes + one float32 scale per output row (in_features 576 or 1536)
    assert 8.0 < report.bits_per_weight < 8.06
    assert math.isfinite(result.ppl) and result.ppl != fp_ppl.ppl
    assert abs(result.ppl / fp_ppl.ppl - 1) < 0.10, (result.ppl, fp_ppl.ppl)


def test_notice_filters_are_narrow():
    from backends.bitsandbytes_backend import silence_bitsandbytes_notices
    silence_bitsandbytes_notices()
    silence_bitsandbytes_notices()
    for name, message in [("bitsandbytes.autograd._functions",
                           "MatMul8bitLt: inputs will be cast from %s to float16 during quantization"),
                          ("bitsandbytes.backends.cpu.ops",
                           "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure")]:
        logger = logging.getLogger(name)
        assert len([f for f in logger.filters if type(f).__name__ == "_DropNotice"]) == 1
        record = logging.LogRecord(logger.name, logging.WARNING, __file__, 1, message, ("x",), None)
        other = logging.LogRecord(logger.name, logging.WARNING, __file__, 1, "something else went wrong", (), None)
        assert not logger.filter(record) and logger.filter(other)


def test_bitsandbytes_is_imported_without_hub_kernels():
    """On CPUs with AVX512-BF16 a plain `import bitsandbytes` goes to the `kernels` package for a compiled
    kernel from the Hub (and logs advice to set trust_remote_code=True when it cannot have one). Through
    the backend, `kernels` is never imported, no such line is printed, and 4-bit matmuls still run."""
    import subprocess
    import sys

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=str(Path(__file__).resolve().parents[2]))
    plain = run("import sys, bitsandbytes; print('kernels' in sys.modules)")
    if "kernels-community" not in plain.stderr:
        pytest.skip("this CPU has no AVX512-BF16 (or no `kernels` package): bitsandbytes asks for no Hub kernel")
    assert plain.stdout.strip() == "True"
    ours = run("import sys, torch\n"
               "from backends.bitsandbytes_backend import import_bitsandbytes\n"
               "bnb = import_bitsandbytes()\n"
               "w = torch.randn(64, 128)\n"
               "q, state = bnb.functional.quantize_4bit(w, quant_type='nf4')\n"
               "x = torch.randn(1, 128, dtype=torch.bfloat16)\n"
               "y = bnb.matmul_4bit(x, q.t(), quant_state=state)\n"
               "print('kernels' in sys.modules, tuple(y.shape))")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip() == "False (1, 64)"
    assert "kernels-community" not in ours.stderr and "trust_remote_code" not in ours.stderr, ours.stderr
