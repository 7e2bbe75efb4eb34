"""Every config the runtime offers on a CUDA GPU, compiled for it (the PTX and Gluon forms the interpreter cannot
run), on the small layer shapes a tiny model has (K and N of 32-160: one or two tiles, short last groups), at
1, 12, 16 and 80 rows (80: the dequantize + cuBLAS path), against a float64 reference. The tuner drops a wrong
config, but a load with autotune off runs each shape's first one unchecked: so every offered config must be
right. (Mode 5 on two-block tiles was not, 2026-12-05: see kernel_runtime.MODE5_MIN_BLOCKS.)"""
from __future__ import annotations

import pytest
import torch

from tests.backends.gptq.support import assert_fused_matches_float64, precompile_fused, random_packed_layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernel forms)")

SHAPES = ((64, 64), (64, 96), (96, 64), (64, 32), (160, 64))  # K x N: a tiny LLaMA's q/o, up/gate, down, k/v
ROWS = (1, 12, 16, 80)


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
        packed, ref_w = random_packed_layer(bits, gs, K, N, seed, act)
        layer = make_kernel_layer(*packed, bits, gs, "gptq_v2", "cuda")
        assert layer is not None
        ref = ref_w.cuda()
        gen = torch.Generator(device="cuda").manual_seed(seed + 1)
        bias = torch.randn(N, generator=gen, device="cuda").half()
        offered = {M: runtime.candidates(M, layer, "cuda", torch.float16) for M in ROWS}
        fused = list(dict.fromkeys(c for configs in offered.values() for c in configs if c.path == "fused"))
        precompile_fused(layer, fused, lambda cfg: [M for M in ROWS if cfg in offered[M]], bias, runtime.scratch)
        for M, configs in offered.items():
            for index, cfg in enumerate(configs):
                where = f"{K}x{N} M={M} #{index} {cfg}"
                try:
                    if cfg.path == "fused":  # with and without bias, into a NaN-poisoned output
                        assert_fused_matches_float64(layer, ref, cfg, (M,), bias, runtime.scratch, gen, tol=1e-2)
                    else:  # the dequantize + cuBLAS path
                        x = torch.randn(M, K, generator=gen, device="cuda").half()
                        want = x.double() @ ref
                        err = float((runtime.run(x, layer, cfg).double() - want).norm() / want.norm())
                        assert err < 1e-2, f"relative error {err:.2e}"
                except AssertionError as exc:
                    failures.append(f"{where}: {str(exc).splitlines()[0]}")
                except Exception as exc:
                    # the tuner skips a config the compiler rejects for its resources (shared memory): fine
                    # for the others, never for the untuned default (index 0), which must run
                    if index == 0 or type(exc).__name__ != "OutOfResources":
                        failures.append(f"{where}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                runs += 1
    assert runs
    assert not failures, f"{len(failures)} of {runs} configs wrong:\n" + "\n".join(failures)
