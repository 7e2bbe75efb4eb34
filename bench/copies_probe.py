"""Does a per-layer time depend on how many weight copies the timing rotates over? The tuner's pick for
each case timed over 1, 2, 3, 4 and 8 independent random copies of the layer, as CUDA graph replays. A time
that falls as the copies get fewer means part of the layer stays in L2 between calls, which no layer of a
model does (each is read once a step, after ~6 others): the tuner's copies (timing.cold_copies, 2x the L2)
and bench.kernels' (4x) should both be past that point.

    python -m bench.copies_probe [--cases 8192x28672:2g64,4096x11008:4g128] [--m 1] [--copies 1,2,3,4,8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends.gptq.kernel_runtime import KernelRuntime  # noqa: E402
from backends.gptq.timing import graph_time_ms  # noqa: E402
from bench.kernels import random_layer, shape_case  # noqa: E402


def parse_cases(text: str) -> list[tuple[int, int, int, int, bool]]:
    """'KxN:case,...' (case as bench.kernels names them) -> [(K, N, bits, group, act-order), ...]."""
    return [shape_case(item, "bench.copies_probe") for item in text.split(",")]


def probe(K: int, N: int, bits: int, gs: int, act: bool, rows: int, copies: list[int]) -> str:
    layers = [random_layer(K, N, bits, gs, act, 7 + i)[1] for i in range(max(copies))]
    x = torch.randn(rows, K, dtype=torch.float16, device="cuda")
    runtime = KernelRuntime(tune=True, cache_file=None)
    cfg = runtime.config_for(x, layers[0])
    times = [f"{n}: {graph_time_ms(lambda i: runtime.run(x, layers[i % n], cfg), calls=max(8, 2 * n)) * 1e3:.1f}"
             for n in copies]
    return (f"{K}x{N} {bits}-bit g{gs}{' act-order' if act else ''} M={rows} "
            f"({layers[0].nbytes() / 2**20:.1f} MB a copy) {cfg}: us by copies " + ", ".join(times))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=parse_cases, default="8192x28672:2g64,4096x11008:4g128,8192x28672:4g128")
    ap.add_argument("--m", type=int, default=1, help="rows of x")
    ap.add_argument("--copies", default="1,2,3,4,8", type=lambda t: [int(n) for n in t.split(",")])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.copies_probe needs a CUDA GPU", file=sys.stderr)
        sys.exit(1)
    print(torch.cuda.get_device_name(0))
    for case in args.cases:
        print(probe(*case, args.m, args.copies), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
