"""score_tokens (what the API's log-probs come from) on the real engines: the chosen tokens' log-probs
are the perplexity path's numbers, the alternatives are the best tokens in order, and a greedy reply's
tokens are each the best one exactly (lm-evaluation-harness compares them with ==)."""
from __future__ import annotations

import pytest

from backends.base import BackendError, SamplingParams

TEXT = "The capital of France is Paris. The capital of Germany is Berlin, and the capital of"


@pytest.fixture(params=["transformers_backend", "llamacpp_backend"])
def engine(request):
    return request.getfixturevalue(request.param)


def test_scores_match_token_logprobs_and_alternatives_are_ranked(engine):
    ids = engine.tokenize(TEXT)
    scores = engine.score_tokens(ids, top=5)
    assert [s.token for s in scores] == ids[1:]
    assert [s.logprob for s in scores] == pytest.approx(engine.token_logprobs(ids), abs=1e-6)
    for score in scores:
        values = [lp for _, lp in score.top]
        assert len(score.top) == 5 and values == sorted(values, reverse=True) and values[0] <= 0
        assert len({t for t, _ in score.top}) == 5
        assert score.logprob <= values[0]
        if score.token in dict(score.top):
            assert dict(score.top)[score.token] == score.logprob
        else:
            assert score.logprob <= values[-1]
    assert engine.score_tokens(ids, top=0)[3].top == ()
    assert engine.score_tokens(ids[:1]) == []


def test_a_greedy_reply_is_the_best_token_at_every_step(engine):
    ids = engine.tokenize(TEXT)
    chunks = list(engine.generate_ids(ids, SamplingParams(temperature=0, max_new_tokens=6)))
    reply = [t for c in chunks for t in c.token_ids]
    assert len(reply) == chunks[-1].generated_tokens == 6
    assert engine.detokenize(reply) == "".join(c.text for c in chunks)
    for score in engine.score_tokens(ids + reply, top=1)[len(ids) - 1:]:
        assert score.top[0] == (score.token, score.logprob)


def test_generation_scores_each_token_from_its_own_step(engine):
    """SamplingParams.logprobs: every chunk carries its token's log-prob and alternatives, read from the
    logits the token was drawn from. A greedy token is the best one at every step (exactly, on every
    engine: a second scoring pass over the reply cannot promise that on llama.cpp, whose batched and
    one-token kernels round differently); the numbers are the scoring pass's (close on llama.cpp); and
    asking for them changes no sampled token."""
    ids = engine.tokenize(TEXT)
    chunks = list(engine.generate_ids(ids, SamplingParams(temperature=0, max_new_tokens=8, logprobs=3)))
    reply = [t for c in chunks for t in c.token_ids]
    steps = [s for c in chunks for s in c.scores]
    assert [s.token for s in steps] == reply and len(reply) == 8
    for step in steps:
        assert step.top[0] == (step.token, step.logprob) and len(step.top) == 3
        assert [lp for _, lp in step.top] == sorted((lp for _, lp in step.top), reverse=True)
    passed = engine.score_tokens(ids + reply, top=3)[len(ids) - 1:]
    close = 1e-4 if engine.name == "transformers" else 0.5
    assert [s.logprob for s in steps] == pytest.approx([s.logprob for s in passed], abs=close)
    sampled = SamplingParams(temperature=1.0, seed=5, max_new_tokens=8)
    plain = list(engine.generate_ids(ids, sampled))
    scored = list(engine.generate_ids(ids, SamplingParams(temperature=1.0, seed=5, max_new_tokens=8, logprobs=0)))
    assert [c.token_ids for c in scored] == [c.token_ids for c in plain]
    assert all(s.top == () and s.logprob <= 0 for c in scored for s in c.scores)
    assert all(c.scores == () for c in plain)


