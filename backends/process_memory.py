"""Resident memory of a process: read the exact way, and give freed memory back so it shows."""
from __future__ import annotations

import ctypes
import gc

import psutil


def _rollup(process: psutil.Process) -> dict[str, int] | None:
    """Bytes per field of /proc/<pid>/smaps_rollup, or None where the kernel does not offer it."""
    try:
        with open(f"/proc/{process.pid}/smaps_rollup") as rollup:
            return {line.split(":")[0]: int(line.split()[1]) * 1024
                    for line in rollup if line.split()[-1:] == ["kB"]}
    except (OSError, ValueError, IndexError):
        return None


def resident_split(process: psutil.Process | None = None) -> tuple[int, int]:
    """(RSS, its anonymous part) in bytes, from one read.

    RSS: since Linux 6.2 the figure in /proc/<pid>/statm (what psutil reads) is a per-CPU counter read
    without summing: on a host with many CPUs it can lag by over a hundred MB, so a growing job looks
    flat. /proc/<pid>/smaps_rollup walks the page tables and is exact (a few ms per read).
    Anonymous: the memory the process itself allocated (heap, tensors, private maps). Unlike RSS it
    excludes file pages (mapped libraries, mmapped weights), which the kernel may drop at any moment
    under pressure, so it is what a job really costs and it only moves when the process allocates or
    frees."""
    process = process or psutil.Process()
    rollup = _rollup(process)
    if rollup and "Rss" in rollup and "Anonymous" in rollup:
        return rollup["Rss"], rollup["Anonymous"]
    info = process.memory_info()
    return info.rss, max(0, info.rss - getattr(info, "shared", 0))


def resident_bytes(process: psutil.Process | None = None) -> int:
    """The process's resident set size, exact where the kernel allows it (see `resident_split`)."""
    return resident_split(process)[0]


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
