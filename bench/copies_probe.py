"""Does a per-layer time depend on how many weight copies the timing rotates over? The tuner's pick (and
any configs named) timed over 1, 2, 3, 4 and 8 independent random copies of a layer, as CUDA graph replays.
A time that keeps falling as copies get fewer means part of the layer (scales, zeros) stays in L2.

    python -m bench.copies_probe
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends.gptq.kernel_runtime import GemmConfig, KernelRuntime  # noqa: E402
from backends.gptq.timing import graph_time_ms  # noqa: E402
from bench.kernels import random_layer  # noqa: E402

CASES = [(8192, 28672, 2, 64, [GemmConfig("fused", 1, 512, 64, 9, 4, 3, mode=8, max_registers=128)]),
         (4096, 11008, 4, 128, []), (8192, 28672, 4, 128, [])]


def probe(K: int, N: int, bits: int, gs: int, extra: list) -> None:
    layers = [random_layer(K, N, bits, gs, False, 7 + i)[1] for i in range(8)]
    x = torch.randn(1, K, dtype=torch.float16, device="cuda")
    runtime = KernelRuntime(tune=True, cache_file=None)
    pick = runtime.config_for(x, layers[0])
    mb = layers[0].nbytes() / 2**20
    for cfg in [pick] + extra:
        times = []
        for n in (1, 2, 3, 4, 8):
            ms = graph_time_ms(lambda i: runtime.run(x, layers[i % n], cfg), calls=max(8, 2 * n))
            times.append(f"{n}: {ms * 1e3:.1f}")
        print(f"{K}x{N} {bits}-bit g{gs} ({mb:.1f} MB a copy) {cfg}: us by copies " + ", ".join(times), flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        print("bench.copies_probe needs a CUDA GPU", file=sys.stderr)
        sys.exit(1)
    print(torch.cuda.get_device_name(0))
    for K, N, bits, gs, extra in CASES:
        probe(K, N, bits, gs, extra)
        torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
