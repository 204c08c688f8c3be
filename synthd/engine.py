"""The engine: turns control changes into audio through a model's streaming `decode`.

One engine serves both live playing (a render thread calls `render` ahead of the audio
callback) and offline rendering (a caller calls `render` directly), so both produce the
same samples for the same events.

Signal path per block: events -> per-latent ramps (one value per latent frame) -> decode
-> NaN/Inf guard -> channel map -> crossfade between voices (model swap) -> output stage:
gain and gate ramps -> DC blocker -> soft limiter.

Live, the output stage runs in the audio callback, after the render-ahead ring (see
`OutputStage`), so gain changes and note gates are heard within one device period.

Threading: the setters may be called from any thread; they only append to a deque
(atomic in CPython) that `render` drains. `render` itself must be called from one thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import soxr
import torch

from synthd import dsp
from synthd.model import RECOVERY_FRAMES, Model

log = logging.getLogger(__name__)

GAIN_RAMP_S = 0.01  # a gain change glides over 10 ms: fast, but never a step
STATS_WINDOW = 4096  # render calls kept for the p99 figure (about 22 s at 256 frames)
WARMUP_CALLS = 3  # TorchScript optimises a method on its first calls: keep that off stage


@dataclass(order=True)
class _Event:
    at: int
    seq: int
    kind: str = field(compare=False)
    args: tuple = field(compare=False, default=())


def channel_map(source: int, target: int) -> np.ndarray:
    """Mixing matrix (source, target): mono feeds every output; equal counts pass through;
    more outputs than sources repeat the sources; fewer average the sources per output."""
    m = np.zeros((source, target), dtype=np.float32)
    if source == 1:
        m[0, :] = 1.0
    elif target >= source:
        for t in range(target):
            m[t % source, t] = 1.0
    else:
        for s in range(source):
            m[s, s % target] = 1.0
        m /= m.sum(axis=0, keepdims=True)
    return m


class OutputStage:
    """The last stage before the output: gain and gate ramps, DC blocker, soft limiter.

    It is cheap (no model call), so live it runs in the audio callback, after the render-ahead
    ring: a gain change or a note's gate reaches the output within one device period, however
    far ahead the model is rendered. Offline, `Engine.render` runs it on each block. Either way
    its events are dated on its own sample clock (`position`), so both give the same samples.

    `post` may be called from any thread; `process` from one thread only.
    """

    def __init__(self, sample_rate: int, channels: int, *, gain: float, gate: float):
        self.sample_rate = sample_rate
        self.position = 0  # samples processed so far
        self._inbox: deque[_Event] = deque()
        self._events: list[_Event] = []
        self._gain = dsp.Ramp(gain)
        self._gate = dsp.Ramp(gate)
        self._dc = dsp.DCBlocker(channels, sample_rate)

    def post(self, event: _Event) -> None:
        """Queue a "gain" (amplitude,) or "gate" (level, samples) event; `at` < 0 means now."""
        self._inbox.append(event)

    def process(self, block: np.ndarray) -> np.ndarray:
        """The stage applied to `block` (frames, channels): float32, within ±1."""
        while self._inbox:
            ev = self._inbox.popleft()
            if ev.at < 0:
                ev.at = self.position
            heapq.heappush(self._events, ev)
        frames = block.shape[0]
        end = self.position + frames
        if (self._gain.moving or self._gate.moving or (self._events and self._events[0].at < end)):
            amp = np.empty(frames)
            pos = 0
            while pos < frames:
                now = self.position + pos
                while self._events and self._events[0].at <= now:
                    self._apply(heapq.heappop(self._events))
                n = frames - pos
                if self._events:
                    n = min(n, self._events[0].at - now)
                np.multiply(self._gain.process(n), self._gate.process(n), out=amp[pos:pos + n])
                pos += n
            block = block * amp[:, None]
        else:  # steady: one factor (the common case, and the one the audio callback meets most)
            block = block * (self._gain.value * self._gate.value)
        self.position = end
        return dsp.soft_limit(self._dc.process(block)).astype(np.float32)

    def _apply(self, ev: _Event) -> None:
        if ev.kind == "gain":
            self._gain.set(ev.args[0], int(GAIN_RAMP_S * self.sample_rate))
        else:
            self._gate.set(ev.args[0], ev.args[1])


class _Voice:
    """One model playing: its latent ramps, its decoded-but-unplayed samples, its fade."""

    def __init__(self, model: Model, generation: int, values: np.ndarray, engine_rate: int,
                 engine_channels: int, frames_per_call: int, fade_from: float):
        self.model = model
        self.generation = generation
        self.value = np.array(values, dtype=np.float64)  # latent values fed on the last frame
        self.target = self.value.copy()
        self._step = np.zeros_like(self.value)  # per-frame increment towards target
        self.fade = dsp.Ramp(fade_from)
        self.frames_per_call = frames_per_call
        self.mix = channel_map(model.channels, engine_channels)
        self.frame_len = model.hop * engine_rate / model.sample_rate  # in engine samples
        self._resampler = (soxr.ResampleStream(model.sample_rate, engine_rate, model.channels,
                                               dtype="float32", quality="HQ")
                           if model.sample_rate != engine_rate else None)
        self._pending = np.zeros((0, model.channels), dtype=np.float32)
        self._z = np.zeros((1, model.latent_size, frames_per_call), dtype=np.float32)

    def set_target(self, index: int, value: float, glide_frames: float) -> None:
        self.target[index] = value
        self._step[index] = (value - self.value[index]) / max(1.0, glide_frames)

    def _advance(self) -> None:
        """Move every latent one frame along its ramp; stop exactly on the target."""
        if not self._step.any():
            return
        nxt = self.value + self._step
        passed = (self._step > 0) & (nxt >= self.target) | (self._step < 0) & (nxt <= self.target)
        nxt[passed] = self.target[passed]
        self._step[passed] = 0.0
        self.value = nxt

    def pull(self, frames: int, start: int, engine: "Engine") -> np.ndarray:
        """The next `frames` samples (frames, model channels), decoding as needed.

        `start` is the engine position of the first sample; it dates each new latent frame
        so that scheduled latent events land on the frame that contains them.
        """
        while self._pending.shape[0] < frames:
            frame_start = start + self._pending.shape[0]
            for j in range(self.frames_per_call):
                if engine._active is self:
                    engine._apply_latent_events(self, frame_start + (j + 1) * self.frame_len)
                self._advance()
                self._z[0, :, j] = self.value
            chunk = engine._decode(self.model, self._z)
            if self._resampler is not None:
                chunk = self._resampler.resample_chunk(chunk)
            self._pending = np.concatenate([self._pending, chunk]) if self._pending.size else chunk
        out, self._pending = self._pending[:frames], self._pending[frames:]
        return out


class Engine:
    """Renders a model's audio at the model's rate; the one engine behind live and offline.

    Rate and channel count are fixed at construction (the first model's rate); a model
    swapped in at another rate is resampled to it, so the stream never stops or changes pitch.
    """

    def __init__(self, model: Model, *, channels: int = 2, block_frames: int = 256,
                 threads: int = 1, gate_open: bool = True, gain_db: float = 0.0):
        if channels < 1:
            raise ValueError(f"channels must be at least 1, not {channels}")
        if block_frames < 1:
            raise ValueError(f"block_frames must be at least 1, not {block_frames}")
        self.threads = max(1, int(threads))
        torch.set_num_threads(self.threads)  # before this engine's first model call
        self.sample_rate = model.sample_rate
        self.channels = channels
        self.block_frames = block_frames
        self._inbox: deque[_Event] = deque()
        self._seq = itertools.count()
        self._latent_events: list[_Event] = []
        self._rendered = 0
        self._generation = 0
        self._model = model
        self._requested = np.array(model.defaults(), dtype=np.float64)
        self._gain_db = float(gain_db)
        self._gate_on = gate_open
        self.stage = OutputStage(self.sample_rate, channels, gain=dsp.db_to_amplitude(gain_db),
                                 gate=1.0 if gate_open else 0.0)
        # True while a live output runs `stage` in its audio callback instead
        self.stage_deferred = False
        self._voices: list[_Voice] = []
        self._active: _Voice | None = None
        self.backlog: Callable[[], int] | None = None  # live output: samples rendered, not yet played
        self.output_stats: Callable[[], dict[str, Any]] | None = None
        self.nan_blocks = 0
        self.decode_errors = 0
        self._render_time = 0.0
        self._load_peak = 0.0
        self._ms_max = 0.0
        self._ms_window = np.zeros(STATS_WINDOW)
        self._calls = 0
        self._warm_up(model)
        self._start_voice(model, self._generation, self._requested.copy(), crossfade=0)

    # ---------------------------------------------------------------- thread-safe setters

    @property
    def model(self) -> Model:
        """The model playing (or about to: swap_model sets it at once)."""
        return self._model

    @property
    def clock(self) -> int:
        """The audio clock in samples: what has been played (live) or rendered (offline)."""
        backlog = self.backlog() if self.backlog is not None else 0
        return max(0, self._rendered - backlog)

    def latents(self) -> np.ndarray:
        """The latest requested latent values in model units, shape (latent_size,)."""
        return self._requested.copy()

    def set_latent(self, index: int, value: float, *, glide_s: float = 0.0,
                   at: int | None = None) -> None:
        """Move latent `index` to `value` (model units) over one latent frame or `glide_s`."""
        model = self._model
        if not 0 <= index < model.latent_size:
            raise ValueError(f"latent index {index} is outside 0..{model.latent_size - 1} for model {model.name}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"latent {index}: value {value} is not finite")
        glide_frames = max(0.0, float(glide_s)) * model.sample_rate / model.hop
        self._requested[index] = value
        self._post("latent", at, (self._generation, index, value, glide_frames))

    def set_gain_db(self, db: float, *, at: int | None = None) -> None:
        """Output gain in dB (−120 and below is silence), reached over 10 ms."""
        db = float(db)
        if math.isnan(db):
            raise ValueError("gain is NaN")
        self._gain_db = db
        self.stage.post(self._event("gain", at, (dsp.db_to_amplitude(db),)))

    def set_gate(self, on: bool, *, velocity: float = 1.0, attack_s: float = 0.005,
                 release_s: float = 0.25, at: int | None = None) -> None:
        """Open the gate to `velocity` (0..1) over `attack_s`, or close it over `release_s`."""
        velocity = min(1.0, max(0.0, float(velocity)))
        self._gate_on = bool(on)
        seconds = attack_s if on else release_s
        samples = int(round(max(0.0, float(seconds)) * self.sample_rate))
        self.stage.post(self._event("gate", at, (velocity if on else 0.0, samples)))

    def swap_model(self, model: Model, *, crossfade_s: float = 0.05) -> None:
        """Crossfade to `model` over `crossfade_s`; the stream never stops.

        Controls with the same label keep their value (clamped to the new range); the
        others start at the new model's defaults. The caller's thread pays for warming
        the new model up, not the render thread.
        """
        if model is self._model:
            return
        self._warm_up(model)
        old = {c.label: self._requested[c.index] for c in self._model.controls}
        values = np.array([min(c.maximum, max(c.minimum, old[c.label])) if c.label in old else c.default
                           for c in model.controls], dtype=np.float64)
        self._generation += 1
        self._model = model
        self._requested = values.copy()
        samples = int(round(max(0.0, crossfade_s) * self.sample_rate))
        self._post("swap", None, (model, self._generation, values, samples))

    def _event(self, kind: str, at: int | None, args: tuple) -> _Event:
        return _Event(-1 if at is None else int(at), next(self._seq), kind, args)

    def _post(self, kind: str, at: int | None, args: tuple) -> None:
        self._inbox.append(self._event(kind, at, args))

    # ---------------------------------------------------------------- rendering (one thread)

    def render(self, frames: int) -> np.ndarray:
        """The next `frames` samples, shape (frames, channels), float32, within ±1; before the
        output stage (gain, gate, limiter) while `stage_deferred` is set."""
        t0 = time.perf_counter()
        out = np.zeros((frames, self.channels), dtype=np.float64)
        self._drain_inbox()
        self._mix_voices(out, self._rendered)
        self._rendered += frames
        out = out.astype(np.float32) if self.stage_deferred else self.stage.process(out)
        self._account(time.perf_counter() - t0, frames)
        return out

    def _drain_inbox(self) -> None:
        while self._inbox:
            ev = self._inbox.popleft()
            if ev.at < 0:
                ev.at = self._rendered
            if ev.kind == "swap":
                # applied in arrival order, so latent events posted after it find the new voice
                model, generation, values, samples = ev.args
                for voice in self._voices:
                    voice.fade.set(0.0, samples)
                self._start_voice(model, generation, values, samples)
            else:
                heapq.heappush(self._latent_events, ev)

    def _apply_latent_events(self, voice: _Voice, until: float) -> None:
        """Apply latent events dated before `until` to the active voice (older ones are stale)."""
        events = self._latent_events
        while events and events[0].at < until:
            ev = heapq.heappop(events)
            generation, index, value, glide_frames = ev.args
            if generation == voice.generation:
                voice.set_target(index, value, glide_frames)

    def _start_voice(self, model: Model, generation: int, values: np.ndarray, crossfade: int) -> None:
        frames_per_call = max(1, math.ceil(self.block_frames * model.sample_rate / self.sample_rate / model.hop))
        voice = _Voice(model, generation, values, self.sample_rate, self.channels, frames_per_call,
                       fade_from=0.0 if crossfade > 0 else 1.0)
        voice.fade.set(1.0, crossfade)
        self._voices.append(voice)
        self._active = voice

    def _mix_voices(self, out: np.ndarray, start: int) -> None:
        """Mix every voice into `out` (n, channels), `start` the engine position of its first sample."""
        n = out.shape[0]
        for voice in list(self._voices):
            fading = voice.fade.moving or voice.fade.value != 1.0
            gain = dsp.equal_power(voice.fade.process(n)) if fading else None
            sig = voice.pull(n, start, self) @ voice.mix
            out += sig if gain is None else sig * gain[:, None]
            if voice is not self._active and not voice.fade.moving and voice.fade.value == 0.0:
                self._voices.remove(voice)

    def _decode(self, model: Model, z: np.ndarray) -> np.ndarray:
        """Decode latents (1, latent_size, frames) -> (frames * hop, channels) float32.

        A block with NaN/Inf (or a decode that raises) becomes silence, is counted, and the
        model's state is reset so that one bad block does not poison the ones after it.
        """
        expected = z.shape[2] * model.hop
        try:
            with torch.inference_mode():
                y = model.module.decode(torch.from_numpy(z))
            ok = tuple(y.shape) == (1, model.channels, expected)
            if ok and bool(torch.isfinite(y).all()):
                return y[0].numpy().T.astype(np.float32, copy=True)
            if ok:
                self.nan_blocks += 1
            else:
                self.decode_errors += 1
        except Exception as exc:  # a decode that fails mid-performance must not stop the music
            self.decode_errors += 1
            if self.decode_errors <= 3:
                log.error("decode failed (%s); the block plays as silence", exc)
        self._recover(model)
        return np.zeros((expected, model.channels), dtype=np.float32)

    def _recover(self, model: Model) -> None:
        """Clear a bad block out of the model's streaming state, on the render thread: the file's
        `reset()`, or, without one, RECOVERY_FRAMES frames decoded at the defaults and dropped
        (reloading the file would stall the render thread for a load's time)."""
        try:
            if model.resettable:
                model.module.reset()
            else:
                _decode_defaults(model, RECOVERY_FRAMES)
        except Exception:
            pass

    def _warm_up(self, model: Model) -> None:
        frames = max(1, math.ceil(self.block_frames * model.sample_rate / self.sample_rate / model.hop))
        for _ in range(WARMUP_CALLS):
            _decode_defaults(model, frames)
        # a file without reset() keeps the state of these calls, which is that of a stream at the
        # defaults: reloading it would throw away what the warm-up calls optimised
        if model.resettable:
            model.reset()

    # ---------------------------------------------------------------- statistics

    def _account(self, seconds: float, frames: int) -> None:
        self._render_time += seconds
        ms = seconds * 1000.0
        self._ms_window[self._calls % STATS_WINDOW] = ms
        self._calls += 1
        self._ms_max = max(self._ms_max, ms)
        self._load_peak = max(self._load_peak, seconds * self.sample_rate / frames)

    def stats(self) -> dict[str, Any]:
        """Counters and render figures; merged with the live output's when one is attached.

        render_load_* are render time over the audio time rendered (1.0 = just real time);
        render_ms_p99 covers the last few thousand render calls, the rest the whole run.
        """
        calls = min(self._calls, STATS_WINDOW)
        audio_s = self._rendered / self.sample_rate
        stats: dict[str, Any] = {
            "model": self._model.name,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "block_frames": self.block_frames,
            "clock": self.clock,
            "nan_blocks": self.nan_blocks,
            "decode_errors": self.decode_errors,
            "render_calls": self._calls,
            "render_load_mean": self._render_time / audio_s if audio_s else 0.0,
            "render_load_peak": self._load_peak,
            "render_ms_mean": 1000.0 * self._render_time / self._calls if self._calls else 0.0,
            "render_ms_p99": float(np.percentile(self._ms_window[:calls], 99)) if calls else 0.0,
            "render_ms_max": self._ms_max,
            "gain_db": self._gain_db,
            "gate": self._gate_on,
            "voices": len(self._voices),
            "underruns": 0,
            "latency_ms": 1000.0 * self._model.latency_samples / self._model.sample_rate,
        }
        if self.output_stats is not None:
            out = self.output_stats()
            stats["latency_ms"] += out.get("latency_ms", 0.0)
            stats.update({k: v for k, v in out.items() if k != "latency_ms"})
        return stats


def _decode_defaults(model: Model, frames: int) -> None:
    """Decode `frames` latent frames at the model's defaults and drop the audio (warm-up, and
    clearing the state of a file without `reset()`)."""
    z = torch.tensor(model.defaults(), dtype=torch.float32).view(1, -1, 1).expand(1, -1, frames).contiguous()
    with torch.inference_mode():
        model.module.decode(z)
