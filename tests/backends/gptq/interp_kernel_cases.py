"""The Triton kernels under TRITON_INTERPRET=1 (CPU): every bits x group x act-order combination, short
last groups, M = 1, 3, 17, fp16 and fp32 activations, against a float64 reference of the dequantized
weights, with poisoned outputs. Also: the torch (CPU) path and the kernels compute the same layer."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from backends.gptq import format as fmt
from backends.gptq import word_order
from tests.backends.gptq.support import random_packed_layer

K, N = 160, 64  # 160 = 128 + 32: a short last group at g128, 5 groups at g32


@pytest.fixture(scope="module")
def kr():
    """kernel_runtime with triton_kernels imported in interpreter mode (triton reads TRITON_INTERPRET
    when a kernel is decorated, so the module is (re)imported with the variable set, then dropped)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    for name in ("backends.gptq.triton_kernels", "backends.gptq.gather"):
        sys.modules.pop(name, None)
    importlib.import_module("backends.gptq.triton_kernels")
    from backends.gptq import kernel_runtime
    yield kernel_runtime
    for name in ("backends.gptq.triton_kernels", "backends.gptq.gather"):
        sys.modules.pop(name, None)
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def _layer(bits, gs, act, seed, checkpoint_format="gptq_v2", rows=K):
    return random_packed_layer(bits, gs, rows, N, seed, act, checkpoint_format)


