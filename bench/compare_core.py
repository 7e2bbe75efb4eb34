"""The side-by-side comparison of (model, backend, options) entries, shared by the Compare tab and
`python -m bench.compare`: loading entries together, streaming one chat to all of them at once,
and measuring each one (memory, perplexity, prefill/decode speed, time-to-first-token).

Fairness: every entry is scored by the one perplexity function (`quantizer.evaluation.perplexity`)
with the same text, seqlen and windows, tokenized by the entry's own tokenizer; measurements run one
entry at a time so entries do not steal each other's cores; the streamed chat uses the same sampling
settings and seed for every entry."""
from __future__ import annotations

import csv
import io
import json
import math
import queue
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from backends.base import BackendError, Message, SamplingParams
from backends.process_memory import resident_mb

# The JSON schema of one measured entry (the issue fixes these keys, in this order).
RESULT_KEYS = ("entry", "backend", "bits_per_weight", "file_mb", "ram_mb", "gpu_mb", "ppl",
               "prefill_tok_s", "decode_tok_s", "ttft_s", "error")

Progress = Callable[[float, str], None]


# -- entries ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One thing to compare: a model (file or folder under the models folder) on one backend."""
    backend: str
    path: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.backend}:{self.path}" + (f":{opts}" if opts else "")

    @property
    def options_dict(self) -> dict:
        return dict(self.options)


def parse_options(text: str) -> tuple[tuple[str, str], ...]:
    """"quant=nf4,double_quant=true" -> (("quant", "nf4"), ("double_quant", "true"))."""
    out = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option {part!r} must look like key=value")
        out.append((key.strip(), value.strip()))
    return tuple(out)


def parse_entry(spec: str) -> Entry:
    """BACKEND:PATH[:key=value,...], e.g. `bitsandbytes:models/SmolLM2-135M-Instruct:quant=nf4`."""
    backend, sep, rest = spec.strip().partition(":")
    if not sep or not backend or not rest:
        raise ValueError(f"entry {spec!r} must look like BACKEND:PATH[:key=value,...]")
    path, options = rest, ()
    head, sep, tail = rest.rpartition(":")
    if sep and "=" in tail:
        path, options = head, parse_options(tail)
    if not path:
        raise ValueError(f"entry {spec!r} has no model path")
    return Entry(backend.strip(), path.strip(), options)


# -- loading ---------------------------------------------------------------------------------
def process_rss_mb() -> float:
    return resident_mb()


@dataclass
class Slot:
    """An entry after loading: its model id in the manager, or the error that stopped it."""
    entry: Entry
    model_id: str | None = None
    error: str | None = None
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    load_s: float = 0.0

    @property
    def label(self) -> str:
        return self.entry.label


def load_entries(manager, entries: Sequence[Entry], progress: Progress | None = None) -> list[Slot]:
    """Load every entry into `manager`, one after the other so each one's memory cost (process RSS
    before and after) is its own. An entry that fails keeps its error; the others still load."""
    slots = []
    for index, entry in enumerate(entries):
        if progress:
            progress(index / max(1, len(entries)), f"loading {entry.label}")
        slot = Slot(entry, rss_before_mb=process_rss_mb())
        started = time.perf_counter()
        try:
            backend = None if entry.backend in ("", "auto") else entry.backend
            slot.model_id = manager.load(entry.path, backend, entry.options_dict)
            if backend is None:  # show which engine "auto" picked
                slot.entry = Entry(manager.get(slot.model_id).backend_name, entry.path, entry.options)
        except (BackendError, ValueError) as exc:
            slot.error = str(exc)
        except MemoryError:
            slot.error = f"out of memory while loading {entry.path}"
        except Exception as exc:  # an engine's own failure stays in this entry's column
            slot.error = f"{type(exc).__name__}: {exc}"
        slot.load_s = time.perf_counter() - started
        slot.rss_after_mb = process_rss_mb()
        slots.append(slot)
    if progress:
        progress(1.0, "loaded")
    return slots


