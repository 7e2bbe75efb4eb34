"""GPU prototype: x shared by a program's warps through a cp.async ring, against the shipped mode 7."""
import sys
sys.path.insert(0, "."); sys.path.insert(0, "bench/m16_variants")
import torch
from backends.gptq import format as fmt
from backends.gptq import gluon_mma as gm
from backends.gptq.kernel_runtime import SplitScratch, graph_time_ms, cold_copies
from bench.kernels import random_layer, rel_err
import xs

SMS = torch.cuda.get_device_properties(0).multi_processor_count
scratch = SplitScratch()


def launch(kernel, x, layer, bk, bn, warps, split, out, **extra):
    M, K = x.shape
    N = layer.N
    per = -(-(K // bk) // split)
    split = -(-(K // bk) // per)
    ws, tk = scratch.get(split * M * N, N // bn, x.device) if split > 1 else (out, out)
    kernel[(N // bn, split)](
        x, layer.qweight, layer.scales, layer.zeros, out, out, ws, tk, M, N, K, x.stride(0), out.stride(0),
        layer.group_size, per, split, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split > 1, HAS_BIAS=False,
        W_LAYOUT=gm.word_layout(bk, bn, warps), X_LAYOUT=gm.x_layout(bk, warps), num_warps=warps, **extra)
    return out


for K, N in [(8192, 28672), (4096, 11008)]:
    packed, layer = random_layer(K, N, 4, 128, False, 1)
    w64 = fmt.dequantize(*packed, 4, "gptq", dtype=torch.float64)
    copies = cold_copies(layer, "cuda")
    nc = len(copies)
    x = torch.randn(16, K, device="cuda", dtype=torch.float16)
    ref = x.double() @ w64
    for name, kernel, extra in (("shipped", gm.gptq_mma4_kernel, {}), ("xs3", xs.xs_kernel, {"STAGES": 3}),
                                ("xs4", xs.xs_kernel, {"STAGES": 4})):
        res = []
        for bk, bn, warps in ((128, 64, 1), (128, 128, 2), (128, 256, 4)):
            for f in (4, 8):
                split = max(1, min(K // bk, f * SMS // (N // bn)))
                out = torch.full((16, N), float("nan"), device="cuda", dtype=torch.float16)
                try:
                    err = rel_err(launch(kernel, x, layer, bk, bn, warps, split, out, **extra), ref)
                except Exception as e:
                    print(f"   {name} n{bn} w{warps}: {type(e).__name__} {str(e)[:200]}", flush=True)
                    break
                if not err < 2e-3:
                    print(f"   {name} n{bn} w{warps} s{split}: WRONG {err:.2e}", flush=True)
                    continue
                ms = graph_time_ms(lambda i: launch(kernel, x, copies[i % nc], bk, bn, warps, split,
                                                    torch.empty(16, N, device="cuda", dtype=torch.float16), **extra),
                                   calls=max(nc, 8))
                res.append(f"n{bn}w{warps}s{split} {ms*1e3:.1f}")
        print(f"{K}x{N} {name:8s} " + "  ".join(res), flush=True)
    del copies, w64
    torch.cuda.empty_cache()
