"""Where the time of the 16-row tensor-core kernel (mode 5) goes: a diagnostic for BENCH.md section 1.

    python -m bench.m16_probe [--shapes 4096x11008,8192x28672] [--m 16]

For each shape (4-bit g128, fp16) it times, over cold weight copies as the tuner does, the kernel as
shipped and three altered copies that each drop one cost, at the same launch parameters:
  - "x once": the activation tile is loaded once before the K loop instead of on every tile (wrong
    result; shows what the per-tile activation reads cost: each column tile re-reads all of x);
  - "no weights": the weight words are made from indices instead of loaded (wrong result; what is left
    is unpacking, tensor cores, x and the split reduction);
  - "no reduction": each split stores its partial tile to the output instead of the fp32 workspace and
    ticket (wrong result; shows what split-K's partial sums cost at 16 rows).
Baselines of the same run: torch fp16 `x @ W` and a plain read of the packed bytes (bench.kernels).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends.gptq.kernel_runtime import (GemmConfig, KernelRuntime, _split_for, _tiles_per_split,  # noqa: E402
                                          sm_count)
from backends.gptq.timing import cold_copies, graph_time_ms  # noqa: E402
from backends.gptq.triton_kernels import (_finish, _first_group, _next_group, _program_tiles,  # noqa: E402
                                          _weight_tile4_h)
from bench.kernels import random_layer, read_floor_ms  # noqa: E402


@triton.jit
def probe_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, ticket_ptr,
                 M, N, K, Kw, stride_xm, stride_om, group_size, tiles_per_split, nsplit,
                 KB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                 X_ONCE: tl.constexpr = False, NO_W: tl.constexpr = False, NO_REDUCTION: tl.constexpr = False):
    """gptq_gemm_h2_kernel without perm and bias, with the switches of the module docstring."""
    BLOCK_K: tl.constexpr = KB * 8
    pid_n, pid_k, offs_n, mask_n, t0, t_end = _program_tiles(N, K, tiles_per_split, BLOCK_N, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kb = t0 * KB + tl.arange(0, KB)
    offs_k = t0 * BLOCK_K + tl.arange(0, BLOCK_K)
    w_tile = qw_ptr + tl.arange(0, KB)[:, None] * N + offs_n[None, :]
    x_rows = x_ptr + offs_m * stride_xm
    x_first = tl.load(x_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
    g, left, per_group = _first_group(t0, K, group_size, BLOCK_K)
    for t in range(t0, t_end):
        if NO_W:
            w = (kb[:, None] * 0x3779B1 + offs_n[None, :]).to(tl.uint32)
        else:
            w = tl.load(w_tile + t * KB * N, mask=(kb[:, None] < Kw) & mask_n[None, :], other=0)
            w = w.to(tl.uint32, bitcast=True)
        mask_k = offs_k < K
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.uint32)
        g, left = _next_group(g, left, per_group)
        tile = _weight_tile4_h(w, z, True)
        if X_ONCE:
            x = x_first
        else:
            x = tl.load(x_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        kb += KB
        offs_k += BLOCK_K
        acc += tl.dot(x, tile, out_dtype=tl.float32) * s[None, :]
    if NO_REDUCTION:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(tl.float16),
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        _finish(acc, out_ptr, out_ptr, ws_ptr, ticket_ptr, offs_m, offs_n, mask_m, mask_n, M, N, stride_om,
                pid_n, pid_k, nsplit, SPLIT, False)


def launch_probe(x, layer, cfg, out, runtime, **switches):
    per = _tiles_per_split(layer, cfg)
    split = -(-(-(-layer.K // cfg.block_k)) // per)
    n_tiles = -(-layer.N // cfg.block_n)
    ws, tickets = runtime.scratch.get(split * x.shape[0] * layer.N if split > 1 else 1, n_tiles, x.device)
    probe_kernel[(n_tiles, split)](
        x, layer.qweight, layer.scales, layer.zeros, out, ws, tickets,
        x.shape[0], layer.N, layer.K, layer.Kw, x.stride(0), out.stride(0), layer.group_size,
        per, split, KB=cfg.block_k // 8, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        SPLIT=split > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **switches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x11008,8192x28672")
    ap.add_argument("--m", type=int, default=16)
    args = ap.parse_args(argv)
    sms = sm_count("cuda")
    print(torch.cuda.get_device_name(), "SMs", sms, flush=True)
    variants = {"shipped": {}, "x once": dict(X_ONCE=True), "no weights": dict(NO_W=True),
                "no reduction": dict(NO_REDUCTION=True)}
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        _, layer = random_layer(K, N, 4, 128, False, seed=K + N)
        runtime = KernelRuntime(tune=True)
        x = torch.randn(args.m, K, device="cuda", dtype=torch.float16)
        copies = cold_copies(layer, "cuda")
        calls = max(10, 2 * len(copies))
        dense_copies = max(2, math.ceil(200e6 / (K * N * 2)))  # more than the L2 holds, as for the weights
        dense = [torch.randn(K, N, device="cuda", dtype=torch.float16) for _ in range(dense_copies)]
        fp16_us = graph_time_ms(lambda i: x @ dense[i % len(dense)], calls=max(calls, len(dense))) * 1e3
        floor_us = read_floor_ms(layer.nbytes()) * 1e3
        cands = [c for c in runtime.candidates(args.m, layer, x.device, x.dtype) if c.path == "fused" and c.mode == 5]
        tuned, tuned_ms = runtime.fastest(x, layer, cands)
        print(f"\n== {K}x{N} M={args.m}: fp16 {fp16_us:.1f} us, read floor {floor_us:.1f} us, tuner's mode 5 "
              f"{tuned_ms * 1e3:.1f} us (x{fp16_us / (tuned_ms * 1e3):.2f} fp16) bn{tuned.block_n} bk{tuned.block_k} "
              f"s{tuned.split_k} w{tuned.num_warps} st{tuned.num_stages}", flush=True)
        configs = [tuned]
        for bn, warps, per_sm, st in ((64, 4, 4, 3), (128, 4, 2, 4), (128, 8, 2, 4), (256, 8, 1, 4), (256, 8, 1, 6),
                                      (256, 4, 2, 4)):
            cfg = GemmConfig("fused", 16, bn, 128, _split_for(layer, bn, 128, per_sm * sms), warps, st, mode=5)
            if cfg not in configs:
                configs.append(cfg)
        out = torch.empty(args.m, N, device="cuda", dtype=torch.float16)
        print("| config | " + " | ".join(variants) + " | shipped x fp16 | shipped / floor |", flush=True)
        print("| --- " * (len(variants) + 3) + "|", flush=True)
        for cfg in configs:
            times = {}
            for name, sw in variants.items():
                try:
                    times[name] = graph_time_ms(lambda i: launch_probe(x, copies[i % len(copies)], cfg, out, runtime,
                                                                       **sw), calls=calls, reps=5) * 1e3
                except Exception as exc:  # resources the compiler rejects
                    print(f"  {name} skipped: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    times[name] = float("nan")
            label = f"bn{cfg.block_n} s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}"
            print(f"| {label} | " + " | ".join(f"{t:.1f}" for t in times.values())
                  + f" | {fp16_us / times['shipped']:.2f} | {times['shipped'] / floor_us:.2f} |", flush=True)
        del copies, layer, dense
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
