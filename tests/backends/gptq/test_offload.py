"""Models larger than the GPU (backends/gptq/offload.py): which decoder layers keep their packed codes
in host memory, planned from the checkpoint's headers; on CUDA, that such a model loads with those
codes in pinned host memory, reads them in place and gives the same tokens as the all-GPU load.
"""
from __future__ import annotations

import pytest
import torch

from backends.base import BackendError
from backends.gptq import format as fmt
from backends.gptq import offload, rtn
from backends.gptq.loader import _plan_offload, read_headers
from backends.registry import create_backend

GIB = 2**30


def test_plan_keeps_the_first_layers_and_offloads_as_few_last_ones_as_needed():
    codes = {0: 100, 1: 100, 2: 100, 3: 100}
    assert offload.plan_host_layers(codes, other_bytes=50, budget=450) == []
    assert offload.plan_host_layers(codes, other_bytes=50, budget=449) == [3]
    assert offload.plan_host_layers(codes, other_bytes=50, budget=250) == [2, 3]
    assert offload.plan_host_layers(codes, other_bytes=50, budget=50) == [0, 1, 2, 3]
    with pytest.raises(BackendError, match=r"needs 0\.0 GiB .* even with every layer's packed weights in host"):
        offload.plan_host_layers(codes, other_bytes=50, budget=49)


def test_decoder_layer_index():
    assert offload.decoder_layer_index("model.layers.12.mlp.down_proj") == 12
    assert offload.decoder_layer_index("model.layers.0.self_attn.q_proj") == 0
    assert offload.decoder_layer_index("lm_head") is None
    assert offload.decoder_layer_index("model.embed_tokens") is None


def test_reserve_counts_the_kv_cache_the_prefill_buffer_and_a_margin():
    from transformers import LlamaConfig
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=2048)
    kv = 2 * 32 * 8 * 128 * 2048 * 2  # the context (2048) is shorter than RESERVE_TOKENS
    assert offload.reserve_bytes(config, torch.float16, 11008 * 4096) == kv + 11008 * 4096 * 2 + offload.RESERVE_MARGIN


@pytest.fixture(scope="module")
def rtn_ckpt(tmp_path_factory, default_hf_model):
    return rtn.quantize_folder(default_hf_model, tmp_path_factory.mktemp("offload") / "smol-4bit", bits=4,
                               group_size=128)


def test_plan_from_the_checkpoint_headers(rtn_ckpt):
    """The default model's RTN checkpoint (30 decoder layers): the codes of each layer and everything
    else the GPU would hold, from the safetensors headers, decide how many last layers stay on the host."""
    qc = fmt.read_quantize_config(rtn_ckpt)
    headers = read_headers(fmt.find_weight_files(rtn_ckpt, qc))
    quant = sorted({k.rsplit(".", 1)[0] for k in headers if k.endswith(".qweight")})
    # SmolLM2-135M: hidden 576, 3 kv heads of 64, MLP 1536: 3538944 weights per layer at 4 bits
    per_layer = (576 * (576 + 192 + 192 + 576 + 1536 + 1536) + 1536 * 576) // 2

    def plan(budget_bytes):
        return _plan_offload(quant, headers, qc, torch.float16, budget_bytes)

    def smallest(ok, lo, hi):
        """The smallest budget (bytes) for which ok(budget) holds; ok is monotonic."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return hi

    def fits(budget):
        try:
            plan(budget)
            return True
        except BackendError:
            return False

    all_gpu = smallest(lambda b: fits(b) and plan(b) == [], 0, 10 * GIB)
    all_host = smallest(fits, 0, all_gpu)
    assert all_gpu - all_host == 30 * per_layer  # exactly the codes of the 30 layers
    assert all_host > 49152 * 576 * 2  # the rest includes at least the embeddings (fp16)
    assert plan(all_host) == list(range(30))
    assert plan(all_gpu - 1) == [29]
    assert plan(all_gpu - per_layer - 1) == [28, 29]  # always the last layers, as few as needed
    assert plan(all_host + 5 * per_layer) == list(range(5, 30))  # room for the codes of five layers
    with pytest.raises(BackendError, match="free GPU memory .* or load it on the CPU"):
        plan(all_host - 1)


def test_the_gpu_layers_option_is_validated_and_ignored_on_the_cpu(rtn_ckpt):
    backend = create_backend("gptq")
    with pytest.raises(BackendError, match="gpu_layers must be >= -1"):
        backend.validate_options({"device": "cpu", "gpu_layers": -2})
    backend.load(rtn_ckpt, backend.validate_options({"device": "cpu", "dtype": "float32", "gpu_layers": 3}))
    try:
        assert list(backend.load_warnings) == []  # nothing offloaded off CUDA: the CPU path holds it all
        assert {l.path for l in backend.quant_layers.values()} <= {"torch-cached", "torch-dequant"}
    finally:
        backend.unload()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned host memory read by kernels)")
def test_offloaded_layers_read_pinned_host_codes_and_give_the_same_tokens(rtn_ckpt):
    from backends.base import SamplingParams
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    outputs, logits = {}, {}
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 2]], device="cuda")
    for gpu_layers in (-1, 12):  # all fit on the GPU; layers 12-29 read from host memory
        backend = create_backend("gptq")
        backend.load(rtn_ckpt, backend.validate_options({"device": "cuda", "gpu_layers": gpu_layers}))
        try:
            on_host = {name for name, l in backend.quant_layers.items()
                       if offload.on_host((l.group.kernel if l.group is not None else l.kernel).qweight)}
            if gpu_layers == -1:
                assert not on_host and not backend.load_warnings
            else:
                assert {offload.decoder_layer_index(n) for n in on_host} == set(range(12, 30))
                assert len(on_host) == 18 * 7  # every projection of those layers, fused or not
                kernels = [backend.quant_layers[n].group or backend.quant_layers[n] for n in on_host]
                # codes in page-locked host memory (locked in place, no power-of-two rounding), the rest on the GPU
                assert all(hasattr(k.kernel.qweight, offload.HOST_MARK) and k.kernel.qweight.is_pinned()
                           and k.kernel.scales.is_cuda for k in kernels)
                assert "18 of 30 decoder layers keep their packed weights in host memory" in backend.load_warnings[0]
                report = backend.memory_report()
                assert report.ram_mb > 18 * 1.7 and report.gpu_mb > 0
            with torch.no_grad():
                logits[gpu_layers] = backend.model(input_ids=ids).logits.float()
            outputs[gpu_layers] = "".join(c.text for c in backend.chat(prompt, params))
        finally:
            backend.unload()
    err = float((logits[12] - logits[-1]).norm() / logits[-1].norm())
    assert err < 2e-3, err
    assert outputs[12] == outputs[-1] and len(outputs[-1]) > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host memory registration)")
def test_to_host_locks_the_copy_in_place_without_rounding_and_kernels_read_it():
    src = torch.arange(3 * 2**20 + 5, dtype=torch.int32)
    host = offload.to_host(src)
    registration = getattr(host, offload.HOST_MARK)
    assert registration.ok and host.is_pinned() and torch.equal(host, src)
    assert registration.buffer.numel() < src.numel() * 4 + offload.PAGE  # torch's pinned blocks: 16 MiB here
    assert offload.on_host(host) and not offload.on_host(src)
    moved = offload.like(host, host[:, None].repeat(1, 2).contiguous())  # a CPU op's result is locked again
    assert offload.on_host(moved) and torch.equal(moved[:, 1], src)