def _rel(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("act", [False, True], ids=["plain", "actorder"])
@pytest.mark.parametrize("gs", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fused_kernel_matches_float64_reference(kr, bits, gs, act):
    from backends.gptq.quant_linear import make_kernel_layer
    seed = bits * 100 + (gs % 1000) + act
    packed, ref_w = _layer(bits, gs, act, seed)
    layer = make_kernel_layer(*packed, bits, gs, "gptq_v2", "cpu")
    assert (layer.perm is not None) == (act and gs != -1)  # one group: nothing to reorder
    runtime = kr.KernelRuntime(tune=False)
    gen = torch.Generator().manual_seed(seed + 1)
    for dtype in (torch.float16, torch.float32):
        for M in (1, 3, 17):
            configs = runtime.candidates(M, layer, dtype=dtype)
            fused = [c for c in configs if c.path == "fused"]
            assert fused, "no fused config for a group size the kernel supports"
            # every unpacking mode; fp16 runs its fewest K splits, fp32 its most (workspace + tickets)
            modes = {c.mode for c in fused}
            # (the unrolled kernel's M = 1 form reads 3-bit words in the checkpoint's order, not in planes)
            assert 0 in modes and (M > 1 or 3 in modes), modes
            assert M > 1 or (2 in modes) == (bits != 3), modes
            # words are re-ordered on load (8 bits for mode 8, which the interpreter cannot run, so the
            # portable kernels here read the re-ordered 8-bit words too); fp16 decoding then has the half2
            # kernels (mode 4) at 2-4 bits, here in their portable form (the interpreter cannot run their PTX)
            assert layer.interleaved
            assert 8 not in modes  # Gluon: compiled only
            assert (4 in modes) == (M == 1 and dtype == torch.float16 and bits in (2, 3, 4)), modes
            # and, for M > 1, the half2 tensor-core kernel (mode 5, first) for 2, 3 and 4 bits where a
            # tile holds four value blocks (kr.MODE5_MIN_BLOCKS): not 2 or 3 bits with groups of 32
            assert (5 in modes) == (M > 1 and dtype == torch.float16 and bits in (2, 3, 4)
                                    and not (bits in (2, 3) and gs == 32)), modes
            assert 6 not in modes  # removed: it lost to mode 5 on an H100
            assert 5 not in modes or fused[0].mode == 5, fused[0]
            pick = min if dtype == torch.float16 else max
            # act-order layers also run with the activations gathered once before a perm-free kernel,
            # and (half2 decoding) with each program staging its slice of them at its start
            kinds = {(c.mode, c.gather_x, c.stage_x) for c in fused}
            assert any(gather for _, gather, _ in kinds) == (layer.perm is not None), kinds
            assert any(stage for _, _, stage in kinds) == (layer.perm is not None and 4 in modes), kinds
            assert M == 1 or layer.perm is None or fused[0].gather_x  # M > 1: the gather leads
            picks = {pick([c for c in fused if (c.mode, c.gather_x, c.stage_x) == kind], key=lambda c: c.split_k)
                     for kind in kinds}
            assert dtype == torch.float16 or any(c.split_k > 1 for c in picks)
            for cfg in picks:
                x = torch.randn(M, K, generator=gen).to(dtype)  # fresh inputs for every run
                ref = x.double() @ ref_w
                out = torch.full((M, N), float("nan"), dtype=dtype)
                y = kr.launch_fused(x, layer, cfg, out=out)
                assert y.data_ptr() == out.data_ptr()
                assert not torch.isnan(y).any(), f"unwritten outputs with {cfg}"
                err = _rel(y, ref)
                assert err < 1e-2, f"M={M} {dtype} {cfg}: relative error {err:.2e}"


@pytest.mark.parametrize("bits,gs,act", [(4, 32, False), (2, 32, True), (3, 32, True)])
def test_half2_kernels_with_splits(kr, bits, gs, act):
    """The half2 kernels over splits of several tiles (the words loaded ahead at a split's end must read
    nothing), of one tile, and more than eight splits give the reference result; 3 bits with act-order too."""
    from backends.gptq.quant_linear import make_kernel_layer
    packed, ref_w = _layer(bits, gs, act, seed=40 + bits)
    layer = make_kernel_layer(*packed, bits, gs, "gptq_v2", "cpu")
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(bits)).half()
    ref = x.double() @ ref_w
    # K = 160: 5 tiles of 32 rows (a tile never straddles a group of 32); at 2 and 4 bits also 10 tiles of
    # 16, split 10 ways (the last split sums the partials eight at a time: a second chunk)
    # 32 columns per tile: whole tiles (the kernel runs without bounds masks); 128: a partial tile (masks)
    configs = [kr.GemmConfig("fused", 1, bn, 32, split, 4, mode=4) for split in (1, 2, 5) for bn in (32, 128)]
    if act:  # each program gathers its split's slice of x once (one split, two, five)
        configs += [kr.GemmConfig("fused", 1, bn, 32, split, 4, mode=4, stage_x=True)
                    for split in (1, 2, 5) for bn in (32, 128)]
    if bits != 3:
        configs += [kr.GemmConfig("fused", 1, 32, 16, 10, 4, mode=mode) for mode in (3, 4)]
    configs.append(kr.GemmConfig("fused", 1, 32, 32, 2, 4, mode=4, max_registers=64))  # a launch with maxnreg
    assert {kr.whole_tiles(layer, c) for c in configs} == {True, False}
    scratch = kr.SplitScratch()
    for cfg in configs:
        scratch.sorted_x(K, "cpu").fill_(float("nan"))  # a staged slice must be written by the kernel itself
        y = kr.launch_fused(x, layer, cfg, out=torch.full((1, N), float("nan"), dtype=torch.float16),
                            scratch=scratch)
        assert not torch.isnan(y).any(), cfg
        assert _rel(y, ref) < 1e-2, cfg
    # x viewed 2 values into a wider row: contiguous, but only 4-byte aligned; the kernel reads its pairs
    # two at a time (8 bytes), so the runtime hands it an aligned copy
    wide = torch.cat([torch.zeros(1, 2, dtype=torch.float16), x], dim=1)[:, 2:]
    assert wide.is_contiguous() and wide.data_ptr() % 8 == 4
    assert kr.aligned_row(wide).data_ptr() % 8 == 0 and torch.equal(kr.aligned_row(wide), x)
    y = kr.launch_fused(wide, layer, configs[0], scratch=scratch)
    assert _rel(y, ref) < 1e-2


@pytest.mark.parametrize("act", [False, True], ids=["plain", "actorder"])
def test_half2_4bit_kernel_with_an_odd_number_of_word_rows(kr, act):
    """The 4-bit half2 kernel sums two words per fp16 chain. K = 136 is 17 word rows, so the last
    chain has one word: the missing word and its activations must count as zero. x is a view into a
    row poisoned with NaN past K, so reading x past K shows up in the output."""
    from backends.gptq.quant_linear import make_kernel_layer
    rows = 136
    packed, ref_w = _layer(4, -1, act, seed=77, rows=rows)
    layer = make_kernel_layer(*packed, 4, -1, "gptq_v2", "cpu")
    buffer = torch.full((1, rows + 64), float("nan"), dtype=torch.float16)
    buffer[:, :rows] = torch.randn(1, rows, generator=torch.Generator().manual_seed(5)).half()
    x = buffer[:, :rows]
    ref = x.double() @ ref_w
    configs = [kr.GemmConfig("fused", 1, bn, bk, split, 4, mode=4) for split in (1, 2) for bn in (32, 64)
               for bk in (32, 64)]
    assert not any(kr.whole_tiles(layer, c) for c in configs)
    for cfg in configs:
        y = kr.launch_fused(x, layer, cfg, out=torch.full((1, N), float("nan"), dtype=torch.float16))
        assert not torch.isnan(y).any(), cfg
        assert _rel(y, ref) < 1e-2, (cfg, _rel(y, ref))


@pytest.mark.parametrize("act", [False, True], ids=["plain", "actorder"])
@pytest.mark.parametrize("bits", [4, 2, 3])
def test_tensor_core_kernel_whole_and_partial_tiles(kr, act, bits):
    """The half2 tensor-core kernel (mode 5) at 3 and 16 rows, over 1, 2 and 5 splits, with whole tiles
    (no bounds masks) and with a partial column tile or a short last K tile (masks); 4 bits (one tile
    of eight values per word), 2 bits (two: values 0-7 and 8-15 of each word) and 3 bits (four per
    32-value block of three words), four blocks per tile (kr.MODE5_MIN_BLOCKS: K = 640 in five groups of
    128 at 3 bits, K = 320 in five of 64 at 2 bits). Fewer blocks are refused, not run."""
    from backends.gptq.quant_linear import make_kernel_layer
    gs = {2: 64, 3: 128, 4: 32}[bits]
    bk, rows = gs, 5 * gs
    packed, ref_w = _layer(bits, gs, act, seed=60 + act + bits, rows=rows)
    layer = make_kernel_layer(*packed, bits, gs, "gptq_v2", "cpu")
    configs = [kr.GemmConfig("fused", 16, bn, bk, split, 4, mode=5) for split in (1, 2, 5) for bn in (32, 128)]
    short_bk = 128 if bits == 3 else 64
    short_packed, short_ref = _layer(bits, -1, False, seed=62 + bits)
    short_k = make_kernel_layer(*short_packed, bits, -1, "gptq_v2", "cpu")
    assert kr.whole_tiles(layer, configs[0]) and not kr.whole_tiles(layer, configs[1])
    short_cfg = kr.GemmConfig("fused", 16, 32, short_bk, 2, 4, mode=5)
    assert not kr.whole_tiles(short_k, short_cfg)  # 160 = 2.5 x 64 = 1.25 x 128
    two_blocks = kr.GemmConfig("fused", 16, 32, 2 * word_order.values_per_block(bits), 1, 4, mode=5)
    with pytest.raises(ValueError, match="at least 4 value blocks"):
        kr.launch_fused(torch.zeros(3, K).half(), short_k, two_blocks)
    cases = [(layer, ref_w, c) for c in configs]
    cases.append((short_k, short_ref, short_cfg))
    gen = torch.Generator().manual_seed(61)
    for lay, ref_weights, cfg in cases:
        for M in (3, 16):
            x = torch.randn(M, lay.K, generator=gen).half()
            y = kr.launch_fused(x, lay, cfg, out=torch.full((M, N), float("nan"), dtype=torch.float16))
            assert not torch.isnan(y).any(), cfg
            assert _rel(y, x.double() @ ref_weights) < 1e-2, (M, cfg)


@pytest.mark.parametrize("act", [False, True], ids=["plain", "actorder"])
@pytest.mark.parametrize("gs", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_kernel_and_prefill_path(kr, bits, gs, act):
    from backends.gptq.quant_linear import make_kernel_layer
    packed, ref_w = _layer(bits, gs, act, seed=bits + 7)
    layer = make_kernel_layer(*packed, bits, gs, "gptq_v2", "cpu")
    w = torch.full((K, N), float("nan"), dtype=torch.float32)
    kr.launch_dequant(layer, w)  # rows written back to their original (act-order) places
    assert not torch.isnan(w).any()
    assert torch.allclose(w.double(), ref_w, rtol=0, atol=1e-6)
    if layer.perm is not None:  # and in the kernels' sorted order on request
        ws = kr.launch_dequant(layer, torch.full((K, N), float("nan")), original_order=False)
        assert torch.allclose(ws.double(), ref_w[layer.perm.long()], rtol=0, atol=1e-6)
    runtime = kr.KernelRuntime(tune=False)
    x = torch.randn(80, K, generator=torch.Generator().manual_seed(3)).half()  # large M: dequant + matmul
    assert runtime.candidates(80, layer)[0].path == "dequant"
    y = runtime.matmul(x.float(), layer)
    assert _rel(y, x.double() @ ref_w) < 1e-2


def test_group_size_not_dividing_tiles_falls_back_to_dequant(kr):
    from backends.gptq.quant_linear import make_kernel_layer
    bits, gs = 4, 40  # 40 is a multiple of 8 (4-bit words) but no power-of-two tile fits in it
    packed, ref_w = _layer(bits, gs, False, seed=5)
    layer = make_kernel_layer(*packed, bits, gs, "gptq_v2", "cpu")
    runtime = kr.KernelRuntime(tune=False)
    assert [c.path for c in runtime.candidates(1, layer)] == ["dequant"]
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(9))
    assert _rel(runtime.matmul(x, layer), x.double() @ ref_w) < 1e-3


@pytest.mark.parametrize("act", [False, True], ids=["plain", "actorder"])
@pytest.mark.parametrize("gs", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_torch_path_and_kernels_agree(kr, bits, gs, act):
    from backends.gptq.quant_linear import QuantLinear
    fmt_name = ("gptq", "gptq_v2")[(bits + act) % 2]  # v1 and v2 zeros in turn
    packed, _ = _layer(bits, gs, act, seed=bits * 3 + act, checkpoint_format=fmt_name)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(2)).half()
    cpu = QuantLinear.from_packed("t", *packed, bias, bits=bits, group_size=gs, checkpoint_format=fmt_name,
                                  device=torch.device("cpu"), dtype=torch.float32)
    assert cpu.path == "torch-cached"
    from backends.gptq.quant_linear import make_kernel_layer
    kernel = make_kernel_layer(*packed, bits, gs, fmt_name, "cpu")
    runtime = kr.KernelRuntime(tune=False)
    for M in (1, 3, 17):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        y_torch = cpu(x)
        y_kernel = runtime.matmul(x, kernel, bias.float())
        assert _rel(y_kernel, y_torch.double()) < 1e-4
    # and the uncached torch path (dequantize at every call) is the same function
    lazy = QuantLinear.from_packed("t", *packed, bias, bits=bits, group_size=gs, checkpoint_format=fmt_name,
                                   device=torch.device("cpu"), dtype=torch.float32, cache_dequantized=False)
    assert lazy.path == "torch-dequant"
    x = torch.randn(2, K)
    assert torch.allclose(lazy(x), cpu(x), atol=1e-5)


def test_fused_siblings_compute_each_projection(kr):
    """q/k/v fused into one launch give each projection's own output, for every call order."""
    from torch import nn
    from backends.gptq.fusion import fuse_siblings
    from backends.gptq.quant_linear import QuantLinear, make_kernel_layer
    runtime = kr.KernelRuntime(tune=False)
    attn = nn.Module()
    refs = {}
    g_idx = _layer(4, 32, True, seed=40)[0][3]  # act-order: siblings share one activation order
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        packed, _ = _layer(4, 32, False, seed=40 + i)
        layer = QuantLinear(K, N, 4, 32, name)
        layer.kernel = make_kernel_layer(packed[0], packed[1], packed[2], g_idx, 4, 32, "gptq_v2", "cpu")
        assert layer.kernel.perm is not None
        layer.runtime = runtime
        layer.bias = torch.randn(N, generator=torch.Generator().manual_seed(i))
        refs[name] = fmt.dequantize(packed[0], packed[1], packed[2], g_idx, 4, "gptq_v2", dtype=torch.float64)
        setattr(attn, name, layer)
    assert fuse_siblings(attn, runtime) == 1
    assert attn.k_proj.path == "triton-fused" and attn.k_proj.kernel is None
    for order in (("q_proj", "k_proj", "v_proj"), ("v_proj", "q_proj", "k_proj")):
        x = torch.randn(2, K)
        for name in order:
            layer = getattr(attn, name)
            ref = x.double() @ refs[name] + layer.bias.double()
            assert _rel(layer(x), ref) < 1e-4, name
    with torch.inference_mode():  # inference tensors carry no version counter
        x = torch.randn(1, K)
        assert _rel(attn.q_proj(x), x.double() @ refs["q_proj"] + attn.q_proj.bias.double()) < 1e-4
        assert _rel(attn.v_proj(x), x.double() @ refs["v_proj"] + attn.v_proj.bias.double()) < 1e-4
    # a different input in between is recomputed, not served from the previous result
    x1, x2 = torch.randn(1, K), torch.randn(1, K)
    attn.q_proj(x1)
    assert _rel(attn.k_proj(x2), x2.double() @ refs["k_proj"] + attn.k_proj.bias.double()) < 1e-4


def test_tuner_never_picks_a_wrong_kernel(kr, monkeypatch):
    """The tuner checks every candidate against dequantize + matmul before timing it: a config whose
    output is wrong (a miscompiled kernel on some GPU) is dropped even when it would be the fastest."""
    from backends.gptq.quant_linear import make_kernel_layer
    packed, ref_w = _layer(4, 32, False, seed=77)
    layer = make_kernel_layer(*packed, 4, 32, "gptq_v2", "cpu")
    runtime = kr.KernelRuntime(tune=True)
    candidates = runtime.candidates(1, layer, dtype=torch.float16)[:3]
    wrong = candidates[0]
    real_run = runtime.run

    def run(x2d, layer, cfg, bias=None, out=None):
        y = real_run(x2d, layer, cfg, bias, out)
        return y * 1.5 if cfg == wrong else y

    monkeypatch.setattr(runtime, "run", run)
    timings = iter(range(1, 100))  # GPU timing stand-in: earlier candidates look faster

    def fake_time(fn, calls=20, reps=10):
        fn(0)
        return float(next(timings))

    monkeypatch.setattr(kr, "graph_time_ms", fake_time)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(4)).half()
    assert runtime._measure(x, layer, candidates) == candidates[1]
    # and with every fused candidate wrong, the always-correct dequantize path is kept
    monkeypatch.setattr(runtime, "run", lambda x2d, layer, cfg, bias=None, out=None:
                        real_run(x2d, layer, cfg, bias, out) * (1.5 if cfg.path == "fused" else 1.0))
    assert runtime._measure(x, layer, candidates).path == "dequant"


