"""llama.cpp engine through llama-cpp-python (GGUF files). Tokens come from the low-level
`Llama.generate` iterator, so token counts, Stop and stop strings work exactly as for torch engines.
Perplexity uses the logits of every position of a batch (not `create_completion(echo=True)`,
which is slow and skips BOS)."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from backends.base import (Backend, BackendError, Capabilities, GenerationChunk, MemoryReport,
                           OptionSpec, SamplingParams, TokenScore)
from backends.logit_adjustments import LogitAdjustments
from backends.process_memory import resident_bytes
from backends.text_stream import IncrementalDecoder, StopStringFilter

# llama.cpp's OpenMP workers spin while waiting; on a shared machine that starves everyone
# (observed: 100 -> 1 token/s on 2 cores). Must be set before the library is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

GGUF_MAGIC = b"GGUF"


def default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1)) if (os.cpu_count() or 1) > 2 else 1


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        formats=("gguf",),
        options=(
            OptionSpec("n_ctx", "int", 4096, help="context length in tokens (0 = the model's own)", minimum=0),
            OptionSpec("n_gpu_layers", "int", 0, help="layers offloaded to the GPU (-1 = all)", minimum=-1),
            OptionSpec("n_threads", "int", 0, help="CPU threads (0 = cores - 1, at least 1)", minimum=0),
            OptionSpec("n_batch", "int", 512, help="prompt batch size", minimum=1, maximum=8192),
        ),
    )

    def __init__(self):
        self.llm = None
        self.path: Path | None = None
        self._ram_mb = 0.0

    def load(self, path: Path, options: dict) -> None:
        self.path = Path(path)
        _check_gguf(self.path)
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise BackendError(f"llama-cpp-python is not installed ({exc}); run ./start.sh to install it") from None
        threads = options.get("n_threads") or default_threads()
        before = resident_bytes()
        try:
            self.llm = Llama(model_path=str(self.path), n_ctx=int(options.get("n_ctx", 4096)),
                             n_gpu_layers=int(options.get("n_gpu_layers", 0)), n_threads=threads,
                             n_threads_batch=threads, n_batch=int(options.get("n_batch", 512)),
                             logits_all=False, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"llama.cpp could not load {self.path.name}: {exc}") from None
        self._ram_mb = max(0.0, (resident_bytes() - before) / 2**20)

    def unload(self) -> None:
        if self.llm is not None:
            try:
                self.llm.close()
            except Exception:
                pass
        self.llm = None

    def _require(self):
        if self.llm is None:
            raise BackendError("the model is not loaded")

    def memory_report(self) -> MemoryReport:
        self._require()
        file_mb = self.path.stat().st_size / 2**20
        n_params = _n_params(self.llm)
        bpw = (self.path.stat().st_size * 8 / n_params) if n_params else None
        offload = int(self.llm.model_params.n_gpu_layers)
        n_layers = int(self.llm.metadata.get(f"{self._arch()}.block_count", 0) or 0)
        gpu_fraction = 0.0 if offload == 0 or not n_layers else min(1.0, (n_layers if offload < 0 else offload) / n_layers)
        # weights are memory-mapped: the file pages count as RAM once touched
        ram = max(self._ram_mb, file_mb * (1 - gpu_fraction))
        return MemoryReport(ram_mb=ram, gpu_mb=file_mb * gpu_fraction, file_mb=file_mb, bits_per_weight=bpw)

    def _arch(self) -> str:
        return str(self.llm.metadata.get("general.architecture", "llama"))

    # -- text ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        self._require()
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        self._require()
        return self.llm.detokenize(list(ids), special=special).decode("utf-8", errors="replace")

    @property
    def context_length(self) -> int:
        self._require()
        return int(self.llm.n_ctx())

    def chat_template(self) -> str | None:
        self._require()
        return self.llm.metadata.get("tokenizer.chat_template")

    def _token_text(self, token_id: int) -> str | None:
        if token_id is None or token_id < 0:
            return None
        return self.llm._model.token_get_text(token_id)

    def special_tokens(self) -> dict:
        self._require()
        return {"bos_token": self._token_text(self.llm.token_bos()),
                "eos_token": self._token_text(self.llm.token_eos())}

    # -- generation ------------------------------------------------------------------------
    def generate_ids(self, ids: Sequence[int], params: SamplingParams,
                     stop_event: threading.Event | None = None) -> Iterator[GenerationChunk]:
        self._require()
        params = params.validated()
        ids = [int(t) for t in ids]
        self.check_token_ids(ids)
        self.check_token_ids([t for t, _ in params.logit_bias])
        if not ids:
            raise BackendError("the prompt is empty")
        n_prompt, n_ctx = len(ids), self.context_length
        if n_prompt >= n_ctx:
            raise BackendError(f"the prompt has {n_prompt} tokens but the context holds {n_ctx}: "
                               "shorten it (refused, not truncated)")
        budget = min(params.max_new_tokens, n_ctx - n_prompt)
        if params.seed is not None:
            self.llm.set_seed(int(params.seed))
        self._prime(ids)
        decoder = IncrementalDecoder(lambda t: self.llm.detokenize(t).decode("utf-8", errors="replace"))
        stops = StopStringFilter(params.stop)
        generated, reason = 0, "length"
        adjustments = LogitAdjustments(params, ids)     # llama.cpp's own penalties stay off (repeat_penalty 1)
        scratch = np.empty((1, self.llm.n_vocab()), dtype=np.float32) if params.logprobs is not None else None
        tokens = self.llm.generate(
            ids, top_k=params.top_k if params.top_k > 0 else 0, top_p=params.top_p, min_p=params.min_p,
            temp=params.temperature, repeat_penalty=1.0, reset=True,
            logits_processor=[_processor(adjustments)] if adjustments.active else None)
        try:
            for token in tokens:
                if stop_event is not None and stop_event.is_set():
                    reason = "cancelled"
                    break
                if self.is_end_of_generation(int(token)):
                    reason = "stop"
                    break
                generated += 1
                adjustments.accept(int(token))
                # the logits it was sampled from are still the context's last row (nothing evaluated since)
                scores = ((self._last_row_score(int(token), params.logprobs, scratch),)
                          if params.logprobs is not None else ())
                delta, hit = stops.feed(decoder.push(int(token)))
                yield GenerationChunk(delta, n_prompt, generated, token_ids=(int(token),), scores=scores)
                if hit:
                    reason = "stop"
                    break
                if generated >= budget:
                    break
        finally:
            tokens.close()
        tail = stops.flush()
        if tail and reason != "stop":
            yield GenerationChunk(tail, n_prompt, generated)
        yield GenerationChunk("", n_prompt, generated, finished=True, finish_reason=reason)

    def _last_row_score(self, token: int, top: int, scratch: np.ndarray) -> TokenScore:
        """TokenScore of `token` from the logits of the last evaluated position, as _scored_rows scores
        every row (`scratch`: a reused 1 x vocabulary buffer)."""
        n_vocab = self.llm.n_vocab()
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(1, n_vocab))
        chosen, best, best_values = _score_rows(logits, [token], min(top, n_vocab), scratch)
        alternatives = tuple(zip(best[0].tolist(), best_values[0].tolist())) if best is not None else ()
        return TokenScore(token, float(chosen[0]), alternatives).drawn_first()

    def _prime(self, ids: list[int]) -> None:
        """Leave the KV cache holding exactly ids[:-1] (reusing what it already holds of them), so that
        llama-cpp-python's generate always evaluates the prompt's last token on its own. Why: generate
        reuses a cached prefix, and then evaluates the last token alone instead of inside the prompt's
        batch; llama.cpp's batched and single-token kernels round differently, and on the default model
        that flips a near-tie (the same request answered "The capital of France is Paris." once and
        "La femme de France..." the next time, seeded sampling too). One path for both: the same
        request gives the same answer, whatever the cache held before."""
        llm = self.llm
        prefix = ids[:-1]
        cached = list(llm._input_ids[: llm.n_tokens])
        keep = 0
        for a, b in zip(cached, prefix):
            if a != b:
                break
            keep += 1
        if keep < llm.n_tokens:
            if keep == 0 or not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
                llm.reset()
                llm._ctx.kv_cache_clear()
                keep = 0
            else:
                llm.n_tokens = keep
        if keep < len(prefix):
            llm.eval(prefix[keep:])

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp
        self._require()
        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    # -- scoring ---------------------------------------------------------------------------
    def check_token_ids(self, ids: Sequence[int]) -> None:
        """llama.cpp aborts the whole process on an id outside the vocabulary."""
        self._require()
        n_vocab = self.llm.n_vocab()
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise BackendError(f"token id {bad} is outside this model's vocabulary (0 to {n_vocab - 1})")

    def _scored_rows(self, ids: list[int], top: int, next_token: bool = False):
        """(log p of each next token, ids and log p of the `top` best tokens) for positions 0..n-2 (0..n-1
        with `next_token`, whose token is the row's most likely one), a few rows at a time: `ids`
        evaluated batch by batch, asking llama.cpp for the logits of every position, read in place. The
        float32 exp goes into one reused buffer and is summed in float64: fresh arrays of batch x
        vocabulary floats cost as much as the model's own evaluation here (page faults; bench.scoring_speed)."""
        self.check_token_ids(ids)
        if len(ids) > self.context_length:
            raise BackendError(f"{len(ids)} tokens exceed the context of {self.context_length}")
        llm = self.llm
        llm.reset()
        llm._ctx.kv_cache_clear()
        n_vocab = llm.n_vocab()
        n_batch = llm.n_batch
        rows_at_once = 32
        scratch = np.empty((rows_at_once, n_vocab), dtype=np.float32)
        k = min(top, n_vocab)
        try:
            wanted_rows = len(ids) if next_token else len(ids) - 1   # without it the last id predicts nothing
            for start in range(0, wanted_rows, n_batch):
                batch = ids[start:start + n_batch]
                llm._batch.set_batch(batch=batch, n_past=start, logits_all=True)
                llm._ctx.decode(llm._batch)
                rows = min(len(batch), wanted_rows - start)
                all_logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch) * n_vocab,))
                all_logits = all_logits.reshape(len(batch), n_vocab)
                for first in range(0, rows, rows_at_once):
                    logits = all_logits[first:min(rows, first + rows_at_once)]
                    targets = ids[start + first + 1:start + first + 1 + len(logits)]
                    if len(targets) < len(logits):                  # the position after the last id
                        targets = targets + [int(logits[-1].argmax())]
                    yield (targets, *_score_rows(logits, targets, k, scratch))
        finally:
            llm.reset()

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        self._require()
        ids = [int(t) for t in ids]
        if len(ids) < 2:
            return []
        out: list[float] = []
        for _, chosen, _, _ in self._scored_rows(ids, 0):
            out += chosen.tolist()
        return out

    def score_tokens(self, ids: Sequence[int], top: int = 0, next_token: bool = False) -> list[TokenScore]:
        self._require()
        ids = [int(t) for t in ids]
        if len(ids) < (1 if next_token else 2):
            return []
        scores = []
        for targets, chosen, best, best_values in self._scored_rows(ids, top, next_token):
            for row, token in enumerate(targets):
                alternatives = tuple(zip(best[row].tolist(), best_values[row].tolist())) if best is not None else ()
                scores.append(TokenScore(token, float(chosen[row]), alternatives))
        return scores


