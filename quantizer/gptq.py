"""GPTQ on one linear layer (Frantar et al. 2022), with the details that matter in practice:
Hessian accumulated in fp32, dead input columns, dampening with automatic retry when the Cholesky
factorisation fails, blocked lazy updates, act-order, static groups, any group size (including a
short last group) and the shared quantization grid of `quantizer.grid`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass

import torch

from quantizer.grid import GridSpec, QuantResult, dequantize, fit, num_groups, quantize

log = logging.getLogger(__name__)

MAX_DAMP = 1.0
LOOPS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class GPTQOptions:
    """Algorithm settings that are not part of the grid.

    `token_clip`: when set, a calibration token whose input norm exceeds `token_clip` times the
    median token norm of its batch has its Hessian contribution scaled down to that norm. The token
    stays in (leaving attention-sink positions out hurts), but one massive-activation position can no
    longer dominate H.

    `loop`: how the columns of a block are walked. `auto`: one Triton launch per segment
    (`quantizer.gptq_triton`) when the weights are on CUDA, the torch loop otherwise (or always when the
    environment sets GPTQ_LOOP=torch); `torch`: always the torch loop; `triton`: always the kernel (on
    CPU tensors only under TRITON_INTERPRET=1: the tests)."""
    act_order: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    token_clip: float | None = None
    mse_hessian_weighted: bool = False
    loop: str = "auto"

    def __post_init__(self):
        if not (0.0 < self.damp_percent < MAX_DAMP):
            raise ValueError(f"damp must be in (0, 1), got {self.damp_percent!r}")
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.token_clip is not None and self.token_clip <= 0:
            raise ValueError(f"token clip must be > 0, got {self.token_clip}")
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {self.loop!r}")


@contextlib.contextmanager
def _tf32_matmul():
    """TF32 tensor cores for fp32 CUDA matmuls inside the block only (the global flag is restored)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


class Hessian:
    """H = 2/n * sum(x x^T) over every calibration token seen so far, accumulated in fp32.

    On CUDA, when the inputs are float16/bfloat16 (the pipeline's CUDA activations are float16) and no
    token clip rescales them, the product runs on TF32 tensor cores over the unscaled inputs and 2/n is
    applied to the fp32 result (addmm's alpha): a 16-bit value has at most 11 significant bits and is
    exactly a TF32 value, so every product x_i x_j is exact and only the fp32 accumulation rounds, as in
    an fp32 matmul. That is ~90 TFLOP per LLaMA-7B layer at 128 x 2048 tokens (K = 4096 three times,
    11008 once): seconds at the fp32 rate, a fraction of that on tensor cores. Everything else (CPU,
    fp32 inputs, token clip) is the plain fp32 product of the scaled inputs."""

    def __init__(self, columns: int, device: torch.device | str, token_clip: float | None = None):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0
        self.token_clip = token_clip

    def add(self, x: torch.Tensor) -> None:
        exact_tf32 = (self.H.is_cuda and self.token_clip is None
                      and x.dtype in (torch.float16, torch.bfloat16))
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        if exact_tf32:
            self.H.mul_(self.n / (self.n + m))
            self.n += m
            with _tf32_matmul():
                self.H.addmm_(x.T, x, alpha=2.0 / self.n)
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
        del Hd  # at most three K x K matrices alive at once (H, L, the inverse): K = 11008 is 485 MB each
        if int(info) == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
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
    return relative_output_errors(weight, [fake], H)[0]


def relative_output_errors(weight: torch.Tensor, fakes: list[torch.Tensor], H: torch.Tensor) -> list[float]:
    """`relative_output_error` of several fake-quantized copies of one weight: the denominator
    tr(W H W^T) (an N x K x K product) is computed once, and the host waits once for all of them."""
    w = weight.float().to(H.device)
    den = ((w @ H) * w).sum()
    nums = []
    for fake in fakes:
        dw = fake.float().to(H.device) - w
        nums.append(((dw @ H) * dw).sum())
    values = torch.stack([den, *nums]).tolist()
    den = values[0]
    return [num / den if den > 0 else 0.0 for num in values[1:]]


