"""The warpgroup-MMA kernel (mode 9, backends/gptq/gluon_wgmma.py) against a float64 reference of the
dequantized weights on an sm_90 GPU, at 2-16 rows, every split down to one tile; on CPU, the configs
offered and the inputs refused. Its compile for
sm_90 is checked without a GPU in test_kernels_compile.py."""
from __future__ import annotations

import pytest
import torch

from backends.gptq import gluon_gemv, gluon_wgmma
from backends.gptq import kernel_runtime as kr
from tests.backends.gptq.test_gluon_gemv import _layer, assert_configs_match_float64


def test_configs_offered_fit_the_kernel():
    """16-row bucket only (x is padded to 16 rows; at one row it was slower than mode 8 on an H200), one
    warpgroup, whole 64-column blocks, the longest tile a group allows."""
    layer, _ = _layer(4096, 1024, 4, 128, False, "cpu", 0)
    configs = kr._gluon_wgmma_candidates(layer, 16, kr.valid_block_ks(layer), sms=132)
    assert configs and all(c.mode == 9 and c.block_m == 16 and c.num_warps == 4 for c in configs)
    assert all(gluon_wgmma.valid(4, c.block_k, c.block_n, 4) and c.block_k == 128 for c in configs)
    assert {c.block_n for c in configs} == {128, 256} and any(c.split_k > 1 for c in configs)
    assert kr._gluon_wgmma_candidates(layer, 1, kr.valid_block_ks(layer), 132) == []  # one row: modes 4 and 8
    two, _ = _layer(4096, 1024, 2, 64, False, "cpu", 0)
    assert {c.block_k for c in kr._gluon_wgmma_candidates(two, 16, kr.valid_block_ks(two), 132)} == {64}
    three, _ = _layer(4096, 1024, 3, 128, False, "cpu", 0)
    assert kr._gluon_wgmma_candidates(three, 16, kr.valid_block_ks(three), 132) == []
    assert not gluon_wgmma.valid(4, 128, 128, 2) and not gluon_wgmma.valid(4, 128, 32, 4)
    assert not gluon_wgmma.valid(3, 128, 128, 4)  # mode 8 reads 3-bit blocks; this kernel does not


def test_offered_for_2_bits_at_16_rows_and_for_4_bits_only_by_name():
    """It won at 2 bits (4096x11008, 16 rows) and tied or lost at 4 on an H200 (bench/RESULTS.md), and it
    runs only on sm_90."""
    gluon = kr.gluon_kernels_available()
    two, _ = _layer(4096, 1024, 2, 64, False, "cpu", 1)
    four, _ = _layer(4096, 1024, 4, 128, False, "cpu", 1)
    assert (9 in kr.KernelRuntime.modes(16, two, torch.float16)) == gluon
    assert 9 not in kr.KernelRuntime.modes(1, two, torch.float16)
    assert 9 not in kr.KernelRuntime.modes(16, four, torch.float16)
    assert (9 in kr.KernelRuntime.modes(16, four, torch.float16, every=True)) == gluon
    assert not kr.hopper("cpu") and not kr.hopper(None)
    assert not any(c.mode == 9 for c in kr.KernelRuntime().candidates(16, two, "cpu"))  # not sm_90


def test_every_split_keeps_two_tiles():
    """Programs of a single K tile computed wrong results on an H200: no config offered has one, including
    a short last split."""
    assert gluon_wgmma.splits_of_two_tiles(32, 16) and gluon_wgmma.splits_of_two_tiles(8, 1)
    assert not gluon_wgmma.splits_of_two_tiles(32, 32)  # one tile each
    assert not gluon_wgmma.splits_of_two_tiles(7, 3)  # 3, 3 and a last split of 1
    assert gluon_wgmma.splits_of_two_tiles(8, 3)  # 3, 3, 2
    for K in (1024, 4096, 11008, 14336):
        layer, _ = _layer(K, 1024, 4, 128, False, "cpu", 2)
        for c in kr._gluon_wgmma_candidates(layer, 16, kr.valid_block_ks(layer), sms=132):
            assert gluon_wgmma.splits_of_two_tiles(K // c.block_k, c.split_k), c


def test_inputs_it_does_not_take_are_refused():
    layer, _ = _layer(256, 128, 4, 128, False, "cpu", 1)
    cfg = kr.GemmConfig("fused", 16, 128, 128, 1, 4, 1, mode=9)
    x = torch.zeros(16, 256, dtype=torch.float16)
    assert not gluon_wgmma.supports(x, layer, cfg)  # not on CUDA
    with pytest.raises(ValueError, match="mode 9"):
        kr.launch_fused(x, layer, cfg)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs an sm_90 GPU (wgmma; Gluon kernels have no interpreter)")
@pytest.mark.parametrize("K,N,bits,group,act", [(4096, 1024, 4, 128, False), (2048, 512, 2, 64, False),
                                                (2048, 256, 4, -1, False), (1024, 768, 4, 64, True),
                                                (11008, 512, 4, 128, False), (1024, 512, 2, 128, True)])
def test_matches_float64_over_rows_splits_and_tiles(K, N, bits, group, act):
    if not gluon_wgmma.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    layer, ref = _layer(K, N, bits, group, act, "cuda", K + N + bits)
    ref = ref.cuda()
    runtime = kr.KernelRuntime(tune=False)
    sms = kr.sm_count("cuda")
    configs = kr._gluon_wgmma_candidates(layer, 16, kr.valid_block_ks(layer), sms)
    bk = min(gluon_gemv.chunk(bits), max(kr.valid_block_ks(layer)))
    configs += [kr.GemmConfig("fused", 16, 64, bk, 1, 4, 1, mode=9),  # one split; odd splits; two tiles a split
                kr.GemmConfig("fused", 16, 128, bk, 3, 4, 1, mode=9),
                kr.GemmConfig("fused", 16, 256, bk, K // bk // 2, 4, 1, mode=9)]
    assert all(gluon_wgmma.splits_of_two_tiles(K // c.block_k, c.split_k) for c in configs)
    assert_configs_match_float64(layer, ref, configs, act, runtime)  # all 16-row configs: 2, 8, 9, 16 rows
