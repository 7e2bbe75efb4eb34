"""The GPU benchmarks, run where there is no GPU (this machine, CI, a laptop): each imports, parses its
arguments and stops with a sentence saying it needs CUDA, instead of a traceback halfway through."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
@pytest.mark.parametrize("module", ["bench.tune_time", "bench.offload", "bench.load_cycles", "bench.kernels",
                                    "bench.gemv_sweep"])
def test_gpu_benchmarks_say_they_need_cuda(module):
    result = subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"{module} needs a CUDA GPU"
