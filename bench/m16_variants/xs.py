import sys
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from backends.gptq.gluon_mma import _tile_product, _cta_barrier, word_layout, x_layout
_async_load = (async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared)


@gluon.jit
def xs_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, ws_ptr, ticket_ptr,
                     M, N, K, stride_xm, stride_om, group_size, tiles_per_split, nsplit,
                     BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT: gl.constexpr,
                     HAS_BIAS: gl.constexpr, W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
              STAGES: gl.constexpr = 3, XSV: gl.constexpr = 4, XSP: gl.constexpr = 8):
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
    # x's tiles go through a ring in shared memory (cp.async), shared by the program's warps; each warp
    # then reads its A operand from there in X_LAYOUT (swizzled: 16-byte pieces of 8 rows on all banks)
    XP: gl.constexpr = BLOCK_K // 2
    cp_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[32 * 4 // XP, XP // 4],
                                               warps_per_cta=[num_warps, 1], order=[1, 0])
    xs_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=XSV, per_phase=1, max_phase=XSP, order=[1, 0])
    ring = gl.allocate_shared_memory(gl.int32, [STAGES, 16, XP], xs_layout)
    rows = gl.arange(0, 16, layout=gl.SliceLayout(1, cp_layout))
    pairs = gl.arange(0, XP, layout=gl.SliceLayout(0, cp_layout))
    x_tile = (x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + rows[:, None] * (stride_xm // 2)
              + pairs[None, :])
    x_live = (rows < M)[:, None] & (pairs < XP)[None, :]
    for st in gl.static_range(STAGES - 1):
        _async_load(ring.index(st), x_tile + gl.minimum(t0 + st, t_end - 1) * XP, mask=x_live)
        async_copy.commit_group()
    n_c = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))

    # the group steps with the tiles (a tile never straddles groups): no division per tile
    per_group = gl.where(group_size >= K, 1 << 30, group_size // BLOCK_K)
    g = t0 // per_group
    left = per_group - t0 % per_group
    g_last = (t_end - 1) // per_group
    w = gl.load(w_tile + t0 * KW * N)
    z = gl.load(z_ptr + g * N + n_w)
    s = gl.load(s_ptr + g * N + n_c)
    acc = gl.zeros([16, BLOCK_N], gl.float32, mma)
    for t in range(t0, t_end):
        u = t - t0
        async_copy.wait_group(STAGES - 2)  # this thread's copies of tile t have landed
        _cta_barrier()  # everyone's have, and everyone is done with the stage refilled next
        _async_load(ring.index((u + STAGES - 1) % STAGES), x_tile + gl.minimum(t + STAGES - 1, t_end - 1) * XP,
                    mask=x_live)
        async_copy.commit_group()
        xp = ring.index(u % STAGES).load(X_LAYOUT)
        # the next tile's operands are requested before this one is used (the last tile's are
        # requested again at the end, never used)
        tn = gl.minimum(t + 1, t_end - 1)
        left -= 1
        g = gl.where(left == 0, g + 1, g)
        left = gl.where(left == 0, per_group, left)
        gn = gl.minimum(g, g_last)
        w_next = gl.load(w_tile + tn * KW * N)
        z_next = gl.load(z_ptr + gn * N + n_w)
        s_next = gl.load(s_ptr + gn * N + n_c)
        acc = _tile_product(acc, w, xp, z, s, BLOCK_K, BLOCK_N, mma)
        w = w_next
        z = z_next
        s = s_next

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
