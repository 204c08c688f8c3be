"""A real, paced JACK server with no sound card, and a JACK client that records into numpy.

`JackServer` starts `jackd --no-realtime -n NAME -d dummy -r RATE -p PERIOD` under a
name of its own, so parallel test sessions never share a server, and waits until clients
can connect. Child processes find it through `server.env()` (JACK_DEFAULT_SERVER; and
JACK_NO_START_SERVER, so nothing silently starts a second server). PortAudio, and so
sounddevice, sees it as the "JACK Audio Connection Kit" host API once the env var is set
in this process and PortAudio re-scans (`use_in_this_process`).

`Recorder` is a JACK client with input ports whose process callback copies each period
into a preallocated array; it remembers the JACK frame time of its first recorded frame,
so that events timed with `server_frame_time()` can be located in the recording.

Typical use in a test module:

    from support.jack import jack_server  # the fixture

    def test_x(jack_server):
        rec = Recorder(jack_server.name, channels=2, seconds=3)
        rec.connect_from(rec.wait_for_ports("PortAudio.*:out", 2))
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest

JACKD = shutil.which("jackd") or "/usr/bin/jackd"
LOG_KEPT = 256 * 1024  # bytes of jackd's output kept for a failure's message


def _die_with_parent() -> None:
    """In the child: have the kernel SIGTERM it when its parent dies, so a killed test run
    leaves no jackd behind (JACK allows only a few servers at once)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


SHM_REGISTRY = "/dev/shm/jack-shm-registry"


