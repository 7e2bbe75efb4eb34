"""Runs interp_kernel_cases.py (every Triton kernel under TRITON_INTERPRET=1, the torch path against the
kernels, fused siblings) in a fresh interpreter: triton decides between compiling and interpreting
when triton.language and our kernels are first imported, and other tests of the session (transformers,
torch.compile) may already have imported them in compile mode."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("interp_kernel_cases.py")
REPO = Path(__file__).resolve().parents[3]


def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    tail = f"exit status {result.returncode}\n" + result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 30, summary  # every case really ran
