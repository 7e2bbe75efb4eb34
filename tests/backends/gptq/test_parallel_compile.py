"""Compiling the tuner's candidates side by side (backends/gptq/parallel_compile.py).

On CPU: compile_all drives real Triton compiles (for sm_90, no GPU needed) under Triton's
AsyncCompileMode, skips a failing one and keeps the rest. On CUDA: the compile-only launches compile
exactly what the timed launches then run (nothing is compiled twice), and the tuner still picks a
correct kernel.
"""
from __future__ import annotations

import threading

import pytest
import torch

from backends.gptq import parallel_compile
from backends.gptq import triton_kernels as tk


def _sm90_compile(block_n: int):
    """A real Triton compile of the tensor-core kernel for sm_90 (Triton's own ptxas, no driver)."""
    from bench.kernel_sass import compile_asm
    consts = dict(KB=8, BLOCK_M=16, BLOCK_N=block_n, HAS_PERM=False, SPLIT=True, HAS_BIAS=False, BITS=4,
                  USE_ASM=True, EVEN=True)
    return compile_asm(tk.gptq_gemm_h2_kernel, consts, 90, 4)["cubin"]


def test_compile_all_runs_each_call_under_async_compile_and_skips_failures(monkeypatch, tmp_path):
    import triton
    from triton.runtime import _async_compile
    if getattr(triton, "AsyncCompileMode", None) is None:
        pytest.skip(f"Triton {triton.__version__} has no AsyncCompileMode (needs >= 3.4)")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    seen, cubins = [], {}
    lock = threading.Lock()

    def call(block_n):
        def run():
            with lock:
                seen.append((block_n, _async_compile.active_mode.get() is not None))
            cubins[block_n] = _sm90_compile(block_n)
        return run

    def broken():
        raise RuntimeError("rejected by the compiler")

    queued = parallel_compile.compile_all([call(64), broken, call(128)], workers=2)
    assert queued == 2  # the broken call is skipped, the others still compile
    assert sorted(seen) == [(64, True), (128, True)]  # each once, inside Triton's async compile mode
    assert all(len(c) > 1000 for c in cubins.values()) and cubins[64] != cubins[128]
    assert _async_compile.active_mode.get() is None  # the mode is left when all are done


def test_compile_all_with_one_worker_compiles_in_order_without_async_mode():
    from triton.runtime import _async_compile
    seen = []
    n = parallel_compile.compile_all([lambda i=i: seen.append((i, _async_compile.active_mode.get())) for i in range(3)],
                                     workers=1)
    assert n == 3 and seen == [(0, None), (1, None), (2, None)]


def test_default_workers_is_bounded():
    assert 1 <= parallel_compile.default_workers() <= parallel_compile.MAX_WORKERS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compile-only launches need a driver)")
def test_precompile_leaves_nothing_to_compile_for_the_timed_launches():
    from backends.gptq.kernel_runtime import KernelRuntime, launch_fused
    from bench.kernels import random_layer
    kernels = (tk.gptq_gemm_kernel, tk.gptq_gemv_kernel, tk.gptq_gemv_h2_kernel, tk.gptq_gemm_h2_kernel)
    device = torch.cuda.current_device()

    def compiled() -> int:
        return sum(len(k.device_caches[device][0]) for k in kernels)

    for bits, M in ((4, 1), (4, 16), (3, 16)):
        packed, layer = random_layer(512, 768, bits, 128, False, seed=bits * 100 + M)
        runtime = KernelRuntime(tune=True, compile_workers=4)
        x = torch.randn(M, 512, device="cuda", dtype=torch.float16)
        candidates = [c for c in runtime.candidates(M, layer, x.device, x.dtype) if c.path == "fused"]
        before = compiled()
        assert runtime.precompile(x, layer, candidates) == len(candidates)
        after = compiled()
        assert after > before
        for cfg in candidates:
            launch_fused(x, layer, cfg, scratch=runtime.scratch)
        torch.cuda.synchronize()
        assert compiled() == after, f"{bits}-bit M={M}: a timed launch compiled again"
        cfg, ms = runtime.fastest(x, layer, candidates)
        assert cfg.path == "fused" and 0 < ms < float("inf")


class _RecordingKernel:
    """Stands in for a JIT function where only the options a launch passes are looked at."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("launch", grid, kwargs))

    def warmup(self, *args, grid, **kwargs):
        self.calls.append(("warmup", grid, kwargs))


def test_every_launch_asks_for_fused_multiply_adds():
    """Triton 3.10 turns fused multiply-adds off by default; the kernels were measured and checked with them,
    so the launcher asks for them, in real launches and in the tuner's compile-only ones alike."""
    kernel = _RecordingKernel()
    parallel_compile.launcher(kernel, (3, 1))(1, 2, num_warps=4)
    parallel_compile.launcher(kernel, (3, 1), compile_only=True)(1, 2, num_warps=4)
    assert kernel.calls == [(kind, (3, 1), {"enable_fp_fusion": True, "num_warps": 4}) for kind in ("launch", "warmup")]


def test_offline_compiles_fuse_multiply_adds_whatever_the_default(monkeypatch):
    """bench.kernel_sass (the SASS the compile tests count) compiles as the backend launches: with the
    default turned off (as Triton 3.10 will), a * b + c is still one fma."""
    import triton
    import triton.language as tl
    from bench.kernel_sass import compile_asm

    @triton.jit
    def madd(a_ptr, b_ptr, c_ptr, out_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.load(a_ptr + i) * tl.load(b_ptr + i) + tl.load(c_ptr + i))

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    types = {n: "*fp32" for n in ("a_ptr", "b_ptr", "c_ptr", "out_ptr")}
    assert "fma.rn.f32" in compile_asm(madd, dict(BLOCK=128), 90, 1, types)["ptx"]
    unfused = compile_asm(madd, dict(BLOCK=128), 90, 1, types, options={"enable_fp_fusion": False})["ptx"]
    assert "fma.rn.f32" not in unfused and "mul.rn.f32" in unfused
