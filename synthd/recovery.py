"""Coming back after the audio device or its server went away.

PortAudio cannot be re-opened in the process that lost its device: closing a stream whose
JACK server died blocks for good, and re-scanning devices (Pa_Terminate, Pa_Initialize)
aborts the process inside PortAudio's JACK host API. So the daemon, once its output is lost,
keeps serving OSC and asks a short-lived child process each second whether the device is back
(`device_available`); when it is, it replaces itself with a fresh copy of the same command
(`resume`, an exec: the same process id, so systemd and shells see one daemon), handing over
what the performer set (`ResumeState`: model, patch, control values, gain, gate, OSC
subscribers, counters) in an environment variable. The new image opens the device afresh,
fades in, and tells the subscribers `/synthd/audio ok`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

RESUME_ENV = "SYNTHD_RESUME"
PROBE_TIMEOUT_S = 5.0


@dataclass
class ResumeState:
    """What a resumed daemon restores. `values` are wire values (0..1) by control label;
    `subscribers` the (host, port) pairs that asked for notifications."""

    model: str
    patch: str | None
    osc_port: int
    http_port: int | None = None
    values: dict[str, float] = field(default_factory=dict)
    gain_db: float = 0.0
    gate: bool = True
    subscribers: list[tuple[str, int]] = field(default_factory=list)
    audio_losses: int = 0
    audio_reconnects: int = 0
    lost_at: float = 0.0  # time.time() when the device was lost
    reason: str = ""
    device: str = ""  # the output device's name and host API, as PortAudio calls them
    host_api: str = ""

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str) -> "ResumeState":
        raw = json.loads(text)
        raw["subscribers"] = [(str(h), int(p)) for h, p in raw.get("subscribers", [])]
        return cls(**raw)


def take_resume_state() -> ResumeState | None:
    """The state handed over by `resume`, removed from the environment (so a child process or
    a later restart does not inherit it); None for a fresh start or an unreadable hand-over."""
    text = os.environ.pop(RESUME_ENV, None)
    if not text:
        return None
    try:
        return ResumeState.loads(text)
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("ignoring an unreadable resume state (%s)", exc)
        return None


def device_available(device: str | None, name: str, host_api: str, channels: int,
                     stop: threading.Event | None = None) -> bool:
    """Whether a fresh PortAudio sees the output device `name` on host API `host_api` again,
    with `channels` outputs (`device` as given on the command line). Asked in a child
    process, as this one's PortAudio cannot re-scan; gives up early when `stop` is set."""
    cmd = [sys.executable, "-m", "synthd.recovery", device or "", name, host_api, str(channels)]
    try:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    except OSError as exc:
        log.debug("cannot start the device probe: %s", exc)
        return False
    waited = 0.0
    while True:
        try:
            return child.wait(timeout=0.05) == 0
        except subprocess.TimeoutExpired:
            waited += 0.05
            if waited > PROBE_TIMEOUT_S or (stop is not None and stop.is_set()):
                child.kill()
                child.wait()
                return False


def resume(state: ResumeState) -> None:
    """Replace this process with a fresh run of the same command, handing `state` over. Does
    not return. Descriptors beyond stdin, stdout and stderr are closed first: what the lost
    device's libraries held must not pile up over many losses."""
    os.environ[RESUME_ENV] = state.dumps()
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _probe_main(argv: list[str]) -> int:
    """Child process: exit 0 when the device is there and takes the channels, 1 otherwise."""
    device, name, host_api, channels = argv[0] or None, argv[1], argv[2], int(argv[3])
    import sounddevice as sd

    try:
        info = sd.query_devices(device, "output")
        api = sd.query_hostapis(info["hostapi"])["name"]
    except (ValueError, sd.PortAudioError):
        return 1
    if info["name"] != name or api != host_api or info["max_output_channels"] < channels:
        return 1
    return 0


if __name__ == "__main__":
    # exit without PortAudio's clean-up: the probe only read the device list
    code = _probe_main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
