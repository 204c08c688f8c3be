"""A `synthd run` child process on a test JACK server, and a small OSC client for it.

`SynthdProcess` starts the daemon with `--osc-port 0` (a free port), waits for its
start-up line, and reads the port from it; `stop()` sends SIGTERM and returns the exit
status and everything it logged. `OscClient` sends messages and bundles from one UDP
socket and collects the replies that come back to it.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from pythonosc.osc_bundle_builder import OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import build_msg

from synthd.osc import STATUS_FIELDS

REPO = Path(__file__).resolve().parents[2]


class SynthdProcess:
    def __init__(self, server, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None,
                 wrap: tuple[str, ...] = ()):
        """`wrap`: a command line that runs synthd's (prlimit, setpriv)."""
        self.server = server
        cmd = [*wrap, sys.executable, "-m", "synthd", "run", "--osc-port", "0", *args]
        env = {**server.env(), **(env or {})}
        env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT on a start-up timeout prints every thread's stack
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGABRT)
                self.proc.wait(timeout=10)
            self._reader.join(timeout=5)
            raise RuntimeError("synthd did not start:\n" + self.log)
        m = re.search(r"OSC osc\.udp://([\d.]+):(\d+)", self.startup)
        self.osc_address = (m.group(1), int(m.group(2)))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("synthd: playing"):
                self.startup = line
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; the exit status. Past `timeout` SIGABRT, so that the log holds every
        thread's stack (PYTHONFAULTHANDLER), then SIGKILL; the status is then negative."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGABRT)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode

    def __enter__(self) -> "SynthdProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class OscClient:
    """One UDP socket: sends to synthd, receives its replies."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))

    def send(self, address: str, *args) -> None:
        self.sock.sendto(build_msg(address, list(args)).dgram, self.target)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def send_bundle(self, when: float, *messages: tuple) -> None:
        """A bundle timed at `when` (seconds since the epoch) holding (address, *args) messages."""
        builder = OscBundleBuilder(when)
        for address, *args in messages:
            builder.add_content(build_msg(address, args))
        self.sock.sendto(builder.build().dgram, self.target)

    def replies(self, timeout: float = 2.0, count: int | None = None) -> list[tuple[str, list]]:
        """Replies received until `count` arrived or `timeout` passed with none."""
        out = []
        self.sock.settimeout(timeout)
        try:
            while count is None or len(out) < count:
                data, _ = self.sock.recvfrom(65535)
                msg = OscMessage(data)
                out.append((msg.address, list(msg.params)))
        except socket.timeout:
            pass
        return out

    def ask(self, address: str, *args, reply: str, timeout: float = 5.0) -> list:
        """Send, then return the arguments of the first reply at address `reply`."""
        self.send(address, *args)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for addr, params in self.replies(timeout=deadline - time.monotonic(), count=1):
                if addr == reply:
                    return params
        raise TimeoutError(f"no {reply} after {address}")

    def status(self) -> dict:
        """`/synthd/status.reply`'s fields by name (STATUS_FIELDS)."""
        values = self.ask("/synthd/status", reply="/synthd/status.reply")
        return dict(zip((name for name, _ in STATUS_FIELDS), values, strict=True))

    def close(self) -> None:
        self.sock.close()


def _windows(x: np.ndarray, size: int) -> np.ndarray:
    n = max(1, len(x) // size)
    return x[: n * size].reshape(n, -1) if len(x) >= size else x.reshape(1, -1)


def rms_db(x: np.ndarray, window: int = 480) -> float:
    """Level in dBFS: the median of 10 ms RMS windows, so that a dropout on a loaded test
    machine (an underrun plays a block of silence) does not move it."""
    w = _windows(np.asarray(x, dtype=np.float64), window)
    return float(np.median(20 * np.log10(np.sqrt(np.mean(np.square(w), axis=1)) + 1e-12)))


def crossings_per_second(x: np.ndarray, rate: int, window: int = 2400) -> float:
    """Zero crossings per second of a mono signal (twice its fundamental for a clean tone):
    the median over 50 ms windows, robust to a dropout in one of them."""
    w = _windows(np.asarray(x), window)
    signs = np.signbit(w)
    per = np.count_nonzero(signs[:, 1:] != signs[:, :-1], axis=1) * rate / (w.shape[1] - 1)
    return float(np.median(per))


def dominant_hz(x: np.ndarray, rate: int) -> float:
    """The frequency of the strongest spectral peak of a mono signal (Hann window, parabolic
    interpolation between bins): unlike zero crossings, a dropout of a block or two on a loaded
    machine changes the level, not the reading."""
    x = np.asarray(x, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1:k + 2] + 1e-12)
    shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c else 0.0
    return (k + shift) * rate / len(x)
