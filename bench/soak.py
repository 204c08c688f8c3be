"""Soak: `synthd run` for N minutes on the JACK dummy server under a steady control stream.

An OSC stream at 1 kHz sweeps every control (`/synthd/control/<name>`, slow sines, one
message per millisecond, controls in turn) while a MIDI CC stream moves CCs 21-28 through
synthd's virtual JACK MIDI input. Prints underruns, render time (mean, p99, max, against
the block's time budget), NaN blocks, invalid messages, JACK server xruns, and synthd's
resident memory at the start (after a warm-up) and at the end.

With `--chords R` (a model with a pitch input: 8 voices), an 8-note chord is held all along and
changes R times a second (all eight notes released, eight others pressed), so every voice is
always sounding and every new note steals one still in its release.

With `--web-clients N`, synthd also serves HTTP and N WebSocket clients LISTEN to every
control and the gain the whole time (OSCQuery pushes, at most 60 per second and path).

With `--input`, synthd plays live audio input (`--input virtual`): a JACK client of this
script's loops a 30 s phrase into synthd's input port (tones of 0.15-1.5 s at pitches from A2 to
A5 that glide at times, with vibrato, at levels from -36 to -6 dBFS that swell or fade within
the tone, between 0.05-0.8 s of silence), the control stream runs at a modest 100 messages a
second unless --osc-rate says otherwise, and a second OSC stream moves the input's settings
(/synthd/input/transpose, gain_db, dry_wet, 10 a second in turn). It reports besides the input's
underruns (blocks rendered without input) and overruns (input dropped), the render time's p99
against half a period (the worst 22 s window seen at the reports), and the input's level and
fault. The model is --model, else make demo's model, else the tests' pitched model (the real
export's streaming encoder and pitch tracker, a tiny decoder).

Beside synthd, `bench/hiccups.py` (a SCHED_FIFO 90 thread of its own process, waking every 1 ms,
one pinned to each CPU) counts the machine's own stalls: a virtual machine's host can stall the
guest's threads for 10 ms, and one such stall at 2 blocks ahead is an underrun no priority inside the guest
avoids. A thread of this script polls synthd's late underruns every 0.25 s, and the summary says
how many of the intervals in which they came also held a stall over 4 ms that a probe saw,
against the share of all intervals that held one (what chance alone would give).

Targets: no underrun that synthd causes (a ring found empty while the server kept time;
those right after a server xrun are the server's, and those in an interval that held a
platform stall over 4 ms are the platform's: the verdict also says what it would be with
every late underrun counted as synthd's), memory growth < 5 MB.

    .venv/bin/python bench/soak.py                      # 10 minutes, make demo's model
    .venv/bin/python bench/soak.py --minutes 2 --model demo-out/demo.ts
    .venv/bin/python bench/soak.py --input              # 10 minutes of live input
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np

from live_rig import DEMO_MODEL, LiveRig, vm_rss_mb
from support.synthd_proc import OscClient

WARMUP_S = 5.0
REPORT_EVERY_S = 10.0
PHRASE_S = 30.0  # --input: the phrase looped into synthd's input
INPUT_OSC_RATE = 10.0  # --input: /synthd/input/* messages per second
LATE_POLL_S = 0.25  # late underruns are dated to this, and weighed against the probes' stalls
STALL_MS = 4.0  # the probes' stalls counted there: 2 blocks ahead leave a render ~9 ms of margin,
# and a stall this long already eats most of it on a loaded host
# a platform stall that ended this long before a late underrun may have caused it: the ring's
# 10.7 ms at 2 blocks ahead, a period, and room for the render that was due
TRACE_REACH_S = 0.025
P99_CLEAN_S = 30.0  # from then on synthd's p99 window (its last 4096 renders, ~22 s) holds no warm-up


def paced(rate: float, stop: threading.Event, sent: list[int], send: Callable[[int, float], None]) -> None:
    """Call `send(i, t)` every 1/rate s until `stop` (paced on a deadline, so the rate holds);
    `sent[0]` counts the calls, `t` is the time since the start."""
    period = 1.0 / rate
    t0 = next_at = time.monotonic()
    i = 0
    while not stop.is_set():
        send(i, time.monotonic() - t0)
        i += 1
        sent[0] = i
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.1:
            next_at = time.monotonic()  # fell far behind (host busy): do not burst to catch up


def osc_stream(rig: LiveRig, names: list[str], rate: float, stop: threading.Event, sent: list[int]) -> None:
    """Slow sines on every control in turn, one message every 1/rate s."""
    def send(i: int, t: float) -> None:
        value = 0.5 + 0.45 * math.sin(2 * math.pi * t / (3.0 + (i % len(names))))
        rig.osc.send(f"/synthd/control/{names[i % len(names)]}", value)

    paced(rate, stop, sent, send)


def midi_stream(rig: LiveRig, rate: float, stop: threading.Event, sent: list[int]) -> None:
    """CCs 21-28 in turn, a 4 s sine, one message every 1/rate s."""
    def send(i: int, t: float) -> None:
        rig.midi.send_message([0xB0, 21 + i % 8, int(63.5 + 63.5 * math.sin(2 * math.pi * i / (rate * 4.0)))])

    paced(rate, stop, sent, send)


def chord_stream(rig: LiveRig, rate: float, stop: threading.Event, sent: list[int]) -> None:
    """An 8-note chord, a new one every 1/rate s (the old one released first); `sent` counts notes."""
    held: list[int] = []

    def send(i: int, t: float) -> None:
        for note in held:
            rig.midi.send_message([0x80, note, 0])
        root = 36 + (i * 5) % 24
        held[:] = [root + step for step in (0, 4, 7, 11, 14, 17, 21, 24)]
        for note in held:
            rig.midi.send_message([0x90, note, 90])
        sent[0] = (i + 1) * 8

    paced(rate, stop, [0], send)
    for note in held:
        rig.midi.send_message([0x80, note, 0])


def late_watch(address: tuple[str, int], stop: threading.Event, polls: list[tuple[float, int]]) -> None:
    """Poll synthd's late underruns every LATE_POLL_S on a socket of its own, appending
    (time.monotonic(), count): a late underrun is dated to the interval between two polls."""
    client = OscClient(address)
    try:
        while not stop.wait(LATE_POLL_S):
            try:
                polls.append((time.monotonic(), client.status()["late_underruns"]))
            except TimeoutError:
                continue
    finally:
        client.close()


def coincidences(polls: list[tuple[float, int]], stalls: list[tuple[float, float]]) -> tuple[str, int]:
    """How many of the poll intervals in which late underruns came also held a platform stall the
    probe saw, against the share of all intervals that held one (what chance alone would give);
    and how many late underruns came in intervals that held none (those the platform does not
    explain: synthd's own)."""
    intervals = list(zip(polls, polls[1:]))
    if not intervals:
        return "no polls", 0

    def stalled(t0: float, t1: float) -> bool:
        # the probe dates a stall at its late wake; the stall began up to its length before
        return any(t0 - ms / 1000.0 <= t <= t1 for t, ms in stalls)

    late = [(stalled(a[0], b[0]), b[1] - a[1]) for a, b in intervals if b[1] > a[1]]
    hit = sum(explained for explained, _ in late)
    unexplained = sum(count for explained, count in late if not explained)
    base = sum(stalled(a[0], b[0]) for a, b in intervals) / len(intervals)
    return (f"{hit} of the {len(late)} {LATE_POLL_S:g} s intervals with late underruns held a stall over "
            f"{STALL_MS:g} ms that a probe saw too (chance alone: {100 * base:.1f} % of all intervals); "
            f"late underruns in intervals without one: {unexplained}"), unexplained


def traced(log: str, stalls: list[tuple[float, float]]) -> list[str]:
    """Lines on synthd's own account of each late underrun (its log's `late underrun at T s: CAUSE
    (...)`, see synthd/trace.py): how many had each cause, with and without a probe stall within
    TRACE_REACH_S before it, and the whole account of those without one (at most 8)."""
    found = re.findall(r"late underrun at ([0-9.]+) s: (\w+) (.*)", log)
    if not found:
        return ["traced late underruns: none in synthd's log"]

    def near(at: float) -> bool:
        # a probe's stall (dated at its late wake, `ms` long) overlapping the reach before `at`
        return any(t >= at - TRACE_REACH_S and t - ms / 1000.0 <= at for t, ms in stalls)

    counts: dict[tuple[str, bool], int] = {}
    alone = []
    for at, cause, rest in found:
        stalled = near(float(at))
        counts[cause, stalled] = counts.get((cause, stalled), 0) + 1
        if not stalled:
            alone.append(f"  {cause} {rest}")
    causes = sorted({c for c, _ in counts})
    lines = [f"traced late underruns ({len(found)}), by what held the render thread: " + "; ".join(
        f"{c} {counts.get((c, False), 0)} alone + {counts.get((c, True), 0)} near a probe stall" for c in causes)]
    return lines + alone[:8]


def input_phrase(rate: int, seconds: float = PHRASE_S, seed: int = 0) -> np.ndarray:
    """`seconds` of mono float32 to loop into synthd's input: tones of 0.15-1.5 s between gaps of
    0.05-0.8 s of silence. Each tone has three harmonics (1, 0.4, 0.2), a pitch from MIDI 45 to 81
    that glides up to 5 semitones in a third of them, a 5 Hz vibrato of +-1 %, a level from -36 to
    -6 dBFS that moves by -12..+6 dB over the tone, and 10 ms cosine fades."""
    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    out = np.zeros(total, dtype=np.float64)
    pos = int(0.2 * rate)
    while True:
        n = int(rng.uniform(0.15, 1.5) * rate)
        if pos + n > total:
            break
        t = np.arange(n) / rate
        start = 440.0 * 2 ** ((rng.uniform(45, 81) - 69) / 12)
        glide = rng.uniform(-5, 5) if rng.random() < 1 / 3 else 0.0
        freq = start * 2 ** (glide * t / t[-1] / 12) * (1 + 0.01 * np.sin(2 * np.pi * 5.0 * t))
        phase = 2 * np.pi * np.cumsum(freq) / rate
        tone = (np.sin(phase) + 0.4 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase)) / 1.6
        level_db = rng.uniform(-36, -6) + rng.uniform(-12, 6) * t / t[-1]
        fade = int(0.01 * rate)
        ramp = 0.5 * (1 - np.cos(np.pi * np.arange(fade) / fade))
        env = np.ones(n)
        env[:fade], env[-fade:] = ramp, ramp[::-1]
        out[pos:pos + n] = tone * env * 10 ** (level_db / 20)
        pos += n + int(rng.uniform(0.05, 0.8) * rate)
    return out.astype(np.float32)


