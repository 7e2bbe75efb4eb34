"""The Gluon 1-16-row kernel (mode 8, backends/gptq/gluon_gemv.py) against a float64 reference of the
dequantized weights, on CUDA (Gluon kernels have no interpreter; the compile for sm_90 and its loop are
checked without a GPU in test_kernels_compile.py). On CPU: which inputs it takes, which configs the tuner
offers it, and the unpacking arithmetic it relies on (fields read as fp16 subnormals)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from backends.gptq import format as fmt
from backends.gptq import gluon_gemv
from backends.gptq import kernel_runtime as kr
from backends.gptq import word_order
from backends.gptq.quant_linear import make_kernel_layer
from tests.backends.gptq.support import assert_fused_matches_float64, fields3_codes, precompile_fused


def _layer(K, N, bits, group, act, device, seed):
    g = torch.Generator().manual_seed(seed)
    G = fmt.num_groups(K, group)
    top = 1 << bits
    codes = torch.randint(0, top, (K, N), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, top, (G, N), generator=g, dtype=torch.int32)  # v1 stores z - 1
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.002).half()
    g_idx = fmt.default_g_idx(K, group)
    if act:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    qw, qz = fmt.pack_qweight(codes, bits), fmt.pack_qzeros(zeros, bits, "gptq")
    ref = fmt.dequantize(qw, qz, scales, g_idx, bits, "gptq", dtype=torch.float64)  # [K, N]
    return make_kernel_layer(qw, qz, scales, g_idx, bits, group, "gptq", device), ref


def _held_where_mode8_runs(layer):
    """A 3-bit layer as a GPU that runs mode 8 holds it (the fields order; built on the CPU it keeps the
    planes order): the configs offered read the flags only."""
    return replace(layer, fields3=True) if layer.bits == 3 else layer


def _fields_as_subnormals(words: torch.Tensor, bits: int, pair: int) -> torch.Tensor:
    """What _pair_q's shift and `and` leave, read as fp16 (the kernel's arithmetic, in torch)."""
    per_byte = 8 // bits
    shifted = (words.to(torch.int64) & 0xFFFFFFFF) >> (8 * (pair // per_byte))
    masked = shifted & ((((1 << bits) - 1) << (bits * (pair % per_byte))) * 0x10001)
    halves = torch.stack([masked & 0xFFFF, masked >> 16], -1).to(torch.int16)
    return halves.view(torch.float16)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_masked_fields_read_as_fp16_are_the_codes_times_2_to_the_minus_24(bits):
    """Every pair of every half2-ordered word unpacks to q * 2^r * 2^-24 exactly; x divided by 2^r (the
    kernel's x_scale) brings every product to x q 2^-24."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (32 // bits * 4, 64), generator=g, dtype=torch.int32)
    words = word_order.interleave_pairs(fmt.pack_qweight(codes, bits), bits)
    per_word = 32 // bits
    for p in range(per_word // 2):
        got = _fields_as_subnormals(words, bits, p).double()
        r = bits * (p % (8 // bits))
        for h in (0, 1):
            want = codes[2 * p + h::per_word].double() * 2.0 ** (r - 24)
            assert torch.equal(got[..., h], want), f"pair {p} half {h}"


def _a_operand_emulated(words: torch.Tensor, bits: int, block_k: int) -> torch.Tensor:
    """_a_operand's joins, reshapes and permute on logical tensors (gl.join stacks on a new last axis,
    reshapes are row-major): A [N, block_k] in the dot's k order, as float64 q * 2^r * 2^-24."""
    n = words.shape[0]
    pairs = [_fields_as_subnormals(words, bits, p).double() for p in range(32 // bits // 2)]
    t = torch.stack([torch.stack([pairs[0][..., 0], pairs[0][..., 1]], -1),
                     torch.stack([pairs[1][..., 0], pairs[1][..., 1]], -1)], -1)  # (n, word, h, p)
    if bits == 8:
        t = t.reshape(n, block_k // 16, 4, 2, 2).permute(0, 1, 4, 2, 3)
    else:
        u = torch.stack([torch.stack([pairs[2][..., 0], pairs[2][..., 1]], -1),
                         torch.stack([pairs[3][..., 0], pairs[3][..., 1]], -1)], -1)
        t = torch.stack([t, u], -1)
        if bits == 4:
            t = t.reshape(n, block_k // 32, 4, 2, 2, 2).permute(0, 1, 5, 4, 2, 3)
        else:
            v = torch.stack([torch.stack([pairs[4][..., 0], pairs[4][..., 1]], -1),
                             torch.stack([pairs[5][..., 0], pairs[5][..., 1]], -1)], -1)
            w = torch.stack([torch.stack([pairs[6][..., 0], pairs[6][..., 1]], -1),
                             torch.stack([pairs[7][..., 0], pairs[7][..., 1]], -1)], -1)
            t = torch.stack([t, torch.stack([v, w], -1)], -1)
            t = t.reshape(n, block_k // 64, 4, 2, 2, 2, 2).permute(0, 1, 6, 5, 4, 2, 3)
    return t.reshape(n, block_k)


def _b_tile_emulated(x: torch.Tensor, bits: int, block_k: int) -> torch.Tensor:
    """_b_tile on logical tensors: x [block_k, R] (float64, memory order) as its pairs, each divided by
    2^r of its weights (_x_pair_tile's shift), in the dot's k order [block_k, R]."""
    rows = x.shape[1]
    pairs = x.reshape(block_k // 2, 2, rows)  # (pair, h, m)
    sb = 2 if bits == 3 else bits
    shift = (sb * (torch.arange(block_k // 2) % (8 // sb))).double()
    t = (pairs / 2.0 ** shift[:, None, None]).permute(0, 2, 1)  # (pair, m, h): gl.join(lo, hi)
    if bits == 8:
        t = t.reshape(block_k // 16, 4, 2, rows, 2).permute(0, 2, 1, 4, 3)
    elif bits == 4:
        t = t.reshape(block_k // 32, 4, 2, 2, rows, 2).permute(0, 2, 3, 1, 5, 4)
    else:
        t = t.reshape(block_k // 64, 4, 2, 2, 2, rows, 2).permute(0, 2, 3, 4, 1, 6, 5)
    return t.reshape(block_k, rows)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_operands_in_the_dots_k_order_give_the_product_in_memory_order(bits):
    """The k order the kernel builds its operands in (_a_operand from half2-ordered words, _b_tile from x's
    pairs in memory order) is one permutation on both sides: A B = (q x) 2^-24 exactly. An 8-bit word holds
    two pairs, so its chunk is one MMA k-step (k = 16 c + 8 p + 2 t + h, the MMA's own k of lane t); a
    mismatch here would pair weights with the wrong activations, which no layout assertion catches."""
    g = torch.Generator().manual_seed(bits)
    block_k, n, rows = 64, 32, 16
    codes = torch.randint(0, 1 << bits, (block_k, n), generator=g, dtype=torch.int32)
    words = word_order.interleave_pairs(fmt.pack_qweight(codes, bits), bits).t()  # [n, words]: a lane's column
    x = torch.randint(-8, 8, (block_k, rows), generator=g).double()  # exact in fp16 and after / 2^r
    got = _a_operand_emulated(words, bits, block_k) @ _b_tile_emulated(x, bits, block_k)
    assert torch.equal(got, codes.t().double() @ x * 2.0 ** -24)


def _field3_emulated(words: torch.Tensor, I: int) -> torch.Tensor:
    """What _field3's shift and `and` leave (pair I of a fields-order word), read as fp16, float64 [..., 2]."""
    shift = 0 if I < 3 else 9
    mask = ((7 << (3 * (I % 3))) if I < 5 else 0x40) * 0x10001
    t = ((words.to(torch.int64) & 0xFFFFFFFF) >> shift) & mask
    return torch.stack([t & 0xFFFF, t >> 16], -1).to(torch.int16).view(torch.float16).double()


def _a_operand3_emulated(a, b, c, block_k: int):
    """_a_operand3's joins, reshapes and permutes on logical tensors: (main [n, block_k], split [n, block_k //
    8]) for words [n, block_k // 32] each."""
    n = a.shape[0]
    pairs = [_field3_emulated(w, I) for w in (a, b, c) for I in range(5)] + [_field3_emulated(a, 5)]
    join = lambda x, y: torch.stack([x, y], -1)
    quads = [join(join(pairs[i], pairs[i + 1]), join(pairs[i + 2], pairs[i + 3])) for i in range(0, 16, 4)]
    t = join(join(quads[0], quads[1]), join(quads[2], quads[3]))  # (n, block, h, p0, p1, p2, p3)
    main = t.reshape(n, block_k // 128, 4, 2, 2, 2, 2, 2).permute(0, 1, 7, 6, 5, 4, 2, 3).reshape(n, block_k)
    u = join(_field3_emulated(b, 5), _field3_emulated(c, 5))  # (n, block, h, s)
    split = u.reshape(n, block_k // 128, 4, 2, 2).permute(0, 1, 4, 2, 3).reshape(n, block_k // 8)
    return main, split


def _b3_emulated(x: torch.Tensor, block_k: int):
    """The two B operands of a 3-bit tile from x [block_k, R] (float64, memory order): _b_tile of the pairs
    divided by _x_pair_tile's 2^r, and of _x_split_pair_tile's pairs (pair 15 of each block, twice)."""
    rows = x.shape[1]
    pairs = x.reshape(block_k // 2, 2, rows)  # (pair, h, m)
    p = torch.arange(block_k // 2) % 16
    shift = torch.where(p == 15, 6, 3 * ((p % 5) % 3)).double()
    t = (pairs / 2.0 ** shift[:, None, None]).permute(0, 2, 1)  # (pair, m, h)
    main = t.reshape(block_k // 128, 4, 2, 2, 2, 2, rows, 2).permute(0, 2, 3, 4, 5, 1, 7, 6).reshape(block_k, rows)
    q = torch.arange(block_k // 16)
    split_pairs = pairs[(4 * (q // 8) + (q % 8) // 2) * 16 + 15] / 2.0 ** (5 - q % 2).double()[:, None, None]
    split = split_pairs.permute(0, 2, 1).reshape(block_k // 128, 4, 2, rows, 2).permute(0, 2, 1, 4, 3)
    return main, split.reshape(block_k // 8, rows)


def test_3bit_fields_order_operands_give_the_product_in_memory_order():
    """Mode 8 at 3 bits on words in the fields order (`word_order.fields3`): each pair is an exact
    subnormal q * 2^r * 2^-24 (r = 3 (I % 3)) after one `and` (and a shift by 9 the word's pairs share), the
    split pair 15 comes as its low bit in the main operand and its other two bits in a second one, and with
    x divided by the matching 2^r both products together are (q x) 2^-24 exactly; the all-ones word gives
    sum(x). A wrong shift, mask or k order here pairs weights with the wrong activations."""
    g = torch.Generator().manual_seed(3)
    block_k, n, rows = 256, 32, 16
    codes = torch.randint(0, 8, (block_k, n), generator=g, dtype=torch.int32)
    words = word_order.fields3(fmt.pack_qweight(codes, 3)).t()  # [n, word rows]: a lane's columns
    a, b, c = words[:, 0::3], words[:, 1::3], words[:, 2::3]
    for I in range(5):  # whole fields: q * 2^(3 (I % 3)) * 2^-24
        for w, word in enumerate((a, b, c)):
            pair = 5 * w + I
            for h in (0, 1):
                want = codes[2 * pair + h::32].t().double() * 2.0 ** (3 * (I % 3) - 24)
                assert torch.equal(_field3_emulated(word, I)[..., h], want), (w, I, h)
    x = torch.randint(-8, 8, (block_k, rows), generator=g).double()  # exact in fp16 and after / 2^r
    main, split = _a_operand3_emulated(a, b, c, block_k)
    x_main, x_split = _b3_emulated(x, block_k)
    assert torch.equal(main @ x_main + split @ x_split, codes.t().double() @ x * 2.0 ** -24)
    ones = torch.full_like(a, gluon_gemv.ONES3.value)  # the kernel's all-ones word: word a of all-one codes
    assert int(word_order.fields3(fmt.pack_qweight(torch.ones(32, 1, dtype=torch.int32), 3))[0, 0]) == gluon_gemv.ONES3.value
    ones_main, _ = _a_operand3_emulated(ones, ones, ones, block_k)
    assert torch.equal(ones_main @ x_main, x.sum(0, keepdim=True).expand(n, rows) * 2.0 ** -24)
    assert torch.equal(fields3_codes(word_order.fields3(fmt.pack_qweight(codes, 3))), codes.long())


def _placements(layout, rank: int) -> dict:
    """(lane, warp) -> the coordinates its registers hold, from a linear layout's bases (xor of the bases
    of the set bits: how Triton's linear layouts map hardware to tensor elements)."""
    out = {}
    regs, lanes, warps = layout.reg_bases, layout.lane_bases, layout.warp_bases
    for warp in range(1 << len(warps)):
        for lane in range(32):
            held = []
            for reg in range(1 << len(regs)):
                coord = [0] * rank
                for bits, bases in ((reg, regs), (lane, lanes), (warp, warps)):
                    for i, base in enumerate(bases):
                        if bits >> i & 1:
                            coord = [c ^ b for c, b in zip(coord, base)]
                held.append(tuple(coord))
            out[(lane, warp)] = held
    return out


@pytest.mark.skipif(not gluon_gemv.AVAILABLE, reason="this Triton has no Gluon (3.5+)")
@pytest.mark.parametrize("bits,block_n,warps", [(4, 64, 1), (4, 128, 1), (2, 32, 1), (4, 128, 2), (2, 256, 4),
                                                 (4, 64, 4), (8, 64, 1), (8, 256, 4)])
def test_words_load_in_runs_of_columns_and_land_in_the_mma_rows_of_those_columns(bits, block_n, warps):
    """Mode 8 loads words, scales and zeros in memory order, each lane a run of side-by-side columns
    (one vector load), and renames them to the MMA's rows: every lane must load exactly the columns whose
    MMA rows it holds (mma_row_column), each element once, or the dot would mix columns; the store
    renames the accumulator back to the same columns."""
    block_k = 128 if bits == 4 else 64
    kw = block_k * bits // 32
    words = _placements(gluon_gemv.word_layout(bits, block_k, block_n, warps), 2)
    loads = _placements(gluon_gemv.load_layout(bits, block_k, block_n, warps), 2)
    cols = _placements(gluon_gemv.column_layout(block_n, warps), 1)
    to_column = [gluon_gemv.mma_row_column(n, block_n, warps) for n in range(block_n)]
    assert sorted(to_column) == list(range(block_n))
    everything = sorted(c for held in loads.values() for c in held)
    assert everything == [(n, r) for n in range(block_n) for r in range(kw)]  # each word once
    for where, held in words.items():
        assert sorted(loads[where]) == sorted((to_column[n], r) for n, r in held), where
        assert set(c for c, in cols[where]) == {to_column[n] for n, _ in held}, where
    for rows in (8, 16):  # the store: lane (g, t) of warp w holds the accumulator's MMA rows g, g + 8 of
        # each of its tiles at x rows 2t, 2t + 1 (and 8 more at 16 rows), now in memory columns
        outs = _placements(gluon_gemv.out_layout(block_n, warps, rows), 2)
        for (lane, warp), held in outs.items():
            g, t = lane // 4, lane % 4
            mma_rows = [16 * (i * warps + warp) + 8 * h + g for i in range(block_n // (16 * warps)) for h in (0, 1)]
            want = {(to_column[n], m + 8 * r) for n in mma_rows for m in (2 * t, 2 * t + 1) for r in range(rows // 8)}
            assert sorted(held) == sorted(want), (lane, warp)
    run = gluon_gemv.column_run(block_n, warps)
    first = loads[(0, 0)]
    assert [first[i][0] for i in range(run)] == list(range(run))  # registers 0..run-1: adjacent columns
    assert run == 4 or block_n // warps == 16


def test_configs_offered_fit_the_kernel():
    layer, _ = _layer(4096, 1024, 4, 128, False, "cpu", 0)
    configs = kr._gluon_gemv_candidates(layer, 1, kr.valid_block_ks(layer), sms=132)
    assert configs and all(c.mode == 8 and c.block_m == 1 for c in configs)
    for c in configs:
        assert gluon_gemv.valid(4, c.block_k, c.block_n, c.num_warps) and c.block_k == 128
    assert any(c.split_k > 1 for c in configs)
    two, _ = _layer(4096, 1024, 2, 64, False, "cpu", 0)
    assert {c.block_k for c in kr._gluon_gemv_candidates(two, 1, kr.valid_block_ks(two), 132)} == {64}
    four64, _ = _layer(4096, 1024, 4, 64, False, "cpu", 0)  # 4 bits, 64-value groups: tiles of one and of two
    assert {c.block_k for c in kr._gluon_gemv_candidates(four64, 16, kr.valid_block_ks(four64), 132)} == {64, 128}
    assert gluon_gemv.groups_per_tile(2, 128, 64, 4096) == 2 and gluon_gemv.groups_per_tile(2, 64, 64, 4096) == 1
    assert gluon_gemv.groups_per_tile(2, 64, 32, 4096) == 0  # a 32-value group is less than a 2-bit chunk
    assert gluon_gemv.groups_per_tile(3, 128, 64, 4096) == 0  # a 3-bit lane holds whole 128-value chunks
    rows16 = kr._gluon_gemv_candidates(layer, 16, kr.valid_block_ks(layer), 132)
    assert rows16 and all(c.block_m == 16 and c.block_n // c.num_warps in (32, 64) for c in rows16)
    assert kr._gluon_gemv_candidates(layer, 32, kr.valid_block_ks(layer), 132) == []  # 16 rows at most
    three = _held_where_mode8_runs(_layer(4096, 1024, 3, 128, False, "cpu", 0)[0])  # whole 128-k blocks a lane
    assert {c.block_k for c in kr._gluon_gemv_candidates(three, 1, kr.valid_block_ks(three), 132)} == {128}
    three64 = _held_where_mode8_runs(_layer(4096, 1024, 3, 64, False, "cpu", 0)[0])
    assert kr._gluon_gemv_candidates(three64, 16, kr.valid_block_ks(three64), 132) == []
    eight, _ = _layer(4096, 1024, 8, 128, False, "cpu", 0)  # 8 bits: 64-value tiles, a 4-bit 128-value tile's bytes
    for bucket in (1, 16):
        offered = kr._gluon_gemv_candidates(eight, bucket, kr.valid_block_ks(eight), 132)
        assert offered and {c.block_k for c in offered} == {64}
        assert all(gluon_gemv.valid(8, c.block_k, c.block_n, c.num_warps) for c in offered)


def test_pipeline_forms_are_offered_where_they_won():
    """num_stages picks the kernel's pipeline (gluon_gemv.PIPELINES): 1, x requested in the iteration that
    uses it, everywhere; 2, words two tiles ahead, only at 2-16 rows on 64-column warps, where it won on an
    H200 (it lost 5-15% at one row); 3, words and x a tile ahead: for every tile under a register cap
    (ptxas maxnreg; 200 and 248 at 16 rows, 128 at one row), which won on an H200 at 2, 3 and 4 bits, and at 2-16
    rows without a cap too for 2-bit layers (the only ones that picked it so)."""
    assert gluon_gemv.pipeline(1) == dict(WORDS_AHEAD=1, X_AHEAD=0)
    assert gluon_gemv.pipeline(2) == dict(WORDS_AHEAD=2, X_AHEAD=1)
    assert gluon_gemv.pipeline(3) == dict(WORDS_AHEAD=1, X_AHEAD=1)
    for bits, group in ((4, 128), (3, 128), (2, 64)):
        layer = _held_where_mode8_runs(_layer(4096, 1024, bits, group, False, "cpu", 0)[0])
        bks = kr.valid_block_ks(layer)
        for bucket, caps in ((1, kr.ROW_REGISTER_CAPS), (16, kr.ROWS16_REGISTER_CAPS)):
            offered = kr._gluon_gemv_candidates(layer, bucket, bks, 132)
            tiles = {c for c in offered if c.num_stages == 1}
            assert tiles and all(c.max_registers == 0 for c in tiles)
            capped = [c for c in offered if c.max_registers]
            for cap in caps:
                assert {replace(c, max_registers=0) for c in capped if c.max_registers == cap} == {
                    replace(c, num_stages=3) for c in tiles}
            assert {c.max_registers for c in capped} == set(caps)
            assert len(set(offered)) == len(offered)
            if bucket == 1:
                assert {c.num_stages for c in offered} == {1, 3}
                continue
            ahead = [c for c in offered if c.num_stages == 2]
            assert ahead and all(c.block_n // c.num_warps == 64 and not c.max_registers for c in ahead), offered
            assert {replace(c, num_stages=1) for c in ahead} <= tiles
            both_ahead = {replace(c, num_stages=1) for c in offered if c.num_stages == 3 and not c.max_registers}
            assert both_ahead == (tiles if bits == 2 else set())


def test_register_caps_reach_the_launch_as_maxnreg():
    """A config's register cap is a compile option of its launch (Triton's `maxnreg`), and none by default,
    so the uncapped configs compile as before (the tuner's cache keys them apart by the cap)."""
    cfg = kr.GemmConfig("fused", 16, 64, 128, 2, 1, 3, mode=8)
    assert cfg.compile_options() == {}
    assert replace(cfg, max_registers=200).compile_options() == {"maxnreg": 200}
    assert replace(cfg, max_registers=200) != cfg


def test_inputs_it_does_not_take_are_refused():
    layer, _ = _layer(256, 128, 4, 128, False, "cpu", 1)
    cfg = kr.GemmConfig("fused", 1, 128, 128, 1, 1, 1, mode=8)
    x = torch.zeros(1, 256, dtype=torch.float16)
    assert not gluon_gemv.supports(x, layer, cfg)  # not on CUDA
    with pytest.raises(ValueError, match="mode 8"):
        kr.launch_fused(x, layer, cfg)


needs_gluon_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                     reason="needs a CUDA GPU (Gluon kernels have no interpreter)")


@needs_gluon_gpu
@pytest.mark.parametrize("K,N,bits,group,act", [(4096, 1024, 4, 128, False), (2048, 512, 2, 64, False),
                                                (2048, 256, 4, -1, False), (1024, 768, 4, 64, True),
                                                (11008, 256, 4, 128, False), (1024, 512, 2, 128, True),
                                                (4096, 1024, 3, 128, False), (2048, 512, 3, -1, False),
                                                (1024, 768, 3, 128, True), (2048, 512, 4, 32, False),
                                                (2048, 512, 8, 128, False), (1024, 768, 8, 128, True)])
def test_matches_float64_over_rows_splits_and_tiles(K, N, bits, group, act):
    if not gluon_gemv.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    layer, ref = _layer(K, N, bits, group, act, "cuda", K + N + bits)
    ref = ref.cuda()
    runtime = kr.KernelRuntime(tune=False)
    sms = kr.sm_count("cuda")
    offered = [c for bucket in (1, 16) for c in kr._gluon_gemv_candidates(layer, bucket, kr.valid_block_ks(layer), sms)]
    # every offered tile and split in pipeline form 1; forms 2 and 3 (gluon_gemv.PIPELINES) once per tile
    # and register cap
    configs = [c for c in offered if c.num_stages == 1]
    for form in (2, 3):
        tiles = {(c.block_m, c.block_n, c.block_k, c.num_warps, c.max_registers): c
                 for c in offered if c.num_stages == form}
        configs += list(tiles.values())
    assert {c.num_stages for c in configs} == {1, 2, 3}
    assert {c.max_registers for c in configs} == {0, *kr.ROW_REGISTER_CAPS, *kr.ROWS16_REGISTER_CAPS}
    bk = min(gluon_gemv.chunk(bits), max(kr.valid_block_ks(layer)))
    configs += [kr.GemmConfig("fused", 1, 64, bk, 1, 1, 1, mode=8),  # one split; odd splits
                kr.GemmConfig("fused", 1, 128, bk, 3, 2, 1, mode=8), kr.GemmConfig("fused", 16, 64, bk, 3, 2, 1, mode=8),
                # words two tiles ahead (num_stages 2): odd splits, and one tile a program (nothing ahead)
                kr.GemmConfig("fused", 16, 64, bk, 3, 1, 2, mode=8),
                kr.GemmConfig("fused", 16, 128, bk, K // bk, 2, 2, mode=8)]
    assert configs and any(c.split_k > 1 for c in configs)

    def small_columns(x):  # small activations: x / 2^r lands among fp16 subnormals
        x[:, ::7] *= 1e-3
        return x

    assert_configs_match_float64(layer, ref, configs, act, runtime, shape_x=small_columns)


def assert_configs_match_float64(layer, ref, configs, act, runtime, shape_x=None):
    """Every config (gathering x first for act-order layers) against x @ ref in float64, without and with a
    bias: one row for the one-row bucket, else 2, 8, 9 and 16 (8 rows: one MMA per operand; 9-16: two)."""
    if act:
        configs = [replace(c, gather_x=True) for c in configs]
    g = torch.Generator(device="cuda").manual_seed(7)
    bias = torch.randn(layer.N, generator=g, device="cuda").half()
    row_counts = lambda cfg: (1,) if cfg.block_m == 1 else (2, 8, 9, 16)
    precompile_fused(layer, configs, row_counts, bias, runtime.scratch)
    for cfg in configs:
        rows = row_counts(cfg)
        assert_fused_matches_float64(layer, ref, cfg, rows, bias, runtime.scratch, g, shape_x=shape_x)


@needs_gluon_gpu
@pytest.mark.parametrize("act", [False, True])
def test_pdl_launches_match_float64(act):
    """Mode 8 as programmatic dependent launches (sm_90): every pipeline form at 1 and 16 rows, act-order
    after its gather (which then lets the kernel start at once), against float64 on fresh inputs."""
    if not gluon_gemv.AVAILABLE or not kr.pdl_supported("cuda"):
        pytest.skip("needs Gluon and an sm_90+ GPU (programmatic dependent launch)")
    layer, ref = _layer(2048, 1024, 4, 128, act, "cuda", 11 + act)
    ref = ref.cuda()
    runtime = kr.KernelRuntime(tune=False)
    offered = [c for bucket in (1, 16) for c in kr._gluon_gemv_candidates(layer, bucket, kr.valid_block_ks(layer),
                                                                          kr.sm_count("cuda"))]
    configs = list({(c.block_m, c.num_stages): c for c in offered}.values())  # each form at each row count
    if act:
        configs = [replace(c, gather_x=True) for c in configs]
    g = torch.Generator(device="cuda").manual_seed(3)
    bias = torch.randn(layer.N, generator=g, device="cuda").half()
    for cfg in configs:
        assert_fused_matches_float64(layer, ref, cfg, (1,) if cfg.block_m == 1 else (2, 16), bias, runtime.scratch, g,
                                     pdl=True)


@needs_gluon_gpu
def test_the_tuner_checks_and_may_pick_it_at_16_rows():
    """Mode 8 is among the 16-row candidates on a GPU with Gluon, and whatever the tuner picks matches."""
    if not gluon_gemv.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    layer, ref = _layer(4096, 2048, 2, 64, False, "cuda", 5)
    runtime = kr.KernelRuntime(tune=True)
    assert any(c.mode == 8 for c in runtime.candidates(16, layer, "cuda"))
    x = torch.randn(16, 4096, device="cuda").half()
    y = runtime.matmul(x, layer)
    want = x.double() @ ref.cuda()
    assert float((y.double() - want).norm() / want.norm()) < 2e-3


def test_the_tuner_offers_it_at_2_to_16_rows_and_at_one_for_2_3_and_8_bits():
    """Mode 8 won or tied at 4 and 16 rows on an H200, and at one row won at 2 bits and, on 3-bit layers in
    the fields order, at 3 (bench/RESULTS.md): it is offered where Gluon kernels run, for 2, 3 and 4 bits at
    2-16 rows, and for 2 and 3 bits at one row (4 bits there only when asked for by name). 3-bit layers in
    the planes order (where mode 8 does not run) never get it."""
    runtime = kr.KernelRuntime()
    for bits, group in ((4, 128), (2, 64), (3, 128)):
        layer, _ = _layer(4096, 1024, bits, group, False, "cpu", bits)
        if bits == 3:  # what a GPU that runs mode 8 holds (the CPU keeps the planes order)
            assert not layer.fields3
            assert not any(c.mode == 8 for M in (1, 16) for c in runtime.candidates(M, layer))
            layer = _held_where_mode8_runs(layer)
        one = [c for c in runtime.candidates(1, layer) if c.mode == 8]
        assert bool(one) == (bits in (2, 3) and kr.gluon_kernels_available())
        assert all(c.block_m == 1 for c in one)
        rows16 = [c for c in runtime.candidates(16, layer) if c.mode == 8]
        assert bool(rows16) == kr.gluon_kernels_available()
        assert all(c.block_m == 16 for c in rows16)
        assert all(gluon_gemv.valid(bits, c.block_k, c.block_n, c.num_warps) for c in rows16)
        assert not any(c.mode == 8 for c in runtime.candidates(32, layer))
        asked = kr.KernelRuntime(modes=(8,)).candidates(1, layer)  # asked for by name: at one row too
        assert bool(asked) and all(c.mode == 8 for c in asked) == kr.gluon_kernels_available()
    three64, _ = _layer(4096, 1024, 3, 64, False, "cpu", 3)  # 3 bits need whole 128-value tiles
    assert not any(c.mode == 8 for c in runtime.candidates(16, three64))
    # 8 bits: the half2 kernels (modes 4 and 5) take 2-4 bits; mode 8 is the fp16 8-bit kernel at 1-16 rows,
    # next to the portable modes (untimed on a GPU when offered: the tuner checks every candidate's output)
    eight, _ = _layer(4096, 1024, 8, 128, False, "cpu", 8)
    for M in (1, 16):
        offered = runtime.candidates(M, eight)
        assert not {4, 5} & {c.mode for c in offered}
        assert any(c.mode == 8 for c in offered) == kr.gluon_kernels_available()
        assert offered[0].mode in (2, 3)  # the untuned default stays a portable kernel
    x = torch.zeros(1, 4096, dtype=torch.float16)  # the half2 kernels refuse 8-bit words, interleaved or not
    for mode, rows in ((4, 1), (5, 16)):
        with pytest.raises(ValueError, match=f"mode {mode}.*2/3/4-bit"):
            kr.launch_fused(x, eight, kr.GemmConfig("fused", rows, 128, 64, 1, 4, 2, mode=mode))
