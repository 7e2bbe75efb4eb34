"""The 2-16-row 2/4-bit kernel on Hopper's warpgroup MMA (mode 9): mode 8's unpack, with x read by the
tensor cores from shared memory instead of from every warp's registers.

Why: at 16 rows mode 8 (gluon_gemv.py) waits on loads at a fifth of the SM's warps, a limit its registers
set, and every warp holds all of x: x takes as many registers as the words, and is read from L1 once per
warp (bench/RESULTS.md, 2026-12-04). Here the four warps of a warpgroup share one copy of x:

- Each tile of x is loaded once per program, a quarter by each warp (16-byte loads), divided by its
  weights' 2^r and put in the dot's k order (gluon_gemv._b_tile), and stored to a double-buffered tile of
  shared memory; `wgmma` reads it there as its B operand. No warp holds x in registers past the store.
- The weights are unpacked exactly as in mode 8 (gluon_gemv._a_operand: a shift and an `and` per pair,
  read as fp16 subnormals) into the A operand, in registers: warp w holds MMA rows 16 w onwards of each
  64-row block of columns, as mma.sync's A fragment, so mode 8's layouts and renamings carry over.
- sum(x) for the zero points comes from one `wgmma` of an all-ones A operand per 64-row block, whose rows
  are all equal, repeated over the program's column blocks by renaming registers (`_rows_repeated`).
- One barrier per tile: a buffer is rewritten two tiles after it was read, and every warp has passed the
  barrier of the tile between (the MMAs are waited for before it).

Measured on an H200 (bench/RESULTS.md, 2026-12-04 13:43): at 16 rows 11% faster than mode 8 on 2-bit
4096x11008, a tie or 2-8% slower on 8192x28672 (4 and 2 bits): sharing x was not what the large shape
waits on. The loop runs at 2.69 SASS instructions per weight and thread (mode 8: 2.13 at the same
columns per warp): each chunk's wgmma is waited for, and its A operand's registers are moved into place.
A program with a single K tile computed wrong results there (relative error 1.0-1.7 at every shape tried,
cause not found; `splits_of_two_tiles`), so every split holds two or more. At one row it was 6-29% slower
than mode 8, so x is always padded to 16 rows and one row is left to modes 4 and 8.

Half2-ordered (`word_order.interleave_pairs`) 2- and 4-bit words, fp16, whole tiles never straddling a
group, four warps per program. Act-order reads x gathered by the runtime. Needs Triton's Gluon and sm_90.
"""
from __future__ import annotations

import functools

import torch

from backends.gptq import gluon_gemv

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

    from backends.gptq.gluon_mma import _cta_barrier
    from backends.gptq.triton_kernels import _first_group, _next_group
    AVAILABLE = gluon_gemv.AVAILABLE
except ImportError:  # a Triton without Gluon's Hopper module: the mode is not offered
    AVAILABLE = False

WARPS = 4  # one warpgroup
BITS = (2, 4)  # mode 8 also takes 3 bits; this kernel does not (yet)
ROWS = 16  # rows of x per call at most, and the wgmma's n for any count (one row is left to modes 4 and 8)


def valid(bits: int, block_k: int, block_n: int, num_warps: int) -> bool:
    """Bits and tile shapes the kernel covers: 2 and 4 bits, one warpgroup, whole 64-column blocks (one wgmma
    each)."""
    return (bits in BITS and num_warps == WARPS and block_n % 64 == 0
            and gluon_gemv.valid(bits, block_k, block_n, num_warps))


