"""Completions that need more than streamed text: log-probs of the reply's tokens (chat `logprobs`,
completions `logprobs: n`), the prompt scored and echoed (`echo`, `max_tokens: 0`), token-id prompts,
batches of prompts and several choices per prompt (`n`): what lm-evaluation-harness's
`local-completions` model sends.

The reply is generated as usual (streamed by the engine under the model's lock), then the prompt and
the reply are scored in one forward pass: the log-probs are the model's own distribution, before
temperature, top-k/top-p or repetition penalty (as vLLM reports them by default)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

from backends.base import Backend, GenerationChunk, SamplingParams, TokenScore
from backends.text_stream import IncrementalDecoder


@dataclass
class ScoredRequest:
    """One /v1/completions or chat request on this path: what to run, and each prompt's result."""
    model_id: str
    prompts: list                 # strings, or lists of token ids; for chat one list of messages
    chat: bool
    params: SamplingParams
    generate: bool                # False: max_tokens 0, the prompt is only scored
    top: int | None               # alternatives per token; None: no log-probs
    echo: bool
    n: int = 1                    # choices per prompt (in prompt order: prompt i's are i*n .. i*n+n-1)
    results: list = field(default_factory=list)


@dataclass
class PromptResult:
    prompt_text: str              # the prompt as text when echoed, else ""
    text: str = ""                # the reply
    finish_reason: str = "length"
    generated: int = 0            # tokens in the reply
    tokens: list[dict] = field(default_factory=list)   # per reported token: piece, logprob, top


def scored_work(manager, request: ScoredRequest) -> Callable[[threading.Event], Iterator[GenerationChunk]]:
    """The worker for run_queued: yields the engine's chunks (the queue's records and cancellation use
    them), fills request.results, and ends with one chunk that totals every prompt."""
    def work(stop: threading.Event) -> Iterator[GenerationChunk]:
        total_prompt = total_generated = 0
        reason = "length"
        prompts = request.prompts
        if request.chat:
            prompts = [manager.call(request.model_id, lambda backend: backend.render_chat(prompts[0]))]
        # every prompt checked before any work: a bad token id in the last one costs nothing
        all_ids = manager.call(request.model_id, lambda backend: [_prompt_ids(backend, p) for p in prompts])
        for prompt, ids in zip(prompts, all_ids):
            total_prompt += len(ids)                       # counted once however many choices (as OpenAI)
            for copy in range(request.n):
                if stop.is_set():
                    reason = "cancelled"
                    break
                if _one_greedy_token(request):      # the scoring pass picks the token: no second pass
                    result = manager.call(request.model_id,
                                          lambda backend: _score_one_greedy_token(backend, prompt, ids, request))
                    request.results.append(result)
                    total_generated += result.generated
                    reason = result.finish_reason
                    continue
                generated: list[int] = []
                text: list[str] = []
                last = None
                if request.generate:
                    params = _copy_params(request.params, copy)
                    for chunk in manager.generate_ids(request.model_id, ids, params, stop):
                        generated.extend(chunk.token_ids)
                        text.append(chunk.text)
                        last = chunk
                        yield chunk
                reason = last.finish_reason if last is not None else "length"
                if reason == "cancelled":
                    break
                result = manager.call(request.model_id,
                                      lambda backend: _describe(backend, prompt, ids, generated, request))
                result.text, result.finish_reason = "".join(text), reason
                request.results.append(result)
                total_generated += result.generated
            if reason == "cancelled":
                break
        yield GenerationChunk("", total_prompt, total_generated, finished=True, finish_reason=reason)
    return work


def _one_greedy_token(request: ScoredRequest) -> bool:
    """What lm-evaluation-harness asks for every loglikelihood request (echo, logprobs, max_tokens 1,
    temperature 0): the greedy token is the best one of the scoring pass's last row, so generating it
    first would evaluate the whole prompt twice."""
    params = request.params
    return (request.generate and request.top is not None and params.max_new_tokens == 1
            and params.temperature == 0 and params.repetition_penalty == 1.0 and not params.stop)


