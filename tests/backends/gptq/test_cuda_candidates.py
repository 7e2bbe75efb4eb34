"""Every config the runtime offers on a CUDA GPU, compiled for it (the PTX and Gluon forms the interpreter cannot
run), on the small layer shapes a tiny model has (K and N of 32-160: one or two tiles, short last groups), at
1, 12, 16 and 80 rows (80: the dequantize + cuBLAS path), against a float64 reference. The tuner drops a wrong
config, but a load with autotune off runs each shape's first one unchecked: so every offered config must be
right. (Mode 5 on two-block tiles was not, 2026-12-05: see kernel_runtime.MODE5_MIN_BLOCKS.)"""
from __future__ import annotations

import pytest
import torch

from backends.gptq import format as fmt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernel forms)")

SHAPES = ((64, 64), (64, 96), (96, 64), (64, 32), (160, 64))  # K x N: a tiny LLaMA's q/o, up/gate, down, k/v


def _layer(bits, gs, act, K, N, seed):
    gen = torch.Generator().manual_seed(seed)
    G = fmt.num_groups(K, gs)
    codes = torch.randint(0, 2**bits, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (G, N), generator=gen, dtype=torch.int32)
    scales = (torch.rand(G, N, generator=gen) * 0.05 + 0.005).half()
    g_idx = fmt.default_g_idx(K, gs)
    if act:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    qw, qz = fmt.pack_qweight(codes, bits), fmt.pack_qzeros(zeros, bits, "gptq_v2")
    ref_w = fmt.dequantize(qw, qz, scales, g_idx, bits, "gptq_v2", dtype=torch.float64)
    return (qw, qz, scales, g_idx), ref_w


@pytest.mark.parametrize("act", [False, True], ids=["plain", "actorder"])
@pytest.mark.parametrize("gs", [32, 64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_offered_config_matches_float64_on_small_shapes(bits, gs, act):
    from backends.gptq import kernel_runtime as kr
    from backends.gptq.quant_linear import make_kernel_layer
    runtime = kr.KernelRuntime(tune=False)
    failures, runs = [], 0
    for K, N in SHAPES:
        seed = bits * 1000 + gs * 10 + K + N + act
        packed, ref_w = _layer(bits, gs, act, K, N, seed)
        layer = make_kernel_layer(*packed, bits, gs, "gptq_v2", "cuda")
        assert layer is not None
        gen = torch.Generator().manual_seed(seed + 1)
        for M in (1, 12, 16, 80):
            for index, cfg in enumerate(runtime.candidates(M, layer, "cuda", torch.float16)):
                x = torch.randn(M, K, generator=gen).half()
                ref = x.double() @ ref_w
                out = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")
                try:
                    y = runtime.run(x.cuda(), layer, cfg, out=out)
                except Exception as exc:
                    # the tuner skips a config the compiler rejects for its resources (shared memory): fine
                    # for the others, never for the untuned default (index 0), which must run
                    if index == 0 or type(exc).__name__ != "OutOfResources":
                        failures.append(f"{K}x{N} M={M} #{index} {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                runs += 1
                err = float((y.double().cpu() - ref).norm() / ref.norm())
                if not err < 1e-2:
                    failures.append(f"{K}x{N} M={M} #{index} {cfg}: relative error {err:.2e}")
    assert runs
    assert not failures, f"{len(failures)} of {runs} configs wrong:\n" + "\n".join(failures)
