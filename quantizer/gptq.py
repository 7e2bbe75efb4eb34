"""GPTQ on one linear layer (Frantar et al. 2022), with the details that matter in practice:
Hessian accumulated in fp32, dead input columns, dampening with automatic retry when the Cholesky
factorisation fails, blocked lazy updates, act-order, static groups, any group size (including a
short last group) and the shared quantization grid of `quantizer.grid`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from quantizer.grid import GridSpec, QuantResult, dequantize, fit, num_groups, quantize

log = logging.getLogger(__name__)

MAX_DAMP = 1.0


@dataclass(frozen=True)
class GPTQOptions:
    """Algorithm settings that are not part of the grid.

    `token_clip`: when set, a calibration token whose input norm exceeds `token_clip` times the
    median token norm of its batch has its Hessian contribution scaled down to that norm. The token
    stays in (leaving attention-sink positions out hurts), but one massive-activation position can no
    longer dominate H."""
    act_order: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    token_clip: float | None = None
    mse_hessian_weighted: bool = False

    def __post_init__(self):
        if not (0.0 < self.damp_percent < MAX_DAMP):
            raise ValueError(f"damp must be in (0, 1), got {self.damp_percent!r}")
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.token_clip is not None and self.token_clip <= 0:
            raise ValueError(f"token clip must be > 0, got {self.token_clip}")


class Hessian:
    """H = 2/n * sum(x x^T) over every calibration token seen so far, in fp32."""

    def __init__(self, columns: int, device: torch.device | str, token_clip: float | None = None):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0
        self.token_clip = token_clip

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        if self.token_clip is not None:
            norms = x.norm(dim=1)
            limit = self.token_clip * norms.median().clamp_min(1e-12)
            x = x * (limit / norms.clamp_min(1e-12)).clamp(max=1.0).unsqueeze(1)
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * math.sqrt(2.0 / self.n)
        self.H.addmm_(x.T, x)


def _inverse_cholesky(H: torch.Tensor, damp_percent: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1; doubles damp until it factorises."""
    diag_mean = torch.mean(torch.diagonal(H)).item()
    damp = damp_percent
    while True:
        Hd = H.clone()
        Hd.diagonal().add_(damp * diag_mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                if damp != damp_percent:
                    log.warning("%s: Cholesky failed at damp %.4g; succeeded with damp %.4g", name, damp_percent, damp)
                return U, damp
        if damp >= MAX_DAMP:
            raise RuntimeError(f"{name}: the Hessian is not positive definite even with damp {damp:g}; "
                               "the calibration data may be too small or degenerate")
        damp = min(MAX_DAMP, damp * 2)


def relative_output_error(weight: torch.Tensor, fake: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T): the share of the layer's output energy lost to quantization."""
    dw = (fake.float() - weight.float()).to(H.device)
    w = weight.float().to(H.device)
    num = ((dw @ H) * dw).sum().item()
    den = ((w @ H) * w).sum().item()
    return num / den if den > 0 else 0.0


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, spec: GridSpec, opts: GPTQOptions = GPTQOptions(),
                  name: str = "layer") -> QuantResult:
    """Quantize `weight` [N, K] (torch Linear layout) given the Hessian H [K, K] of its inputs."""
    device = H.device
    W = weight.to(device, torch.float32).clone()
    n_out, k = W.shape
    if H.shape != (k, k):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match K={k}")
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = k if spec.group_size == -1 else spec.group_size
    n_groups = num_groups(k, spec.group_size)
    hdiag = torch.diagonal(H).clone()

    def col_weight(cols):
        return hdiag[cols] if opts.mse_hessian_weighted else None

    static = None
    if opts.static_groups:
        static = [fit(W[:, s:s + g], spec, col_weight(torch.arange(s, min(s + g, k), device=device)))
                  for s in range(0, k, g)]
    if opts.act_order:
        perm = torch.argsort(hdiag, descending=True)
    else:
        perm = torch.arange(k, device=device)
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv, damp_used = _inverse_cholesky(H, opts.damp_percent, name)

    codes = torch.zeros_like(W)
    losses = torch.zeros(n_out, device=device)
    group_scale = [None] * n_groups
    group_zero = [None] * n_groups
    scale = zero = None
    bs = opts.block_size
    maxq = spec.maxq
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if static is not None:
                scale, zero = static[int(perm[col]) // g]
            elif col % g == 0:
                end = min(col + g, k)
                current = W1[:, i:min(count, end - i1)]
                if end > i2:  # the group reaches past this block: apply the pending lazy updates
                    rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:end]
                    current = torch.cat([current, rest], dim=1)
                scale, zero = fit(current, spec, col_weight(perm[col:end]))
                group_scale[col // g], group_zero[col // g] = scale, zero
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize(w, scale, zero, maxq)
            wq = dequantize(q, scale, zero)
            codes[:, col] = q
            err = (w - wq) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        losses += Err1.pow(2).sum(dim=1) / 2  # sum of (w - q)^2 / d^2 / 2 over the block
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    codes = codes[:, invperm]
    if static is not None:
        scales = torch.stack([s for s, _ in static])
        zeros = torch.stack([z for _, z in static])
        g_idx = torch.arange(k, device=device) // g
    else:
        scales = torch.stack(group_scale)
        zeros = torch.stack(group_zero)
        g_idx = (torch.arange(k, device=device) // g)[invperm]
    fake = dequantize(codes, scales[g_idx].T, zeros[g_idx].T)
    return QuantResult(weight=fake, codes=codes.to(torch.int32), scales=scales, zeros=zeros.to(torch.int32),
                       g_idx=g_idx.to(torch.int32), loss=float(losses.sum().item()), damp=damp_used)
