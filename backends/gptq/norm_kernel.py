"""Triton kernel for a decoding step's residual add and the RMSNorm after it: one program per row,
the whole row in registers, read once.

Why: torch.compile turns add + RMSNorm of one 4096-wide row into a looped reduction that reads the row
twice, 2.8 us per call on an H100 (65 calls, 180 us of a 2.4 ms 7B decoding step, bench/RESULTS.md).
The arithmetic follows LLaMA's RMSNorm exactly: the sum is rounded to the model's dtype before its
statistics (as `residual + hidden_states` is in the HF layer), the statistics are fp32, and the
weight multiplies the normalised row after it is rounded back to the model's dtype.
With `order` (act-order, see act_order.py) the normalised row is written in that order of its columns,
normed[i] = norm(total)[order[i]], so the projections that read it need no gather of their own; the
sum keeps its natural order (it is the residual stream).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from backends.gptq.parallel_compile import launcher

MAX_WIDTH = 16384  # one row per program: wider rows would spill registers (LLaMA-70B is 8192)


@triton.jit
def add_rms_norm_kernel(res_ptr, delta_ptr, w_ptr, order_ptr, total_ptr, normed_ptr, H, eps,
                        BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_ORDER: tl.constexpr = False):
    """total = residual + delta (when HAS_DELTA; else the residual is the row), normed = w * norm(total);
    HAS_ORDER: normed[i] is column order[i]'s value, and w_ptr holds the weight in that order. The
    row is reordered where it sits (tl.gather, through shared memory). Gathering it from memory
    instead, 4096 scattered reads by one program on one SM, made act-order 7B decoding slower than
    leaving the gathers in the matrix-vector kernels (400 against 418 tok/s on an H200, bench/RESULTS.md)."""
    row = tl.program_id(0).to(tl.int64) * H
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(res_ptr + row + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)  # one rounding, as the dtype's own add
        tl.store(total_ptr + row + offs, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
    n = (h * rstd).to(x.dtype)
    if HAS_ORDER:
        n = tl.gather(n, tl.load(order_ptr + offs, mask=mask, other=0), axis=0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(normed_ptr + row + offs, (w.to(tl.float32) * n.to(tl.float32)).to(x.dtype), mask=mask)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel computes this norm as the HF module would: a CUDA (or interpreted) row of
    at most MAX_WIDTH, contiguous, the weight of the same dtype (a wider weight promotes the output)."""
    return ((x.is_cuda or isinstance(add_rms_norm_kernel, InterpretedFunction))
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and weight.dtype == x.dtype
            and x.is_contiguous() and weight.dim() == 1 and x.shape[-1] == weight.numel() <= MAX_WIDTH)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 order: torch.Tensor | None = None, ordered_weight: torch.Tensor | None = None):
    """(residual + delta, RMSNorm of it with `weight`), or (residual, its RMSNorm) when delta is None;
    new tensors of residual's shape and dtype. `order` (int32, a permutation of the columns, on the
    row's device): the RMSNorm comes out with its columns in that order; `ordered_weight`, weight[order],
    saves computing it per call."""
    width = residual.shape[-1]
    rows = residual.numel() // width
    block = triton.next_power_of_2(width)
    normed = torch.empty_like(residual)
    total = torch.empty_like(residual) if delta is not None else residual
    if order is not None and (order.dtype != torch.int32 or order.numel() != width):
        raise ValueError(f"the column order must be {width} int32 indices")
    if order is not None:
        weight = ordered_weight if ordered_weight is not None else weight.index_select(0, order.long())
    launcher(add_rms_norm_kernel, (rows,))(residual, delta if delta is not None else residual, weight,
                                           order if order is not None else weight, total, normed,
                                           width, float(eps), BLOCK=block, HAS_DELTA=delta is not None,
                                           HAS_ORDER=order is not None, num_warps=max(1, min(16, block // 256)))
    return total, normed
