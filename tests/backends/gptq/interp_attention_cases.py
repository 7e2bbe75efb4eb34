"""The decoding attention kernel under TRITON_INTERPRET=1 (run by test_decode_attention.py in a fresh
interpreter): against a float64 reference at many positions, head layouts, head sizes and split
counts, with the cache poisoned (NaN) at and after the token's slot so a read of a slot it must not
read shows; and a whole model decoding through the routed attention against the HF model."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_decode_attention.py"

from backends.gptq.attention_kernel import INTERPRETED  # noqa: E402
from backends import torch_generation  # noqa: E402
from backends.gptq.decode_attention import (decode_attention, decode_route, reference_attention,  # noqa: E402
                                            route_decode_attention)
from backends.gptq.kernel_runtime import SplitScratch  # noqa: E402
from backends.torch_generation import greedy_logits  # noqa: E402


def test_the_kernel_is_interpreted():
    assert INTERPRETED


def _case(hq, hkv, dim, max_len, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, 1, dim, generator=g).to(dtype)
    k = torch.randn(1, hkv, 1, dim, generator=g).to(dtype)
    v = torch.randn(1, hkv, 1, dim, generator=g).to(dtype)
    k_cache = torch.randn(1, hkv, max_len, dim, generator=g).to(dtype)
    v_cache = torch.randn(1, hkv, max_len, dim, generator=g).to(dtype)
    return q, k, v, k_cache, v_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq, hkv, dim", [(4, 4, 16), (6, 2, 64), (3, 1, 80)])
@pytest.mark.parametrize("pos, splits", [(0, 1), (1, 4), (63, 1), (64, 3), (65, 4), (200, 4), (255, 2)])
def test_kernel_matches_the_reference(dtype, hq, hkv, dim, pos, splits):
    max_len = 256
    q, k, v, k_cache, v_cache = _case(hq, hkv, dim, max_len, dtype, seed=pos * 31 + hq)
    k_cache[:, :, pos:] = float("nan")  # the token's slot and everything after: never read
    v_cache[:, :, pos:] = float("nan")
    before_k, before_v = k_cache.clone(), v_cache.clone()
    scratch = SplitScratch()
    scaling = dim ** -0.5
    out = decode_attention(q, k, v, k_cache, v_cache, torch.tensor([pos]), scaling, scratch, splits=splits)
    expected = reference_attention(q, k, v, before_k, before_v, pos, scaling)
    assert out.shape == (1, 1, hq, dim) and out.dtype == dtype
    assert not torch.isnan(out).any()
    err = float((out.double() - expected).norm() / expected.norm())
    assert err < (2e-3 if dtype == torch.float16 else 1e-5), err
    # the token's key and value were appended at its position, nothing else changed
    assert torch.equal(k_cache[:, :, pos], k[:, :, 0]) and torch.equal(v_cache[:, :, pos], v[:, :, 0])
    assert torch.equal(k_cache[:, :, :pos], before_k[:, :, :pos])
    assert torch.isnan(k_cache[:, :, pos + 1:]).all() and torch.isnan(v_cache[:, :, pos + 1:]).all()
    if scratch.tickets is not None:
        assert int(scratch.tickets.abs().sum()) == 0  # every ticket back to zero for the next layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq, hkv, dim, pos, splits", [(4, 4, 16, 0, 1), (6, 2, 64, 70, 3), (3, 1, 80, 200, 4)])
def test_rotary_inside_the_kernel(dtype, hq, hkv, dim, pos, splits):
    """q and k given before the rotary embedding, cos/sin of the position: the kernel rotates both,
    attends, and writes the rotated key to the cache."""
    from backends.gptq.decode_attention import rotate
    q, k, v, k_cache, v_cache = _case(hq, hkv, dim, 256, dtype, seed=dim + pos)
    angle = torch.linspace(0.1, 3.0, dim // 2) * (pos + 1)
    cos, sin = (torch.cat([f(angle), f(angle)]).to(dtype).view(1, 1, dim) for f in (torch.cos, torch.sin))
    k_cache[:, :, pos:] = float("nan")
    before_k, before_v = k_cache.clone(), v_cache.clone()
    out = decode_attention(q, k, v, k_cache, v_cache, torch.tensor([pos]), dim ** -0.5, SplitScratch(),
                           splits=splits, rotary=(cos, sin))
    expected = reference_attention(q, k, v, before_k, before_v, pos, dim ** -0.5, rotary=(cos, sin))
    err = float((out.double() - expected).norm() / expected.norm())
    assert err < (2e-3 if dtype == torch.float16 else 1e-5), err
    stored = k_cache[:, :, pos].double()
    assert float((stored - rotate(k, cos, sin)[:, :, 0]).abs().max()) < (1e-2 if dtype == torch.float16 else 1e-5)
    assert not torch.allclose(stored, k[:, :, 0].double())  # really rotated
    with pytest.raises(ValueError, match="rotary"):
        decode_attention(q, k, v, k_cache, v_cache, torch.tensor([pos]), 1.0, SplitScratch(),
                         rotary=(cos[..., :-2], sin[..., :-2]))


def test_splits_cover_the_cache_for_any_length():
    """Split counts that do not divide the cache and caches shorter than the splits asked for."""
    for max_len, splits in [(100, 3), (17, 4), (300, 7)]:
        q, k, v, k_cache, v_cache = _case(2, 1, 32, max_len, torch.float32, seed=max_len)
        pos = max_len - 1
        expected = reference_attention(q, k, v, k_cache, v_cache, pos, 0.2)
        out = decode_attention(q, k, v, k_cache, v_cache, torch.tensor([pos]), 0.2, SplitScratch(),
                               splits=splits)
        assert float((out.double() - expected).norm() / expected.norm()) < 1e-5, (max_len, splits)


def test_bad_shapes_are_refused():
    q, k, v, k_cache, v_cache = _case(4, 2, 16, 32, torch.float32, 0)
    with pytest.raises(ValueError, match="one token"):
        decode_attention(q.expand(2, -1, -1, -1), k, v, k_cache, v_cache, torch.tensor([3]), 1.0, SplitScratch())
    with pytest.raises(ValueError, match="heads"):
        decode_attention(q[:, :3], k, v, k_cache, v_cache, torch.tensor([3]), 1.0, SplitScratch())


def test_a_model_decodes_through_the_routed_attention_like_hf(tiny_llama):
    """The static-cache decoder with every attention module routed to the kernel gives HF's logits,
    also for a multi-token step after routed steps (the HF cache's own length is kept in step)."""
    from backends.gptq.cuda_graph import GraphDecoder
    prompt = [5, 17, 42, 7, 99, 3, 250, 11]
    extra = (8, 9, 10)
    reference = greedy_logits(torch_generation._default_forward(tiny_llama), prompt, 6, extra=extra)  # HF's dynamic cache

    routed = copy.deepcopy(tiny_llama)
    assert route_decode_attention(routed, device_types=("cpu",)) == 2
    route = decode_route(routed)
    decoder = GraphDecoder(routed, torch.device("cpu"), max_len=96)  # 96: two splits of 64 on CPU
    got = greedy_logits(decoder.step, prompt, 6, extra=extra)
    assert route.calls == 6 * 2  # every single-token step of both layers went through the kernel, prompts not
    assert float((got - reference).norm() / reference.norm()) < 1e-5
    assert torch.equal(got.argmax(-1), reference.argmax(-1))
    # routing again adds device types to the same route instead of wrapping twice
    assert route_decode_attention(routed, device_types=("meta",)) == 2
    assert decode_route(routed) is route and "meta" in route.device_types


def test_replayed_routed_steps_decode_like_hf(tiny_llama):
    """The routed attention captured and replayed (a CPU stand-in for the CUDA graph that re-runs the
    step), then a multi-token step through HF's attention: HF's logits throughout."""
    from backends.gptq.cuda_graph import GraphDecoder
    from tests.backends.gptq.support import CaptureLog
    prompt = [5, 17, 42, 7, 99, 3, 250, 11]
    reference = greedy_logits(torch_generation._default_forward(tiny_llama), prompt, 6, extra=(8, 9, 10))
    routed = copy.deepcopy(tiny_llama)
    route_decode_attention(routed, device_types=("cpu",))
    captured = CaptureLog()
    decoder = GraphDecoder(routed, torch.device("cpu"), max_len=96,
                           step_capture=captured)
    got = greedy_logits(decoder.step, prompt, 6, extra=(8, 9, 10))
    assert len(captured) == 1 and captured[0].replays == 5
    assert float((got - reference).norm() / reference.norm()) < 1e-5


@pytest.mark.parametrize("fault", ["wrong", "raises"])
def test_a_kernel_that_fails_its_first_check_hands_back_to_hf(tiny_llama, monkeypatch, caplog, fault):
    """A device whose kernel computes wrong numbers (or fails to compile) on the first routed step is
    dropped from the route, and decoding there gives HF's logits all the same."""
    import backends.gptq.decode_attention as module
    from backends.gptq.cuda_graph import GraphDecoder
    prompt = [5, 17, 42, 7, 99, 3]
    reference = greedy_logits(torch_generation._default_forward(tiny_llama), prompt, 4, extra=(8, 9))
    real = module.decode_attention

    def faulty(*args, **kwargs):
        out = real(*args, **kwargs)  # writes the cache as the kernel does
        if fault == "raises":
            raise RuntimeError("PTX compile failed")
        return out * 0.5

    monkeypatch.setattr(module, "decode_attention", faulty)
    routed = copy.deepcopy(tiny_llama)
    route_decode_attention(routed, device_types=("cpu",))
    route = decode_route(routed)
    got = greedy_logits(GraphDecoder(routed, torch.device("cpu"), max_len=64).step, prompt, 4, extra=(8, 9))
    assert "cpu" not in route.device_types and route.calls == 0
    assert "decode attention kernel off on cpu" in caplog.text
    assert ("PTX compile failed" if fault == "raises" else "relative error") in caplog.text
    assert float((got - reference).norm() / reference.norm()) < 1e-5


def test_other_devices_and_architectures_keep_the_hf_attention(tiny_llama):
    from backends.gptq.cuda_graph import GraphDecoder
    route_decode_attention(tiny_llama)  # CUDA only
    route = decode_route(tiny_llama)
    decoder = GraphDecoder(tiny_llama, torch.device("cpu"), max_len=32)
    with torch.inference_mode():
        _, state = decoder.step(torch.tensor([[1, 2, 3]]), None)
        decoder.step(torch.tensor([[4]]), state)
    assert route.calls == 0

    from transformers import Qwen3Config, Qwen3ForCausalLM
    other = Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=320))
    assert route_decode_attention(other) == 0  # Qwen3 normalises q and k: its attention is not routed


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# -- the residual add + RMSNorm kernel (norm_kernel.py) -------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, width", [(1, 64), (1, 80), (3, 96), (1, 4096)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_kernel_matches_the_hf_norm(dtype, rows, width, with_delta):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from backends.gptq import norm_kernel
    g = torch.Generator().manual_seed(rows * width)
    residual = (torch.randn(1, rows, width, generator=g) * 3).to(dtype)
    delta = torch.randn(1, rows, width, generator=g).to(dtype) if with_delta else None
    module = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.rand(width, generator=g) + 0.5)
    assert norm_kernel.supports(residual, module.weight)
    total, normed = norm_kernel.add_rms_norm(residual, delta, module.weight, module.variance_epsilon)
    expected_total = residual + delta if with_delta else residual
    assert torch.equal(total, expected_total)  # the dtype's own add: one rounding
    with torch.no_grad():
        expected = module(expected_total)
    assert normed.dtype == dtype and normed.shape == residual.shape
    assert float((normed.float() - expected.float()).abs().max()) <= (2e-3 if dtype == torch.float16 else 1e-5)
    # against float64
    t = expected_total.double()
    ref = module.weight.double() * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert float((normed.double() - ref).norm() / ref.norm()) < (1e-3 if dtype == torch.float16 else 1e-6)


