"""Generation off the event loop: a fixed pool of worker threads, a bounded queue in front of it, cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_END = object()


class Overloaded(Exception):
    """Every worker is busy and the queue is full."""


class Cancelled(Exception):
    """A job stopped early because its client went away."""


@dataclass
class Counters:
    """What the server has done so far (GET /metrics)."""

    admitted: int = 0  # requests given a place (running or queued)
    rejected: int = 0  # refused with 503: queue full
    completed: int = 0
    cancelled: int = 0  # stopped, or never started, because the client went away
    failed: int = 0


class Engine:
    """Runs jobs on `workers` threads; at most `queue_size` more wait for one, the rest are refused at once.

    The GPT2Model is shared by the workers: each generate()/stream() call keeps its own state.
    """

    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self.counters = Counters()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpt2-serve")
        self._lock = threading.Lock()
        self._in_flight = 0  # admitted and not yet finished
        self._running = 0

    def submit(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """Queue work for a worker thread, or raise Overloaded; call from the event loop.

        Cancelling the returned future drops the work if it has not started yet.
        """
        with self._lock:
            if self._in_flight >= self.workers + self.queue_size:
                self.counters.rejected += 1
                raise Overloaded
            self._in_flight += 1
            self.counters.admitted += 1
        future = self._executor.submit(self._run, work)
        future.add_done_callback(self._finished)
        return asyncio.wrap_future(future)

    def _run(self, work: Callable[[], T]) -> T:
        with self._lock:
            self._running += 1
        try:
            return work()
        finally:
            with self._lock:
                self._running -= 1

    def _finished(self, future: Future[Any]) -> None:
        with self._lock:
            self._in_flight -= 1
            if future.cancelled() or isinstance(future.exception(), Cancelled):
                self.counters.cancelled += 1
            elif future.exception() is not None:
                self.counters.failed += 1
            else:
                self.counters.completed += 1

    def snapshot(self) -> dict[str, int]:
        """Counters and the current load, for GET /metrics."""
        with self._lock:
            return {
                **self.counters.__dict__,
                "running": self._running,
                "queued": self._in_flight - self._running,
                "workers": self.workers,
                "queue_size": self.queue_size,
            }

    def close(self) -> None:
        """Drop queued work; running jobs finish on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class Relay(Generic[T]):
    """Items of an iterator that runs on a worker thread, received in order on the event loop.

    The worker checks a cancellation flag before passing each item on: close() stops the iterator at its next item
    (and drops it altogether if it has not started).
    """

    def __init__(self, engine: Engine, items: Iterator[T]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._cancel = threading.Event()
        self.job: asyncio.Future[None] = engine.submit(partial(self._run, items))
        self.job.add_done_callback(lambda _: self._queue.put_nowait(_END))

    def _run(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if self._cancel.is_set():
                    raise Cancelled
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    async def __aiter__(self) -> AsyncIterator[T]:
        """The items until the iterator ends (check `job` afterwards for how it ended)."""
        while (item := await self._queue.get()) is not _END:
            yield item

    def close(self) -> None:
        self._cancel.set()
        self.job.cancel()