def test_read_floor_kernel_reads_every_word():
    """bench.kernels --floor times this plain read as what any kernel can reach: it must read every
    word of its chunk once (xor of the chunk), including a short last chunk."""
    import functools
    import operator

    from bench.kernels import _read_kernel
    src = torch.randint(0, 2**31 - 1, (10000,), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    per = 4096
    out = torch.full((3,), -1, dtype=torch.int32)
    _read_kernel[(3,)](src, out, src.numel(), per, BLOCK=1024)
    expected = [functools.reduce(operator.xor, src[i * per:(i + 1) * per].tolist()) for i in range(3)]
    assert out.tolist() == expected


@pytest.mark.parametrize("M,K", [(1, 160), (3, 300), (16, 257)])
def test_activation_gather_matches_index_select(kr, M, K):
    """Act-order's gather at 1-16 rows (gather.gather_columns, the gather_x path): x[:, perm] exactly, from a
    strided view (row stride past K), K not a multiple of the program's columns."""
    from backends.gptq import gather
    g = torch.Generator().manual_seed(M + K)
    wide = torch.randn(M, K + 40, generator=g).half()
    x = wide[:, 20:20 + K]
    perm = torch.randperm(K, generator=g).to(torch.int32)
    got = gather.gather_columns(x, perm)
    assert got.is_contiguous() and torch.equal(got, x[:, perm.long()])


def test_activation_gather_refuses_what_it_cannot_take(kr):
    from backends.gptq import gather
    perm = torch.arange(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="1-16 rows"):
        gather.gather_columns(torch.zeros(17, 8).half(), perm)
    with pytest.raises(ValueError, match="perm of 8"):
        gather.gather_columns(torch.zeros(2, 8).half(), perm[:4])


@pytest.mark.parametrize("act", [False, True], ids=["plain", "actorder"])
@pytest.mark.parametrize("gs", [32, 128, -1])
def test_fields3_layers_run_on_every_kernel_that_reads_them(kr, monkeypatch, gs, act):
    """3-bit layers in mode 8's fields order (what a CUDA GPU that runs mode 8 gets, forced here on the CPU):
    the runtime offers only the kernels that read that order (modes 3, 0, 1 and the dequantize path; not the
    half2 modes 4 and 5 nor mode 2, which read the planes order), and each of them matches float64."""
    from backends.gptq import quant_linear
    monkeypatch.setattr(quant_linear, "fields3_for", lambda device: True)
    seed = 300 + (gs % 1000) + act
    packed, ref_w = _layer(3, gs, act, seed)
    layer = quant_linear.make_kernel_layer(*packed, 3, gs, "gptq_v2", "cpu")
    assert layer.fields3 and layer.interleaved and layer.word_order == 2
    from tests.backends.gptq.support import fields3_codes
    codes = fields3_codes(layer.qweight)  # the words hold the sorted checkpoint codes
    sorted_codes = fmt.unpack_qweight(packed[0], 3, K).long()
    if layer.perm is not None:
        sorted_codes = sorted_codes[layer.perm.long()]
    assert torch.equal(codes, sorted_codes)
    w = torch.full((K, N), float("nan"), dtype=torch.float32)
    kr.launch_dequant(layer, w)
    assert torch.allclose(w.double(), ref_w, rtol=0, atol=1e-6)
    runtime = kr.KernelRuntime(tune=False)
    # tuned picks are kept apart from the same shape in the planes order (the disk cache outlives a process)
    from dataclasses import replace
    one_row = torch.zeros(1, K).half()
    assert runtime.key(one_row, layer) == runtime.key(one_row, replace(layer, fields3=False)) + "-f3"
    gen = torch.Generator().manual_seed(seed + 1)
    for dtype in (torch.float16, torch.float32):
        for M in (1, 3, 17):
            fused = [c for c in runtime.candidates(M, layer, dtype=dtype) if c.path == "fused"]
            modes = {c.mode for c in fused}
            assert modes == ({3, 0} if M == 1 else {0, 1}), modes
            assert fused[0].mode == (3 if M == 1 else 0)  # the untuned default: a portable kernel
            for cfg in {min((c for c in fused if (c.mode, c.gather_x) == kind), key=lambda c: c.split_k)
                        for kind in {(c.mode, c.gather_x) for c in fused}}:
                x = torch.randn(M, K, generator=gen).to(dtype)
                y = kr.launch_fused(x, layer, cfg, out=torch.full((M, N), float("nan"), dtype=dtype))
                assert not torch.isnan(y).any(), cfg
                err = _rel(y, x.double() @ ref_w)
                assert err < 1e-2, f"M={M} {dtype} {cfg}: relative error {err:.2e}"
    for mode in (2, 4, 5):  # the planes readers refuse the fields order instead of misreading it
        with pytest.raises(ValueError, match="planes order"):
            kr.launch_fused(torch.randn(1 if mode == 4 else 3, K).half(), layer,
                            kr.GemmConfig("fused", 1 if mode == 4 else 16, 64, 64, 1, 4, mode=mode))
