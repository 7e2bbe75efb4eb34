"""BENCH.md section 1: the GPTQ Triton kernels against torch fp16 `x @ W` (cuBLAS) and the device's copy
bandwidth, all measured in the same run.

    python -m bench.kernels [--shapes 4096x4096,...] [--cases 4g128,4g128a,3g128,2g64,8g128] [--m 1,16,2048]
                            [--out DIR] [--no-tune]

Every case is checked against a float64 reference of the dequantized weights before it is timed
(fresh random inputs, poisoned output). Weights rotate over several copies so the L2 cache does not
hold the matrix; times are taken from CUDA graph replays (as the decoder runs them), for both sides. Needs CUDA; imports nothing but torch, triton and backends.gptq.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends.gptq import format as fmt  # noqa: E402
from backends.gptq.kernel_runtime import (PDL_MODES, KernelRuntime, launch_dequant, launch_fused,  # noqa: E402
                                          pdl_supported)
from backends.gptq.timing import graph_time_ms  # noqa: E402
from backends.gptq.quant_linear import make_kernel_layer  # noqa: E402
from bench.provenance import tree_commit  # noqa: E402

SHAPES = "4096x4096,4096x11008,11008x4096,8192x28672,28672x8192"
CASES = {"4g128": (4, 128, False), "4g128a": (4, 128, True), "3g128": (3, 128, False),
         "2g64": (2, 64, False), "2g128": (2, 128, False), "8g128": (8, 128, False), "4g64": (4, 64, False),
         "4g32": (4, 32, False)}
L2_BYTES = 50 * 2**20


def shape_case(text: str, prog: str, taken=None) -> tuple[int, int, int, int, bool]:
    """'KxN:case' (a case of CASES, among `taken` when given) -> (K, N, bits, group, act-order); an unknown
    case stops the benchmark `prog` with the names it takes, before any GPU work."""
    shape, case = text.split(":")
    taken = list(CASES) if taken is None else taken
    if case not in taken:
        raise SystemExit(f"{prog}: unknown case {case!r} (one of {', '.join(taken)})")
    K, N = map(int, shape.split("x"))
    return (K, N, *CASES[case])


def median_ms(fn, rep_ms=100):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    n = 2**30
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a))
    del a, b
    return 2 * n * 2 / (ms * 1e-3)


def read_floor_ms(nbytes: int) -> float:
    """The fastest a kernel can read `nbytes` once (no arithmetic, contiguous chunks, 16-byte loads): the
    best of a few grid and tile sizes, timed like the kernels (graph replays over cold copies). The
    bandwidth a matrix-vector kernel can hope for at this size, launch and ramp-up included."""
    words = -(-nbytes // 4)
    copies = max(2, math.ceil(4 * L2_BYTES / nbytes))
    bufs = [torch.randint(0, 2**31 - 1, (words,), device="cuda", dtype=torch.int32) for _ in range(copies)]
    best = best_read_ms(bufs, per_sms=(2, 4, 8, 16), blocks=(1024, 2048, 4096), calls=max(copies, 8))
    del bufs
    return best


def best_read_ms(bufs: list, per_sms, blocks, calls: int, reps: int = 10) -> float:
    """ms per read of one of `bufs` (int32 words, equal sizes, on the GPU or in page-locked host memory)
    by the read-only kernel, the best of the grids `per_sms` programs per SM x `blocks` words per step."""
    words = bufs[0].numel()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best = float("inf")
    for per_sm in per_sms:
        for block in blocks:
            per = -(-words // (sms * per_sm))
            per = -(-per // block) * block
            out = torch.empty(-(-words // per), device="cuda", dtype=torch.int32)
            grid = (out.numel(),)
            ms = graph_time_ms(lambda i: _read_kernel[grid](bufs[i % len(bufs)], out, words, per, BLOCK=block,
                                                             num_warps=4), calls=calls, reps=reps)
            best = min(best, ms)
    return best


def _jit_read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(src, out, n, per, BLOCK: tl.constexpr):
        start = tl.program_id(0) * per
        end = tl.minimum(start + per, n)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            acc ^= tl.load(src + idx, mask=idx < end, other=0)
        tl.store(out + tl.program_id(0), tl.xor_sum(acc, 0))
    return read_kernel


_read_kernel = _jit_read_kernel()


def random_layer(K, N, bits, gs, act, seed):
    """A random packed layer on the GPU (codes, zeros, scales, g_idx) and its kernel form."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    G = fmt.num_groups(K, gs)
    codes = torch.randint(0, 2**bits, (K, N), generator=g, device="cuda", dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (G, N), generator=g, device="cuda", dtype=torch.int32)
    scales = (torch.rand(G, N, generator=g, device="cuda") * 0.02 + 0.002).half()
    g_idx = fmt.default_g_idx(K, gs).cuda()
    if act:
        g_idx = g_idx[torch.randperm(K, generator=g, device="cuda")]
    qw = fmt.pack_qweight(codes, bits)
    qz = fmt.pack_qzeros(zeros, bits, "gptq")
    del codes
    return (qw, qz, scales, g_idx), make_kernel_layer(qw, qz, scales, g_idx, bits, gs, "gptq", "cuda")


