"""The one perplexity protocol (BENCH.md, as GPTQ does it): build the text, tokenize it once with
the backend's own tokenizer, cut non-overlapping windows of `seqlen` tokens, score every window on
its own, perplexity = exp(mean NLL over all predicted tokens). Every backend goes through here."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Callable

from backends.base import Backend, BackendError

REPO = Path(__file__).resolve().parent.parent
NAMED_SOURCES = ("wikitext2", "c4", "ptb")


def shared_data_dir() -> Path:
    return Path(os.environ.get("GPTQ_WEBUI_SHARED", REPO.parent / "shared")) / "data"


def wikitext2_from_raw(raw: str) -> str:
    """GPTQ's wikitext2 test string from wiki.test.raw: split on "\\n" only (not splitlines, which
    also splits on Unicode separators), keep line ends, " \\n" rows become "", join with "\\n\\n"."""
    parts = raw.split("\n")
    rows = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        rows.append(parts[-1])
    rows = ["" if r == " \n" else r for r in rows]
    return "\n\n".join(rows)


def _local_named(name: str) -> Path | None:
    data = shared_data_dir()
    candidates = {
        "wikitext2": [data / "wikitext2" / "wiki.test.raw"],
        "c4": [data / "c4" / "c4-validation.jsonl", data / "c4" / "c4-train-first1000.jsonl"],
        "ptb": [data / "ptb" / "ptb.test.txt"],
    }[name]
    return next((p for p in candidates if p.exists()), None)


def _from_hub(name: str) -> str:
    """The datasets the GPTQ papers use, when the hub is reachable."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise BackendError(f"{name}: not found locally and the `datasets` package is not installed "
                           "(pip install datasets) — or pass a text file") from None
    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
            return "\n\n".join(rows)
        if name == "ptb":
            rows = load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"]
            return " ".join(rows)
        rows = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                            split="validation")["text"]
        return " ".join(rows[:1100])
    except Exception as exc:
        raise BackendError(f"{name}: not found locally and the hub is unreachable ({type(exc).__name__}); "
                           "pass a local text file instead") from None


def read_text_file(path: Path) -> str:
    """A .txt file as is, a .jsonl file's `text` fields joined by blank lines, a .parquet's `text` column."""
    path = Path(path)
    if not path.is_file():
        raise BackendError(f"{path}: no such text file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BackendError("reading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path, columns=["text"])
        text = "\n\n".join(str(t) for t in table.column("text").to_pylist())
    else:
        raw = path.read_bytes()
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BackendError(f"{path.name} is not UTF-8 text") from None
        if "\x00" in decoded:
            raise BackendError(f"{path.name} looks binary, not text")
        if suffix == ".jsonl":
            texts = []
            for number, line in enumerate(decoded.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise BackendError(f"{path.name}: line {number} is not JSON") from None
                if isinstance(record, dict) and isinstance(record.get("text"), str):
                    texts.append(record["text"])
            if not texts:
                raise BackendError(f"{path.name}: no records with a `text` field")
            text = "\n\n".join(texts)
        elif path.name == "wiki.test.raw":
            text = wikitext2_from_raw(decoded)
        else:
            text = decoded
    if not text.strip():
        raise BackendError(f"{path.name} holds no text")
    return text


def load_eval_text(source: str | Path) -> str:
    """`wikitext2`, `c4`, `ptb` (local shared data first, then the hub) or a path to a text file."""
    key = str(source).lower()
    if key in NAMED_SOURCES:
        local = _local_named(key)
        return read_text_file(local) if local else _from_hub(key)
    return read_text_file(Path(source))


@dataclass
class PerplexityResult:
    ppl: float
    nll: float           # mean negative log-likelihood per predicted token
    tokens: int          # predicted tokens
    windows: int
    seqlen: int

    def as_dict(self) -> dict:
        return asdict(self)


def eval_windows(ids: list[int], seqlen: int, windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of exactly `seqlen` tokens (the GPTQ protocol drops the tail)."""
    if seqlen < 2:
        raise BackendError(f"seqlen must be at least 2, got {seqlen}")
    count = len(ids) // seqlen
    if windows is not None:
        if windows < 1:
            raise BackendError(f"windows must be at least 1, got {windows}")
        count = min(count, windows)
    if count == 0:
        raise BackendError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(count)]


def perplexity(backend: Backend, text: str, seqlen: int, windows: int | None = None,
               progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> PerplexityResult:
    if seqlen > backend.context_length:
        raise BackendError(f"seqlen {seqlen} exceeds the model's context of {backend.context_length}")
    ids = backend.tokenize(text, add_special=False)
    chunks = eval_windows(ids, seqlen, windows)
    total, count = 0.0, 0
    for index, chunk in enumerate(chunks):
        if should_stop is not None and should_stop():
            raise BackendError("perplexity evaluation cancelled")
        logprobs = backend.token_logprobs(chunk)
        total -= math.fsum(logprobs)
        count += len(logprobs)
        if progress is not None:
            progress(index + 1, len(chunks))
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(chunks), seqlen=seqlen)
