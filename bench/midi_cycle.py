"""Where synthd's MIDI input runs Python, and what that costs the JACK cycle.

With an rtmidi callback, rtmidi's JACK back-end calls the Python handler from inside the
JACK process cycle; the handler must first take the GIL, and the whole JACK graph waits
meanwhile. synthd instead drains rtmidi's lock-free queue from a reader thread of its own
(`synthd.midi.MidiInput`). This benchmark runs both side by side on the JACK dummy server
(48 kHz, 256 frames) in a child process shaped like synthd: a thread that holds the GIL in
short stretches (the render thread's Python), synthd's GIL switch interval, and a
sounddevice output stream. A MIDI CC stream at `--rate` messages per second goes in.

Per design it prints:
    in-cycle wait   how far into the JACK cycle the Python handler ran (callback only: the
                    cycle cannot end before it returns; the reader never holds the cycle)
    delivery        time from the send to the handler (both), p50 / p99 / max
    xruns           JACK server xruns seen by a watcher client, PortAudio output underflows

    .venv/bin/python bench/midi_cycle.py --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

CLIENT = "midi-cycle"


class _Recorder:
    """Stands in for synthd's MidiRouter: notes when each message reached Python."""

    def __init__(self, jack_client) -> None:
        self.jack = jack_client
        self.times: list[float] = []
        self.in_cycle: list[int] = []

    def handle_bytes(self, data: list[int], at: int | None = None) -> None:
        self.in_cycle.append(self.jack.frames_since_cycle_start)
        self.times.append(time.monotonic())


def child(design: str, seconds: float) -> None:
    """The synthd-shaped process: MIDI in by `design`, a GIL-busy thread, an output stream."""
    import jack
    import rtmidi
    import sounddevice as sd

    from synthd.audio import SWITCH_INTERVAL_S
    from synthd.midi import MidiInput

    probe = jack.Client(f"{CLIENT}-probe")
    probe.activate()
    recorder = _Recorder(probe)
    if design == "callback":
        port = rtmidi.MidiIn(rtapi=rtmidi.API_UNIX_JACK, name=CLIENT)
        port.open_virtual_port("midi_in")
        port.set_callback(lambda event, _data=None: recorder.handle_bytes(event[0]))
        close = port.close_port
    else:
        midi = MidiInput(recorder, "virtual")  # type: ignore[arg-type]
        close = midi.close
    stop = threading.Event()

    def busy() -> None:  # pure-Python stretches, as the render thread's glue between torch calls
        while not stop.is_set():
            t = time.perf_counter()
            while time.perf_counter() - t < 0.003:
                pass
            time.sleep(0.002)

    underflows = [0]

    def callback(out, frames, when, status) -> None:
        underflows[0] += bool(status.output_underflow)
        out.fill(0.0)

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    threading.Thread(target=busy, daemon=True).start()
    device = next(i for i, d in enumerate(sd.query_devices())
                  if "JACK" in sd.query_hostapis(d["hostapi"])["name"] and d["max_output_channels"] > 0)
    with sd.OutputStream(samplerate=48000, blocksize=0, device=device, channels=2, dtype="float32",
                         latency="low", callback=callback):
        print("ready", flush=True)
        time.sleep(seconds)
    stop.set()
    close()
    print(json.dumps({"times": recorder.times, "in_cycle": recorder.in_cycle,
                      "underflows": underflows[0], "rate": probe.samplerate}), flush=True)


def run_design(design: str, seconds: float, rate: float) -> dict:
    import rtmidi

    from support.jack import JackServer

    with JackServer(period=256) as server:
        os.environ.update({k: v for k, v in server.env().items() if k.startswith("JACK_")})
        proc = subprocess.Popen([sys.executable, __file__, "--child", design, "--seconds", str(seconds)],
                                env=server.env(dict(os.environ)), stdout=subprocess.PIPE, text=True)
        try:
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"{design}: the child process did not start")
            watch = server.client("midi-cycle-watch")
            xruns = [0]
            watch.set_xrun_callback(lambda _delay: xruns.__setitem__(0, xruns[0] + 1))
            watch.activate()
            out = rtmidi.MidiOut(rtapi=rtmidi.API_UNIX_JACK, name="midi-cycle-send")
            ports = out.get_ports()
            out.open_port(next(i for i, p in enumerate(ports) if p.endswith(":midi_in")))
            sent: list[float] = []
            t0 = next_at = time.monotonic()
            while time.monotonic() - t0 < seconds - 2.0:
                sent.append(time.monotonic())
                out.send_message([0xB0, 21, len(sent) % 128])
                next_at += 1.0 / rate
                if (delay := next_at - time.monotonic()) > 0:
                    time.sleep(delay)
            result = json.loads(proc.stdout.read().strip().splitlines()[-1])
            proc.wait(timeout=30)
            out.close_port()
            out.delete()
            watch.deactivate()
            watch.close()
        finally:
            if proc.poll() is None:
                proc.kill()
    n = min(len(sent), len(result["times"]))
    return {"sent": len(sent), "handled": len(result["times"]),
            "delivery_ms": 1000.0 * (np.array(result["times"][:n]) - np.array(sent[:n])),
            "in_cycle_ms": 1000.0 * np.array(result["in_cycle"], dtype=float) / result["rate"],
            "xruns": xruns[0], "underflows": result["underflows"]}


def spread(values: np.ndarray) -> str:
    if values.size == 0:
        return "-"
    return (f"p50 {np.percentile(values, 50):5.2f}  p99 {np.percentile(values, 99):5.2f}  "
            f"max {values.max():5.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="per design and repeat (default 30)")
    parser.add_argument("--rate", type=float, default=1000.0, help="MIDI messages per second (default 1000)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each design (default 2)")
    parser.add_argument("--child", choices=["callback", "reader"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.seconds)
        return 0
    print(f"JACK dummy 48000 Hz / 256 frames (5.33 ms), {args.rate:g} MIDI CC/s, {args.seconds:g} s per run")
    for repeat in range(args.repeats):
        for design in ("callback", "reader"):
            r = run_design(design, args.seconds, args.rate)
            wait = spread(r["in_cycle_ms"]) if design == "callback" else "none (JACK's thread never runs Python)"
            print(f"{design:8s} run {repeat + 1}: handled {r['handled']}/{r['sent']}\n"
                  f"  in-cycle wait  {wait}\n"
                  f"  delivery       {spread(r['delivery_ms'])}\n"
                  f"  xruns          JACK server {r['xruns']}, PortAudio underflows {r['underflows']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
