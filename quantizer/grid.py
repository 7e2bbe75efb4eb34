"""The quantization grid: per-group scale and zero point, and round-to-nearest (RTN).

Kept apart from GPTQ so RTN (the baseline) and GPTQ use exactly the same grid. Scales are rounded to
float16 when they are fitted, because that is what the checkpoint stores: the fake-quantized weight
the algorithm works with is then bit-identical to what a reader dequantizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GridSpec:
    """How one layer is quantized: bits, group size (-1 = whole input), symmetric or not, and the
    optional MSE range search (shrink the min/max range while the p-norm error falls)."""
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    mse: bool = False
    mse_norm: float = 2.4
    mse_grid: int = 100
    mse_maxshrink: float = 0.8

    def __post_init__(self):
        validate_bits_group(self.bits, self.group_size)

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1


def validate_bits_group(bits, group_size) -> None:
    """Raise ValueError with a human sentence for settings no checkpoint can store."""
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size >= 1):
        raise ValueError(f"group size must be -1 (one group per column) or a positive number of input "
                         f"rows such as 32, 64 or 128, got {group_size!r}")


def _scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = spec.maxq
    if spec.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        xmin = torch.minimum(xmin, torch.zeros_like(xmin))
        xmax = torch.maximum(xmax, torch.zeros_like(xmax))
        scale = (xmax - xmin) / maxq
        zero = None
    scale = scale.half().float()  # what the checkpoint stores
    # an all-zero row: any positive scale represents it exactly (a where, not `if .any()`: no device sync)
    scale = torch.where(scale <= 1e-8, torch.ones_like(scale), scale)
    if zero is None:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def fit(w: torch.Tensor, spec: GridSpec, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero for each row of `w` [N, k] (one group). `weight` [k], when given, weights
    the MSE search per input column (e.g. the Hessian diagonal)."""
    w = w.float()
    xmin = w.min(dim=1).values
    xmax = w.max(dim=1).values
    scale, zero = _scale_zero(xmin, xmax, spec)
    if not spec.mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    col_w = None if weight is None else weight.float().clamp_min(0).unsqueeze(0)
    for i in range(int(spec.mse_maxshrink * spec.mse_grid)):
        p = 1 - i / spec.mse_grid
        s1, z1 = _scale_zero(p * xmin, p * xmax, spec)
        err = (dequantize(quantize(w, s1.unsqueeze(1), z1.unsqueeze(1), spec.maxq),
                          s1.unsqueeze(1), z1.unsqueeze(1)) - w).abs().pow(spec.mse_norm)
        if col_w is not None:
            err = err * col_w
        err = err.sum(dim=1)
        better = err < best  # applied without `if better.any()`: no device sync per grid point
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) of `w` on the grid, clamped to [0, maxq]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


@dataclass
class QuantResult:
    """A quantized linear weight in checkpoint terms, plus its fake-quantized float copy.

    `codes` [N, K] int, `scales`/`zeros` [G, N], `g_idx` [K]; `weight` [N, K] is scales*(codes-zeros)
    gathered by g_idx, i.e. exactly what a reader dequantizes."""
    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    loss: float = 0.0
    damp: float | None = None


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-k // group_size)


def rtn(weight: torch.Tensor, spec: GridSpec) -> QuantResult:
    """Round-to-nearest with the same grid GPTQ uses: the baseline. `fit` works row by row, so the full
    groups of all rows are fitted in one call as the rows of an [N * groups, g] view (the pipeline runs
    this for every linear), and a short last group in a second one."""
    w = weight.float()
    n, k = w.shape
    g = k if spec.group_size == -1 else spec.group_size
    full = k // g * g
    scales, zeros = [], []
    if full:
        s, z = fit(w[:, :full].reshape(n * (full // g), g), spec)
        scales.append(s.reshape(n, full // g))
        zeros.append(z.reshape(n, full // g))
    if full < k:
        s, z = fit(w[:, full:], spec)
        scales.append(s.unsqueeze(1))
        zeros.append(z.unsqueeze(1))
    scales_t = torch.cat(scales, dim=1).T.contiguous()  # [G, N]
    zeros_t = torch.cat(zeros, dim=1).T.contiguous()
    g_idx = torch.arange(k, device=w.device) // g
    codes = quantize(w, scales_t[g_idx].T, zeros_t[g_idx].T, spec.maxq)
    fake = dequantize(codes, scales_t[g_idx].T, zeros_t[g_idx].T)
    return QuantResult(weight=fake, codes=codes.to(torch.int32), scales=scales_t, zeros=zeros_t.to(torch.int32),
                       g_idx=g_idx.to(torch.int32))
