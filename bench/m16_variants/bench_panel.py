"""GPU prototype: mode 7 on the natural word layout against a panel layout (each BLOCK_N-column panel's
words contiguous), at 16 rows; plus the sweep-chosen configs."""
import os, sys
sys.path.insert(0, "."); sys.path.insert(0, "bench/m16_variants")
import torch
from dataclasses import replace
from backends.gptq import format as fmt
from backends.gptq import gluon_mma as gm
from backends.gptq.kernel_runtime import SplitScratch, graph_time_ms, cold_copies
from bench.kernels import random_layer, rel_err
import panel

SMS = torch.cuda.get_device_properties(0).multi_processor_count
scratch = SplitScratch()


def launch(kernel, x, layer, bk, bn, warps, split, out):
    M, K = x.shape
    N = layer.N
    per = -(-(K // bk) // split)
    split = -(-(K // bk) // per)
    ws, tk = scratch.get(split * M * N, N // bn, x.device) if split > 1 else (out, out)
    kernel[(N // bn, split)](
        x, layer.qweight, layer.scales, layer.zeros, out, out, ws, tk, M, N, K, x.stride(0), out.stride(0),
        layer.group_size, per, split, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split > 1, HAS_BIAS=False,
        W_LAYOUT=gm.word_layout(bk, bn, warps), X_LAYOUT=gm.x_layout(bk, warps), num_warps=warps)
    return out


def paneled(layer, bn):
    qw = layer.qweight
    kw, n = qw.shape
    return replace(layer, qweight=qw.view(kw, n // bn, bn).permute(1, 0, 2).contiguous())


for K, N in [(8192, 28672), (4096, 11008)]:
    packed, layer = random_layer(K, N, 4, 128, False, 1)
    w64 = fmt.dequantize(*packed, 4, "gptq", dtype=torch.float64)
    copies = cold_copies(layer, "cuda")
    nc = len(copies)
    dense = [w64.half()] + [torch.randn(K, N, device="cuda", dtype=torch.float16) * 0.01 for _ in range(3)]
    x = torch.randn(16, K, device="cuda", dtype=torch.float16)
    ref = x.double() @ w64
    for rnd in (1, 2):
        f_ms = graph_time_ms(lambda i: x @ dense[i % 4], calls=16)
        print(f"{K}x{N} M=16 round {rnd}: fp16 {f_ms*1e3:.1f} us", flush=True)
        for bk, bn, warps in ((128, 64, 1), (128, 32, 1), (128, 128, 2)):
            pcopies = [paneled(c, bn) for c in copies]
            for name, kernel, lays in (("natural", gm.gptq_mma4_kernel, copies), ("panel", panel.panel_kernel, pcopies)):
                res = []
                for f in (4, 8, 16):
                    split = max(1, min(K // bk, f * SMS // (N // bn)))
                    out = torch.full((16, N), float("nan"), device="cuda", dtype=torch.float16)
                    y = launch(kernel, x, lays[0], bk, bn, warps, split, out)
                    err = rel_err(y, ref)
                    if not err < 2e-3:
                        print(f"   {name} bk{bk} bn{bn} w{warps} s{split}: WRONG {err:.2e}", flush=True)
                        continue
                    ms = graph_time_ms(lambda i: launch(kernel, x, lays[i % nc], bk, bn, warps, split,
                                                        torch.empty(16, N, device="cuda", dtype=torch.float16)),
                                       calls=max(nc, 8))
                    res.append(f"s{split} {ms*1e3:.1f}")
                print(f"   {name:8s} bk{bk} bn{bn} w{warps}: " + "  ".join(res), flush=True)
            del pcopies
    del copies, dense, w64
    torch.cuda.empty_cache()