def test_add_rms_norm_kernel_refuses_what_it_would_compute_differently():
    from backends.gptq import norm_kernel
    x = torch.randn(1, 1, 64, dtype=torch.float16)
    assert not norm_kernel.supports(x, torch.ones(64))  # fp32 weight: HF's output would be fp32
    assert not norm_kernel.supports(x, torch.ones(32, dtype=torch.float16))
    assert not norm_kernel.supports(torch.randn(1, 64, 2).transpose(1, 2), torch.ones(64))


def test_a_model_decodes_through_the_residual_kernel_like_the_eager_model(tiny_llama, monkeypatch):
    from backends.gptq import norm_kernel
    from backends.gptq.cuda_graph import fuse_residual_norms, residual_route
    prompt = [5, 17, 42, 7, 99, 3]
    reference = greedy_logits(torch_generation._default_forward(tiny_llama), prompt, 4)
    fused = copy.deepcopy(tiny_llama)
    assert fuse_residual_norms(fused, device_types=("cpu",)) == 2
    assert residual_route(fused).use_kernel
    calls = []
    kernel = norm_kernel.add_rms_norm
    monkeypatch.setattr(norm_kernel, "add_rms_norm", lambda *a: calls.append(a[1] is None) or kernel(*a))
    got = greedy_logits(torch_generation._default_forward(fused), prompt, 4)
    # the first call's check against torch (the first input norm), then for the prompt (its rows through
    # the kernel too) and each one-token step: the first input norm alone and two adds per layer
    assert calls == [True] + [True, False, False, False, False] * 5
    assert residual_route(fused).total is None and residual_route(fused).normed is None  # nothing held after
    assert float((got - reference).norm() / reference.norm()) < 1e-5
    assert torch.equal(got.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("fault", ["wrong", "raises"])
def test_a_residual_kernel_that_fails_its_first_check_hands_back_to_torch(tiny_llama, monkeypatch, caplog, fault):
    """An add + norm kernel that computes wrong numbers (or fails to compile) on its first call is
    switched off, and decoding gives the eager model's logits all the same."""
    from backends.gptq import norm_kernel
    from backends.gptq.cuda_graph import fuse_residual_norms, residual_route
    prompt = [5, 17, 42, 7, 99, 3]
    reference = greedy_logits(torch_generation._default_forward(tiny_llama), prompt, 4)
    real = norm_kernel.add_rms_norm

    def faulty(residual, delta, weight, eps, *order):
        if fault == "raises":
            raise RuntimeError("PTX compile failed")
        total, normed = real(residual, delta, weight, eps, *order)
        return total, normed * 0.5

    monkeypatch.setattr(norm_kernel, "add_rms_norm", faulty)
    fused = copy.deepcopy(tiny_llama)
    assert fuse_residual_norms(fused, device_types=("cpu",)) == 2
    got = greedy_logits(torch_generation._default_forward(fused), prompt, 4)
    assert not residual_route(fused).use_kernel
    assert "add + RMSNorm kernel off" in caplog.text
    assert ("PTX compile failed" if fault == "raises" else "relative error") in caplog.text
    assert float((got - reference).norm() / reference.norm()) < 1e-5


def test_a_prompt_whose_residual_kernel_is_switched_off_compiles_nothing(tiny_llama, monkeypatch):
    """A kernel that fails its first check on a prompt hands that prompt's adds to eager torch, not to
    torch.compile's form (compiled per shape: every new prompt length would cost a compile), and the
    prompt gives the eager model's logits."""
    from torch._dynamo.utils import counters
    from backends.gptq import norm_kernel
    from backends.gptq.cuda_graph import fuse_residual_norms, residual_route

    def failing(*_):
        raise RuntimeError("PTX compile failed")

    monkeypatch.setattr(norm_kernel, "add_rms_norm", failing)
    fused = copy.deepcopy(tiny_llama)
    assert fuse_residual_norms(fused, device_types=("cpu",)) == 2
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        reference = tiny_llama(input_ids=ids).logits
        got = fused(input_ids=ids).logits
    assert not residual_route(fused).use_kernel
    assert counters["stats"]["unique_graphs"] == 0
    assert float((got - reference).norm() / reference.norm()) < 1e-5


def test_the_residual_kernel_is_checked_once_then_trusted(tiny_llama, monkeypatch):
    from backends.gptq import norm_kernel
    from backends.gptq.cuda_graph import fuse_residual_norms, residual_route
    fused = copy.deepcopy(tiny_llama)
    fuse_residual_norms(fused, device_types=("cpu",))
    calls = []
    real = norm_kernel.add_rms_norm
    monkeypatch.setattr(norm_kernel, "add_rms_norm", lambda *a: calls.append(1) or real(*a))
    greedy_logits(torch_generation._default_forward(fused), [5, 17, 42], 3)
    route = residual_route(fused)
    assert route.use_kernel and route.verified == {"cpu"}
    assert len(calls) == 1 + 5 * 4  # the one check, then the first norm and four adds for the prompt and each step
