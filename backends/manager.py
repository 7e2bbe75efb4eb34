"""Holds any number of loaded models at once, each behind its own lock, and confines every model
path to the models folder."""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

from backends.base import Backend, BackendError, GenerationChunk, Message, SamplingParams
from backends.registry import backends_for_format, create_backend, default_backend_for, detect_format
from backends.model_info import describe

T = TypeVar("T")


class FairLock:
    """A lock granted in arrival order, so the Chat tab, the API queue and comparisons share one
    first-come-first-served order per model (threading.Lock lets any waiter win)."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self._held = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._mutex:
            if not self._held and not self._waiters:
                self._held = True
                return True
            if not blocking:
                return False
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(None if timeout is None or timeout < 0 else timeout):
            return True
        with self._mutex:
            if turn.is_set():  # handed over just as we gave up: keep it
                return True
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        with self._mutex:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            if self._waiters:
                self._waiters.popleft().set()  # ownership passes straight to the oldest waiter
            else:
                self._held = False

    def locked(self) -> bool:
        return self._held

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


@dataclass
class LoadedModel:
    model_id: str
    name: str              # path relative to the models folder
    path: Path
    backend_name: str
    options: dict
    backend: Backend
    load_seconds: float
    lock: FairLock = field(default_factory=FairLock)
    closing: threading.Event = field(default_factory=threading.Event)   # set by unload: generations end


class _EitherStop:
    """Set when the caller's stop event or the model's `closing` is: the one `is_set()` the engines'
    token loops check, so Unload ends a running reply at its next token instead of waiting it out."""

    def __init__(self, stop_event: threading.Event | None, closing: threading.Event):
        self.events = [e for e in (stop_event, closing) if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


@dataclass(frozen=True)
class ModelEntry:
    """One item of the models folder as the Models tab lists it."""
    name: str
    path: Path
    format: str | None     # None when it is not a loadable model
    size_mb: float
    problem: str | None = None

    @property
    def weights(self) -> str:
        """How the weights are stored ("4-bit g128", "Q4_1"...; "" when unknown). Read on demand: of the
        folder's listings only the Models table shows it."""
        return describe(self.path, self.format)


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class ModelManager:
    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir).resolve()
        self._models: dict[str, LoadedModel] = {}
        self._registry_lock = threading.Lock()

    # -- paths -----------------------------------------------------------------------------
    def resolve_path(self, name: str | os.PathLike) -> Path:
        """The real path of `name` inside the models folder; refuses `..`, absolute paths outside,
        and symlinks that point out of it."""
        raw = str(name).strip()
        if not raw:
            raise BackendError("no model name given")
        candidate = Path(raw)
        if not candidate.is_absolute():
            candidate = self.models_dir / candidate
        resolved = candidate.resolve()
        if resolved != self.models_dir and self.models_dir not in resolved.parents:
            raise BackendError(f"{raw!r} is outside the models folder {self.models_dir}; "
                               "put models under it")
        if resolved == self.models_dir:
            raise BackendError("pick a model inside the models folder, not the folder itself")
        if not resolved.exists():
            raise BackendError(f"{raw!r}: no such model in {self.models_dir}")
        return resolved

    def list_models(self) -> list[ModelEntry]:
        entries = []
        if not self.models_dir.is_dir():
            return entries
        for item in sorted(self.models_dir.iterdir(), key=lambda p: p.name.lower()):
            if item.name.startswith(".") or item.name == "README.md" or item.name.endswith(".partial"):
                continue
            try:
                self.resolve_path(item.name)
                fmt, problem = detect_format(item), None
            except BackendError as exc:
                fmt, problem = None, str(exc)
            try:
                size = _tree_size(item) / 2**20
            except OSError:
                size = 0.0
            entries.append(ModelEntry(item.name, item, fmt, round(size, 1), problem))
        return entries

    # -- loading ---------------------------------------------------------------------------
    def load(self, name: str, backend: str | None = None, options: dict | None = None) -> str:
        """Load a model; returns its id. Nothing is registered when loading fails."""
        path = self.resolve_path(name)
        fmt = detect_format(path)
        backend_name = backend or default_backend_for(path)
        allowed = backends_for_format(fmt)
        if backend_name not in allowed:
            raise BackendError(f"{path.name} is a {fmt} model: load it with {' or '.join(allowed)}, "
                               f"not {backend_name}")
        instance = create_backend(backend_name)
        clean_options = instance.validate_options(options)
        started = time.perf_counter()
        try:
            instance.load(path, clean_options)
        except BackendError:
            _safe_unload(instance)
            raise
        except MemoryError:
            _safe_unload(instance)
            raise BackendError(f"out of memory while loading {path.name}: unload other models "
                               "or pick a smaller quantization") from None
        except Exception as exc:  # an engine's own error: keep the message, drop the traceback
            _safe_unload(instance)
            raise BackendError(f"{backend_name} could not load {path.name}: {type(exc).__name__}: {exc}") from exc
        rel = str(path.relative_to(self.models_dir))
        with self._registry_lock:
            model_id = f"{rel}@{backend_name}"
            suffix = 2
            while model_id in self._models:
                model_id = f"{rel}@{backend_name}#{suffix}"
                suffix += 1
            self._models[model_id] = LoadedModel(model_id, rel, path, backend_name, clean_options,
                                                 instance, time.perf_counter() - started)
        return model_id

    def unload(self, model_id: str) -> None:
        with self._registry_lock:
            loaded = self._models.pop(model_id, None)
        if loaded is None:
            raise BackendError(f"no loaded model {model_id!r}")
        loaded.closing.set()                 # a reply being generated stops at its next token
        with loaded.lock:
            loaded.backend.unload()

    def unload_all(self) -> None:
        for model_id in self.loaded_ids():
            self.unload(model_id)

    def get(self, model_id: str) -> LoadedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise BackendError(f"no loaded model {model_id!r}; loaded: {', '.join(self._models) or 'none'}") from None

    def loaded(self) -> list[LoadedModel]:
        with self._registry_lock:
            return list(self._models.values())

    def loaded_ids(self) -> list[str]:
        return [m.model_id for m in self.loaded()]

    # -- generation under the model's lock ---------------------------------------------------
    def generate(self, model_id: str, prompt: str, params: SamplingParams,
                 stop_event: threading.Event | None = None) -> Iterator[GenerationChunk]:
        return self._stream(model_id, params, stop_event, lambda backend, p, stop: backend.generate(prompt, p, stop))

    def generate_ids(self, model_id: str, ids: Sequence[int], params: SamplingParams,
                     stop_event: threading.Event | None = None) -> Iterator[GenerationChunk]:
        return self._stream(model_id, params, stop_event, lambda backend, p, stop: backend.generate_ids(ids, p, stop))

    def chat(self, model_id: str, messages: list[Message], params: SamplingParams,
             stop_event: threading.Event | None = None) -> Iterator[GenerationChunk]:
        return self._stream(model_id, params, stop_event, lambda backend, p, stop: backend.chat(messages, p, stop))

    def _stream(self, model_id: str, params: SamplingParams, stop_event: threading.Event | None,
                run: Callable[[Backend, SamplingParams, _EitherStop], Iterator[GenerationChunk]]
                ) -> Iterator[GenerationChunk]:
        """run(backend, params, stop)'s chunks under the model's lock, stopped by the caller or by Unload
        (checked when iteration starts, as the lock is only taken then)."""
        loaded = self.get(model_id)
        params = params.validated()
        with loaded.lock:
            yield from _until_unloaded(loaded, run(loaded.backend, params, _EitherStop(stop_event, loaded.closing)))

    def call(self, model_id: str, work: Callable[[Backend], T]) -> T:
        """work(backend) under the model's lock, for calls between generations (scoring, a chat render
        and tokenization in the same turn): engines are not thread-safe, and llama.cpp's scoring
        clears the KV cache a reply is using."""
        loaded = self.get(model_id)
        with loaded.lock:
            _raise_if_unloaded(loaded)
            return work(loaded.backend)


def _until_unloaded(loaded: LoadedModel, chunks: Iterator[GenerationChunk]) -> Iterator[GenerationChunk]:
    """The engine's chunks, run under the model's lock; a request that waited for the lock while the
    model was being unloaded gets a clear error, and a reply cut short by Unload says so."""
    _raise_if_unloaded(loaded)
    for chunk in chunks:
        if chunk.finished and chunk.finish_reason == "cancelled" and loaded.closing.is_set():
            chunk = replace(chunk, finish_reason="unloaded")
        yield chunk


def _raise_if_unloaded(loaded: LoadedModel) -> None:
    if loaded.closing.is_set():
        raise BackendError(f"{loaded.model_id} was unloaded")


def _safe_unload(instance: Backend) -> None:
    try:
        instance.unload()
    except Exception:
        pass
