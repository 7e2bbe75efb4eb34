"""Compile many Triton kernel variants side by side, before any of them runs.

Why: the tuner tries dozens of configs per layer shape, and on a cold machine each one is a Triton
compile of about a second, one after another: a new model's first load spent minutes there (a 3-bit
model's two test layers did not finish tuning in 170 s on an H200, bench/RESULTS.md). Triton compiles
with the GIL released (its MLIR passes) or in a child process (ptxas), so a thread pool under Triton's
own AsyncCompileMode compiles them at once (1.7x on this 2-core machine, more where there are cores).
The compiled kernels land in Triton's in-memory and on-disk caches, where the launches that follow
find them.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

log = logging.getLogger(__name__)

MAX_WORKERS = 16


# Compile options every GPTQ kernel is launched with. Fused multiply-adds: the kernels were written, measured
# and checked against float64 with them (Triton's default through 3.9; 3.10 turns the default off, which
# would silently split every a * b + c of the epilogues and the portable kernels in two).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def launcher(kernel, grid, compile_only: bool = False):
    """kernel[grid] with COMPILE_OPTIONS, or with compile_only the same call as a compile without a launch
    (Triton's warmup: the same specialization, so the launch that follows finds the binary)."""
    if compile_only:
        return lambda *args, **kwargs: kernel.warmup(*args, grid=grid, **COMPILE_OPTIONS, **kwargs)
    launch = kernel[grid]
    return lambda *args, **kwargs: launch(*args, **COMPILE_OPTIONS, **kwargs)


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def compile_all(compile_calls: Iterable[Callable[[], object]], workers: int | None = None) -> int:
    """Call each compile-only launch with its compiles queued on a pool of `workers` threads, and wait
    for them all. A call that fails (a config the compiler rejects) is skipped: its real launch will
    fail again, where the caller already handles it. Returns how many calls were queued. Without
    Triton's AsyncCompileMode (Triton < 3.4) or with one worker, the calls compile one by one."""
    import triton
    calls = list(compile_calls)
    workers = min(workers or default_workers(), max(len(calls), 1))
    async_mode = getattr(triton, "AsyncCompileMode", None)
    if async_mode is None or workers <= 1:
        return sum(_try(call) for call in calls)
    with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
        with async_mode(pool, ignore_errors=True):
            return sum(_try(call) for call in calls)


def _try(call) -> bool:
    try:
        call()
        return True
    except Exception as exc:  # noqa: BLE001 - any compiler error: the real launch reports it
        log.debug("compile-only launch failed: %s", exc)
        return False
