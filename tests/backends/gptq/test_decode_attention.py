"""Runs interp_attention_cases.py (the decoding attention kernel and a model decoding through it) under
TRITON_INTERPRET=1 in a fresh interpreter (see support.run_under_interpreter)."""
from __future__ import annotations

from pathlib import Path

from tests.backends.gptq.support import run_under_interpreter


def test_decode_attention_under_the_interpreter():
    run_under_interpreter(Path(__file__).with_name("interp_attention_cases.py"), min_passed=40)
