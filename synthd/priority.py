"""Real-time scheduling for the render thread.

The render thread must finish each block well within a period however busy the machine is
(a browser, a DAW, the OSC clients on the same laptop). At normal priority it shares the CPU
with all of them and its worst blocks grow with their load; under SCHED_FIFO it runs as soon
as it is runnable and only real-time threads go first. The default priority is the lowest
real-time one, so the audio server's threads still go before it; the device's callback thread,
which copies out of the ring, goes one above it unless its host already runs it real-time (JACK
does when its server is real-time; PortAudio's ALSA and a non-real-time JACK do not).

Linux grants SCHED_FIFO to root and to users with an rtprio limit (on most distributions
members of the `audio` group, as JACK set-ups already need); elsewhere the thread stays at
normal priority and the caller says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_PRIORITY = 1
MAX_PRIORITY = 98  # 99 is the kernel's own watchdogs'


@dataclass(frozen=True)
class Scheduling:
    """What the calling thread got: `priority` 0 is normal scheduling; `refused` says why a
    real-time priority that was asked for was not given (None when it was, or none was asked)."""

    priority: int
    refused: str | None = None

    def describe(self) -> str:
        if self.priority:
            return f"realtime (SCHED_FIFO {self.priority})"
        return "normal" + (f" (realtime refused: {self.refused})" if self.refused else "")


def make_realtime(priority: int) -> Scheduling:
    """Put the calling thread under SCHED_FIFO at `priority` (1..MAX_PRIORITY; 0 asks for
    nothing). Never raises: where the system refuses, the thread keeps its scheduling and the
    result says why."""
    if priority <= 0:
        return Scheduling(0)
    if not hasattr(os, "sched_setscheduler"):
        return Scheduling(0, "not supported on this system")
    priority = min(priority, MAX_PRIORITY)
    try:
        # pid 0 is the calling thread on Linux, not the whole process
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        limit = _rtprio_limit()
        return Scheduling(0, reason if limit is None else f"{reason}; this user's rtprio limit is {limit}")
    return Scheduling(priority)


def lift_if_normal(priority: int) -> Scheduling:
    """SCHED_FIFO at `priority` for the calling thread, unless it already runs realtime: an audio
    server's client thread keeps the priority the server chose for it."""
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) in (os.SCHED_FIFO, os.SCHED_RR):
        return Scheduling(os.sched_getparam(0).sched_priority)
    return make_realtime(priority)


def _rtprio_limit() -> int | None:
    try:
        import resource

        return int(resource.getrlimit(resource.RLIMIT_RTPRIO)[0])
    except (ImportError, AttributeError, OSError, ValueError):
        return None
