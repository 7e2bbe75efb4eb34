"""`./start.sh test [pytest args]`, the README's test command, run for real: with a path after `test`
only that path runs (it used to append `tests` and run the whole suite anyway)."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import DEFAULT_HF, REPO


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists() or not DEFAULT_HF.exists(),
                    reason="needs the installed .venv and default model (./start.sh test sets both up)")
def test_a_path_after_test_runs_alone():
    target = "tests/webui/test_ui_presets.py"
    result = subprocess.run(["bash", str(REPO / "start.sh"), "test", "--collect-only", target],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = re.search(r"(\d+) tests? collected", result.stdout)
    assert collected, result.stdout[-3000:]
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert ids and all(line.startswith(target + "::") for line in ids), ids[:5]
    assert int(collected.group(1)) == len(ids)
