"""QuantLinear: one GPTQ linear layer, `y = x @ dequant(W) + bias`, run the way its device allows.

- CUDA: the Triton kernels of triton_kernels.py read the packed codes (kernel_runtime.KernelLayer).
  Act-order is undone once here: rows are sorted by group and the activations are gathered in that
  order inside the kernel, so the kernel always reads contiguous groups.
- CPU: 2-, 3- and 4-bit layers on torch's packed int4 kernel where it takes them and it is fast
  (cpu_int4.py: an eighth of the bytes of the fp32 copy, ~2x faster decoding). Other layers take a
  plain torch path: dequantized once into a float weight (cached) when memory allows, so it runs as
  fast as an nn.Linear; otherwise dequantized at every call.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from backends.gptq import format as fmt
from backends.gptq import offload
from backends.gptq.act_order import column_order, natural_order
from backends.gptq.kernel_runtime import KernelLayer, KernelRuntime, fields3_for
from backends.gptq.word_order import INTERLEAVED_BITS, fields3, interleave_pairs


def sort_by_group(g_idx: torch.Tensor, K: int, group_size: int) -> tuple[torch.Tensor | None, int | None]:
    """(perm, rows per group) such that rows taken in `perm` order have group k // rows; perm is None
    when g_idx is already that order. rows is None when no such order exists (uneven groups)."""
    g = g_idx.to(torch.long)
    rows = K if group_size == -1 else group_size
    counts = torch.bincount(g, minlength=int(g.max()) + 1 if g.numel() else 1)
    expected = torch.bincount(torch.arange(K) // rows)
    if counts.shape != expected.shape or not torch.equal(counts, expected):
        return None, None
    if torch.equal(g, torch.arange(K, device=g.device) // rows):
        return None, rows
    perm = torch.sort(g, stable=True).indices
    return perm.to(torch.int32), rows


def make_kernel_layer(qweight, qzeros, scales, g_idx, bits: int, group_size: int, checkpoint_format: str,
                      device, codes_on_host: bool = False) -> KernelLayer | None:
    """The kernel form of a layer, or None when its groups cannot be made contiguous. codes_on_host:
    the packed codes end in pinned host memory, where the kernels read them (offload.py); they are
    prepared on `device` first, like every other layer's."""
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if g_idx is None:
        g_idx = fmt.default_g_idx(K, group_size)
    perm, rows = sort_by_group(g_idx.cpu(), K, group_size)
    if rows is None:
        return None
    qweight = qweight.to(device)
    if perm is not None:
        codes = fmt.unpack_qweight(qweight, bits, K)
        qweight = fmt.pack_qweight(codes.index_select(0, perm.to(device).long()), bits)
        perm = perm.to(device)
    zeros = fmt.unpack_qzeros(qzeros.to(device), bits, N, checkpoint_format)
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > 255):
        return None
    interleaved = bits in INTERLEAVED_BITS
    in_fields = bits == 3 and fields3_for(device)  # mode 8's 3-bit order where mode 8 runs
    if interleaved:
        qweight = fields3(qweight) if in_fields else interleave_pairs(qweight, bits)
    qweight = qweight.contiguous()
    if codes_on_host:
        qweight = offload.to_host(qweight)
    return KernelLayer(qweight=qweight, scales=scales.to(device=device, dtype=torch.float16).contiguous(),
                       zeros=zeros.to(torch.uint8).contiguous(), perm=perm, bits=bits, K=K, N=N,
                       group_size=rows, interleaved=interleaved, fields3=in_fields)


