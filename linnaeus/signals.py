"""Stop requests from signals: SLURM's pre-timeout signal (USR2), SIGTERM and Ctrl-C (SIGINT).

A handler only records the signal; the loop checks ``requested`` after every optimizer step (all
ranks agree through ``linnaeus.dist.agree_flags``), writes a checkpoint and stops. Under submitit
the signal's previous handler is submitit's: ``hand_over`` calls it once the checkpoint is written,
and submitit requeues the job, which resumes from that checkpoint in the same run directory.
Under submitit SIGTERM only announces a pre-emption (submitit itself ignores it), so the loop then
writes a checkpoint and goes on until USR2 or the kill.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def _is_default(handler) -> bool:
    return handler in (signal.SIG_DFL, signal.SIG_IGN, None, signal.default_int_handler)


class StopSignals:
    """Install with ``install()`` before any DataLoader worker starts (workers inherit the handlers)."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first stop signal
        self.save_requested = False  # SIGTERM under submitit: checkpoint, keep going
        self.previous: dict[int, Callable | int | None] = {}

    def install(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no signal handling
                log.debug(
                    "cannot install a handler for %s outside the main thread", signal.Signals(signum).name
                )
        return self

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGTERM and not _is_default(self.previous.get(signum)):
            self.save_requested = True  # a scheduler's warning: save now; the stop signal follows
            return
        if self.received is None:
            self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def hand_over(self) -> None:
        """After the checkpoint: give the signal to the handler it interrupted (submitit requeues and
        exits here); does nothing when that handler is the default one."""
        if self.received is None:
            return
        previous = self.previous.get(self.received)
        if callable(previous) and not _is_default(previous):
            previous(self.received, None)
