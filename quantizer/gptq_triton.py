"""GPTQ's inner block loop as one Triton launch per segment (CUDA).

Inside a block of `block_size` columns the rows of W are independent: column i of every row is
quantized with that row's scale and zero, and the row's error is propagated to its own later columns
through row i of the (upper triangular) inverse-Hessian factor. So one program holds BLOCK_R rows x the
block's columns of W1 in registers and walks the segment's columns in order: quantize, dequantize,
err = (w - q) / Hinv1[i, i], store the code and the error, W1 -= err x Hinv1[i, :]. The torch loop in
`quantizer.gptq` launches about a dozen small kernels (and runs a Python iteration) per column.

A segment ends where a new group's scale and zero have to be fitted (in torch, between launches:
`fit` looks at the lazily updated columns of the whole group, see `gptq_quantize`); with static groups
(or one group) a segment is the whole block.

The arithmetic is that of `quantizer.grid.quantize`/`dequantize` and of the torch loop, operation by
operation: IEEE divisions (div_rn, not Triton's approximate `/`), round-half-to-even as torch.round
(the fp32 magic-number round (x + 1.5*2^23) - 1.5*2^23, exact for |x| <= 2^22; beyond that the code is
clamped to 0 or maxq either way), no fused multiply-adds (enable_fp_fusion=False: torch's outer
product and subtraction round separately), so the codes match the torch loop's on the same device.
Under TRITON_INTERPRET=1 the same kernel runs on CPU tensors (the tests, against the torch loop).

Layout (checked on the sm_90 PTX, not timed): Triton spreads a [ROWS, 128] tile's columns over the
threads, so extracting column i is a cross-thread sum and each thread repeats the per-row scalar work
for the ROWS rows; ROWS=16 with 4 warps uses ~170 registers and no spills. GPTQ_TRITON_ROWS and
GPTQ_TRITON_WARPS (read at import) change it for tuning.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch; CPU-only installs keep the torch loop
    triton = None
    tl = None

ROWS = int(os.environ.get("GPTQ_TRITON_ROWS", "16"))    # rows of W per program
WARPS = int(os.environ.get("GPTQ_TRITON_WARPS", "4"))
MAX_BLOCK = 256                                          # wider blocks would not fit in registers: torch loop


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Whether triton decorated the kernel for its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction
    return triton is not None and isinstance(_gptq_segment_kernel, InterpretedFunction)


def supports(block_size: int) -> bool:
    return triton is not None and block_size <= MAX_BLOCK


if triton is not None:
    @triton.jit
    def _gptq_segment_kernel(W_ptr, H_ptr, S_ptr, Z_ptr, Q_ptr, E_ptr,
                             N, count, start, stop,
                             stride_w, stride_hr, stride_hc, stride_sn, stride_sc, stride_zn, stride_zc,
                             stride_qn, stride_qc, stride_e,
                             maxq,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < N
        cmask = cols < count
        wmask = rmask[:, None] & cmask[None, :]
        W = tl.load(W_ptr + rows[:, None] * stride_w + cols[None, :], mask=wmask, other=0.0)
        for i in range(start, stop):
            # column i of the tile (one non-zero term per row: the sum is exact)
            w = tl.sum(tl.where(cols[None, :] == i, W, 0.0), axis=1)
            s = tl.load(S_ptr + rows * stride_sn + i * stride_sc, mask=rmask, other=1.0)
            z = tl.load(Z_ptr + rows * stride_zn + i * stride_zc, mask=rmask, other=0.0)
            x = tl.math.div_rn(w, s)
            r = (x + 12582912.0) - 12582912.0  # 1.5 * 2^23: round half to even, as torch.round
            q = tl.minimum(tl.maximum(r + z, 0.0), maxq)
            wq = s * (q - z)
            d = tl.load(H_ptr + i * stride_hr + i * stride_hc)
            err = tl.math.div_rn(w - wq, d + tl.zeros_like(w))
            tl.store(Q_ptr + rows * stride_qn + i * stride_qc, q, mask=rmask)
            tl.store(E_ptr + rows * stride_e + i, err, mask=rmask)
            h = tl.load(H_ptr + i * stride_hr + cols * stride_hc, mask=cmask & (cols >= i), other=0.0)
            W = W - err[:, None] * h[None, :]
        tl.store(W_ptr + rows[:, None] * stride_w + cols[None, :], W, mask=wmask)


def run_segment(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                codes: torch.Tensor, Err1: torch.Tensor, start: int, stop: int, maxq: int) -> None:
    """Columns start .. stop-1 of one block, in place.

    W1, Err1 [N, count] fp32 (rows contiguous); Hinv1 [count, count] fp32, any strides (a view of Hinv,
    which LAPACK leaves column-major); scale, zero [N, count] fp32 with any strides (a per-row constant
    is `t[:, None].expand(N, count)`); codes [N, count] fp32, any strides (a view of the layer's codes,
    which receives the codes as floats). W1 is left with the block's updated values (as the torch loop
    leaves it); codes[:, start:stop] and Err1[:, start:stop] are written, nothing else."""
    n, count = W1.shape
    if any(t.stride(1) != 1 for t in (W1, Err1)) or any(
            t.dtype != torch.float32 for t in (W1, Err1, codes, Hinv1, scale, zero)):
        raise ValueError("gptq segment: all tensors fp32, W1 and Err1 with unit column stride")
    if Hinv1.shape != (count, count) or codes.shape != W1.shape or Err1.shape != W1.shape \
            or scale.shape != W1.shape or zero.shape != W1.shape:
        raise ValueError("gptq segment: shapes do not match W1 [N, count]")
    if not (0 <= start <= stop <= count):
        raise ValueError(f"gptq segment: bad column range {start}..{stop} of {count}")
    if stop == start or n == 0:
        return
    block_c = max(16, triton.next_power_of_2(count))
    if block_c > MAX_BLOCK:
        raise ValueError(f"gptq segment: block of {count} columns is wider than {MAX_BLOCK}")
    grid = (triton.cdiv(n, ROWS),)
    _gptq_segment_kernel[grid](
        W1, Hinv1, scale, zero, codes, Err1,
        n, count, start, stop,
        W1.stride(0), Hinv1.stride(0), Hinv1.stride(1), scale.stride(0), scale.stride(1),
        zero.stride(0), zero.stride(1), codes.stride(0), codes.stride(1), Err1.stride(0),
        float(maxq),
        BLOCK_R=ROWS, BLOCK_C=block_c, num_warps=WARPS, enable_fp_fusion=False)
