"""Runs interp_kernel_cases.py (every Triton kernel under TRITON_INTERPRET=1, the torch path against the
kernels, fused siblings) in a fresh interpreter (see support.run_under_interpreter)."""
from __future__ import annotations

from pathlib import Path

from tests.backends.gptq.support import run_under_interpreter


def test_triton_kernels_under_the_interpreter():
    run_under_interpreter(Path(__file__).with_name("interp_kernel_cases.py"), min_passed=105)
