"""Resident memory of a process: read the exact way, and give freed memory back so it shows."""
from __future__ import annotations

import ctypes
import gc

import psutil


def resident_bytes(process: psutil.Process | None = None) -> int:
    """The process's resident set size, exact where the kernel allows it.

    Since Linux 6.2 the RSS in /proc/<pid>/statm (what psutil reads) is a per-CPU counter read
    without summing: on a host with many CPUs it can lag by over a hundred MB, so a growing job looks
    flat. /proc/<pid>/smaps_rollup walks the page tables and is exact (a few ms per read)."""
    process = process or psutil.Process()
    try:
        with open(f"/proc/{process.pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process.memory_info().rss


def resident_mb(process: psutil.Process | None = None) -> float:
    return resident_bytes(process) / 2 ** 20


def release_memory() -> None:
    """Collect garbage and give freed heap back to the OS (glibc keeps it otherwise), so RSS tracks
    what is in use rather than what was once used."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