def _score_rows(logits: np.ndarray, targets: Sequence[int], k: int, scratch: np.ndarray):
    """(log p of each row's target, ids and log p of each row's k best tokens or None) for rows of
    logits: the float32 exp goes into `scratch` (at least as many rows) and is summed in float64."""
    n = len(logits)
    peak = logits.max(axis=1)
    shifted = np.subtract(logits, peak[:, None], out=scratch[:n])
    np.exp(shifted, out=shifted)
    logz = np.log(shifted.sum(axis=1, dtype=np.float64)) + peak
    here = np.arange(n)
    chosen = logits[here, list(targets)].astype(np.float64) - logz
    if k <= 0:
        return chosen, None, None
    best = np.argpartition(logits, -k, axis=1)[:, -k:]
    values = logits[here[:, None], best]
    order = np.argsort(-values, axis=1, kind="stable")
    best = np.take_along_axis(best, order, axis=1)
    return chosen, best, np.take_along_axis(values, order, axis=1).astype(np.float64) - logz[:, None]


def _processor(adjustments: LogitAdjustments):
    """llama-cpp-python's logits processor form of the shared adjustments (numpy rows in and out)."""
    def process(_input_ids, logits: np.ndarray) -> np.ndarray:
        return adjustments.apply(torch.from_numpy(logits.copy())).numpy()
    return process


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise BackendError(f"{path.name} is not a file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise BackendError(f"{path.name} is not a GGUF file (bad magic {magic!r})")
    try:
        from gguf import GGUFReader
        GGUFReader(str(path))
    except Exception as exc:
        raise BackendError(f"{path.name} is a corrupt or truncated GGUF file: {type(exc).__name__}: {exc}") from None


def _n_params(llm) -> int:
    try:
        return int(llm._model.n_params())
    except Exception:
        return 0
