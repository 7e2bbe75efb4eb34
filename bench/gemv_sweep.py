"""Sweep of the half2 matrix-vector kernel's launch parameters on the decoding shapes of a 7B model, to
see whether the tuner's candidate list misses faster configs (a diagnostic for BENCH.md section 1).

    python -m bench.gemv_sweep [--shapes 4096x12288,4096x4096,4096x22016,11008x4096] [--budget-s 300]

For each shape (4-bit g128, M = 1, fp16): the tuner's pick among its candidates, then a grid of
block_n x block_k x warps x split (and num_stages around the best), each checked against
dequantize + cuBLAS and timed like the tuner times (CUDA graph replays over cold weight copies). The
baseline is a device-to-device copy of the same bytes timed the same way, in the same run.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends.gptq.kernel_runtime import (GemmConfig, KernelRuntime, _split_for, cold_copies,  # noqa: E402
                                          graph_time_ms, sm_count, valid_block_ks)
from bench.kernels import random_layer  # noqa: E402

DECODE_SHAPES = "4096x12288,4096x4096,4096x22016,11008x4096"


def copy_us(nbytes: int) -> float:
    """Time of a device copy of nbytes, rotating over buffers that defeat L2 (as the kernels are timed)."""
    n = max(1, nbytes // 2)
    copies = max(2, math.ceil(2 * 50 * 2**20 / nbytes) + 1)
    src = [torch.empty(n, dtype=torch.float16, device="cuda") for _ in range(copies)]
    dst = torch.empty(n, dtype=torch.float16, device="cuda")
    return graph_time_ms(lambda i: dst.copy_(src[i % copies]), calls=2 * copies, reps=5) * 1e3


def splits_for(layer, block_n, block_k, sms) -> list[int]:
    """The split counts the tuner's heuristic gives for 0.5 to 16 programs per SM."""
    return sorted({_split_for(layer, block_n, block_k, round(f * sms)) for f in (0.5, 1, 2, 3, 4, 6, 8, 12, 16)})


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=DECODE_SHAPES)
    ap.add_argument("--budget-s", type=float, default=100.0, help="stop the grid of a shape after this long")
    args = ap.parse_args(argv)
    sms = sm_count("cuda")
    print(torch.cuda.get_device_name(), "SMs", sms, flush=True)
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        _, layer = random_layer(K, N, 4, 128, False, seed=K + N)
        runtime = KernelRuntime(tune=True)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        copies = cold_copies(layer, "cuda")
        base = copy_us(layer.nbytes())
        # read-only bound: a copy reads and writes, the kernel only reads, so report both
        print(f"\n== {K}x{N} 4-bit g128 M=1: {layer.nbytes() / 1e6:.1f} MB, copy of the same bytes {base:.1f} us "
              f"(read+write {2 * layer.nbytes() / base / 1e3:.0f} GB/s)", flush=True)
        cands = runtime.candidates(1, layer, x.device, x.dtype)
        tuned, tuned_ms = runtime.fastest(x, layer, cands)
        print(f"tuner pick: {tuned_ms * 1e3:.1f} us  {tuned}", flush=True)
        reference = runtime.run(x, layer, GemmConfig(path="dequant")).float()
        results = []
        start = time.time()
        grid = itertools.product((32, 64, 128, 256), valid_block_ks(layer, (64, 128)), (2, 4, 8))
        for bn, bk, warps in grid:
            if time.time() - start > args.budget_s:
                print("(grid budget reached)", flush=True)
                break
            for split in splits_for(layer, bn, bk, sms):
                cfg = GemmConfig("fused", 1, bn, bk, split, warps, 2, mode=4)
                ms = time_config(runtime, x, layer, copies, cfg, reference)
                if ms is not None:
                    results.append((ms, cfg))
        results.sort(key=lambda r: r[0])
        for ms, cfg in results[:3]:  # num_stages around the three best
            for stages in (1, 3, 4):
                c2 = GemmConfig("fused", 1, cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, stages, mode=4)
                if c2 == cfg:
                    continue
                ms2 = time_config(runtime, x, layer, copies, c2, reference)
                if ms2 is not None:
                    results.append((ms2, c2))
        results.sort(key=lambda r: r[0])
        print(f"{len(results)} configs timed in {time.time() - start:.0f} s; best 12 "
              f"(us, x copy time, config):", flush=True)
        for ms, cfg in results[:12]:
            print(f"  {ms * 1e3:6.1f} us  {base / (ms * 1e3):5.2f}  bn{cfg.block_n} bk{cfg.block_k} s{cfg.split_k} "
                  f"w{cfg.num_warps} st{cfg.num_stages}", flush=True)
        del copies, layer
        torch.cuda.empty_cache()


def time_config(runtime, x, layer, copies, cfg, reference):
    try:
        y = runtime.run(x, layer, cfg).float()
        err = float((y - reference).norm() / reference.norm())
        if not math.isfinite(err) or err > 1e-2:
            print(f"  wrong result {err:.2g}: {cfg}", flush=True)
            return None
        return graph_time_ms(lambda i: runtime.run(x, copies[i % len(copies)], cfg),
                             calls=max(10, 2 * len(copies)), reps=5)
    except Exception as exc:  # resources the compiler rejects
        print(f"  skipped {cfg.block_n}/{cfg.block_k}/w{cfg.num_warps}/st{cfg.num_stages}: "
              f"{type(exc).__name__}", flush=True)
        return None


if __name__ == "__main__":
    main()
