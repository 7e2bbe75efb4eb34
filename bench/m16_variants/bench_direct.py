"""GPU prototype: mode 7 as shipped vs the direct-register Gluon kernel at 16 and 4 rows."""
import itertools, math, sys, time
sys.path.insert(0, ".")
sys.path.insert(0, "bench/m16_variants")
import torch
from backends.gptq import format as fmt
from backends.gptq.kernel_runtime import KernelRuntime, SplitScratch, graph_time_ms, cold_copies, launch_fused
from bench.kernels import random_layer, rel_err
import direct as D
import direct_unroll2 as D2

import os
MS = [int(m) for m in os.environ.get('MS', '16,4').split(',')]
SMS = torch.cuda.get_device_properties(0).multi_processor_count
scratch = SplitScratch()


def launch(mod, x, layer, bk, bn, warps, split, out, contig=False):
    M, K = x.shape
    N = layer.N
    k_tiles = K // bk
    per = -(-k_tiles // split)
    split = -(-k_tiles // per)
    n_tiles = N // bn
    if split > 1:
        ws, tk = scratch.get(split * M * N, n_tiles, x.device)
    else:
        ws = tk = out
    mod.gptq_mma4_direct_kernel[(n_tiles, split)](
        x, layer.qweight, layer.scales, layer.zeros, out, out, ws, tk, M, N, K, x.stride(0), out.stride(0),
        layer.group_size, per, split, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split > 1, HAS_BIAS=False,
        W_LAYOUT=(mod.word_layout_contig if contig else mod.word_layout)(bk, bn, warps), X_LAYOUT=mod.x_layout(bk, warps),
        num_warps=warps, **({'CONTIG': True} if contig else {}))
    return out


def main():
    shapes = [(4096, 11008), (8192, 28672), (11008, 4096), (4096, 4096)]
    if len(sys.argv) > 1:
        shapes = [tuple(int(v) for v in s.split("x")) for s in sys.argv[1].split(",")]
    for K, N in shapes:
        packed, layer = random_layer(K, N, 4, 128, False, 1)
        w64 = fmt.dequantize(*packed, 4, "gptq", dtype=torch.float64)
        copies = cold_copies(layer, "cuda")
        nc = len(copies)
        dense = [w64.half()] + [torch.randn(K, N, device="cuda", dtype=torch.float16) * 0.01 for _ in range(3)]
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            f_ms = graph_time_ms(lambda i: x @ dense[i % 4], calls=16)
            rt = KernelRuntime(tune=True, cache_file=None)
            cfg = rt.config_for(x, layer)
            p_ms = graph_time_ms(lambda i: rt.run(x, copies[i % nc], cfg), calls=max(nc, 8))
            print(f"{K}x{N} M={M}: fp16 {f_ms*1e3:.1f} us; shipped pick m{cfg.mode} bn{cfg.block_n} bk{cfg.block_k} "
                  f"s{cfg.split_k} w{cfg.num_warps}: {p_ms*1e3:.1f} us ({f_ms/p_ms:.2f}x)", flush=True)
            ref = x.double() @ w64
            results = []
            for (modname, mod), bk, bn, warps in itertools.product((("d1", D), ("dc", D)), (64, 128), (32, 64, 128, 256), (1, 2, 4, 8)):
                contig = modname == "dc"
                if bn // (8 * warps) < 1 or N % bn or K % bk or (contig and bn // (8 * warps) < 2):
                    continue
                if bn // (8 * warps) > 4 or bn // (8 * warps) < 2 and warps > 1:
                    continue
                splits = sorted({max(1, min(K // bk, f * SMS // (N // bn))) for f in (1, 2, 4, 8, 16)})
                for split in splits:
                    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
                    try:
                        y = launch(mod, x, layer, bk, bn, warps, split, out, contig)
                        torch.cuda.synchronize()
                    except Exception as e:
                        print(f"   {modname} bk{bk} bn{bn} w{warps} s{split}: {type(e).__name__} {str(e)[:200]}")
                        continue
                    err = rel_err(y, ref)
                    if not err < 2e-3:
                        print(f"   {modname} bk{bk} bn{bn} w{warps} s{split}: WRONG rel err {err:.2e}")
                        continue
                    ms = graph_time_ms(lambda i: launch(mod, x, copies[i % nc], bk, bn, warps, split,
                                                        torch.empty(M, N, device="cuda", dtype=torch.float16), contig),
                                       calls=max(nc, 8))
                    results.append((ms, modname, bk, bn, warps, split, err))
            results.sort()
            for ms, modname, bk, bn, warps, split, err in results[:6]:
                print(f"   {modname} bk{bk} bn{bn} w{warps} s{split}: {ms*1e3:.1f} us ({f_ms/ms:.2f}x fp16, "
                      f"{p_ms/ms:.2f}x shipped) err {err:.1e}", flush=True)
        del copies, dense, w64
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
