"""The 2-16-row 4-bit kernel (mode 7), written in Gluon so that its tensor-core operand layouts are ours.

Why: the Triton tensor-core kernel (mode 5) leaves the operand layouts to the compiler, which gives both
operands 8 consecutive k per thread once weights are unpacked in registers, then spends ~50 register
moves per 64 weights lining the activations up for the MMA (bench/RESULTS.md, `bench.m16_probe`). Here
the layouts are chosen by hand, as Marlin does in CUDA, and both operands go from global memory
straight into the registers the MMA reads:

- Each lane (g, t) of a warp loads whole half2-ordered words (`word_order.interleave_pairs`): word
  row 4c + t of column 8 nb + g. A `lop3` and an fp16x2 fma turn each of its four value pairs into the
  two fp16 numbers q - z, and those pairs *are* that lane's B-operand registers of `mma.m16n8k16`, for
  a dot whose k order within each chunk of 32 values is 2t + h + 8 (p & 1) + 16 (p >> 1) (pair p, half
  h). The sum over k does not care about its order.
- In that order, the A operand (x) of lane (g, t) is x[g and g + 8][32c + 8t .. 32c + 8t + 7]: eight
  consecutive values of two rows, two 16-byte loads per chunk, read as int32 pairs. So x needs no
  staging in shared memory and no permutation (the first form of this kernel staged each program's
  slice of x in the permuted order and read it with ldmatrix; that staging, the shared memory it took
  and the split count it forced made it 16% slower on the large shape: bench/RESULTS.md, 2026-12-03).
- The next tile's words, x, zeros and scales are loaded before the current tile is used (register
  double-buffering); no shared memory at all, so registers alone set the occupancy.
Every layout conversion into the MMA operands is checked to be free at compile time (`assert_trivial`).

Measured on an H200 (bench/RESULTS.md, 2026-12-03 15:05-16:05): at 16 rows 1.5-1.6x torch fp16 on
4096x11008 and 2.0-2.1x on 8192x28672, best with 64 columns per warp (each warp reads all of x for its
columns). Sharing x between warps through a cp.async ring, an L2 prefetch of the words and a contiguous
panel layout of them were each no faster (commit 9192b18 holds those variants).

4-bit, fp16, whole tiles only. Act-order takes x gathered by the runtime (GemmConfig.gather_x). Needs
Triton's Gluon (3.5+); without it the mode is not offered (`AVAILABLE`).
"""
from __future__ import annotations

import functools

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from backends.gptq.triton_kernels import _pair_h, _tile_fixups  # Triton functions Gluon calls as they are
    AVAILABLE = hasattr(gl, "DistributedLinearLayout") and hasattr(gl, "NVMMADistributedLayout")
except ImportError:  # a Triton without Gluon: the mode is not offered
    AVAILABLE = False

ROWS = 16  # one MMA tile of rows: 2 <= M <= 16
CHUNK = 32  # values per chunk: four words of each column, one per lane t


def supports(x2d, layer, cfg) -> bool:
    """The inputs this kernel takes (act-order only after the runtime's gather)."""
    return (AVAILABLE and x2d.is_cuda and x2d.dtype == torch.float16 and 2 <= x2d.shape[0] <= ROWS
            and layer.bits == 4 and layer.interleaved and valid(cfg.block_k, cfg.block_n, cfg.num_warps)
            and layer.N % cfg.block_n == 0 and layer.K % cfg.block_k == 0
            and (layer.group_size >= layer.K or layer.group_size % cfg.block_k == 0))


def _log2(n: int) -> int:
    return n.bit_length() - 1


