"""The Gluon tensor-core kernel (mode 7, backends/gptq/gluon_mma.py) against a float64 reference of the
dequantized weights, on CUDA (Gluon kernels do not run on Triton's interpreter; their compile for sm_80
and sm_90 and their SASS are checked without a GPU in test_kernels_compile.py). On CPU: which inputs the
kernel takes and which configs the tuner offers it (and, next to them, the one-row kernel's wide tiles)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from backends.gptq import format as fmt
from backends.gptq import gluon_mma
from backends.gptq import kernel_runtime as kr
from backends.gptq.quant_linear import make_kernel_layer
from tests.backends.gptq.support import assert_fused_matches_float64


def _layer(K, N, group, act, device, seed):
    g = torch.Generator().manual_seed(seed)
    G = fmt.num_groups(K, group)
    codes = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 16, (G, N), generator=g, dtype=torch.int32)  # v1 stores z - 1
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.002).half()
    g_idx = fmt.default_g_idx(K, group)
    if act:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    qw, qz = fmt.pack_qweight(codes, 4), fmt.pack_qzeros(zeros, 4, "gptq")
    ref = fmt.dequantize(qw, qz, scales, g_idx, 4, "gptq", dtype=torch.float64)  # [K, N]
    return make_kernel_layer(qw, qz, scales, g_idx, 4, group, "gptq", device), ref


def test_configs_offered_fit_the_kernel():
    layer, _ = _layer(4096, 1024, 128, False, "cpu", 0)
    configs = kr._gluon_mma_candidates(layer, 16, kr.valid_block_ks(layer), sms=132)
    assert configs and all(c.mode == 7 and c.block_m == 16 for c in configs)
    for c in configs:
        assert gluon_mma.valid(c.block_k, c.block_n, c.num_warps)
        assert c.block_n // c.num_warps in (32, 64)  # the sweeps' winners: 32-64 columns per warp
    # the untuned first choice: 64 columns on one warp, about 8 programs per SM
    first = configs[0]
    assert (first.block_n, first.block_k, first.num_warps) == (64, 128, 1)
    assert first.split_k == kr._split_for(layer, 64, 128, 8 * 132)
    assert any(c.split_k > 1 for c in configs) and any(c.split_k != first.split_k for c in configs)
    assert kr._gluon_mma_candidates(layer, 32, kr.valid_block_ks(layer), 132) == []  # 16 rows at most
    assert kr._gluon_mma_candidates(replace(layer, bits=3), 16, [128], 132) == []  # 4-bit only
    small_groups = replace(layer, group_size=32)
    assert {c.block_k for c in kr._gluon_mma_candidates(small_groups, 16, [32], 132)} == {32}


def test_rows_are_read_as_int32_pairs_only_where_aligned():
    """The kernel reads x as int32 pairs: a view at an odd element offset, an odd row stride or a
    transposed view is copied first; an aligned contiguous x is passed as it is (no copy per call)."""
    x = torch.arange(4 * 66, dtype=torch.float16).reshape(4, 66)
    assert kr.paired_rows(x) is x
    odd_stride = torch.zeros(4, 65, dtype=torch.float16)[:, :64]
    for view in (x[:, 1:65], odd_stride, x.t().contiguous().t()[:, :64]):
        fixed = kr.paired_rows(view)
        assert fixed.stride(1) == 1 and fixed.stride(0) % 2 == 0 and fixed.data_ptr() % 4 == 0
        assert torch.equal(fixed, view)
    offset = x.flatten()[1:].reshape(-1)[:4 * 64].reshape(4, 64)  # rows contiguous, start 2 bytes in
    assert offset.data_ptr() % 4 == 2
    fixed = kr.paired_rows(offset)
    assert fixed.data_ptr() % 4 == 0 and torch.equal(fixed, offset)


def test_act_order_is_offered_only_with_the_gather_first():
    """The tuner keeps one config for 2-16 rows; gathering x inside the kernel was 2.5x slower at 16 rows."""
    layer, _ = _layer(1024, 512, 128, True, "cpu", 2)
    assert layer.perm is not None
    mode7 = [c for c in kr.KernelRuntime().candidates(16, layer) if c.mode == 7]
    assert all(c.gather_x for c in mode7) and (bool(mode7) == kr.gluon_kernels_available())


def test_inputs_it_does_not_take_are_refused():
    layer, _ = _layer(256, 128, 128, False, "cpu", 1)
    cfg = kr.GemmConfig("fused", 16, 128, 128, 1, 4, 1, mode=7)
    x = torch.zeros(4, 256, dtype=torch.float16)
    assert not gluon_mma.supports(x, layer, cfg)  # not on CUDA
    with pytest.raises(ValueError, match="mode 7"):
        kr.launch_fused(x, layer, cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Gluon kernels have no interpreter)")
@pytest.mark.parametrize("K,N,group,act", [(4096, 1024, 128, False), (1024, 512, 32, False), (2048, 256, -1, False),
                                           (1024, 768, 64, True), (11008, 256, 128, False)])
def test_matches_float64_over_rows_splits_and_tiles(K, N, group, act):
    if not gluon_mma.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    layer, ref = _layer(K, N, group, act, "cuda", K + N)
    ref = ref.cuda()
    runtime = kr.KernelRuntime(tune=False)
    configs = kr._gluon_mma_candidates(layer, 16, kr.valid_block_ks(layer), kr.sm_count("cuda"))
    bk = min(64, max(kr.valid_block_ks(layer)))
    # one split, and odd splits of 64-row tiles (the last split shorter than the others)
    configs += [kr.GemmConfig("fused", 16, 64, bk, 1, 4, 1, mode=7), kr.GemmConfig("fused", 16, 32, bk, 3, 1, 1, mode=7)]
    if act:  # act-order: x gathered by the runtime first
        configs = [replace(c, gather_x=True) for c in configs]
    assert any(c.split_k > 1 for c in configs)
    g = torch.Generator(device="cuda").manual_seed(7)
    bias = torch.randn(N, generator=g, device="cuda").half()
    for cfg in configs:
        assert_fused_matches_float64(layer, ref, cfg, (2, 3, 8, 16), bias, runtime.scratch, g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Gluon kernels have no interpreter)")
def test_a_view_of_x_two_bytes_off_alignment_gives_the_same_result():
    """Rows read as int32 pairs: a view starting one element into a wider buffer is realigned first
    (kernel_runtime.paired_rows), not read misaligned."""
    if not gluon_mma.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    K, N = 1024, 256
    layer, ref = _layer(K, N, 128, False, "cuda", 3)
    wide = torch.randn(5, K + 2, device="cuda").half()
    x = wide[:, 1:K + 1]
    assert x.data_ptr() % 4 == 2
    cfg = kr._gluon_mma_candidates(layer, 16, kr.valid_block_ks(layer), kr.sm_count("cuda"))[0]
    y = kr.launch_fused(x, layer, cfg, scratch=kr.SplitScratch())
    want = x.double() @ ref.cuda()
    assert float((y.double() - want).norm() / want.norm()) < 2e-3


def test_one_row_candidates_include_the_wide_tiles_of_the_h200_sweep(monkeypatch):
    """The two fastest half2 GEMV configs of the wider H200 sweep on 8192x28672 (bench.gemv_sweep,
    bench/RESULTS.md 2026-12-03: 1024 columns on 8 warps at 2 programs per SM, 512 x 32 on 4 warps at 6)
    are offered at one row, at the split counts that were timed (9 and 14), after the heuristic default."""
    monkeypatch.setattr(kr, "sm_count", lambda device=None: 132)
    small, _ = _layer(256, 128, 128, False, "cpu", 3)
    layer = replace(small, K=8192, N=28672)
    offered = kr.KernelRuntime().candidates(1, layer, dtype=torch.float16)
    wide = kr.GemmConfig("fused", 1, 1024, 64, 9, 8, 2, mode=4)
    narrow_k = kr.GemmConfig("fused", 1, 512, 32, 14, 4, 2, mode=4)
    assert wide in offered and narrow_k in offered
    assert offered.index(wide) > 0
