"""The 1-16-row 2/3/4/8-bit kernel (mode 8): the weights are the tensor cores' A operand, unpacked with one
`and` per pair (two at 3 bits) and no fix-up.

Why: the half2 matrix-vector kernel (mode 4) spends three instructions per pair of weights: a `lop3` that
puts both 4-bit fields into fp16 mantissas over the exponent of 1024, an fma that removes the 1024 and
the zero, and the fp16x2 fma of the dot. At 2 and 3 bits that is what bounds it (2.2 and 2.8 SASS
instructions per weight, bench/RESULTS.md). Here a pair costs a shift and an `and`:

- The masked fields are read as fp16 bit patterns: an integer q in the mantissa with a zero exponent is
  the subnormal q * 2^-24, exact. `mma.m16n8k16` multiplies them with x exactly and adds in fp32, so
  sum(x q) * 2^-24 comes out without an offset to remove.
- The zero point: sum(x (q - z)) = sum(x q) - z sum(x). sum(x) * 2^-24 comes from a second MMA of the
  same x with an A operand of all ones (again subnormal ones), the same layout and a constant, so
  each tile is s * (P - z Z) in fp32 per column.
- The weights are the A operand (16 columns x 16 k per MMA, 8 weights per lane), x the B operand (16 k x
  8 rows): up to 8 rows of x cost the same as one; 9-16 rows take two MMAs per weight operand (R = 16).
  Lane (g, t) holds word row 4c + t of MMA rows g and g + 8 of each of its 16-row tiles; a word's pairs
  are that lane's A registers for a dot whose k order within each chunk of four words is
  2t + h + 8 (p & 1) + 16 (p >> 1) (pair p, half h), the order of gluon_mma.py. x's B registers in that
  order are consecutive values, read as int32 pairs.
- Which memory column an MMA row is does not matter to the dot, only to the loads and the store. A
  lane's MMA rows are mapped to runs of 4 side-by-side columns (`mma_row_column`), so words, scales and
  zeros come in 16-, 8- and 4-byte loads where MMA order gave one 4-, 2- or 1-byte load per column:
  56 loads per 4-bit 64 x 128 tile at 16 rows became 20.

- 3 bits (`_field3`, `_a_operand3`): a block of 32 values is three words in the fields order
  (`word_order.fields3`, what 3-bit layers get where this kernel runs): five whole 3-bit fields in each
  16-bit half at bits 0, 3, 6, 9, 12 (pairs 0-14), and the last pair's three bits in bit 15 of the three
  words' halves. A pair is one `and` (bits 0-8 are subnormals as they lie) or an `and` after a shift by 9
  shared by the word's pairs: q * 2^r * 2^-24 with r = 0, 3 or 6, so x / 2^r serves it as at 2 bits. The
  split pair is its low bit in the main MMA and its other two bits in a second, 16-k MMA per 128-k chunk
  whose x is the same pair taken from the registers twice (x / 2^5, x / 2^4). A lane holds whole blocks
  (word rows 3i, 3i + 1 and 3i + 2 of block 4c + t), laid out as if each block were one word of 1-bit
  fields (`layout_bits`): tiles are whole 128-value chunks. 1.54 SASS instructions per weight at up to 8
  rows, where the planes order (a second `lop3` a pair to or the third bit in) took 2.27.

- Groups shorter than a tile (`groups_per_tile`, GROUPS = 2): a tile of two groups, each half its own MMA
  with its own scales and zeros. Twice the bytes per tile in flight: 4-bit g64 at 16 rows went from 68.5
  to 52 us on 8192x28672 on an H200 (as fast as g128); 2-bit g64 never picked it.

- How far ahead the loads are requested is the config's pipeline form (`PIPELINES`): x in the iteration
  that uses it by default, words two tiles ahead or both one tile ahead where those measured faster.

- 8 bits: a word's two pairs are bytes 0 and 2 (an `and`) and bytes 1 and 3 (a shift by 8 and an `and`) in
  the half2 order (bytes hold values 0, 2, 1, 3); a code up to 255 is still an exact subnormal and every
  field sits at bit 0 of its byte, so x is never scaled. A chunk (four words of a column, one per lane t)
  is one MMA k-step: k = 16 c + 8 p + 2 t + h. Built and checked without a GPU (2026-12-04): the k order
  against the product in torch, the layouts, the sm_90 SASS; not yet timed.

Half2-ordered (`word_order.interleave_pairs`) 2-, 4- and 8-bit words and fields-ordered 3-bit ones
(`word_order.fields3`), fp16, whole tiles only, a tile
never straddling a group. Act-order reads x gathered by the runtime. Needs Triton's Gluon.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from backends.gptq.gluon_mma import _store_tile  # the split-K epilogue both Gluon kernels share
    from backends.gptq.triton_kernels import _first_group, _next_group  # the group stepped, not divided
    from backends.gptq.triton_kernels import gdc_launch_dependents, gdc_wait  # PDL (None on an old Triton)
    AVAILABLE = hasattr(gl, "DistributedLinearLayout") and hasattr(gl, "NVMMADistributedLayout")
except ImportError:  # a Triton without Gluon: the mode is not offered
    AVAILABLE = False

ROWS = 16  # rows of x per call at most: 8 per MMA (its n), two MMAs per weight operand past 8 rows
# a 3-bit fields-order word (`word_order.fields3`) of all-one fields with bit 15 set, as int32: as word a of a
# block it is the block of all-one codes; the kernel reads it as all three words for sum(x) (bit 15 of words b and
# c only feeds the split pair's second operand, which sum(x) does not use)
ONES3 = tl.constexpr(0x92499249 - (1 << 32))
BITS = (2, 3, 4, 8)


def values_per_word(bits: int) -> int:
    return 32 // bits


def layout_bits(bits: int) -> int:
    """The field width the layouts are built for: 3-bit weights are laid out per block of 32 values (a lane
    holds a whole block: its three words in the fields order, `word_order.fields3`),
    as if each block were one word of 1-bit fields."""
    return 1 if bits == 3 else bits


def chunk(bits: int) -> int:
    """k values per chunk: four words (3 bits: four blocks) of a column, one per lane t."""
    return 4 * values_per_word(layout_bits(bits))


def operand_rows(M: int) -> int:
    """The kernel's R for M rows of x: one MMA per weight operand up to 8 rows, two past that."""
    return 8 if M <= 8 else 16


