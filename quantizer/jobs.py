"""Background jobs with progress events and memory sampling, shared by the UI and the CLI.

A `JobManager` belongs to one application (no module-level state). Each `Job` runs in a thread, reads
`should_stop()` between units of work, reports events, and keeps a memory time series (system RAM
used, this process's RSS, swap used, GPU memory) sampled every second for its whole life, so the
peak can be read after the job ends. Jobs outlive the browser page that started them."""
from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil

from backends.process_memory import resident_split

from backends.base import BackendError

log = logging.getLogger(__name__)

MB = 2 ** 20
MAX_LOG_LINES = 2000


def memory_sample(process: psutil.Process | None = None) -> dict:
    """One reading: MB of system RAM used, process RSS and the anonymous part of it (what the
    process allocated, which the kernel cannot evict), swap used, GPU memory used (device-wide) and
    allocated by this process through torch."""
    process = process or psutil.Process()
    vm = psutil.virtual_memory()
    rss, anonymous = resident_split(process)
    sample = {"t": time.time(), "ram_used_mb": (vm.total - vm.available) / MB, "ram_total_mb": vm.total / MB,
              "rss_mb": rss / MB, "anon_mb": anonymous / MB,
              "swap_used_mb": psutil.swap_memory().used / MB,
              "gpu_used_mb": 0.0, "gpu_alloc_mb": 0.0}
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info()
            sample["gpu_used_mb"] = (total - free) / MB
            sample["gpu_alloc_mb"] = torch.cuda.memory_allocated() / MB
    except Exception:  # a GPU that went away must not kill the sampler
        pass
    return sample


class MemorySampler:
    """Samples `memory_sample()` every `interval` seconds in a daemon thread until stopped."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self._lock = threading.Lock()

    def start(self) -> "MemorySampler":
        self._take()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        sample = memory_sample(self._process)
        with self._lock:
            self.samples.append(sample)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._take()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.samples)

    def peak(self, key: str) -> float:
        samples = self.snapshot()
        return max((s[key] for s in samples), default=0.0)


@dataclass
class Job:
    id: str
    kind: str
    title: str
    status: str = "queued"      # queued | running | done | failed | cancelled
    progress: float = 0.0       # 0..1
    stage: str = ""
    log: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    sampler: MemorySampler | None = None
    baseline_rss_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- used by the work function ------------------------------------------------------------
    def should_stop(self) -> bool:
        return self._stop.is_set()

    def report(self, event: dict) -> None:
        with self._lock:
            self.events.append(event)
            if "progress" in event:
                self.progress = max(0.0, min(1.0, float(event["progress"])))
            if "stage" in event:
                self.stage = str(event["stage"])
            text = event.get("text")
            if text:
                self.log.append(text)
                del self.log[:-MAX_LOG_LINES]

    # -- used by the UI / CLI ----------------------------------------------------------------
    def cancel(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        return self.status in ("queued", "running")

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def snapshot(self) -> dict:
        with self._lock:
            log_lines = list(self.log)
        samples = self.sampler.snapshot() if self.sampler else []
        return {"id": self.id, "kind": self.kind, "title": self.title, "status": self.status,
                "progress": self.progress, "stage": self.stage, "log": log_lines, "error": self.error,
                "started": self.started, "finished": self.finished, "samples": samples,
                "baseline_rss_mb": self.baseline_rss_mb,
                "elapsed": (self.finished or time.time()) - self.started}

    def peak(self, key: str) -> float:
        return self.sampler.peak(key) if self.sampler else 0.0


class JobManager:
    """Runs jobs in background threads. At most one job per `exclusive` kind runs at a time
    (two quantizations would fight over the same RAM and GPU)."""

    def __init__(self, sample_interval: float = 1.0, exclusive: tuple[str, ...] = ("quantize",)):
        self.sample_interval = sample_interval
        self.exclusive = exclusive
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def submit(self, kind: str, title: str, work: Callable[[Job], Any]) -> Job:
        with self._lock:
            if kind in self.exclusive:
                busy = [j for j in self._jobs.values() if j.kind == kind and j.running]
                if busy:
                    raise BackendError(f"a {kind} job is already running ({busy[0].title}); "
                                       "wait for it or cancel it first")
            job = Job(id=f"{kind}-{next(self._ids)}", kind=kind, title=title)
            self._jobs[job.id] = job
        job.sampler = MemorySampler(self.sample_interval).start()
        job.baseline_rss_mb = job.sampler.samples[0]["rss_mb"]
        job._thread = threading.Thread(target=self._run, args=(job, work), name=job.id, daemon=True)
        job.status = "running"
        job._thread.start()
        return job

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        from quantizer.pipeline import Cancelled
        try:
            job.result = work(job)
            job.status = "done"
            job.progress = 1.0
        except Cancelled as exc:
            job.status = "cancelled"
            job.error = str(exc)
            job.report({"text": f"cancelled: {exc}"})
        except (BackendError, ValueError) as exc:
            job.status = "failed"
            job.error = str(exc)
            job.report({"text": f"error: {exc}"})
        except Exception as exc:
            job.status = "failed"
            advice = explain_failure(exc)
            if advice is not None:  # a known resource fault: say what to change, no trace needed
                job.error = advice
                job.report({"text": f"error: {advice}"})
                log.warning("job %s failed: %s", job.id, advice)
            else:  # an unexpected failure: keep the trace in the log for a bug report
                job.error = f"{type(exc).__name__}: {exc}"
                job.report({"text": "error: " + "".join(traceback.format_exception(exc)).strip()})
                log.exception("job %s failed", job.id)
        finally:
            job.finished = time.time()
            if job.sampler:
                job.sampler.stop()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self, kind: str | None = None) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if kind is None or j.kind == kind]

    def latest(self, kind: str) -> Job | None:
        jobs = self.jobs(kind)
        return jobs[-1] if jobs else None


def explain_failure(exc: BaseException) -> str | None:
    """Name the cause of a resource fault and what to change, or None for anything else."""
    import errno
    text = str(exc)
    gpu_oom = type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text
    if isinstance(exc, MemoryError) or gpu_oom:
        where = "GPU" if gpu_oom else "RAM"
        return (f"out of memory ({where}) during the job: try fewer calibration samples (--nsamples), "
                "a shorter --seqlen or --batch-size 1, or unload other models; finished layers are kept, "
                "so the job can continue with --resume")
    no_space = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG)) \
        or "No space left on device" in text or "File too large" in text
    if no_space:
        return (f"the disk is full ({text.strip() or type(exc).__name__}): free some space, then run the "
                "same job with --resume; the previous checkpoint of that name is untouched")
    return None
