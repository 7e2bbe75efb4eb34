"""Sibling projections that read the same input (q/k/v of attention, gate/up of the MLP) run as one
wider kernel launch on CUDA.

Why: at batch 1 every launch has a fixed cost and small N leaves the GPU under-filled; one launch over
N = Nq + Nk + Nv reads the same bytes with fewer, fuller waves. The model code still calls q_proj,
k_proj and v_proj in turn: the first call computes all outputs for that input tensor and the others
return their column slice of it. Only layers that share bits, group layout and activation order are
fused; everything else keeps its own launch.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from backends.gptq import offload
from backends.gptq.kernel_runtime import KernelLayer, KernelRuntime

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedGroup:
    """One concatenated KernelLayer for several QuantLinear siblings, and the last input's result."""

    def __init__(self, kernel: KernelLayer, bias: torch.Tensor | None, offsets: list[tuple[int, int]],
                 runtime: KernelRuntime):
        self.kernel, self.bias, self.offsets, self.runtime = kernel, bias, offsets, runtime
        self._key = None
        self._x = None
        self._out = None
        self._sorted_kernel = None

    def output(self, x2d: torch.Tensor, index: int, presorted: bool = False) -> torch.Tensor:
        """Sibling `index`'s columns of x2d @ W; presorted: x2d's columns are already in the kernel's
        row order (act_order.py), so the kernel runs without its gather."""
        # the same input: same storage (kept alive by self._x, so no other tensor can take its
        # address), same in-place version, same shape
        key = (x2d.data_ptr(), _version(x2d), tuple(x2d.shape), x2d.dtype, presorted)
        if self._key != key or self._x is None:
            kernel = self.kernel
            if presorted:
                if self._sorted_kernel is None:
                    self._sorted_kernel = replace(kernel, perm=None)
                kernel = self._sorted_kernel
            self._out = self.runtime.matmul(x2d, kernel, self.bias)
            self._key, self._x = key, x2d
        start, stop = self.offsets[index]
        out = self._out[:, start:stop]
        if index == len(self.offsets) - 1:  # every sibling served: drop the references
            self._key = self._x = self._out = None
        return out


def _version(t: torch.Tensor) -> int:
    """The in-place version counter; inference tensors have none (and cannot be modified in place)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _compatible(layers) -> bool:
    first = layers[0].kernel
    if any(l.kernel is None for l in layers):
        return False
    for l in layers[1:]:
        k = l.kernel
        if offload.on_host(k.qweight) != offload.on_host(first.qweight):
            return False
        if (k.bits, k.K, k.group_size, k.interleaved, k.fields3) != (first.bits, first.K, first.group_size,
                                                                       first.interleaved, first.fields3):
            return False
        if (k.perm is None) != (first.perm is None) or (k.perm is not None and not torch.equal(k.perm, first.perm)):
            return False
    has_bias = [l.bias is not None for l in layers]
    return all(has_bias) or not any(has_bias)


def fuse_siblings(model: nn.Module, runtime: KernelRuntime) -> int:
    """Fuse every compatible q/k/v and gate/up group of QuantLinear layers; returns the groups fused."""
    from backends.gptq.quant_linear import QuantLinear
    fused = 0
    for module in model.modules():
        for names in GROUPS:
            layers = [getattr(module, n, None) for n in names]
            if not all(isinstance(l, QuantLinear) for l in layers) or not _compatible(layers):
                continue
            kernels = [l.kernel for l in layers]
            codes = torch.cat([k.qweight for k in kernels], 1).contiguous()
            cat = KernelLayer(qweight=offload.like(kernels[0].qweight, codes),
                              scales=torch.cat([k.scales for k in kernels], 1).contiguous(),
                              zeros=torch.cat([k.zeros for k in kernels], 1).contiguous(),
                              perm=kernels[0].perm, bits=kernels[0].bits, K=kernels[0].K,
                              N=sum(k.N for k in kernels), group_size=kernels[0].group_size,
                              interleaved=kernels[0].interleaved, fields3=kernels[0].fields3)
            bias = torch.cat([l.bias for l in layers]) if layers[0].bias is not None else None
            offsets, start = [], 0
            for k in kernels:
                offsets.append((start, start + k.N))
                start += k.N
            group = FusedGroup(cat, bias, offsets, runtime)
            for i, layer in enumerate(layers):
                layer.attach_group(group, i)
            fused += 1
    return fused