def _log2(n: int) -> int:
    return n.bit_length() - 1


def valid(bits: int, block_k: int, block_n: int, num_warps: int) -> bool:
    """Tile shapes the layouts cover: whole chunks, every warp owning whole 16-column MMA tiles."""
    per_warp = block_n // (16 * num_warps)
    power_of_two = lambda n: n > 0 and n & (n - 1) == 0
    return (bits in BITS and block_k % chunk(bits) == 0 and power_of_two(block_k)
            and block_n % (16 * num_warps) == 0 and power_of_two(per_warp) and power_of_two(num_warps))


def groups_per_tile(bits: int, block_k: int, group_size: int, K: int) -> int:
    """Groups a tile of block_k values holds: 1 (the tile inside one group), 2 (two groups, each whole chunks;
    2 and 4 bits, where a chunk is a register bit of a lane's words), 0 where neither fits."""
    if group_size >= K or group_size % block_k == 0:
        return 1
    if bits != 3 and 2 * group_size == block_k and group_size % chunk(bits) == 0:
        return 2
    return 0


def takes_words(layer) -> bool:
    """Whether this kernel reads the layer's words: 2/4/8 bits interleaved (`interleave_pairs`), 3 bits in the
    fields order only (`word_order.fields3`; not the planes order)."""
    return layer.bits in BITS and layer.interleaved and layer.fields3 == (layer.bits == 3)


def supports(x2d, layer, cfg) -> bool:
    """The inputs this kernel takes (act-order only after the runtime's gather)."""
    return (AVAILABLE and x2d.is_cuda and x2d.dtype == torch.float16 and 1 <= x2d.shape[0] <= ROWS
            and takes_words(layer) and valid(layer.bits, cfg.block_k, cfg.block_n, cfg.num_warps)
            and layer.N % cfg.block_n == 0 and layer.K % cfg.block_k == 0
            and groups_per_tile(layer.bits, cfg.block_k, layer.group_size, layer.K) > 0)


def column_run(block_n: int, num_warps: int) -> int:
    """Columns a lane loads side by side: 4 (a 16-byte load of words), 2 where a warp has one MMA tile."""
    return min(4, 2 * block_n // (16 * num_warps))


@functools.lru_cache(maxsize=None)
def word_layout(bits: int, block_k: int, block_n: int, num_warps: int):
    """Words [block_n, block_k // values_per_word] in the MMA's order of columns: lane (g, t) of warp w holds
    word row 4c + t of MMA rows g and g + 8 of each of its 16-row MMA tiles (tile i of warp w is rows
    16 (i * num_warps + w) onwards). `load_layout` says which memory column each MMA row is."""
    kw = block_k // values_per_word(bits)
    chunks, tiles = kw // 4, block_n // (16 * num_warps)
    return gl.DistributedLinearLayout(
        reg_bases=([[8, 0]] + [[0, 4 << i] for i in range(_log2(chunks))]
                   + [[(16 * num_warps) << i, 0] for i in range(_log2(tiles))]),
        lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(_log2(num_warps))], block_bases=[], shape=[block_n, kw])


