"""The `generated` calibration source: the model writes its own calibration text (the default source).
Tokens follow the model's distribution, are reproducible per seed, never end a sequence early; cancel
stops generation between two tokens; a resumed job reuses the tokens of the killed one."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantizer.estimate import estimate
from quantizer.generated_calibration import generate_tokens
from quantizer.pipeline import GENERATED_TOKENS_FILE, Cancelled, plan, run
from quantizer.settings import QuantizeSettings

SMALL = dict(nsamples=4, seqlen=32, calib="generated")


class StopAfter:
    """should_stop() that turns true on its n-th call, counting every call."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def _generate(source, seed=0, nsamples=3, seqlen=24, should_stop=lambda: False, report=None):
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    events = []
    tokens = generate_tokens(source, tokenizer, nsamples, seqlen, seed, torch.device("cpu"), torch.float32,
                             report or events.append, should_stop, lambda: Cancelled("stop"))
    return tokens, tokenizer, events


def _mean_nll(model, tokens: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(input_ids=tokens).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()


def test_tokens_come_from_the_model_and_repeat_per_seed(tiny_models_dir):
    source = tiny_models_dir / "tiny"
    tokens, tokenizer, events = _generate(source)
    assert tokens.shape == (3, 24) and tokens.dtype == torch.long
    assert int(tokens.max()) < len(tokenizer) and tokenizer.eos_token_id not in tokens
    assert len({tuple(r) for r in tokens.tolist()}) == 3                     # each row its own text
    assert torch.equal(tokens, _generate(source)[0])                         # one seed, one text
    assert not torch.equal(tokens, _generate(source, seed=1)[0])
    assert [e["stage"] for e in events] == ["generating calibration text: 0/3 samples, token 0/24",
                                            "generating calibration text: 3/3 samples, token 24/24"]

    # sampled from the model: the model finds its own text far likelier than random tokens of the vocabulary
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    random_tokens = torch.randint(len(tokenizer), tokens.shape, generator=torch.Generator().manual_seed(0))
    own, noise = _mean_nll(model, tokens), _mean_nll(model, random_tokens)
    print(f"mean NLL: generated {own:.2f}, random tokens {noise:.2f}")
    assert own < 0.6 * noise


def test_cpu_steps_run_over_the_in_place_cache(tiny_models_dir):
    """On a CPU the steps run over backends.growing_cache (the baseline over transformers' own concatenating
    cache), through several regrowths of its buffers (16 positions first, doubling), with the same logits. Sampled text is not compared: on near-flat
    random logits one rounding difference between attention kernels changes every later token."""
    from backends.growing_cache import GrowingLayer
    from quantizer.generated_calibration import _stepper
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models_dir / "tiny"), dtype=torch.float32).eval()
    tokens = torch.randint(3, 1000, (2, 264), generator=torch.Generator().manual_seed(0))
    logits, kinds = {}, {}
    with torch.inference_mode():
        for baseline in (False, True):
            step = _stepper(model, torch.device("cpu"), 264, baseline)
            out, cache = step(tokens[:, :1], None)
            rows = [out[:, -1]]
            for t in range(1, 264):
                out, cache = step(tokens[:, t:t + 1], cache)
                rows.append(out[:, -1])
            logits[baseline], kinds[baseline] = torch.stack(rows), {type(layer) for layer in cache.layers}
            assert cache.get_seq_length() == 264
    assert kinds[False] == {GrowingLayer} and GrowingLayer not in kinds[True]
    assert torch.allclose(logits[False], logits[True], rtol=1e-4, atol=1e-4), (logits[False] - logits[True]).abs().max()


def test_cancel_stops_between_two_tokens(tiny_models_dir):
    stop = StopAfter(5)
    with pytest.raises(Cancelled):
        _generate(tiny_models_dir / "tiny", should_stop=stop)
    assert stop.calls == 5                                                   # nothing ran after the stop


def test_estimate_counts_the_whole_model_for_generation(tiny_models_dir):
    source = tiny_models_dir / "tiny"
    builtin = estimate(source, QuantizeSettings(**{**SMALL, "calib": "builtin"}, device="cpu"))
    generated = estimate(source, QuantizeSettings(**SMALL, device="cpu"))
    model_mb = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 2 ** 20  # fp32 on disk
    assert generated.ram_mb >= builtin.ram_mb - 1 and generated.ram_mb > 700 + model_mb
    assert builtin.generated_tokens == 0 and generated.generated_tokens == 4 * 32
    assert "128 tokens" in generated.markdown() and "calibration text" not in builtin.markdown()


