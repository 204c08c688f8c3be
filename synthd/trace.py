"""A flight recorder of the render thread: what it did in the periods before a late underrun.

A late underrun (the device's callback found the ring short while the server kept time) is a
click the render thread caused, and its cause is gone by the time anyone looks. The recorder
keeps the last renders' timings in preallocated arrays (clock reads and one read of the
thread's scheduler statistics at each end of a render, about 3 µs) and the last callbacks'
times and holds (see LiveOutput._callback), and when a callback reports a late underrun, the
render thread copies them once it is done with the block in hand. `describe` splits the
renders' wall time into time on the CPU (the garbage collector's share and the model calls'
time given apart), time runnable but not run (another thread or process held the CPU), and
time off the CPU waiting (the interpreter's lock, a page fault, a host that stole the CPU), and
gives the delay from each callback to the render it woke (which holds the wait for MIDI of the
same cycle, `LiveOutput.event_grace_s`).
"""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

RENDERS = 16  # renders kept: at 256 frames, 85 ms, several times any ring
CALLBACKS = 16
KEPT = 32  # late underruns kept until someone takes them
# renders this long before a late underrun (beyond the ring's time) are shown with it
BEFORE_S = 0.004

# columns of a render's record
WOKEN, START, END, CPU, WAIT, FILL, GC, MODEL = range(8)


@dataclass(frozen=True)
class LateTrace:
    """The renders and callbacks around one late underrun, times relative to it (ms)."""

    at: float  # time.monotonic() of the callback that found the ring short
    renders: np.ndarray  # (n, 8): woken, start, end (ms), cpu, wait (ms), fill (frames) at start, gc, model calls (ms)
    callbacks: np.ndarray  # (m, 2): callback times (ms), the late one last at 0, and how long each was held (ms)
    period_ms: float

    def components(self) -> dict[str, float]:
        """Milliseconds of the shown renders' wall time spent computing (`cpu`, of which `gc` in the
        interpreter's cyclic garbage collector), runnable but not run (`runnable`), off the CPU
        waiting (`waiting`), and from callbacks to the renders they woke (`woke`)."""
        r = self.renders
        if len(r) == 0:
            return {"cpu": 0.0, "gc": 0.0, "runnable": 0.0, "waiting": 0.0, "woke": 0.0}
        wall = r[:, END] - r[:, START]
        cpu, runnable = r[:, CPU], np.nan_to_num(r[:, WAIT])
        return {"cpu": float(cpu.sum()), "gc": float(r[:, GC].sum()), "runnable": float(runnable.sum()),
                "waiting": float(np.clip(wall - cpu - runnable, 0.0, None).sum()),
                "woke": float(np.clip(r[:, START] - r[:, WOKEN], 0.0, None).sum())}

    def cause(self) -> str:
        """What took the renders' time: `computing` where their CPU time is the largest part, else
        the largest of `runnable`, `waiting` and `woke` (see `components`)."""
        parts = self.components()
        lost = {k: v for k, v in parts.items() if k not in ("cpu", "gc")}
        worst = max(lost, key=lost.get)
        return "computing" if parts["cpu"] >= lost[worst] else worst

    def describe(self) -> str:
        """One line: the cause, the parts, each render and the callbacks' spacing (`at` is on the
        system's monotonic clock, which other processes read too)."""
        parts = self.components()
        rows = ", ".join(f"{e - s:.1f} ms from {s:+.1f} (model calls {m:.1f}, cpu {c:.1f}{f', gc {g:.1f}' if g else ''}, "
                         f"runnable {w:.1f}, woken {s - k:.1f} after its callback, ring {int(f)})"
                         for k, s, e, c, w, f, g, m in self.renders)
        gaps = np.diff(self.callbacks[:, 0])
        held = self.callbacks[:, 1]
        return (f"late underrun at {self.at:.4f} s: {self.cause()} (in the {len(self.renders)} renders before it: "
                f"cpu {parts['cpu']:.1f} ms (gc {parts['gc']:.1f}), "
                f"runnable but not run {parts['runnable']:.1f}, waiting off the CPU {parts['waiting']:.1f}, "
                f"callback to render {parts['woke']:.1f}); renders {rows}; callbacks "
                f"{' '.join(f'{g:.1f}' for g in gaps)} ms apart (period {self.period_ms:.2f}), held "
                f"{' '.join('?' if math.isnan(h) else f'{h:.1f}' for h in held)} ms before their code ran")


