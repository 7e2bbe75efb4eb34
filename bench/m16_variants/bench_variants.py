"""GPU prototype: production mode 7 against variants (L2 prefetch, cp.async word ring, maxnreg) at 16 rows."""
import itertools, os, sys
sys.path.insert(0, "."); sys.path.insert(0, "bench/m16_variants")
import torch
from backends.gptq import format as fmt
from backends.gptq import gluon_mma as gm
from backends.gptq.kernel_runtime import SplitScratch, graph_time_ms, cold_copies
from bench.kernels import random_layer, rel_err
import pf, ring

SMS = torch.cuda.get_device_properties(0).multi_processor_count
scratch = SplitScratch()
VARIANTS = [("prod", gm.gptq_mma4_kernel, {}, {}), ("pf2", pf.pf_kernel, {"PF": 2}, {}), ("pf3", pf.pf_kernel, {"PF": 3}, {}),
            ("pf4", pf.pf_kernel, {"PF": 4}, {}), ("ring3", ring.ring_kernel, {"STAGES": 3}, {}),
            ("ring4", ring.ring_kernel, {"STAGES": 4}, {}), ("prod-r96", gm.gptq_mma4_kernel, {}, {"maxnreg": 96})]


def launch(kernel, extra, opts, x, layer, bk, bn, warps, split, out):
    M, K = x.shape
    N = layer.N
    k_tiles = K // bk
    per = -(-k_tiles // split)
    split = -(-k_tiles // per)
    n_tiles = N // bn
    ws, tk = scratch.get(split * M * N, n_tiles, x.device) if split > 1 else (out, out)
    kernel[(n_tiles, split)](
        x, layer.qweight, layer.scales, layer.zeros, out, out, ws, tk, M, N, K, x.stride(0), out.stride(0),
        layer.group_size, per, split, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split > 1, HAS_BIAS=False,
        W_LAYOUT=gm.word_layout(bk, bn, warps), X_LAYOUT=gm.x_layout(bk, warps), num_warps=warps, **extra, **opts)
    return out


for K, N in [(4096, 11008), (8192, 28672)]:
    packed, layer = random_layer(K, N, 4, 128, False, 1)
    w64 = fmt.dequantize(*packed, 4, "gptq", dtype=torch.float64)
    copies = cold_copies(layer, "cuda")
    nc = len(copies)
    dense = [w64.half()] + [torch.randn(K, N, device="cuda", dtype=torch.float16) * 0.01 for _ in range(3)]
    M = 16
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    ref = x.double() @ w64
    for rnd in (1, 2):
        f_ms = graph_time_ms(lambda i: x @ dense[i % 4], calls=16)
        print(f"{K}x{N} M={M} round {rnd}: fp16 {f_ms*1e3:.1f} us", flush=True)
        for name, kernel, extra, opts in VARIANTS:
            best = []
            for bk, bn, warps in ((128, 64, 2), (128, 32, 1), (128, 128, 4)):
                for f in (4, 8, 16):
                    split = max(1, min(K // bk, f * SMS // (N // bn)))
                    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
                    try:
                        y = launch(kernel, extra, opts, x, layer, bk, bn, warps, split, out)
                        torch.cuda.synchronize()
                    except Exception as e:
                        print(f"   {name} bk{bk} bn{bn} w{warps} s{split}: {type(e).__name__} {str(e)[:300]}", flush=True)
                        continue
                    err = rel_err(y, ref)
                    if not err < 2e-3:
                        print(f"   {name} bk{bk} bn{bn} w{warps} s{split}: WRONG {err:.2e}", flush=True)
                        continue
                    ms = graph_time_ms(lambda i: launch(kernel, extra, opts, x, copies[i % nc], bk, bn, warps, split,
                                                        torch.empty(M, N, device="cuda", dtype=torch.float16)),
                                       calls=max(nc, 8))
                    best.append((ms, f"bk{bk} bn{bn} w{warps} s{split}"))
            best.sort()
            print(f"   {name:9s} " + "  ".join(f"{ms*1e3:.1f}us {c}" for ms, c in best[:3]), flush=True)
    del copies, dense, w64
    torch.cuda.empty_cache()