def unload_slots(manager, slots: Sequence[Slot]) -> None:
    for slot in slots:
        if slot.model_id:
            try:
                manager.unload(slot.model_id)
            except BackendError:
                pass
            slot.model_id = None


# -- side-by-side streaming -------------------------------------------------------------------
@dataclass
class Column:
    """What one entry's column shows while (and after) it streams."""
    label: str
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    ttft_s: float | None = None
    elapsed_s: float = 0.0
    decode_tok_s: float | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None

    def metrics_line(self) -> str:
        if self.error:
            return "error"
        parts = [f"{self.tokens} tokens"]
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s:.2f} s")
        if self.decode_tok_s is not None:
            parts.append(f"{self.decode_tok_s:.1f} tok/s")
        if self.finished:
            parts.append(f"done ({self.finish_reason})")
        return " · ".join(parts)


def _stream_one(manager, slot: Slot, column: Column, messages: list[Message], params: SamplingParams,
                stop_event: threading.Event, updates: queue.Queue, index: int) -> None:
    started = time.perf_counter()
    first = None
    try:
        for chunk in manager.chat(slot.model_id, messages, params, stop_event):
            now = time.perf_counter()
            if chunk.generated_tokens and first is None:
                first = now
                column.ttft_s = now - started
            column.text += chunk.text
            column.tokens = chunk.generated_tokens
            column.prompt_tokens = chunk.prompt_tokens
            column.elapsed_s = now - started
            if first is not None and column.tokens > 1 and now > first:
                column.decode_tok_s = (column.tokens - 1) / (now - first)
            if chunk.finished:
                column.finished, column.finish_reason = True, chunk.finish_reason
            updates.put(index)
    except BackendError as exc:
        column.error = str(exc)
    except Exception as exc:
        column.error = f"{type(exc).__name__}: {exc}"
    finally:
        column.finished = True
        updates.put(index)
        updates.put(None)


def stream_side_by_side(manager, slots: Sequence[Slot], messages: list[Message], params: SamplingParams,
                        stop_event: threading.Event | None = None, min_interval_s: float = 0.05,
                        histories: Sequence[list[Message]] | None = None) -> Iterator[list[Column]]:
    """Send one chat to every loaded slot at once (one thread each) and yield the columns as they
    change. `histories` (one per slot) are earlier turns each entry had with its own replies; the
    new `messages` follow them. Slots that failed to load show their load error and take no part."""
    params = params.validated()
    if histories is not None and len(histories) != len(slots):
        raise ValueError(f"{len(histories)} histories for {len(slots)} entries")
    stop_event = stop_event or threading.Event()
    columns = [Column(s.label) if s.model_id else Column(s.label, error=s.error or "not loaded", finished=True)
               for s in slots]
    updates: queue.Queue = queue.Queue()
    threads = []
    for index, (slot, column) in enumerate(zip(slots, columns)):
        if column.error:
            continue
        chat = [*histories[index], *messages] if histories is not None else list(messages)
        thread = threading.Thread(target=_stream_one, name=f"compare-{index}", daemon=True,
                                  args=(manager, slot, column, chat, params, stop_event, updates, index))
        threads.append(thread)
    for thread in threads:
        thread.start()
    running, last = len(threads), 0.0
    yield columns
    try:
        while running:
            item = updates.get()
            if item is None:
                running -= 1
            now = time.monotonic()
            if running == 0 or now - last >= min_interval_s:
                last = now
                yield columns
    finally:
        if running:  # the consumer went away: stop the engines rather than leave them generating
            stop_event.set()
        for thread in threads:
            thread.join(timeout=30)
    yield columns


# -- measuring -------------------------------------------------------------------------------
TEXT_SOURCES = ("wikitext2", "c4", "ptb", "builtin")


def eval_text(source: str | Path) -> str:
    """The perplexity text: `wikitext2`, `c4`, `ptb` (the GPTQ protocol of BENCH.md), `builtin`
    (English prose from the Python standard library's docstrings: offline, the same on every run of
    one Python install) or a text file."""
    if str(source).lower() == "builtin":
        from quantizer.calibration import builtin_documents
        return "\n\n".join(builtin_documents())
    from quantizer.evaluation import load_eval_text
    return load_eval_text(source)


