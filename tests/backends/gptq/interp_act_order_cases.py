"""act_order.py's rewrites under TRITON_INTERPRET=1 (run by test_act_order.py in a fresh interpreter):
the norm and attention kernels writing their output in a given column order, down_proj's perm folded
into gate/up, and a whole act-order model decoding with the norms and the attention writing sorted
rows, against the same model with every gather inside the kernels."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_act_order.py"

from backends import torch_generation  # noqa: E402
from backends.gptq import act_order, norm_kernel  # noqa: E402
from backends.gptq import format as fmt  # noqa: E402
from backends.gptq.kernel_runtime import KernelRuntime  # noqa: E402
from backends.gptq.quant_linear import QuantLinear, make_kernel_layer  # noqa: E402
from backends.gptq.rtn import rtn_quantize  # noqa: E402
from backends.torch_generation import greedy_logits  # noqa: E402

PROMPT = [5, 17, 42, 7, 99, 3]
# act-order seeds per projection: siblings that read one input share a perm, as GPTQ's do (one Hessian)
SHARED = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 3, "up_proj": 3, "down_proj": 4}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _quant_linear(linear, name, runtime, seed, bits=4, group=32) -> QuantLinear:
    codes, zeros, scales, g_idx = rtn_quantize(linear.weight.data, bits, group, sym=False, act_order_seed=seed)
    qweight, qzeros = fmt.pack_qweight(codes, bits), fmt.pack_qzeros(zeros, bits, "gptq_v2")
    layer = QuantLinear(linear.in_features, linear.out_features, bits, group, name)
    layer.kernel = make_kernel_layer(qweight, qzeros, scales, g_idx, bits, group, "gptq_v2", "cpu")
    assert layer.kernel.perm is not None
    layer.runtime = runtime
    if linear.bias is not None:
        layer.bias = linear.bias.data.clone()
    return layer


def _quantize(model, runtime, seeds=SHARED):
    """Every decoder projection as an act-order QuantLinear running the Triton kernels (interpreted)."""
    for i, block in enumerate(model.model.layers):
        for parent in (block.self_attn, block.mlp):
            for name, seed in seeds.items():
                linear = getattr(parent, name, None)
                if linear is not None:
                    setattr(parent, name, _quant_linear(linear, name, runtime, 10 * i + seed))
    return model


class MatmulLog(list):
    """(N, gathers its input) of each kernel launch through the runtime."""

    def __init__(self, runtime, monkeypatch):
        super().__init__()
        real = runtime.matmul
        monkeypatch.setattr(runtime, "matmul", lambda x2d, layer, bias=None: (
            self.append((layer.N, layer.perm is not None)) or real(x2d, layer, bias)))


# -- the norm kernel's column order -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, width", [(1, 64), (3, 96), (1, 4096)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_the_norm_kernel_writes_its_row_in_the_given_order(dtype, rows, width, with_delta):
    g = torch.Generator().manual_seed(width + rows)
    residual = (torch.randn(1, rows, width, generator=g) * 3).to(dtype)
    delta = torch.randn(1, rows, width, generator=g).to(dtype) if with_delta else None
    weight = (torch.rand(width, generator=g) + 0.5).to(dtype)
    order = torch.randperm(width, generator=g).to(torch.int32)
    total, normed = norm_kernel.add_rms_norm(residual, delta, weight, 1e-5)
    total_o, normed_o = norm_kernel.add_rms_norm(residual, delta, weight, 1e-5, order)
    assert torch.equal(total_o, total)  # the residual stream keeps its natural order
    assert torch.equal(normed_o, normed[..., order.long()])  # the same numbers, to the bit, reordered
    assert not torch.equal(normed_o, normed)
    ordered_weight = weight[order.long()]  # what the route passes, computed once
    assert torch.equal(norm_kernel.add_rms_norm(residual, delta, weight, 1e-5, order, ordered_weight)[1], normed_o)


def test_the_norm_kernel_refuses_a_wrong_order():
    x = torch.randn(1, 1, 64)
    for bad in (torch.arange(64), torch.arange(32, dtype=torch.int32)):
        with pytest.raises(ValueError, match="64 int32"):
            norm_kernel.add_rms_norm(x, None, torch.ones(64), 1e-5, bad)


@pytest.mark.parametrize("splits", [1, 3])
def test_the_attention_kernel_writes_its_output_in_the_given_order(splits):
    from backends.gptq.decode_attention import decode_attention
    from backends.gptq.kernel_runtime import SplitScratch
    g = torch.Generator().manual_seed(splits)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
    caches = [torch.randn(1, 2, 192, 16, generator=g) for _ in range(2)]
    order = torch.randperm(64, generator=g).to(torch.int32)
    where = torch.argsort(order).to(torch.int32)
    pos = torch.tensor([150])
    natural = decode_attention(q, k, v, *[c.clone() for c in caches], pos, 0.25, SplitScratch(), splits=splits)
    got = decode_attention(q, k, v, *[c.clone() for c in caches], pos, 0.25, SplitScratch(), splits=splits,
                           where=where)
    assert torch.equal(got.reshape(-1), natural.reshape(-1)[order.long()])
    with pytest.raises(ValueError, match="64 int32"):
        decode_attention(q, k, v, *caches, pos, 0.25, SplitScratch(), where=where.long())


# -- down_proj's perm folded into gate/up -----------------------------------------------------------

def test_folding_down_projs_order_into_gate_and_up_keeps_the_mlp(tiny_llama):
    from backends.gptq.fusion import fuse_siblings
    runtime = KernelRuntime(tune=False)
    model = _quantize(copy.deepcopy(tiny_llama), runtime)
    mlp = model.model.layers[0].mlp
    weights = {n: getattr(mlp, n).dense_weight() for n in ("gate_proj", "up_proj", "down_proj")}
    x = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = [mlp(x[:1]), mlp(x)]
    assert act_order.fold_mlp_orders(model) == 2
    assert mlp.down_proj.kernel.perm is None and mlp.down_proj.input_order is not None
    assert mlp.gate_proj.output_order is mlp.down_proj.input_order is mlp.up_proj.output_order
    for fuse in (False, True):
        if fuse:
            assert fuse_siblings(model, runtime) == 4  # gate/up (same stored order) still fuse
        with torch.no_grad():
            after = [mlp(x[:1]), mlp(x)]
        for b, a in zip(before, after):
            assert _rel(a, b) < 1e-5
        for name, w in weights.items():  # the checkpoint's weights, in its own order, as before
            assert torch.equal(getattr(mlp, name).dense_weight(), w), name
    assert act_order.fold_mlp_orders(model) == 0  # nothing left to fold


# -- a whole model: the norms write sorted rows -----------------------------------------------------

def _fused(model, runtime):
    """The model set up as GPTQBackend sets it up on CUDA (here on CPU), and its decoding step."""
    from backends.gptq.cuda_graph import GraphDecoder, fuse_residual_norms
    from backends.gptq.decode_attention import route_decode_attention
    from backends.gptq.fusion import fuse_siblings
    act_order.fold_mlp_orders(model)
    fuse_siblings(model, runtime)
    assert fuse_residual_norms(model, device_types=("cpu",)) == 2
    assert route_decode_attention(model, device_types=("cpu",)) == 2
    return act_order.presort_inputs(model), GraphDecoder(model, torch.device("cpu"), max_len=64).step


def test_an_act_order_model_decodes_without_gathers_as_with_them(tiny_llama, monkeypatch):
    """Decoding steps run every projection without a gather, prompts every one but o_proj (their
    attention is HF's, in its natural order), and both give the logits of the same model with every
    gather inside the kernels. With the route's prompts off, a prompt gathers for q/k/v and gate/up."""
    runtime = KernelRuntime(tune=False)
    model = _quantize(copy.deepcopy(tiny_llama), runtime)
    reference = greedy_logits(torch_generation._default_forward(model), PROMPT, 3)
    sorted_producers, step = _fused(model, runtime)
    assert sorted_producers == 6  # per layer: input norm, post-attention norm, attention
    log = MatmulLog(runtime, monkeypatch)
    got = greedy_logits(step, PROMPT, 3, tokens=reference.argmax(-1).tolist())
    assert _rel(got, reference) < 1e-4
    assert torch.equal(got.argmax(-1), reference.argmax(-1))
    # per layer: q/k/v (fused, N 128), o_proj (64), gate/up (fused, 192), down_proj (64)
    prompt_calls = [(128, False), (64, True), (192, False), (64, False)] * 2
    step_calls = [(128, False), (64, False), (192, False), (64, False)] * 2
    assert log == prompt_calls + step_calls * 3
    from backends.gptq.cuda_graph import residual_route
    residual_route(model).prompts = False
    log.clear()
    again = greedy_logits(step, PROMPT, 0)  # the prompt alone
    assert log == [(128, True), (64, True), (192, True), (64, False)] * 2
    assert _rel(again, reference[:1]) < 1e-4


def test_siblings_with_different_orders_keep_their_gathers(tiny_llama, monkeypatch):
    """q/k/v quantized with different perms (no shared Hessian): their norm writes its natural order
    and each projection gathers its own; the model still decodes as before."""
    runtime = KernelRuntime(tune=False)
    seeds = dict(SHARED, k_proj=7)
    model = _quantize(copy.deepcopy(tiny_llama), runtime, seeds)
    reference = greedy_logits(torch_generation._default_forward(model), PROMPT, 2)
    sorted_producers, step_fn = _fused(model, runtime)
    assert sorted_producers == 4  # the post-attention norms and the attention
    log = MatmulLog(runtime, monkeypatch)
    got = greedy_logits(step_fn, PROMPT, 2, tokens=reference.argmax(-1).tolist())
    assert _rel(got, reference) < 1e-4
    step = [(64, True), (32, True), (32, True), (64, False), (192, False), (64, False)] * 2
    assert log[-len(step):] == step


def test_a_row_sorted_for_another_reader_is_put_back(tiny_llama):
    runtime = KernelRuntime(tune=False)
    linear = tiny_llama.model.layers[0].self_attn.q_proj
    layer = _quant_linear(linear, "q_proj", runtime, seed=1)
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(2))
    expected = layer(x)
    other = torch.randperm(64, generator=torch.Generator().manual_seed(3)).to(torch.int32)
    sorted_x = act_order.mark_sorted(x[..., other.long()].contiguous(), other)
    assert torch.equal(layer(sorted_x), expected)
    own = layer.input_perm()
    assert _rel(layer(act_order.mark_sorted(x[..., own.long()].contiguous(), own)), expected) < 1e-5


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