def splits_of_two_tiles(k_tiles: int, split: int) -> bool:
    """Whether every split of k_tiles K tiles into `split` runs (ceil-sized, the last shorter) holds at least
    two tiles. Programs with one tile computed wrong results on an H200 (relative error 1.0-1.7 at every
    shape tried, 2026-12-04; two or more tiles were right everywhere); the cause was not found."""
    per = -(-k_tiles // split)
    return per >= 2 and k_tiles - (split - 1) * per >= 2


def supports(x2d, layer, cfg) -> bool:
    """The inputs this kernel takes: mode 8's, on sm_90 (wgmma), four warps, two or more tiles a split."""
    return (AVAILABLE and x2d.is_cuda and torch.cuda.get_device_capability(x2d.device)[0] == 9
            and valid(layer.bits, cfg.block_k, cfg.block_n, cfg.num_warps) and gluon_gemv.supports(x2d, layer, cfg)
            and splits_of_two_tiles(layer.K // cfg.block_k, cfg.split_k))


@functools.lru_cache(maxsize=None)
def stage_layout(block_k: int, rows: int):
    """x as int32 pairs [block_k // 2, rows] spread over the warpgroup: 4 consecutive pairs (one 16-byte
    load) per thread and row, the lanes along k first."""
    along_k = min(32, block_k // 8)
    return gl.BlockedLayout(size_per_thread=[4, 1], threads_per_warp=[along_k, 32 // along_k],
                            warps_per_cta=[1, WARPS], order=[0, 1])


def layouts(bits: int, block_k: int, block_n: int) -> dict:
    """The kernel's layout arguments for one config (R = ROWS)."""
    out = gluon_gemv.layouts(bits, block_k, block_n, WARPS, ROWS)
    out.pop("X_LAYOUT")
    return dict(out, W64_LAYOUT=gluon_gemv.word_layout(bits, gluon_gemv.chunk(bits), 64, WARPS),
                XS_LAYOUT=stage_layout(block_k, ROWS))


if AVAILABLE:
    @gluon.jit
    def _rows_repeated(s64, BLOCK_N: gl.constexpr, R: gl.constexpr, LAYOUT: gl.constexpr):
        """[64, R] -> [BLOCK_N, R], the 64 rows repeated: the accumulator's 64-row blocks are register bits,
        so the joins only name the same registers again (asserted)."""
        s = s64
        if BLOCK_N >= 128:
            s = gl.reshape(gl.permute(gl.join(s, s), [2, 0, 1]), [128, R])
        if BLOCK_N >= 256:
            s = gl.reshape(gl.permute(gl.join(s, s), [2, 0, 1]), [256, R])
        return gl.convert_layout(s, LAYOUT, assert_trivial=True)

    @gluon.jit
    def _chunk_mma(w, b, part, sums, ones, FIRST: gl.constexpr, BITS: gl.constexpr, BLOCK_N: gl.constexpr,
                   CK: gl.constexpr, A_LAYOUT: gl.constexpr):
        """part (+)= W x and sums (+)= 1 x over CK values of k: words w [BLOCK_N, CK // vpw] unpacked into the A
        operand, x's [CK, R] from shared memory. Waited for: wgmma holds every register of its A operand
        until it completes, so one chunk's A at a time keeps the registers down (a tile's wgmmas issued
        before one wait took 197 registers instead of 122 at 128 x 128, sm_90)."""
        a = gluon_gemv._a_operand(w, BITS, BLOCK_N, CK, A_LAYOUT)
        part = warpgroup_mma(a, b, part, use_acc=not FIRST)
        sums = warpgroup_mma(ones, b, sums, use_acc=not FIRST)
        return part, sums

    @gluon.jit
    def _tile_mma(w, b, part, sums, ones, BITS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                  CK: gl.constexpr, A_LAYOUT: gl.constexpr):
        """A tile's MMAs in chunks of CK values of k (BLOCK_K // CK is 1, 2 or 4)."""
        KW: gl.constexpr = BLOCK_K * BITS // 32
        if BLOCK_K == CK:
            part, sums = _chunk_mma(w, b, part, sums, ones, True, BITS, BLOCK_N, CK, A_LAYOUT)
        elif BLOCK_K == 2 * CK:
            w0, w1 = gluon_gemv._word_halves(w, KW)
            part, sums = _chunk_mma(w0, b.slice(0, CK), part, sums, ones, True, BITS, BLOCK_N, CK, A_LAYOUT)
            part, sums = _chunk_mma(w1, b.slice(CK, CK), part, sums, ones, False, BITS, BLOCK_N, CK, A_LAYOUT)
        else:
            w0, w1 = gluon_gemv._word_halves(w, KW)
            w00, w01 = gluon_gemv._word_halves(w0, KW // 2)
            w10, w11 = gluon_gemv._word_halves(w1, KW // 2)
            part, sums = _chunk_mma(w00, b.slice(0, CK), part, sums, ones, True, BITS, BLOCK_N, CK, A_LAYOUT)
            part, sums = _chunk_mma(w01, b.slice(CK, CK), part, sums, ones, False, BITS, BLOCK_N, CK, A_LAYOUT)
            part, sums = _chunk_mma(w10, b.slice(2 * CK, CK), part, sums, ones, False, BITS, BLOCK_N, CK,
                                    A_LAYOUT)
            part, sums = _chunk_mma(w11, b.slice(3 * CK, CK), part, sums, ones, False, BITS, BLOCK_N, CK,
                                    A_LAYOUT)
        return part, sums

    @gluon.jit
    def gptq_wgmma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                          M, N, K, stride_xm, stride_om, group_size, tiles_per_split, nsplit,
                          BITS: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                          SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, W_LAYOUT: gl.constexpr,
                          W64_LAYOUT: gl.constexpr, XS_LAYOUT: gl.constexpr, LOAD_LAYOUT: gl.constexpr,
                          COL_LAYOUT: gl.constexpr, OUT_LAYOUT: gl.constexpr):
        """out[M, N] (+)= x[M, K] @ W for 1 <= M <= R (16) fp16 rows and half2-ordered 2/4-bit words, the K
        tiles of this program's split (grid axis 1); whole tiles only. See the module docstring."""
        KW: gl.constexpr = BLOCK_K * BITS // 32
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, R, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        x_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=2)
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        t0 = pid_k * tiles_per_split
        t_end = gl.minimum(t0 + tiles_per_split, K // BLOCK_K)

        r_w = gl.arange(0, KW, layout=gl.SliceLayout(0, LOAD_LAYOUT))
        n_w = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD_LAYOUT))
        w_tile = qw_ptr + r_w[None, :] * N + n_w[:, None]
        n_sz = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=COL_LAYOUT)
        x_tile, x_shift = gluon_gemv._x_pair_tile(x_ptr, M, stride_xm, BLOCK_K, R, BITS, XS_LAYOUT)
        ONE: gl.constexpr = 0x11111111 if BITS == 4 else 0x55555555
        CK: gl.constexpr = 4 * (32 // BITS)  # k values per wgmma chunk: 4 words of a column (gluon_gemv.chunk)
        ones = gluon_gemv._a_operand(gl.full([64, CK * BITS // 32], ONE, gl.int32, W64_LAYOUT), BITS, 64, CK,
                                     a_layout)
        xs = gl.allocate_shared_memory(gl.float16, [2, BLOCK_K, R], x_smem)

        g, left, per_group = _first_group(t0, K, group_size, BLOCK_K)
        g_last = (t_end - 1) // per_group
        w = gl.load(w_tile + t0 * KW * N)
        xp = gl.load(x_tile + t0 * (BLOCK_K // 2))
        z = gl.load(z_ptr + g * N + n_sz)
        s = gl.load(s_ptr + g * N + n_sz)
        acc = gl.zeros([BLOCK_N, R], gl.float32, mma)
        part = gl.zeros([BLOCK_N, R], gl.float32, mma)  # each tile's MMAs start over (use_acc=False)
        sums64 = gl.zeros([64, R], gl.float32, mma)
        for t in range(t0, t_end):
            tn = gl.minimum(t + 1, t_end - 1)
            g, left = _next_group(g, left, per_group)
            gn = gl.minimum(g, g_last)
            w_next = gl.load(w_tile + tn * KW * N)
            x_next = gl.load(x_tile + tn * (BLOCK_K // 2))
            z_next = gl.load(z_ptr + gn * N + n_sz)
            s_next = gl.load(s_ptr + gn * N + n_sz)
            b = xs.index(t % 2)
            b.store(gluon_gemv._b_tile(xp, x_shift, BITS, BLOCK_K, R))
            fence_async_shared()
            _cta_barrier()
            w_mma = gl.convert_layout(gluon_gemv._mma_order(w, BLOCK_N, 4, KW), W_LAYOUT, assert_trivial=True)
            part, sums64 = _tile_mma(w_mma, b, part, sums64, ones, BITS, BLOCK_N, BLOCK_K, CK, a_layout)
            acc += gluon_gemv._zero_point_term(part, _rows_repeated(sums64, BLOCK_N, R, mma), s, z, BLOCK_N, 4, mma)
            w = w_next
            xp = x_next
            z = z_next
            s = s_next

        gluon_gemv._store_columns(acc, out_ptr, ws_ptr, bias_ptr, ticket_ptr, M, N, stride_om, nsplit, pid_n, pid_k,
                                  BLOCK_N, 4, R, SPLIT, HAS_BIAS, OUT_LAYOUT)
