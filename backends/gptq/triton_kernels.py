"""Triton kernels for `y = x @ dequant(qweight)` straight from the packed GPTQ format (2/3/4/8 bits).

Why these shapes of work:
- Decoding (M <= 16) is bound by reading the weights: the kernel reads each packed word once, with
  many programs in flight. When N alone gives too few, K is split: each split writes fp32 partials to a
  workspace and the last split of a column tile to finish (an atomic ticket) sums them, adds the bias
  and writes the output, then resets its ticket: one launch per layer, no zero-fill or cast kernels.
  M = 1 multiplies on the CUDA cores; 2 <= M <= 64 uses tensor cores (tl.dot) on the unpacked codes.
- Both apply the group's scale and zero after the dot: sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k),
  so the inner loop only unpacks and multiplies. That needs one group per K tile (BLOCK_K divides the
  group size); other group sizes go through the dequantize kernel.
- Prefill (large M) dequantizes once into a reusable fp16 buffer and calls cuBLAS, which beats a fused
  GEMM once the matrix product, not the weight read, is the cost.
Rows arrive sorted by group (act-order is undone at load, see quant_linear.py); `perm` gathers the
activations in that order inside the kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

try:  # programmatic dependent launch (sm_90+): see gptq_gemv_h2_kernel's PDL
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: kernels are only ever launched with PDL=False
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _unpack_tile(qw_ptr, N, Kw, kb0, offs_n, mask_n,
                 BITS: tl.constexpr, KB: tl.constexpr, VPB: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Codes [KB, VPB, BLOCK_N] (uint32) of value blocks kb0 .. kb0+KB-1, each word loaded once. A block
    is the run of values that fills whole words: 32/BITS values in one word, or 32 in 3 words (3 bits)."""
    offs_kb = kb0 + tl.arange(0, KB)
    if BITS == 3 and INTERLEAVED:
        row = offs_kb * 3
        m = (row[:, None] < Kw) & mask_n[None, :]
        p = qw_ptr + row[:, None] * N + offs_n[None, :]
        w0 = tl.load(p, mask=m, other=0).to(tl.uint32, bitcast=True)
        w1 = tl.load(p + N, mask=m, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(p + 2 * N, mask=m, other=0).to(tl.uint32, bitcast=True)
        if INTERLEAVED == 2:
            v = _fields3(w0, w1, w2)
        else:
            v = _planes3(w0, w1, w2)
    elif BITS == 3:
        row = offs_kb * 3
        m = (row[:, None] < Kw) & mask_n[None, :]
        p = qw_ptr + row[:, None] * N + offs_n[None, :]
        w0 = tl.load(p, mask=m, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        w1 = tl.load(p + N, mask=m, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        w2 = tl.load(p + 2 * N, mask=m, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        pos = tl.arange(0, 32) * 3
        widx = (pos // 32)[None, :, None]
        sh = (pos % 32).to(tl.uint32)[None, :, None]
        lo = tl.where(widx == 0, w0, tl.where(widx == 1, w1, w2))
        nxt = tl.where(widx == 0, w1, w2)
        straddle = sh > 29  # values 10 and 21 span two words
        spill = tl.where(straddle, nxt << tl.where(straddle, 32 - sh, 0), 0)
        v = ((lo >> sh) | spill) & 7
    else:
        m = (offs_kb[:, None] < Kw) & mask_n[None, :]
        w = tl.load(qw_ptr + offs_kb[:, None] * N + offs_n[None, :], mask=m, other=0)
        w = w.to(tl.uint32, bitcast=True)
        sh = _slot_shift(tl.arange(0, VPB), BITS, INTERLEAVED)
        v = (w[:, None, :] >> sh[None, :, None]) & ((1 << BITS) - 1)
    return v


@triton.jit
def _hi_plane_shift(j):
    """word_order.hi_plane_bit of value j (0..31) of a 3-bit block."""
    pair = j // 2
    group = pair // 4
    return ((group % 2) + 8 * (group // 2) + 2 * (pair % 4) + 16 * (j % 2)).to(tl.uint32)


@triton.jit
def _planes3(w0, w1, w2):
    """Codes [KB, 32, BLOCK_N] of 3-bit blocks in the planes order of word_order.interleave_pairs:
    low 2 bits of values 0-15 in w0 and 16-31 in w1 (2-bit pair order), third bits in w2."""
    j = tl.arange(0, 32)
    i = j % 16
    lo_shift = ((i % 2) * 16 + (i // 2) * 2).to(tl.uint32)[None, :, None]
    lo = tl.where((j < 16)[None, :, None], w0[:, None, :], w1[:, None, :])
    hi = (w2[:, None, :] >> _hi_plane_shift(j)[None, :, None]) & 1
    return ((lo >> lo_shift) & 3) | (hi << 2)


@triton.jit
def _fields3_value(w0, w1, w2, j):
    """Value j (0..31, broadcast against the words) of 3-bit blocks in the fields order of
    word_order.fields3: pairs 0-14 whole fields at bit 3 (p % 5) of word p // 5's half, pair 15's
    three bits in bit 15 of the halves of words 0, 1, 2."""
    pair = j // 2
    half = ((j % 2) * 16).to(tl.uint32)
    word = pair // 5
    field = (tl.where(word == 0, w0, tl.where(word == 1, w1, w2)) >> (half + (3 * (pair % 5)).to(tl.uint32))) & 7
    top = half + 15
    split = ((w0 >> top) & 1) | (((w1 >> top) & 1) << 1) | (((w2 >> top) & 1) << 2)
    return tl.where(pair == 15, split, field)


@triton.jit
def _fields3(w0, w1, w2):
    """Codes [KB, 32, BLOCK_N] of 3-bit blocks in the fields order (word_order.fields3)."""
    j = tl.arange(0, 32)[None, :, None]
    return _fields3_value(w0[:, None, :], w1[:, None, :], w2[:, None, :], j)


@triton.jit
def _slot_shift(j, BITS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Bit offset (uint32) of value j of a word: j * BITS in the checkpoint's order; in the interleaved
    order of `interleave_pairs` values 2p and 2p+1 sit in the low and high halves, at bit p * BITS."""
    if INTERLEAVED:
        return ((j % 2) * 16 + (j // 2) * BITS).to(tl.uint32)
    else:
        return (j * BITS).to(tl.uint32)


@triton.jit
def _unpack_rows(qw_ptr, N, K, k0, offs_n, mask_n, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                 INTERLEAVED: tl.constexpr):
    """Codes [BLOCK_K, BLOCK_N] (uint32) of rows k0 .. k0+BLOCK_K-1, one row at a time: a word is
    loaded once per value it holds (the repeats hit L1), but no reshape is needed for tl.dot."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m = (offs_k < K)[:, None] & mask_n[None, :]
    if BITS == 3 and INTERLEAVED == 2:
        ptr = qw_ptr + ((offs_k // 32) * 3)[:, None] * N + offs_n[None, :]
        w0 = tl.load(ptr, mask=m, other=0).to(tl.uint32, bitcast=True)
        w1 = tl.load(ptr + N, mask=m, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(ptr + 2 * N, mask=m, other=0).to(tl.uint32, bitcast=True)
        v = _fields3_value(w0, w1, w2, (offs_k % 32)[:, None])
    elif BITS == 3 and INTERLEAVED:
        block = offs_k // 32
        j = offs_k % 32
        i = j % 16
        lo = tl.load(qw_ptr + (block * 3 + j // 16)[:, None] * N + offs_n[None, :], mask=m, other=0)
        hi = tl.load(qw_ptr + (block * 3 + 2)[:, None] * N + offs_n[None, :], mask=m, other=0)
        lo = (lo.to(tl.uint32, bitcast=True) >> ((i % 2) * 16 + (i // 2) * 2).to(tl.uint32)[:, None]) & 3
        hi = (hi.to(tl.uint32, bitcast=True) >> _hi_plane_shift(j)[:, None]) & 1
        v = lo | (hi << 2)
    elif BITS == 3:
        p = (offs_k % 32) * 3
        row = (offs_k // 32) * 3 + p // 32
        sh = (p % 32).to(tl.uint32)[:, None]
        ptr = qw_ptr + row[:, None] * N + offs_n[None, :]
        lo = tl.load(ptr, mask=m, other=0).to(tl.uint32, bitcast=True)
        straddle = sh > 29
        hi = tl.load(ptr + N, mask=m & straddle, other=0).to(tl.uint32, bitcast=True)
        v = ((lo >> sh) | (hi << tl.where(straddle, 32 - sh, 0))) & 7
    else:
        VPW: tl.constexpr = 32 // BITS
        sh = _slot_shift(offs_k % VPW, BITS, INTERLEAVED)[:, None]
        w = tl.load(qw_ptr + (offs_k // VPW)[:, None] * N + offs_n[None, :], mask=m, other=0)
        v = (w.to(tl.uint32, bitcast=True) >> sh) & ((1 << BITS) - 1)
    return v


@triton.jit
def _as_f32(v):
    """uint32 codes (< 2^23) to float32 without an int->float conversion (slow on the GPU): the code
    goes into the mantissa of 2^23, which is then subtracted (exact)."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _word_rows(qw_ptr, N, Kw, kb0, w_off: tl.constexpr, WPB: tl.constexpr, offs_n, mask_n, KB: tl.constexpr):
    """Word w_off of each of the KB value blocks starting at kb0: uint32 [KB, BLOCK_N]."""
    row = (kb0 + tl.arange(0, KB)) * WPB + w_off
    m = (row[:, None] < Kw) & mask_n[None, :]
    w = tl.load(qw_ptr + row[:, None] * N + offs_n[None, :], mask=m, other=0)
    return w.to(tl.uint32, bitcast=True)


@triton.jit
def _field(w_lo, w_hi, pos: tl.constexpr, BITS: tl.constexpr, TARGET: tl.constexpr):
    """The BITS-bit field starting at bit `pos` of a 32-bit word (continuing into w_hi when it
    straddles), moved to bit TARGET, all other bits zero. Constant shifts: two instructions."""
    if pos + BITS > 32:
        v = ((w_lo >> pos) | (w_hi << (32 - pos))) & ((1 << BITS) - 1)
        return v << TARGET
    elif pos <= TARGET:
        return (w_lo << (TARGET - pos)) & (((1 << BITS) - 1) << TARGET)
    else:
        return (w_lo >> (pos - TARGET)) & (((1 << BITS) - 1) << TARGET)


@triton.jit
def _window_field(w_lo, w_hi, pos: tl.constexpr, BITS: tl.constexpr):
    """The field at bit `pos` as float32 2^(23-T) + q, with q moved to a bit T in [12, 12+W): the
    exponent is chosen per T, so no int->float conversion is needed, and since T - pos is a multiple
    of W the few shifted copies of a word are shared by several value slots."""
    W: tl.constexpr = 9 if BITS == 3 else (4 if BITS == 8 else 8)
    T: tl.constexpr = 12 + (((pos - 12) % W + W) % W) * (pos + BITS <= 32)
    if pos + BITS > 32:  # a 3-bit value straddling two words
        v = (((w_lo >> pos) | (w_hi << (32 - pos))) & ((1 << BITS) - 1)) << T
    else:
        if pos >= T:
            v = (w_lo >> (pos - T)) & (((1 << BITS) - 1) << T)
        else:
            v = (w_lo << (T - pos)) & (((1 << BITS) - 1) << T)
    return (v + ((150 - T) << 23)).to(tl.float32, bitcast=True)  # + not |: one immediate per op


@triton.jit
def _window_offset(pos: tl.constexpr, BITS: tl.constexpr):
    """2^(23-T) for the slot at bit `pos`, the constant _window_field adds to q."""
    W: tl.constexpr = 9 if BITS == 3 else (4 if BITS == 8 else 8)
    T: tl.constexpr = 12 + (((pos - 12) % W + W) % W) * (pos + BITS <= 32)
    return 1 << (23 - T)


@triton.jit
def _unrolled_slot(acc2, corr, w0, w1, w2, x_ptr, src_base, mask_kb, offs_m, mask_m, stride_xm, perm_ptr,
                   j: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, HAS_PERM: tl.constexpr,
                   INTERLEAVED: tl.constexpr):
    """Value slot j of _unrolled_tile. Its own function so the bit positions are constexprs: Triton 3.6
    turns a name bound to a plain int into a tensor (the shifts would not be constants, and
    _window_field's `if` would not compile), and an annotated constexpr cannot be rebound in an
    unrolled loop."""
    k = src_base + j  # [KB]
    if HAS_PERM:
        k = tl.load(perm_ptr + k, mask=mask_kb, other=0)
    if (BITS == 3) & INTERLEAVED:  # planes order (M > 1 only): low bits of j, then its third bit
        i: tl.constexpr = j % 16
        pair: tl.constexpr = j // 2  # hpos: word_order.hi_plane_bit(j)
        hpos: tl.constexpr = (pair // 4) % 2 + 8 * (pair // 8) + 2 * (pair % 4) + 16 * (j % 2)
        if j < 16:
            q3 = _field(w0, w0, (i % 2) * 16 + (i // 2) * 2, 2, 0)
        else:
            q3 = _field(w1, w1, (i % 2) * 16 + (i // 2) * 2, 2, 0)
        q = ((q3 | _field(w2, w2, hpos, 1, 2)) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
        xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & mask_kb[None, :],
                     other=0)
        acc2 = tl.dot(xj, q, acc2)
    else:
        bit: tl.constexpr = (j % 2) * 16 + (j // 2) * BITS if INTERLEAVED else BITS * j
        widx: tl.constexpr = bit // 32
        pos: tl.constexpr = bit % 32
        lo = w0 if widx == 0 else (w1 if widx == 1 else w2)
        hi = w1 if widx == 0 else w2
        if BLOCK_M == 1:
            xj = tl.load(x_ptr + k, mask=mask_kb, other=0).to(tl.float32)
            acc2 += _window_field(lo, hi, pos, BITS) * xj[:, None]
            corr += _window_offset(pos, BITS) * tl.sum(xj, axis=0)
        else:
            q = (_field(lo, hi, pos, BITS, 0) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
            xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                         mask=mask_m[:, None] & mask_kb[None, :], other=0)
            acc2 = tl.dot(xj, q, acc2)
    return acc2, corr


@triton.jit
def _unrolled_tile(acc2, x_ptr, src_base, mask_kb, qw_ptr, N, Kw, kb0, offs_n, mask_n, offs_m, mask_m, stride_xm,
                   BITS: tl.constexpr, VPB: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr,
                   HAS_PERM: tl.constexpr, perm_ptr, INTERLEAVED: tl.constexpr):
    """One K tile, unrolled over the values of a word so every shift is a constant. M = 1: acc2 [KB, N]
    += x_k * (C_j + q) (see _window_field), corr = sum_k x_k C_j, so sum acc2 - corr = sum x q.
    M > 1: acc2 [M, N] += x_j @ (1024 + q_j) in fp16 on tensor cores, one dot per value slot j."""
    WPB: tl.constexpr = 3 if BITS == 3 else 1
    w0 = _word_rows(qw_ptr, N, Kw, kb0, 0, WPB, offs_n, mask_n, KB)
    if BITS == 3:
        w1 = _word_rows(qw_ptr, N, Kw, kb0, 1, WPB, offs_n, mask_n, KB)
        w2 = _word_rows(qw_ptr, N, Kw, kb0, 2, WPB, offs_n, mask_n, KB)
    else:
        w1 = w0
        w2 = w0
    corr = tl.sum(tl.zeros([KB], dtype=tl.float32), axis=0)
    for j in tl.static_range(VPB):
        acc2, corr = _unrolled_slot(acc2, corr, w0, w1, w2, x_ptr, src_base, mask_kb, offs_m, mask_m, stride_xm,
                                    perm_ptr, j, BITS, BLOCK_M, HAS_PERM, INTERLEAVED)
    return acc2, corr


@triton.jit
def _program_tiles(N, K, tiles_per_split, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's output columns (grid axis 0) and the K tiles of its split (grid axis 1), never
    past the last tile of K (the last split may be shorter)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t0 = pid_k * tiles_per_split
    return pid_n, pid_k, offs_n, offs_n < N, t0, tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BLOCK_K))


@triton.jit
def _first_group(t0, K, group_size, BLOCK_K: tl.constexpr):
    """The group of K tile t0, the tiles left in it (t0 included) and the tiles per group, so the loop
    steps the group with _next_group instead of dividing by the runtime group size on every tile
    (~20 instructions per tile on the GPU). A tile never straddles groups: BLOCK_K divides the group
    size, or one group covers K."""
    per_group = tl.where(group_size >= K, 1 << 30, group_size // BLOCK_K)
    return t0 // per_group, per_group - t0 % per_group, per_group


@triton.jit
def _next_group(g, left, per_group, STEP: tl.constexpr = 1):
    """The group and tiles left after one more tile (see _first_group); STEP: groups a tile holds (the
    Gluon kernel's tiles of two groups count groups in steps of two)."""
    left = left - 1
    done = left == 0
    return tl.where(done, g + STEP, g), tl.where(done, per_group, left)


@triton.jit
def gptq_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                     M, N, K, Kw, stride_xm, stride_om, group_size, tiles_per_split, nsplit,
                     BITS: tl.constexpr, VPB: tl.constexpr, KB: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
                     INTERLEAVED: tl.constexpr):
    """out[M, N] (+)= x[M, K] @ W for the K range of this program's split. MODE picks how codes are
    unpacked: 0 per word into a 3-D tile (reshaped for tl.dot), 1 per row (repeated word loads),
    2 unrolled over the value slots of a word with constant shifts (fp16 activations for M > 1)."""
    BLOCK_K: tl.constexpr = KB * VPB
    pid_n, pid_k, offs_n, mask_n, t0, t_end = _program_tiles(N, K, tiles_per_split, BLOCK_N, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if BLOCK_M == 1:
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    g, left, per_group = _first_group(t0, K, group_size, BLOCK_K)
    for t in range(t0, t_end):
        k0 = t * BLOCK_K
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        g, left = _next_group(g, left, per_group)
        if MODE == 2:
            src_base = k0 + tl.arange(0, KB) * VPB
            mask_kb = src_base < K  # K is a multiple of VPB: a block is all in or all out
            offs_t = k0 + tl.arange(0, BLOCK_K)
            mask_t = offs_t < K
            if HAS_PERM:
                offs_t = tl.load(perm_ptr + offs_t, mask=mask_t, other=0)
            if BLOCK_M == 1:
                sx = tl.sum(tl.load(x_ptr + offs_t, mask=mask_t, other=0).to(tl.float32), axis=0)
                acc2 = tl.zeros([KB, BLOCK_N], dtype=tl.float32)
                acc2, corr = _unrolled_tile(acc2, x_ptr, src_base, mask_kb, qw_ptr, N, Kw, t * KB, offs_n, mask_n,
                                            offs_m, mask_m, stride_xm, BITS, VPB, KB, BLOCK_M, HAS_PERM, perm_ptr,
                                            INTERLEAVED)
                part = tl.sum(acc2, axis=0) - corr  # = sum_k x_k q_k
                acc1 += s * (part - z * sx)
            else:
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_t[None, :],
                             mask=mask_m[:, None] & mask_t[None, :], other=0)
                sx = tl.sum(xt.to(tl.float32), axis=1)
                part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                part, _ = _unrolled_tile(part, x_ptr, src_base, mask_kb, qw_ptr, N, Kw, t * KB, offs_n, mask_n,
                                      offs_m, mask_m, stride_xm, BITS, VPB, KB, BLOCK_M, HAS_PERM, perm_ptr,
                                            INTERLEAVED)
                acc += s[None, :] * (part - (z[None, :] + 1024.0) * sx[:, None])
        else:
            if MODE == 1:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                v = _unpack_rows(qw_ptr, N, K, k0, offs_n, mask_n, BITS, BLOCK_K, INTERLEAVED)
            else:
                offs_k = k0 + tl.arange(0, KB)[:, None] * VPB + tl.arange(0, VPB)[None, :]  # [KB, VPB]
                v = _unpack_tile(qw_ptr, N, Kw, t * KB, offs_n, mask_n, BITS, KB, VPB, INTERLEAVED)
            mask_k = offs_k < K
            if HAS_PERM:
                src = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
            else:
                src = offs_k
            if BLOCK_M == 1:
                x = tl.load(x_ptr + src, mask=mask_k, other=0).to(tl.float32)
                if MODE == 1:
                    part = tl.sum(_as_f32(v) * x[:, None], axis=0)
                    sx = tl.sum(x, axis=0)
                else:
                    part = tl.sum(tl.sum(_as_f32(v) * x[:, :, None], axis=1), axis=0)
                    sx = tl.sum(tl.sum(x, axis=1), axis=0)
                acc1 += s * (part - z * sx)
            else:
                if MODE == 0:
                    src = tl.reshape(src, [BLOCK_K])
                    mask_k = tl.reshape(mask_k, [BLOCK_K])
                    v = tl.reshape(v, [BLOCK_K, BLOCK_N])
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :],
                            mask=mask_m[:, None] & mask_k[None, :], other=0)
                if x.dtype == tl.float16:
                    # 1024 + q as fp16 straight from the bits (0x6400 is 1024), no int->float conversion
                    q = (v | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
                    offset = 1024.0
                else:
                    q = v.to(x.dtype)
                    offset = 0.0
                part = tl.dot(x, q)
                sx = tl.sum(x.to(tl.float32), axis=1)
                acc += s[None, :] * (part - (z[None, :] + offset) * sx[:, None])
    if BLOCK_M == 1:
        acc = acc1[None, :]
    _finish(acc, out_ptr, bias_ptr, ws_ptr, ticket_ptr, offs_m, offs_n, mask_m, mask_n, M, N, stride_om,
            pid_n, pid_k, nsplit, SPLIT, HAS_BIAS)


@triton.jit
def _load_words(qw_ptr, N, kb0, offs_n, mask_n, row_end, BITS: tl.constexpr, KB: tl.constexpr,
                EVEN: tl.constexpr = False, WPB: tl.constexpr = 0):
    """The words of value blocks kb0 .. kb0+KB-1 as uint32 [KB, BLOCK_N] tiles, one per word of a block
    (WPB words; by default three at 3 bits, else one), zero past row_end (the end of this program's split,
    so prefetching never reads the next split). EVEN: every row and column is inside the matrix (the
    caller guarantees it): no masks. Words a block does not have repeat w0 (the compiler drops them).
    Evict-first: a call reads each word once, so the words should not push x, scales and zeros out of
    L1 and L2: on an H200 this took the half2 kernel at one row from 35.5 to 33.3 us on 8192x28672
    (80.5% -> 86.5% of copy) and -5% / -3% on 4-bit 4096x11008 / 3-bit (bench/RESULTS.md, 2026-12-04)."""
    W: tl.constexpr = WPB if WPB else (3 if BITS == 3 else 1)
    # a loop-invariant tile of offsets plus one scalar per step: fewer address instructions in the loop
    p = (qw_ptr + (tl.arange(0, KB) * W)[:, None] * N + offs_n[None, :]) + kb0 * W * N
    if EVEN:
        w0 = tl.load(p, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        w1 = w0
        w2 = w0
        if W >= 2:
            w1 = tl.load(p + N, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        if W == 3:
            w2 = tl.load(p + 2 * N, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
    else:
        first = (kb0 + tl.arange(0, KB)) * W
        m = (first[:, None] < row_end) & mask_n[None, :]
        w0 = tl.load(p, eviction_policy="evict_first", mask=m, other=0).to(tl.uint32, bitcast=True)
        w1 = w0
        w2 = w0
        if W >= 2:  # a block's later words have their own bound (an odd number of 4-bit word rows)
            w1 = tl.load(p + N, eviction_policy="evict_first", mask=((first + 1)[:, None] < row_end) & mask_n[None, :],
                         other=0).to(tl.uint32, bitcast=True)
        if W == 3:
            w2 = tl.load(p + 2 * N, eviction_policy="evict_first",
                         mask=((first + 2)[:, None] < row_end) & mask_n[None, :], other=0).to(tl.uint32, bitcast=True)
    return w0, w1, w2


@triton.jit
def _scale_zero(s_ptr, z_ptr, g, N, offs_n, mask_n, EVEN: tl.constexpr):
    """Group g's scales (fp32) and zeros (uint32) of the tile's columns; unmasked on whole tiles."""
    if EVEN:
        return tl.load(s_ptr + g * N + offs_n).to(tl.float32), tl.load(z_ptr + g * N + offs_n).to(tl.uint32)
    else:
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        return s, tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.uint32)


@triton.jit
def _unpack_words(w0, w1, w2, BITS: tl.constexpr, VPB: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Codes [KB, VPB, BLOCK_N] (uint32) from the word tiles of _load_words."""
    if BITS == 3 and INTERLEAVED == 2:
        v = _fields3(w0, w1, w2)
    elif BITS == 3 and INTERLEAVED:
        v = _planes3(w0, w1, w2)
    elif BITS == 3:
        pos = tl.arange(0, 32) * 3
        widx = (pos // 32)[None, :, None]
        sh = (pos % 32).to(tl.uint32)[None, :, None]
        a = w0[:, None, :]
        b = w1[:, None, :]
        c = w2[:, None, :]
        lo = tl.where(widx == 0, a, tl.where(widx == 1, b, c))
        nxt = tl.where(widx == 0, b, c)
        straddle = sh > 29
        spill = tl.where(straddle, nxt << tl.where(straddle, 32 - sh, 0), 0)
        v = ((lo >> sh) | spill) & 7
    else:
        sh = _slot_shift(tl.arange(0, VPB), BITS, INTERLEAVED)
        v = (w0[:, None, :] >> sh[None, :, None]) & ((1 << BITS) - 1)
    return v


@triton.jit
def gptq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                     N, K, Kw, group_size, tiles_per_split, nsplit,
                     BITS: tl.constexpr, VPB: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     INTERLEAVED: tl.constexpr):
    """out[1, N] = x[1, K] @ W (+ bias): the decoding path. Words of the next K tile are loaded while
    the current one is unpacked and multiplied (register double-buffering), so each program keeps a
    tile of reads in flight instead of waiting for memory once per tile."""
    BLOCK_K: tl.constexpr = KB * VPB
    WPB: tl.constexpr = 3 if BITS == 3 else 1
    pid_n, pid_k, offs_n, mask_n, t0, t_end = _program_tiles(N, K, tiles_per_split, BLOCK_N, BLOCK_K)
    row_end = tl.minimum(Kw, t_end * KB * WPB)
    in_blk = tl.arange(0, KB)[:, None] * VPB + tl.arange(0, VPB)[None, :]
    w0, w1, w2 = _load_words(qw_ptr, N, t0 * KB, offs_n, mask_n, row_end, BITS, KB)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    g, left, per_group = _first_group(t0, K, group_size, BLOCK_K)
    for t in range(t0, t_end):
        n0, n1, n2 = _load_words(qw_ptr, N, (t + 1) * KB, offs_n, mask_n, row_end, BITS, KB)
        k0 = t * BLOCK_K
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        g, left = _next_group(g, left, per_group)
        offs_k = k0 + in_blk
        mask_k = offs_k < K
        if HAS_PERM:
            src = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            src = offs_k
        x = tl.load(x_ptr + src, mask=mask_k, other=0).to(tl.float32)
        v = _unpack_words(w0, w1, w2, BITS, VPB, INTERLEAVED)
        part = tl.sum(tl.sum(_as_f32(v) * x[:, :, None], axis=1), axis=0)
        sx = tl.sum(tl.sum(x, axis=1), axis=0)
        acc += s * (part - z * sx)
        w0 = n0
        w1 = n1
        w2 = n2
    offs_m = tl.arange(0, 1)
    _finish(acc[None, :], out_ptr, bias_ptr, ws_ptr, ticket_ptr, offs_m, offs_n, offs_m < 1, mask_n, 1, N, N,
            pid_n, pid_k, nsplit, SPLIT, HAS_BIAS)


@triton.jit
def _finish(acc, out_ptr, bias_ptr, ws_ptr, ticket_ptr, offs_m, offs_n, mask_m, mask_n, M, N, stride_om,
            pid_n, pid_k, nsplit, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write acc [BLOCK_M, BLOCK_N] (+ bias) to out; with SPLIT, through the workspace: the last split
    of the column tile to arrive (atomic ticket) sums the partials, writes, and resets the ticket."""
    omask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        ws = ws_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(ws, acc, mask=omask)
        tl.debug_barrier()  # every thread's partials are written before the ticket is taken
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == nsplit - 1:  # the last split of this column tile: reduce, finish, reset
            if acc.shape[0] == 1:
                # one row (decoding): eight splits' partials per load, so the reduction costs one or two
                # memory round trips instead of one per split (up to 16 of them on a short layer)
                total1 = tl.zeros([acc.shape[1]], dtype=acc.dtype)
                for k0 in range(0, nsplit, 8):
                    ks = k0 + tl.arange(0, 8)
                    part = tl.load(ws_ptr + ks[:, None] * N + offs_n[None, :],
                                   mask=(ks < nsplit)[:, None] & mask_n[None, :], other=0, cache_modifier=".cg")
                    total1 += tl.sum(part, axis=0)
                acc = total1[None, :]
            else:
                total = tl.zeros_like(acc)
                for k in range(0, nsplit):
                    ws_k = ws_ptr + (k * M + offs_m[:, None]) * N + offs_n[None, :]
                    total += tl.load(ws_k, mask=omask, other=0, cache_modifier=".cg")
                acc = total
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(ticket_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=omask)


@triton.jit
def gptq_dequant_kernel(qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, N, K, Kw, group_size,
                        BITS: tl.constexpr, VPB: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_PERM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """W[K, N] = (q - z[g]) * s[g] with g = k // group_size for the (sorted) rows of qweight; with
    HAS_PERM each row is written back to its original place, so activations need no permutation."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    v = _unpack_tile(qw_ptr, N, Kw, pid_k * KB, offs_n, mask_n, BITS, KB, VPB, INTERLEAVED)
    offs_k = pid_k * KB * VPB + tl.arange(0, KB)[:, None] * VPB + tl.arange(0, VPB)[None, :]
    mask = (offs_k < K)[:, :, None] & mask_n[None, None, :]
    g = (offs_k // group_size)[:, :, None]
    s = tl.load(s_ptr + g * N + offs_n[None, None, :], mask=mask, other=0).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n[None, None, :], mask=mask, other=0).to(tl.float32)
    w = (_as_f32(v) - z) * s
    if HAS_PERM:
        dst = tl.load(perm_ptr + offs_k, mask=offs_k < K, other=0)
    else:
        dst = offs_k
    tl.store(out_ptr + dst[:, :, None] * N + offs_n[None, None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Matrix-vector product two weights per instruction (2 and 4 bits, interleaved words, fp16 input)
# ------------------------------------------------------------------------------------------------
# A word in the interleaved order holds value pairs (2p, 2p+1) in its low and high 16-bit halves at bit
# p * BITS. One `lop3` (w & mask) | 0x6400_6400 turns a pair into two fp16 numbers 1024 + q * 2^(p*BITS
# mod 8) at once; one sub/fma makes them exact q - z; one fma multiplies them with the activation pair
# (x[2p], x[2p+1]), which is simply the fp16 input read as int32. The products of 16 values (two 4-bit
# words, one 2-bit word; 32 at 3 bits) are summed in fp16x2 and scaled in fp32 (the two halves added in
# fp16 at 4 bits, in fp32 at 2 and 3). That is ~2.3 instructions per weight where the unpack-convert-fma
# route (gptq_gemv_kernel) needs ~6: the difference between being bound by instructions and being bound
# by memory at 4 bits. Headroom: the fp16 partial sums hold 65504, so a block overflows only where the
# magnitudes of its products sum past that (at 4 bits, 16 products of |q - z| <= 15; one product alone
# overflows at |x| > 4367 in any fp16 kernel).

@triton.jit
def _pair_term(w, xp, zf, p: tl.constexpr, BITS: tl.constexpr):
    """Portable form of one pair's product (the interpreter cannot run PTX): fp32, same result up to
    rounding."""
    v_lo = ((w >> (p * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    v_hi = ((w >> (16 + p * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    x_lo = (xp & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    x_hi = ((xp >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return x_lo * (v_lo - zf) + x_hi * (v_hi - zf)


@triton.jit
def _half2(v):
    """fp32 values -> their fp16 bit pattern in both halves of a uint32."""
    return v.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32) * 0x10001


@triton.jit
def _dot_words4(we, wo, x0, x1, x2, x3, x4, x5, x6, x7, z, USE_ASM: tl.constexpr):
    """sum_j x_j (q_j - z) over the 16 values of two consecutive interleaved 4-bit words of a column
    (fp32): x0-x3 are word we's pairs, x4-x7 word wo's. One fp16x2 chain over both words (8 products per
    half, as a 2-bit word's) whose halves are added in fp16 and converted once, so the sum, the conversion
    and the scale's fma cost 3 instructions per 16 weights (4 per 8 with a chain per word). That last fp16
    add was worth 1-2% on 8192x28672 in a same-call A/B on an H200 (bench/RESULTS.md, 2026-12-03); its
    cost is headroom: the 16 products' magnitudes must sum below 65504 (test_half2_asm has the outlier
    case). The two words' steps are written out in full, as every asm here: one line per instruction, the
    exact text the PTX-interpreter test runs."""
    if USE_ASM:
        zz = (z + 0x6400) * 0x10001                # 1024 + z, both halves
        m16 = (0xD400 + 16 * z) * 0x10001          # -(1024/16 + z) (see _fixups_2bit)
        return tl.inline_asm_elementwise(
            "{\n"
            ".reg .b32 t, q0, q1, q2, q3, a, c;\n"
            ".reg .b16 lo, hi;\n"
            "mov.b32 c, 0x2C002C00;\n"
            "shr.u32 t, $1, 8;\n"
            "lop3.b32 q0, $1, 0x000f000f, 0x64006400, 0xea;\n"
            "lop3.b32 q1, $1, 0x00f000f0, 0x64006400, 0xea;\n"
            "lop3.b32 q2, t, 0x000f000f, 0x64006400, 0xea;\n"
            "lop3.b32 q3, t, 0x00f000f0, 0x64006400, 0xea;\n"
            "sub.f16x2 q0, q0, $11;\n"
            "fma.rn.f16x2 q1, q1, c, $12;\n"
            "sub.f16x2 q2, q2, $11;\n"
            "fma.rn.f16x2 q3, q3, c, $12;\n"
            "mul.f16x2 a, q0, $3;\n"
            "fma.rn.f16x2 a, q1, $4, a;\n"
            "fma.rn.f16x2 a, q2, $5, a;\n"
            "fma.rn.f16x2 a, q3, $6, a;\n"
            "shr.u32 t, $2, 8;\n"
            "lop3.b32 q0, $2, 0x000f000f, 0x64006400, 0xea;\n"
            "lop3.b32 q1, $2, 0x00f000f0, 0x64006400, 0xea;\n"
            "lop3.b32 q2, t, 0x000f000f, 0x64006400, 0xea;\n"
            "lop3.b32 q3, t, 0x00f000f0, 0x64006400, 0xea;\n"
            "sub.f16x2 q0, q0, $11;\n"
            "fma.rn.f16x2 q1, q1, c, $12;\n"
            "sub.f16x2 q2, q2, $11;\n"
            "fma.rn.f16x2 q3, q3, c, $12;\n"
            "fma.rn.f16x2 a, q0, $7, a;\n"
            "fma.rn.f16x2 a, q1, $8, a;\n"
            "fma.rn.f16x2 a, q2, $9, a;\n"
            "fma.rn.f16x2 a, q3, $10, a;\n"
            "mov.b32 {lo, hi}, a;\n"
            "add.rn.f16 lo, lo, hi;\n"
            "cvt.f32.f16 $0, lo;\n"
            "}",
            "=f,r,r,r,r,r,r,r,r,r,r,r,r",
            [we, wo, tl.broadcast_to(x0, we.shape), tl.broadcast_to(x1, we.shape), tl.broadcast_to(x2, we.shape),
             tl.broadcast_to(x3, we.shape), tl.broadcast_to(x4, we.shape), tl.broadcast_to(x5, we.shape),
             tl.broadcast_to(x6, we.shape), tl.broadcast_to(x7, we.shape), tl.broadcast_to(zz, we.shape),
             tl.broadcast_to(m16, we.shape)],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        zf = z.to(tl.float32)
        return (_pair_term(we, x0, zf, 0, 4) + _pair_term(we, x1, zf, 1, 4)
                + _pair_term(we, x2, zf, 2, 4) + _pair_term(we, x3, zf, 3, 4)
                + _pair_term(wo, x4, zf, 0, 4) + _pair_term(wo, x5, zf, 1, 4)
                + _pair_term(wo, x6, zf, 2, 4) + _pair_term(wo, x7, zf, 3, 4))


@triton.jit
def _fixups_2bit(z):
    """The fix-up operands of values at mantissa bits 0, 2, 4, 6 (2-bit fields, and 3-bit values whose
    low two bits sit there): 1024 + z in both halves, and -(1024 / 2^b + z) for b = 2, 4, 6. Built as
    fp16 bit patterns with integer ops (no float conversions in the loop): the exponent of 1024 / 2^b
    and z in units of its ulp, exact for z < 16 (test_fix_up_bit_patterns_match_fp16)."""
    z = z.to(tl.uint32)
    return ((z + 0x6400) * 0x10001, (0xDC00 + 4 * z) * 0x10001, (0xD400 + 16 * z) * 0x10001,
            (0xCC00 + 64 * z) * 0x10001)


@triton.jit
def _negative_1024_plus_z(z):
    """-(1024 + z) in both fp16 halves (z < 1024), the fix-up of a tensor-core pair at mantissa bit 0."""
    return (0xE400 + z.to(tl.uint32)) * 0x10001


@triton.jit
def _dot_word2(w, x0, x1, x2, x3, x4, x5, x6, x7, z, USE_ASM: tl.constexpr):
    """sum_j x_j (q_j - z) over the 16 values of each interleaved 2-bit word w (fp32)."""
    if USE_ASM:
        zz, m4, m16, m64 = _fixups_2bit(z)
        return tl.inline_asm_elementwise(
            "{\n"
            ".reg .b32 t, q, a, c1, c2, c3;\n"
            ".reg .b16 lo, hi;\n"
            ".reg .f32 f0, f1;\n"
            "mov.b32 c1, 0x34003400;\n"
            "mov.b32 c2, 0x2C002C00;\n"
            "mov.b32 c3, 0x24002400;\n"
            "shr.u32 t, $1, 8;\n"
            "lop3.b32 q, $1, 0x00030003, 0x64006400, 0xea;\n"
            "sub.f16x2 q, q, $10;\n"
            "mul.f16x2 a, q, $2;\n"
            "lop3.b32 q, $1, 0x000c000c, 0x64006400, 0xea;\n"
            "fma.rn.f16x2 q, q, c1, $11;\n"
            "fma.rn.f16x2 a, q, $3, a;\n"
            "lop3.b32 q, $1, 0x00300030, 0x64006400, 0xea;\n"
            "fma.rn.f16x2 q, q, c2, $12;\n"
            "fma.rn.f16x2 a, q, $4, a;\n"
            "lop3.b32 q, $1, 0x00c000c0, 0x64006400, 0xea;\n"
            "fma.rn.f16x2 q, q, c3, $13;\n"
            "fma.rn.f16x2 a, q, $5, a;\n"
            "lop3.b32 q, t, 0x00030003, 0x64006400, 0xea;\n"
            "sub.f16x2 q, q, $10;\n"
            "fma.rn.f16x2 a, q, $6, a;\n"
            "lop3.b32 q, t, 0x000c000c, 0x64006400, 0xea;\n"
            "fma.rn.f16x2 q, q, c1, $11;\n"
            "fma.rn.f16x2 a, q, $7, a;\n"
            "lop3.b32 q, t, 0x00300030, 0x64006400, 0xea;\n"
            "fma.rn.f16x2 q, q, c2, $12;\n"
            "fma.rn.f16x2 a, q, $8, a;\n"
            "lop3.b32 q, t, 0x00c000c0, 0x64006400, 0xea;\n"
            "fma.rn.f16x2 q, q, c3, $13;\n"
            "fma.rn.f16x2 a, q, $9, a;\n"
            "mov.b32 {lo, hi}, a;\n"
            "cvt.f32.f16 f0, lo;\n"
            "cvt.f32.f16 f1, hi;\n"
            "add.f32 $0, f0, f1;\n"
            "}",
            "=f,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [w, tl.broadcast_to(x0, w.shape), tl.broadcast_to(x1, w.shape), tl.broadcast_to(x2, w.shape),
             tl.broadcast_to(x3, w.shape), tl.broadcast_to(x4, w.shape), tl.broadcast_to(x5, w.shape),
             tl.broadcast_to(x6, w.shape), tl.broadcast_to(x7, w.shape), tl.broadcast_to(zz, w.shape),
             tl.broadcast_to(m4, w.shape), tl.broadcast_to(m16, w.shape), tl.broadcast_to(m64, w.shape)],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        zf = z.to(tl.float32)
        return (_pair_term(w, x0, zf, 0, 2) + _pair_term(w, x1, zf, 1, 2) + _pair_term(w, x2, zf, 2, 2)
                + _pair_term(w, x3, zf, 3, 2) + _pair_term(w, x4, zf, 4, 2) + _pair_term(w, x5, zf, 5, 2)
                + _pair_term(w, x6, zf, 6, 2) + _pair_term(w, x7, zf, 7, 2))


@triton.jit
def _x_pair(xp_ptr, x_ptr, perm_ptr, rows, mask_r, p: tl.constexpr, PPW: tl.constexpr, HAS_PERM: tl.constexpr):
    """Activations (x[2p], x[2p+1]) of each word row as one int32 [KB, 1] (fp16 halves); with act-order
    the two come from their permuted places and are packed here."""
    if HAS_PERM:
        k = rows * (2 * PPW) + 2 * p
        a = tl.load(x_ptr + tl.load(perm_ptr + k, mask=mask_r, other=0), mask=mask_r, other=0)
        b = tl.load(x_ptr + tl.load(perm_ptr + k + 1, mask=mask_r, other=0), mask=mask_r, other=0)
        pair = (a.to(tl.uint16, bitcast=True).to(tl.uint32)
                | (b.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)).to(tl.int32, bitcast=True)
    else:
        pair = tl.load(xp_ptr + rows * PPW + p, mask=mask_r, other=0)
    return pair[:, None]


@triton.jit
def _x_pairs(xp_ptr, x_ptr, perm_ptr, rows, mask_r, p: tl.constexpr, PPW: tl.constexpr, HAS_PERM: tl.constexpr):
    """Pairs p and p + 1 (p even) of _x_pair; without act-order from one 8-byte load instead of two 4-byte
    ones (x's loads outnumbered the words' in the loop)."""
    if HAS_PERM:
        return (_x_pair(xp_ptr, x_ptr, perm_ptr, rows, mask_r, p, PPW, HAS_PERM),
                _x_pair(xp_ptr, x_ptr, perm_ptr, rows, mask_r, p + 1, PPW, HAS_PERM))
    else:
        quad = tl.load(xp_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + rows * (PPW // 2) + p // 2,
                       mask=mask_r, other=0)
        return (quad & 0xFFFFFFFF).to(tl.int32)[:, None], (quad >> 32).to(tl.int32)[:, None]


@triton.jit
def gptq_gemv_h2_kernel(x_ptr, xp_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                        N, K, Kw, group_size, tiles_per_split, nsplit,
                        BITS: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        USE_ASM: tl.constexpr, PDL: tl.constexpr = False, STAGE_X: tl.constexpr = 0,
                        EVEN: tl.constexpr = False):
    """out[1, N] = x[1, K] @ W (+ bias) for fp16 x and 2/3/4-bit words in the half2 order (see above and
    _dot_block3), KB words per tile at 2 and 4 bits, KB blocks of three words at 3 bits; one fp16x2 chain
    sums a block (one 2-bit word, two 4-bit words, three 3-bit words). The next tile's words are loaded
    before the current one is used (register double-buffering). Words a block does not have (w1, w2 at
    2 bits, w2 at 4) are dropped by the compiler.
    PDL (launched as a programmatic dependent launch, sm_90+): the first tile's words, constants, are
    requested before waiting for the previous kernel, so this kernel's start overlaps that one's tail;
    x, the output and the split scratch are touched only after the wait.
    STAGE_X (act-order, a power of two >= the split's rows): the program first gathers x[perm] for its
    split's rows in one go into the row that xp_ptr points to (sorted order; every program of the split
    writes the same values), then reads pairs from there as without act-order: two dependent loads per
    program instead of per tile, and no separate gather launch."""
    # a block: the values one fp16x2 chain sums (3 bits: 32 values in three words; 4 bits: two words)
    VPB: tl.constexpr = 32 if BITS == 3 else 64 // BITS if BITS == 4 else 32 // BITS
    WPB: tl.constexpr = 3 if BITS == 3 else 2 if BITS == 4 else 1
    NB: tl.constexpr = KB // 2 if BITS == 4 else KB  # blocks per tile (KB counts words at 4 bits)
    PPB: tl.constexpr = VPB // 2
    BLOCK_K: tl.constexpr = NB * VPB
    pid_n, pid_k, offs_n, mask_n, t0, t_end = _program_tiles(N, K, tiles_per_split, BLOCK_N, BLOCK_K)
    row_end = tl.minimum(Kw, t_end * NB * WPB)
    w0, w1, w2 = _load_words(qw_ptr, N, t0 * NB, offs_n, mask_n, row_end, BITS, NB, EVEN, WPB)
    if PDL:
        gdc_wait()  # the previous kernel (x's producer, the scratch's last user) has finished
        gdc_launch_dependents()  # the next kernel may start its own weight reads now
    if STAGE_X:
        ks = t0 * BLOCK_K + tl.arange(0, STAGE_X)
        kmask = ks < tl.minimum(t_end * BLOCK_K, K)
        xv = tl.load(x_ptr + tl.load(perm_ptr + ks, mask=kmask, other=0), mask=kmask, other=0)
        tl.store(xp_ptr.to(tl.pointer_type(tl.float16), bitcast=True) + ks, xv, mask=kmask)
        tl.debug_barrier()  # the block's stores are visible to all its threads before the pairs are read
    acc2 = tl.zeros([NB, BLOCK_N], dtype=tl.float32)  # reduced over rows once, after the loop
    g, left, per_group = _first_group(t0, K, group_size, BLOCK_K)
    for t in range(t0, t_end):
        blocks = t * NB + tl.arange(0, NB)
        if EVEN:  # no masks: the last step loads its own tile again instead of a masked next one
            mask_r = tl.full([NB], True, tl.int1)  # folded away by the compiler
            mask_w1 = mask_r
            n0, n1, n2 = _load_words(qw_ptr, N, tl.minimum(t + 1, t_end - 1) * NB, offs_n, mask_n, row_end,
                                     BITS, NB, EVEN, WPB)
        else:
            mask_r = blocks * WPB < row_end
            mask_w1 = blocks * WPB + 1 < row_end  # 4 bits: the block's second word (Kw may be odd)
            n0, n1, n2 = _load_words(qw_ptr, N, (t + 1) * NB, offs_n, mask_n, row_end, BITS, NB, False, WPB)
        s, z = _scale_zero(s_ptr, z_ptr, g, N, offs_n, mask_n, EVEN)
        z = z[None, :]
        g, left = _next_group(g, left, per_group)
        x0, x1 = _x_pairs(xp_ptr, x_ptr, perm_ptr, blocks, mask_r, 0, PPB, HAS_PERM)
        x2, x3 = _x_pairs(xp_ptr, x_ptr, perm_ptr, blocks, mask_r, 2, PPB, HAS_PERM)
        if BITS == 4:
            x4, x5 = _x_pairs(xp_ptr, x_ptr, perm_ptr, blocks, mask_w1, 4, PPB, HAS_PERM)
            x6, x7 = _x_pairs(xp_ptr, x_ptr, perm_ptr, blocks, mask_w1, 6, PPB, HAS_PERM)
            r = _dot_words4(w0, w1, x0, x1, x2, x3, x4, x5, x6, x7, z, USE_ASM)
        else:
            x4, x5 = _x_pairs(xp_ptr, x_ptr, perm_ptr, blocks, mask_r, 4, PPB, HAS_PERM)
            x6, x7 = _x_pairs(xp_ptr, x_ptr, perm_ptr, blocks, mask_r, 6, PPB, HAS_PERM)
            if BITS == 2:
                r = _dot_word2(w0, x0, x1, x2, x3, x4, x5, x6, x7, z, USE_ASM)
            else:
                x8, x9 = _x_pairs(xp_ptr, x_ptr, perm_ptr, blocks, mask_r, 8, PPB, HAS_PERM)
                x10, x11 = _x_pairs(xp_ptr, x_ptr, perm_ptr, blocks, mask_r, 10, PPB, HAS_PERM)
                x12, x13 = _x_pairs(xp_ptr, x_ptr, perm_ptr, blocks, mask_r, 12, PPB, HAS_PERM)
                x14, x15 = _x_pairs(xp_ptr, x_ptr, perm_ptr, blocks, mask_r, 14, PPB, HAS_PERM)
                r = _dot_block3(w0, w1, w2, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                                z, USE_ASM)
        acc2 += r * s[None, :]
        w0 = n0
        w1 = n1
        w2 = n2
    acc = tl.sum(acc2, axis=0)
    offs_m = tl.arange(0, 1)
    _finish(acc[None, :], out_ptr, bias_ptr, ws_ptr, ticket_ptr, offs_m, offs_n, offs_m < 1, mask_n, 1, N, N,
            pid_n, pid_k, nsplit, SPLIT, HAS_BIAS)


@triton.jit
def _pair_h(w, fix, zb, P: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Values 2P and 2P+1 of each half2-ordered 4- or 2-bit word minus the zero, as two fp16 tensors
    (exact small integers). Their fields sit at bit BITS * P of each half: the word is shifted by whole
    bytes, then a `lop3` puts both fields into fp16 mantissas at bit r (their offset in the byte) over
    the exponent of 1024, so they read 1024 + q * 2^r, and one fma by 2^-r with `fix` =
    -(1024 / 2^r + z) leaves q - z."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "{\n.reg .b32 t, q, c;\n"
            f"shr.u32 t, $2, {BITS * P - BITS * P % 8};\n"
            f"lop3.b32 q, t, {(((1 << BITS) - 1) << (BITS * P % 8)) * 0x10001}, 0x64006400, 0xea;\n"
            f"mov.b32 c, {(0x3C00 - 0x400 * (BITS * P % 8)) * 0x10001};\n"
            "fma.rn.f16x2 q, q, c, $3;\n"
            "mov.b32 {$0, $1}, q;\n}",
            "=h,=h,r,r", [w, fix], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        lo = ((w >> (BITS * P)) & ((1 << BITS) - 1)).to(tl.int32) - zb
        hi = ((w >> (16 + BITS * P)) & ((1 << BITS) - 1)).to(tl.int32) - zb
        return lo.to(tl.float16), hi.to(tl.float16)


@triton.jit
def _stack8(v0, v1, v2, v3, v4, v5, v6, v7):
    """The [8 * KB, BLOCK_N] tile whose row 8 kb + j holds v_j[kb]: the tensors stacked by tl.join (value
    j = i + 2c + 4d lands at join indices (i, c, d), innermost first), then moved in place. Triton maps
    this onto the tensor cores' operand registers without a trip through shared memory (8 consecutive
    k per thread, as one 4-bit word holds them)."""
    t8 = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)), tl.join(tl.join(v4, v5), tl.join(v6, v7)))
    return tl.reshape(tl.permute(t8, (0, 4, 3, 2, 1)), (v0.shape[0] * 8, v0.shape[1]))


@triton.jit
def _tile_fixups(z, shape):
    """The fix-up operands of the tensor-core tiles, broadcast to the word tile's shape:
    -(1024 / 4^r + z) for r = 0..3 (see _fixups_2bit), and z itself for the portable form."""
    _, m4, m16, m64 = _fixups_2bit(z)
    return (tl.broadcast_to(_negative_1024_plus_z(z)[None, :], shape), tl.broadcast_to(m4[None, :], shape),
            tl.broadcast_to(m16[None, :], shape), tl.broadcast_to(m64[None, :], shape),
            tl.broadcast_to(z.to(tl.int32)[None, :], shape))


@triton.jit
def _weight_tile4_h(w, z, USE_ASM: tl.constexpr):
    """The [8 * KB, BLOCK_N] fp16 tile (q - z), rows in natural order, of half2-ordered 4-bit words
    w [KB, BLOCK_N]."""
    zz, _, m16, _, zb = _tile_fixups(z, w.shape)  # pairs at bit 0 and 4 of a byte
    v0, v1 = _pair_h(w, zz, zb, 0, 4, USE_ASM)
    v2, v3 = _pair_h(w, m16, zb, 1, 4, USE_ASM)
    v4, v5 = _pair_h(w, zz, zb, 2, 4, USE_ASM)
    v6, v7 = _pair_h(w, m16, zb, 3, 4, USE_ASM)
    return _stack8(v0, v1, v2, v3, v4, v5, v6, v7)


@triton.jit
def _weight_tiles2_h(w, z, USE_ASM: tl.constexpr):
    """Two [8 * KB, BLOCK_N] fp16 tiles (q - z) of half2-ordered 2-bit words w [KB, BLOCK_N]: values
    0-7 of each word (row 8 kb + j is value 16 kb + j of the tile) and values 8-15. Two tiles of eight
    rather than one of sixteen: a 16-value stack went through shared memory (bench/RESULTS.md)."""
    zz, m4, m16, m64, zb = _tile_fixups(z, w.shape)
    v0, v1 = _pair_h(w, zz, zb, 0, 2, USE_ASM)
    v2, v3 = _pair_h(w, m4, zb, 1, 2, USE_ASM)
    v4, v5 = _pair_h(w, m16, zb, 2, 2, USE_ASM)
    v6, v7 = _pair_h(w, m64, zb, 3, 2, USE_ASM)
    a = _stack8(v0, v1, v2, v3, v4, v5, v6, v7)
    v0, v1 = _pair_h(w, zz, zb, 4, 2, USE_ASM)
    v2, v3 = _pair_h(w, m4, zb, 5, 2, USE_ASM)
    v4, v5 = _pair_h(w, m16, zb, 6, 2, USE_ASM)
    v6, v7 = _pair_h(w, m64, zb, 7, 2, USE_ASM)
    return a, _stack8(v0, v1, v2, v3, v4, v5, v6, v7)


@triton.jit
def _pair3_h(lo, hi, fix, zb, R: tl.constexpr, USE_ASM: tl.constexpr):
    """Values 2R and 2R+1 of a group of eight of a 3-bit block (planes order) minus the zero, as two
    fp16 tensors: lo holds their low two bits at bit 2R of each half, hi their third bits at 2R + 2
    (the block's third-bit word shifted per group, see word_order.hi_plane_bit). PTX: a `lop3` for
    the low bits and the exponent of 1024, a `lop3` that ors in the third bit, an fma by 4^-R with
    `fix` = -(1024 / 4^R + z)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "{\n.reg .b32 q, c;\n"
            f"lop3.b32 q, $2, {0x00030003 << (2 * R)}, 0x64006400, 0xea;\n"
            f"lop3.b32 q, $3, {0x00040004 << (2 * R)}, q, 0xea;\n"
            f"mov.b32 c, {(0x3C00 - 0x800 * R) * 0x10001};\n"
            "fma.rn.f16x2 q, q, c, $4;\n"
            "mov.b32 {$0, $1}, q;\n}",
            "=h,=h,r,r,r", [lo, hi, fix], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        v_lo = ((lo >> (2 * R)) & 3) | (((hi >> (2 * R + 2)) & 1) << 2)
        v_hi = ((lo >> (16 + 2 * R)) & 3) | (((hi >> (18 + 2 * R)) & 1) << 2)
        return (v_lo.to(tl.int32) - zb).to(tl.float16), (v_hi.to(tl.int32) - zb).to(tl.float16)


@triton.jit
def _group3_tile(lo, hi, zz, m4, m16, m64, zb, USE_ASM: tl.constexpr):
    """The [8 * KB, BLOCK_N] tile of one group of eight values of 3-bit blocks (see _pair3_h)."""
    v0, v1 = _pair3_h(lo, hi, zz, zb, 0, USE_ASM)
    v2, v3 = _pair3_h(lo, hi, m4, zb, 1, USE_ASM)
    v4, v5 = _pair3_h(lo, hi, m16, zb, 2, USE_ASM)
    v6, v7 = _pair3_h(lo, hi, m64, zb, 3, USE_ASM)
    return _stack8(v0, v1, v2, v3, v4, v5, v6, v7)


@triton.jit
def _weight_tiles3_h(w0, w1, w2, z, USE_ASM: tl.constexpr):
    """Four [8 * KB, BLOCK_N] fp16 tiles (q - z) of 3-bit blocks in the planes order (w0, w1: low bits of
    values 0-15 and 16-31 in the 2-bit pair order, w2: third bits): values 0-7, 8-15, 16-23 and 24-31
    of every block."""
    zz, m4, m16, m64, zb = _tile_fixups(z, w0.shape)
    a = _group3_tile(w0, w2 << 2, zz, m4, m16, m64, zb, USE_ASM)
    b = _group3_tile(w0 >> 8, w2 << 1, zz, m4, m16, m64, zb, USE_ASM)
    c = _group3_tile(w1, w2 >> 6, zz, m4, m16, m64, zb, USE_ASM)
    d = _group3_tile(w1 >> 8, w2 >> 7, zz, m4, m16, m64, zb, USE_ASM)
    return a, b, c, d


@triton.jit
def _x_tile(x_rows, perm_ptr, offs_k, mask_m, K, EVEN: tl.constexpr, HAS_PERM: tl.constexpr):
    """x[:, offs_k] (through perm with act-order) as [BLOCK_M, len(offs_k)], zero past K."""
    if EVEN:
        cols = tl.load(perm_ptr + offs_k) if HAS_PERM else offs_k
        return tl.load(x_rows[:, None] + cols[None, :], mask=mask_m[:, None], other=0.0).to(tl.float16)
    else:
        mask_k = offs_k < K
        cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0) if HAS_PERM else offs_k
        return tl.load(x_rows[:, None] + cols[None, :], mask=mask_m[:, None] & mask_k[None, :],
                       other=0.0).to(tl.float16)


@triton.jit
def gptq_gemm_h2_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                        M, N, K, Kw, stride_xm, stride_om, group_size, tiles_per_split, nsplit,
                        KB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        USE_ASM: tl.constexpr, EVEN: tl.constexpr = False, BITS: tl.constexpr = 4):
    """out[M, N] (+)= x[M, K] @ W for 2 <= M <= BLOCK_M (fp16) and 4-, 2- or 3-bit words in the half2
    order, KB value blocks (a word; three words at 3 bits) per K tile: a `lop3` and an fp16x2 fma
    (plus a `lop3` for the third bit at 3 bits) turn each value pair into fp16 (q - z), stacked into
    tiles of eight values per block that tl.dot runs on the tensor cores; the group's scale multiplies
    the tile's product (one group per tile). Triton pipelines the tile loads through shared memory
    (cp.async, num_stages). A block gives one such tile at 4 bits, two at 2 (values 0-7 and 8-15 of
    each word) and four at 3, each with its own slice of x: a 16-value stack went through shared
    memory instead of staying in registers (bench/RESULTS.md).
    Why: the unrolled kernel (mode 2) unpacks with ~5 instructions per weight; this one was 1.7-1.8x
    faster at M = 16 and 4 bits on an H200 (bench/RESULTS.md). Computing W^T x^T instead (the unpacked
    pairs as the MMA's first operand) ran 1.3-1.6x slower on an H100 (2026-12-02 18:38), removed."""
    VPB: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    BLOCK_K: tl.constexpr = KB * VPB
    pid_n, pid_k, offs_n, mask_n, t0, t_end = _program_tiles(N, K, tiles_per_split, BLOCK_N, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # K of row i of a tile of eight values per block: 4 bits: i; else value i % 8 of block i // 8
    if BITS == 4:
        offs_k = t0 * BLOCK_K + tl.arange(0, BLOCK_K)
    else:
        offs_k = t0 * BLOCK_K + (tl.arange(0, KB * 8) // 8) * VPB + tl.arange(0, KB * 8) % 8
    x_rows = x_ptr + offs_m * stride_xm
    g, left, per_group = _first_group(t0, K, group_size, BLOCK_K)
    for t in range(t0, t_end):
        w0, w1, w2 = _load_words(qw_ptr, N, t * KB, offs_n, mask_n, Kw, BITS, KB, EVEN)
        s, z = _scale_zero(s_ptr, z_ptr, g, N, offs_n, mask_n, EVEN)
        g, left = _next_group(g, left, per_group)
        x = _x_tile(x_rows, perm_ptr, offs_k, mask_m, K, EVEN, HAS_PERM)
        if BITS == 4:
            part = tl.dot(x, _weight_tile4_h(w0, z, USE_ASM), out_dtype=tl.float32)
        elif BITS == 2:
            tile_a, tile_b = _weight_tiles2_h(w0, z, USE_ASM)
            part = tl.dot(x, tile_a, out_dtype=tl.float32)
            part = tl.dot(_x_tile(x_rows, perm_ptr, offs_k + 8, mask_m, K, EVEN, HAS_PERM), tile_b, part)
        else:
            tile_a, tile_b, tile_c, tile_d = _weight_tiles3_h(w0, w1, w2, z, USE_ASM)
            part = tl.dot(x, tile_a, out_dtype=tl.float32)
            part = tl.dot(_x_tile(x_rows, perm_ptr, offs_k + 8, mask_m, K, EVEN, HAS_PERM), tile_b, part)
            part = tl.dot(_x_tile(x_rows, perm_ptr, offs_k + 16, mask_m, K, EVEN, HAS_PERM), tile_c, part)
            part = tl.dot(_x_tile(x_rows, perm_ptr, offs_k + 24, mask_m, K, EVEN, HAS_PERM), tile_d, part)
        offs_k += BLOCK_K
        acc += part * s[None, :]
    _finish(acc, out_ptr, bias_ptr, ws_ptr, ticket_ptr, offs_m, offs_n, mask_m, mask_n, M, N, stride_om,
            pid_n, pid_k, nsplit, SPLIT, HAS_BIAS)


@triton.jit
def _pair3_term(w, h, xp, zf, P: tl.constexpr):
    """Portable form of one 3-bit pair's product (planes order, P = 0..15 within its block): fp32."""
    r: tl.constexpr = P % 8
    v_lo = ((w >> (2 * r)) & 3) | (((h >> _hi_plane_shift(2 * P)) & 1) << 2)
    v_hi = ((w >> (16 + 2 * r)) & 3) | (((h >> _hi_plane_shift(2 * P + 1)) & 1) << 2)
    x_lo = (xp & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    x_hi = ((xp >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return x_lo * (v_lo.to(tl.float32) - zf) + x_hi * (v_hi.to(tl.float32) - zf)


@triton.jit
def _dot_block3(w0, w1, h, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, z, USE_ASM: tl.constexpr):
    """sum_j x_j (q_j - z) over the 32 values of each 3-bit block in the planes order (w0, w1: low bits
    of values 0-15 and 16-31 in the 2-bit pair order; h: third bits, see word_order.hi_plane_bit).
    Per pair: a `lop3` for the low bits and the fp16 exponent, a `lop3` that ors in the third bit, the
    same fix-up as at 2 bits (the value now spans mantissa bits 2r..2r+2), one fma; two fp16x2 sums
    (values 0-15 and 16-31) added in fp16x2 (16 products of |q - z| <= 7 per half), the halves in fp32."""
    if USE_ASM:
        zz, m4, m16, m64 = _fixups_2bit(z)
        return tl.inline_asm_elementwise(
            "{\n"
            ".reg .b32 t0, t1, g0, g1, g2, g3, q, a, b, c1, c2, c3;\n"
            ".reg .b16 lo, hi;\n"
            ".reg .f32 f0, f1;\n"
            "mov.b32 c1, 0x34003400;\n"
            "mov.b32 c2, 0x2C002C00;\n"
            "mov.b32 c3, 0x24002400;\n"
            "shr.u32 t0, $1, 8;\n"
            "shr.u32 t1, $2, 8;\n"
            "shl.b32 g0, $3, 2;\n"
            "shl.b32 g1, $3, 1;\n"
            "shr.u32 g2, $3, 6;\n"
            "shr.u32 g3, $3, 7;\n"
            "lop3.b32 q, $1, 0x00030003, 0x64006400, 0xea;\n"
            "lop3.b32 q, g0, 0x00040004, q, 0xea;\n"
            "sub.f16x2 q, q, $20;\n"
            "mul.f16x2 a, q, $4;\n"
            "lop3.b32 q, $1, 0x000c000c, 0x64006400, 0xea;\n"
            "lop3.b32 q, g0, 0x00100010, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c1, $21;\n"
            "fma.rn.f16x2 a, q, $5, a;\n"
            "lop3.b32 q, $1, 0x00300030, 0x64006400, 0xea;\n"
            "lop3.b32 q, g0, 0x00400040, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c2, $22;\n"
            "fma.rn.f16x2 a, q, $6, a;\n"
            "lop3.b32 q, $1, 0x00c000c0, 0x64006400, 0xea;\n"
            "lop3.b32 q, g0, 0x01000100, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c3, $23;\n"
            "fma.rn.f16x2 a, q, $7, a;\n"
            "lop3.b32 q, t0, 0x00030003, 0x64006400, 0xea;\n"
            "lop3.b32 q, g1, 0x00040004, q, 0xea;\n"
            "sub.f16x2 q, q, $20;\n"
            "fma.rn.f16x2 a, q, $8, a;\n"
            "lop3.b32 q, t0, 0x000c000c, 0x64006400, 0xea;\n"
            "lop3.b32 q, g1, 0x00100010, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c1, $21;\n"
            "fma.rn.f16x2 a, q, $9, a;\n"
            "lop3.b32 q, t0, 0x00300030, 0x64006400, 0xea;\n"
            "lop3.b32 q, g1, 0x00400040, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c2, $22;\n"
            "fma.rn.f16x2 a, q, $10, a;\n"
            "lop3.b32 q, t0, 0x00c000c0, 0x64006400, 0xea;\n"
            "lop3.b32 q, g1, 0x01000100, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c3, $23;\n"
            "fma.rn.f16x2 a, q, $11, a;\n"
            "lop3.b32 q, $2, 0x00030003, 0x64006400, 0xea;\n"
            "lop3.b32 q, g2, 0x00040004, q, 0xea;\n"
            "sub.f16x2 q, q, $20;\n"
            "mul.f16x2 b, q, $12;\n"
            "lop3.b32 q, $2, 0x000c000c, 0x64006400, 0xea;\n"
            "lop3.b32 q, g2, 0x00100010, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c1, $21;\n"
            "fma.rn.f16x2 b, q, $13, b;\n"
            "lop3.b32 q, $2, 0x00300030, 0x64006400, 0xea;\n"
            "lop3.b32 q, g2, 0x00400040, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c2, $22;\n"
            "fma.rn.f16x2 b, q, $14, b;\n"
            "lop3.b32 q, $2, 0x00c000c0, 0x64006400, 0xea;\n"
            "lop3.b32 q, g2, 0x01000100, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c3, $23;\n"
            "fma.rn.f16x2 b, q, $15, b;\n"
            "lop3.b32 q, t1, 0x00030003, 0x64006400, 0xea;\n"
            "lop3.b32 q, g3, 0x00040004, q, 0xea;\n"
            "sub.f16x2 q, q, $20;\n"
            "fma.rn.f16x2 b, q, $16, b;\n"
            "lop3.b32 q, t1, 0x000c000c, 0x64006400, 0xea;\n"
            "lop3.b32 q, g3, 0x00100010, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c1, $21;\n"
            "fma.rn.f16x2 b, q, $17, b;\n"
            "lop3.b32 q, t1, 0x00300030, 0x64006400, 0xea;\n"
            "lop3.b32 q, g3, 0x00400040, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c2, $22;\n"
            "fma.rn.f16x2 b, q, $18, b;\n"
            "lop3.b32 q, t1, 0x00c000c0, 0x64006400, 0xea;\n"
            "lop3.b32 q, g3, 0x01000100, q, 0xea;\n"
            "fma.rn.f16x2 q, q, c3, $23;\n"
            "fma.rn.f16x2 b, q, $19, b;\n"
            "add.rn.f16x2 a, a, b;\n"
            "mov.b32 {lo, hi}, a;\n"
            "cvt.f32.f16 f0, lo;\n"
            "cvt.f32.f16 f1, hi;\n"
            "add.f32 $0, f0, f1;\n"
            "}",
            "=f,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [w0, tl.broadcast_to(w1, w0.shape), tl.broadcast_to(h, w0.shape), tl.broadcast_to(x0, w0.shape), tl.broadcast_to(x1, w0.shape), tl.broadcast_to(x2, w0.shape), tl.broadcast_to(x3, w0.shape), tl.broadcast_to(x4, w0.shape), tl.broadcast_to(x5, w0.shape), tl.broadcast_to(x6, w0.shape), tl.broadcast_to(x7, w0.shape), tl.broadcast_to(x8, w0.shape), tl.broadcast_to(x9, w0.shape), tl.broadcast_to(x10, w0.shape), tl.broadcast_to(x11, w0.shape), tl.broadcast_to(x12, w0.shape), tl.broadcast_to(x13, w0.shape), tl.broadcast_to(x14, w0.shape), tl.broadcast_to(x15, w0.shape),
             tl.broadcast_to(zz, w0.shape), tl.broadcast_to(m4, w0.shape), tl.broadcast_to(m16, w0.shape),
             tl.broadcast_to(m64, w0.shape)],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        zf = z.to(tl.float32)
        return (_pair3_term(w0, h, x0, zf, 0) + _pair3_term(w0, h, x1, zf, 1) + _pair3_term(w0, h, x2, zf, 2)
                + _pair3_term(w0, h, x3, zf, 3) + _pair3_term(w0, h, x4, zf, 4) + _pair3_term(w0, h, x5, zf, 5)
                + _pair3_term(w0, h, x6, zf, 6) + _pair3_term(w0, h, x7, zf, 7) + _pair3_term(w1, h, x8, zf, 8)
                + _pair3_term(w1, h, x9, zf, 9) + _pair3_term(w1, h, x10, zf, 10) + _pair3_term(w1, h, x11, zf, 11)
                + _pair3_term(w1, h, x12, zf, 12) + _pair3_term(w1, h, x13, zf, 13)
                + _pair3_term(w1, h, x14, zf, 14) + _pair3_term(w1, h, x15, zf, 15))


# triton decided when decorating whether these kernels run compiled or on its CPU interpreter
# (TRITON_INTERPRET=1 at import); inline PTX exists only compiled
INTERPRETED = isinstance(gptq_gemv_h2_kernel, InterpretedFunction)
