"""The streamed sampling loop shared by every torch engine (transformers, bitsandbytes, gptq), so
that sampling, stop handling and token counting behave identically across them."""
from __future__ import annotations

import threading
from typing import Callable, Iterator, Sequence

import torch

from backends.base import BackendError, GenerationChunk, SamplingParams, TokenScore
from backends.growing_cache import growing_cache
from backends.logit_adjustments import LogitAdjustments
from backends.text_stream import IncrementalDecoder, StopStringFilter


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from a 1-D logits row: greedy at temperature 0, else top-k, top-p and
    min-p filtering on the temperature-scaled distribution."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def stream_generate(model, prompt_ids: list[int], params: SamplingParams, *,
                    eos_ids: set[int], decode: Callable[[Sequence[int]], str], device: torch.device,
                    context_length: int, stop_event: threading.Event | None = None,
                    forward: Callable | None = None, pipeline: bool | None = None) -> Iterator[GenerationChunk]:
    """Yield one GenerationChunk per produced token (text may be empty while a character is being
    completed) and a final chunk with `finished=True` and the reason.
    `pipeline` (default: on for CUDA): greedy decoding launches the next step with the token still on
    the device, before the host reads it, so the GPU does not wait for the host's per-token work (a
    7B 4-bit step is ~2.3 ms of GPU time against ~0.13 ms of host work between steps). A reply that
    ends on an end-of-sequence token or a stop string has computed one step more; on a CPU that step
    would cost its full time, so the pipeline is off there."""
    params = params.validated()
    if not prompt_ids:
        raise BackendError("the prompt is empty")
    check_token_ids(model, prompt_ids)
    check_token_ids(model, [t for t, _ in params.logit_bias])
    n_prompt = len(prompt_ids)
    if n_prompt >= context_length:
        raise BackendError(f"the prompt has {n_prompt} tokens but the context holds {context_length}: "
                           "shorten it (refused, not truncated)")
    budget = min(params.max_new_tokens, context_length - n_prompt)
    generator = None
    if params.seed is not None and params.temperature > 0:
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
    step = forward or _default_forward(model)
    decoder = IncrementalDecoder(decode)
    generated = 0
    reason = "length"
    stops = StopStringFilter(params.stop)
    adjustments = LogitAdjustments(params, prompt_ids)
    greedy = params.temperature <= 0 and not adjustments.active
    if pipeline is None:
        pipeline = torch.device(device).type == "cuda"
    pending = None  # the next step, launched before the host has read the token it is fed
    with torch.inference_mode():
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        logits, cache = step(input_ids, None)
        while generated < budget:
            if stop_event is not None and stop_event.is_set():
                reason = "cancelled"
                break
            scored = None
            if greedy:  # argmax where the logits are: one scalar crosses to the host, not the vocabulary
                token_on_device = logits[0, -1].argmax().reshape(1, 1)
                # the row copied before the next step rewrites a graph's logits; scored after that step is
                # queued, so the GPU runs the scoring behind it instead of waiting for its launches
                row = logits[0, -1].to(torch.float32, copy=True) if params.logprobs is not None else None
                if pipeline and generated + 1 < budget:
                    pending = step(token_on_device, cache)
                if row is not None:
                    scored = step_scores(row, token_on_device.reshape(()), params.logprobs)
                token = int(token_on_device)
            else:
                row = logits[0, -1].float().cpu()
                if params.logprobs is not None:   # the model's distribution, before penalty and temperature
                    row_scores = torch.log_softmax(row, dim=-1)
                row = adjustments.apply(row)
                token = sample_next(row, params, generator)
                if params.logprobs is not None:
                    scored = step_scores(row_scores, torch.tensor(token), params.logprobs, normalized=True)
            if token in eos_ids:
                reason = "stop"
                break
            generated += 1
            adjustments.accept(token)
            delta, hit = stops.feed(decoder.push(token))
            yield GenerationChunk(delta, n_prompt, generated, token_ids=(token,),
                                  scores=(score_of(token, scored),) if scored is not None else ())
            if hit:
                reason = "stop"
                break
            if generated >= budget:
                break
            if pending is not None:
                (logits, cache), pending = pending, None
            else:
                logits, cache = step(torch.tensor([[token]], dtype=torch.long, device=device), cache)
    tail = stops.flush()
    if tail and reason != "stop":
        yield GenerationChunk(tail, n_prompt, generated)
    yield GenerationChunk("", n_prompt, generated, finished=True, finish_reason=reason)


def step_scores(row: torch.Tensor, token: torch.Tensor, top: int, normalized: bool = False) -> torch.Tensor:
    """One step's scores packed in one tensor (log p of `token`, the `top` best log-probs, their ids as
    floats: exact below 2**24) and, from a GPU, queued for the host in one non-blocking copy: read with
    score_of once the stream has synchronized (the loop reads the token first), it costs no sync of its own."""
    if not normalized:
        row = torch.log_softmax(row.float(), dim=-1)
    chosen = row.index_select(0, token.reshape(1).to(row.device))   # (row[token] would sync: item())
    if top > 0:
        values, indices = row.topk(min(top, row.shape[-1]))
        chosen = torch.cat([chosen, values, indices.to(row.dtype)])
    return chosen.to("cpu", non_blocking=True) if chosen.is_cuda else chosen


