"""Calibration tokens: `nsamples` seeded random windows of `seqlen` tokens from a source.

Sources: `c4` (the shared local sample, else its first train shard through huggingface_hub), `wikitext2`
and `ptb` (through the optional `datasets` package when the hub is reachable), a local file (.txt, .jsonl
with a `text` field, .parquet), `builtin`: English prose from the docstrings of the installed Python
standard library, which needs no network at all, and `generated`: text the model itself writes (drawn by
the pipeline, which holds the model: `quantizer.generated_calibration`).
Windows are drawn as GPTQ draws them from C4: pick a random document longer than `seqlen` tokens,
then a random window inside it; when no document is that long, windows come from the concatenation.
"""
from __future__ import annotations

import inspect
import json
import random
import re
import sysconfig
from pathlib import Path

import torch

from backends.base import BackendError

NAMED = ("c4", "wikitext2", "ptb")
GENERATED = "generated"
SOURCES = (GENERATED, "builtin") + NAMED
BUILTIN_MIN_CHARS = 300
BUILTIN_TARGET_CHARS = 600_000


def validate_counts(nsamples, seqlen) -> None:
    if not isinstance(nsamples, int) or nsamples < 1:
        raise ValueError(f"nsamples must be a positive number of calibration windows, got {nsamples!r}")
    if not isinstance(seqlen, int) or seqlen < 8:
        raise ValueError(f"seqlen must be at least 8 tokens, got {seqlen!r}")


_TRIPLE = re.compile(r'"""(.*?)"""', re.S)


def _is_prose(text: str) -> bool:
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.9


def builtin_documents(limit_chars: int = BUILTIN_TARGET_CHARS) -> list[str]:
    """Long prose docstrings of the standard library's sources (read as text, never imported), in a
    fixed order, so the source is the same on every run of one Python install."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if path.name.startswith("test") or "test" in path.parent.name:
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for match in _TRIPLE.finditer(source):
            before = source[:match.start()].rstrip(" \t")
            if not (before.endswith(":\n") or not before.strip()):  # a docstring follows def/class or opens the file
                continue
            doc = inspect.cleandoc(match.group(1))
            if len(doc) >= BUILTIN_MIN_CHARS and _is_prose(doc):
                docs.append(doc)
                total += len(doc)
        if total >= limit_chars:
            break
    if not docs:
        raise BackendError("the builtin calibration source found no Python standard library docstrings")
    return docs


C4_REPO, C4_SHARD = "allenai/c4", "en/c4-train.00000-of-01024.json.gz"  # the shard GPTQ samples from
C4_DOCUMENTS = 20_000  # read from the shard's start: ample for 128 windows of 2048 tokens, about 50 MB of text
# (the whole shard, 356k documents, would hold over 1 GB of Python strings during calibration)


def _hub_c4_documents() -> list[str]:
    """The first C4_DOCUMENTS documents of C4's first train shard through huggingface_hub (a requirement;
    `datasets` is not): one download of about 320 MB, cached by the hub client, read as gzipped JSON lines."""
    import gzip
    import itertools
    try:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(C4_REPO, C4_SHARD, repo_type="dataset")
    except Exception as exc:  # offline, refused, or a hub error of any kind
        raise BackendError(f"calibration source 'c4': the hub is unreachable or refused ({type(exc).__name__}); "
                           "use `builtin` or a local file instead") from None
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return _jsonl_texts(itertools.islice(fh, C4_DOCUMENTS), Path(C4_SHARD).name)


def _hub_documents(name: str) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise BackendError(f"calibration source {name!r} needs the `datasets` package and a reachable hub; "
                           "use `builtin` or a local file instead") from None
    try:
        if name == "wikitext2":
            return ["\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"])]
        return [" ".join(load_dataset("ptb_text_only", "penn_treebank", split="train")["sentence"])]
    except Exception as exc:
        raise BackendError(f"calibration source {name!r}: the hub is unreachable or refused "
                           f"({type(exc).__name__}); use `builtin` or a local file instead") from None


def _local_c4() -> Path | None:
    from quantizer.evaluation import shared_data_dir
    path = shared_data_dir() / "c4" / "c4-train-first1000.jsonl"
    return path if path.is_file() else None


def file_documents(path: Path) -> list[str]:
    """Documents of a local file; a clear message for missing, empty, binary or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise BackendError(f"calibration file {path.name} does not exist")
    if path.suffix.lower() != ".jsonl":
        from quantizer.evaluation import read_text_file
        return [read_text_file(path)]
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise BackendError(f"calibration file {path.name} looks binary, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BackendError(f"calibration file {path.name} is not UTF-8 text") from None
    return _jsonl_texts(text.splitlines(), path.name)


def _jsonl_texts(lines, name: str) -> list[str]:
    """The non-empty `text` fields of JSON lines (a user's .jsonl, C4's shard), the line named when one is
    not JSON."""
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise BackendError(f"calibration file {name}: line {number} is not JSON") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str) and record["text"].strip():
            docs.append(record["text"])
    if not docs:
        raise BackendError(f"calibration file {name} holds no records with a non-empty `text` field")
    return docs


def documents(source: str | Path) -> list[str]:
    key = str(source).lower()
    if key == GENERATED:
        raise BackendError("the generated calibration source has no documents: the model writes its tokens "
                           "(quantizer.generated_calibration)")
    if key == "builtin":
        return builtin_documents()
    if key == "c4":
        local = _local_c4()  # the first documents of the same C4 train shard GPTQ samples from
        return file_documents(local) if local is not None else _hub_c4_documents()
    if key in ("wikitext2", "ptb"):
        return _hub_documents(key)
    return file_documents(Path(source))


def validate_source(source) -> bool:
    """True for a named source or an existing file (its content is checked when it is read)."""
    key = str(source).strip().lower()
    return key in SOURCES or Path(str(source)).is_file()


def describe(source: str | Path) -> str:
    """The source as recorded in the checkpoint's meta (a file by its name only)."""
    key = str(source).lower()
    return key if key in SOURCES else f"file:{Path(source).name}"


def sample_windows(docs: list[str], tokenize, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token ids; `tokenize(text) -> list[int]`."""
    validate_counts(nsamples, seqlen)
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}

    def ids_of(i):
        if i not in cache:
            cache[i] = tokenize(docs[i])
        return cache[i]

    windows = []
    attempts = 0
    max_attempts = 50 * nsamples + 1000
    while len(windows) < nsamples and attempts < max_attempts and len(docs) > 1:
        attempts += 1
        i = rng.randint(0, len(docs) - 1)
        ids = ids_of(i)
        if len(ids) <= seqlen:
            continue
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    if len(windows) < nsamples:  # few or short documents: windows of the whole text
        ids = tokenize("\n\n".join(docs))
        if len(ids) <= seqlen:
            raise BackendError(f"the calibration text has only {len(ids)} tokens; it needs more than "
                               f"seqlen={seqlen} (use a longer text or a smaller seqlen)")
        while len(windows) < nsamples:
            start = rng.randint(0, len(ids) - seqlen - 1)
            windows.append(ids[start:start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def calibration_tokens(source: str | Path, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Draw the calibration windows for a Hugging Face tokenizer (no special tokens added)."""
    validate_counts(nsamples, seqlen)
    docs = documents(source)
    return sample_windows(docs, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                          nsamples, seqlen, seed)
