"""The pipeline end to end on a truncated copy of the default model: checkpoint layout, exactness of
the written weights, bad input, cancel, kill + resume, and the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from backends.base import BackendError
from backends.gptq import format as gptq_format
from backends.manager import ModelManager
from quantizer.jobs import JobManager
from quantizer.pipeline import plan, run
from quantizer.service import start_quantize
from quantizer.settings import QuantizeSettings

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(nsamples=4, seqlen=64, calib="builtin")
LINEARS = {  # name -> (K, N) of the default model
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}


def _tensors(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def quantized(tiny_models_dir):
    """tiny quantized at 3-bit g128 asym with act-order, keeping each linear's fake-quantized weight."""
    seen = {}
    settings = QuantizeSettings(bits=3, group_size=128, sym=False, act_order=True, **SMALL)
    result = run(plan(tiny_models_dir, "tiny", "tiny-3bit", settings),
                 on_module=lambda name, q: seen.__setitem__(name, q.weight.clone()))
    return result.output, seen


def test_checkpoint_matches_the_format(quantized):
    out, _ = quantized
    assert _listing(out) == {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json",
                             "tokenizer_config.json", "generation_config.json", "chat_template.jinja"}
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["quant_method"] == "gptq" and qc["bits"] == 3 and qc["group_size"] == 128
    assert qc["desc_act"] is True and qc["sym"] is False and qc["checkpoint_format"] == "gptq_v2"
    assert qc["meta"]["quantizer"][0].startswith("gptq-webui:")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == qc and config["num_hidden_layers"] == 2
    t = _tensors(out / "model.safetensors")
    G = 5  # K=576, g=128
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for name, (K, N) in LINEARS.items():
            base = p + name
            expected |= {f"{base}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")}
            groups = -(-K // 128)
            assert t[f"{base}.qweight"].dtype == torch.int32 and t[f"{base}.qweight"].shape == (K * 3 // 32, N)
            assert t[f"{base}.qzeros"].dtype == torch.int32 and t[f"{base}.qzeros"].shape == (groups, N * 3 // 32)
            assert t[f"{base}.scales"].dtype == torch.float16 and t[f"{base}.scales"].shape == (groups, N)
            assert t[f"{base}.g_idx"].dtype == torch.int32 and t[f"{base}.g_idx"].shape == (K,)
    assert set(t) == expected
    assert t["model.embed_tokens.weight"].dtype == torch.float16
    assert G == 5


def test_dequantized_checkpoint_equals_the_fake_quantized_weights(quantized):
    out, seen = quantized
    t = _tensors(out / "model.safetensors")
    assert len(seen) == 14
    for name, fake in seen.items():
        W = gptq_format.dequantize(t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"],
                                   t[f"{name}.g_idx"], 3, "gptq_v2")
        assert torch.equal(W.T, fake), name
    g_idx = t["model.layers.0.self_attn.q_proj.g_idx"]
    assert not bool((g_idx[1:] >= g_idx[:-1]).all())  # act-order without static groups


def test_symmetric_checkpoint_stores_v1_zeros(tiny_models_dir):
    # act-order asked along (the Quantize tab's default) but meaningless to round-to-nearest: not claimed
    settings = QuantizeSettings(method="rtn", act_order=True, static_groups=True, **SMALL)
    result = run(plan(tiny_models_dir, "tiny", "tiny-4bit-rtn", settings))
    t = _tensors(result.output / "model.safetensors")
    qzeros = t["model.layers.1.mlp.down_proj.qzeros"]
    assert bool((qzeros == 0x77777777).all())  # z - 1 = 7 in every 4-bit field
    config = json.loads((result.output / "quantize_config.json").read_text())
    assert config["checkpoint_format"] == "gptq"
    assert config["desc_act"] is False and config["static_groups"] is False
    g_idx = t["model.layers.0.self_attn.q_proj.g_idx"]
    assert bool((g_idx[1:] >= g_idx[:-1]).all())


def test_static_groups_keep_g_idx_plain_and_do_not_claim_desc_act(tiny_models_dir):
    """Loaders take their slower act-order paths on desc_act; with static groups g_idx is k // group_size."""
    settings = QuantizeSettings(act_order=True, static_groups=True, **SMALL)
    result = run(plan(tiny_models_dir, "tiny", "tiny-4bit-static", settings))
    config = json.loads((result.output / "quantize_config.json").read_text())
    assert config["desc_act"] is False and config["static_groups"] is True and config["meta"]["act_order"] is True
    t = _tensors(result.output / "model.safetensors")
    for name, g_idx in t.items():
        if name.endswith(".g_idx"):
            assert torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=g_idx.dtype) // 128), name
    from backends.model_info import describe
    assert describe(result.output, "gptq") == "4-bit g128, act-order, static groups"


def test_the_cli_quantizes_with_act_order_and_static_groups_unless_told_not_to():
    """The Quantize tab's defaults: plain GPTQ loses to round-to-nearest on the default model."""
    from quantizer.__main__ import build_parser
    parse = build_parser().parse_args
    plain = parse(["quantize", "m", "--out", "o"])
    assert plain.act_order is True and plain.static_groups is True
    off = parse(["quantize", "m", "--out", "o", "--no-act-order", "--no-static-groups"])
    assert off.act_order is False and off.static_groups is False


@pytest.mark.parametrize("changes,message", [
    (dict(bits=5), "bits must be one of 2, 3, 4, 8"),
    (dict(group_size=0), "group size must be -1"),
    (dict(nsamples=0), "nsamples must be a positive number"),
    (dict(damp=0.0), "damp must be in"),
    (dict(calib="no-such-source"), "neither one of generated, builtin"),
])
def test_bad_settings_write_nothing(tiny_models_dir, changes, message):
    before = _listing(tiny_models_dir)
    jobs = JobManager()
    with pytest.raises((ValueError, BackendError), match=message):
        start_quantize(jobs, tiny_models_dir, "tiny", "new-model", QuantizeSettings(**{**SMALL, **changes}))
    assert _listing(tiny_models_dir) == before and not jobs.jobs()


@pytest.mark.parametrize("out,message", [
    ("tiny", "already exists"),
    ("../escape", "plain folder name"),
    ("/tmp/abs", "plain folder name"),
    ("a/b", "plain folder name"),
    (".hidden", "plain folder name"),
    ("", "give the output model a name"),
])
def test_bad_output_names_write_nothing(tiny_models_dir, out, message):
    before = _listing(tiny_models_dir)
    with pytest.raises(BackendError, match=message):
        plan(tiny_models_dir, "tiny", out, QuantizeSettings(**SMALL))
    assert _listing(tiny_models_dir) == before


def test_bad_sources_write_nothing(tiny_models_dir, tmp_path):
    before = _listing(tiny_models_dir)
    with pytest.raises(BackendError, match="outside the models folder"):
        plan(tiny_models_dir, "../x", "new-model", QuantizeSettings(**SMALL))
    nosafe = tiny_models_dir / "no-safetensors"
    nosafe.mkdir()
    (nosafe / "config.json").write_text((tiny_models_dir / "tiny" / "config.json").read_text())
    (nosafe / "pytorch_model.bin").write_bytes(b"not loaded")
    try:
        with pytest.raises(BackendError, match="no .safetensors weights"):
            plan(tiny_models_dir, "no-safetensors", "new-model", QuantizeSettings(**SMALL))
        config = json.loads((nosafe / "config.json").read_text())
        config["model_type"] = "gpt2"
        (nosafe / "config.json").write_text(json.dumps(config))
        with pytest.raises(BackendError, match="architecture 'gpt2' is not supported"):
            plan(tiny_models_dir, "no-safetensors", "new-model", QuantizeSettings(**SMALL))
        # the same config reader as the engines: one message for a broken config.json
        (nosafe / "config.json").write_text("{nope")
        with pytest.raises(BackendError, match="no-safetensors/config.json is not valid JSON"):
            plan(tiny_models_dir, "no-safetensors", "new-model", QuantizeSettings(**SMALL))
    finally:
        for f in nosafe.iterdir():
            f.unlink()
        nosafe.rmdir()
    assert _listing(tiny_models_dir) == before


@pytest.mark.parametrize("content,message", [
    (b"", "holds no text"),
    (b"\x00\x01\x02\xff\xfe binary", "not UTF-8|binary"),
    (b"   \n\n  ", "holds no text"),
])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_bad_calibration_files_are_refused_before_the_job(tiny_models_dir, tmp_path, content, message, suffix):
    calib = tmp_path / f"calib{suffix}"
    calib.write_bytes(content)
    before = _listing(tiny_models_dir)
    jobs = JobManager()
    with pytest.raises(BackendError, match=message.replace("holds no text", "holds no (text|records)")):
        start_quantize(jobs, tiny_models_dir, "tiny", "from-bad-file", QuantizeSettings(**{**SMALL, "calib": str(calib)}))
    assert _listing(tiny_models_dir) == before and not jobs.jobs()


def test_a_job_failing_before_any_layer_leaves_nothing(tiny_models_dir, tmp_path):
    """A text too short for one window is only found out while drawing windows, inside the job."""
    calib = tmp_path / "short.txt"
    calib.write_text("Only a few words here.")
    before = _listing(tiny_models_dir)
    jobs = JobManager()
    job = start_quantize(jobs, tiny_models_dir, "tiny", "from-short-file", QuantizeSettings(**{**SMALL, "calib": str(calib)}))
    job.wait()
    assert job.status == "failed" and "needs more than seqlen=64" in job.error
    assert _listing(tiny_models_dir) == before


def test_cancel_leaves_no_partial_model(tiny_models_dir):
    jobs = JobManager(sample_interval=0.2)
    before = _listing(tiny_models_dir)
    job = start_quantize(jobs, tiny_models_dir, "tiny4", "cancelled", QuantizeSettings(**SMALL))
    deadline = time.time() + 120
    while not any(e.get("kind") == "layer_done" for e in list(job.events)) and time.time() < deadline:
        time.sleep(0.05)
    job.cancel()
    assert job.wait(60)
    assert job.status == "cancelled"
    layers_done = sum(1 for e in job.events if e.get("kind") == "layer_done")
    assert layers_done < 4  # it stopped within the layer it was in
    assert _listing(tiny_models_dir) == before
    names = {m.name for m in ModelManager(tiny_models_dir).list_models()}
    assert "cancelled" not in names and not any(n.startswith("cancelled") for n in names)


def _cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "quantizer", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_failure_ends_with_one_error_line(tiny_models_dir, tmp_path):
    """A job that fails (here: calibration text shorter than one sample) exits 1 and says why once, last."""
    short = tmp_path / "short.txt"
    short.write_text("Hello world. This is a tiny calibration file.\n")
    proc = _cli("quantize", "tiny4", "--models-dir", str(tiny_models_dir), "--nsamples", "4", "--seqlen", "64",
                "--calib", str(short), "--out", "never-written")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the calibration text has only" in errors[0], err
    assert err.strip().splitlines()[-1] == errors[0]
    assert not (tiny_models_dir / "never-written").exists()


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_checkpoint(tiny_models_dir):
    common = ["quantize", "tiny4", "--models-dir", str(tiny_models_dir), "--nsamples", "4", "--seqlen", "64",
              "--bits", "4"]  # the defaults: generated calibration text, act-order with static groups
    proc = _cli(*common, "--out", "resumed")
    state = tiny_models_dir / "resumed.partial" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                if json.loads(state.read_text())["finished"] >= 2:
                    break
            except (ValueError, KeyError):
                pass
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tiny_models_dir / "resumed").exists()
    assert "resumed" not in {m.name for m in ModelManager(tiny_models_dir).list_models()}
    finished = json.loads(state.read_text())["finished"]
    assert 2 <= finished < 4

    again = _cli(*common, "--out", "resumed")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 2 and "--resume" in err          # refuses to silently overwrite
    resumed = _cli(*common, "--out", "resumed", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed after layer {finished}" in out
    assert not (tiny_models_dir / "resumed.partial").exists()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI ran (OMP_NUM_THREADS=1): same float sums, same act-order ties
    try:
        reference = run(plan(tiny_models_dir, "tiny4", "uninterrupted",
                             QuantizeSettings(bits=4, act_order=True, static_groups=True, nsamples=4, seqlen=64,
                                              calib="generated")))
    finally:
        torch.set_num_threads(threads)
    a = _tensors(tiny_models_dir / "resumed" / "model.safetensors")
    b = _tensors(reference.output / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_eval_cli_prints_ppl_last(quantized, tiny_models_dir, wikitext_path):
    out, _ = quantized
    proc = _cli("eval", out.name, "--models-dir", str(tiny_models_dir), "--backend", "dequantized",
                "--dataset", "wikitext2", "--seqlen", "64", "--windows", "2")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("ppl ")
    ppl = float(last.split()[1])
    assert "2 windows" in stderr
    from quantizer.evaluation import load_eval_text, perplexity
    from quantizer.reference import DequantizedGPTQBackend
    backend = DequantizedGPTQBackend()
    backend.load(out, backend.validate_options({"dtype": "float32", "device": "cpu"}))
    expected = perplexity(backend, load_eval_text("wikitext2"), 64, 2).ppl
    backend.unload()
    assert ppl == pytest.approx(expected, rel=1e-4)

    bad = _cli("eval", "../nowhere", "--models-dir", str(tiny_models_dir), "--seqlen", "64")
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "outside the models folder" in err


def test_activations_spilled_to_disk_give_the_same_checkpoint(tiny_models_dir, monkeypatch):
    settings = QuantizeSettings(bits=4, **SMALL)
    in_ram = run(plan(tiny_models_dir, "tiny", "act-in-ram", settings))
    assert in_ram.activations == "cpu"
    spilled_dirs = []
    import quantizer.activations as activations
    original = activations.ActivationStore.__init__

    def spy(self, *args, **kw):
        original(self, *args, **kw)
        spilled_dirs.append(self._dir)

    monkeypatch.setattr("quantizer.pipeline.choose_location", lambda nbytes, device: "disk")
    monkeypatch.setattr(activations.ActivationStore, "__init__", spy)
    on_disk = run(plan(tiny_models_dir, "tiny", "act-on-disk", settings))
    assert on_disk.activations == "disk"
    assert spilled_dirs and all(d is not None and not d.exists() for d in spilled_dirs)  # cleaned up
    assert _listing(on_disk.output) == _listing(in_ram.output)
    a, b = _tensors(in_ram.output / "model.safetensors"), _tensors(on_disk.output / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_large_checkpoints_are_sharded_per_layer(tiny_models_dir, monkeypatch):
    settings = QuantizeSettings(method="rtn", **SMALL)
    merged = run(plan(tiny_models_dir, "tiny", "rtn-merged", settings))
    monkeypatch.setattr("quantizer.pipeline.MERGE_LIMIT_BYTES", 0)
    sharded = run(plan(tiny_models_dir, "tiny", "rtn-sharded", settings))
    index = json.loads((sharded.output / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["weight_map"]["model.layers.1.mlp.down_proj.qweight"] == shards[1]
    assert index["weight_map"]["model.embed_tokens.weight"] == shards[2]
    a = _tensors(merged.output / "model.safetensors")
    b = {}
    for shard in shards:
        b.update(_tensors(sharded.output / shard))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(gptq_format.find_weight_files(sharded.output)) == [sharded.output / s for s in shards]


def test_the_gptq_backend_reads_our_checkpoint_like_the_reference(quantized):
    """3-bit, asymmetric (gptq_v2), act-order: the gptq engine and the dequantized reference agree."""
    from backends.registry import create_backend
    from quantizer.reference import DequantizedGPTQBackend
    out, _ = quantized
    ids = list(range(100, 164))
    reference = DequantizedGPTQBackend()
    reference.load(out, reference.validate_options({"dtype": "float32", "device": "cpu"}))
    expected = reference.token_logprobs(ids)
    reference.unload()
    engine = create_backend("gptq")
    engine.load(out, engine.validate_options({"cpu_int4": "off"}))  # the exact CPU path: the fp32 copy
    got = engine.token_logprobs(ids)
    engine.unload()
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-3)
    engine.load(out, engine.validate_options({}))  # the default: 64 tokens through the int4 kernel, from bf16
    assert {layer.path for layer in engine.quant_layers.values()} == {"torch-int4"}
    fast = engine.token_logprobs(ids)
    engine.unload()
    assert fast == pytest.approx(expected, rel=3e-2) and fast != pytest.approx(expected, rel=1e-4)


def test_each_layer_reports_where_its_time_went(tiny_models_dir):
    """Every finished layer records seconds per stage (state.json, the layer_done event, the CLI
    table); the stages are parts of the layer's wall time and the Hessian accumulation is a part of
    the forwards that feed it."""
    events = []
    result = run(plan(tiny_models_dir, "tiny", "tiny-timed", QuantizeSettings(**SMALL)), report=events.append)
    done = [e for e in events if e.get("kind") == "layer_done"]
    assert len(done) == len(result.layers) == 2
    for entry, event in zip(result.layers, done):
        timing = entry["timing"]
        assert event["timing"] == timing
        assert set(timing) == {"load", "forward_hessian", "hessian", "quantize", "forward_out", "pack_save"}
        assert all(v >= 0 for v in timing.values())
        assert timing["forward_hessian"] > 0 and timing["quantize"] > 0 and timing["forward_out"] > 0
        assert 0 < timing["hessian"] <= timing["forward_hessian"] + 1e-3
        parts = sum(v for k, v in timing.items() if k != "hessian")
        assert parts <= entry["seconds"] + 0.01
        # and each linear's own seconds are within the quantize stage
        assert sum(m["seconds"] for m in entry["modules"].values()) <= timing["quantize"] + 0.01


def test_true_sequential_passes_reuse_stored_activations_exactly(tiny_models_dir, monkeypatch):
    """The passes that start from the stored attention output or residual (instead of running the
    whole layer again) give the same checkpoint, bit for bit, as whole-layer passes; so does the
    residual-only form used where o_proj's input is not hidden-sized. And they skip the attention:
    counted here as attention forwards that run to completion."""
    import dataclasses
    import quantizer.layers as layers
    from transformers.models.llama import modeling_llama
    completed = []
    attention_forward = modeling_llama.LlamaAttention.forward

    def counting(self, *args, **kwargs):
        out = attention_forward(self, *args, **kwargs)
        completed.append(1)
        return out

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", counting)
    settings = QuantizeSettings(bits=4, group_size=128, true_sequential=True, batch_size=2, **SMALL)
    llama = layers.ARCHS["llama"]
    results, attention_runs = {}, {}
    for name, arch in (("reuse-all", llama), ("reuse-residual", dataclasses.replace(llama, o_proj=None)),
                       ("reuse-none", dataclasses.replace(llama, post_norm=None, mlp=None))):
        monkeypatch.setitem(layers.ARCHS, "llama", arch)
        completed.clear()
        results[name] = _tensors(run(plan(tiny_models_dir, "tiny", name, settings)).output / "model.safetensors")
        attention_runs[name] = len(completed)
    a = results["reuse-none"]
    for name in ("reuse-all", "reuse-residual"):
        b = results[name]
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, (name, different[:5])
    # per layer (2) and batch (2 of 2 samples each): whole-layer passes finish the attention in the
    # gate/up, down and output passes (3), the residual-only form in the gate/up pass (1), full reuse never
    assert attention_runs == {"reuse-none": 2 * 2 * 3, "reuse-residual": 2 * 2 * 1, "reuse-all": 0}
