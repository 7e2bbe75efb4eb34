"""One launch each of the direct kernel (given configs) and shipped mode 7 at 16 rows, for ncu."""
import sys
sys.path.insert(0, "."); sys.path.insert(0, "bench/m16_variants")
import torch
from backends.gptq.kernel_runtime import GemmConfig, launch_fused, SplitScratch
from bench.kernels import random_layer
import direct as D
import bench_direct as B  # noqa (reuses launch)

K, N = 8192, 28672
_, layer = random_layer(K, N, 4, 128, False, 1)
x = torch.randn(16, K, device="cuda", dtype=torch.float16)
out = torch.empty(16, N, device="cuda", dtype=torch.float16)
runs = [lambda: B.launch(D, x, layer, 128, 128, 4, 2, out),
        lambda: B.launch(D, x, layer, 128, 128, 4, 2, out, contig=True),
        lambda: launch_fused(x, layer, GemmConfig("fused", 16, 128, 128, 8, 4, 2, mode=7), out=out, scratch=B.scratch)]
for r in runs:
    r()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
for r in runs:
    r()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
