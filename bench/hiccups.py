"""Platform stalls: how late a high-priority thread wakes from 1 ms sleeps, with nothing of
synthd's in its way.

A thread of this process (alone, so no other Python thread holds its GIL) asks for SCHED_FIFO
90, above anything synthd or the audio server runs, then sleeps 1 ms at a time for the given
seconds and records how late each wake comes. Stalls it sees are the machine's (a virtual
machine's vCPU descheduled by its host, firmware interrupts, the kernel), and no priority
inside the guest avoids them: a render that meets one of 10 ms at 2 blocks ahead underruns
whatever synthd does. `bench/soak.py` runs it beside synthd and prints its line, so that a late
underrun can be weighed against what the platform did meanwhile.

    .venv/bin/python bench/hiccups.py 60                    # a minute; prints one line
    .venv/bin/python bench/hiccups.py 60 --stalls-over 4    # and when each stall over 4 ms came
    .venv/bin/python bench/hiccups.py 60 --cpu 1            # CPU 1 alone (the soaks run one per CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

PRIORITY = 90
SLEEP_S = 0.001


def probe(seconds: float, cpu: int | None = None) -> tuple[str, list[float]]:
    """Sleep-and-wake for `seconds` (on CPU `cpu` alone, if given); one line of figures (ms of
    lateness), and every wake's `time.monotonic()` (the same clock in every process) with its
    lateness in ms."""
    where = ""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
        where = f" on CPU {cpu}"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(PRIORITY))
        scheduling = f"SCHED_FIFO {PRIORITY}"
    except (OSError, AttributeError) as exc:
        scheduling = f"normal priority (realtime refused: {exc}), so its figures include the load's"
    late, woke = [], []
    end = time.monotonic() + seconds
    while (start := time.monotonic()) < end:
        time.sleep(SLEEP_S)
        woke.append(now := time.monotonic())
        late.append(now - start - SLEEP_S)
    if scheduling.startswith("SCHED_FIFO"):
        # the figures take a few hundred milliseconds of CPU: at FIFO 90 on every CPU they would
        # starve synthd's render thread at the end of a soak (a 200 ms render, late underruns)
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    ms = 1000.0 * np.asarray(late)
    counts = ", ".join(f">{limit:g} ms {int((ms > limit).sum())}" for limit in (2, 5, 10))
    line = (f"platform stalls ({scheduling} probe thread{where}, {seconds:.0f} s of 1 ms sleeps): late by median "
            f"{np.median(ms):.3f} ms, p99.9 {np.percentile(ms, 99.9):.2f}, max {ms.max():.2f}; {counts}")
    return line, list(zip(woke, ms.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seconds", type=float, nargs="?", default=60.0, help="how long (default 60)")
    parser.add_argument("--stalls-over", type=float, metavar="MS",
                        help="then print, as a JSON line, [monotonic time, ms] of every wake later than MS")
    parser.add_argument("--cpu", type=int, help="pin the probe to this CPU: a virtual machine's host can "
                        "stall one vCPU while the others run, so run one probe per CPU to see every stall")
    args = parser.parse_args()
    line, wakes = probe(args.seconds, args.cpu)
    print(line, flush=True)
    if args.stalls_over is not None:
        print(json.dumps([(t, round(ms, 3)) for t, ms in wakes if ms > args.stalls_over]), flush=True)


if __name__ == "__main__":
    main()
