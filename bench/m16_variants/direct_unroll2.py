"""Prototype: mode 7 with x and words loaded straight into registers (no shared memory)."""
import functools
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from backends.gptq.triton_kernels import _pair_h, _tile_fixups
from backends.gptq.gluon_mma import _b_operand, _log2, word_layout, _cta_barrier


@functools.lru_cache(maxsize=None)
def x_layout(block_k: int, num_warps: int):
    """Lane (g, t) holds x[g and g + 8][32 c + 8 t .. + 7] (physical order): after the k permutation, the
    A operand of mma.m16n8k16; every warp holds the same values."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0]] + [[0, 16 << i] for i in range(_log2(block_k // 32))],
        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[0, 0] for _ in range(_log2(num_warps))], block_bases=[], shape=[16, block_k // 2])


@gluon.jit
def _a_operand(xp, BLOCK_K: gl.constexpr, A_LAYOUT: gl.constexpr):
    lo = (xp & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
    hi = (xp >> 16).to(gl.int16).to(gl.float16, bitcast=True)
    xv = gl.reshape(gl.join(lo, hi), [16, BLOCK_K])
    t = gl.reshape(xv, [16, BLOCK_K // 32, 4, 2, 2, 2])  # (m, c, t, p >> 1, p & 1, h)
    t = gl.permute(t, [0, 1, 3, 4, 2, 5])  # k = 32 c + 16 (p >> 1) + 8 (p & 1) + 2 t + h
    return gl.convert_layout(gl.reshape(t, [16, BLOCK_K]), A_LAYOUT, assert_trivial=True)


@gluon.jit
def _step_group(g, left, per_group):
    left -= 1
    g = gl.where(left == 0, g + 1, g)
    left = gl.where(left == 0, per_group, left)
    return g, left


@gluon.jit
def _tile_mma(acc, w, xp, z, s, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, mma: gl.constexpr,
              a_layout: gl.constexpr, b_layout: gl.constexpr):
    zz, _, m16, _, zb = _tile_fixups(z, w.shape)
    b = _b_operand(w.to(gl.uint32, bitcast=True), zz, m16, zb, BLOCK_K, BLOCK_N, b_layout)
    part = mma_v2(_a_operand(xp, BLOCK_K, a_layout), b, gl.zeros([16, BLOCK_N], gl.float32, mma))
    return acc + part * s.to(gl.float32)[None, :]


@gluon.jit
def gptq_mma4_direct_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                            M, N, K, stride_xm, stride_om, group_size, tiles_per_split, nsplit,
                            BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT: gl.constexpr,
                            HAS_BIAS: gl.constexpr, W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr):
    KW: gl.constexpr = BLOCK_K // 8
    num_warps: gl.constexpr = gl.num_warps()
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, num_warps],
                                                  instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    t0 = pid_k * tiles_per_split
    t_end = gl.minimum(t0 + tiles_per_split, K // BLOCK_K)

    r_w = gl.arange(0, KW, layout=gl.SliceLayout(1, W_LAYOUT))
    n_w = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, W_LAYOUT))
    w_tile = qw_ptr + r_w[:, None] * N + n_w[None, :]
    rows = gl.arange(0, 16, layout=gl.SliceLayout(1, X_LAYOUT))
    cols = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(0, X_LAYOUT))
    x_tile = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + rows[:, None] * (stride_xm // 2) + cols[None, :]
    x_live = (rows < M)[:, None] & (cols < BLOCK_K)[None, :]
    n_c = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))

    per_group = gl.where(group_size >= K, 1 << 30, group_size // BLOCK_K)
    g = t0 // per_group
    left = per_group - t0 % per_group
    g_last = (t_end - 1) // per_group
    # two tiles per iteration, each with its own registers, loaded a tile ahead of their use (no register
    # copies between iterations, as a loop-carried prefetch needs)
    w_a = gl.load(w_tile + t0 * KW * N)
    x_a = gl.load(x_tile + t0 * (BLOCK_K // 2), mask=x_live, other=0)
    z_a = gl.load(z_ptr + g * N + n_w)
    s_a = gl.load(s_ptr + g * N + n_c)
    acc = gl.zeros([16, BLOCK_N], gl.float32, mma)
    for t in range(t0, t_end, 2):
        tb = gl.minimum(t + 1, t_end - 1)
        g, left = _step_group(g, left, per_group)
        w_b = gl.load(w_tile + tb * KW * N)
        x_b = gl.load(x_tile + tb * (BLOCK_K // 2), mask=x_live, other=0)
        z_b = gl.load(z_ptr + g * N + n_w)
        s_b = gl.load(s_ptr + g * N + n_c)
        acc = _tile_mma(acc, w_a, x_a, z_a, s_a, BLOCK_K, BLOCK_N, mma, a_layout, b_layout)
        ta = gl.minimum(t + 2, t_end - 1)
        g, left = _step_group(g, left, per_group)
        w_a = gl.load(w_tile + ta * KW * N)
        x_a = gl.load(x_tile + ta * (BLOCK_K // 2), mask=x_live, other=0)
        z_a = gl.load(z_ptr + gl.minimum(g, g_last) * N + n_w)
        s_a = gl.load(s_ptr + gl.minimum(g, g_last) * N + n_c)
        # an odd split's last pair repeats its last tile, counted zero times
        s_b = gl.where(t + 1 < t_end, s_b, gl.zeros_like(s_b))
        acc = _tile_mma(acc, w_b, x_b, z_b, s_b, BLOCK_K, BLOCK_N, mma, a_layout, b_layout)

    offs_m = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    omask = (offs_m < M)[:, None] & (n_c < N)[None, :]
    out_tile = out_ptr + offs_m[:, None] * stride_om + n_c[None, :]
    if SPLIT:
        ws = ws_ptr + offs_m[:, None] * N + n_c[None, :]
        gl.store(ws + pid_k * M * N, acc, mask=omask)
        _cta_barrier()
        ticket = gl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == nsplit - 1:
            total = gl.zeros([16, BLOCK_N], gl.float32, mma)
            for k0 in range(0, nsplit, 4):
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