def _jackd_alive() -> bool:
    """Whether any jackd process runs on this machine (zombies do not count)."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)
        except OSError:
            continue
        if fields[0].endswith("(jackd") and fields[1].split()[0] != "Z":
            return True
    return False


_registry_checked = False


def _clear_stale_registry() -> None:
    """Once per process, before it first talks to JACK: remove JACK's shared-memory
    registry when no server is alive.

    JACK2 reclaims a dead server's slot only for a server of the same name, so servers
    killed without cleanup (earlier runs) fill its 8 slots for good ("Too many servers
    already active"); with no jackd running, the registry holds nothing but such dead
    slots. Later in the process libjack has the registry mapped, so it must stay.
    """
    global _registry_checked
    if _registry_checked:
        return
    _registry_checked = True
    if os.path.exists(SHM_REGISTRY) and not _jackd_alive():
        for path in [SHM_REGISTRY, *glob.glob("/dev/shm/jack_*")]:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


class JackServer:
    """A jackd dummy-driver server under a unique name; a context manager."""

    def __init__(self, name: str | None = None, *, rate: int = 48000, period: int = 256):
        self.name = name or f"synthd-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.rate = rate
        self.period = period
        self.process: subprocess.Popen | None = None
        self._log = b""
        self._reader: threading.Thread | None = None
        self._saved_env: dict[str, str | None] | None = None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for child processes that talk to this server."""
        env = dict(os.environ if base is None else base)
        env["JACK_DEFAULT_SERVER"] = self.name
        env["JACK_NO_START_SERVER"] = "1"
        env["JACK_NO_AUDIO_RESERVATION"] = "1"
        return env

    def start(self, timeout: float = 15.0) -> "JackServer":
        """Start jackd and return once a client can connect; RuntimeError with its log if not."""
        _clear_stale_registry()
        cmd = [JACKD, "--no-realtime", "-n", self.name, "-d", "dummy",
               "-r", str(self.rate), "-p", str(self.period)]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=self.env(),
                                        preexec_fn=_die_with_parent)
        # read what jackd prints as it prints it: a full pipe (it logs every xrun) would block the
        # server in a write, and with it every client, minutes into a soak
        self._reader = threading.Thread(target=self._drain, args=(self.process.stdout,), daemon=True)
        self._reader.start()
        import jack

        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        jack.set_error_function(lambda message: None)  # "cannot connect" until it is up
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    client = self.client("synthd-test-probe")
                    client.close()
                    return self
                except Exception as exc:  # jack.JackOpenError until the server is up
                    last_error = exc
                    time.sleep(0.1)
        finally:
            jack.set_error_function(None)
        log = self.stop()
        raise RuntimeError(f"jackd -n {self.name} did not come up ({last_error}); its output:\n{log}")

    def _drain(self, stream) -> None:
        for line in iter(stream.readline, b""):
            self._log = (self._log + line)[-LOG_KEPT:]

    def _finish_log(self, proc: subprocess.Popen) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if proc.stdout is not None:
            proc.stdout.close()

    def client(self, name: str):
        """A new, inactive jack.Client on this server (never starts another server)."""
        import jack

        return jack.Client(name, servername=self.name, no_start_server=True)

    def use_in_this_process(self) -> None:
        """Point this process's PortAudio (sounddevice) at this server and re-scan devices."""
        import sounddevice as sd

        self._saved_env = {k: os.environ.get(k) for k in self.env() if k.startswith("JACK_")}
        os.environ.update({k: v for k, v in self.env().items() if k.startswith("JACK_")})
        sd._terminate()
        sd._initialize()

    def stop(self) -> str:
        """Stop jackd (SIGTERM, then SIGKILL) and return what it printed.

        Streams of this process must be closed first. PortAudio is detached from the server
        before it goes (its JACK client asserts at exit when the server vanished under it).
        """
        if self._saved_env is not None:
            import sounddevice as sd

            sd._terminate()
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_env = None
            sd._initialize()
        proc, self.process = self.process, None
        if proc is None:
            return self._log.decode(errors="replace")
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._finish_log(proc)
        return self._log.decode(errors="replace")

    def kill(self) -> None:
        """Kill jackd at once (SIGKILL: no goodbye to its clients), as a crash would; `start()`
        brings a server of the same name back."""
        proc, self.process = self.process, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=5)
            self._finish_log(proc)

    def __enter__(self) -> "JackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Recorder:
    """A JACK client that records its input ports into a preallocated (frames, channels) array."""

    def __init__(self, server: str, *, channels: int = 2, seconds: float = 10.0,
                 name: str = "recorder"):
        import jack

        self.client = jack.Client(name, servername=server, no_start_server=True)
        self.rate = self.client.samplerate
        self.period = self.client.blocksize
        self._buf = np.zeros((int(seconds * self.rate), channels), dtype=np.float32)
        self._ports = [self.client.inports.register(f"in_{i + 1}") for i in range(channels)]
        self._written = 0
        self._recording = False
        self.first_frame_time: int | None = None  # JACK frame time of recording frame 0
        self.xruns = 0
        # mark(): recording index of the first period processed after the call (-1 until then)
        self._marks: list[int] = []
        self._marked = 0
        self.client.set_process_callback(self._process)
        self.client.set_xrun_callback(self._xrun)
        self.client.activate()

    def _process(self, frames: int) -> None:
        if not self._recording:
            return
        if self.first_frame_time is None:
            self.first_frame_time = self.client.last_frame_time
        pending = len(self._marks)
        for k in range(self._marked, pending):
            self._marks[k] = self._written
        self._marked = pending
        n = min(frames, self._buf.shape[0] - self._written)
        if n <= 0:
            return
        for i, port in enumerate(self._ports):
            self._buf[self._written:self._written + n, i] = port.get_array()[:n]
        self._written += n

    def _xrun(self, delay: float) -> None:
        self.xruns += 1

    def wait_for_ports(self, pattern: str, count: int, timeout: float = 15.0) -> list[str]:
        """Names of the first `count` audio output ports matching regex `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            names = sorted(p.name for p in self.client.get_ports(pattern, is_audio=True, is_output=True))
            if len(names) >= count:
                return names[:count]
            if time.monotonic() > deadline:
                all_ports = [p.name for p in self.client.get_ports()]
                raise TimeoutError(f"no {count} output ports matching {pattern!r}; ports: {all_ports}")
            time.sleep(0.05)

    def connect_from(self, sources: list[str]) -> None:
        """Connect source port i to input i."""
        for src, port in zip(sources, self._ports):
            self.client.connect(src, port)

    def start(self) -> None:
        """Start recording from the next period."""
        self._recording = True

    def mark(self) -> int:
        """Date an event on the recording itself: returns a key whose `mark_index` becomes the
        recording index of the first period processed after this call, which is the earliest
        period any client can react in. Unlike the frame clock, it stays exact when the server
        misses cycles."""
        self._marks.append(-1)
        return len(self._marks) - 1

    def mark_index(self, key: int) -> int | None:
        index = self._marks[key]
        return None if index < 0 else index

    def frame_time(self) -> int:
        """The server's current frame time (estimated between periods)."""
        return self.client.frame_time

    @property
    def frames(self) -> int:
        return self._written

    def wait_frames(self, frames: int, timeout: float = 30.0) -> None:
        """Block until `frames` frames are recorded (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        while self._written < frames:
            if time.monotonic() > deadline:
                raise TimeoutError(f"recorded {self._written} of {frames} frames")
            time.sleep(0.01)

    def data(self) -> np.ndarray:
        """A copy of what was recorded so far, (frames, channels) float32."""
        return self._buf[:self._written].copy()

    def close(self) -> None:
        self._recording = False
        try:
            self.client.deactivate()
        finally:
            self.client.close()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Player:
    """A JACK client with one output port that plays what `play` hands it (silence otherwise):
    a source to patch into synthd's input, as a musician would patch a microphone."""

    def __init__(self, server: str, name: str = "player"):
        import jack

        self.client = jack.Client(name, servername=server, no_start_server=True)
        self.port = self.client.outports.register("out_1")
        self._signal = np.zeros(0, dtype=np.float32)
        self._pos = 0
        self._loop = False
        self.client.set_process_callback(self._process)
        self.client.activate()

    def _process(self, frames: int) -> None:
        out = self.port.get_array()
        out[:] = 0.0
        signal, pos = self._signal, self._pos
        if self._loop and len(signal):
            idx = (pos + np.arange(frames)) % len(signal)
            out[:] = signal[idx]
            self._pos = (pos + frames) % len(signal)
        elif pos < len(signal):
            n = min(frames, len(signal) - pos)
            out[:n] = signal[pos:pos + n]
            self._pos = pos + n

    def play(self, signal: np.ndarray, loop: bool = False) -> None:
        """Play `signal` (float32, mono) from the next period; `loop` repeats it until `stop`."""
        self._loop = False
        self._pos = 0
        self._signal = np.ascontiguousarray(signal, dtype=np.float32)
        self._loop = loop

    def stop(self) -> None:
        self._signal = np.zeros(0, dtype=np.float32)
        self._loop = False

    def connect_to(self, port: str, timeout: float = 15.0) -> None:
        """Connect the output to input port `port` (a regex), once it exists."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.client.get_ports(port, is_audio=True, is_input=True)
            if found:
                self.client.connect(self.port, found[0])
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no input port matching {port!r}")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.client.deactivate()
        finally:
            self.client.close()

    def __enter__(self) -> "Player":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def record(server, seconds: float, actions, rate: int = 48000) -> np.ndarray:
    """`seconds` of the PortAudio output on `server`, mono, while `actions` ((seconds after the
    start, callable) pairs) run at their times."""
    with Recorder(server.name, channels=1, seconds=seconds + 0.5) as rec:
        rec.connect_from(rec.wait_for_ports("PortAudio.*:out", 1))
        rec.start()
        t0 = time.monotonic()
        for at, action in actions:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            action()
        rec.wait_frames(int(seconds * rate))
        return rec.data()[: int(seconds * rate), 0]


@pytest.fixture(scope="module")
def jack_server():
    """A JACK dummy server for one test module, stopped afterwards."""
    with JackServer() as server:
        yield server
