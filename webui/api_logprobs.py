"""Completions that need more than streamed text: log-probs of the reply's tokens (chat `logprobs`,
completions `logprobs: n`, streamed or not), the prompt scored and echoed (`echo`, `max_tokens: 0`),
token-id prompts, batches of prompts and several choices per prompt (`n`): what lm-evaluation-harness's
`local-completions` model sends.

A reply token's log-probs are those of the step that produced it (the engine reads the logits it
sampled from: no second pass, the same numbers streamed or not, and a greedy token is always the
best one). An echoed prompt is scored in one forward pass. Both are the model's own distribution,
before temperature, top-k/top-p or repetition penalty (as vLLM reports them by default)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

from backends.base import Backend, GenerationChunk, SamplingParams, TokenScore
from backends.text_stream import IncrementalDecoder


@dataclass
class ScoredRequest:
    """One /v1/completions or chat request on this path: what to run."""
    model_id: str
    prompts: list                 # strings, or lists of token ids; for chat one list of messages
    chat: bool
    params: SamplingParams
    generate: bool                # False: max_tokens 0, the prompt is only scored
    top: int | None               # alternatives per token; None: no log-probs
    echo: bool
    n: int = 1                    # choices per prompt (in prompt order: prompt i's are i*n .. i*n+n-1)


@dataclass
class PromptResult:
    prompt_text: str              # the prompt as text when echoed, else ""
    text: str = ""                # the reply
    finish_reason: str = "length"
    generated: int = 0            # tokens in the reply
    tokens: list[dict] = field(default_factory=list)   # per reported token: piece, logprob, top


@dataclass
class ChoiceChunk(GenerationChunk):
    """A piece of one choice of a request, as the API sends it (streamed, or gathered into one reply):
    its new text, the echoed prompt first when asked, its tokens' log-probs named (TokenNamer.entry
    dicts), and the choice's finish reason on its last piece."""
    index: int = 0
    tokens: list[dict] = field(default_factory=list)
    echo: str = ""
    choice_end: str | None = None


