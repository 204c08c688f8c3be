"""Live output through sounddevice (PortAudio): a render thread keeps a ring buffer ahead of
the device, and the device's callback only copies from it.

The stream opens at the engine's rate when the device accepts it; otherwise the render
thread resamples to the device's rate with soxr's streaming resampler, so a model is
never played at the wrong pitch.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import soxr
import torch

from synthd import dsp
from synthd.engine import Engine
from synthd.priority import DEFAULT_PRIORITY, MAX_PRIORITY, Scheduling, lift_if_normal, make_realtime
from synthd.ringbuffer import RingBuffer
from synthd.trace import LateTrace, RenderTrace

if TYPE_CHECKING:
    from synthd.input import LiveInput

log = logging.getLogger(__name__)

# The callback waits for the GIL while the render thread runs Python code; a short switch
# interval bounds that wait well below one period (CPython's default is 5 ms).
SWITCH_INTERVAL_S = 0.0005
# no callback for this long while the stream should play: the device or its server is gone
STALL_S = 0.5
# a JACK server that missed cycles runs the next ones back to back, faster than real time,
# and can drain the ring: a short ring this soon after an xrun is the server's doing
XRUN_GRACE_S = 0.1
# a fade-out that waits this long for a callback is not played: nothing is listening
FADE_STALL_S = 0.2
# closing a stream can block inside PortAudio when its server died: it is given this long
CLOSE_TIMEOUT_S = 1.0
# a callback that began in PortAudio this long before its Python code ran was held (see `_callback`)
HELD_S = 0.001


def bounded(job, timeout: float, name: str) -> bool:
    """Run `job()` in a daemon thread and wait at most `timeout` seconds; whether it finished.
    For calls into native libraries that can block for good when a device or server vanished
    under them: the caller goes on, and the thread dies with the process."""
    thread = threading.Thread(target=job, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def release_portaudio(timeout: float = CLOSE_TIMEOUT_S) -> bool:
    """Terminate PortAudio within `timeout`; whether it finished. sounddevice would otherwise
    do it at exit, unbounded: with JACK that is where PortAudio's client leaves the server,
    and a busy or dying server can hold the exit there for good."""
    import sounddevice as sd

    done: list[bool] = []

    def terminate() -> None:
        try:
            while sd._initialized:
                sd._terminate()
        except sd.PortAudioError as exc:
            log.info("audio: PortAudio's clean-up failed: %s", exc)
            return
        done.append(True)

    return bounded(terminate, timeout, "synthd-portaudio-exit") and bool(done)


class AudioError(Exception):
    """The audio device cannot be opened as asked; the message says which and why."""


def resolve_output(device: str | int | None) -> dict[str, Any]:
    """sounddevice's description of the output device: None = default, int = index,
    str = a substring of its name (as `synthd devices` prints them)."""
    import sounddevice as sd

    try:
        info = sd.query_devices(device, "output")
    except (ValueError, sd.PortAudioError) as exc:
        raise AudioError(f"audio device {device!r}: {exc}") from None
    if info["max_output_channels"] < 1:
        raise AudioError(f"audio device {info['name']!r} has no outputs")
    return dict(info)


class LiveOutput:
    """Plays an engine on an audio device until stopped."""

    def __init__(self, engine: Engine, *, device: str | int | None = None, channels: int = 2,
                 block_frames: int = 256, ahead_blocks: int = 2, source: "LiveInput | None" = None,
                 render_priority: int = DEFAULT_PRIORITY):
        import sounddevice as sd

        if channels != engine.channels:
            raise AudioError(f"{channels} output channels asked, but the engine renders {engine.channels}")
        self.engine = engine
        self.channels = channels
        self.render_priority = render_priority  # SCHED_FIFO priority the render thread asks for; 0: none
        # the device's callback thread (and an input's), where its host left it at normal: one
        # above the render thread, which must never delay the copy out of the ring
        self.callback_priority = min(render_priority + 1, MAX_PRIORITY) if render_priority else 0
        self.block_frames = block_frames
        info = resolve_output(device)
        self.device_index: int = info["index"]
        self.device_name: str = info["name"]
        self.host_api: str = sd.query_hostapis(info["hostapi"])["name"]
        if info["max_output_channels"] < channels:
            raise AudioError(f"audio device {self.device_name!r} has {info['max_output_channels']} "
                             f"outputs, {channels} asked (--channels)")
        self.sample_rate = self._choose_rate(sd, info)
        self._resampler = (soxr.ResampleStream(engine.sample_rate, self.sample_rate, channels,
                                               dtype="float32", quality="HQ")
                           if self.sample_rate != engine.sample_rate else None)
        # how far the render thread stays ahead: `ahead_blocks` device blocks, to ride out slow
        # renders, and at least one whole decode call beyond the blocks after the first (a model's
        # frame can be longer than a block). Each block ahead is a block of latency for what goes
        # through the model (controls, and notes of several voices).
        if ahead_blocks < 1:
            raise AudioError(f"ahead_blocks {ahead_blocks} must be at least 1")
        model = engine.model
        decode_frames = math.ceil(engine.block_frames / model.hop) * model.hop
        self._ratio = self.sample_rate / engine.sample_rate
        self.target_fill = int(math.ceil(max(ahead_blocks * block_frames,
                                             (decode_frames + (ahead_blocks - 1) * engine.block_frames)
                                             * self._ratio)))
        self._ring = RingBuffer(self.target_fill + 4 * max(block_frames, engine.block_frames) + 64, channels)
        self.trace = RenderTrace(block_frames / self.sample_rate, self.target_fill / self.sample_rate)
        # audio input: the render thread renders a block as each block of input arrives
        self.source = source
        self._feeder = None
        if source is not None:
            if self.sample_rate != engine.sample_rate:
                raise AudioError(f"audio input needs the output at the model's {engine.sample_rate} Hz; "
                                 f"{self.device_name} plays {self.sample_rate} Hz")
            from synthd.input import InputFeeder  # the input module builds on this one

            self._feeder = InputFeeder(source, engine.block_frames)
            source.callback_priority = self.callback_priority
        # called on the render thread just before each block (MIDI input hands over what has
        # arrived, so it plays in this block); each must return quickly and never wait
        self.before_render: list[Callable[[], object]] = []
        # how long after a callback a render not due for a block waits before those hooks run,
        # for events another client of the audio server delivers in the same cycle (see `_render_one`)
        self.event_grace_s = 0.0
        self._fade = dsp.Ramp(1.0)
        self._fading_out = False
        self._faded = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream = None
        self._graveyard: list[Any] = []
        self._switch_interval = sys.getswitchinterval()
        self.scheduling: Scheduling | None = None  # what the render thread got, once it runs
        self.callback_scheduling: Scheduling | None = None  # the device's callback thread's, once it runs
        self.output_underflows = 0  # PortAudio's own output_underflow flags (server xruns with JACK)
        self.ring_underruns = 0  # callbacks that found the ring short, split into:
        self.late_underruns = 0  # ... while the server kept time: synthd rendered late
        self.xrun_underruns = 0  # ... within XRUN_GRACE_S of a server xrun, whose catch-up drained it
        self._xrun_at = -1.0
        self.callbacks = 0
        self._callback_at = 0.0  # time.monotonic() of the latest callback
        # JACK's PortAudio dates each callback in C as its cycle begins (currentTime, on a clock at
        # an offset from ours that steps when the server skips cycles): a callback whose offset
        # exceeds both its neighbours' began its Python code that much late, mostly waiting for
        # the interpreter's lock (a collection or a long call on another thread holds it), while
        # a step leaves one neighbour as high. A hold that makes the server skip cycles reads short
        # by those cycles (the step comes with it): 20 ms of a 35 ms hold, never more than the hold.
        # A cycle begins after the one before it ran its callback, so no hold is longer than the
        # time between the two callbacks: a longer reading is the server's clock misdating one
        # cycle (seen once in a 10 min soak: 90.7 ms between callbacks 10.8 ms apart).
        # Another host API's time may be on no steady clock, so JACK only.
        self._dated = self.host_api == "JACK Audio Connection Kit"
        self._offset_last = self._offset_before = 0.0  # the offsets of the last two callbacks
        self._at_last = self._at_before = 0.0  # and when their Python code ran
        self._dated_calls = 0  # callbacks of this stream so far
        self.callbacks_held = 0  # callbacks held over HELD_S
        self.callback_held_max_s = 0.0
        self._finished = threading.Event()  # PortAudio says the stream ended
        self.render_error: BaseException | None = None
        # True once a stream was left open because closing it hung (its server died): the
        # process must then exit without PortAudio's clean-up, which would hang or abort too
        self.abandoned = False
        self._stream_latency_s = 0.0

    def _choose_rate(self, sd, info: dict[str, Any]) -> int:
        wanted = self.engine.sample_rate
        try:
            sd.check_output_settings(device=self.device_index, channels=self.channels,
                                     dtype="float32", samplerate=wanted)
            return wanted
        except Exception as exc:
            rate = int(info["default_samplerate"])
            log.warning("audio device %r does not take %d Hz (%s); resampling to %d Hz",
                        self.device_name, wanted, exc, rate)
            return rate

    @property
    def underruns(self) -> int:
        return self.output_underflows + self.ring_underruns

    @property
    def latency_ms(self) -> float:
        """Output latency from render to the device's output: ring plus device buffering."""
        return 1000.0 * (self.target_fill / self.sample_rate + self._stream_latency_s)

    def stats(self) -> dict[str, Any]:
        extra = self.source.stats() if self.source is not None else {}
        return {**extra, "underruns": self.underruns, "output_underflows": self.output_underflows,
                "ring_underruns": self.ring_underruns, "late_underruns": self.late_underruns,
                "xrun_underruns": self.xrun_underruns, "device": self.device_name,
                "device_rate": self.sample_rate, "resampling": self._resampler is not None,
                "latency_ms": self.latency_ms, "callbacks": self.callbacks,
                "callbacks_held": self.callbacks_held, "callback_held_ms_max": 1000.0 * self.callback_held_max_s,
                "render_scheduling": self.scheduling.describe() if self.scheduling else "",
                "callback_scheduling": self.callback_scheduling.describe() if self.callback_scheduling else ""}

    # ---------------------------------------------------------------- start / stop

    def start(self, fade_in_s: float = 0.0) -> None:
        """Fill the ring, then start the render thread and the stream; with `fade_in_s`, the
        sound fades in over that long (a stream that resumes after its device came back)."""
        import sounddevice as sd

        if fade_in_s > 0:
            self._fade = dsp.Ramp(0.0)
            self._fade.set(1.0, int(fade_in_s * self.engine.sample_rate))
        # the engine's output stage (gain, gate, limiter) moves into the callback, after the
        # ring, unless the ring holds resampled audio (the stage runs at the engine's rate)
        self.engine.stage_deferred = self._resampler is None
        while self._ring.fill < self.target_fill:
            self._render_one()
        if self._feeder is not None:
            self._feeder.hold()
        if self.source is not None:
            self.source.on_data = self._wake.set
            if not self.source.opened:
                self.source.start()  # AudioError: refused before any output opens
        self.engine.backlog = self._backlog
        self.engine.output_stats = self.stats
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.callback_scheduling = None  # a new stream may call back on a new thread
        self._dated_calls = 0  # and its first callbacks have no neighbours of this stream
        self._thread = threading.Thread(target=self._run, name="synthd-render", daemon=True)
        self._thread.start()
        try:
            self._stream = sd.OutputStream(samplerate=self.sample_rate, blocksize=0,
                                           device=self.device_index, channels=self.channels,
                                           dtype="float32", latency="low", callback=self._callback,
                                           finished_callback=self._finished.set)
            self._callback_at = time.monotonic()
            self._stream.start()
        except Exception as exc:
            self._stop.set()
            self._thread.join()
            if self.source is not None:
                self.source.stop()
            sys.setswitchinterval(self._switch_interval)
            self.engine.stage_deferred = False
            raise AudioError(f"cannot open audio device {self.device_name!r} at "
                             f"{self.sample_rate} Hz: {exc}") from None
        self._stream_latency_s = float(self._stream.latency)
        log.info("audio: %s at %d Hz%s, latency %.1f ms", self.device_name, self.sample_rate,
                 " (resampled)" if self._resampler is not None else "", self.latency_ms)

    def fault(self) -> str | None:
        """Why the output no longer plays, or None while it does: the render thread died, the
        stream ended (PortAudio error, device unplugged, JACK server shut down), or no callback
        came for STALL_S. Cheap; the daemon asks several times a second."""
        if self._stream is None:
            return None
        if self.render_error is not None:
            return f"the render thread stopped ({self.render_error})"
        if self._finished.is_set() or not self._stream.active:
            return "the audio stream stopped (device or server gone)"
        silent = time.monotonic() - self._callback_at
        if silent > STALL_S:
            return f"no audio callback for {silent:.1f} s"
        return None

    def stop(self, fade_s: float = 0.05) -> None:
        """Fade out over `fade_s` and let the fade play, then close the stream and the thread.
        Bounded whatever the device does: a device that stopped calling back gets no fade, and a
        stream that does not close within CLOSE_TIMEOUT_S is left open (see `abandoned`)."""
        if self._stream is None:
            return
        playing = self.fault() is None
        if not playing:
            log.info("audio: no fade-out: %s does not play", self.device_name)
        elif fade_s > 0 and self._thread is not None and self._thread.is_alive():
            self._fade.set(0.0, int(fade_s * self.sample_rate))
            self._fading_out = True
            # the fade is rendered, then played out of the ring; give up when nothing plays it
            deadline = time.monotonic() + fade_s + self.target_fill / self.sample_rate + 0.5
            while not (self._faded.is_set() and self._ring.fill == 0):
                now = time.monotonic()
                if now - self._callback_at > FADE_STALL_S:
                    log.info("audio: fade-out cut: %s stopped asking for audio", self.device_name)
                    playing = False
                    break
                if now > deadline:
                    break
                time.sleep(0.002)
        self._stop.set()
        self._wake.set()
        stream, self._stream = self._stream, None

        def close() -> None:
            stream.stop()
            stream.close()

        if self.source is not None:
            self.source.stop()
        try:
            if not (playing and bounded(close, CLOSE_TIMEOUT_S, "synthd-audio-close")):
                self.abandoned = True
                self._graveyard.append(stream)  # PortAudio may still hold its callback
                log.info("audio: the stream to %s was left open (its device or server is gone)",
                         self.device_name)
        finally:
            if self._thread is not None:
                self._thread.join(timeout=2)
            self.engine.backlog = None
            self.engine.output_stats = None
            self.engine.stage_deferred = False
            sys.setswitchinterval(self._switch_interval)

    def __enter__(self) -> "LiveOutput":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- threads

    def _backlog(self) -> int:
        """Samples rendered but not yet played, in engine samples."""
        return int(self._ring.fill / self._ratio)

    def restart_input(self) -> bool:
        """Open the input afresh (its device went away); whether it opened. The render thread
        renders without input meanwhile."""
        if self.source is None:
            return False
        self.source.stop()
        try:
            self.source.start()
        except AudioError as exc:
            log.debug("input: not back yet: %s", exc)
            return False
        log.warning("input: %s is back", self.source.name)
        return True

    def _render_one(self, input: np.ndarray | None = None) -> None:
        if self.event_grace_s and self._ring.fill >= self.block_frames:
            # the server runs the clients of one cycle side by side: a MIDI port (a client of its
            # own) may take in a note after our callback woke this thread, and a render that
            # drained it at once would leave that note to the next block, a period later
            wait = self._callback_at + self.event_grace_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        self.trace.begin(self._callback_at, self._ring.fill, self.engine.model_s)
        for hook in self.before_render:
            try:
                hook()
            except Exception:  # a hook never stops the sound
                log.debug("render hook %r failed", hook, exc_info=True)
        block = self.engine.render(self.engine.block_frames, input)
        if self._fading_out or self._fade.moving:
            block = block * self._fade.process(block.shape[0])[:, None].astype(np.float32)
            if self._fading_out and not self._fade.moving:
                self._faded.set()
        if self._resampler is not None:
            block = self._resampler.resample_chunk(block)
        self._ring.write(block)
        self.trace.end(self.engine.model_s)

    def _run(self) -> None:
        torch.set_num_threads(self.engine.threads)  # intra-op threads are set per thread
        # before this thread's first model call: threads it starts (torch's pool) inherit it
        first = self.scheduling is None
        self.scheduling = make_realtime(self.render_priority)
        if first and self.scheduling.refused:
            log.warning("render thread at normal priority: realtime scheduling refused (%s). Blocks may come "
                        "late on a busy machine; give this user an rtprio limit (the `audio` group on most "
                        "systems) or set render_priority = 0 to not ask", self.scheduling.refused)
        elif first:
            log.info("render thread: %s", self.scheduling.describe())
        self.trace.open()
        try:
            while not self._stop.is_set():
                self.trace.collect()
                if self._faded.is_set():
                    self._wake.wait(0.01)
                    self._wake.clear()
                elif self._feeder is not None:
                    self._feed()
                elif self._ring.fill < self.target_fill:
                    self._render_one()
                else:
                    self._wake.wait(0.005)
                    self._wake.clear()
        except BaseException as exc:  # keep the reason; the callback plays silence meanwhile
            self.render_error = exc
            log.exception("render thread stopped")
        finally:
            self.trace.close()

    def late_traces(self) -> tuple[list[LateTrace], int]:
        """What the render thread did before each late underrun since the last call (see
        synthd.trace), and how many late underruns came beyond those kept."""
        return self.trace.take()

    def _feed(self) -> None:
        """With input: render as input arrives (see `InputFeeder`)."""
        go, block = self._feeder.next_block(self._ring.fill, self.target_fill)
        if go:
            self._render_one(block)
        elif self.source.available() < self.engine.block_frames:
            self._wake.wait(0.002)
            self._wake.clear()

    def _callback(self, outdata: np.ndarray, frames: int, time_info, status) -> None:
        # real-time: copy, the output stage's few vector operations on one period, count, wake
        # the renderer; no model call, no logging, no torch
        now = self._callback_at = time.monotonic()
        if self.callback_scheduling is None and self.callback_priority:
            # once per stream (one system call, in the first callback only)
            self.callback_scheduling = lift_if_normal(self.callback_priority)
        held = math.nan  # the previous callback's hold, known now that both its neighbours are
        if self._dated:
            offset = now - time_info.currentTime
            if self._dated_calls >= 2:
                held = min(self._offset_last - max(self._offset_before, offset), self._at_last - self._at_before)
            self._offset_before, self._offset_last = self._offset_last, offset
            self._at_before, self._at_last = self._at_last, now
            self._dated_calls += 1
            if held > HELD_S:
                self.callbacks_held += 1
                if held > self.callback_held_max_s:
                    self.callback_held_max_s = held
        if status.output_underflow:
            self.output_underflows += 1
            self._xrun_at = now
        if self._feeder is not None:
            self._feeder.playing()
        got = self._ring.read_into(outdata)
        late = False
        if got < frames and not self._faded.is_set():
            self.ring_underruns += 1
            if now - self._xrun_at < XRUN_GRACE_S:
                self.xrun_underruns += 1
            else:
                self.late_underruns += 1
                late = True
        self.trace.callback(now, late, held)
        if self.engine.stage_deferred:
            # the stage's clock counts rendered samples played, so an event dated on the render
            # clock (a note's gate, with its frame) lands on its sample after an underrun too
            self.engine.stage.position -= frames - got
            outdata[:] = self.engine.stage.process(outdata)
        self.callbacks += 1
        self._wake.set()
