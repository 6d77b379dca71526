"""Run a per-item function in child processes that may crash, without hanging and naming the culprit.

Native image decoders can kill their process on a damaged file (a segmentation fault in libpng, an
abort in a codec). A ``multiprocessing.Pool`` then waits forever for the lost task. Here every child
sends one result per item, in order, so when a child dies the parent knows the item it was working
on: that item gets a ``Crashed`` result, a fresh child takes over the rest of the chunk, and the
run goes on. A child that makes no progress for ``timeout`` seconds is killed the same way.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any


@dataclass(frozen=True)
class Crashed:
    """The result for an item whose process died or hung while working on it."""

    reason: str  # e.g. "the decoder crashed (killed by signal SIGSEGV)"


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _child(fn: Callable[[Any], Any], conn: Connection, quiet: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if quiet:  # native decoders print their own complaints; the parent reports them properly
        faulthandler.disable()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for item in chunk:
            try:
                result = fn(item)
            except Exception as err:  # a bug or an unexpected failure: report it for this item
                result = Crashed(f"{type(err).__name__}: {err}")
            conn.send(result)


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    chunk: list[int] | None = None  # item indices in flight
    done: int = 0  # results received for the chunk
    last_progress: float = 0.0


class _Pool:
    """Child processes working through a queue of chunks of item indices, one chunk per child at a time."""

    def __init__(
        self, fn: Callable[[Any], Any], items: Sequence[Any], *, chunk_size: int, quiet: bool
    ) -> None:
        methods = mp.get_all_start_methods()
        self.ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        self.fn, self.items, self.quiet = fn, items, quiet
        self.queue: deque[list[int]] = deque(
            list(range(i, min(i + chunk_size, len(items)))) for i in range(0, len(items), chunk_size)
        )
        self.workers: list[_Worker] = []

    def is_busy(self) -> bool:
        """Whether any child still has a chunk in flight."""
        return any(w.chunk is not None for w in self.workers)

    def fill(self, size: int) -> None:
        """Start children up to ``size`` while work is left, then give every idle child a chunk."""
        while self.queue and len(self.workers) < size:
            self.workers.append(self._start())
        for worker in self.workers:
            if worker.chunk is None and self.queue:
                self._dispatch(worker)

    def _start(self) -> _Worker:
        """Start one child process connected to the parent by a pipe."""
        parent_conn, child_conn = self.ctx.Pipe()
        process = self.ctx.Process(target=_child, args=(self.fn, child_conn, self.quiet), daemon=True)
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _dispatch(self, worker: _Worker) -> None:
        """Send the next chunk in the queue to ``worker``."""
        worker.chunk, worker.done = self.queue.popleft(), 0
        worker.last_progress = time.monotonic()
        worker.conn.send([self.items[i] for i in worker.chunk])

    def collect(self, timeout: float, what: str) -> Iterator[tuple[int, Any]]:
        """Yield the results that arrive within one wait, and a ``Crashed`` for every child lost meanwhile."""
        busy = [w for w in self.workers if w.chunk is not None]
        ready = wait([w.conn for w in busy], timeout=min(5.0, timeout))
        now = time.monotonic()
        for worker in busy:
            if worker.conn in ready:
                try:
                    result = worker.conn.recv()
                except (EOFError, OSError):
                    worker.process.join(timeout=5)
                    yield self._lose(worker, f"{what} crashed ({_signal_name(worker.process.exitcode)})")
                    continue
                yield worker.chunk[worker.done], result
                worker.done += 1
                worker.last_progress = now
                if worker.done == len(worker.chunk):
                    worker.chunk = None
            elif now - worker.last_progress > timeout:
                yield self._lose(worker, f"{what} made no progress for {timeout:.0f} s (killed)")

    def _lose(self, worker: _Worker, reason: str) -> tuple[int, Crashed]:
        """The worker died or hung on its current item: blame it, requeue the rest, close the worker."""
        culprit = worker.chunk[worker.done]
        rest = worker.chunk[worker.done + 1 :]
        if rest:
            self.queue.appendleft(rest)
        worker.conn.close()
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        self.workers.remove(worker)
        return culprit, Crashed(reason)

    def close(self, finished: bool) -> None:
        """Stop every child: politely after a finished run, by killing it otherwise."""
        for worker in self.workers:
            if finished:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
            else:
                worker.process.kill()
            worker.conn.close()
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()


def isolated_map(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int = 2,
    chunk_size: int = 16,
    timeout: float = 300.0,
    what: str = "the decoder",
    quiet: bool = True,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, fn(items[index]))`` for every item, in completion order, computed in child processes.

    An item whose process crashes or makes no progress for ``timeout`` seconds yields a ``Crashed``
    result instead. ``fn`` must be picklable where processes are spawned rather than forked.
    """
    if not items:
        return
    pool = _Pool(fn, items, chunk_size=chunk_size, quiet=quiet)
    finished = False
    try:
        pool.fill(max(1, min(workers, len(pool.queue))))
        while pool.is_busy():
            yield from pool.collect(timeout, what)
            pool.fill(max(1, workers))  # replace lost workers while work is left
        finished = True
    finally:  # also on Ctrl-C or when the caller stops early: no child outlives the call
        pool.close(finished)
