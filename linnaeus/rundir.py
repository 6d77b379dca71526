"""One run directory, one trainer; and ranks that do not outlive their launcher.

``RunLock(run_dir)`` holds an exclusive POSIX record lock (``lockf``) on ``run_dir/.lock`` for the life
of the trainer,
with the holder's host, pid and start time written in the file. A second trainer started on the same
directory (the same command twice, a requeued job while the old one still runs) gets a
``RunLockedError`` naming the holder instead of two processes overwriting each other's checkpoints.
The kernel releases the lock when its holder dies, however it dies, so a lock file left by a killed
run is simply taken over. A record lock, unlike ``flock``, is not inherited by forked children, so
data-loading workers that outlive a killed trainer for a moment do not keep its directory locked.
Record locks belong to the process, so locks held within this process are tracked in ``_HELD``.

``watch_parent()`` makes a process exit when its parent (the ``torchrun`` launcher) disappears, so ranks
of a killed launcher do not go on training unsupervised.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from linnaeus.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
_HELD: set[str] = set()  # lock files this process holds


class RunLockedError(UserError):
    """Another trainer holds the run directory."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive use of a run directory by one trainer process (a context manager).

    Under DDP take it on global rank 0 only; the other ranks share rank 0's run directory.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self.previous: dict | None = None  # what the lock file said when we took it (a dead holder)

    def _read(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            return json.loads(os.read(fd, 4096).decode() or "{}")
        except (OSError, ValueError, UnicodeDecodeError):
            return {}

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD:  # this very process holds it (a record lock would not refuse its own owner)
            raise RunLockedError(self._describe_holder({"host": socket.gethostname(), "pid": os.getpid()}))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self._read(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(f"cannot lock {self.path}: {err.strerror}") from None
            raise RunLockedError(self._describe_holder(holder)) from None
        self.previous = self._read(fd) or None
        if self.previous:
            log.info(
                "taking over %s from pid %s on %s (started %s), which is no longer running",
                self.path,
                self.previous.get("pid"),
                self.previous.get("host"),
                self.previous.get("started"),
            )
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        _HELD.add(key)
        return self

    def _describe_holder(self, holder: dict) -> str:
        host, pid = holder.get("host", "an unknown host"), holder.get("pid")
        started = f", started {holder['started']}" if holder.get("started") else ""
        who = f"pid {pid} on {host}{started}"
        if pid is not None and host == socket.gethostname() and not pid_alive(int(pid)):
            who += (
                "; that process has exited but the lock is still held, e.g. over a network file system that "
                "keeps locks for a while: wait a few seconds"
            )
        return (
            f"another trainer is using the run directory {self.run_dir} ({who}); wait for it to finish or "
            f"stop it (kill {pid}), or start this run elsewhere with name=<new name> or hydra.run.dir=<new folder>"
            if pid is not None
            else f"another trainer holds {self.path}; wait for it, or use another run directory (hydra.run.dir=...)"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # the file stays: deleting it would let two trainers lock two inodes
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
            _HELD.discard(str(self.path.resolve()))

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------- parent watch
PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(
    interval: float = 1.0, grace: float = 30.0, use_death_signal: bool = False
) -> threading.Thread | None:
    """Stop this process when its parent goes away (e.g. the ``torchrun`` launcher was killed).

    A daemon thread notices a new parent pid within ``interval`` seconds, sends SIGTERM to this
    process (so the trainer's own SIGTERM handling runs: checkpoint and stop) and, if it is still
    alive ``grace`` seconds later (for instance stuck in a collective whose peers are gone), exits
    it with status 1. ``use_death_signal`` also asks the kernel for SIGTERM at the parent's death
    (``PR_SET_PDEATHSIG``); it is off by default because Linux sends that signal when the parent
    *thread* that started this process exits, which a launcher may do while still alive. Returns
    the thread, or None when the parent is already init (nothing to watch).
    """
    parent = os.getppid()
    if parent == 1:
        return None
    if use_death_signal:
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:  # the parent died between getppid() and prctl()
            os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.error(
            "the launcher (pid %d) that started this process is gone; stopping instead of training unsupervised",
            parent,
        )
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    thread = threading.Thread(target=watch, name="watch-parent", daemon=True)
    thread.start()
    return thread
