"""On the real default model: GPTQ's perplexity increase over the fp model is clearly smaller than
RTN's at 4-bit g128 and at 3-bit g128 (BENCH.md section 4), calibrated on C4 and (4-bit) on text the
model generates itself, and the job streams the model (its peak RSS
stays below the fp model plus the activations)."""
from __future__ import annotations

import os
import shutil

import pytest

from quantizer.evaluation import load_eval_text, perplexity
from quantizer.jobs import JobManager
from quantizer.reference import DequantizedGPTQBackend
from quantizer.service import start_quantize
from quantizer.settings import QuantizeSettings

CALIB = dict(calib="c4", nsamples=16, seqlen=256)
# With this little calibration data (4096 tokens, a few of them attention-sink tokens with activations
# ~500x the rest) plain GPTQ overfits the Hessian. At 3 bits capping the sink tokens' weight
# (token_clip) and a higher damp fix that; at 4 bits act-order with static groups (the Quantize tab's
# default) does, where token_clip + damp 0.1 does not (bench/RESULTS.md has both tables). RTN uses the
# same grid.
GPTQ_OPTIONS = {4: dict(act_order=True, static_groups=True), 3: dict(token_clip=4.0, damp=0.1)}
# 16 x 256 sampled tokens are a small, noisy budget: the gap ratio measured 0.70 on 2026-12-05's machine and, on
# 2026-12-06's (same code, other CPU: the sampled text diverges), 0.84 / 0.63 / 0.71 / 0.80 for seeds 0-3. The
# bound leaves room for that spread and still asks for a clearly better model than RTN.
GENERATED_MAX_GAP_RATIO = 0.9
EVAL_SEQLEN, EVAL_WINDOWS = 256, 8
MB = 2 ** 20


def _ppl(path, text) -> float:
    backend = DequantizedGPTQBackend()
    backend.load(path, backend.validate_options({"dtype": "float32", "device": "cpu"}))
    try:
        return perplexity(backend, text, EVAL_SEQLEN, EVAL_WINDOWS).ppl
    finally:
        backend.unload()


@pytest.fixture(scope="module")
def runs(default_hf_model, artifacts_dir, c4_path, wikitext_path, transformers_backend):
    """fp, and RTN and GPTQ (4-bit and 3-bit g128, sym) perplexities with each job (and its memory samples).
    The outputs go to a scratch models folder holding hard links to the default model's files."""
    models_dir = artifacts_dir / "quality-models"
    shutil.rmtree(models_dir, ignore_errors=True)
    source = models_dir / default_hf_model.name
    source.mkdir(parents=True)
    for f in default_hf_model.iterdir():
        try:
            os.link(f, source / f.name)
        except OSError:
            shutil.copy2(f, source / f.name)
    text = load_eval_text(wikitext_path)
    fp = perplexity(transformers_backend, text, EVAL_SEQLEN, EVAL_WINDOWS).ppl
    jobs = JobManager(sample_interval=0.1)
    out = {}
    try:
        for bits in (4, 3):
            for method in ("rtn", "gptq"):
                # an RTN model does not depend on the calibration data (the job runs it only to report
                # each layer's output error), so its jobs take a quarter of it: ~30 s less each
                extra = GPTQ_OPTIONS[bits] if method == "gptq" else {"nsamples": CALIB["nsamples"] // 4}
                job = start_quantize(jobs, models_dir, source.name, f"{bits}bit-{method}",
                                     QuantizeSettings(bits=bits, group_size=128, method=method,
                                                      **{**CALIB, **extra}))
                job.wait()
                assert job.status == "done", job.error
                out[bits, method] = (_ppl(job.result.output, text), job)
        # the default source: text the model writes itself (the same budget of 16 x 256 tokens)
        job = start_quantize(jobs, models_dir, source.name, "4bit-gptq-generated",
                             QuantizeSettings(bits=4, group_size=128, **{**CALIB, "calib": "generated"},
                                              **GPTQ_OPTIONS[4]))
        job.wait()
        assert job.status == "done", job.error
        out[4, "gptq-generated"] = (_ppl(job.result.output, text), job)
    finally:
        shutil.rmtree(models_dir, ignore_errors=True)
    return fp, out


@pytest.mark.slow
@pytest.mark.parametrize("bits, gptq, max_gap_ratio", [(4, "gptq", 0.8), (3, "gptq", 0.6),  # measured: 0.71, 0.42
                                                       (4, "gptq-generated", GENERATED_MAX_GAP_RATIO)])
def test_gptq_beats_rtn(runs, bits, gptq, max_gap_ratio):
    fp, out = runs
    rtn_ppl, gptq_ppl = out[bits, "rtn"][0], out[bits, gptq][0]
    print(f"fp {fp:.2f}  rtn {bits}-bit g128 {rtn_ppl:.2f}  gptq {bits}-bit g128 {gptq_ppl:.2f}  "
          f"gap ratio {(gptq_ppl - fp) / (rtn_ppl - fp):.2f}")
    assert fp < gptq_ppl < rtn_ppl
    assert gptq_ppl - fp < max_gap_ratio * (rtn_ppl - fp)


@pytest.mark.slow
def test_peak_rss_stays_below_the_fp_model_plus_activations(runs, default_hf_model):
    _, out = runs
    job = out[3, "gptq"][1]
    model_mb = (default_hf_model / "model.safetensors").stat().st_size / MB
    acts_mb = 2 * CALIB["nsamples"] * CALIB["seqlen"] * 576 * 4 / MB
    growth = job.peak("rss_mb") - job.baseline_rss_mb
    print(f"RSS at start {job.baseline_rss_mb:.0f} MB, peak {job.peak('rss_mb'):.0f} MB, "
          f"growth {growth:.0f} MB; fp16 model {model_mb:.0f} MB, activations {acts_mb:.1f} MB")
    assert len(job.sampler.snapshot()) > 50          # sampled all along the job
    assert growth < model_mb + acts_mb