def input_osc_stream(rig: LiveRig, rate: float, stop: threading.Event, sent: list[int]) -> None:
    """The input's settings in turn, one message every 1/rate s: transpose (a 20 s sine over +-12
    semitones), gain_db (a 7 s sine over +-3 dB), dry_wet (an 11 s sine over 0.8..1)."""
    def send(i: int, t: float) -> None:
        if i % 3 == 0:
            rig.osc.send("/synthd/input/transpose", 12.0 * math.sin(2 * math.pi * t / 20.0))
        elif i % 3 == 1:
            rig.osc.send("/synthd/input/gain_db", 3.0 * math.sin(2 * math.pi * t / 7.0))
        else:
            rig.osc.send("/synthd/input/dry_wet", 0.9 + 0.1 * math.sin(2 * math.pi * t / 11.0))

    paced(rate, stop, sent, send)


def web_clients(url: str, paths: list[str], count: int, stop: threading.Event, received: list[int]) -> None:
    """`count` WebSocket clients LISTENing to `paths` until `stop`; `received[0]` counts pushes."""
    import aiohttp

    async def one(session) -> None:
        async with session.ws_connect(url) as ws:
            for path in paths:
                await ws.send_str(json.dumps({"COMMAND": "LISTEN", "DATA": path}))
            while not stop.is_set():
                try:
                    message = await ws.receive(timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if message.type == aiohttp.WSMsgType.BINARY:
                    received[0] += 1
                elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return

    async def all_clients() -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(one(session) for _ in range(count)))

    asyncio.run(all_clients())


def fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak time (default 10)")
    parser.add_argument("--model", help="model file (default: demo-out/demo.ts from `make demo`)")
    parser.add_argument("--period", type=int, default=256, help="JACK period and synthd block (default 256)")
    parser.add_argument("--osc-rate", type=float, help="OSC control messages per second (default 1000; "
                        "100 with --input)")
    parser.add_argument("--cc-rate", type=float, default=100.0, help="MIDI CCs per second (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="synthd's torch threads (default 1)")
    parser.add_argument("--chords", type=float, default=0.0, help="chord changes per second, 8 notes held "
                        "(default 0: no notes)")
    parser.add_argument("--web-clients", type=int, default=0, help="WebSocket clients listening to every "
                        "control (default 0: no HTTP)")
    parser.add_argument("--render-priority", type=int, help="synthd's --render-priority (default: synthd's, 1); "
                        "0 plays at normal scheduling, for a baseline")
    parser.add_argument("--ahead-blocks", type=int, help="synthd's --ahead-blocks (default: synthd's, 2); "
                        "1 is the low-latency setting for --input")
    parser.add_argument("--input", action="store_true", help="live audio input: synthd run --input virtual, "
                        "a phrase looped into it, its settings moved over OSC")
    args = parser.parse_args()
    if args.osc_rate is None:
        args.osc_rate = 100.0 if args.input else 1000.0
    # SIGTERM unwinds like Ctrl-C, so synthd and the JACK server are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with ExitStack() as stack:
        return soak(args, stack)


def soak(args: argparse.Namespace, stack: ExitStack) -> int:
    """The soak itself; `stack` holds what must outlive synthd (a model built here)."""
    extra: tuple[str, ...] = ("--http-port", "0") if args.web_clients else ()
    if args.ahead_blocks is not None:
        extra += ("--ahead-blocks", str(args.ahead_blocks))
    if args.render_priority is not None:
        extra += ("--render-priority", str(args.render_priority))
    model = args.model
    if args.input:
        extra += ("--input", "virtual")
        if model is None and DEMO_MODEL.exists():
            model = str(DEMO_MODEL)
        elif model is None:
            from support.pitched_model import build_pitched_model

            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="synthd-soak-")))
            model = str(build_pitched_model(scratch / "pitched.ts"))
            print(f"(no --model and no {DEMO_MODEL}: using the tests' pitched model)", file=sys.stderr)
    with LiveRig(model, period=args.period, threads=args.threads, extra_args=extra) as rig, ExitStack() as live:
        rig.watchdog(args.minutes * 60.0 + WARMUP_S + 60.0)
        names = rig.controls()
        print(f"soak: {rig.model} ({len(names)} controls), JACK dummy {rig.server.rate} Hz / "
              f"{args.period} frames, ahead {args.ahead_blocks or 'default'}, OSC {args.osc_rate:g}/s, MIDI CC {args.cc_rate:g}/s, "
              + (f"input {rig.status()['input']} ({PHRASE_S:g} s phrase looped, /synthd/input/* "
                 f"{INPUT_OSC_RATE:g}/s), " if args.input else "")
              + f"{args.minutes:g} min", file=sys.stderr)
        if args.input:
            from support.jack import Player

            player = live.enter_context(Player(rig.server.name, name="bench-player"))  # closed before synthd
            player.connect_to(rig.status()["input"])
            player.play(input_phrase(rig.server.rate), loop=True)
        time.sleep(WARMUP_S)
        pid = rig.synthd.proc.pid
        mem_start = vm_rss_mb(pid)
        before = rig.status()
        xruns_before = rig.xruns
        stop = threading.Event()
        osc_sent, cc_sent, pushed, notes_sent, input_sent = [0], [0], [0], [0], [0]
        p99_worst = 0.0  # of the p99 windows (the last STATS_WINDOW renders) that hold soak time only
        workers = [threading.Thread(target=osc_stream, name="osc", args=(rig, names, args.osc_rate, stop, osc_sent), daemon=True),
                   threading.Thread(target=midi_stream, name="midi", args=(rig, args.cc_rate, stop, cc_sent), daemon=True)]
        if args.input:
            workers.append(threading.Thread(target=input_osc_stream, name="input-osc", daemon=True,
                                            args=(rig, INPUT_OSC_RATE, stop, input_sent)))
        if args.chords:
            workers.append(threading.Thread(target=chord_stream, name="chords", daemon=True,
                                            args=(rig, args.chords, stop, notes_sent)))
        if args.web_clients:
            url = re.search(r"web (http://\S+)", rig.synthd.startup).group(1)
            paths = [f"/synthd/control/{n}" for n in names] + ["/synthd/gain"]
            workers.append(threading.Thread(target=web_clients, name="web", daemon=True,
                                            args=(url, paths, args.web_clients, stop, pushed)))
        for w in workers:
            w.start()
        total = args.minutes * 60.0
        # one probe per CPU: a host can stall the vCPU synthd's render thread is on and no other
        probes = [live.enter_context(subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("hiccups.py")), str(total), "--stalls-over", str(STALL_MS),
             "--cpu", str(cpu)], stdout=subprocess.PIPE, text=True)) for cpu in sorted(os.sched_getaffinity(0))]
        polls: list[tuple[float, int]] = []
        watcher = threading.Thread(target=late_watch, name="late-watch", daemon=True,
                                   args=(rig.synthd.osc_address, stop, polls))
        watcher.start()
        t0 = time.monotonic()
        try:
            while (elapsed := time.monotonic() - t0) < total:
                time.sleep(min(REPORT_EVERY_S, total - elapsed))
                elapsed = time.monotonic() - t0
                status = rig.status()
                if elapsed >= P99_CLEAN_S:
                    p99_worst = max(p99_worst, status["render_ms_p99"])
                inputs = (f", input under/overruns {status['input_underruns'] - before['input_underruns']}/"
                          f"{status['input_overruns'] - before['input_overruns']}, level "
                          f"{status['input_level_db']:.0f} dB" if args.input else "")
                print(f"soak {fmt(elapsed)}/{fmt(total)} ETA {fmt(total - elapsed)}: underruns "
                      f"{status['underruns'] - before['underruns']} (late "
                      f"{status['late_underruns'] - before['late_underruns']}), render load "
                      f"{status['render_load_mean']:.3f} (peak {status['render_load_peak']:.2f}, p99 "
                      f"{status['render_ms_p99']:.2f} ms), RSS {vm_rss_mb(pid):.1f} MB, OSC {osc_sent[0]}, "
                      f"CC {cc_sent[0]}{inputs}", file=sys.stderr)
        finally:
            stop.set()
            for w in workers:
                # rtmidi's JACK output blocks while its client gets no process cycles
                w.join(timeout=2.0)
        stalled = [w.name for w in workers if w.is_alive()]
        watcher.join(timeout=5.0)
        platform, stalls = [], []
        for probe in probes:
            try:
                line, stall_line = (probe.communicate(timeout=10)[0].strip().splitlines() + [""])[:2]
                platform.append(line)
                stalls += [tuple(x) for x in json.loads(stall_line or "[]")]
            except subprocess.TimeoutExpired:
                probe.kill()
                platform.append("platform stalls: a probe did not finish")
        together, unexplained = coincidences(polls, stalls)
        time.sleep(2 * 0.1)  # synthd logs its traces at its next look at the output
        accounts = traced(rig.synthd.log, stalls)
        time.sleep(0.5)
        after = rig.status()
        mem_end = vm_rss_mb(pid)
        elapsed = time.monotonic() - t0
        alive = rig.synthd.alive

    block_ms = 1000.0 * args.period / after["sample_rate"]
    underruns = after["underruns"] - before["underruns"]
    growth = mem_end - mem_start
    print(f"soak: {elapsed / 60:.2f} min of {after['model']} at {after['sample_rate']} Hz, "
          f"block {args.period} frames ({block_ms:.2f} ms)")
    print(f"  underruns           {underruns}   (synthd's count; JACK server xruns seen by a "
          f"watcher client: {rig.xruns - xruns_before})")
    late = after["late_underruns"] - before["late_underruns"]
    print(f"    of which          ring empty at a callback while the server kept time (synthd rendered "
          f"late): {late}; ring empty just after a server xrun (its catch-up cycles drained it): "
          f"{after['xrun_underruns'] - before['xrun_underruns']}; PortAudio output underflows "
          f"(server xruns): {after['output_underflows'] - before['output_underflows']}")
    p99 = after.get("render_ms_p99")
    print(f"  render time (ms)    mean {after['render_load_mean'] * block_ms:.3f}, "
          f"p99 {'%.3f' % p99 if p99 is not None else 'n/a (not in /synthd/status.reply)'}, "
          f"max {after['render_load_peak'] * block_ms:.3f}   (whole run, budget {block_ms:.2f} per block)")
    print(f"  render load         mean {after['render_load_mean']:.3f}, peak {after['render_load_peak']:.3f}"
          "   (render time / audio time)")
    for line in platform:
        print(f"  {line}")
    print(f"    late underruns    {together}")
    for line in accounts:
        print(f"    {line}")
    print(f"  callbacks held      {after['callbacks_held'] - before['callbacks_held']} held over 1 ms before their "
          f"code ran (waiting for the interpreter's lock that another thread of synthd held), longest "
          f"{after['callback_held_ms_max']:.1f} ms: a hold near a period makes the server's cycle late, an xrun")
    print(f"  scheduling          render thread {after.get('render_scheduling') or 'n/a'}, "
          f"callback thread {after.get('callback_scheduling') or 'n/a'}")
    print(f"  NaN blocks          {after['nan_blocks'] - before['nan_blocks']}")
    print(f"  messages            OSC {osc_sent[0]} ({osc_sent[0] / elapsed:.0f}/s), MIDI CC {cc_sent[0]}, "
          f"invalid {after['invalid'] - before['invalid']}, clamped {after['clamped'] - before['clamped']}")
    if args.chords:
        print(f"  notes               {notes_sent[0]} note-ons ({args.chords:g} chords of 8 a second), voices "
              f"{after['voices']}, stolen {after['voices_stolen'] - before['voices_stolen']}")
    if args.input:
        half_ms = block_ms / 2
        p99_end = after["render_ms_p99"]
        print(f"  input               {after['input']}: input underruns (blocks rendered without input) "
              f"{after['input_underruns'] - before['input_underruns']}, input overruns (input dropped) "
              f"{after['input_overruns'] - before['input_overruns']}, fault at the end "
              f"{after['input_fault'] or 'none'}, level at the end {after['input_level_db']:.1f} dBFS, "
              f"/synthd/input/* messages {input_sent[0]}")
        worst = f"{p99_worst:.3f} ms ({p99_worst / half_ms:.2f}x)" if p99_worst else "n/a (a run under 30 s)"
        print(f"  render p99 vs half a period ({half_ms:.2f} ms): last ~22 s {p99_end:.3f} ms "
              f"({p99_end / half_ms:.2f}x); worst window seen at the reports {worst}")
    if args.web_clients:
        print(f"  WebSocket clients   {args.web_clients}, listening to {len(names) + 1} paths each: "
              f"{pushed[0]} pushes ({pushed[0] / elapsed / args.web_clients:.0f}/s per client)")
    print(f"  memory (RSS)        start {mem_start:.1f} MB, end {mem_end:.1f} MB, growth {growth:+.2f} MB")
    print(f"  synthd still running at the end: {alive}")
    if stalled:
        print(f"  stream threads still blocked at the end: {stalled} (the JACK server stopped serving them)")
    ok = unexplained == 0 and growth < 5.0 and alive
    print(f"  targets (no underrun synthd causes, growth < 5 MB): {'met' if ok else 'NOT met'} (late underruns "
          f"outside the platform's stalls: {unexplained}; with every late underrun counted as synthd's: "
          f"{'met' if ok and late == 0 else 'NOT met'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
