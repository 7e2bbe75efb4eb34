"""Act-order's activation gather for a few rows: x[:, perm] in one small Triton launch.

Why: at 2-16 rows an act-order layer runs the perm-free kernel on x gathered once (`gather_x`), and that
gather was torch's index_select: +34-37% over the same layer without act-order on 4096x11008 at 16 rows
on an H200 (bench/RESULTS.md), far more than reading 16 x 4096 fp16 costs. Here each program takes a run
of output columns for every row: one read of the perm per column, the rows' values gathered from an x
that sits in L2, and contiguous stores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.gptq.parallel_compile import launcher
from backends.gptq.triton_kernels import gdc_launch_dependents

MAX_ROWS = 16  # one program holds every row of its columns


@triton.jit
def gather_columns_kernel(x_ptr, perm_ptr, out_ptr, M, K, stride_xm, stride_om,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr, TRIGGER: tl.constexpr = False):
    """out[m, j] = x[m, perm[j]] for the BLOCK columns j of this program and all M <= ROWS rows.
    TRIGGER (sm_90+): lets the kernel after it, launched as a programmatic dependent launch, start at once
    (it reads its weights while this runs, and waits for this kernel's end before reading the gathered x)."""
    if TRIGGER:
        gdc_launch_dependents()
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_k = cols < K
    src = tl.load(perm_ptr + cols, mask=in_k, other=0)
    rows = tl.arange(0, ROWS)
    mask = (rows < M)[:, None] & in_k[None, :]
    v = tl.load(x_ptr + rows[:, None] * stride_xm + src[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], v, mask=mask)


def gather_columns(x2d: torch.Tensor, perm: torch.Tensor, block: int = 128, compile_only: bool = False,
                   trigger: bool = False) -> torch.Tensor:
    """x2d[:, perm] (a new contiguous tensor) for 1 <= M <= MAX_ROWS rows with unit column stride.
    compile_only: compile the kernel and return the (unfilled) output, for parallel_compile. trigger: the
    next kernel, if a programmatic dependent launch, may start right away (see the kernel)."""
    M, K = x2d.shape
    if not 1 <= M <= MAX_ROWS or x2d.stride(1) != 1 or perm.numel() != K:
        raise ValueError(f"gather_columns takes 1-{MAX_ROWS} rows with unit column stride and a perm of {K} "
                         f"columns, got {tuple(x2d.shape)} with strides {x2d.stride()} and {perm.numel()}")
    out = torch.empty_like(x2d, memory_format=torch.contiguous_format)
    rows = max(2, triton.next_power_of_2(M))
    launcher(gather_columns_kernel, (triton.cdiv(K, block),), compile_only)(
        x2d, perm, out, M, K, x2d.stride(0), out.stride(0), ROWS=rows, BLOCK=block, TRIGGER=trigger, num_warps=4)
    return out
