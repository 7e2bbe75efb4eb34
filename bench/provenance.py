"""Which code a benchmark measured: the commit, marked when the tree differs from it.

Why: the lent GPU machine's copy of the tree can hold a stale .git (an earlier session's), so a bare
`git rev-parse HEAD` there named a commit whose files were not the ones measured (bench/RESULTS.md,
2026-12-03 16:05). `git describe --dirty` says so; GPTQ_WEBUI_COMMIT, set by whoever launches a run,
still wins when given.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tree_commit(repo: Path = REPO) -> str:
    """GPTQ_WEBUI_COMMIT when set; else the short commit of `repo`, with '-dirty' when tracked files
    differ from it; '?' without git or a repository."""
    if os.environ.get("GPTQ_WEBUI_COMMIT"):
        return os.environ["GPTQ_WEBUI_COMMIT"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7", "--match", "NO-TAGS"],
                             cwd=repo, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "?"
