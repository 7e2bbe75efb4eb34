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
