"""The job runner: background work with progress, cancel, failure messages, one quantization at a
time, and a memory series sampled for the whole job."""
from __future__ import annotations

import mmap
import time

import pytest

from backends.base import BackendError
from backends.process_memory import release_memory
from quantizer.jobs import JobManager, memory_sample
from quantizer.pipeline import Cancelled


def test_progress_result_and_memory_series():
    jobs = JobManager(sample_interval=0.05)
    step_bytes = 60 * 2 ** 20

    def work(job):
        blocks = []
        for i in range(5):
            # a fresh private anonymous mapping (what tensors live in), written through, so the
            # process's own memory really rises by 60 MB a step (malloc could hand back pages freed by
            # earlier tests, leaving it flat; Python's default mmap(-1) is shared memory, not counted
            # as the process's anonymous memory)
            block = mmap.mmap(-1, step_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            block.write(b"\x01" * len(block))
            blocks.append(block)
            job.report({"progress": (i + 1) / 5, "stage": f"step {i + 1}", "text": f"did step {i + 1}"})
            time.sleep(0.1)
        return sum(len(b) for b in blocks)

    # garbage of earlier tests is freed now, not during the job: a collection triggered mid-job could
    # give back more than the job takes and make the rise invisible
    release_memory()
    job = jobs.submit("quantize", "demo", work)
    assert job.wait(30)
    snap = job.snapshot()
    assert snap["status"] == "done" and job.result == 5 * step_bytes
    assert snap["progress"] == 1.0 and snap["log"][-1] == "did step 5"
    assert len(snap["samples"]) >= 5
    for key in ("ram_used_mb", "rss_mb", "anon_mb", "swap_used_mb", "gpu_used_mb"):
        assert key in snap["samples"][0]
    # the anonymous part, not all of RSS: on a loaded machine the kernel may evict file pages (mapped
    # libraries, mmapped weights of earlier tests) mid-job, and RSS then falls by more than the job adds
    # Other threads of the test process (servers of earlier tests) allocate and free too: seen here,
    # -46 MB between the first two samples. So the rise is taken from the lowest sample before the
    # peak, and 300 MB are allocated to see a rise of more than 180 MB.
    series = [round(s["anon_mb"]) for s in snap["samples"]]
    top = series.index(max(series))
    assert max(series) - min(series[: top + 1]) > 180, f"anonymous MB per sample: {series}"
    assert round(job.peak("anon_mb")) == max(series)
    assert job.peak("rss_mb") > 0 and all(s["anon_mb"] <= s["rss_mb"] + 1 for s in snap["samples"])


def test_cancel_failure_and_exclusivity():
    jobs = JobManager(sample_interval=0.05)

    def slow(job):
        while True:
            if job.should_stop():
                raise Cancelled("stopped by the user")
            time.sleep(0.01)

    job = jobs.submit("quantize", "slow", slow)
    with pytest.raises(BackendError, match="already running"):
        jobs.submit("quantize", "second", slow)
    other = jobs.submit("eval", "another kind runs alongside", lambda j: 1)
    job.cancel()
    assert job.wait(10) and job.status == "cancelled"
    assert other.wait(10) and other.status == "done"

    failed = jobs.submit("quantize", "broken", lambda j: (_ for _ in ()).throw(ValueError("bits must be 4")))
    assert failed.wait(10)
    assert failed.status == "failed" and failed.error == "bits must be 4"
    crashed = jobs.submit("quantize", "bug", lambda j: 1 / 0)
    assert crashed.wait(10) and crashed.status == "failed" and "ZeroDivisionError" in crashed.error
    assert jobs.latest("quantize") is crashed and len(jobs.jobs("quantize")) == 3


def test_memory_sample_is_in_megabytes():
    s = memory_sample()
    assert 10 < s["rss_mb"] < s["ram_total_mb"] and s["ram_used_mb"] > 0
