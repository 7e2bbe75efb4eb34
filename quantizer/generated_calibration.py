"""Calibration text the model writes itself (data-free calibration, after LLM-QAT, Liu et al. 2023).

Why: it needs no download and no dataset, and it follows the distribution the model really computes on,
so GPTQ's Hessians see the activations that matter. On the default model (4-bit g128, act-order) it gives
a lower wikitext2 perplexity than C4 calibration and far lower than the builtin prose (bench/RESULTS.md).
Each sequence starts from one random token and continues by plain sampling (temperature 1, no top-k or
top-p) with end-of-sequence tokens barred, so every window is `seqlen` tokens of running text. The
sampling uses its own seeded generator (not torch's global one), so a job is reproducible (on one kind of
device, with one batch width: only a model whose cache crowds memory gets a narrower batch) and does not
disturb other users of the process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import psutil
import torch

from backends.process_memory import release_memory
from backends.torch_generation import _default_forward, eos_ids

PROGRESS_EVERY = 64  # tokens between progress reports
MEMORY_SHARE = 0.8  # of the memory left beside the weights, what one batch's caches and logits may take


def row_bytes(config: dict, seqlen: int, width: int) -> int:
    """What one sequence holds at its longest: its KV cache over `seqlen` + 1 positions in `width`-byte
    elements, and a few fp32 copies of one row of logits (the float copy, softmax and the sampler's)."""
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config.get("num_attention_heads") or 1)
    kv_dim = int(config.get("num_key_value_heads") or heads) * int(config.get("head_dim") or hidden // heads)
    return 2 * layers * (seqlen + 1) * kv_dim * width + 4 * int(config.get("vocab_size") or 32000) * 4


def batch_rows(nsamples: int, device: torch.device, per_row: int, free_bytes: float) -> int:
    """Sequences generated side by side: matmuls want wide batches, the KV cache wants narrow ones. The
    batch also fits the memory left beside the weights (a 7B model at seqlen 2048 holds 1 GB of cache
    a row, so 64 rows would not fit an 80 GB GPU)."""
    fits = int(MEMORY_SHARE * max(free_bytes, 0) // max(per_row, 1))
    return max(1, min(nsamples, 64 if device.type == "cuda" else 32, fits))


def generate_tokens(source: Path, tokenizer, nsamples: int, seqlen: int, seed: int, device: torch.device,
                    dtype: torch.dtype, report: Callable[[dict], None], should_stop: Callable[[], bool],
                    cancelled: Callable[[], BaseException], baseline: bool = False) -> torch.Tensor:
    """[nsamples, seqlen] token ids sampled from the model in `source` (loaded whole, freed at the end).
    `cancelled()` builds the exception raised when `should_stop()` turns true between two tokens. `baseline`
    runs the steps without their speedups, eagerly on a GPU and over a concatenating cache on a CPU
    (bench.generated_speed's baseline)."""
    from transformers import AutoModelForCausalLM
    # on a GPU the weights go straight to it, shard by shard: no whole copy in host memory first
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, trust_remote_code=False,
                                                 low_cpu_mem_usage=True, **placement).eval()
    try:
        vocab = min(len(tokenizer), model.config.vocab_size)
        # end-of-sequence ids are barred: every sequence runs on for its whole window
        barred = torch.tensor(sorted(i for i in eos_ids(model, tokenizer) if i < vocab), dtype=torch.long,
                              device=device)
        special = set(tokenizer.all_special_ids)
        starts = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
        start_rng = torch.Generator().manual_seed(seed)
        sample_rng = torch.Generator(device=device).manual_seed(seed)
        rows = []
        free = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                else psutil.virtual_memory().available)
        per_row = row_bytes(model.config.to_dict(), seqlen, torch.finfo(dtype).bits // 8)
        batch = batch_rows(nsamples, device, per_row, free)
        for done in range(0, nsamples, batch):
            n = min(batch, nsamples - done)
            first = starts[torch.randint(len(starts), (n, 1), generator=start_rng)].to(device)
            rows.append(_sample(_stepper(model, device, seqlen, baseline), first, seqlen, vocab, barred,
                                sample_rng, should_stop, cancelled, lambda step: report({"kind": "stage", "stage": (
                                    f"generating calibration text: {done + n if step == seqlen else done}"
                                    f"/{nsamples} samples, token {step}/{seqlen}")})))
        return torch.cat(rows)
    finally:
        del model
        release_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _stepper(model, device: torch.device, seqlen: int, baseline: bool):
    """The (input_ids, cache) -> (logits, cache) step, one per batch (its cache is the batch's). On a GPU each
    step replays a CUDA graph over a static cache: eager, a 7B step is hundreds of small launches whose host
    time exceeds the weight read many times over. On the CPU the model's own forward over a cache that grows
    in place (a concatenating one copies the whole cache each step: 20% of the time at 512 tokens)."""
    if device.type == "cuda":
        from backends.gptq.cuda_graph import GraphDecoder
        return GraphDecoder(model, device, seqlen + 1, use_graph=not baseline).step
    return _default_forward(model, grow_in_place=not baseline)


@torch.inference_mode()
def _sample(forward, first: torch.Tensor, seqlen: int, vocab: int, barred: torch.Tensor,
            rng: torch.Generator, should_stop, cancelled, progress) -> torch.Tensor:
    """`seqlen` sampled tokens after `first` ([n, 1]) through `forward` and its KV cache, back on the CPU."""
    progress(0)
    logits, cache = forward(first, None)
    tokens = []
    for step in range(seqlen):
        if should_stop():
            raise cancelled()
        logits = logits[:, -1, :vocab].float()
        logits[:, barred] = float("-inf")
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)
        tokens.append(token)
        if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == seqlen:
            progress(step + 1)
        if step + 1 < seqlen:
            logits, cache = forward(token, cache)
    return torch.cat(tokens, dim=1).cpu()