def score_of(token: int, packed: torch.Tensor) -> TokenScore:
    values = packed.tolist()
    k = (len(values) - 1) // 2
    top = tuple((int(t), v) for t, v in zip(values[1 + k:], values[1:1 + k]))
    return TokenScore(token, values[0], top).drawn_first()


def cache_keyword(model) -> str:
    """The name a model's forward takes its KV cache under: `cache` from transformers 5.2x on, where
    `past_key_values` is deprecated (removed in 5.40), `past_key_values` before (5.17 has no `cache`)."""
    import inspect
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under whichever name this transformers gives it."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set(out.keys())
    return getattr(out, "cache") if "cache" in names else out.past_key_values


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a sequence: the generation config's, the model config's and the tokenizer's."""
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _default_forward(model, grow_in_place: bool = True):
    """The model's own forward over a cache that grows in place (backends.growing_cache: no copy of the
    whole cache per step, as DynamicCache's concatenation makes; off, the model's own cache)."""
    keyword = cache_keyword(model)

    def step(input_ids, cache):
        if cache is None and grow_in_place:
            cache = growing_cache(model)
        out = model(input_ids=input_ids, use_cache=True, **{keyword: cache})
        return out.logits, returned_cache(out)
    return step


def greedy_logits(step, prompt_ids: Sequence[int], steps: int, device=None, extra: Sequence[int] = (),
                  tokens: Sequence[int] | None = None) -> torch.Tensor:
    """Float logits at the last position of the prompt and of `steps` greedy steps through
    step(input_ids, cache) (this module's step protocol), then of one multi-token step of `extra`
    when given: how decoding paths (static cache, graphs, routed kernels) are compared to each other.
    `tokens` feeds those tokens instead of each step's argmax (teacher forcing): on near-flat logits
    (random weights) two correct paths pick different tokens after a rounding difference, and their
    logits are only comparable on the same inputs."""
    out = []
    with torch.inference_mode():
        logits, cache = step(torch.tensor([list(prompt_ids)], device=device), None)
        out.append(logits[0, -1].float())
        for i in range(steps):
            token = int(tokens[i]) if tokens is not None else int(out[-1].argmax())
            logits, cache = step(torch.tensor([[token]], device=device), cache)
            out.append(logits[0, -1].float())
        if extra:
            logits, cache = step(torch.tensor([list(extra)], device=device), cache)
            out.append(logits[0, -1].float())
    return torch.stack(out)


def check_token_ids(model, ids: Sequence[int]) -> None:
    """Token ids from outside (the API takes token arrays) must name rows of the embedding: an id past
    the end would fail deep inside the forward with an index error instead of a sentence."""
    vocab = model.get_input_embeddings().num_embeddings
    bad = next((t for t in ids if not 0 <= int(t) < vocab), None)
    if bad is not None:
        raise BackendError(f"token id {bad} is outside this model's vocabulary (0 to {vocab - 1})")


def _logprob_chunks(model, ids: Sequence[int], device: torch.device, chunk: int, next_token: bool = False):
    """(log_softmax rows, target ids) of positions 0..n-2 (0..n-1 with `next_token`, whose last target is
    the row's most likely token), a chunk of positions at a time, so the float copy of the logits never
    holds more than `chunk` rows of the vocabulary."""
    check_token_ids(model, ids)
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
    logits = model(input_ids=input_ids, use_cache=False).logits[0]
    if not next_token:
        logits = logits[:-1]
    targets = input_ids[0, 1:]
    for start in range(0, logits.shape[0], chunk):
        rows = torch.log_softmax(logits[start:start + chunk].float(), dim=-1)
        wanted = targets[start:start + chunk]
        if len(wanted) < len(rows):                     # the position after the last id: its best token
            wanted = torch.cat([wanted, rows[-1].argmax().reshape(1)])
        yield rows, wanted


def token_logprobs(model, ids: Sequence[int], device: torch.device, chunk: int = 4096) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 from one forward pass over the sequence."""
    if len(ids) < 2:
        return []
    with torch.inference_mode():
        out = [rows.gather(1, targets[:, None])[:, 0] for rows, targets in _logprob_chunks(model, ids, device, chunk)]
        return torch.cat(out).double().cpu().tolist()


def score_tokens(model, ids: Sequence[int], device: torch.device, top: int = 0, next_token: bool = False,
                 chunk: int = 4096) -> list[TokenScore]:
    """token_logprobs with the `top` most likely tokens of each position (and, with `next_token`, the
    position after the last id). The chosen token's log-prob and the alternatives' come from the same
    float32 row, so a greedy token equals the best one exactly (what lm-evaluation-harness's is-greedy
    check compares)."""
    if len(ids) < (1 if next_token else 2):
        return []
    scores: list[TokenScore] = []
    with torch.inference_mode():
        for rows, targets in _logprob_chunks(model, ids, device, chunk, next_token):
            chosen = rows.gather(1, targets[:, None])[:, 0].cpu().tolist()
            if top > 0:
                values, indices = rows.topk(min(top, rows.shape[1]), dim=1)
                values, indices = values.cpu().tolist(), indices.cpu().tolist()
            for i, token in enumerate(targets.cpu().tolist()):
                best = tuple(zip(indices[i], values[i])) if top > 0 else ()
                scores.append(TokenScore(token, chosen[i], best))
    return scores
