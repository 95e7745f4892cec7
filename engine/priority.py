"""Thread priorities: the step's threads yield to the server's I/O on a shared machine."""

from __future__ import annotations

import contextlib
import os
import threading


def lower_this_thread(increment: int) -> None:
    """Give the calling thread the process's nice value plus `increment` (at most 19). Linux
    keeps a nice value per thread and a thread inherits its creator's, so OpenMP's workers,
    created by the first parallel region the thread runs, get it too. Calling it again sets the
    same value. Elsewhere, or where the platform refuses, the thread keeps its priority."""
    if increment <= 0:
        return
    with contextlib.suppress(AttributeError, OSError):
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())  # the main thread's on Linux
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, base + increment))
