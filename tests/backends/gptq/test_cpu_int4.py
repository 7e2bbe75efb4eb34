"""4-bit GPTQ layers on CPU through torch's packed int4 kernel (backends/gptq/cpu_int4.py): against a float64
reference of the dequantized weights for every group form (sizes the kernel takes, one group, a short last
group, act-order, asymmetric v2 zeros), many rows through the exactly dequantized weights, the checkpoint's
exact weights read back out of the packed layout, and the layers it leaves to the other CPU paths."""
from __future__ import annotations

import pytest
import torch

from backends.gptq import cpu_int4
from backends.gptq import format as fmt

pytestmark = pytest.mark.skipif(not cpu_int4.available(), reason="this torch has no CPU packed int4 kernel")


def _checkpoint_layer(K, N, group, act, checkpoint_format="gptq", bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = fmt.num_groups(K, group)
    codes = torch.randint(0, 1 << bits, (K, N), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 1 << bits, (G, N), generator=g, dtype=torch.int32)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.002).half()
    g_idx = fmt.default_g_idx(K, group)
    if act:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    qw, qz = fmt.pack_qweight(codes, bits), fmt.pack_qzeros(zeros, bits, checkpoint_format)
    ref = fmt.dequantize(qw, qz, scales, g_idx, bits, checkpoint_format, dtype=torch.float64)  # [K, N]
    return (qw, qz, scales, g_idx), ref


CASES = [  # K, N, group, act-order, checkpoint format
    (256, 64, 128, False, "gptq"),
    (512, 48, 32, True, "gptq"),        # act-order: rows sorted by group, x gathered by the same perm
    (576, 64, 128, False, "gptq_v2"),   # the default model's K: a short last group (run as groups of 64)
    (768, 32, -1, False, "gptq"),       # one group: its scales repeated over groups of 256
    (256, 80, 64, True, "gptq_v2"),     # 16 columns past the last 64-column block of the packed layout
    (128, 592, 128, False, "gptq"),     # three runs of dequantized columns, the last with 16 past its blocks
]
WIDTH_CASES = [  # bits, K, N, group, act-order, checkpoint format: 2- and 3-bit codes held as 4-bit ones
    (2, 256, 64, 64, False, "gptq_v2"),   # EfficientQAT's w2g64 (asymmetric v2)
    (3, 384, 96, 128, True, "gptq"),
    (3, 256, 64, 128, False, "gptq_v2"),  # EfficientQAT's w3g128
]


@pytest.mark.parametrize("K,N,group,act,checkpoint_format", CASES)
def test_matches_float64_reference_from_bf16_activations(K, N, group, act, checkpoint_format):
    packed, ref = _checkpoint_layer(K, N, group, act, checkpoint_format, seed=K + N)
    weight = cpu_int4.make_int4_weight(*packed, 4, group, checkpoint_format)
    assert weight is not None and (weight.perm is not None) == act
    assert weight.K == K and weight.N == N and weight.group_size in cpu_int4.GROUP_SIZES
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for M in (1, 5):
            x = torch.randn(M, K, generator=g).to(dtype)
            y = weight.matmul(x)
            assert y.dtype == dtype and y.shape == (M, N)
            want = x.double() @ ref
            err = ((y.double() - want).norm() / want.norm()).item()
            assert err < 1e-2, (dtype, M, err)  # bf16 activations and scales: ~2.5e-3 measured