class QuantLinear(nn.Module):
    """A GPTQ layer in place of nn.Linear. Build it with `from_packed`."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, name: str = ""):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.name = bits, group_size, name
        self.kernel: KernelLayer | None = None
        self.runtime: KernelRuntime | None = None
        self.packed: tuple | None = None   # (qweight, qzeros, scales, g_idx, checkpoint_format) on CPU
        self.int4 = None                   # cpu_int4.Int4Weight: 2/3/4-bit CPU layers on torch's packed int4 kernel
        self.group = None                  # fusion.FusedGroup when fused with its siblings (CUDA)
        self.group_index = 0
        # act_order.py's rewrites (CUDA): outputs stored in this order of the checkpoint's columns, and
        # the act-order perm whose gather now happens before this layer (its input arrives sorted)
        self.output_order: torch.Tensor | None = None
        self.input_order: torch.Tensor | None = None
        self._sorted_kernel: KernelLayer | None = None
        self.register_buffer("weight_cache", None, persistent=False)  # [N, K] dequantized, CPU path
        self.register_buffer("bias", None, persistent=False)

    @classmethod
    def from_packed(cls, name: str, qweight, qzeros, scales, g_idx, bias, *, bits: int, group_size: int,
                    checkpoint_format: str, device: torch.device, dtype: torch.dtype,
                    runtime: KernelRuntime | None = None, cache_dequantized: bool = True,
                    codes_on_host: bool = False, cpu_int4: bool = False) -> "QuantLinear":
        """cpu_int4 (CPU): run 2/3/4-bit layers on torch's packed int4 kernel (cpu_int4.py) where it takes them,
        instead of a dequantized copy (cache_dequantized) or a dequantization per forward."""
        K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
        layer = cls(K, N, bits, group_size, name)
        if bias is not None:
            layer.bias = bias.to(device=device, dtype=dtype)
        if device.type == "cuda":
            layer.kernel = make_kernel_layer(qweight, qzeros, scales, g_idx, bits, group_size,
                                             checkpoint_format, device, codes_on_host)
            layer.runtime = runtime
            if layer.kernel is None:  # uneven groups: no fast path, keep the dense weight
                cache_dequantized = True
        if device.type == "cpu" and cpu_int4:
            from backends.gptq.cpu_int4 import make_int4_weight
            layer.int4 = make_int4_weight(qweight, qzeros, scales, g_idx, bits, group_size, checkpoint_format)
        if layer.kernel is None and layer.int4 is None:
            if cache_dequantized:
                W = fmt.dequantize(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype=torch.float32)
                layer.weight_cache = W.t().contiguous().to(device=device, dtype=dtype)
            else:
                layer.packed = (qweight, qzeros, scales, g_idx, checkpoint_format)
        return layer

    def attach_group(self, group, index: int) -> None:
        """Run through a fused sibling group from now on; this layer's own kernel tensors are freed."""
        self.group, self.group_index = group, index
        self.kernel = None

    def input_perm(self) -> torch.Tensor | None:
        """The act-order perm this layer's kernel gathers its input by (None: none, or no kernel)."""
        kernel = self.group.kernel if self.group is not None else self.kernel
        return kernel.perm if kernel is not None else None

    def share_input_perm(self, perm: torch.Tensor) -> None:
        """Hold `perm` (equal to the own one) as the perm object, so a row sorted by it is recognised."""
        if self.group is not None:
            self.group.kernel.perm = perm
        elif self.kernel is not None:
            self.kernel.perm = perm
        self._sorted_kernel = None

    def reorder_outputs(self, order: torch.Tensor) -> None:
        """Store the output columns in `order` (y[..., i] is the checkpoint's column order[i]); see
        act_order.fold_mlp_orders, which makes the consumer of these outputs expect that order."""
        k, idx = self.kernel, order.long()
        codes = k.qweight.index_select(1, idx.to(k.qweight.device)).contiguous()
        self.kernel = replace(k, qweight=offload.like(k.qweight, codes),
                              scales=k.scales.index_select(1, idx).contiguous(),
                              zeros=k.zeros.index_select(1, idx).contiguous())
        if self.bias is not None:
            self.bias = self.bias.index_select(0, idx)
        self.output_order = order

    def take_sorted_inputs(self) -> None:
        """From now on the input arrives in the kernel's row order (act_order.fold_mlp_orders): no gather."""
        self.input_order = self.kernel.perm
        self.kernel = replace(self.kernel, perm=None)

    def _kernel_for_sorted_input(self) -> KernelLayer:
        if self._sorted_kernel is None:
            self._sorted_kernel = replace(self.kernel, perm=None)
        return self._sorted_kernel

    @property
    def path(self) -> str:
        if self.group is not None:
            return "triton-fused"
        if self.kernel is not None:
            return "triton"
        if self.int4 is not None:
            return "torch-int4"
        return "torch-cached" if self.weight_cache is not None else "torch-dequant"

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The dequantized weight [N, K] in nn.Linear layout (for tests and the CPU path)."""
        if self.weight_cache is not None:
            return self.weight_cache.to(dtype)
        if self.int4 is not None:
            return self.int4.dense(dtype)
        if self.packed is not None:
            qweight, qzeros, scales, g_idx, cf = self.packed
            # contiguous, as the cached weight is: the same matmul kernel, so the same result to the bit
            return fmt.dequantize(qweight, qzeros, scales, g_idx, self.bits, cf, dtype=dtype).t().contiguous()
        from backends.gptq.kernel_runtime import launch_dequant
        k = self.kernel if self.group is None else self.group.kernel
        if self.input_order is not None:  # rows back in the checkpoint's order
            k = replace(k, perm=self.input_order)
        w = launch_dequant(k, torch.empty(k.K, k.N, device=k.scales.device, dtype=torch.float32))
        if self.group is not None:
            start, stop = self.group.offsets[self.group_index]
            w = w[:, start:stop]
        if self.output_order is not None:  # columns back in the checkpoint's order
            w = natural_order(w, self.output_order)
        return w.t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_cache is not None:
            return F.linear(x, self.weight_cache, self.bias)
        if self.int4 is not None:
            return self.int4.linear(x, self.bias)
        if self.kernel is None and self.group is None:
            return F.linear(x, self.dense_weight(x.dtype), self.bias)
        order = column_order(x)  # a norm that wrote its row in act-order (act_order.py)
        presorted = order is not None and order is self.input_perm()
        if order is not None and not presorted:  # sorted for another reader: back to natural order
            x = natural_order(x, order)
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        if self.group is not None:
            y = self.group.output(x2d, self.group_index, presorted)
        else:
            kernel = self._kernel_for_sorted_input() if presorted else self.kernel
            y = self.runtime.matmul(x2d, kernel, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, path={self.path}")
