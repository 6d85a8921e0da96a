"""File locks that hold their holder's PID: one job per run directory, one teacher training at
a time per cache entry. The kernel releases the lock of a killed job; its stale PID is
overwritten by the next holder."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def pid_lock(path: Path, busy: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` with this process's PID written in it. When another
    process holds it, ``busy(who)`` is called with a description of the holder: it raises to
    refuse, or returns to wait for the lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:  # "a+": opening never truncates the holder's PID
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            busy(f"PID {holder}" if holder.isdigit() else "a job that is starting (no PID yet)")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