@pytest.mark.parametrize("K,N,group,act,checkpoint_format", CASES)
def test_many_rows_run_through_the_exactly_dequantized_weights(K, N, group, act, checkpoint_format):
    """From DEQUANTIZE_ROWS rows on (prefill, perplexity windows) the layer is dequantized a run of columns at
    a time in fp32: as exact as the fp32 copy (the kernel's bf16 path is ~2.5e-3 off), in x's dtype."""
    packed, ref = _checkpoint_layer(K, N, group, act, checkpoint_format, seed=K + 2 * N)
    weight = cpu_int4.make_int4_weight(*packed, 4, group, checkpoint_format)
    x = torch.randn(cpu_int4.DEQUANTIZE_ROWS, K, generator=torch.Generator().manual_seed(2))
    want = x.double() @ ref
    y = weight.matmul(x)
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert ((y.double() - want).norm() / want.norm()).item() < 1e-6
    few = weight.matmul(x[:cpu_int4.DEQUANTIZE_ROWS - 1])  # the kernel: bf16, so measurably further off
    assert 1e-4 < ((few.double() - want[:-1]).norm() / want[:-1].norm()).item() < 1e-2
    y16 = weight.matmul(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert ((y16.double() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("K,N,group,act,checkpoint_format", CASES)
def test_reads_the_checkpoints_exact_weights_back(K, N, group, act, checkpoint_format):
    """dense() is the checkpoint's own dequantization (fp16 scales, the true zeros, rows in the checkpoint's
    order), not the kernel's bf16 rounding of it: the codes read back out of the packed layout."""
    packed, ref = _checkpoint_layer(K, N, group, act, checkpoint_format, seed=K * 3 + N)
    weight = cpu_int4.make_int4_weight(*packed, 4, group, checkpoint_format)
    assert torch.equal(weight.dense(torch.float64), ref.t())


@pytest.mark.parametrize("N", [16, 48, 64, 80, 112, 192, 336])
def test_codes_read_out_of_the_kernels_own_layout(N):
    """codes() reads the layout `_convert_weight_to_int4pack_for_cpu` writes: whole 64-column blocks and the
    columns past them, for any N the kernel takes (a torch that changed its layout fails here)."""
    codes = torch.randint(0, 16, (96, N), generator=torch.Generator().manual_seed(N), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
    weight = cpu_int4.Int4Weight(packed=packed, scales_and_offsets=torch.empty(0), group_size=32,
                                 scales=torch.empty(0), zeros=torch.empty(0), rows=32, perm=None, K=96, N=N)
    assert torch.equal(weight.codes(), codes)


def test_packed_layers_hold_an_eighth_of_a_dense_fp32_copy():
    packed, _ = _checkpoint_layer(1024, 256, 128, False)
    weight = cpu_int4.make_int4_weight(*packed, 4, 128, "gptq")
    assert weight.nbytes() < 1024 * 256 * 4 / 7  # codes at 4 bits + bf16 scale/offset pairs + fp16 scales


def test_kernel_group_sizes():
    assert cpu_int4.kernel_group_size(576, 128) == 64  # a short last group of 64
    assert cpu_int4.kernel_group_size(4096, 4096) == 256  # one group
    assert cpu_int4.kernel_group_size(4096, 128) == 128
    assert cpu_int4.kernel_group_size(160, 40) is None  # no size the kernel takes divides 40


@pytest.mark.parametrize("bits,K,N,group,act,checkpoint_format", WIDTH_CASES)
def test_two_and_three_bit_codes_run_as_four_bit_ones(bits, K, N, group, act, checkpoint_format):
    packed, ref = _checkpoint_layer(K, N, group, act, checkpoint_format, bits=bits, seed=bits * K + N)
    weight = cpu_int4.make_int4_weight(*packed, bits, group, checkpoint_format)
    assert weight is not None and cpu_int4.takes(bits, K, N, group)
    assert torch.equal(weight.dense(torch.float64), ref.t())
    assert int(weight.codes().max()) < 1 << bits
    g = torch.Generator().manual_seed(3)
    for M, tolerance in ((1, 5e-3), (5, 5e-3), (cpu_int4.DEQUANTIZE_ROWS, 1e-6)):  # measured ~2.5e-3 at 1 and 5
        x = torch.randn(M, K, generator=g)
        want = x.double() @ ref
        assert ((weight.matmul(x).double() - want).norm() / want.norm()).item() < tolerance


@pytest.mark.parametrize("bits,K,N,group", [(8, 256, 64, 128), (4, 256, 40, 128), (4, 160, 64, 40),
                                            (2, 160, 64, 40)])
def test_layers_it_cannot_run_are_left_to_the_other_paths(bits, K, N, group):
    packed, _ = _checkpoint_layer(K, N, group, False, bits=bits)
    assert cpu_int4.make_int4_weight(*packed, bits, group, "gptq") is None
    assert not cpu_int4.takes(bits, K, N, group)


@pytest.mark.parametrize("K,N", [(64, 16), (128, 64), (256, 80), (576, 1536), (256, 112)])
@pytest.mark.parametrize("act", [False, True])
def test_four_bit_words_are_rearranged_into_the_kernels_layout(K, N, act):
    """4-bit words go into the kernel's layout by word-wide masks and shifts (9x faster than unpacking), byte
    for byte what torch's own converter writes from the unpacked codes, act-order rows included."""
    g = torch.Generator().manual_seed(K + N)
    codes = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
    perm = torch.randperm(K, generator=g) if act else None
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        (codes if perm is None else codes[perm]).t().contiguous(), 1)
    assert torch.equal(cpu_int4._repack_words(fmt.pack_qweight(codes, 4), K, perm), want)


def test_wide_layers_pack_a_run_of_columns_at_a_time():
    """Packing 64 columns at a time (wide layers pack 2048 at a time, so their int32 codes never all exist at
    once) gives the kernel's layout of packing them all at once, the last run narrower."""
    packed, _ = _checkpoint_layer(256, 80, 64, True, seed=5)
    whole = cpu_int4.make_int4_weight(*packed, 4, 64, "gptq", columns_per_pack=1 << 20)
    runs = cpu_int4.make_int4_weight(*packed, 4, 64, "gptq", columns_per_pack=64)
    assert torch.equal(whole.packed, runs.packed) and torch.equal(whole.scales_and_offsets, runs.scales_and_offsets)
