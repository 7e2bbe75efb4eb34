import sys
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from backends.gptq.gluon_mma import _tile_product, _cta_barrier, word_layout, x_layout


@gluon.jit
def _prefetch_l2(ptr):
    gl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [ptr], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def pf_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                     M, N, K, stride_xm, stride_om, group_size, tiles_per_split, nsplit,
                     BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT: gl.constexpr,
                     HAS_BIAS: gl.constexpr, W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
              PF: gl.constexpr = 2):
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
    LINES: gl.constexpr = BLOCK_N // 32  # 128-byte lines per word row of the tile
    pf_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32 // LINES, LINES],
                                               warps_per_cta=[num_warps, 1], order=[1, 0])
    pf_r = gl.arange(0, KW, layout=gl.SliceLayout(1, pf_layout))
    pf_l = gl.arange(0, LINES, layout=gl.SliceLayout(0, pf_layout))
    pf_lines = qw_ptr + pf_r[:, None] * N + (pid_n * BLOCK_N + pf_l * 32)[None, :]
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
        if PF > 1:  # ask L2 for tile t + PF's lines now (no registers held), so that its loads hit L2
            _prefetch_l2(pf_lines + gl.minimum(t + PF, t_end - 1) * KW * N)
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
