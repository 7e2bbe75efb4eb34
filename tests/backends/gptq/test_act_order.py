"""Runs interp_act_order_cases.py (act_order.py's rewrites of an act-order model, through the Triton
kernels) under TRITON_INTERPRET=1 in a fresh interpreter (see support.run_under_interpreter)."""
from __future__ import annotations

from pathlib import Path

from tests.backends.gptq.support import run_under_interpreter


def test_act_order_rewrites_under_the_interpreter():
    run_under_interpreter(Path(__file__).with_name("interp_act_order_cases.py"), min_passed=19)
