"""Quantization and evaluation as jobs: what the Quantize tab and the CLI start.

Everything a user can get wrong is checked by `pipeline.plan` before the job starts, so a bad setting
is a message and nothing is written."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantizer.jobs import Job, JobManager
from quantizer.layers import arch_for
from quantizer.pipeline import Plan, plan, run
from quantizer.settings import QuantizeSettings


# the per-layer stages of pipeline._Timer, in the order they run, as the log and the CLI name them
TIMING_LABELS = (("load", "load"), ("forward_hessian", "hessian forwards"), ("hessian", "of which accumulate"),
                 ("quantize", "quantize"), ("forward_out", "output forward"), ("pack_save", "pack+save"))


def timing_text(timing: dict | None) -> str:
    """'; seconds: load 0.1, hessian forwards 1.2 (of which accumulate 0.3), ...' or '' without timing."""
    if not timing:
        return ""
    parts = []
    for key, label in TIMING_LABELS:
        if key not in timing:
            continue
        if key == "hessian":
            parts[-1] += f" ({label} {timing[key]:.2f})" if parts else ""
        else:
            parts.append(f"{label} {timing[key]:.2f}")
    return "; seconds: " + ", ".join(parts)


def progress_adapter(job: Job, modules_per_layer: int = 7):
    """Turn pipeline events into job progress and readable log lines."""
    seen = {"module": 0}

    def report(event: dict) -> None:
        kind = event.get("kind")
        if kind == "layer_start":
            seen["module"] = 0
            job.report({**event, "progress": event["layer"] / event["layers"],
                        "stage": f"layer {event['layer'] + 1}/{event['layers']}"})
        elif kind == "module":
            seen["module"] += 1
            frac = min(seen["module"] / modules_per_layer, 1.0)
            job.report({**event, "progress": (event["layer"] + 0.9 * frac) / event["layers"],
                        "stage": f"layer {event['layer'] + 1}/{event['layers']}: {event['module']}"})
        elif kind == "layer_done":
            errs = ", ".join(f"{name.split('.')[-1]} {m['error']:.4f} (rtn {m['rtn_error']:.4f})"
                             for name, m in event["modules"].items())
            job.report({**event, "progress": (event["layer"] + 1) / event["layers"],
                        "text": f"layer {event['layer'] + 1}/{event['layers']} in {event['seconds']:.1f} s; "
                                f"relative output error: {errs}" + timing_text(event.get("timing"))})
        else:
            job.report(event)
    return report


def start_quantize(jobs: JobManager, models_dir: Path, source: str, out: str, settings: QuantizeSettings,
                   resume: bool = False, keep_partial_on_cancel: bool = False) -> Job:
    """Validate (raising ValueError/BackendError, writing nothing), then quantize in the background."""
    p: Plan = plan(models_dir, source, out, settings, resume=resume)
    title = f"{p.source.name} -> {p.output.name} ({settings.method} {settings.bits}-bit g{settings.group_size})"

    def work(job: Job):
        job.report({"text": f"quantizing {title}", "stage": "starting"})
        modules = sum(len(g) for g in arch_for(p.config).sequential)
        result = run(p, progress_adapter(job, modules), job.should_stop, keep_partial_on_cancel)
        job.report({"text": f"done in {result.seconds:.1f} s: {result.output.name}"})
        return result

    return jobs.submit("quantize", title, work)


@dataclass(frozen=True)
class PerplexityComparison:
    """What a comparison job returns: each model's perplexity (the original first) on the same windows."""
    dataset: str
    seqlen: int
    windows: int
    ppl: dict[str, float]


def start_compare(jobs: JobManager, models_dir: Path, original: str, quantized: str, dataset: str = "wikitext2",
                  seqlen: int = 512, windows: int | None = 10) -> Job:
    """Perplexity of the original and the quantized model on the same text and windows."""
    from backends.manager import ModelManager
    manager = ModelManager(models_dir)
    paths = [manager.resolve_path(original), manager.resolve_path(quantized)]

    def work(job: Job):
        from quantizer.evaluation import load_eval_text, perplexity
        text = load_eval_text(dataset)
        results, used = {}, 0
        for n, path in enumerate(paths):
            backend = load_for_eval(path)
            try:
                def progress(done, total, n=n):
                    job.report({"progress": (n + done / total) / 2, "stage": f"{path.name}: window {done}/{total}"})
                r = perplexity(backend, text, seqlen, windows, progress=progress, should_stop=job.should_stop)
            finally:
                backend.unload()
            results[path.name], used = r.ppl, r.windows
            job.report({"text": f"{path.name}: ppl {r.ppl:.3f} ({r.windows} windows of {seqlen} tokens, {dataset})"})
        return PerplexityComparison(dataset, seqlen, used, results)

    return jobs.submit("eval", f"perplexity {original} vs {quantized}", work)


def load_for_eval(path: Path, backend_name: str | None = None, options: dict | None = None):
    """A backend for perplexity: the one the format needs (gptq checkpoints fall back to their
    dequantized weights when the gptq engine is not installed), or `backend_name`."""
    from backends.base import BackendError
    from backends.registry import create_backend, default_backend_for, detect_format
    if backend_name == "dequantized" or (backend_name is None and detect_format(path) == "gptq"):
        backend = None
        if backend_name is None:
            try:
                backend = create_backend("gptq")
            except BackendError:
                backend = None
        if backend is None:
            from quantizer.reference import DequantizedGPTQBackend
            backend = DequantizedGPTQBackend()
    else:
        backend = create_backend(backend_name or default_backend_for(path))
    backend.load(path, backend.validate_options(options or {}))
    return backend
