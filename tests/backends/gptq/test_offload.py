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
                         max_position_embeddings=1024)
    kv = 2 * 32 * 8 * 128 * 1024 * 2  # the context (1024) is shorter than RESERVE_TOKENS
    assert offload.reserve_bytes(config, torch.float16, 11008 * 4096) == kv + 11008 * 4096 * 2 + offload.RESERVE_MARGIN
    # a 7B model without grouped kv heads: about 1.6 GB, so its 3.9 GB of 4-bit weights fit an 8 GB GPU
    seven_b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=4096)
    assert 1.5e9 < offload.reserve_bytes(seven_b, torch.float16, 11008 * 4096) < 1.8e9


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
        assert {l.path for l in backend.quant_layers.values()} <= {"torch-int4", "torch-cached", "torch-dequant"}
    finally:
        backend.unload()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host memory read by kernels)")
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_offloaded_layers_read_host_codes_and_give_the_same_tokens(tmp_path, act_order):
    """A random 6-layer LLaMA, RTN 4-bit, loaded all on the GPU and with layers 2-5 reading their codes
    from host memory: fused siblings stay on the host, the rest on the GPU, and prefill logits and
    CUDA-graph greedy decoding agree. With act-order, gate/up's columns are reordered for down_proj
    (act_order.fold_mlp_orders) where they lie, and dense weights of host layers come out the same."""
    from transformers import LlamaConfig

    from backends.gptq.act_order import fold_mlp_orders
    from backends.gptq.cuda_graph import GraphDecoder
    from backends.gptq.fusion import fuse_siblings
    from backends.gptq.kernel_runtime import KernelRuntime
    from backends.gptq.loader import load_checkpoint
    from bench.decode import _greedy_tokens, build_checkpoint
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512,
                         tie_word_embeddings=False)
    build_checkpoint(config, tmp_path / "ckpt", bits=4, group=128, act_order=act_order)
    torch.cuda.empty_cache()
    prompt = torch.randint(0, 2048, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    logits, tokens, dense = {}, {}, {}
    for gpu_layers in (None, 2):
        runtime = KernelRuntime(tune=True)
        loaded = load_checkpoint(tmp_path / "ckpt", torch.device("cuda"), torch.float16, runtime=runtime,
                                 gpu_layers=gpu_layers)
        model = loaded.model.eval()
        assert fold_mlp_orders(model) == (6 if act_order else 0)
        assert fuse_siblings(model, runtime) == 12
        dense[gpu_layers] = {n: loaded.quant_layers[n].dense_weight() for n in
                             ("model.layers.3.self_attn.o_proj", "model.layers.3.mlp.down_proj",
                              "model.layers.3.mlp.up_proj", "model.layers.1.mlp.gate_proj")}
        kernels = {n: (l.group.kernel if l.group is not None else l.kernel) for n, l in loaded.quant_layers.items()}
        host = {n for n, k in kernels.items() if offload.on_host(k.qweight)}
        if gpu_layers is None:
            assert not host and not loaded.host_layers and not loaded.warnings
        else:
            assert loaded.host_layers == [2, 3, 4, 5]
            assert {offload.decoder_layer_index(n) for n in host} == {2, 3, 4, 5} and len(host) == 4 * 7
            assert all(kernels[n].scales.is_cuda and kernels[n].zeros.is_cuda for n in host)
            assert "4 of 6 decoder layers keep their packed weights in host memory" in loaded.warnings[0]
        with torch.no_grad():
            logits[gpu_layers] = model(input_ids=torch.tensor([prompt], device="cuda")).logits.float()
            decoder = GraphDecoder(model, torch.device("cuda"), 128)
            tokens[gpu_layers] = _greedy_tokens(model, prompt, 16, decoder.step, torch.device("cuda"))
            assert decoder.graph is not None
        del model, loaded, decoder
        torch.cuda.empty_cache()
    err = float((logits[2] - logits[None]).norm() / logits[None].norm())
    assert err < 2e-3, err
    assert tokens[2] == tokens[None]
    for name, weight in dense[None].items():
        assert torch.equal(dense[2][name], weight), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host memory registration)")
def test_to_host_locks_the_copy_in_place_without_rounding_and_kernels_read_it():
    src = torch.arange(3 * 2**20 + 5, dtype=torch.int32)
    host = offload.to_host(src)
    registration = getattr(host, offload.HOST_MARK)
    assert registration.ok and torch.equal(host, src)  # (torch's is_pinned knows only its own allocator)
    assert registration.buffer.numel() < src.numel() * 4 + offload.PAGE  # torch's pinned blocks: 16 MiB here
    assert offload.on_host(host) and not offload.on_host(src)
    moved = offload.like(host, host[:, None].repeat(1, 2).contiguous())  # a CPU op's result is locked again
    assert offload.on_host(moved) and torch.equal(moved[:, 1], src)


def test_host_codes_are_tuned_apart_and_never_fused_with_gpu_codes():
    """Residence is part of the tuner's key (PCIe-bound layers pick their own configs) and of sibling
    fusion's compatibility (one launch reads one kind of memory). Residence is what offload.on_host
    reports: here a CPU tensor carrying the mark to_host gives (no CUDA on this machine)."""
    from backends.gptq.fusion import _compatible
    from backends.gptq.kernel_runtime import KernelRuntime
    from backends.gptq.quant_linear import QuantLinear, make_kernel_layer

    def layer(host: bool) -> QuantLinear:
        codes = torch.randint(0, 16, (256, 64), dtype=torch.int32)
        kernel = make_kernel_layer(fmt.pack_qweight(codes, 4), fmt.pack_qzeros(torch.full((2, 64), 8), 4, "gptq"),
                                   torch.ones(2, 64, dtype=torch.float16), None, 4, 128, "gptq", torch.device("cpu"))
        if host:
            setattr(kernel.qweight, offload.HOST_MARK, object())
        linear = QuantLinear(256, 64, 4, 128)
        linear.kernel = kernel
        return linear

    gpu, host = layer(False), layer(True)
    assert offload.on_host(host.kernel.qweight) and not offload.on_host(gpu.kernel.qweight)
    x = torch.zeros(1, 256, dtype=torch.float16)
    runtime = KernelRuntime(tune=False)
    assert runtime.key(x, host.kernel) == runtime.key(x, gpu.kernel) + "-host"
    assert _compatible([gpu, layer(False)]) and _compatible([host, layer(True)])
    assert not _compatible([gpu, host]) and not _compatible([host, gpu])