def test_penalties_and_logit_bias_change_what_each_step_picks(engine):
    """OpenAI's presence and frequency penalties count the reply's tokens so far and logit_bias adds to a
    token's logit, before the token is picked: every greedy step picks the best of its own step's
    log-probs (the model's unchanged distribution) after exactly those changes, on every engine."""
    ids = engine.tokenize("Paris, Paris, Paris, Paris, Paris, Paris, Paris, Paris,")   # a reply that repeats
    plain = [t for c in engine.generate_ids(ids, SamplingParams(max_new_tokens=10)) for t in c.token_ids]
    assert len(set(plain)) <= 4, plain                                  # the premise: penalties will bite
    banned, boosted = engine.tokenize(" France")[0], engine.tokenize(" London")[0]
    bias = {banned: -100.0, boosted: 1.5}
    params = SamplingParams(max_new_tokens=10, presence_penalty=1.5, frequency_penalty=0.75,
                            logit_bias=tuple(bias.items()), logprobs=20)
    steps = [s for c in engine.generate_ids(ids, params) for s in c.scores]
    reply = [s.token for s in steps]
    assert len(steps) == 10 and banned not in reply and reply != plain
    counts: dict[int, int] = {}
    for step in steps:
        adjusted = {t: lp + bias.get(t, 0.0) - 0.75 * counts.get(t, 0) - (1.5 if counts.get(t) else 0.0)
                    for t, lp in step.top}
        assert step.token == max(adjusted, key=adjusted.get)
        counts[step.token] = counts.get(step.token, 0) + 1
    forced = engine.tokenize(" banana")[0]
    chunks = list(engine.generate_ids(ids, SamplingParams(max_new_tokens=3, logit_bias=((forced, 100.0),))))
    assert [t for c in chunks for t in c.token_ids] == [forced] * 3
    with pytest.raises(BackendError, match="token id 10000000 is outside"):
        list(engine.generate_ids(ids, SamplingParams(max_new_tokens=1, logit_bias=((10_000_000, 1.0),))))


def test_the_repetition_penalty_covers_the_prompt_on_every_engine(engine):
    """HF's and vLLM's repetition penalty counts the prompt's tokens too. llama.cpp's own counts only the
    last 64 tokens it sampled, so there a prompt that repeats a word was not penalized: the first tokens
    of the reply still repeated it (seen: ' Paris,\nParis-Lille' at 2.0, where transformers answers
    '\nBarcelona-Ceiba'). Every engine now penalizes it from the first token."""
    ids = engine.tokenize("Paris, Paris, Paris, Paris, Paris, Paris, Paris, Paris,")
    paris = engine.tokenize(" Paris")[0]
    plain = [t for c in engine.generate_ids(ids, SamplingParams(max_new_tokens=4)) for t in c.token_ids]
    assert plain[0] == paris                                            # the premise
    penalized = [t for c in engine.generate_ids(ids, SamplingParams(max_new_tokens=4, repetition_penalty=2.0))
                 for t in c.token_ids]
    assert paris not in penalized and engine.tokenize(",")[0] not in penalized


def test_ids_outside_the_vocabulary_are_refused_by_name(engine):
    ids = engine.tokenize(TEXT)
    with pytest.raises(BackendError, match="token id 10000000 is outside"):
        engine.score_tokens(ids + [10_000_000])
    with pytest.raises(BackendError, match="token id -1 is outside"):
        list(engine.generate_ids([-1] + ids, SamplingParams(max_new_tokens=1)))
    assert engine.score_tokens(ids, top=1)          # still usable


def test_next_token_is_the_greedy_reply_and_scoring_is_unchanged(engine):
    ids = engine.tokenize(TEXT)
    plain = engine.score_tokens(ids, top=3)
    with_next = engine.score_tokens(ids, top=3, next_token=True)
    assert len(with_next) == len(ids) and with_next[:-1] == plain
    last = with_next[-1]
    assert last.top[0] == (last.token, last.logprob)
    chunks = list(engine.generate_ids(ids, SamplingParams(temperature=0, max_new_tokens=1)))
    assert chunks[0].token_ids == (last.token,)
    assert engine.score_tokens(ids[:1], top=1, next_token=True)[0].token == engine.score_tokens(ids[:2], 1)[0].top[0][0]


def test_end_of_generation_tokens(engine):
    assert engine.is_end_of_generation(engine.tokenize("<|im_end|>")[0])
    assert not engine.is_end_of_generation(engine.tokenize(" Paris")[0])