def test_estimate_warns_when_the_model_cannot_be_loaded_whole(tiny_models_dir, monkeypatch):
    """On a machine with 300 MB free (psutil reports a small machine: this one has 24 GB)."""
    import psutil
    from collections import namedtuple
    Memory = namedtuple("Memory", "available free total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(300 * 2 ** 20, 300 * 2 ** 20, 2 ** 30))
    monkeypatch.setattr(psutil, "swap_memory", lambda: Memory(0, 0, 0))
    source = tiny_models_dir / "tiny"
    warned = estimate(source, QuantizeSettings(**SMALL, device="cpu")).warnings
    assert any("loads the whole model" in w and "pick builtin" in w for w in warned), warned
    streamed = estimate(source, QuantizeSettings(**{**SMALL, "calib": "builtin"}, device="cpu")).warnings
    assert not any("loads the whole model" in w for w in streamed)


def test_a_resumed_job_reuses_the_generated_tokens(tiny_models_dir):
    settings = QuantizeSettings(bits=4, **SMALL)
    stop = {"now": False}

    def report(event):  # cancel once the second layer starts: layer 0 is saved
        if event.get("kind") == "layer_start" and event["layer"] == 1:
            stop["now"] = True

    with pytest.raises(Cancelled):
        run(plan(tiny_models_dir, "tiny", "gen-resumed", settings), report=report, should_stop=lambda: stop["now"])
    partial = tiny_models_dir / "gen-resumed.partial"
    saved = partial / GENERATED_TOKENS_FILE
    assert saved.is_file() and json.loads((partial / "state.json").read_text())["finished"] == 1
    with safe_open(str(saved), framework="pt") as fh:
        tokens = fh.get_tensor("tokens")
    assert tokens.shape == (4, 32)

    texts = []
    result = run(plan(tiny_models_dir, "tiny", "gen-resumed", settings, resume=True),
                 report=lambda e: texts.append(e.get("text", "")))
    assert "calibration text: the tokens generated before" in texts
    assert not any("the model generates" in t for t in texts)
    assert GENERATED_TOKENS_FILE not in {p.name for p in result.output.iterdir()}
    qc = json.loads((result.output / "quantize_config.json").read_text())
    assert qc["meta"]["calibration"] == "generated"

    fresh = run(plan(tiny_models_dir, "tiny", "gen-fresh", settings))        # the same tokens: the same model
    with safe_open(str(result.output / "model.safetensors"), framework="pt") as a, \
            safe_open(str(fresh.output / "model.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_a_cancel_while_generating_leaves_nothing(tiny_models_dir):
    calls = StopAfter(3)
    with pytest.raises(Cancelled):
        run(plan(tiny_models_dir, "tiny", "gen-cancelled", QuantizeSettings(bits=4, **SMALL)), should_stop=calls)
    assert not (tiny_models_dir / "gen-cancelled").exists()
    assert not (tiny_models_dir / "gen-cancelled.partial").exists()


def test_generated_is_a_named_source_without_documents():
    from backends.base import BackendError
    from quantizer import calibration
    assert calibration.validate_source("generated") and calibration.describe("Generated") == "generated"
    assert QuantizeSettings().calib == "generated"                           # the default
    with pytest.raises(BackendError, match="the model writes its tokens"):
        calibration.documents("generated")


def test_a_cancel_after_generation_keeps_the_tokens_for_a_resume(tiny_models_dir):
    """Cancelled in the first layer, no layer saved yet: the folder stays, since its tokens cost a generation."""
    settings = QuantizeSettings(bits=4, **SMALL)
    stop = {"now": False}

    def report(event):
        if event.get("kind") == "layer_start" and event["layer"] == 0:
            stop["now"] = True

    with pytest.raises(Cancelled):
        run(plan(tiny_models_dir, "tiny", "gen-early", settings), report=report, should_stop=lambda: stop["now"])
    partial = tiny_models_dir / "gen-early.partial"
    assert json.loads((partial / "state.json").read_text())["finished"] == 0
    assert (partial / GENERATED_TOKENS_FILE).is_file()
    texts = []
    run(plan(tiny_models_dir, "tiny", "gen-early", settings, resume=True), report=lambda e: texts.append(e.get("text", "")))
    assert "calibration text: the tokens generated before" in texts


def test_the_batch_fits_the_memory_left_beside_the_weights():
    """A LLaMA-7B shape at seqlen 2048 holds about 1 GB of fp16 cache a row: on an 80 GB GPU with the 13.5 GB of
    weights loaded, 64 rows would not fit; with little memory left, one row at a time."""
    from quantizer.generated_calibration import batch_rows, row_bytes
    llama7b = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    per_row = row_bytes(llama7b, 2048, 2)
    assert per_row == 2 * 32 * 2049 * 4096 * 2 + 16 * 32000                  # KV cache + fp32 logits copies
    cuda, cpu, gib = torch.device("cuda"), torch.device("cpu"), 2 ** 30
    assert batch_rows(128, cuda, per_row, 66 * gib) == int(0.8 * 66 * gib // per_row) == 52
    assert batch_rows(128, cuda, per_row, 200 * gib) == 64 and batch_rows(128, cpu, per_row, 200 * gib) == 32
    assert batch_rows(16, cuda, per_row, 200 * gib) == 16
    assert batch_rows(128, cuda, per_row, 0.5 * gib) == batch_rows(128, cuda, per_row, -gib) == 1
    gqa = dict(llama7b, num_key_value_heads=8)                                # grouped KV heads: a quarter
    assert row_bytes(gqa, 2048, 2) - 16 * 32000 == (per_row - 16 * 32000) // 4


@pytest.fixture(scope="module")
def random_fp16(tmp_path_factory):
    """A random 2-layer LLaMA in fp16 with the default model's tokenizer (a GPU machine carries only that)."""
    from tests.conftest import save_random_llama
    root = tmp_path_factory.mktemp("gen-cuda")
    save_random_llama(root / "random", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
                      eos_token_id=2, bos_token_id=1)
    return root


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generation_on_the_gpu_loads_straight_onto_it_and_frees_it(random_fp16):
    source = random_fp16 / "random"
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    cuda = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(cuda)
    import psutil
    rss = psutil.Process().memory_info().rss

    def gen(seed, baseline=False):
        return generate_tokens(source, tokenizer, 5, 40, seed, cuda, torch.float16, lambda e: None,
                               lambda: False, lambda: Cancelled("stop"), baseline=baseline)

    tokens = gen(0)
    torch.cuda.synchronize()
    # the first job leaves torch's process-long cuBLAS workspaces (32 MiB on Hopper for each stream cuBLAS
    # ran on: the default one and the graphs' capture stream), not the model: later jobs add nothing
    first = torch.cuda.memory_allocated(cuda) - before
    assert first <= 2 * 32 * 2 ** 20 + 2 ** 20, first
    assert tokens.shape == (5, 40) and tokens.device.type == "cpu" and tokenizer.eos_token_id not in tokens
    assert torch.equal(tokens, gen(0)) and not torch.equal(tokens, gen(1))   # seeded on the GPU too
    eager = gen(0, baseline=True)                                            # bench.generated_speed's baseline
    assert eager.shape == (5, 40) and tokenizer.eos_token_id not in eager
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(cuda) - before - first < 2 ** 20     # the model and its cache are freed
    print(f"RSS grew {(psutil.Process().memory_info().rss - rss) / 2 ** 20:.0f} MB")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_job_on_the_gpu_calibrates_on_generated_text(random_fp16):
    texts = []
    result = run(plan(random_fp16, "random", "random-gptq", QuantizeSettings(bits=4, device="cuda", **SMALL)),
                 report=lambda e: texts.append(e.get("text", "")))
    assert any("tokens of calibration text on cuda" in t for t in texts), texts
    assert result.device.startswith("cuda")
    assert json.loads((result.output / "quantize_config.json").read_text())["meta"]["calibration"] == "generated"
    assert not (random_fp16 / "random-gptq.partial").exists()


def test_a_model_too_big_to_generate_with_names_the_way_out(tiny_models_dir, monkeypatch):
    """Loading the whole model runs out of memory (simulated: this machine has room): the job fails with a
    message that names the sources which stream the model, and leaves no folder behind."""
    from transformers import AutoModelForCausalLM

    def no_room(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_room)
    with pytest.raises(Exception) as failure:
        run(plan(tiny_models_dir, "tiny", "gen-oom", QuantizeSettings(bits=4, device="cpu", **SMALL)))
    assert not isinstance(failure.value, MemoryError)
    assert "out of memory (RAM) while the model wrote its calibration text" in str(failure.value)
    assert "Pick builtin, c4 or a text file" in str(failure.value)
    assert not (tiny_models_dir / "gen-oom").exists() and not (tiny_models_dir / "gen-oom.partial").exists()