def fp16_copies(K, N, first=None) -> list:
    """Dense fp16 [K, N] matrices (`first`, then random ones) enough that a call rotating over them reads
    from device memory, not L2: the torch fp16 baseline timed as the kernels are."""
    count = max(2, math.ceil(4 * L2_BYTES / (K * N * 2)))
    rest = [torch.randn(K, N, device="cuda", dtype=torch.float16) * 0.01 for _ in range(count - (first is not None))]
    return ([first] if first is not None else []) + rest


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def per_mode_times(x, layer, runtime) -> dict:
    """Best time of each unpacking mode's candidates at this shape (a diagnostic: which mode wins, by how much)."""
    by_mode: dict[int, list] = {}
    for cfg in runtime.candidates(x.shape[0], layer, x.device, x.dtype):
        if cfg.path == "fused":
            by_mode.setdefault(cfg.mode, []).append(cfg)
    out = {}
    for mode, cfgs in by_mode.items():
        best, ms = runtime.fastest(x, layer, cfgs)  # timed as the tuner times: over cold weight copies
        out[mode] = (ms, best)
    return out


DEQUANT_TILES = [(bn, bk, w) for bn in (64, 128, 256) for bk in (32, 64, 128) for w in (4, 8)]


def dequant_split(x, layers, calls) -> dict:
    """Where the dequantize + cuBLAS path's time goes (long prompts): the dequantize kernel alone as shipped
    and at its best tile, and the matmul alone on the dequantized buffer (the fp16 baseline reads its
    weights the same way), all over the same cold weight copies."""
    layer = layers[0]
    w = torch.empty(layer.K, layer.N, device="cuda", dtype=x.dtype)
    copies = len(layers)
    shipped = graph_time_ms(lambda i: launch_dequant(layers[i % copies], w), calls=calls)
    tiles = {}
    for bn, bk, warps in DEQUANT_TILES:
        tiles[(bn, bk, warps)] = graph_time_ms(
            lambda i: launch_dequant(layers[i % copies], w, block_n=bn, block_k=bk, num_warps=warps), calls=calls)
    (bn, bk, warps), best = min(tiles.items(), key=lambda kv: kv[1])
    gemm = graph_time_ms(lambda i: x @ w, calls=calls)
    print(f"      dequantize {shipped * 1e3:.1f} us as shipped, {best * 1e3:.1f} us at its best tile "
          f"(bn{bn} bk{bk} w{warps}); matmul on the buffer {gemm * 1e3:.1f} us", flush=True)
    del w
    return {"dequant_ms": shipped, "dequant_best_ms": best, "dequant_best_tile": f"bn{bn} bk{bk} w{warps}",
            "gemm_ms": gemm}