@functools.lru_cache(maxsize=None)
def word_layout(block_k: int, block_n: int, num_warps: int):
    """Lane (g, t) of warp w holds word row 4c + t of column 8 (nb * num_warps + w) + g: the B operand of
    mma.m16n8k16 (k_width 2) in the k order of the module docstring, one word per 8 values."""
    chunks, nb = block_k // CHUNK, block_n // (8 * num_warps)
    return gl.DistributedLinearLayout(
        reg_bases=([[4 << i, 0] for i in range(_log2(chunks))]
                   + [[0, (8 * num_warps) << i] for i in range(_log2(nb))]),
        lane_bases=[[1, 0], [2, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 8 << i] for i in range(_log2(num_warps))], block_bases=[], shape=[block_k // 8, block_n])


@functools.lru_cache(maxsize=None)
def x_layout(block_k: int, num_warps: int):
    """x as int32 pairs [16, block_k // 2]: lane (g, t) holds rows g and g + 8, pairs 16 c + 4 t .. + 3 of
    each chunk c (values 32 c + 8 t .. + 7): after _a_operand's renaming, the A operand of
    mma.m16n8k16 in the dot's k order. Every warp holds the same values (its own columns need all of x)."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0]] + [[0, 16 << i] for i in range(_log2(block_k // CHUNK))],
        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[0, 0] for _ in range(_log2(num_warps))], block_bases=[], shape=[ROWS, block_k // 2])


def valid(block_k: int, block_n: int, num_warps: int) -> bool:
    """Tile shapes the layouts cover: whole chunks, and every warp owning whole 8-column MMA tiles."""
    per_warp = block_n // (8 * num_warps)
    power_of_two = lambda n: n > 0 and n & (n - 1) == 0
    return (block_k % CHUNK == 0 and power_of_two(block_k) and block_n % (8 * num_warps) == 0
            and power_of_two(per_warp) and power_of_two(num_warps))


if AVAILABLE:
    # Triton 3.6 names it thread_barrier; later versions barrier
    _cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier

    @gluon.jit
    def _b_operand(w, zz, m16, zb, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, B_LAYOUT: gl.constexpr):
        """The MMA's B operand [BLOCK_K, BLOCK_N] (q - z, fp16) of words w [BLOCK_K // 8, BLOCK_N], k in the
        dot's order, unpacked by the half2 kernels' own pair unpacker. Joins, reshapes and the permute only
        rename registers: the final conversion is asserted free."""
        l0, h0 = _pair_h(w, zz, zb, 0, 4, True)
        l1, h1 = _pair_h(w, m16, zb, 1, 4, True)
        l2, h2 = _pair_h(w, zz, zb, 2, 4, True)
        l3, h3 = _pair_h(w, m16, zb, 3, 4, True)
        t = gl.join(gl.join(gl.join(l0, h0), gl.join(l1, h1)), gl.join(gl.join(l2, h2), gl.join(l3, h3)))
        t = gl.reshape(t, [BLOCK_K // 32, 4, BLOCK_N, 2, 2, 2])  # (c, t, n, h, p & 1, p >> 1)
        t = gl.permute(t, [0, 5, 4, 1, 3, 2])  # k = 32 c + 16 (p >> 1) + 8 (p & 1) + 2 t + h
        return gl.convert_layout(gl.reshape(t, [BLOCK_K, BLOCK_N]), B_LAYOUT, assert_trivial=True)

    @gluon.jit
    def _a_operand(xp, BLOCK_K: gl.constexpr, A_LAYOUT: gl.constexpr):
        """The MMA's A operand [16, BLOCK_K] (fp16, k in the dot's order) of x pairs loaded in x_layout:
        the split into halves, joins, reshapes and the permute only rename registers."""
        lo = (xp & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
        hi = (xp >> 16).to(gl.int16).to(gl.float16, bitcast=True)
        t = gl.reshape(gl.join(lo, hi), [16, BLOCK_K // 32, 4, 2, 2, 2])  # (m, c, t, p >> 1, p & 1, h)
        t = gl.permute(t, [0, 1, 3, 4, 2, 5])  # k = 32 c + 16 (p >> 1) + 8 (p & 1) + 2 t + h
        return gl.convert_layout(gl.reshape(t, [16, BLOCK_K]), A_LAYOUT, assert_trivial=True)

    @gluon.jit
    def _tile_product(acc, w, xp, z, s, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, mma: gl.constexpr):
        """acc + s * (x @ (q - z)) over one tile: words w, x pairs xp, the tile's zeros z and scales s."""
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        zz, _, m16, _, zb = _tile_fixups(z, w.shape)  # -(1024 + z) and -(1024 / 16 + z), both halves
        b = _b_operand(w.to(gl.uint32, bitcast=True), zz, m16, zb, BLOCK_K, BLOCK_N, b_layout)
        part = mma_v2(_a_operand(xp, BLOCK_K, a_layout), b, gl.zeros([16, BLOCK_N], gl.float32, mma))
        return acc + part * s.to(gl.float32)[None, :]

    @gluon.jit
    def _store_tile(acc, out_tile, ws, omask, bias_ptr, n_c, pid_k, pid_n, M, N, nsplit, ticket_ptr,
                    SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, N_LAST: gl.constexpr):
        """Write a program's fp32 tile (+ bias over columns n_c, the last axis when N_LAST) as fp16. Split-K:
        each split stores its partial in the workspace `ws` (pointers of split 0), and the last split of the
        column tile to arrive sums them (triton_kernels._finish). Shared by the Gluon kernels."""
        if SPLIT:
            gl.store(ws + pid_k * M * N, acc, mask=omask)
            _cta_barrier()
            ticket = gl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket == nsplit - 1:
                total = gl.zeros_like(acc)
                for k0 in range(0, nsplit, 4):  # four partials per round trip
                    for j in gl.static_range(4):
                        total += gl.load(ws + (k0 + j) * M * N, mask=omask & (k0 + j < nsplit), other=0.0,
                                         cache_modifier=".cg")
                if HAS_BIAS:
                    total += _bias(bias_ptr, n_c, N_LAST)
                gl.store(out_tile, total.to(gl.float16), mask=omask)
                gl.atomic_xchg(ticket_ptr + pid_n, 0, sem="relaxed", scope="gpu")
        else:
            if HAS_BIAS:
                acc += _bias(bias_ptr, n_c, N_LAST)
            gl.store(out_tile, acc.to(gl.float16), mask=omask)

    @gluon.jit
    def _bias(bias_ptr, n_c, N_LAST: gl.constexpr):
        b = gl.load(bias_ptr + n_c).to(gl.float32)
        if N_LAST:
            return b[None, :]
        else:
            return b[:, None]

    @gluon.jit
    def gptq_mma4_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                         M, N, K, stride_xm, stride_om, group_size, tiles_per_split, nsplit,
                         BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT: gl.constexpr,
                         HAS_BIAS: gl.constexpr, W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr):
        """out[M, N] (+)= x[M, K] @ W for 2 <= M <= 16 fp16 rows and half2-ordered 4-bit words, the K tiles
        of this program's split (grid axis 1); whole tiles only. See the module docstring."""
        KW: gl.constexpr = BLOCK_K // 8
        num_warps: gl.constexpr = gl.num_warps()
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, num_warps],
                                                      instr_shape=[16, 8])
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        t0 = pid_k * tiles_per_split
        t_end = gl.minimum(t0 + tiles_per_split, K // BLOCK_K)

        r_w = gl.arange(0, KW, layout=gl.SliceLayout(1, W_LAYOUT))
        n_w = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, W_LAYOUT))
        w_tile = qw_ptr + r_w[:, None] * N + n_w[None, :]
        rows = gl.arange(0, 16, layout=gl.SliceLayout(1, X_LAYOUT))
        pairs = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(0, X_LAYOUT))
        x_tile = (x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + rows[:, None] * (stride_xm // 2)
                  + pairs[None, :])
        x_live = (rows < M)[:, None] & (pairs < BLOCK_K // 2)[None, :]
        n_c = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))

        # the group steps with the tiles (a tile never straddles groups): no division per tile
        per_group = gl.where(group_size >= K, 1 << 30, group_size // BLOCK_K)
        g = t0 // per_group
        left = per_group - t0 % per_group
        g_last = (t_end - 1) // per_group
        w = gl.load(w_tile + t0 * KW * N)
        xp = gl.load(x_tile + t0 * (BLOCK_K // 2), mask=x_live, other=0)
        z = gl.load(z_ptr + g * N + n_w)
        s = gl.load(s_ptr + g * N + n_c)
        acc = gl.zeros([16, BLOCK_N], gl.float32, mma)
        for t in range(t0, t_end):
            # the next tile's operands are requested before this one is used (the last tile's are
            # requested again at the end, never used)
            tn = gl.minimum(t + 1, t_end - 1)
            left -= 1
            g = gl.where(left == 0, g + 1, g)
            left = gl.where(left == 0, per_group, left)
            gn = gl.minimum(g, g_last)
            w_next = gl.load(w_tile + tn * KW * N)
            x_next = gl.load(x_tile + tn * (BLOCK_K // 2), mask=x_live, other=0)
            z_next = gl.load(z_ptr + gn * N + n_w)
            s_next = gl.load(s_ptr + gn * N + n_c)
            acc = _tile_product(acc, w, xp, z, s, BLOCK_K, BLOCK_N, mma)
            w = w_next
            xp = x_next
            z = z_next
            s = s_next

        offs_m = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
        omask = (offs_m < M)[:, None] & (n_c < N)[None, :]
        _store_tile(acc, out_ptr + offs_m[:, None] * stride_om + n_c[None, :],
                    ws_ptr + offs_m[:, None] * N + n_c[None, :], omask, bias_ptr, n_c, pid_k, pid_n, M, N, nsplit,
                    ticket_ptr, SPLIT, HAS_BIAS, True)
