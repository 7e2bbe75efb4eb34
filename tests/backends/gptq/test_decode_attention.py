"""Runs interp_attention_cases.py (the decoding attention kernel and a model decoding through it, under
TRITON_INTERPRET=1) in a fresh interpreter: triton decides between compiling and interpreting when a
kernel is first imported, and other tests of the session may have imported it in compile mode."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("interp_attention_cases.py")
REPO = Path(__file__).resolve().parents[3]


def test_decode_attention_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    tail = f"exit status {result.returncode}\n" + result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 40, summary  # every case really ran