def run_case(K, N, bits, gs, act, Ms, runtime, bw, seed, per_mode=False, pdl=False, floor=False):
    rows = []
    packed, layer = random_layer(K, N, bits, gs, act, seed)
    w64 = fmt.dequantize(*packed, bits, "gptq", dtype=torch.float64)
    del packed
    qbytes = layer.nbytes()
    copies = max(2, math.ceil(4 * L2_BYTES / qbytes))
    layers = [layer] + [random_layer(K, N, bits, gs, act, seed + 1000 * i)[1] for i in range(1, copies)]
    dense = fp16_copies(K, N, first=w64.half())
    fcopies = len(dense)
    for M in Ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        cfg = runtime.config_for(x, layer)
        if per_mode:
            for mode, (ms, best) in sorted(per_mode_times(x, layer, runtime).items()):
                print(f"    mode {mode}: {ms * 1e3:7.1f} us (cold copies){' gx' if best.gather_x else ''}"
                      f"{' sx' if best.stage_x else ''}  bn{best.block_n} bk{best.block_k} "
                      f"s{best.split_k} w{best.num_warps} st{best.num_stages}", flush=True)
        # correctness on fresh inputs, poisoned output
        xc = torch.randn(M, K, device="cuda", dtype=torch.float16)
        ref = xc.double() @ w64
        if cfg.path == "fused":
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
            y = launch_fused(xc, layer, cfg, out=out)
        else:
            y = runtime.run(xc, layer, cfg)
        err = rel_err(y, ref)
        nan = bool(torch.isnan(y).any())
        calls = max(copies, fcopies, 8)
        q_ms = graph_time_ms(lambda i: runtime.run(x, layers[i % copies], cfg), calls=calls)
        f_ms = graph_time_ms(lambda i: x @ dense[i % fcopies], calls=calls)
        moved = qbytes + M * K * 2 + M * N * 2
        extra = {}
        if pdl and cfg.path == "fused" and cfg.mode in PDL_MODES:
            # back to back as programmatic dependent launches: each call's weight reads start while the
            # previous call (or, act-order at 2-16 rows, its own gather) finishes (checked first on fresh
            # inputs, poisoned output)
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
            y = launch_fused(xc, layer, cfg, out=out, scratch=runtime.scratch, pdl=True)
            extra["pdl_rel_err"] = rel_err(y, ref)
            extra["pdl_ms"] = graph_time_ms(lambda i: launch_fused(x, layers[i % copies], cfg, scratch=runtime.scratch,
                                                                   pdl=True), calls=calls)
        if floor:
            extra["floor_ms"] = read_floor_ms(moved)
        if cfg.path == "dequant":
            extra.update(dequant_split(x, layers, calls))
        rows.append(dict(K=K, N=N, bits=bits, group=gs, act_order=act, M=M, ms=q_ms, fp16_ms=f_ms, qbytes=qbytes, **extra,
                         speedup=f_ms / q_ms, gbps=moved / (q_ms * 1e-3) / 1e9,
                         copy_frac=moved / (q_ms * 1e-3) / bw, fp16_gbps=(K * N * 2 + M * K * 2 + M * N * 2) / (f_ms * 1e-3) / 1e9,
                         rel_err=err, nan=nan, config=cfg.__dict__))
        r = rows[-1]
        print(f"{K:>6}x{N:<6} b{bits} g{gs:<4}{'a' if act else ' '} M={M:<5} {q_ms*1e3:9.1f}us  fp16 {f_ms*1e3:9.1f}us "
              f"x{r['speedup']:5.2f}  {r['gbps']:7.0f} GB/s {r['copy_frac']*100:5.1f}% copy  err {err:.1e}"
              f"{' NaN!' if nan else ''}  {cfg.path} m{cfg.mode}{' gx' if cfg.gather_x else ''}{' sx' if cfg.stage_x else ''} bn{cfg.block_n} bk{cfg.block_k} s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}",
              flush=True)
        if extra:
            print("      " + "  ".join(f"{k} {v * 1e3:.1f}us" if k.endswith("_ms") else
                                     f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in extra.items()), flush=True)
    del layers, dense, w64
    torch.cuda.empty_cache()
    return rows


