"""Faults during quantization, through the quantizer's public interface (CLI, JobManager): a full disk
and running out of memory. (kill -9 and --resume are tested in tests/quantizer/test_pipeline.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from backends.manager import ModelManager

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--nsamples", "4", "--seqlen", "32", "--bits", "4"]


def one_layer_copy(source: Path, dest: Path) -> Path:
    """The default model cut to its first decoder layer (real weights, tokenizer and config)."""
    dest.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (dest / "config.json").write_text(json.dumps(config))
    with safe_open(str(source / "model.safetensors"), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()
                   if not k.startswith("model.layers.") or k.split(".")[2] == "0"}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
    return dest


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def quantize_cli(models: Path, out: str, *extra, file_limit: int | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def limit_file_size():                  # unprivileged stand-in for a full disk: writes fail (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "quantizer", "quantize", "tiny", "--out", out,
                           "--models-dir", str(models), *SMALL, *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit_file_size if file_limit else None)


@pytest.fixture
def small_disk(tmp_path, default_hf_model):
    """A models folder on a 100 MiB tmpfs (the 1-layer model takes ~64 MiB, its checkpoint needs more
    than what is left), or, where mounting is not allowed, a per-file size limit on the job."""
    models = tmp_path / "disk"
    models.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(models)],
                             capture_output=True).returncode == 0
    try:
        one_layer_copy(default_hf_model, models / "tiny")
        yield models, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(models)], check=False)


@pytest.mark.slow
def test_full_disk_fails_clearly_lists_nothing_broken_and_resume_finishes(small_disk):
    models, mounted = small_disk
    source_before = digest(models / "tiny")
    failed = quantize_cli(models, "tiny-q", file_limit=None if mounted else 30 * 2**20)
    assert failed.returncode == 1, failed.stderr[-2000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and ("No space left on device" in last or "File too large" in last), last
    assert not (models / "tiny-q").exists()                         # nothing under the final name
    listed = {e.name: e for e in ModelManager(models).list_models()}
    assert set(listed) == {"tiny"} and listed["tiny"].format == "hf"  # the .partial is not offered
    assert digest(models / "tiny") == source_before                 # the source is untouched
    refused = quantize_cli(models, "tiny")                          # an existing name is never overwritten
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert digest(models / "tiny") == source_before

    if mounted:                                                     # the user frees space, then resumes
        subprocess.run(["mount", "-o", "remount,size=400m", str(models)], check=True)
    resumed = quantize_cli(models, "tiny-q", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (models / "tiny-q.partial").exists()
    manager = ModelManager(models)
    assert {e.name: e.format for e in manager.list_models()} == {"tiny": "hf", "tiny-q": "gptq"}
    model_id = manager.load("tiny-q", "gptq", {"device": "cpu"})
    try:
        assert manager.get(model_id).backend.tokenize("Paris")
    finally:
        manager.unload_all()


def _run_with_oom(models: Path, out: str, exc: BaseException, monkeypatch):
    from quantizer import pipeline
    from quantizer.jobs import JobManager
    from quantizer.service import start_quantize
    from quantizer.settings import QuantizeSettings

    real = pipeline.gptq_quantize
    calls = []

    def exhausted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                                         # a few linears in: memory runs out
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "gptq_quantize", exhausted)
    jobs = JobManager(sample_interval=0.5)
    job = start_quantize(jobs, models, "tiny", out,
                         QuantizeSettings(bits=4, nsamples=4, seqlen=32, calib="builtin", device="cpu"))
    assert job.wait(300)
    monkeypatch.setattr(pipeline, "gptq_quantize", real)
    return jobs, job


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, default_hf_model):
    models = tmp_path_factory.mktemp("oom-models")
    one_layer_copy(default_hf_model, models / "tiny")
    return models


@pytest.mark.parametrize("exc", [MemoryError(), MemoryError("Unable to allocate 2.00 GiB")],
                         ids=["bare", "with-size"])
def test_out_of_memory_fails_the_job_and_the_app_keeps_working(tiny_models, monkeypatch, exc):
    from quantizer.service import start_quantize
    from quantizer.settings import QuantizeSettings

    jobs, job = _run_with_oom(tiny_models, "oom-q", exc, monkeypatch)
    assert job.status == "failed"
    assert "MemoryError" in job.error or "out of memory" in job.error.lower(), job.error
    assert not (tiny_models / "oom-q").exists() and not (tiny_models / "oom-q.partial").exists()
    assert {e.name for e in ModelManager(tiny_models).list_models()} == {"tiny"}
    again = start_quantize(jobs, tiny_models, "tiny", "after-oom",             # the next job runs fine
                           QuantizeSettings(bits=4, nsamples=4, seqlen=32, calib="builtin", device="cpu"))
    assert again.wait(300) and again.status == "done", again.error
    shutil.rmtree(tiny_models / "after-oom")


def test_out_of_memory_message_suggests_what_to_change(tiny_models, monkeypatch):
    _, job = _run_with_oom(tiny_models, "oom-advice-q", MemoryError(), monkeypatch)
    message = job.error.lower()
    assert "out of memory" in message
    assert any(hint in message for hint in ("nsamples", "samples", "seqlen", "smaller", "unload"))