class TokenNamer:
    """Names scored tokens as the API reports them: reply or prompt tokens as their share of its text
    (decoded in context, special tokens written out: the pieces join to the text, and a token that
    ends inside a character gets "" and the next one carries it), alternatives on their own. Runs
    where the engine may be used: under the model's lock."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._names: dict[int, str] = {}
        self._decoder = self._fresh_decoder()

    def _fresh_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(lambda part: self.backend.detokenize(part, special=True))

    def name(self, token: int) -> str:
        if token not in self._names:
            self._names[token] = self.backend.detokenize([token], special=True)
        return self._names[token]

    def next_piece(self, token: int) -> str:
        """The next token of the sequence this namer follows (a streamed reply)."""
        return self._decoder.push(int(token))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        decoder = self._fresh_decoder()
        return [decoder.push(int(t)) for t in ids]

    def entry(self, piece: str, score: TokenScore | None) -> dict:
        if score is None:                        # a prompt's first token: nothing before it to condition on
            return {"token": piece, "logprob": None, "top": None}
        return {"token": piece, "logprob": score.logprob, "top": [(self.name(t), lp) for t, lp in score.top]}

    def named(self, scores: Sequence[TokenScore]) -> list[dict]:
        """The next tokens of the followed reply, with their scores."""
        return [self.entry(self.next_piece(s.token), s) for s in scores]


def scored_work(manager, request: ScoredRequest) -> Callable[[threading.Event], Iterator[GenerationChunk]]:
    """The worker for run_queued: yields each choice's pieces (ChoiceChunk, in choice order), and ends with
    one GenerationChunk that totals every prompt (the queue's records and the usage read it)."""
    def work(stop: threading.Event) -> Iterator[GenerationChunk]:
        total_prompt = total_generated = 0
        reason = "length"
        prompts = request.prompts
        if request.chat:
            prompts = [manager.call(request.model_id, lambda backend: backend.render_chat(prompts[0]))]
        # every prompt checked before any work: a bad token id in the last one costs nothing
        all_ids = manager.call(request.model_id, lambda backend: [_prompt_ids(backend, p) for p in prompts])
        for number, (prompt, ids) in enumerate(zip(prompts, all_ids)):
            total_prompt += len(ids)                       # counted once however many choices (as OpenAI)
            echoed: PromptResult | None = None             # the scored prompt, shared by its n choices
            for copy in range(request.n):
                index = number * request.n + copy
                if stop.is_set():
                    reason = "cancelled"
                    break
                if _one_greedy_token(request):      # the scoring pass picks the token: no second pass
                    result = manager.call(request.model_id,
                                          lambda backend: _score_one_greedy_token(backend, prompt, ids, request))
                    total_generated += result.generated
                    reason = result.finish_reason
                    yield ChoiceChunk(result.text, total_prompt, total_generated, index=index, tokens=result.tokens,
                                      echo=result.prompt_text, choice_end=reason)
                    continue
                if echoed is None:
                    echoed = manager.call(request.model_id,
                                          lambda backend: _describe_prompt(backend, prompt, ids, request))
                yield ChoiceChunk("", total_prompt, total_generated, index=index, tokens=list(echoed.tokens),
                                  echo=echoed.prompt_text)
                reason = "length"
                if request.generate:
                    namer = TokenNamer(manager.get(request.model_id).backend)  # used under the generation's lock
                    params = replace(_copy_params(request.params, copy), logprobs=request.top)
                    for chunk in manager.generate_ids(request.model_id, ids, params, stop):
                        if chunk.finished:           # (no break: the engine's generator must end to unlock)
                            reason = chunk.finish_reason or "length"
                            total_generated += chunk.generated_tokens
                            continue
                        tokens = namer.named(chunk.scores) if request.top is not None else []
                        yield ChoiceChunk(chunk.text, total_prompt, total_generated + chunk.generated_tokens,
                                          token_ids=chunk.token_ids, index=index, tokens=tokens)
                if reason == "cancelled":
                    break
                yield ChoiceChunk("", total_prompt, total_generated, index=index, choice_end=reason)
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
    echoed = _describe_prompt(backend, prompt, ids, request, scores[:-1])
    if backend.is_end_of_generation(token):          # the reply ends before its first token, as generation would
        return _describe_reply(backend, echoed, [], [], request, finish_reason="stop")
    result = _describe_reply(backend, echoed, [token], scores[-1:], request)
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


def _describe_prompt(backend: Backend, prompt, ids: list[int], request: ScoredRequest,
                     scores: list[TokenScore] | None = None) -> PromptResult:
    """The echoed prompt's text and scored tokens (scored in one pass unless `scores` are given), under
    the model's lock; an empty result without echo."""
    if not request.echo:
        return PromptResult("")
    namer = TokenNamer(backend)
    pieces = namer.pieces(ids)
    result = PromptResult(prompt if isinstance(prompt, str) else "".join(pieces))
    if request.top is not None:
        if scores is None:
            scores = backend.score_tokens(ids, request.top)     # positions 1..n-1
        result.tokens = [namer.entry(piece, scores[i - 1] if i else None) for i, piece in enumerate(pieces)]
    return result


def _describe_reply(backend: Backend, echoed: PromptResult, generated: list[int], scores: list[TokenScore],
                    request: ScoredRequest, finish_reason: str = "length") -> PromptResult:
    """The prompt's result (echoed or empty) with the reply's tokens named beside their step's scores."""
    result = PromptResult(echoed.prompt_text, finish_reason=finish_reason, generated=len(generated),
                          tokens=list(echoed.tokens))
    if request.top is not None:
        namer = TokenNamer(backend)
        result.tokens += [namer.entry(piece, score) for piece, score in zip(namer.pieces(generated), scores)]
    return result


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
