"""The 2-16-row 4-bit kernel (mode 7), written in Gluon so that its tensor-core operand layouts are ours.

Why: the Triton tensor-core kernel (mode 5) leaves the operand layouts to the compiler, which gives both
operands 8 consecutive k per thread once weights are unpacked in registers, then spends ~50 register
moves per 64 weights lining the activations up for the MMA (bench/RESULTS.md, `bench.m16_probe`). Here
the layouts are chosen by hand, as Marlin does in CUDA:

- Each lane (g, t) of a warp loads whole half2-ordered words (`kernel_runtime.interleave_pairs`): word
  row 4c + t of column 8 nb + g. A `lop3` and an fp16x2 fma turn each of its four value pairs into the
  two fp16 numbers q - z, and those pairs *are* that lane's B-operand registers of `mma.m16n8k16`, for
  a dot whose k order within each chunk of 32 values is 2t + h + 8 (p & 1) + 16 (p >> 1) (pair p, half
  h). The sum over k does not care about its order; the layout conversion to the MMA operand is
  checked to be free at compile time (`assert_trivial`).
- The activations are staged once per program in shared memory in that same k order (each program
  reads only its split's slice of x), and the MMA reads them with `ldmatrix`: no register moves.
- The words stream through a ring of tiles in shared memory (`cp.async`).

Measured on an H200 (bench/RESULTS.md, 2026-12-03): 2.27 SASS instructions per weight in the loop
against mode 5's 3.0 at the same tile, but only 5-9% faster at 16 rows (10-15% at 4), so the tuner
picks it at 4 bits while the 16-row bound lies elsewhere. 4-bit, fp16, whole tiles only. Act-order
takes x gathered by the runtime (GemmConfig.gather_x): gathering it while staging it was faster at 4
rows (18.5 us; mode 5 after the gather 23.3) but 2.5x slower at 16, and the tuner keeps one config for
2-16 rows. Needs Triton's Gluon (3.5+); without it the mode is not offered (`AVAILABLE`).
"""
from __future__ import annotations

import functools

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

    from backends.gptq.triton_kernels import _pair_h, _tile_fixups  # Triton functions Gluon calls as they are
    AVAILABLE = hasattr(gl, "DistributedLinearLayout") and hasattr(gl, "NVMMADistributedLayout")
except ImportError:  # a Triton without Gluon: the mode is not offered
    AVAILABLE = False

ROWS = 16  # one MMA tile of rows: 2 <= M <= 16
CHUNK = 32  # values per chunk: four words of each column, one per lane t
MAX_SHARED_BYTES = 96 * 1024  # one program's staged x and word ring: two programs still fit an SM (227 KiB)


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


def valid(block_k: int, block_n: int, num_warps: int) -> bool:
    """Tile shapes the layouts cover: whole chunks, and every warp owning whole 8-column MMA tiles."""
    per_warp = block_n // (8 * num_warps)
    power_of_two = lambda n: n > 0 and n & (n - 1) == 0
    return (block_k % CHUNK == 0 and power_of_two(block_k) and block_n % (8 * num_warps) == 0
            and power_of_two(per_warp) and power_of_two(num_warps))


def staged_tiles(tiles_per_split: int) -> int:
    """K tiles of x staged in shared memory: the split's, rounded up to a power of two."""
    return 1 << max(tiles_per_split - 1, 0).bit_length()


def shared_bytes(block_k: int, block_n: int, tiles_per_split: int, stages: int) -> int:
    """Dynamic shared memory of one program: its staged x and its ring of word tiles."""
    return staged_tiles(tiles_per_split) * ROWS * block_k * 2 + stages * block_k // 8 * block_n * 4


def most_tiles_per_split(block_k: int, block_n: int, stages: int) -> int:
    """The longest split (in K tiles) whose program fits MAX_SHARED_BYTES; 0 when not even one does."""
    tiles = 1
    while shared_bytes(block_k, block_n, 2 * tiles, stages) <= MAX_SHARED_BYTES:
        tiles *= 2
    return tiles if shared_bytes(block_k, block_n, tiles, stages) <= MAX_SHARED_BYTES else 0


