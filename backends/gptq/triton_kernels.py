"""Triton kernels for `y = x @ dequant(qweight)` straight from the packed GPTQ format (2/3/4/8 bits).

Why these shapes of work:
- Decoding (M <= 16) is bound by reading the weights: the kernel reads each packed word once, with
  many programs in flight (split-K accumulates through fp32 atomics when N alone gives too few).
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


@triton.jit
def _unpack_tile(qw_ptr, N, Kw, kb0, offs_n, mask_n,
                 BITS: tl.constexpr, KB: tl.constexpr, VPB: tl.constexpr):
    """Codes [KB, VPB, BLOCK_N] (int32) of value blocks kb0 .. kb0+KB-1. A block is the run of values
    that fills whole words: 32/BITS values in one word, or 32 values in 3 words for 3 bits."""
    offs_kb = kb0 + tl.arange(0, KB)
    if BITS == 3:
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
        sh = (tl.arange(0, VPB) * BITS).to(tl.uint32)
        v = (w[:, None, :] >> sh[None, :, None]) & ((1 << BITS) - 1)
    return v.to(tl.int32)


@triton.jit
def gptq_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr,
                     M, N, K, Kw, stride_xm, stride_om, group_size, tiles_per_split,
                     BITS: tl.constexpr, VPB: tl.constexpr, KB: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_PERM: tl.constexpr, ATOMIC: tl.constexpr):
    """out[M, N] (+)= x[M, K] @ W for the K range of this program's split."""
    BLOCK_K: tl.constexpr = KB * VPB
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    in_blk = tl.arange(0, KB)[:, None] * VPB + tl.arange(0, VPB)[None, :]  # [KB, VPB]
    if BLOCK_M == 1:
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    for t in range(t0, t0 + tiles_per_split):
        k0 = t * BLOCK_K
        v = _unpack_tile(qw_ptr, N, Kw, t * KB, offs_n, mask_n, BITS, KB, VPB)
        g = tl.minimum(k0, K - 1) // group_size  # tiles past K only meet masked (zero) activations
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        offs_k = k0 + in_blk
        mask_k = offs_k < K
        if HAS_PERM:
            src = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            src = offs_k
        if BLOCK_M == 1:
            x = tl.load(x_ptr + src, mask=mask_k, other=0).to(tl.float32)  # [KB, VPB]
            part = tl.sum(tl.sum(v.to(tl.float32) * x[:, :, None], axis=1), axis=0)
            sx = tl.sum(tl.sum(x, axis=1), axis=0)
            acc1 += s * (part - z * sx)
        else:
            src2 = tl.reshape(src, [BLOCK_K])
            mk2 = tl.reshape(mask_k, [BLOCK_K])
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + src2[None, :],
                        mask=mask_m[:, None] & mk2[None, :], other=0)
            q = tl.reshape(v, [BLOCK_K, BLOCK_N]).to(x.dtype)
            part = tl.dot(x, q)
            sx = tl.sum(x.to(tl.float32), axis=1)
            acc += s[None, :] * (part - z[None, :] * sx[:, None])
    if BLOCK_M == 1:
        ptrs = out_ptr + offs_n
        if ATOMIC:
            tl.atomic_add(ptrs, acc1, mask=mask_n)
        else:
            tl.store(ptrs, acc1.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        omask = mask_m[:, None] & mask_n[None, :]
        if ATOMIC:
            tl.atomic_add(ptrs, acc, mask=omask)
        else:
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def gptq_dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, Kw, group_size,
                        BITS: tl.constexpr, VPB: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr):
    """W[K, N] = (q - z[g]) * s[g] with g = k // group_size, in the (sorted) row order of qweight."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    v = _unpack_tile(qw_ptr, N, Kw, pid_k * KB, offs_n, mask_n, BITS, KB, VPB)
    offs_k = pid_k * KB * VPB + tl.arange(0, KB)[:, None] * VPB + tl.arange(0, VPB)[None, :]
    mask = (offs_k < K)[:, :, None] & mask_n[None, None, :]
    g = (offs_k // group_size)[:, :, None]
    s = tl.load(s_ptr + g * N + offs_n[None, None, :], mask=mask, other=0).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n[None, None, :], mask=mask, other=0).to(tl.float32)
    w = (v.to(tl.float32) - z) * s
    tl.store(out_ptr + offs_k[:, :, None] * N + offs_n[None, None, :], w.to(out_ptr.dtype.element_ty), mask=mask)
