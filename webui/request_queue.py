"""Fair queuing of generation requests: first come, first served per model, different models at once.

Waiting happens on the event loop (no thread is parked per queued request); only the request whose
turn it is gets a worker thread, which streams chunks back to the loop. A request whose client has
gone away leaves the queue at once, or, when it is running, stops within one token and hands the
model to the next request.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from backends.base import GenerationChunk


class QueueFull(Exception):
    """Too many requests already wait for this model."""


class ClientGone(Exception):
    """The client disconnected (or the request was cancelled) before its reply was complete."""


@dataclass
class _Slot:
    busy: bool = False
    waiters: deque = field(default_factory=deque)


@dataclass(frozen=True)
class Finished:
    """What one request did, kept (bounded) for the load test, the bench and debugging."""
    request_id: int
    model_id: str
    queued_s: float
    run_s: float
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str | None


class Cancellation:
    """The two faces of "stop this request": a threading.Event the worker checks before every token,
    and an asyncio.Event the loop-side waits race against. Created and cancelled on the loop."""

    def __init__(self):
        self.stop = threading.Event()
        self.gone = asyncio.Event()

    def cancel(self) -> None:
        self.stop.set()
        self.gone.set()

    @property
    def cancelled(self) -> bool:
        return self.gone.is_set()


async def _race(awaitable, cancellation: Cancellation):
    """Await `awaitable` unless the request is cancelled first (then ClientGone)."""
    if cancellation.cancelled:
        raise ClientGone()
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(cancellation.gone.wait())
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        gone.cancel()
        raise
    gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone()


class FairQueue:
    """One FIFO slot per model. All methods run on the event loop that owns the queue."""

    def __init__(self, max_waiting: int = 64, history: int = 256):
        self.max_waiting = max_waiting
        self._slots: dict[str, _Slot] = {}
        self._ids = itertools.count(1)
        self.finished: deque[Finished] = deque(maxlen=history)

    async def acquire(self, model_id: str, cancellation: Cancellation) -> None:
        slot = self._slots.setdefault(model_id, _Slot())
        if not slot.busy and not slot.waiters:
            slot.busy = True
            return
        if len(slot.waiters) >= self.max_waiting:
            raise QueueFull(f"{len(slot.waiters)} requests already wait for {model_id}; retry later")
        turn = asyncio.get_running_loop().create_future()
        slot.waiters.append(turn)
        try:
            await _race(asyncio.shield(turn), cancellation)
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.release(model_id)          # our turn came as we left: pass it on
            else:
                turn.cancel()
                try:
                    slot.waiters.remove(turn)
                except ValueError:
                    pass
            raise

    def release(self, model_id: str) -> None:
        slot = self._slots.get(model_id)
        if slot is None:
            return
        while slot.waiters:
            turn = slot.waiters.popleft()
            if not turn.done():
                turn.set_result(None)           # handed over: the slot stays busy
                return
        slot.busy = False
        del self._slots[model_id]

    def snapshot(self) -> dict[str, dict]:
        """{model_id: {"busy": bool, "waiting": int}} for models with activity."""
        return {m: {"busy": s.busy, "waiting": sum(1 for w in s.waiters if not w.done())}
                for m, s in self._slots.items()}

    def idle(self) -> bool:
        return not self._slots

    def next_request_id(self) -> int:
        return next(self._ids)


async def run_queued(queue: FairQueue, model_id: str, work: Callable[[threading.Event], Iterator[GenerationChunk]],
                     cancellation: Cancellation) -> AsyncIterator[GenerationChunk]:
    """Wait for the model's turn, then run `work(stop_event)` in a worker thread and yield its chunks.

    Exceptions from `work` are re-raised here. The slot is released when the worker thread really
    ends (not when the consumer stops listening), so the model is never driven by two requests."""
    loop = asyncio.get_running_loop()
    request_id = queue.next_request_id()
    queued_at = time.perf_counter()
    await queue.acquire(model_id, cancellation)
    started = time.perf_counter()
    events: asyncio.Queue = asyncio.Queue()
    done = object()
    last: list[GenerationChunk] = []
    failed: list[BaseException] = []

    def finish() -> None:
        queue.release(model_id)
        chunk = last[0] if last else None
        if failed:  # the engine failed; the consumer re-raised its error and then set stop, which
            reason = None  # alone cannot tell a failure from a cancellation (it raced this callback)
        elif cancellation.stop.is_set() and not (chunk and chunk.finished):
            reason = "cancelled"
        else:
            reason = chunk.finish_reason if chunk else None
        queue.finished.append(Finished(request_id, model_id, started - queued_at, time.perf_counter() - started,
                                       chunk.prompt_tokens if chunk else 0, chunk.generated_tokens if chunk else 0,
                                       reason))
        events.put_nowait(done)

    def post(item) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:        # the loop is closed (server shutting down): nobody listens
            cancellation.stop.set()

    def worker() -> None:
        try:
            for chunk in work(cancellation.stop):
                last[:] = [chunk]
                post(chunk)
        except BaseException as exc:  # handed to the loop side, which decides what the client sees
            failed.append(exc)
            post(exc)
        finally:
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:
                pass

    try:
        threading.Thread(target=worker, name=f"generate-{request_id}", daemon=True).start()
    except BaseException:
        queue.release(model_id)
        raise
    try:
        while True:
            item = await _race(events.get(), cancellation)
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancellation.stop.set()     # a consumer that leaves early stops the worker within one token
