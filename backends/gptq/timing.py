"""GPU timing as the decoder runs kernels: CUDA graph replays over enough copies of a layer that its
weights come from device memory, not L2. Used by the tuner and the benchmarks."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from backends.gptq import offload

if TYPE_CHECKING:
    from backends.gptq.kernel_runtime import KernelLayer


def cold_copies(layer: KernelLayer, device, max_copies: int = 16, l2_bytes: int | None = None,
                free_bytes: int | None = None) -> list[KernelLayer]:
    """The layer and enough copies of its tensors that timing calls rotating over them read the weights
    from device memory, not from L2. A decoding step reads every layer once from HBM; tuned on
    L2-resident weights (H100: 50 MB holds a 4096x11008 4-bit layer) the tuner favoured tile shapes
    that lose on HBM. Fewer copies when device memory is short; no copies off CUDA (no cache to defeat
    there, and nothing is timed). l2_bytes / free_bytes override what the device reports."""
    if torch.device(device).type != "cuda" and (l2_bytes is None or free_bytes is None):
        return [layer]
    size = max(layer.nbytes(), 1)
    if l2_bytes is None:
        props = torch.cuda.get_device_properties(device)
        l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    n = min(max_copies, math.ceil(2 * l2_bytes / size))
    n = max(1, min(n, int(free_bytes * 0.25 // size)))

    def clone(t):  # offloaded codes are copied to pinned host memory too (offload.py)
        return None if t is None else offload.like(t, t.clone())

    return [layer] + [replace(layer, qweight=clone(layer.qweight), scales=clone(layer.scales),
                              zeros=clone(layer.zeros), perm=clone(layer.perm)) for _ in range(n - 1)]


def graph_time_ms(fn, calls: int = 20, reps: int = 10) -> float:
    """Median GPU time of one fn(i) call, from replays of a CUDA graph holding `calls` calls: launch
    overhead is left out, as it is when the decoder replays its graph. fn(i) may rotate inputs by i."""
    for i in range(2):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]
