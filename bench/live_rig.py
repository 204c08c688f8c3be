"""The rig both live benchmarks drive: a JACK dummy server, a `synthd run` child process on
it, an OSC client and a JACK MIDI output connected to synthd's virtual MIDI input.

It reuses the test infrastructure (tests/support: JackServer, Recorder, SynthdProcess,
OscClient), so the benchmarks measure exactly what the tests exercise.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from support.jack import JackServer, Recorder  # noqa: E402
from support.synthd_proc import OscClient, SynthdProcess  # noqa: E402

DEMO_MODEL = REPO / "demo-out" / "demo.ts"

__all__ = ["LiveRig", "Recorder", "default_model", "vm_rss_mb"]


def default_model(given: str | None, scratch: Path) -> Path:
    """The model to play: `given`, else `make demo`'s model, else a toy model built here."""
    if given:
        return Path(given)
    if DEMO_MODEL.exists():
        return DEMO_MODEL
    from support.nnmodels import build_toy_model

    print(f"(no --model and no {DEMO_MODEL}: using a toy test model)", file=sys.stderr)
    return build_toy_model(scratch / "toy.ts", latent_size=8)


def vm_rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


class LiveRig:
    """JACK server + synthd + OSC client + MIDI out; a context manager that tears all down."""

    def __init__(self, model: str | None, *, period: int = 256, threads: int = 1,
                 extra_args: tuple[str, ...] = ()):
        self.model_arg = model
        self.period = period
        self.threads = threads
        self.extra_args = extra_args
        self._stack = ExitStack()

    def __enter__(self) -> "LiveRig":
        stack = self._stack
        try:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="synthd-bench-")))
            self.model = default_model(self.model_arg, scratch)
            self.server = stack.enter_context(JackServer(period=self.period))
            # this process's own JACK clients (MIDI out, watcher) go to the same server
            os.environ.update({k: v for k, v in self.server.env().items() if k.startswith("JACK_")})
            self.synthd = stack.enter_context(SynthdProcess(
                self.server, "--model", str(self.model), "--midi-in", "virtual",
                "--block-frames", str(self.period), "--threads", str(self.threads),
                "--log-level", "warning", *self.extra_args))
            self.osc = OscClient(self.synthd.osc_address)
            stack.callback(self.osc.close)
            self.midi = self._open_midi()
            stack.callback(self._close_midi)
            self.watch = self.server.client("bench-watch")
            self.xruns = 0
            self.watch.set_xrun_callback(self._count_xrun)
            self.watch.activate()
            stack.callback(self.watch.close)
            stack.callback(self.watch.deactivate)
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def watchdog(self, seconds: float) -> None:
        """After `seconds`, if still running, stop synthd and jackd and exit with status 3.

        An overloaded non-realtime JACK server can drop this process's clients, after which
        libjack and rtmidi calls block forever; a benchmark must end and say so instead.
        """
        def fire() -> None:
            print(f"bench: no result after {seconds:.0f} s (the JACK server stopped serving this "
                  "process's clients); stopping synthd and jackd", file=sys.stderr, flush=True)
            for proc in (self.synthd.proc, self.server.process):
                if proc is not None and proc.poll() is None:
                    proc.kill()
            os._exit(3)

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        self._stack.callback(timer.cancel)

    def _count_xrun(self, delay: float) -> None:
        self.xruns += 1

    def _open_midi(self):
        import rtmidi

        out = rtmidi.MidiOut(rtapi=rtmidi.API_UNIX_JACK, name="bench-midi")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ports = out.get_ports()
            match = [i for i, name in enumerate(ports) if "synthd" in name and "midi_in" in name]
            if match:
                out.open_port(match[0])
                return out
            time.sleep(0.1)
        raise RuntimeError(f"synthd's MIDI input did not appear; JACK MIDI ports: {out.get_ports()}")

    def _close_midi(self) -> None:
        self.midi.close_port()

    def status(self) -> dict:
        """synthd's /synthd/status.reply as a dict, fields named as in synthd.osc."""
        return self.osc.status()

    def controls(self) -> list[str]:
        """Control names, from one /synthd/controls.reply per control."""
        self.osc.send("/synthd/controls")
        replies = self.osc.replies(timeout=1.0)
        return [args[0] for address, args in replies if address == "/synthd/controls.reply"]