class RenderTrace:
    """Kept by the render thread (`begin`/`end`/`collect`) and the device's callback (`callback`);
    read by any thread (`take`)."""

    def __init__(self, period_s: float, ring_s: float) -> None:
        self.period_s, self.ring_s = period_s, ring_s
        self._renders = np.zeros((RENDERS, 8))
        self._rendered = 0
        self._callbacks = np.zeros((CALLBACKS, 2))
        self._called = 0
        self._late_at = 0.0  # set by the callback, taken by the render thread
        self._kept: deque[LateTrace] = deque(maxlen=KEPT)
        self._lost = 0
        self._lock = threading.Lock()
        self._stat = -1
        self._row = self._renders[0]
        self._thread = 0  # the render thread's ident, whose collections are counted
        self._gc_ms = 0.0  # the collector's time on that thread so far
        self._gc_since = 0.0

    def open(self) -> None:
        """On the render thread, before its first render: its own scheduler statistics."""
        try:
            self._stat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:  # not Linux: no run-queue wait
            self._stat = -1
        self._thread = threading.get_ident()
        gc.callbacks.append(self._collected)

    def close(self) -> None:
        if self._collected in gc.callbacks:
            gc.callbacks.remove(self._collected)
        if self._stat >= 0:
            os.close(self._stat)
            self._stat = -1

    def _collected(self, phase: str, info: dict) -> None:
        # the collector runs in whichever thread allocates past its threshold, holding the lock
        # of the interpreter: counted where that thread is the render thread
        if threading.get_ident() != self._thread:
            return
        if phase == "start":
            self._gc_since = time.monotonic()
        else:
            self._gc_ms += (time.monotonic() - self._gc_since) * 1e3

    def _clocks(self) -> tuple[float, float]:
        """The thread's CPU time and run-queue wait so far (ms). The CPU time from the thread's own
        clock: the scheduler's statistics count a running thread's time only at its ticks and
        switches (a 3 ms render could read 0), while the wait is counted when the thread gets
        the CPU, so it is up to date whenever the thread runs."""
        wait = int(os.pread(self._stat, 64, 0).split()[1]) * 1e-6 if self._stat >= 0 else math.nan
        return time.thread_time_ns() * 1e-6, wait

    def begin(self, woken: float, fill: int, model_s: float) -> None:
        """A render starts: `woken` is the time of the callback that woke it, `fill` the ring's,
        `model_s` the engine's time in model calls so far (s)."""
        row = self._row = self._renders[self._rendered % RENDERS]
        cpu, wait = self._clocks()
        row[WOKEN], row[START], row[CPU], row[WAIT], row[FILL] = woken, time.monotonic(), cpu, wait, fill
        row[END] = float("nan")  # in progress
        row[GC], row[MODEL] = self._gc_ms, model_s

    def end(self, model_s: float) -> None:
        row = self._row
        cpu, wait = self._clocks()
        row[END] = time.monotonic()
        row[CPU], row[WAIT], row[GC] = cpu - row[CPU], wait - row[WAIT], self._gc_ms - row[GC]
        row[MODEL] = (model_s - row[MODEL]) * 1e3
        self._rendered += 1

    def callback(self, now: float, late: bool, held: float) -> None:
        """In the device's callback: its time, whether it found the ring short (a late underrun),
        and how long the previous callback was held before its code ran (s; NaN: not known)."""
        if self._called:
            self._callbacks[(self._called - 1) % CALLBACKS, 1] = held * 1e3
        row = self._callbacks[self._called % CALLBACKS]
        row[0], row[1] = now, math.nan
        self._called += 1
        if late and not self._late_at:
            self._late_at = now

    def collect(self) -> None:
        """On the render thread between renders: keep the record of a late underrun reported since."""
        at = self._late_at
        if not at:
            return
        self._late_at = 0.0
        count = min(self._rendered, RENDERS)
        renders = self._renders[(np.arange(count) + self._rendered - count) % RENDERS]  # oldest first
        keep = renders[:, END] >= at - self.ring_s - self.period_s - BEFORE_S
        renders = renders[keep].copy()
        for c in (WOKEN, START, END):
            renders[:, c] = (renders[:, c] - at) * 1e3
        calls = self._callbacks[:min(self._called, CALLBACKS)]
        calls = calls[np.argsort(calls[:, 0])]
        calls = calls[calls[:, 0] <= at][-6:].copy()
        calls[:, 0] = (calls[:, 0] - at) * 1e3
        with self._lock:
            if len(self._kept) == KEPT:
                self._lost += 1
            self._kept.append(LateTrace(at, renders, calls, self.period_s * 1e3))

    def take(self) -> tuple[list[LateTrace], int]:
        """The late underruns recorded since the last call, and how many more were not kept."""
        with self._lock:
            kept, lost = list(self._kept), self._lost
            self._kept.clear()
            self._lost = 0
        return kept, lost
