"""Models larger than the GPU: the packed codes of the last decoder layers stay in page-locked host
memory, and the same Triton kernels read them there, over PCIe, at every token.

Why in place: page-locked host memory is mapped into the GPU's address space (unified addressing), so a
kernel reads it with ordinary loads. The alternatives cost more for the same bytes: copying each
layer onto the GPU before its forward (accelerate's offload hooks) moves the same bytes plus a
staging buffer and a wait per layer, and computing those layers on the CPU is slower still. Read in
place, nothing else changes: CUDA graphs replay (the pointers never move), the fused and act-order
forms work as they are, and only the codes travel (scales, zeros, norms, embeddings and the KV cache
stay on the GPU). A decoding step then costs about (codes on the host) / (PCIe read bandwidth) more.
"""
from __future__ import annotations

import math
import re

import torch

from backends.base import BackendError

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# GPU memory left beside the weights when gpu_layers is automatic: the KV cache of this many tokens (or
# the context, when shorter) and a margin (activations, graph pools, cuBLAS and Triton workspaces). Kept
# moderate so a model that fits runs at full speed: a 7B 4-bit model still loads whole on an 8 GB GPU.
RESERVE_TOKENS = 2048
RESERVE_MARGIN = 2**29
PAGE = 4096
HOST_MARK = "_gptq_host_registration"  # attribute of offloaded codes: their registration (see to_host)


def decoder_layer_index(name: str) -> int | None:
    """The decoder layer a module belongs to ("model.layers.12.mlp.down_proj" -> 12), None outside."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def plan_host_layers(codes_bytes: dict[int, int], other_bytes: int, budget: int) -> list[int]:
    """The decoder layers whose codes stay on the host so that the GPU holds at most `budget` bytes:
    everything else (other_bytes) plus the codes of the layers kept. The last layers go first, as few
    as needed. Raises BackendError when even all of them on the host leave too little room."""
    total = other_bytes + sum(codes_bytes.values())
    host: list[int] = []
    for index in sorted(codes_bytes, reverse=True):
        if total <= budget:
            break
        host.append(index)
        total -= codes_bytes[index]
    if total > budget:
        raise BackendError(f"the model needs {total / 2**30:.1f} GiB of GPU memory even with every layer's "
                           f"packed weights in host memory, and {max(budget, 0) / 2**30:.1f} GiB are available: "
                           "free GPU memory (unload other models), or load it on the CPU")
    return sorted(host)


def reserve_bytes(config, dtype: torch.dtype, largest_layer_elements: int) -> int:
    """GPU memory to leave free beside the weights: the KV cache for RESERVE_TOKENS tokens (or the
    context), the prefill buffer of the dequantize + cuBLAS path (the largest layer, dense) and a margin."""
    width = torch.finfo(dtype).bits // 8
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tokens = min(RESERVE_TOKENS, getattr(config, "max_position_embeddings", RESERVE_TOKENS) or RESERVE_TOKENS)
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * width
    return kv + largest_layer_elements * width + RESERVE_MARGIN


def free_for_weights(device: torch.device, reserve: int) -> int:
    """Bytes the weights may take on the GPU: what is free on the device less `reserve`."""
    free, _ = torch.cuda.mem_get_info(device)
    return free - reserve


class _Registration:
    """Page-locks a host buffer for the GPU (cudaHostRegister) for as long as this object lives, and
    keeps the buffer alive until it is unlocked."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer, self.ptr = buffer, buffer.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(self.ptr, buffer.numel(), 0)
        self.ok = int(err) == 0

    def __del__(self):
        if self.ok:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone already
                pass


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of t in page-locked host memory, which CUDA kernels read in place. The memory is an
    ordinary allocation locked where it lies (cudaHostRegister on whole pages of it): torch's pinned
    allocator rounds every block up to a power of two, up to twice the RAM for the codes of a big model."""
    nbytes = t.numel() * t.element_size()
    size = max(-(-nbytes // PAGE) * PAGE, PAGE)
    try:
        raw = torch.empty(size + PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE
        registration = _Registration(raw[start:start + size])
        if not registration.ok:  # e.g. a driver without host registration: torch's own pinned memory
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    except RuntimeError as exc:  # the OS refused to lock that much memory
        raise BackendError(f"could not lock {nbytes / 2**20:.0f} MB of host memory for offloaded weights ({exc}); "
                           "keep more layers on the GPU (gpu_layers) or free RAM") from None
    out = registration.buffer[:nbytes].view(t.dtype).view(t.shape).copy_(t)
    setattr(out, HOST_MARK, registration)  # unlocked and freed with the tensor
    return out


def on_host(t: torch.Tensor) -> bool:
    """Whether t is offloaded codes (page-locked host memory read by the kernels)."""
    return t.device.type == "cpu" and (getattr(t, HOST_MARK, None) is not None or t.is_pinned())


def like(reference: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t, kept where `reference` lives: a CPU op on offloaded codes (cat, index_select) returns pageable
    memory, which no kernel can read, so such results are locked again."""
    return to_host(t) if on_host(reference) and not on_host(t) else t


def codes_bytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * 4  # int32 words
