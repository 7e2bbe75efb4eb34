"""How long a new model's first load spends tuning its GPTQ kernels on a cold machine, with the
candidates compiled one by one against side by side (backends/gptq/parallel_compile.py), in one run.

    python -m bench.tune_time [--bits 4 --group 128] [--m 1,16] [--act-order] [--workers N]

Each side runs in its own child process with an empty Triton cache and no tuner cache (what a user's
first load meets), and tunes the four distinct layer shapes of a LLaMA-7B decoder layer (q/k/v fused,
o_proj, gate/up fused, down_proj) for each row count. Prints wall seconds per side, their ratio, and
whether both sides picked configs of the same speed (the picks themselves may differ by noise). Needs
CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES_7B = ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))  # K x N


def tune(bits: int, group: int, act: bool, rows: list[int], parallel: bool, workers: int | None) -> dict:
    """Tune every (shape, rows) key in this process; seconds spent and the configs picked."""
    import torch

    sys.path.insert(0, str(REPO))
    from backends.gptq import parallel_compile
    from backends.gptq.kernel_runtime import KernelRuntime
    from bench.kernels import random_layer

    workers = (workers or parallel_compile.default_workers()) if parallel else 1
    runtime = KernelRuntime(tune=True, cache_file=None, compile_workers=workers)
    layers = [random_layer(K, N, bits, group, act, seed=i)[1] for i, (K, N) in enumerate(SHAPES_7B)]
    torch.cuda.synchronize()
    picks, start = {}, time.perf_counter()
    for M in rows:
        for (K, N), layer in zip(SHAPES_7B, layers):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            t = time.perf_counter()
            cfg, ms = runtime.fastest(x, layer, runtime.candidates(M, layer, x.device, x.dtype))
            picks[f"m{M}-{K}x{N}"] = {"config": str(cfg), "us": ms * 1e3, "s": time.perf_counter() - t}
    return {"seconds": time.perf_counter() - start, "workers": workers, "picks": picks}


def child(args) -> dict:
    """The measurement in a fresh process with an empty Triton cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        cmd = [sys.executable, "-m", "bench.tune_time", "--child", "--bits", str(args.bits), "--group",
               str(args.group), "--m", args.m] + (["--act-order"] if args.act_order else []) + \
              (["--workers", str(args.workers)] if args.workers else []) + (["--serial"] if args.serial else [])
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"child failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["process_s"] = time.perf_counter() - t
        return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--workers", type=int, default=0, help="compile threads (default: one per CPU core, at most 16)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serial", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = [int(m) for m in args.m.split(",")]
    if args.child:
        print(json.dumps(tune(args.bits, args.group, args.act_order, rows, not args.serial, args.workers or None)))
        return 0
    import torch
    if not torch.cuda.is_available():
        sys.exit("bench.tune_time needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}: cold tuning of the 7B layer shapes, {args.bits}-bit g{args.group}"
          f"{' act-order' if args.act_order else ''}, rows {args.m}", flush=True)
    args.serial = True
    serial = child(args)
    print(f"one by one: {serial['seconds']:.1f} s tuning ({serial['process_s']:.1f} s process)", flush=True)
    args.serial = False
    parallel = child(args)
    print(f"side by side ({parallel['workers']} threads): {parallel['seconds']:.1f} s tuning "
          f"({parallel['process_s']:.1f} s process)", flush=True)
    print(f"speedup {serial['seconds'] / parallel['seconds']:.2f}x")
    print("| key | one by one: pick, us | side by side: pick, us | s (one by one / side by side) |")
    print("| --- | --- | --- | --- |")
    slower = 0
    for key, a in serial["picks"].items():
        b = parallel["picks"][key]
        slower += b["us"] > 1.05 * a["us"]
        print(f"| {key} | {a['config']}, {a['us']:.1f} | {b['config']}, {b['us']:.1f} | {a['s']:.1f} / {b['s']:.1f} |")
    print(f"{slower} of {len(serial['picks'])} side-by-side picks more than 5% slower than the one-by-one pick")
    return 0


if __name__ == "__main__":
    sys.exit(main())
