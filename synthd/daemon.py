"""`synthd run`: play a model live, controlled over OSC and MIDI, until SIGTERM/SIGINT.

Start-up loads and probes the model, reads the patch, opens the OSC server and the MIDI
input, then the audio device (synthd.audio's LiveOutput), then prints one line naming the model,
device, rate, block size, latency and endpoints. A model or patch load over OSC that is
refused leaves the one playing untouched; one that succeeds crossfades. SIGTERM, SIGINT
and `/synthd/quit` fade the output out and exit with status 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

import torch

from synthd import config as config_mod
from synthd.audio import AudioError, LiveOutput
from synthd.config import ConfigError, DaemonConfig, in_folder
from synthd.controls import ControlSurface
from synthd.engine import Engine
from synthd.midi import MidiError, MidiInput, MidiRouter
from synthd.model import ModelError, load_model
from synthd.osc import OscServer
from synthd.patch import Patch, PatchError, default_patch, load_patch

log = logging.getLogger("synthd")

FADE_OUT_S = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser)


def _not_from_python_osc(record: logging.LogRecord) -> bool:
    # python-osc logs a root-logger warning per unreadable bundle element: a flood of
    # garbage would become a flood of log lines. synthd counts those datagrams instead.
    return "pythonosc" not in record.pathname


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_from_python_osc)


class Daemon:
    """The running instrument: engine, output, control surface, OSC and MIDI."""

    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)  # before the load's probe: the first call fixes the pools
        model = load_model(cfg.model)
        patch = load_patch(cfg.patch) if cfg.patch else default_patch()
        self.engine = Engine(model, channels=cfg.channels, block_frames=cfg.block_frames, threads=cfg.threads,
                             gate_open=patch.gate.open, gain_db=patch.gain_db)
        self.surface = ControlSurface(self.engine, patch)
        self.output = LiveOutput(self.engine, device=cfg.device, channels=cfg.channels,
                                 block_frames=cfg.block_frames)
        self.router = MidiRouter(self.surface)
        self.midi: MidiInput | None = None
        self.osc: OscServer | None = None
        self._stop = threading.Event()
        self._swap = threading.Lock()

    def start(self) -> None:
        """Open OSC and MIDI first (imports and sockets cost the main thread time it would
        otherwise share with the render thread), then start the sound and serve."""
        try:
            self.osc = OscServer(self.surface, self, host=self.cfg.osc_host, port=self.cfg.osc_port)
            if self.cfg.midi_in:
                self.midi = MidiInput(self.router, self.cfg.midi_in)
            self.output.start()
            self.osc.start()
        except BaseException:
            self.shutdown()
            raise

    def startup_line(self) -> str:
        model = self.engine.model
        return (f"synthd: playing {model.name} ({model.path}, {model.latent_size} controls) on "
                f"{self.output.device_name} at {self.output.sample_rate} Hz, block {self.cfg.block_frames}, "
                f"latency {self.engine.stats()['latency_ms']:.1f} ms; OSC {self.osc.endpoint}; "
                f"MIDI {self.midi.endpoint if self.midi else 'off'}; patch {self.surface.patch.name}")

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def quit(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Fade out, then close MIDI, OSC and the audio stream (each at most once)."""
        self.output.stop(fade_s=FADE_OUT_S)
        if self.midi is not None:
            self.midi.close()
            self.midi = None
        if self.osc is not None:
            self.osc.stop()
            self.osc = None

    # ---------------------------------------------------------------- OSC host

    def status(self) -> dict[str, Any]:
        stats = self.engine.stats()
        osc = self.osc.counters if self.osc else None
        stats.update({
            "invalid": (osc.invalid if osc else 0) + self.router.counters.invalid,
            "unknown": osc.unknown if osc else 0,
            "clamped": self.surface.counters.clamped,
            "gate": int(self.surface.gate_open),
            "gain_db": self.surface.gain_db,
            "sysex": self.router.counters.sysex,
        })
        return stats

    def load_model(self, name: str) -> str:
        path = in_folder(self.cfg.models_folder, name, ".ts")
        model = load_model(path)  # ModelError leaves the old model playing
        with self._swap:
            self.engine.swap_model(model, crossfade_s=self.cfg.crossfade)
            self.surface.rebind(model=model)
        log.info("model %s loaded from %s (crossfade %.0f ms)", model.name, path, 1000 * self.cfg.crossfade)
        return model.name

    def load_patch(self, name: str) -> str:
        path = in_folder(self.cfg.patches_folder, name, ".toml")
        patch: Patch = load_patch(path)  # PatchError leaves the old patch in use
        with self._swap:
            self.surface.rebind(patch=patch)
        log.info("patch %s loaded from %s", patch.name, path)
        return patch.name


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.resolve(args)
    except ConfigError as exc:
        print(f"synthd: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    try:
        daemon = Daemon(cfg)
        daemon.start()
    except (ModelError, PatchError, AudioError, MidiError, OSError) as exc:
        log.error("%s", exc)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.quit())
    print(daemon.startup_line(), file=sys.stderr, flush=True)
    try:
        daemon.wait()
    finally:
        status = daemon.status()
        log.info("stopping: fading out")
        daemon.shutdown()
    log.info("stopped; underruns %d, NaN blocks %d, invalid messages %d", status.get("underruns", 0),
             status.get("nan_blocks", 0), status["invalid"])
    return 0
