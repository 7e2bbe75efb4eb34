"""Sweep of the half2 matrix-vector kernel's launch parameters on the decoding shapes of a 7B model, to
see whether the tuner's candidate list misses faster configs (a diagnostic for BENCH.md section 1).

    python -m bench.gemv_sweep [--shapes 4096x12288,4096x4096,4096x22016,11008x4096] [--budget-s 300]
    python -m bench.gemv_sweep --mode 5 --m 16 --shapes 4096x11008,8192x28672   # the tensor-core kernel
    python -m bench.gemv_sweep --mode 7 --m 16 --shapes 4096x11008               # its Gluon form
    python -m bench.gemv_sweep --bits 3 --shapes 8192x28672                     # 3-bit g128 (2-bit: g64)
    python -m bench.gemv_sweep --mode 8 --m 16 --bits 2 --shapes 8192x28672      # mode 8 in every pipeline form
    python -m bench.gemv_sweep --mode 8 --m 16 --registers 0,200,168              # ... at each register cap
    python -m bench.gemv_sweep --mode 8 --m 1 --bits 8 --shapes 8192x28672       # 8-bit g128 layers
    python -m bench.gemv_sweep --mode 7 --m 16 --registers 0,232,200             # mode 7 (or 9) at each cap

For each shape (4-bit g128 unless --bits says otherwise, M = 1, fp16): the tuner's pick among its
candidates, then a grid of block_n x block_k x warps x split (and num_stages around the best), each checked against
dequantize + cuBLAS and timed like the tuner times (CUDA graph replays over cold weight copies). The
baseline is a device-to-device copy of the same bytes timed the same way, in the same run.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends.gptq.kernel_runtime import (HALF2_BITS, GemmConfig, KernelRuntime, _split_for,  # noqa: E402
                                          sm_count, valid_block_ks)
from backends.gptq.timing import cold_copies, graph_time_ms  # noqa: E402
from backends.gptq import gluon_gemv, gluon_mma, gluon_wgmma  # noqa: E402
from bench.kernels import random_layer  # noqa: E402

DECODE_SHAPES = "4096x12288,4096x4096,4096x22016,11008x4096"


def copy_us(nbytes: int) -> float:
    """Time of a device copy of nbytes, rotating over buffers that defeat L2 (as the kernels are timed)."""
    n = max(1, nbytes // 2)
    copies = max(2, math.ceil(2 * 50 * 2**20 / nbytes) + 1)
    src = [torch.empty(n, dtype=torch.float16, device="cuda") for _ in range(copies)]
    dst = torch.empty(n, dtype=torch.float16, device="cuda")
    return graph_time_ms(lambda i: dst.copy_(src[i % copies]), calls=2 * copies, reps=5) * 1e3


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def splits_for(layer, block_n, block_k, sms) -> list[int]:
    """The split counts the tuner's heuristic gives for 0.5 to 32 programs per SM."""
    return sorted({_split_for(layer, block_n, block_k, round(f * sms)) for f in (0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)})


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=DECODE_SHAPES)
    ap.add_argument("--budget-s", type=float, default=100.0, help="stop the grid of a shape after this long")
    ap.add_argument("--mode", type=int, default=4, choices=(4, 5, 7, 8, 9),
                    help="4: half2 GEMV; 5: half2 + tensor cores; 7: the same in Gluon; 8: weights as the MMA's "
                         "A operand (the tuner's tiles and splits, each in every pipeline form); 9: mode 8 on "
                         "wgmma (sm_90; the tuner's candidates, at each --registers cap)")
    ap.add_argument("--m", type=int, default=1, help="rows of x (mode 4: 1)")
    ap.add_argument("--block-n", type=int_list, default=None,
                    help="mode 4: tile widths to sweep (default 512,256,1024,128,64)")
    ap.add_argument("--block-k", type=int_list, default=None, help="mode 4: tile lengths to sweep (default 64,128,32)")
    ap.add_argument("--warps", type=int_list, default=None, help="mode 4: warps per program to sweep (default 4,2,8)")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8),
                    help="2/3/4 for mode 4, 2/3/4/8 for mode 8, 2/4 for mode 9, 4 for modes 5 and 7; groups of 128 "
                         "(64 at 2 bits, as EfficientQAT's w2g64)")
    ap.add_argument("--registers", default=[0], type=register_caps,
                    help="register caps per thread to time each config at (ptxas maxnreg; 0: the compiler's "
                         "choice), comma-separated; modes other than 8 then time the tuner's own candidates of "
                         "the mode at each cap instead of a grid")
    args = ap.parse_args(argv)
    if args.mode != 4 and (args.block_n or args.block_k or args.warps):
        ap.error("--block-n, --block-k and --warps set mode 4's grid; the other modes sweep the tuner's tiles")
    caps = args.registers
    if not torch.cuda.is_available():
        sys.exit("bench.gemv_sweep needs a CUDA GPU")
    sms = sm_count("cuda")
    print(torch.cuda.get_device_name(), "SMs", sms, flush=True)
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        widths = {4: HALF2_BITS, 5: (4,), 7: (4,), 8: gluon_gemv.BITS, 9: gluon_wgmma.BITS}[args.mode]
        if args.bits not in widths:
            sys.exit(f"--bits {args.bits}: mode {args.mode} is swept at {', '.join(map(str, widths))} bits")
        group = 64 if args.bits == 2 else 128
        _, layer = random_layer(K, N, args.bits, group, False, seed=K + N)
        runtime = KernelRuntime(tune=True)
        x = torch.randn(args.m, K, device="cuda", dtype=torch.float16)
        block_m = 1 if args.mode == 4 else max(16, runtime.m_bucket(args.m))
        main_stages, around = (2, (1, 3, 4)) if args.mode == 4 else (3, (2, 4, 5))
        copies = cold_copies(layer, "cuda")
        base = copy_us(layer.nbytes())
        # read-only bound: a copy reads and writes, the kernel only reads, so report both
        print(f"\n== {K}x{N} {args.bits}-bit g{group} M={args.m} mode {args.mode}: {layer.nbytes() / 1e6:.1f} MB, copy of the same bytes {base:.1f} us "
              f"(read+write {2 * layer.nbytes() / base / 1e3:.0f} GB/s)", flush=True)
        cands = runtime.candidates(args.m, layer, x.device, x.dtype)
        tuned, tuned_ms = runtime.fastest(x, layer, cands)
        print(f"tuner pick: {tuned_ms * 1e3:.1f} us  {tuned}", flush=True)
        reference = runtime.run(x, layer, GemmConfig(path="dequant")).float()
        results = []
        start = time.time()
        if args.mode in (8, 9) or caps != [0]:
            results = (sweep_mode8(runtime, x, layer, copies, reference, sms, caps) if args.mode == 8 else
                       sweep_candidates(runtime, x, layer, copies, reference, args.mode, caps))
            print_best(results, base, time.time() - start)
            for cap in caps if len(caps) > 1 else []:  # with several caps: the best config at each, side by side
                ms, cfg = min((r for r in results if r[1].max_registers == cap), key=lambda r: r[0], default=(None, None))
                if ms is not None:
                    print(f"  best at register cap {cap or 'none'}: {ms * 1e3:.1f} us  {cfg}", flush=True)
            del copies, layer
            torch.cuda.empty_cache()
            continue
        if args.mode == 4:
            # wide tiles first: the tuner's picks on an H200 are 512 columns of 64 rows (2026-12-03)
            grid = itertools.product(args.block_n or (512, 256, 1024, 128, 64),
                                     valid_block_ks(layer, args.block_k or (64, 128, 32)), args.warps or (4, 2, 8))
        elif args.mode == 7:  # 16-128 columns per warp (each warp reads all of x for its own columns)
            grid = [(bn, bk, w) for bn, bk, w in itertools.product((64, 128, 32, 256), valid_block_ks(layer, (128, 64)),
                                                                    (2, 4, 1, 8)) if 16 <= bn // w <= 128]
        else:  # wide tiles first: at M = 16 each column tile reads all of x once more
            grid = itertools.product((128, 64, 256), valid_block_ks(layer, (64, 128, 256)), (4, 8))
        for bn, bk, warps in grid:
            if time.time() - start > args.budget_s:
                print("(grid budget reached)", flush=True)
                break
            if args.mode == 7 and not gluon_mma.valid(bk, bn, warps):
                continue
            splits = splits_for(layer, bn, bk, sms) if args.mode == 4 else sorted(
                {_split_for(layer, bn, bk, f * sms) for f in ((1, 2, 4, 8, 16) if args.mode == 7 else (1, 2, 4, 8))})
            for split in splits:
                cfg = GemmConfig("fused", block_m, bn, bk, split, warps, main_stages, mode=args.mode)
                ms = time_config(runtime, x, layer, copies, cfg, reference)
                if ms is not None:
                    results.append((ms, cfg))
        results.sort(key=lambda r: r[0])
        for ms, cfg in results[:3] if args.mode != 7 else []:  # num_stages around the three best (mode 7 has none)
            for stages in around:
                c2 = GemmConfig("fused", block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, stages,
                                mode=args.mode)
                if c2 == cfg:
                    continue
                ms2 = time_config(runtime, x, layer, copies, c2, reference)
                if ms2 is not None:
                    results.append((ms2, c2))
        print_best(sorted(results, key=lambda r: r[0]), base, time.time() - start)
        del copies, layer
        torch.cuda.empty_cache()


def register_caps(text: str) -> list[int]:
    """--registers: comma-separated caps per thread, each 0 (none) or one ptxas takes (24-255)."""
    try:
        caps = [int(r) for r in text.split(",")]
    except ValueError:
        caps = []
    if not caps or any(r and not 24 <= r <= 255 for r in caps):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated caps, each 0 (none) or 24-255 registers")
    return caps


def sweep_mode8(runtime, x, layer, copies, reference, sms, caps=(0,)) -> list:
    """Mode 8 (gluon_gemv.py): every tile and split the tuner offers at this row count, each in every
    pipeline form (gluon_gemv.PIPELINES, a config's num_stages), whether offered there or not, at each
    register cap in `caps`."""
    from backends.gptq.kernel_runtime import _gluon_gemv_candidates
    offered = _gluon_gemv_candidates(layer, runtime.m_bucket(x.shape[0]), valid_block_ks(layer), sms)
    tiles = {replace(c, num_stages=1, max_registers=0) for c in offered}
    grid = [replace(c, num_stages=form, max_registers=cap) for c in sorted(tiles, key=str)
            for form in gluon_gemv.PIPELINES for cap in caps]
    return time_grid(runtime, x, layer, copies, reference, grid)


def sweep_candidates(runtime, x, layer, copies, reference, mode, caps) -> list:
    """The tuner's own candidates of one mode (also where it offers the mode only when asked for by name, e.g.
    mode 9 at 4 bits), each at every register cap in `caps`."""
    asked = KernelRuntime(tune=False, modes=(mode,))
    grid = [replace(c, max_registers=cap) for c in asked.candidates(x.shape[0], layer, x.device, x.dtype)
            if c.mode == mode for cap in caps]
    return time_grid(runtime, x, layer, copies, reference, grid)


def time_grid(runtime, x, layer, copies, reference, grid) -> list:
    """(ms, config) of every config of `grid` that compiles and is correct, fastest first; the grid is
    compiled side by side first (the tuner's precompile)."""
    runtime.precompile(x, layer, grid)
    timed = ((time_config(runtime, x, layer, copies, cfg, reference), cfg) for cfg in grid)
    return sorted(((ms, cfg) for ms, cfg in timed if ms is not None), key=lambda r: r[0])


def print_best(results, base, seconds, count=12):
    """The fastest `count` of (ms, config) results, with their speed against a copy of the same bytes."""
    print(f"{len(results)} configs timed in {seconds:.0f} s; best {count} (us, x copy time, config):", flush=True)
    for ms, cfg in results[:count]:
        print(f"  {ms * 1e3:6.1f} us  {base / (ms * 1e3):5.2f}  bn{cfg.block_n} bk{cfg.block_k} s{cfg.split_k} "
              f"w{cfg.num_warps} st{cfg.num_stages}" + (f" r{cfg.max_registers}" if cfg.max_registers else ""), flush=True)


def cold_ms(runtime, x, copies, cfg) -> float:
    """GPU ms of one call of `cfg`, from graph replays rotating over the layer's cold copies (as the tuner times)."""
    return graph_time_ms(lambda i: runtime.run(x, copies[i % len(copies)], cfg), calls=max(10, 2 * len(copies)), reps=5)


def time_config(runtime, x, layer, copies, cfg, reference):
    try:
        y = runtime.run(x, layer, cfg).float()
        err = float((y - reference).norm() / reference.norm())
        if not math.isfinite(err) or err > 1e-2:
            print(f"  wrong result {err:.2g}: {cfg}", flush=True)
            return None
        return cold_ms(runtime, x, copies, cfg)
    except Exception as exc:  # resources the compiler rejects
        print(f"  skipped {cfg.block_n}/{cfg.block_k}/w{cfg.num_warps}/st{cfg.num_stages}: "
              f"{type(exc).__name__}", flush=True)
        return None


if __name__ == "__main__":
    main()