if AVAILABLE:
    # Triton 3.6 names: thread_barrier and async_copy_global_to_shared; later: barrier and async_load
    _cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
    _async_load = (async_copy.async_load if hasattr(async_copy, "async_load")
                   else async_copy.async_copy_global_to_shared)

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
    def gptq_mma4_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                         M, N, K, stride_xm, stride_om, group_size, tiles_per_split, nsplit,
                         BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGED: gl.constexpr,
                         SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, W_LAYOUT: gl.constexpr,
                         STAGES: gl.constexpr = 2):
        """out[M, N] (+)= x[M, K] @ W for 2 <= M <= 16 fp16 rows and half2-ordered 4-bit words, the K tiles
        of this program's split (grid axis 1); whole tiles only. See the module docstring."""
        KW: gl.constexpr = BLOCK_K // 8
        num_warps: gl.constexpr = gl.num_warps()
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, num_warps],
                                                      instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        x_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                                  warps_per_cta=[num_warps, 1], order=[1, 0])
        xs_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        t0 = pid_k * tiles_per_split
        t_end = gl.minimum(t0 + tiles_per_split, K // BLOCK_K)

        # the words stream through a ring of STAGES tiles in shared memory (cp.async, STAGES - 1 tiles in
        # flight while one is unpacked); each lane then reads its own words (W_LAYOUT) from it. The swizzle
        # puts the four word rows a warp reads at once (lanes t) on different banks.
        copy_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32],
                                                     warps_per_cta=[num_warps, 1], order=[1, 0])
        ws_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=4, order=[1, 0])
        ring = gl.allocate_shared_memory(gl.int32, [STAGES, KW, BLOCK_N], ws_layout)
        r_c = gl.arange(0, KW, layout=gl.SliceLayout(1, copy_layout))
        n_cp = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, copy_layout))
        w_tile = qw_ptr + r_c[:, None] * N + n_cp[None, :]
        for st in gl.static_range(STAGES - 1):  # tiles past the split's end reload its last (never read)
            _async_load(ring.index(st), w_tile + gl.minimum(t0 + st, t_end - 1) * KW * N)
            async_copy.commit_group()

        # this split's slice of x, staged once in the dot's k order (physical k = 32 c + 8 t + 2 p + h),
        # while the first word tiles are on their way
        xs = gl.allocate_shared_memory(gl.float16, [STAGED, 16, BLOCK_K], xs_layout)
        rows = gl.arange(0, 16, layout=gl.SliceLayout(1, x_layout))
        cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
        x_rows = x_ptr + rows[:, None] * stride_xm
        # unrolled (STAGED is a constexpr; tiles past the split are masked): the next tiles' loads are in
        # flight while one is stored, instead of one L2 round trip per tile in a loop
        for i in gl.static_range(STAGED):
            k0 = (t0 + i) * BLOCK_K
            live = (rows < M)[:, None] & (cols < (t_end - t0 - i) * BLOCK_K)[None, :]
            xv = gl.load(x_rows + k0 + cols[None, :], mask=live, other=0.0)
            xv = gl.permute(gl.reshape(xv, [16, BLOCK_K // 32, 4, 2, 2, 2]), [0, 1, 3, 4, 2, 5])
            xs.index(i).store(gl.reshape(xv, [16, BLOCK_K]))
        _cta_barrier()

        n_w = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, W_LAYOUT))
        n_c = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        # the group steps with the tiles (a tile never straddles groups): no division per tile
        per_group = gl.where(group_size >= K, 1 << 30, group_size // BLOCK_K)
        g = t0 // per_group
        left = per_group - t0 % per_group
        acc = gl.zeros([16, BLOCK_N], gl.float32, mma)
        for t in range(t0, t_end):
            u = t - t0
            async_copy.wait_group(STAGES - 2)  # this thread's copies of tile t have landed
            _cta_barrier()  # everyone's have, and everyone is done with the stage refilled next
            _async_load(ring.index((u + STAGES - 1) % STAGES), w_tile + gl.minimum(t + STAGES - 1, t_end - 1) * KW * N)
            async_copy.commit_group()
            w = ring.index(u % STAGES).load(W_LAYOUT)
            z = gl.load(z_ptr + g * N + n_w)
            s = gl.load(s_ptr + g * N + n_c).to(gl.float32)
            zz, _, m16, _, zb = _tile_fixups(z, w.shape)  # -(1024 + z) and -(1024 / 16 + z), both halves
            b = _b_operand(w.to(gl.uint32, bitcast=True), zz, m16, zb, BLOCK_K, BLOCK_N, b_layout)
            part = mma_v2(xs.index(u).load(a_layout), b, gl.zeros([16, BLOCK_N], gl.float32, mma))
            acc += part * s[None, :]
            left -= 1
            g = gl.where(left == 0, g + 1, g)
            left = gl.where(left == 0, per_group, left)
        async_copy.wait_group(0)

        offs_m = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
        omask = (offs_m < M)[:, None] & (n_c < N)[None, :]
        out_tile = out_ptr + offs_m[:, None] * stride_om + n_c[None, :]
        if SPLIT:  # the last split of the column tile to arrive sums the partials (triton_kernels._finish)
            ws = ws_ptr + offs_m[:, None] * N + n_c[None, :]
            gl.store(ws + pid_k * M * N, acc, mask=omask)
            _cta_barrier()
            ticket = gl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket == nsplit - 1:
                total = gl.zeros([16, BLOCK_N], gl.float32, mma)
                for k0 in range(0, nsplit, 4):  # four partials per round trip
                    for j in gl.static_range(4):
                        total += gl.load(ws + (k0 + j) * M * N, mask=omask & (k0 + j < nsplit), other=0.0,
                                         cache_modifier=".cg")
                if HAS_BIAS:
                    total += gl.load(bias_ptr + n_c).to(gl.float32)[None, :]
                gl.store(out_tile, total.to(gl.float16), mask=omask)
                gl.atomic_xchg(ticket_ptr + pid_n, 0, sem="relaxed", scope="gpu")
        else:
            if HAS_BIAS:
                acc += gl.load(bias_ptr + n_c).to(gl.float32)[None, :]
            gl.store(out_tile, acc.to(gl.float16), mask=omask)
