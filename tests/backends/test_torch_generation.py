"""The generation loop shared by the torch backends: greedy decoding pipelined (the next step launched
with the token still on the device, before the host reads it) gives the same tokens and stops at the same
place as the step-by-step loop; it only computes one step more when the reply ends on EOS."""
from __future__ import annotations

import pytest
import torch

from backends import torch_generation
from backends.base import SamplingParams


def _run(model, pipeline, max_new=12, eos=()):
    calls = []
    inner = torch_generation._default_forward(model)

    def step(input_ids, cache):
        calls.append(input_ids.reshape(-1).tolist())
        return inner(input_ids, cache)

    chunks = list(torch_generation.stream_generate(
        model, [5, 17, 42, 7], SamplingParams(temperature=0.0, max_new_tokens=max_new), eos_ids=set(eos),
        decode=lambda ids: "".join(chr(65 + i % 26) for i in ids), device=torch.device("cpu"),
        context_length=128, forward=step, pipeline=pipeline))
    return "".join(c.text for c in chunks), chunks[-1], calls


def test_pipelined_greedy_gives_the_same_reply(tiny_llama):
    text, last, calls = _run(tiny_llama, pipeline=False)
    text_p, last_p, calls_p = _run(tiny_llama, pipeline=True)
    assert text_p == text and len(text) == 12
    assert (last_p.finish_reason, last_p.generated_tokens) == (last.finish_reason, last.generated_tokens) == ("length", 12)
    assert calls_p == calls and len(calls) == 12  # the prompt and 11 steps: no step past the budget


def test_pipelined_greedy_stops_on_eos_after_one_extra_step(tiny_llama):
    _, _, calls = _run(tiny_llama, pipeline=False)
    eos = calls[4][0]  # the 4th generated token (each step's input is the token before it)
    if eos in [c[0] for c in calls[1:4]]:
        pytest.fail("the random model repeats a token early; pick another seed")
    text, last, calls_s = _run(tiny_llama, pipeline=False, eos=[eos])
    text_p, last_p, calls_p = _run(tiny_llama, pipeline=True, eos=[eos])
    assert text_p == text and len(text) == 3
    assert last_p.finish_reason == last.finish_reason == "stop"
    assert len(calls_s) == 4 and calls_p == calls_s + [[eos]]  # the step fed the EOS token ran, unused


def test_the_cache_goes_under_the_installed_transformers_own_name(tiny_llama):
    """transformers 5.2x renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40;
    5.17, on the GPU machine, has only the old one): the loop must use the model's own name and read the
    returned cache without a deprecation warning, or it breaks on the next upgrade."""
    import inspect
    import logging
    import warnings
    keyword = torch_generation.cache_keyword(tiny_llama)
    assert keyword in inspect.signature(tiny_llama.forward).parameters
    step = torch_generation._default_forward(tiny_llama)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    once = getattr(logging.Logger, "warning_once", None)  # transformers warns once per process:
    if hasattr(once, "cache_clear"):  # forget earlier tests' warnings so this one sees its own
        once.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            with torch.inference_mode():
                logits, cache = step(torch.tensor([[5, 17, 42]]), None)
                logits2, cache2 = step(torch.tensor([[7]]), cache)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "deprecated" in r.getMessage()], [r.getMessage() for r in records]
    assert cache2 is cache and cache.get_seq_length() == 4  # the cache was carried, not rebuilt
    assert logits2.shape == (1, 1, 320)


def test_a_drawn_token_tied_with_the_best_is_listed_first():
    """fp16 logits tie often on a GPU (the H100 smoke run met it): argmax may draw the second of two equal
    tokens while top-k lists the first, and the reply would read as not greedy."""
    from backends.base import TokenScore
    tied = TokenScore(2, -0.5, ((1, -0.5), (2, -0.5), (0, -1.0)))
    assert tied.drawn_first().top == ((2, -0.5), (1, -0.5), (0, -1.0))
    outside = TokenScore(7, -0.5, ((1, -0.5), (2, -0.5)))            # tied but cut from the top-k
    assert outside.drawn_first().top == ((7, -0.5), (1, -0.5))
    for kept in (TokenScore(1, -0.5, ((1, -0.5), (2, -0.5))), TokenScore(3, -2.0, ((1, -0.5), (3, -2.0))),
                 TokenScore(3, -2.0)):
        assert kept.drawn_first() == kept


def test_pipelined_log_probs_are_read_before_the_next_step_rewrites_the_logits(tiny_llama):
    """A CUDA graph writes every step's logits into one buffer, and the pipelined loop launches the next
    step before the host reads the token: a step's log-probs must be taken first, or they would be the
    next step's. Here a step copies its logits into one reused buffer, as a graph does."""
    inner = torch_generation._default_forward(tiny_llama)
    buffer = {}

    def graph_like(input_ids, cache):
        logits, cache = inner(input_ids, cache)
        out = buffer.setdefault("logits", torch.empty_like(logits[:, -1:]))
        out.copy_(logits[:, -1:])
        return out, cache

    def run(pipeline):
        return list(torch_generation.stream_generate(
            tiny_llama, [5, 17, 42, 7], SamplingParams(temperature=0.0, max_new_tokens=8, logprobs=2), eos_ids=set(),
            decode=lambda ids: "".join(chr(65 + i % 26) for i in ids), device=torch.device("cpu"),
            context_length=128, forward=graph_like, pipeline=pipeline))
    stepwise, pipelined = run(False), run(True)
    assert [c.scores for c in pipelined] == [c.scores for c in stepwise]
    steps = [s for c in pipelined for s in c.scores]
    assert len(steps) == 8 and all(s.top[0] == (s.token, s.logprob) for s in steps)