def _score_one_greedy_token(backend: Backend, prompt, ids: list[int], request: ScoredRequest) -> PromptResult:
    scores = backend.score_tokens(ids, request.top, next_token=True)
    token = scores[-1].token
    if backend.is_end_of_generation(token):          # the reply ends before its first token, as generation would
        return _describe(backend, prompt, ids, [], request, scores[:-1], finish_reason="stop")
    result = _describe(backend, prompt, ids, [token], request, scores)
    result.text = IncrementalDecoder(backend.detokenize).push(token)     # as the streamed reply decodes it
    return result


def _copy_params(params: SamplingParams, copy: int) -> SamplingParams:
    """Choice `copy` of n: seed + copy when seeded, so choice 0 is the n = 1 reply of the same seed and the
    others differ from it; unseeded choices draw afresh anyway."""
    if params.seed is None or copy == 0:
        return params
    return replace(params, seed=(params.seed + copy) % 2**32)


def _prompt_ids(backend: Backend, prompt) -> list[int]:
    if isinstance(prompt, str):
        return backend.tokenize(prompt, add_special=False)
    backend.check_token_ids(prompt)
    return list(prompt)


def _describe(backend: Backend, prompt, ids: list[int], generated: list[int], request: ScoredRequest,
              scores: list[TokenScore] | None = None, finish_reason: str = "length") -> PromptResult:
    """Score (unless `scores` are given) and name the reported tokens (the prompt's too when echoed),
    under the model's lock."""
    prompt_pieces = _pieces(backend, ids) if request.echo else []
    echoed = (prompt if isinstance(prompt, str) else "".join(prompt_pieces)) if request.echo else ""
    result = PromptResult(echoed, finish_reason=finish_reason, generated=len(generated))
    if request.top is None:
        return result
    if scores is None:
        scores = backend.score_tokens(ids + generated, request.top)   # positions 1..n-1
    names: dict[int, str] = {}

    def name(token: int) -> str:
        if token not in names:
            names[token] = backend.detokenize([token], special=True)
        return names[token]

    def entry(piece: str, score: TokenScore | None) -> dict:
        if score is None:                        # the first token: nothing before it to condition on
            return {"token": piece, "logprob": None, "top": None}
        return {"token": piece, "logprob": score.logprob, "top": [(name(t), lp) for t, lp in score.top]}

    result.tokens += [entry(piece, scores[i - 1] if i else None) for i, piece in enumerate(prompt_pieces)]
    reply_scores = scores[len(ids) - 1:]
    result.tokens += [entry(piece, score) for piece, score in zip(_pieces(backend, generated), reply_scores)]
    return result


def _pieces(backend: Backend, ids: Sequence[int]) -> list[str]:
    """Each token's share of the sequence's text, decoded in context (special tokens written out): the
    pieces join to the text; a token that ends inside a character gets "" and the next one carries it."""
    decoder = IncrementalDecoder(lambda part: backend.detokenize(part, special=True))
    return [decoder.push(int(t)) for t in ids]


# -- the OpenAI shapes ----------------------------------------------------------------------------
def completion_logprobs(tokens: list[dict], start: int = 0) -> dict:
    """Legacy completions shape: tokens, token_logprobs, top_logprobs (a dict holding the alternatives
    and the chosen token: up to n+1 entries, as OpenAI's), text_offset."""
    offsets, position = [], start
    for token in tokens:
        offsets.append(position)
        position += len(token["token"])
    tops = []
    for token in tokens:
        if token["top"] is None:
            tops.append(None)
            continue
        top = {}
        for piece, logprob in token["top"]:
            top.setdefault(piece, logprob)
        top.setdefault(token["token"], token["logprob"])
        tops.append(top)
    return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokens: list[dict]) -> dict:
    """Chat shape: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    def item(piece: str, logprob: float) -> dict:
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}
    return {"content": [{**item(t["token"], t["logprob"]), "top_logprobs": [item(p, lp) for p, lp in t["top"]]}
                        for t in tokens], "refusal": None}