def _use_triton(opts: GPTQOptions, W: torch.Tensor) -> bool:
    if opts.loop == "torch":
        return False
    from quantizer import gptq_triton
    if opts.loop == "triton":
        if not gptq_triton.supports(opts.block_size):
            raise RuntimeError(f"the Triton GPTQ loop needs triton and a block size <= {gptq_triton.MAX_BLOCK}")
        if not W.is_cuda and not gptq_triton.interpreting():
            raise RuntimeError("the Triton GPTQ loop runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
        return True
    if not W.is_cuda or os.environ.get("GPTQ_LOOP", "").strip().lower() == "torch":
        return False
    return gptq_triton.supports(opts.block_size)


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
        W = W[:, perm]
        H = H[perm][:, perm]
    else:  # the identity: no permuted copies of W and H (for a 7B down_proj H alone is 485 MB)
        perm = torch.arange(k, device=device)
    Hinv, damp_used = _inverse_cholesky(H, opts.damp_percent, name)
    del H

    codes = torch.zeros_like(W)
    losses = torch.zeros(n_out, device=device)
    group_scale = [None] * n_groups
    group_zero = [None] * n_groups
    scale = zero = None
    bs = opts.block_size
    maxq = spec.maxq
    triton_loop = _use_triton(opts, W)
    if static is not None:
        col_group = (perm // g).tolist()  # on the host once: no device sync per column
        static_scale = torch.stack([s for s, _ in static])  # [G, N]
        static_zero = torch.stack([z for _, z in static])
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if triton_loop:
            from quantizer.gptq_triton import run_segment
            i = 0
            while i < count:  # segments end where a group's scale and zero must be fitted first
                col = i1 + i
                if static is not None:
                    stop = count
                    groups = perm[i1:i2] // g  # each column's own group: [N, count] views of [count, N]
                    seg_scale, seg_zero = static_scale[groups].T, static_zero[groups].T
                else:
                    if col % g == 0:
                        scale, zero = _fit_group(W, W1, Err1, Hinv, i1, i2, i, col, g, k, spec,
                                                 col_weight(perm[col:min(col + g, k)]))
                        group_scale[col // g], group_zero[col // g] = scale, zero
                    stop = min(count, (col // g + 1) * g - i1)
                    seg_scale, seg_zero = scale[:, None].expand(n_out, count), zero[:, None].expand(n_out, count)
                run_segment(W1, Hinv1, seg_scale, seg_zero, codes[:, i1:i2], Err1, i, stop, maxq)
                i = stop
        else:
            for i in range(count):
                col = i1 + i
                if static is not None:
                    scale, zero = static[col_group[col]]
                elif col % g == 0:
                    scale, zero = _fit_group(W, W1, Err1, Hinv, i1, i2, i, col, g, k, spec,
                                             col_weight(perm[col:min(col + g, k)]))
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

    del W, Hinv
    invperm = torch.argsort(perm)
    if opts.act_order:
        codes = codes[:, invperm]
    if static is not None:
        scales, zeros = static_scale, static_zero
        g_idx = torch.arange(k, device=device) // g
    else:
        scales = torch.stack(group_scale)
        zeros = torch.stack(group_zero)
        g_idx = (torch.arange(k, device=device) // g)[invperm]
    fake = dequantize(codes, scales[g_idx].T, zeros[g_idx].T)
    return QuantResult(weight=fake, codes=codes.to(torch.int32), scales=scales, zeros=zeros.to(torch.int32),
                       g_idx=g_idx.to(torch.int32), loss=float(losses.sum().item()), damp=damp_used)


def _fit_group(W, W1, Err1, Hinv, i1, i2, i, col, g, k, spec, weight):
    """Scale and zero of the group starting at column `col` (block-relative `i`), fitted on its current
    (lazily updated) columns: those of the block from W1, and those past the block from W with the
    block's pending updates applied."""
    count = i2 - i1
    end = min(col + g, k)
    current = W1[:, i:min(count, end - i1)]
    if end > i2:  # the group reaches past this block: apply the pending lazy updates
        rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:end]
        current = torch.cat([current, rest], dim=1)
    return fit(current, spec, weight)