@dataclass
class Result:
    entry: str
    backend: str
    bits_per_weight: float | None = None
    file_mb: float | None = None
    ram_mb: float | None = None
    gpu_mb: float | None = None
    ppl: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    ttft_s: float | None = None
    error: str | None = None
    # not part of the JSON schema: shown in the tab and used for the fairness check
    eval_tokens: int | None = field(default=None, repr=False)
    rss_delta_mb: float | None = field(default=None, repr=False)

    def as_json(self) -> dict:
        data = asdict(self)
        return {key: _clean(data[key]) for key in RESULT_KEYS}


def _clean(value):
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    return value


@dataclass(frozen=True)
class MeasureSettings:
    seqlen: int = 512
    windows: int | None = 4
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeats: int = 3

    def validated(self) -> "MeasureSettings":
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.windows is not None and self.windows < 1:
            raise ValueError(f"windows must be at least 1, got {self.windows}")
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.repeats < 1:
            raise ValueError("prompt_tokens >= 1, new_tokens >= 2 and repeats >= 1 are required")
        return self


def throughput(backend, text: str, settings: MeasureSettings,
               should_stop: Callable[[], bool] | None = None) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, TTFT s), medians over `repeats` greedy runs after one warm-up.
    Each run's prompt is a different `prompt_tokens`-token slice of the evaluation text in the
    entry's own vocabulary, so no engine can reuse a cached prefix (llama.cpp would). Prefill
    tok/s = prompt tokens / TTFT (TTFT includes the first sampled token); decode tok/s counts the
    tokens after the first one over the time after the first one."""
    runs = settings.repeats + 1
    length = settings.prompt_tokens
    ids = backend.tokenize(text[:runs * length * 16], add_special=False)
    if len(ids) < runs * length:
        length = len(ids) // runs
        if length < 8:
            raise BackendError(f"the text is too short for {runs} speed runs (only {len(ids)} tokens)")
    prompts = [backend.detokenize(ids[i * length:(i + 1) * length]) for i in range(runs)]
    for _ in backend.generate(prompts[0], SamplingParams(temperature=0.0, max_new_tokens=2, seed=0)):
        pass  # warm-up
    params = SamplingParams(temperature=0.0, max_new_tokens=settings.new_tokens, seed=0)
    prefill, decode, ttft = [], [], []
    for prompt in prompts[1:]:
        if should_stop is not None and should_stop():
            raise BackendError("speed run cancelled")
        started = time.perf_counter()
        first = last = None
        n_prompt = generated = 0
        for chunk in backend.generate(prompt, params):
            now = time.perf_counter()
            if chunk.generated_tokens and first is None:
                first = now
            if chunk.generated_tokens:
                last = now
            n_prompt, generated = chunk.prompt_tokens, chunk.generated_tokens
        if first is None:
            raise BackendError("the model produced no token in the speed run")
        ttft.append(first - started)
        prefill.append(n_prompt / (first - started))
        if generated > 1 and last > first:
            decode.append((generated - 1) / (last - first))
    return (statistics.median(prefill), statistics.median(decode) if decode else float("nan"),
            statistics.median(ttft))


def measure(manager, slots: Sequence[Slot], text: str, settings: MeasureSettings,
            progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> list[Result]:
    """Measure every slot one after the other: memory report, perplexity on `text`, throughput.
    A slot that failed to load, or fails here, gets its error and the others still run."""
    from quantizer.evaluation import perplexity
    settings = settings.validated()
    results = []
    total = max(1, len(slots))
    reached = [0.0]  # progress never goes backwards, even by a rounding error
    for index, slot in enumerate(slots):
        result = Result(entry=slot.label, backend=slot.entry.backend)
        results.append(result)
        if not slot.model_id:
            result.error = slot.error or "not loaded"
            continue
        base = index / total

        def report(fraction: float, what: str, _base=base, _label=slot.label):
            reached[0] = max(reached[0], min(1.0, _base + fraction / total))
            if progress:
                progress(reached[0], f"{_label}: {what}")
        try:
            loaded = manager.get(slot.model_id)
            result.backend = loaded.backend_name
            result.rss_delta_mb = slot.rss_after_mb - slot.rss_before_mb
            with loaded.lock:
                backend = loaded.backend
                memory = backend.memory_report()
                result.bits_per_weight = memory.bits_per_weight
                result.file_mb, result.ram_mb, result.gpu_mb = memory.file_mb, memory.ram_mb, memory.gpu_mb
                report(0.0, "perplexity")
                ppl = perplexity(backend, text, settings.seqlen, settings.windows,
                                 progress=lambda done, of: report(0.8 * done / of, f"perplexity {done}/{of}"),
                                 should_stop=should_stop)
                result.ppl, result.eval_tokens = ppl.ppl, ppl.tokens
                report(0.8, "throughput")
                result.prefill_tok_s, result.decode_tok_s, result.ttft_s = throughput(backend, text, settings, should_stop)
        except BackendError as exc:
            result.error = str(exc)
        except MemoryError:
            result.error = "out of memory while measuring"
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        report(1.0, "done" if not result.error else "failed")
    if progress:
        progress(1.0, "measured")
    return results


def fairness_notes(results: Sequence[Result]) -> list[str]:
    """Say when entries scored a different number of tokens (different vocabularies): their
    perplexities are then per token of a different tokenization and not strictly comparable."""
    counts = {r.entry: r.eval_tokens for r in results if r.eval_tokens}
    if len(set(counts.values())) <= 1:
        return []
    listed = ", ".join(f"{entry}: {n}" for entry, n in counts.items())
    return [f"entries tokenized the text differently ({listed} predicted tokens); "
            "their perplexities are per token of their own vocabulary"]


# -- output ----------------------------------------------------------------------------------
TABLE_COLUMNS = (("entry", "entry", "{}"), ("bits/w", "bits_per_weight", "{:.2f}"),
                 ("file MB", "file_mb", "{:.1f}"), ("RAM MB", "ram_mb", "{:.1f}"),
                 ("GPU MB", "gpu_mb", "{:.1f}"), ("ppl", "ppl", "{:.3f}"),
                 ("prefill tok/s", "prefill_tok_s", "{:.1f}"), ("decode tok/s", "decode_tok_s", "{:.1f}"),
                 ("TTFT s", "ttft_s", "{:.3f}"))


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return pattern.format(value)


def table_rows(results: Sequence[Result]) -> tuple[list[str], list[list[str]]]:
    """Header and rows as text, plus decode speed relative to the first entry (same run)."""
    headers = [h for h, _, _ in TABLE_COLUMNS] + ["decode vs 1st", "error"]
    base = results[0].decode_tok_s if results else None
    rows = []
    for r in results:
        row = [_fmt(getattr(r, key), pattern) for _, key, pattern in TABLE_COLUMNS]
        ratio = (r.decode_tok_s / base) if (base and r.decode_tok_s and math.isfinite(base)
                                            and math.isfinite(r.decode_tok_s)) else None
        row += [_fmt(ratio, "{:.2f}x"), r.error or ""]
        rows.append(row)
    return headers, rows


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table (what the README and bench/RESULTS.md show)."""
    headers, rows = table_rows(results)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def to_json(results: Sequence[Result]) -> str:
    return json.dumps([r.as_json() for r in results], indent=2)


def to_csv(results: Sequence[Result]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULT_KEYS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({k: ("" if v is None else v) for k, v in r.as_json().items()})
    return out.getvalue()


def write_exports(results: Sequence[Result], folder: Path, stem: str = "compare") -> tuple[Path, Path]:
    """Write `<stem>.csv` and `<stem>.json` into `folder` (each written whole, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, content in ((".csv", to_csv(results)), (".json", to_json(results))):
        target = folder / f"{stem}{suffix}"
        partial = folder / f"{stem}{suffix}.partial"
        partial.write_text(content, encoding="utf-8")
        partial.replace(target)
        paths.append(target)
    return paths[0], paths[1]