def markdown(rows, bw, args, device) -> str:
    lines = [f"### Kernels - {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} - {device} - commit {tree_commit()}",
             "", f"Command: `python -m bench.kernels {' '.join(sys.argv[1:])}`. torch {torch.__version__}, "
             f"triton {__import__('triton').__version__}. Copy bandwidth (read+write) this run: {bw/1e9:.0f} GB/s. "
             "Times are medians over replays of a CUDA graph of calls rotating over weight copies (no launch overhead); speedup = fp16 time / gptq time; "
             "bandwidth counts packed weights + scales + zeros + perm + activations + output.", "",
             "| K x N | bits | group | act | M | gptq us | fp16 us | speedup | GB/s | % copy | rel err | config |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["config"]
        lines.append(f"| {r['K']}x{r['N']} | {r['bits']} | {r['group']} | {'yes' if r['act_order'] else 'no'} | {r['M']} | "
                     f"{r['ms']*1e3:.1f} | {r['fp16_ms']*1e3:.1f} | {r['speedup']:.2f} | {r['gbps']:.0f} | "
                     f"{r['copy_frac']*100:.0f} | {r['rel_err']:.1e} | {c['path']} m{c.get('mode', '-')}"
                     f"{' gx' if c.get('gather_x') else ''}{' sx' if c.get('stage_x') else ''} n{c['block_n']} "
                     f"k{c['block_k']} s{c['split_k']} w{c['num_warps']} |")
    split = [r for r in rows if "dequant_ms" in r]
    if split:
        lines += ["", "The dequantize + cuBLAS path (same run): the dequantize kernel alone (as shipped, and at the best "
                  "of its tiles), its bytes (packed read + fp16 written) over the copy bandwidth, and the matmul alone "
                  "on the dequantized buffer.", "",
                  "| K x N | bits | group | act | M | gptq us | dequantize us | best tile us (tile) | dequantize % copy "
                  "| matmul on buffer us | fp16 us | (dequantize + matmul) / fp16 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in split:
            moved = r["qbytes"] + r["K"] * r["N"] * 2
            lines.append(f"| {r['K']}x{r['N']} | {r['bits']} | {r['group']} | {'yes' if r['act_order'] else 'no'} | "
                         f"{r['M']} | {r['ms']*1e3:.1f} | {r['dequant_ms']*1e3:.1f} | {r['dequant_best_ms']*1e3:.1f} "
                         f"({r['dequant_best_tile']}) | {moved / (r['dequant_ms'] * 1e-3) / bw * 100:.0f} | "
                         f"{r['gemm_ms']*1e3:.1f} | {r['fp16_ms']*1e3:.1f} | "
                         f"{(r['dequant_ms'] + r['gemm_ms']) / r['fp16_ms']:.2f} |")
    extras = [r for r in rows if "pdl_ms" in r or "floor_ms" in r]
    if extras:
        lines += ["", "Launch overlap and the read floor (same run): PDL = the same config back to back as programmatic "
                  "dependent launches; floor = the fastest a plain read of the same bytes runs (best of a few grids).",
                  "", "| K x N | bits | group | act | M | gptq us | with PDL us | read floor us | gptq / floor | PDL / floor |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in extras:
            p, f = r.get("pdl_ms", float("nan")), r.get("floor_ms", float("nan"))
            lines.append(f"| {r['K']}x{r['N']} | {r['bits']} | {r['group']} | {'yes' if r['act_order'] else 'no'} | {r['M']} | "
                         f"{r['ms']*1e3:.1f} | {p*1e3:.1f} | {f*1e3:.1f} | {r['ms']/f:.2f} | {p/f:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--m", default="1,16,2048")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--modes", default="", help="only these fused-kernel modes, e.g. 4,3 (default: all)")
    ap.add_argument("--per-mode", action="store_true", help="also time the best config of every mode")
    ap.add_argument("--pdl", action="store_true",
                    help="also time the matrix-vector kernels (modes 4 and 8) as programmatic dependent launches")
    ap.add_argument("--floor", action="store_true", help="also time a plain read of the same bytes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.kernels needs a CUDA GPU")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{device}: copy bandwidth {bw/1e9:.0f} GB/s (read+write)", flush=True)
    modes = tuple(int(m) for m in args.modes.split(",")) if args.modes else None
    runtime = KernelRuntime(tune=not args.no_tune, modes=modes)
    Ms = [int(m) for m in args.m.split(",")]
    rows = []
    t0 = time.time()
    for i, shape in enumerate(args.shapes.split(",")):
        K, N = (int(v) for v in shape.split("x"))
        for j, case in enumerate(args.cases.split(",")):
            bits, gs, act = CASES[case]
            rows += run_case(K, N, bits, gs, act, Ms, runtime, bw, seed=100 * i + j, per_mode=args.per_mode,
                             pdl=args.pdl and pdl_supported("cuda"), floor=args.floor)
    print(f"total {time.time() - t0:.0f} s")
    bad = [r for r in rows if r["rel_err"] >= 1e-2 or r["nan"] or not r.get("pdl_rel_err", 0) < 1e-2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps({"device": device, "copy_bw": bw, "rows": rows}, indent=1))
    md = markdown(rows, bw, args, device)
    (out / "kernels.md").write_text(md)
    print(md)
    if bad:
        print(f"{len(bad)} cases FAILED the correctness check")
        sys.exit(1)


if __name__ == "__main__":
    main()