def _column_bases(block_n: int, num_warps: int, rank: int) -> dict:
    """Bases over memory columns (axis 0 of `rank` axes): lane g of warp w holds L = column_run side-by-side
    columns (register bits first, so one vector load takes them), 8 lanes cover 8 L columns, then the
    lane's other runs and the warps (16 * tiles columns each)."""
    tiles = block_n // (16 * num_warps)
    run = column_run(block_n, num_warps)
    per_lane = 2 * tiles  # MMA rows g and g + 8 of each tile
    col = lambda c: [c] + [0] * (rank - 1)
    return dict(run=[col(1 << i) for i in range(_log2(run))],
                more=[col((8 * run) << i) for i in range(_log2(per_lane // run))],
                lanes=[col(run), col(2 * run), col(4 * run)],
                warps=[col((16 * tiles) << i) for i in range(_log2(num_warps))])


@functools.lru_cache(maxsize=None)
def load_layout(bits: int, block_k: int, block_n: int, num_warps: int):
    """Words [block_n, block_k // values_per_word] in memory order, as loaded: each lane's column run is one
    vector load per word row (in MMA order it was a 32-bit load per word). `_mma_order` renames it to
    word_layout."""
    kw = block_k // values_per_word(bits)
    b = _column_bases(block_n, num_warps, 2)
    return gl.DistributedLinearLayout(
        reg_bases=b["run"] + [[0, 4 << i] for i in range(_log2(kw // 4))] + b["more"],
        lane_bases=[[0, 1], [0, 2]] + b["lanes"], warp_bases=b["warps"], block_bases=[], shape=[block_n, kw])


@functools.lru_cache(maxsize=None)
def column_layout(block_n: int, num_warps: int):
    """Per-column scales and zeros [block_n] in memory order, laid out as load_layout's columns."""
    b = _column_bases(block_n, num_warps, 1)
    return gl.DistributedLinearLayout(reg_bases=b["run"] + b["more"], lane_bases=[[0], [0]] + b["lanes"],
                                      warp_bases=b["warps"], block_bases=[], shape=[block_n])


@functools.lru_cache(maxsize=None)
def out_layout(block_n: int, num_warps: int, rows: int):
    """The fp32 tile [block_n, rows] in memory order for the store: the MMA accumulator's lanes and
    registers (lane (g, t): rows 2t, 2t + 1, and 8 more at 16) with its columns renamed back, so each lane
    stores its run of side-by-side columns in one vector store per row."""
    b = _column_bases(block_n, num_warps, 2)
    return gl.DistributedLinearLayout(
        reg_bases=b["run"] + [[0, 1]] + ([[0, 8]] if rows == 16 else []) + b["more"],
        lane_bases=[[0, 2], [0, 4]] + b["lanes"], warp_bases=b["warps"], block_bases=[], shape=[block_n, rows])


def mma_row_column(n, block_n: int, num_warps: int):
    """The memory column (within the tile) that MMA row n holds after `_mma_order`: memory column
    w 16T + s_hi 8L + g L + s_lo (slot s = h + 2 i of lane g, L = column_run, s_lo = s mod L) is MMA row
    16 (i num_warps + w) + 8 h + g. For the tests; the kernel renames the column indices instead."""
    tiles = block_n // (16 * num_warps)
    run = column_run(block_n, num_warps)
    g, h, w, i = n % 8, (n // 8) % 2, (n // 16) % num_warps, n // (16 * num_warps)
    slot = h + 2 * i
    return w * 16 * tiles + (slot // run) * 8 * run + g * run + slot % run


@functools.lru_cache(maxsize=None)
def x_layout(bits: int, block_k: int, num_warps: int, rows: int):
    """x as int32 pairs [block_k // 2, rows] (8 or 16): lane (g, t) holds rows g (and g + 8) at the pairs of
    its word rows (pw pairs per word, pw consecutive pairs per chunk); every warp holds all of it."""
    pw = values_per_word(bits) // 2
    chunks = block_k // chunk(bits)
    return gl.DistributedLinearLayout(
        reg_bases=([[1 << i, 0] for i in range(_log2(pw))] + [[(4 * pw) << i, 0] for i in range(_log2(chunks))]
                   + ([[0, 8]] if rows == 16 else [])),
        lane_bases=[[pw, 0], [2 * pw, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 0] for _ in range(_log2(num_warps))], block_bases=[], shape=[block_k // 2, rows])


# a config's num_stages -> (WORDS_AHEAD, X_AHEAD): how many tiles ahead the words are requested, and whether
# x is requested a tile ahead (1) or in the iteration that uses it (0). Six forms were timed on an H200
# (bench/RESULTS.md, 2026-12-04 16:05-16:20); three are kept, each the fastest somewhere:
# 1, x in its own iteration (small and cached, it need not hold registers a tile ahead): 2-bit 8192x28672
#    at one row 30.3 -> 28.6 us, 3-bit and 4-bit 4096x11008 at 16 rows -4 %; ties elsewhere at one row.
# 2, words two tiles ahead: 4-bit 8192x28672 at 16 rows 54.2 -> 51.5 us on 64-column warps; it lost
#    5-15 % at one row, where it is not offered.
# 3, words and x one tile ahead (the form before): 2-bit 8192x28672 at 16 rows, 48.9 us against 53
#    (offered for 2-bit layers only: 3- and 4-bit layers never picked it).
# Three tiles ahead lost everywhere.
PIPELINES = {1: (1, 0), 2: (2, 1), 3: (1, 1)}


def pipeline(num_stages: int) -> dict:
    """The kernel's pipeline arguments for a config's num_stages (`PIPELINES`)."""
    words, x = PIPELINES[num_stages]
    return dict(WORDS_AHEAD=words, X_AHEAD=x)


def layouts(bits: int, block_k: int, block_n: int, num_warps: int, rows: int) -> dict:
    """The kernel's layout arguments for one config."""
    bits = layout_bits(bits)
    return dict(W_LAYOUT=word_layout(bits, block_k, block_n, num_warps),
                X_LAYOUT=x_layout(bits, block_k, num_warps, rows),
                LOAD_LAYOUT=load_layout(bits, block_k, block_n, num_warps),
                COL_LAYOUT=column_layout(block_n, num_warps), OUT_LAYOUT=out_layout(block_n, num_warps, rows))


@triton.jit
def _pair_q(w, P: tl.constexpr, BITS: tl.constexpr):
    """Values 2P and 2P+1 of each half2-ordered word as fp16 bit patterns q * 2^r * 2^-24 (subnormals,
    exact): the word shifted by whole bytes, then masked, so each field stays at bit r = its offset in its
    byte (`_scale_x_pairs` divides the matching x by 2^r)."""
    per_byte: tl.constexpr = 8 // BITS
    return tl.inline_asm_elementwise(
        "{\n.reg .b32 t;\n"
        f"shr.u32 t, $2, {8 * (P // per_byte)};\n"
        f"and.b32 t, t, {(((1 << BITS) - 1) << (BITS * (P % per_byte))) * 0x10001};\n"
        "mov.b32 {$0, $1}, t;\n}",
        "=h,=h,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)


@triton.jit
def _scale_x_pairs(xp, shift):
    """x pairs (int32, two fp16) each divided by 2^shift (0 <= shift < 15, per pair): one `mul.rn.f16x2` on
    the pair where shift > 0 and nothing where it is 0 (the select keeps xp, so the pure asm is dropped there).
    As two fp16 multiplies the compiler swapped the halves around each one (PRMT, HMUL2, PRMT): this took
    4-bit 64 x 128 tiles on one warp from 1.50 / 1.94 to 1.34 / 1.88 SASS instructions per weight at 8 / 16
    rows, and 4-bit 8192x28672 at 16 rows from 49.3 to 48.0 us on an H200 (bit-equal outputs,
    bench/RESULTS.md 2026-12-04 19:10)."""
    half2 = ((15 - shift) << 10) * 0x10001  # 2^-shift as an fp16 bit pattern, in both halves
    scaled = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [xp, half2], dtype=tl.int32,
                                       is_pure=True, pack=1)
    return tl.where(shift == 0, xp, scaled)


@triton.jit
def _field3(w, I: tl.constexpr):
    """Pair I of a 3-bit fields-order word (`word_order.fields3`) as fp16 bit patterns q * 2^r * 2^-24
    (subnormals, exact; r = 3 (I % 3), `_x_pair_tile` divides the matching x by 2^r): I = 0-2 the field at
    bit 3I of each half, masked where it lies; I = 3, 4 the fields at bits 9 and 12, and I = 5 the split
    pair's bit 15 (as 2^6 times the bit), masked after a shift by 9 that the word's pairs share."""
    SHIFT: tl.constexpr = 0 if I < 3 else 9
    MASK: tl.constexpr = ((7 << (3 * (I % 3))) if I < 5 else 0x40) * 0x10001
    return tl.inline_asm_elementwise(
        "{\n.reg .b32 t;\n"
        f"shr.u32 t, $2, {SHIFT};\n"
        f"and.b32 t, t, {MASK};\n"
        "mov.b32 {$0, $1}, t;\n}",
        "=h,=h,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)


if AVAILABLE:
    @gluon.jit
    def _a_operand3(a, b, c, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, A_LAYOUT: gl.constexpr):
        """The MMA A operands of 3-bit blocks in the fields order, given as their three words [BLOCK_N,
        BLOCK_K // 32] each: the main one [BLOCK_N, BLOCK_K] (pairs 0-14 whole, pair 15 as its low bit; k in
        the dot's order 128 c + 16 (p >> 1) + 8 (p & 1) + 2 t + h over the block's 16 pairs) and the split
        pair's other two bits [BLOCK_N, BLOCK_K // 8] (k = 16 c + 8 s + 2 t + h, s = 0 its middle bit from
        word b, 1 its top bit from word c; `_split_b_operand` is the matching x)."""
        l0, h0 = _field3(a, 0)
        l1, h1 = _field3(a, 1)
        l2, h2 = _field3(a, 2)
        l3, h3 = _field3(a, 3)
        l4, h4 = _field3(a, 4)
        l5, h5 = _field3(b, 0)
        l6, h6 = _field3(b, 1)
        l7, h7 = _field3(b, 2)
        l8, h8 = _field3(b, 3)
        l9, h9 = _field3(b, 4)
        l10, h10 = _field3(c, 0)
        l11, h11 = _field3(c, 1)
        l12, h12 = _field3(c, 2)
        l13, h13 = _field3(c, 3)
        l14, h14 = _field3(c, 4)
        l15, h15 = _field3(a, 5)
        q0 = gl.join(gl.join(gl.join(l0, h0), gl.join(l1, h1)), gl.join(gl.join(l2, h2), gl.join(l3, h3)))
        q1 = gl.join(gl.join(gl.join(l4, h4), gl.join(l5, h5)), gl.join(gl.join(l6, h6), gl.join(l7, h7)))
        q2 = gl.join(gl.join(gl.join(l8, h8), gl.join(l9, h9)), gl.join(gl.join(l10, h10), gl.join(l11, h11)))
        q3 = gl.join(gl.join(gl.join(l12, h12), gl.join(l13, h13)), gl.join(gl.join(l14, h14), gl.join(l15, h15)))
        t = gl.join(gl.join(q0, q1), gl.join(q2, q3))  # (n, block, h, p0, p1, p2, p3)
        t = gl.reshape(t, [BLOCK_N, BLOCK_K // 128, 4, 2, 2, 2, 2, 2])  # (n, c, t, h, p0, p1, p2, p3)
        t = gl.permute(t, [0, 1, 7, 6, 5, 4, 2, 3])
        main = gl.convert_layout(gl.reshape(t, [BLOCK_N, BLOCK_K]), A_LAYOUT, assert_trivial=True)
        lb, hb = _field3(b, 5)
        lc, hc = _field3(c, 5)
        u = gl.join(gl.join(lb, hb), gl.join(lc, hc))  # (n, block, h, s)
        u = gl.permute(gl.reshape(u, [BLOCK_N, BLOCK_K // 128, 4, 2, 2]), [0, 1, 4, 2, 3])  # (n, c, s, t, h)
        split = gl.convert_layout(gl.reshape(u, [BLOCK_N, BLOCK_K // 8]), A_LAYOUT, assert_trivial=True)
        return main, split

    @gluon.jit
    def _a_operand(w, BITS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, A_LAYOUT: gl.constexpr):
        """The MMA's A operand [BLOCK_N, BLOCK_K] (q * 2^-24, fp16) of words w [BLOCK_N, BLOCK_K // vpw], k in
        the dot's order: joins, reshapes and the permute only rename registers (asserted)."""
        l0, h0 = _pair_q(w, 0, BITS)
        l1, h1 = _pair_q(w, 1, BITS)
        t = gl.join(gl.join(l0, h0), gl.join(l1, h1))  # (n, word, h, p)
        if BITS == 8:  # two pairs a word, a chunk one MMA k-step
            t = gl.reshape(t, [BLOCK_N, BLOCK_K // 16, 4, 2, 2])  # (n, c, t, h, p)
            t = gl.permute(t, [0, 1, 4, 2, 3])  # k = 16 c + 8 p + 2 t + h
        else:
            l2, h2 = _pair_q(w, 2, BITS)
            l3, h3 = _pair_q(w, 3, BITS)
            t = gl.join(t, gl.join(gl.join(l2, h2), gl.join(l3, h3)))
            if BITS == 4:
                t = gl.reshape(t, [BLOCK_N, BLOCK_K // 32, 4, 2, 2, 2])  # (n, c, t, h, p & 1, p >> 1)
                t = gl.permute(t, [0, 1, 5, 4, 2, 3])  # k = 32 c + 16 (p >> 1) + 8 (p & 1) + 2 t + h
            else:
                l4, h4 = _pair_q(w, 4, BITS)
                l5, h5 = _pair_q(w, 5, BITS)
                l6, h6 = _pair_q(w, 6, BITS)
                l7, h7 = _pair_q(w, 7, BITS)
                u = gl.join(gl.join(gl.join(l4, h4), gl.join(l5, h5)), gl.join(gl.join(l6, h6), gl.join(l7, h7)))
                t = gl.reshape(gl.join(t, u), [BLOCK_N, BLOCK_K // 64, 4, 2, 2, 2, 2])  # (n, c, t, h, p0, p1, p2)
                t = gl.permute(t, [0, 1, 6, 5, 4, 2, 3])  # k = 64 c + 16 (p >> 1) + 8 (p & 1) + 2 t + h
        return gl.convert_layout(gl.reshape(t, [BLOCK_N, BLOCK_K]), A_LAYOUT, assert_trivial=True)

    @gluon.jit
    def _mma_order(t, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr, C: gl.constexpr):
        """[BLOCK_N, C] from memory order to the MMA's row order (`mma_row_column`): memory column
        w 16T + s_hi 8L + g L + i0 2 + h (L = 2 HALF, i0 present when HALF is 2) becomes MMA row
        16 ((s_hi HALF + i0) num_warps + w) + 8 h + g. Only renames registers."""
        TILES: gl.constexpr = BLOCK_N // (16 * NUM_WARPS)
        HALF: gl.constexpr = 2 if TILES >= 2 else 1  # column_run // 2
        t = gl.permute(gl.reshape(t, [NUM_WARPS, TILES // HALF, 8, HALF, 2, C]), [1, 3, 0, 4, 2, 5])
        return gl.reshape(t, [BLOCK_N, C])

    @gluon.jit
    def _mma_order_1d(v, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr):
        """Per-column values [BLOCK_N] from memory order to the MMA's row order (`_mma_order`)."""
        return gl.reshape(_mma_order(gl.reshape(v, [BLOCK_N, 1]), BLOCK_N, NUM_WARPS, 1), [BLOCK_N])

    @gluon.jit
    def _memory_order(acc, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr, R: gl.constexpr):
        """The accumulator [BLOCK_N, R] from the MMA's row order back to memory order (`_mma_order`
        undone); only renames registers."""
        TILES: gl.constexpr = BLOCK_N // (16 * NUM_WARPS)
        HALF: gl.constexpr = 2 if TILES >= 2 else 1
        t = gl.permute(gl.reshape(acc, [TILES // HALF, HALF, NUM_WARPS, 2, 8, R]), [2, 0, 4, 1, 3, 5])
        return gl.reshape(t, [BLOCK_N, R])

    @gluon.jit
    def _b_operand(xp, shift, BITS: gl.constexpr, BLOCK_K: gl.constexpr, R: gl.constexpr, B_LAYOUT: gl.constexpr):
        """The MMA's B operand [BLOCK_K, R] (fp16, k in the dot's order) of x pairs loaded in x_layout, each
        pair divided by its weights' 2^r (r = `shift`, see _pair_q)."""
        return gl.convert_layout(_b_tile(xp, shift, BITS, BLOCK_K, R), B_LAYOUT, assert_trivial=True)

    @gluon.jit
    def _b_tile(xp, shift, BITS: gl.constexpr, BLOCK_K: gl.constexpr, R: gl.constexpr):
        """x pairs [BLOCK_K // 2, R] (int32, memory order, any layout) as fp16 [BLOCK_K, R] in the dot's k
        order, each pair divided by its weights' 2^r (r = `shift`, see _pair_q); the layout follows the input's."""
        xs = _scale_x_pairs(xp, shift)
        lo = (xs & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
        hi = (xs >> 16).to(gl.int16).to(gl.float16, bitcast=True)
        t = gl.join(lo, hi)  # (pair, m, h)
        if BITS == 8:
            t = gl.reshape(t, [BLOCK_K // 16, 4, 2, R, 2])  # (c, t, p, m, h)
            t = gl.permute(t, [0, 2, 1, 4, 3])
        elif BITS == 4:
            t = gl.reshape(t, [BLOCK_K // 32, 4, 2, 2, R, 2])  # (c, t, p >> 1, p & 1, m, h)
            t = gl.permute(t, [0, 2, 3, 1, 5, 4])
        elif BITS == 2:
            t = gl.reshape(t, [BLOCK_K // 64, 4, 2, 2, 2, R, 2])  # (c, t, p2, p1, p0, m, h)
            t = gl.permute(t, [0, 2, 3, 4, 1, 6, 5])
        else:  # 3 bits: 16 pairs a block (layout_bits 1)
            t = gl.reshape(t, [BLOCK_K // 128, 4, 2, 2, 2, 2, R, 2])  # (c, t, p3, p2, p1, p0, m, h)
            t = gl.permute(t, [0, 2, 3, 4, 5, 1, 7, 6])
        return gl.reshape(t, [BLOCK_K, R])

    @gluon.jit
    def _word_halves(w, KW: gl.constexpr):
        """Words [BLOCK_N, KW] -> word rows 0..KW/2-1 and KW/2..KW-1 (whole chunks: a register bit, free)."""
        return gl.split(gl.permute(gl.reshape(w, [w.shape[0], 2, KW // 2]), [0, 2, 1]))

    @gluon.jit
    def _k_halves(b, BLOCK_K: gl.constexpr, B_LAYOUT: gl.constexpr):
        """The B operand [BLOCK_K, R] (dot order) -> its first and second BLOCK_K / 2 values of k: whole chunks,
        so a register bit (asserted)."""
        b0, b1 = gl.split(gl.permute(gl.reshape(b, [2, BLOCK_K // 2, b.shape[1]]), [1, 2, 0]))
        return (gl.convert_layout(b0, B_LAYOUT, assert_trivial=True),
                gl.convert_layout(b1, B_LAYOUT, assert_trivial=True))

    @gluon.jit
    def _x_pair_tile(x_ptr, M, stride_xm, BLOCK_K: gl.constexpr, R: gl.constexpr, BITS: gl.constexpr,
                     LAYOUT: gl.constexpr):
        """Pointers to tile 0 of x as int32 pairs [BLOCK_K // 2, R] in LAYOUT (rows past M repeat row 0: their
        outputs are never stored), and each pair's r [BLOCK_K // 2, 1] (int32): pair p of a word holds its fields
        at bit r = BITS * (p % (8 // BITS)) of a byte, so x / 2^r (3 bits: `_field3`'s r of pair p of a block).
        r depends on the register only, so the compiler folds it (and skips the pairs with r = 0)."""
        pairs = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(1, LAYOUT))
        rows = gl.arange(0, R, layout=gl.SliceLayout(0, LAYOUT))
        rows = gl.where(rows < M, rows, 0)
        x_tile = (x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + rows[None, :] * (stride_xm // 2)
                  + pairs[:, None])
        if BITS == 3:  # fields order: pair p of a block at bit 3 ((p % 5) % 3) of its half, pair 15 at bit 6
            p = pairs % 16
            x_shift = gl.where(p == 15, 6, 3 * ((p % 5) % 3))[:, None]
        else:
            x_shift = (BITS * (pairs % (8 // BITS)))[:, None]
        return x_tile, x_shift

    @gluon.jit
    def _split_b_operand(xp, BLOCK_K: gl.constexpr, R: gl.constexpr, B_LAYOUT: gl.constexpr):
        """The B operand [BLOCK_K // 8, R] of the 3-bit split pair (`_a_operand3`'s second operand) from the
        tile's x pairs xp [BLOCK_K // 2, R] (`_x_pair_tile`, unscaled): pair 15 of each block, taken out of the
        registers (a block's 16 pairs are register bits), twice, divided by 2^5 and 2^4 (the middle and top
        bits come as 2^6 times the bit, so that gives 2 and 4 times it), in the 8-bit B order (q = 8 c + 2 t + s
        for block 4 c + t). Only renames registers: no load, no data moves."""
        t = gl.permute(gl.reshape(xp, [BLOCK_K // 32, 2, 2, 2, 2, R]), [0, 5, 4, 3, 2, 1])  # (block, m, p0..p3)
        _, t = gl.split(t)  # p3 = 1
        _, t = gl.split(t)  # p2 = 1
        _, t = gl.split(t)  # p1 = 1
        _, t = gl.split(t)  # p0 = 1: pair 15, [BLOCK_K // 32, R]
        pairs = gl.reshape(gl.permute(gl.join(_scale_x_pairs(t, 5), _scale_x_pairs(t, 4)), [0, 2, 1]),
                           [BLOCK_K // 16, R])
        return _b_operand(pairs, 0, 8, BLOCK_K // 8, R, B_LAYOUT)

    @gluon.jit
    def _zero_point_term(part, sums, s, z, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr, MMA: gl.constexpr):
        """s * (part - z sums) per column: part = W x and sums = sum(x) (both times 2^-24) in the MMA's row
        order, the scales and zeros s, z in memory order."""
        col: gl.constexpr = gl.SliceLayout(1, MMA)
        s_mma = gl.convert_layout(_mma_order_1d(s, BLOCK_N, NUM_WARPS), col, assert_trivial=True)
        z_mma = gl.convert_layout(_mma_order_1d(z, BLOCK_N, NUM_WARPS), col, assert_trivial=True)
        return s_mma.to(gl.float32)[:, None] * (part - z_mma.to(gl.float32)[:, None] * sums)

    @gluon.jit
    def _store_columns(acc, out_ptr, ws_ptr, bias_ptr, ticket_ptr, M, N, stride_om, nsplit, pid_n, pid_k,
                       BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr, R: gl.constexpr, SPLIT: gl.constexpr,
                       HAS_BIAS: gl.constexpr, OUT_LAYOUT: gl.constexpr):
        """The accumulator [BLOCK_N, R] (MMA row order, times 2^-24) renamed back to memory order and stored
        through the split-K epilogue, each lane's run of columns in one vector store."""
        acc = gl.convert_layout(_memory_order(acc * 16777216.0, BLOCK_N, NUM_WARPS, R), OUT_LAYOUT,
                                assert_trivial=True)  # 16777216: the A operands' 2^-24
        offs_m = gl.arange(0, R, layout=gl.SliceLayout(0, OUT_LAYOUT))
        n_c = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OUT_LAYOUT))
        omask = (offs_m < M)[None, :] & (n_c < N)[:, None]
        _store_tile(acc, out_ptr + offs_m[None, :] * stride_om + n_c[:, None],
                    ws_ptr + offs_m[None, :] * N + n_c[:, None], omask, bias_ptr, n_c, pid_k, pid_n, M, N, nsplit,
                    ticket_ptr, SPLIT, HAS_BIAS, False)

    @gluon.jit
    def _tile_words(w_tile, t, KW: gl.constexpr, N, BITS: gl.constexpr):
        """Tile t's words (3 bits: each block's three words a, b and c, rows 3i, 3i + 1, 3i + 2; other widths
        repeat the one word). Read once a call, so loaded evict-first: they leave the caches to x, scales and
        zeros (on an H200 -2 to -3.5% for this kernel, bench/RESULTS.md 2026-12-04 16:35)."""
        w = gl.load(w_tile + t * KW * N, eviction_policy="evict_first")
        wb = w
        wh = w
        if BITS == 3:
            wb = gl.load(w_tile + (t * KW + 1) * N, eviction_policy="evict_first")
            wh = gl.load(w_tile + (t * KW + 2) * N, eviction_policy="evict_first")
        return w, wb, wh

    @gluon.jit
    def _group_term(w, b, ones, s, z, BITS: gl.constexpr, BLOCK_N: gl.constexpr, GK: gl.constexpr,
                    R: gl.constexpr, NUM_WARPS: gl.constexpr, A_LAYOUT: gl.constexpr, MMA: gl.constexpr):
        """s * (W x - z sum(x)) over GK values of k of one group: words w [BLOCK_N, GK // vpw] in the MMA's row
        order, x's B operand b [GK, R], per-column scales and zeros s, z in memory order."""
        zero = gl.zeros([BLOCK_N, R], gl.float32, MMA)
        part = mma_v2(_a_operand(w, BITS, BLOCK_N, GK, A_LAYOUT), b, zero)
        sums = mma_v2(ones, b, zero)
        return _zero_point_term(part, sums, s, z, BLOCK_N, NUM_WARPS, MMA)

    @gluon.jit
    def gptq_mma_t_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                          M, N, K, stride_xm, stride_om, group_size, tiles_per_split, nsplit,
                          BITS: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                          SPLIT: gl.constexpr,
                          HAS_BIAS: gl.constexpr, W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
                          LOAD_LAYOUT: gl.constexpr, COL_LAYOUT: gl.constexpr, OUT_LAYOUT: gl.constexpr,
                          GROUPS: gl.constexpr = 1, WORDS_AHEAD: gl.constexpr = 1, X_AHEAD: gl.constexpr = 0,
                          PDL: gl.constexpr = False):
        """out[M, N] (+)= x[M, K] @ W for 1 <= M <= R (8 or 16) fp16 rows and half2-ordered 2/3/4/8-bit words, the K
        tiles of this program's split (grid axis 1); whole tiles only. See the module docstring.
        GROUPS = 2: a tile holds two groups (group_size = BLOCK_K / 2, 2 and 4 bits), each half of it an MMA of
        its own with its own scales and zeros: tiles twice as long as the group, so twice the bytes in flight
        a tile and half the loop's fixed costs per weight.
        WORDS_AHEAD, X_AHEAD: how far ahead the words and x are requested (`PIPELINES`); words load
        evict-first (`_tile_words`).
        PDL (launched as a programmatic dependent launch, sm_90+): the first tiles' words, scales and zeros
        (constants) are requested before waiting for the previous kernel (act-order's gather, x's producer),
        so this kernel's start overlaps that one; x, the output and the split scratch only after the wait."""
        KW: gl.constexpr = BLOCK_K * BITS // 32  # word rows a tile
        LW: gl.constexpr = BLOCK_K // 32 if BITS == 3 else KW  # rows of the layouts: one per 3-bit block
        num_warps: gl.constexpr = gl.num_warps()
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        t0 = pid_k * tiles_per_split
        t_end = gl.minimum(t0 + tiles_per_split, K // BLOCK_K)

        # words, scales and zeros are loaded in memory order (a lane's run of columns in one load) and renamed
        # into the MMA's row order; the output store maps each MMA row back to its column
        r_w = gl.arange(0, LW, layout=gl.SliceLayout(0, LOAD_LAYOUT))
        if BITS == 3:  # a block's words a, b and c lie in rows 3i, 3i + 1, 3i + 2
            r_w = 3 * r_w
        n_w = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD_LAYOUT))
        w_tile = qw_ptr + r_w[None, :] * N + n_w[:, None]
        n_sz = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=COL_LAYOUT)
        x_tile, x_shift = _x_pair_tile(x_ptr, M, stride_xm, BLOCK_K, R, BITS, X_LAYOUT)
        ONE: gl.constexpr = 0x01010101 if BITS == 8 else 0x11111111 if BITS == 4 else 0x55555555  # every field 1
        if BITS == 3:
            one = gl.full([BLOCK_N, LW], ONES3, gl.int32, W_LAYOUT)
            ones, _unused = _a_operand3(one, one, one, BLOCK_N, BLOCK_K, a_layout)
        else:
            ones = _a_operand(gl.full([BLOCK_N, KW], ONE, gl.int32, W_LAYOUT), BITS, BLOCK_N, BLOCK_K, a_layout)

        if GROUPS == 2:
            ones_half, _unused = _word_halves(gl.full([BLOCK_N, KW], ONE, gl.int32, W_LAYOUT), KW)
            ones2 = _a_operand(ones_half, BITS, BLOCK_N, BLOCK_K // 2, a_layout)
        # runs of GROUPS groups step with the tiles (GROUPS = 2: tile t holds groups 2t and 2t + 1)
        g, left, per_group = _first_group(t0, K, group_size * GROUPS, BLOCK_K)
        g = g * GROUPS
        g_last = (t_end - 1) // per_group * GROUPS
        w, wb, wh = _tile_words(w_tile, t0, KW, N, BITS)
        if X_AHEAD == 1 and not PDL:
            xp = gl.load(x_tile + t0 * (BLOCK_K // 2))
        if WORDS_AHEAD == 2:  # tile t0 + 1's words in flight too
            w_ahead, wb_ahead, wh_ahead = _tile_words(w_tile, gl.minimum(t0 + 1, t_end - 1), KW, N, BITS)
        z = gl.load(z_ptr + g * N + n_sz)
        s = gl.load(s_ptr + g * N + n_sz)
        if GROUPS == 2:
            z2 = gl.load(z_ptr + (g + 1) * N + n_sz)
            s2 = gl.load(s_ptr + (g + 1) * N + n_sz)
        if PDL:
            gdc_wait()  # the previous kernel (x's producer, the scratch's last user) has finished
            gdc_launch_dependents()  # the next kernel may start its own weight reads now
            if X_AHEAD == 1:
                xp = gl.load(x_tile + t0 * (BLOCK_K // 2))
        acc = gl.zeros([BLOCK_N, R], gl.float32, mma)
        for t in range(t0, t_end):
            tn = gl.minimum(t + 1, t_end - 1)
            tw = gl.minimum(t + WORDS_AHEAD, t_end - 1)  # the tile whose words are requested now
            g, left = _next_group(g, left, per_group, GROUPS)
            gn = gl.minimum(g, g_last)
            w_next, wb_next, wh_next = _tile_words(w_tile, tw, KW, N, BITS)
            if X_AHEAD == 1:
                x_next = gl.load(x_tile + tn * (BLOCK_K // 2))
            else:  # x is small and cached: requested in its own iteration, it holds no registers a tile ahead
                xp = gl.load(x_tile + t * (BLOCK_K // 2))
            z_next = gl.load(z_ptr + gn * N + n_sz)
            s_next = gl.load(s_ptr + gn * N + n_sz)
            if GROUPS == 2:
                z2_next = gl.load(z_ptr + (gn + 1) * N + n_sz)
                s2_next = gl.load(s_ptr + (gn + 1) * N + n_sz)
            w_mma = gl.convert_layout(_mma_order(w, BLOCK_N, num_warps, LW), W_LAYOUT, assert_trivial=True)
            if GROUPS == 2:
                w0, w1 = _word_halves(w_mma, KW)
                b0, b1 = _k_halves(_b_tile(xp, x_shift, BITS, BLOCK_K, R), BLOCK_K, b_layout)
                acc += _group_term(w0, b0, ones2, s, z, BITS, BLOCK_N, BLOCK_K // 2, R, num_warps, a_layout, mma)
                acc += _group_term(w1, b1, ones2, s2, z2, BITS, BLOCK_N, BLOCK_K // 2, R, num_warps, a_layout, mma)
            else:
                b = _b_operand(xp, x_shift, BITS, BLOCK_K, R, b_layout)
                zero = gl.zeros([BLOCK_N, R], gl.float32, mma)
                if BITS == 3:
                    wb_mma = gl.convert_layout(_mma_order(wb, BLOCK_N, num_warps, LW), W_LAYOUT,
                                               assert_trivial=True)
                    wh_mma = gl.convert_layout(_mma_order(wh, BLOCK_N, num_warps, LW), W_LAYOUT,
                                               assert_trivial=True)
                    a, a2 = _a_operand3(w_mma, wb_mma, wh_mma, BLOCK_N, BLOCK_K, a_layout)
                    b2 = _split_b_operand(xp, BLOCK_K, R, b_layout)
                    part = mma_v2(a2, b2, mma_v2(a, b, zero))
                else:
                    part = mma_v2(_a_operand(w_mma, BITS, BLOCK_N, BLOCK_K, a_layout), b, zero)
                acc += _zero_point_term(part, mma_v2(ones, b, zero), s, z, BLOCK_N, num_warps, mma)
            if WORDS_AHEAD == 2:
                w, wb, wh = w_ahead, wb_ahead, wh_ahead
                w_ahead, wb_ahead, wh_ahead = w_next, wb_next, wh_next
            else:
                w, wb, wh = w_next, wb_next, wh_next
            if X_AHEAD == 1:
                xp = x_next
            z = z_next
            s = s_next
            if GROUPS == 2:
                z2 = z2_next
                s2 = s2_next

        _store_columns(acc, out_ptr, ws_ptr, bias_ptr, ticket_ptr, M, N, stride_om, nsplit, pid_n, pid_k, BLOCK_N,
                       num_warps, R, SPLIT, HAS_BIAS, OUT_LAYOUT)
