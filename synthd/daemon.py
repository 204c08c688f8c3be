"""`synthd run`: play a model live, controlled over OSC and MIDI, until SIGTERM/SIGINT.

Start-up loads and probes the model, reads the patch, opens the OSC server and the MIDI
input, then the audio device (synthd.audio's LiveOutput), then prints one line naming the model,
device, rate, block size, latency and endpoints. A model or patch load over OSC that is
refused leaves the one playing untouched; one that succeeds crossfades.

The main thread watches the output several times a second. A device or server that goes
away is noticed within a second: the log says so once, the status says `lost`, subscribers
get `/synthd/audio lost`, and OSC keeps answering. Each second a child process looks for the
device; once it is back the daemon resumes where it was (synthd.recovery) and says `ok`.

SIGTERM, SIGINT and `/synthd/quit` stop within two seconds whatever the device does: a
fade-out when it plays, none when it does not, and exit status 0. Each step of a stop, and
PortAudio's clean-up, is bounded; a stop that hangs anyway is cut after EXIT_GUARD_S with every
thread's stack on stderr and exit status 1. SIGHUP reads the config
again and crossfades to its model and patch. Under systemd's `Type=notify` the daemon says
READY once its first block has played and pings the watchdog while its render loop moves
(synthd.service).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from synthd import config as config_mod
from synthd import recovery
from synthd.audio import AudioError, LiveOutput, release_portaudio
from synthd.config import ConfigError, DaemonConfig, LayerSpec, in_folder
from synthd.controls import ControlSurface, engine_for, input_trim_db
from synthd.input import open_input
from synthd.midi import RENDER_DRAIN_LIMIT, SAME_CYCLE_GRACE_S, MidiError, MidiInput, MidiRouter
from synthd.model import ModelError, load_model
from synthd.osc import PREFIX, OscServer
from synthd.patch import Patch, PatchError, default_patch, load_patch
from synthd.rack import Layer, Rack
from synthd.service import Notifier

log = logging.getLogger("synthd")

FADE_OUT_S = 0.1
FADE_IN_S = 0.05  # when the sound resumes after its device came back
WATCH_S = 0.1  # how often the main thread looks at the output
RETRY_S = 1.0  # how often a lost device is looked for
SUMMARY_S = 10.0  # how often the service manager's status line is refreshed
# every step of a stop is bounded (about 18 s if all of them time out, 2 s when the device is
# gone); past this a stop that hangs anyway prints every thread's stack and exits 1
EXIT_GUARD_S = 20.0


def freeze_heap(collect: bool = False) -> None:
    """Take every object alive now out of the cyclic collector's sight (reference counting
    still frees them). A full collection over a loaded model and its libraries walks about
    180 000 objects (70 ms on 2 cores) holding the GIL, a stall of a dozen blocks for the render
    thread; frozen, the collector only walks what is new. `collect` first so that no cyclic
    garbage is frozen for good (a full collection only while nothing plays, or once the heap
    has been frozen)."""
    if collect:
        gc.collect()
    gc.freeze()
    log.debug("heap: %d objects frozen", gc.get_freeze_count())


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

    def __init__(self, cfg: DaemonConfig, resumed: recovery.ResumeState | None = None,
                 args: argparse.Namespace | None = None, notifier: Notifier | None = None):
        self.cfg = cfg
        self.args = args  # the command line, read again on SIGHUP
        self.resumed = resumed
        self.notifier = notifier or Notifier({})
        torch.set_num_threads(cfg.threads)  # before the load's probe: the first call fixes the pools
        self.layers = self._build_layers(cfg, resumed)
        self.engine, self.surface = self.layers[0].engine, self.layers[0].surface
        if resumed and len(self.layers) == 1:
            self._restore_values(resumed)
        # one layer plays on its engine alone: its gain and gate act in the audio callback
        self.rack = Rack(self.layers) if len(self.layers) > 1 else None
        source = open_input(cfg.input, cfg.input_channels, self.engine.sample_rate) if cfg.input else None
        self.output = LiveOutput(self.rack or self.engine, device=cfg.device, channels=cfg.channels,
                                 block_frames=cfg.block_frames, ahead_blocks=cfg.ahead_blocks, source=source,
                                 render_priority=cfg.render_priority)
        self._input_lost: str | None = None  # why the input gives nothing; None while it plays
        self._next_input_look = 0.0
        self.router = MidiRouter(*(layer.surface for layer in self.layers))
        self.midi: MidiInput | None = None
        self.osc: OscServer | None = None
        self.web = None  # synthd.web.WebServer with --http-port
        self._stop = threading.Event()
        self._swap = threading.Lock()
        self.audio_losses = resumed.audio_losses if resumed else 0
        self.audio_reconnects = resumed.audio_reconnects if resumed else 0
        self._lost: str | None = None  # why the output is lost; None while it plays
        self._lost_at = 0.0
        self._next_look = 0.0
        self._reload_asked = False
        self._rendered_at_ping = -1
        self._next_summary = 0.0

    def _build_layers(self, cfg: DaemonConfig, resumed: recovery.ResumeState | None) -> list[Layer]:
        """Load every layer's model and patch. A layer that is refused is named in the log and
        left out while the others play; ModelError or PatchError when none can play."""
        specs = cfg.layer_specs()
        if resumed and len(specs) == 1:  # one model resumes with what it played; layers start afresh
            specs = [LayerSpec(specs[0].name, resumed.model, resumed.patch)]
        layers: list[Layer] = []
        for spec in specs:
            try:
                model = load_model(spec.model)
                patch = load_patch(spec.patch) if spec.patch else default_patch()
                engine = engine_for(model, patch, channels=cfg.channels, block_frames=cfg.block_frames,
                                    threads=cfg.threads, audio_input=cfg.input is not None,
                                    input_trim_db=input_trim_db(cfg.input_gain, model) if cfg.input else 0.0)
            except (ModelError, PatchError) as exc:
                if len(specs) == 1:
                    raise
                log.error("layer %s refused: %s", spec.name, exc)
                continue
            layers.append(Layer(spec.name, engine, ControlSurface(engine, patch)))
        if not layers:
            raise ModelError("no layer can play (each was refused: see above)")
        return layers

    def _layer(self, surface: ControlSurface | None) -> Layer:
        return next((layer for layer in self.layers if layer.surface is surface), self.layers[0])

    def _restore_values(self, state: recovery.ResumeState) -> None:
        for label, wire in state.values.items():
            if self.surface.find(label) is not None:
                self.surface.set(label, wire, glide_s=0.0, count_clamp=False)
        self.surface.set_gain_db(state.gain_db)
        self.surface.set_gate(state.gate)

    def start(self) -> None:
        """Open OSC and MIDI first (imports and sockets cost the main thread time it would
        otherwise share with the render thread), then start the sound and serve."""
        resumed = self.resumed
        freeze_heap(collect=True)  # before anything plays: a full collection holds the GIL
        try:
            port = resumed.osc_port if resumed else self.cfg.osc_port
            self.osc = OscServer(self.surface, self, host=self.cfg.osc_host, port=port,
                                 layers={layer.name: layer.surface for layer in self.layers})
            if self.output.source is not None:  # first: `--input virtual` takes the name synthd
                self.output.source.start()
            if self.cfg.midi_in:
                self.midi = MidiInput(self.router, self.cfg.midi_in, wait_for_port=resumed is not None)
                midi = self.midi
                self.output.before_render.append(lambda: midi.drain(RENDER_DRAIN_LIMIT, wait=False))
                self.output.event_grace_s = SAME_CYCLE_GRACE_S
            self.output.start(fade_in_s=FADE_IN_S if resumed else 0.0)
            self.osc.start()
            if self.cfg.http_port is not None:
                from synthd.web import WebServer  # aiohttp only for a daemon that serves HTTP

                port = resumed.http_port if resumed and resumed.http_port else self.cfg.http_port
                self.web = WebServer(self.surface, self.osc, host=self.cfg.http_host or self.cfg.osc_host,
                                     port=port, token=self.cfg.http_token, zeroconf=self.cfg.zeroconf)
                self.web.start()
        except BaseException:
            self.shutdown()
            raise
        freeze_heap()  # what the servers imported and built
        if resumed:
            self.audio_reconnects += 1
            self.osc.resubscribe(resumed.subscribers)
            self.osc.broadcast(f"{PREFIX}/audio", "ok")
            log.warning("audio: %s is back after %.1f s; playing again (losses %d, reconnects %d)",
                        self.output.device_name, time.time() - resumed.lost_at, self.audio_losses,
                        self.audio_reconnects)

    def startup_line(self) -> str:
        what = ", ".join(f"{layer.engine.model.name} ({layer.engine.model.path}, {layer.engine.model.latent_size} "
                         f"controls, {layer.engine.voices} voice{'s' if layer.engine.voices > 1 else ''}"
                         + (f", layer {layer.name}" if self.rack else "") + ")" for layer in self.layers)
        return (f"synthd: playing {what} on "
                f"{self.output.device_name} at {self.output.sample_rate} Hz, block {self.cfg.block_frames}, "
                f"latency {self.output.engine.stats()['latency_ms']:.1f} ms; OSC {self.osc.endpoint}; "
                f"MIDI {self.midi.endpoint if self.midi else 'off'}; patch {self.surface.patch.name}"
                + self._input_line()
                + (f"; web {self.web.url}" if self.web else ""))

    def _input_line(self) -> str:
        """The start line's part on audio input: where it comes from and how long it takes to reach
        the output (one block to arrive, the encoder's look-ahead, then what any control takes)."""
        source = self.output.source
        if source is None:
            return ""
        model = self.engine.model
        lag = model.encode_lag_samples
        block_ms = 1000.0 * self.cfg.block_frames / self.engine.sample_rate
        lag_ms = 1000.0 * (lag or 0) / model.sample_rate
        ring_ms = self.output.latency_ms
        frame_ms = 1000.0 * model.latency_samples / model.sample_rate
        told = f"encoder look-ahead {lag_ms:.1f} ms" if lag is not None else "encoder look-ahead unknown (not counted)"
        return (f"; input {source.name}: {block_ms + lag_ms + ring_ms:.1f} ms to the output ({told}, one block "
                f"{block_ms:.1f} ms, ring and device {ring_ms:.1f} ms; a frame has fully played {frame_ms:.1f} ms later)")

    def wait(self) -> None:
        """Serve until quit, watching the output (see the module's doc)."""
        while not self._stop.wait(WATCH_S):
            if self._reload_asked:
                self._reload_asked = False
                self.reload()
            self._service()
            self._watch()

    def wait_first_block(self, timeout: float = 2.0) -> bool:
        """Whether the device has taken a first block within `timeout`."""
        deadline = time.monotonic() + timeout
        while self.output.callbacks == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.output.callbacks > 0

    def _service(self) -> None:
        """Watchdog pings while the render loop moves on (or while the device is lost, which
        the daemon handles itself), and a fresh status line now and then."""
        now = time.monotonic()
        if self.notifier.ping_due():
            rendered = self.output.engine.stats()["render_calls"]
            if rendered != self._rendered_at_ping or self._lost:
                self._rendered_at_ping = rendered
                self.notifier.ping()
        if now >= self._next_summary:
            self._next_summary = now + SUMMARY_S
            self.notifier.send(STATUS=self.summary())

    def _watch(self) -> None:
        if self._lost is None:
            self._report_late()
            reason = self.output.fault()
            if reason is not None:
                self._lose(reason)
            else:
                self._watch_input()
            return
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + RETRY_S
        out = self.output
        if recovery.device_available(self.cfg.device, out.device_name, out.host_api, self.cfg.channels, self._stop):
            if not self._stop.is_set():
                self._resume()

    def _report_late(self) -> None:
        """A late underrun is a click synthd caused: each is logged with what the render thread
        did before it (synthd.trace), so a rig's log says whether the CPU, another process or
        the interpreter held it."""
        traces, lost = self.output.late_traces()
        for trace in traces:
            log.warning("%s", trace.describe())
        if lost:
            log.warning("late underrun: %d more not traced", lost)

    def _watch_input(self) -> None:
        """An input that went away is reported, plays as silence, and is opened again every RETRY_S."""
        source = self.output.source
        if source is None:
            return
        reason = source.fault()
        if reason is None:
            if self._input_lost is not None:
                self._input_lost = None
                if self.osc is not None:
                    self.osc.broadcast(f"{PREFIX}/input", "ok")
            return
        now = time.monotonic()
        if self._input_lost is None:
            self._input_lost = reason
            self._next_input_look = now + RETRY_S
            log.warning("input: lost %s: %s; the output falls silent, looking for it every %.0f s",
                        source.name, reason, RETRY_S)
            if self.osc is not None:
                self.osc.broadcast(f"{PREFIX}/input", "lost")
        elif now >= self._next_input_look:
            self._next_input_look = now + RETRY_S
            self.output.restart_input()

    def _lose(self, reason: str) -> None:
        self._lost = reason
        self._lost_at = time.time()
        self._next_look = time.monotonic() + RETRY_S
        self.audio_losses += 1
        log.warning("audio: lost %s: %s; still serving OSC, looking for it every %.0f s",
                    self.output.device_name, reason, RETRY_S)
        if self.osc is not None:
            self.osc.broadcast(f"{PREFIX}/audio", "lost")
        self.notifier.send(STATUS=self.summary())

    def _resume(self) -> None:
        """Hand the performance over to a fresh image of this daemon (synthd.recovery)."""
        surface = self.surface
        state = recovery.ResumeState(
            model=str(self.engine.model.path),
            patch=str(surface.patch.path) if surface.patch.path else None,
            osc_port=self.osc.address[1] if self.osc else self.cfg.osc_port,
            http_port=self.web.port if self.web else None,
            values={label: wire for label, _, wire, *_ in surface.snapshot()},
            gain_db=surface.gain_db, gate=surface.gate_open,
            subscribers=self.osc.subscribers() if self.osc else [],
            audio_losses=self.audio_losses, audio_reconnects=self.audio_reconnects,
            lost_at=self._lost_at, reason=self._lost or "",
            device=self.output.device_name, host_api=self.output.host_api)
        log.info("audio: %s is there again; resuming", self.output.device_name)
        recovery.resume(state)

    def quit(self) -> None:
        self._stop.set()

    @property
    def abandoned(self) -> bool:
        """Whether a native resource was left open because closing it hung (see `shutdown`)."""
        return self.output.abandoned or (self.midi is not None and self.midi.abandoned)

    def shutdown(self) -> None:
        """Fade out (when the device plays), then close MIDI, OSC and the audio stream, each at
        most once and each within a bound: what hangs (a client of a dead JACK server) is left."""
        self.output.stop(fade_s=FADE_OUT_S)
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self.midi is not None:
            self.midi.close()
        if self.osc is not None:
            self.osc.stop()
            self.osc = None

    # ---------------------------------------------------------------- OSC host

    def status(self, surface: ControlSurface | None = None) -> dict[str, Any]:
        """The daemon's figures (all layers), or with `surface` one layer's with the daemon's
        counters and the output's."""
        layers = self.layers if surface is None else [self._layer(surface)]
        if surface is None:
            stats = self.output.engine.stats()
        else:
            stats = layers[0].engine.stats()
            if self.rack is not None:  # the layer's engine has no output of its own: the rack's
                stats.update({k: v for k, v in self.output.stats().items() if k != "latency_ms"})
        osc = self.osc.counters if self.osc else None
        first = layers[0].surface
        stats.update({
            "invalid": (osc.invalid if osc else 0) + self.router.counters.invalid,
            "unknown": osc.unknown if osc else 0,
            "clamped": sum(layer.surface.counters.clamped for layer in layers),
            "gate": int(first.gate_open),
            "gain_db": first.gain_db,
            "sysex": self.router.counters.sysex,
            "audio": "lost" if self._lost else "ok",
            "audio_losses": self.audio_losses,
            "audio_reconnects": self.audio_reconnects,
            "voices_stolen": sum(layer.summary()["voices_stolen"] for layer in layers),
            "layers": len(layers),
        })
        if self.midi is not None:
            stats.update(self.midi.stats())
        if self.web is not None:
            stats.update(self.web.stats())
        return stats

    def layer_summaries(self) -> list[dict[str, Any]]:
        return [layer.summary() for layer in self.layers]

    def load_model(self, name: str, surface: ControlSurface | None = None) -> str:
        return self._use_model(in_folder(self.cfg.models_folder, name, ".ts"), self._layer(surface))

    def load_patch(self, name: str, surface: ControlSurface | None = None) -> str:
        return self._use_patch(in_folder(self.cfg.patches_folder, name, ".toml"), self._layer(surface))

    def _use_model(self, path: Path | str, layer: Layer) -> str:
        model = load_model(path)  # ModelError leaves the old model playing
        if layer.engine.input_settings is not None:
            model.check_encode()
        # the surface's lock too: a note that came between the swap and the rebind would take the
        # old model's indices under the new model's generation
        with self._swap, layer.surface.lock:
            layer.engine.swap_model(model, crossfade_s=self.cfg.crossfade)
            layer.surface.rebind(model=model)
        freeze_heap(collect=True)  # cheap once the libraries are frozen: it walks what is new
        log.info("model %s loaded from %s%s (crossfade %.0f ms)", model.name, path,
                 f" into layer {layer.name}" if self.rack else "", 1000 * self.cfg.crossfade)
        return model.name

    def _use_patch(self, path: Path | str | None, layer: Layer) -> str:
        patch: Patch = load_patch(path) if path else default_patch()  # PatchError leaves the old patch
        with self._swap:
            layer.surface.rebind(patch=patch)
        log.info("patch %s loaded from %s%s", patch.name, path or "the built-in default",
                 f" into layer {layer.name}" if self.rack else "")
        return patch.name

    # ---------------------------------------------------------------- SIGHUP

    def request_reload(self) -> None:
        """From a signal handler: the main thread reloads at its next look (see `reload`)."""
        self._reload_asked = True

    def reload(self) -> None:
        """Read the command line's config again and load its model and patch, each crossfaded
        in; what is refused is logged and leaves the one playing."""
        self.notifier.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
        try:
            cfg = config_mod.resolve(self.args) if self.args is not None else self.cfg
        except ConfigError as exc:
            log.error("reload refused: %s", exc)
            cfg = None
        if cfg is not None:
            self.cfg.model, self.cfg.patch = cfg.model, cfg.patch
            specs = cfg.layer_specs()
            by_name = {lay.name: lay for lay in self.layers}
            # layers are found by name; a config whose names all changed (a single model file
            # renamed, or unnamed layers) maps onto the layers in order when their count agrees
            if len(specs) == len(self.layers) and not any(spec.name in by_name for spec in specs):
                by_name = {spec.name: lay for spec, lay in zip(specs, self.layers)}
            for spec in specs:
                layer = by_name.get(spec.name)
                if layer is None:
                    log.error("reload: layer %s is new; layers are added at start only", spec.name)
                    continue
                for what, job in (("model", lambda: self._use_model(spec.model, layer)),
                                  ("patch", lambda: self._use_patch(spec.patch, layer))):
                    try:
                        job()
                    except (ModelError, PatchError) as exc:
                        where = f" of layer {spec.name}" if self.rack else ""
                        log.error("reload: %s%s refused, the old one stays: %s", what, where, exc)
        self.notifier.send(READY=1, STATUS=self.summary())

    def summary(self) -> str:
        """One line for the service manager's status."""
        if self._lost:
            return f"audio lost ({self._lost}); serving OSC, looking for {self.output.device_name}"
        stats = self.output.engine.stats()
        return (f"playing {stats['model']} on {self.output.device_name}; render load "
                f"{stats['render_load_mean']:.2f}; underruns {stats.get('underruns', 0)}")


def _look_again(state: recovery.ResumeState, cfg: DaemonConfig, notifier: Notifier, reason: str) -> int:
    """A resumed daemon whose device is gone again: look for it each second and resume once it
    is back; SIGTERM or SIGINT meanwhile exits 0."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.warning("audio: %s; looking for %s again every %.0f s", reason, state.device, RETRY_S)
    notifier.send(STATUS=f"audio lost ({reason}); looking for {state.device}")
    while not stop.wait(RETRY_S):
        if recovery.device_available(cfg.device, state.device, state.host_api, cfg.channels, stop):
            if not stop.is_set():
                recovery.resume(state)
    return 0


def _leave(code: int, abandoned: bool = False) -> int:
    """`code`, once PortAudio is cleaned up within its bound. When that hangs, or a stream or MIDI
    client was left open (its clean-up at exit would block or abort), exit at once without
    the interpreter's clean-up, threads and all."""
    if abandoned or not release_portaudio():
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)
    return code


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.resolve(args)
    except ConfigError as exc:
        print(f"synthd: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    resumed = recovery.take_resume_state()
    notifier = Notifier()
    daemon: Daemon | None = None
    try:
        daemon = Daemon(cfg, resumed, args, notifier)
        daemon.start()
    except (AudioError, ModelError, PatchError, MidiError, OSError) as exc:
        left_open = daemon is not None and daemon.abandoned
        if isinstance(exc, AudioError) and resumed is not None:
            # the device went away again between the look that found it and this start
            return _leave(_look_again(resumed, cfg, notifier, str(exc)), left_open)
        log.error("%s", exc)
        notifier.send(STATUS=f"failed: {exc}")
        return _leave(1, left_open)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.quit())
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    print(daemon.startup_line(), file=sys.stderr, flush=True)
    if not daemon.wait_first_block():
        log.warning("audio: %s has not asked for a block yet", daemon.output.device_name)
    notifier.send(READY=1, STATUS=daemon.summary())
    try:
        daemon.wait()
    finally:
        faulthandler.dump_traceback_later(EXIT_GUARD_S, exit=True)
        status = daemon.status()
        notifier.send(STOPPING=1)
        log.info("stopping%s", ": fading out" if status["audio"] == "ok" else " (the audio device is lost: no fade)")
        daemon.shutdown()
    log.info("stopped; underruns %d, NaN blocks %d, invalid messages %d, audio losses %d",
             status.get("underruns", 0), status.get("nan_blocks", 0), status["invalid"], status["audio_losses"])
    return _leave(0, daemon.abandoned)
