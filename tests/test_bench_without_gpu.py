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
                                    "bench.gemv_sweep", "bench.ncu_profile"])
def test_gpu_benchmarks_say_they_need_cuda(module):
    result = subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"{module} needs a CUDA GPU"


def test_ncu_summary_reads_the_raw_page():
    """bench.ncu_profile --summarize: ncu's raw page (a header row, a units row, a row per kernel) becomes
    one block per kernel with its metrics and its stall reasons, largest first."""
    from bench.ncu_profile import summary_of_raw_csv
    header = ["ID", "Kernel Name", "launch__grid_size", "launch__block_size", "gpu__time_duration.sum",
              "smsp__issue_active.avg.pct_of_peak_sustained_active",
              "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
              "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
              "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
              "smsp__average_warps_issue_stalled_long_scoreboard_not_issued_per_issue_active.ratio"]
    units = ["", "", "", "", "us", "%", "", "", "", ""]
    rows = [["0", "gptq_mma4_kernel", "1,792", "128", "65.25", "35.18", "1.41", "4.29", "1.18", "9.99"],
            ["1", "gptq_gemv_h2_kernel", "504", "128", "38.72", "56.59", "0.19", "2.80", "0.77", "9.99"]]
    raw = "\n".join(",".join(f'"{v}"' for v in r) for r in [header, units] + rows)
    out = summary_of_raw_csv(raw).split("== ")[1:]
    assert len(out) == 2 and out[0].startswith("gptq_mma4_kernel  (grid 1,792, block 128)")
    first = out[0].splitlines()
    assert any(l.split() == ["duration", "65.25", "us"] for l in first), first
    assert any(l.split() == ["issue", "active", "%", "35.18", "%"] for l in first), first
    assert first[-1].endswith(": long_scoreboard 4.29, barrier 1.41, wait 1.18")  # not_issued ratios left out
    assert out[1].startswith("gptq_gemv_h2_kernel")
    assert out[1].splitlines()[-1].endswith(": long_scoreboard 2.80, wait 0.77, barrier 0.19")
    assert "no kernel" in summary_of_raw_csv(",".join(header))
