"""The engine: turns control changes into audio through a model's streaming `decode`.

One engine serves both live playing (a render thread calls `render` ahead of the audio
callback) and offline rendering (a caller calls `render` directly), so both produce the
same samples for the same events.

Signal path per block: events -> per-latent ramps (one value per latent frame and voice) ->
one decode call for the voices that sound (batch = voices, or the sounding ones alone while
they are at most half) -> NaN/Inf guard -> each voice under its
envelope -> channel map -> crossfade between model instances (model swap) -> output stage:
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
from synthd.patch import InputSettings
from synthd.transfer import InputPath

log = logging.getLogger(__name__)

GAIN_RAMP_S = 0.01  # a gain change glides over 10 ms: fast, but never a step
STATS_WINDOW = 4096  # render calls kept for the p99 figure (about 22 s at 256 frames)
WARMUP_CALLS = 3  # TorchScript optimises a method on its first calls: keep that off stage
MAX_VOICES = 64
# the largest share of the voices decoded alone (`decode_rows`) rather than with the silent ones:
# gathering and scattering the rows' streams costs about what decoding the rest would at more than
# half of them (bench/voices.py, "engine, N of 8 sounding")
ROWS_ALONE = 0.5
STEAL_S = 0.005  # a stolen voice fades out over this long before its new note: never a click


@dataclass(order=True)
class _Event:
    at: int
    seq: int
    kind: str = field(compare=False)
    args: tuple = field(compare=False, default=())


class _Queue:
    """Events in time order (then arrival order): a heap of (at, seq, event) tuples, which compare
    in C; a flood of note events costs the render thread heap operations, not Python comparisons."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, _Event]] = []

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self):
        return (item[2] for item in self._heap)

    def push(self, ev: _Event) -> None:
        heapq.heappush(self._heap, (ev.at, ev.seq, ev))

    def first(self) -> int:
        """The time of the earliest event (the queue must not be empty)."""
        return self._heap[0][0]

    def pop(self) -> _Event:
        return heapq.heappop(self._heap)[2]


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
        self._events = _Queue()
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
            self._events.push(ev)
        frames = block.shape[0]
        end = self.position + frames
        if (self._gain.moving or self._gate.moving or (self._events and self._events.first() < end)):
            amp = np.empty(frames)
            pos = 0
            while pos < frames:
                now = self.position + pos
                while self._events and self._events.first() <= now:
                    self._apply(self._events.pop())
                n = frames - pos
                if self._events:
                    n = min(n, self._events.first() - now)
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


class RenderTimer:
    """Render time against audio time, for the status: a whole-run mean and peak, and a p99 over
    the last STATS_WINDOW calls (about 22 s at 256 frames)."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.calls = 0
        self._seconds = 0.0
        self._samples = 0
        self._peak = 0.0
        self._ms_max = 0.0
        self._ms_window = np.zeros(STATS_WINDOW)

    def add(self, seconds: float, frames: int) -> None:
        """One render call of `frames` samples that took `seconds`."""
        ms = 1000.0 * seconds
        self._seconds += seconds
        self._samples += frames
        self._ms_window[self.calls % STATS_WINDOW] = ms
        self.calls += 1
        self._ms_max = max(self._ms_max, ms)
        self._peak = max(self._peak, seconds * self.sample_rate / frames)

    def figures(self) -> dict[str, Any]:
        """render_calls and render_load_* (render time over audio time: 1.0 = just real time),
        render_ms_* per call."""
        window = min(self.calls, STATS_WINDOW)
        audio_s = self._samples / self.sample_rate
        return {
            "render_calls": self.calls,
            "render_load_mean": self._seconds / audio_s if audio_s else 0.0,
            "render_load_peak": self._peak,
            "render_ms_mean": 1000.0 * self._seconds / self.calls if self.calls else 0.0,
            "render_ms_p99": float(np.percentile(self._ms_window[:window], 99)) if window else 0.0,
            "render_ms_max": self._ms_max,
        }


@dataclass
class EnvelopeSettings:
    """A voice's envelope in seconds (sustain 0..1): the patch's `[gate]` table."""

    attack: float = 0.005
    decay: float = 0.0
    sustain: float = 1.0
    release: float = 0.25


class _Instance:
    """One model playing all the voices of the engine in one batched decode: its latent ramps
    (one row per voice), its decoded-but-unplayed samples, its crossfade (model swap)."""

    def __init__(self, model: Model, generation: int, values: np.ndarray, voices: int, engine_rate: int,
                 engine_channels: int, frames_per_call: int, fade_from: float, input: InputPath | None = None):
        self.model = model
        self.input = input  # audio input: its encoded controls drive the decoder (one voice)
        self.generation = generation
        # latent values fed on the last frame, one row per voice; `own` marks the values a voice
        # holds apart from the shared ones (its note's pitch, its velocity)
        self.value = np.tile(np.asarray(values, dtype=np.float64), (voices, 1))
        self.target = self.value.copy()
        self._step = np.zeros_like(self.value)  # per-frame increment towards target
        self.own = np.zeros(self.value.shape, dtype=bool)
        self.silenced = np.zeros(voices, dtype=bool)  # voices whose new notes another model plays
        self.shared = np.array(values, dtype=np.float64)  # where voices without their own head
        self.fade = dsp.Ramp(fade_from)
        self.frames_per_call = frames_per_call
        self.mix = channel_map(model.channels, engine_channels)
        self.frame_len = model.hop * engine_rate / model.sample_rate  # in engine samples
        self._resampler = (soxr.ResampleStream(model.sample_rate, engine_rate, voices * model.channels,
                                               dtype="float32", quality="HQ")
                           if model.sample_rate != engine_rate else None)
        self._pending = np.zeros((0, voices, model.channels), dtype=np.float32)
        self._z = np.zeros((voices, model.latent_size, frames_per_call), dtype=np.float32)
        self.fresh = np.zeros(voices, dtype=bool)  # voices whose stream starts afresh on the next call

    @property
    def pending(self) -> int:
        """Samples decoded and not yet mixed."""
        return self._pending.shape[0]

    def set_target(self, voice: int, index: int, value: float | None, glide_frames: float) -> None:
        """Head for `value` on one voice (`voice` >= 0: it now holds the value apart) or on every
        voice that does not hold `index` apart (-1). `value` None gives a voice back the shared one."""
        frames = max(1.0, glide_frames)
        if voice < 0:
            rows = ~self.own[:, index]
            self.shared[index] = value
            self.target[rows, index] = value
            self._step[rows, index] = (value - self.value[rows, index]) / frames
            return
        self.own[voice, index] = value is not None
        if value is None:
            value = self.shared[index]
        self.target[voice, index] = value
        self._step[voice, index] = (value - self.value[voice, index]) / frames

    def start_note(self, voice: int, values: dict[int, float], glide_frames: float, fresh: bool = False) -> None:
        """A new note on `voice`: the last note's own values go back to the shared ones, and
        `values` (index -> model units) become its own. With `fresh`, the voice's decode stream
        starts afresh on the next call (the model's `restart`): silent voices only."""
        self.fresh[voice] |= fresh
        own = self.own[voice]
        if own.any():
            self.target[voice, own] = self.shared[own]
            self._step[voice, own] = (self.shared[own] - self.value[voice, own])
            own[:] = False
        for index, value in values.items():
            self.set_target(voice, index, value, glide_frames)

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
        """The next `frames` samples of every voice (frames, voices, model channels), decoding as
        needed.

        `start` is the engine position of the first sample; it dates each new latent frame so
        that scheduled latent events land on the frame that contains them. A call in which no
        voice sounds is not decoded: it plays as silence and costs nothing.
        """
        while self._pending.shape[0] < frames:
            frame_start = start + self._pending.shape[0]
            encoded, gate = None, None
            if self.input is not None:
                began = time.monotonic()
                encoded, gate = self.input.encode()
                engine.model_s += time.monotonic() - began
            for j in range(self.frames_per_call):
                if engine._active is self:
                    engine._apply_latent_events(self, frame_start + (j + 1) * self.frame_len, first=j == 0)
                self._advance()
                if self.input is None:
                    self._z[:, :, j] = self.value
                else:
                    self._z[0, :, j] = self.input.combine(None if encoded is None else encoded[:, j], self.value[0],
                                                          engine.note_held)
            rows = engine.rows_to_decode(frame_start + self.frames_per_call * self.frame_len)
            if rows is not None and self.silenced.any():
                rows &= ~self.silenced
            if rows is not None and not rows.any():
                engine.skipped_calls += 1
                chunk = np.zeros((self.frames_per_call * self.model.hop, self._z.shape[0] * self.model.channels),
                                 dtype=np.float32)
            else:
                chunk = engine._decode(self.model, self._z, self.fresh if self.fresh.any() else None, rows)
                self.fresh[:] = False
            if gate is not None:
                chunk *= gate[:, None].astype(np.float32)
            if self._resampler is not None:
                chunk = self._resampler.resample_chunk(chunk)
            chunk = chunk.reshape(chunk.shape[0], self._z.shape[0], self.model.channels)
            self._pending = np.concatenate([self._pending, chunk]) if self._pending.size else chunk
        out, self._pending = self._pending[:frames], self._pending[frames:]
        return out


class Engine:
    """Renders a model's audio at the model's rate; the one engine behind live and offline.

    Rate and channel count are fixed at construction (the first model's rate); a model
    swapped in at another rate is resampled to it, so the stream never stops or changes pitch.

    With one voice the engine plays the model as one instrument whose gate acts in the output
    stage (within one device period, live). With several, each voice is a note: its own latent
    row in one batched decode per block (batch = voices), its own envelope applied before the
    mix. A note starts at its pitch: with a model that can restart one voice's stream, its voice
    starts afresh on the frame that carries the pitch and its envelope opens at the note's time;
    without, the envelope opens once that frame has played. A block in which no voice sounds is
    not decoded at all, and while at most half the voices sound, a model that can decode single
    rows (`decode_rows`) decodes theirs alone.
    """

    def __init__(self, model: Model, *, channels: int = 2, block_frames: int = 256,
                 threads: int = 1, gate_open: bool = True, gain_db: float = 0.0, voices: int = 1,
                 envelope: EnvelopeSettings | None = None, input_settings: InputSettings | None = None):
        if channels < 1:
            raise ValueError(f"channels must be at least 1, not {channels}")
        if block_frames < 1:
            raise ValueError(f"block_frames must be at least 1, not {block_frames}")
        if not 1 <= voices <= MAX_VOICES:
            raise ValueError(f"voices must be 1..{MAX_VOICES}, not {voices}")
        if input_settings is not None and voices != 1:
            raise ValueError(f"audio input plays one voice, not {voices}")
        self.threads = max(1, int(threads))
        torch.set_num_threads(self.threads)  # before this engine's first model call
        self.sample_rate = model.sample_rate
        self.channels = channels
        self.block_frames = block_frames
        self.voices = voices
        self._inbox: deque[_Event] = deque()
        self._seq = itertools.count()
        self._latent_events = _Queue()
        self._note_events = _Queue()  # envelope events of the voices, sample-accurate
        self._note_at = [0] * voices  # when each voice's latest note starts
        self._rendered = 0
        self._generation = 0
        self._model = model
        self._requested = np.array(model.defaults(), dtype=np.float64)
        self._gain_db = float(gain_db)
        self._gate_on = gate_open
        self._gate_opened_at = -1  # one voice: when its gate last opened with a frame (engine samples)
        self.envelope = envelope or EnvelopeSettings()
        self._envelopes = [dsp.Envelope(*self._envelope_samples()) for _ in range(voices)] if voices > 1 else []
        self.stage = OutputStage(self.sample_rate, channels, gain=dsp.db_to_amplitude(gain_db),
                                 gate=1.0 if gate_open or voices > 1 else 0.0)
        # True while a live output runs `stage` in its audio callback instead
        self.stage_deferred = False
        self._instances: list[_Instance] = []
        self._active: _Instance | None = None
        self.backlog: Callable[[], int] | None = None  # live output: samples rendered, not yet played
        self.output_stats: Callable[[], dict[str, Any]] | None = None
        self.nan_blocks = 0
        self.decode_errors = 0
        self.skipped_calls = 0  # decode calls not made: no voice sounded
        self.skipped_rows = 0  # voices left out of the decode calls made: they were silent
        self.timer = RenderTimer(self.sample_rate)
        self.model_s = 0.0  # wall time in model calls so far (encodes, restarts, decodes), for synthd.trace
        # audio input (None: none): its settings, gain, DC blocker, the dry signal's delay line
        self.input_settings = input_settings
        self.note_held = False  # with input: a held note, which takes over a pitch input
        if input_settings is not None:
            model.check_encode()
            self._input_gain = dsp.Ramp(dsp.db_to_amplitude(input_settings.gain_db))
            self._dry_wet = dsp.Ramp(input_settings.dry_wet)
            self._input_dc = dsp.DCBlocker(1, self.sample_rate)
            self._dry = np.zeros(0, dtype=np.float32)
            self.input_level_db = -120.0
        self._warm_up(model)
        self._start_instance(model, self._generation, self._requested.copy(), crossfade=0)

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
        """The latest requested shared latent values in model units, shape (latent_size,)."""
        return self._requested.copy()

    def set_latent(self, index: int, value: float, *, glide_s: float = 0.0, at: int | None = None,
                   voice: int | None = None) -> None:
        """Move latent `index` to `value` (model units) over one latent frame or `glide_s`: on every
        voice that does not hold it apart (`voice` None), or on voice `voice` alone, which then
        holds it apart until its next note."""
        model = self._model
        if not 0 <= index < model.latent_size:
            raise ValueError(f"latent index {index} is outside 0..{model.latent_size - 1} for model {model.name}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"latent {index}: value {value} is not finite")
        if voice is None:
            self._requested[index] = value
        elif not 0 <= voice < self.voices:
            raise ValueError(f"voice {voice} is outside 0..{self.voices - 1}")
        self._post("latent", at, (self._generation, -1 if voice is None else voice, index, value,
                                  self._glide_frames(glide_s)))

    def _glide_frames(self, glide_s: float) -> float:
        return max(0.0, float(glide_s)) * self._model.sample_rate / self._model.hop

    def set_gain_db(self, db: float, *, at: int | None = None) -> None:
        """Output gain in dB (−120 and below is silence), reached over 10 ms."""
        db = float(db)
        if math.isnan(db):
            raise ValueError("gain is NaN")
        self._gain_db = db
        self.stage.post(self._event("gain", at, (dsp.db_to_amplitude(db),)))

    def set_gate(self, on: bool, *, velocity: float = 1.0, attack_s: float = 0.005,
                 release_s: float = 0.25, at: int | None = None, with_frame: bool = False,
                 fresh: bool = False) -> None:
        """One voice: open the gate to `velocity` (0..1) over `attack_s`, or close it over
        `release_s`. (Several voices each have a note's envelope: see `note_on`.) With audio
        input the input's own level gates the sound: an open gate here is a held note, which takes
        over a pitch input when the patch's `pitch_source` is "notes".

        The gate acts in the output stage, within a device period, unless `with_frame` (a model
        with a pitch input, whose note values go through the render-ahead ring): then it moves
        on the latent frame that carries the values posted with it, as a voice's envelope does
        (see `_apply_latent_events`), so a note is never heard at the last note's pitch. With
        `fresh` (the voice is silent: its last release is over) an opening restarts the voice."""
        if self.input_settings is not None:
            self._post("hold", at, (bool(on),))
            return
        velocity = min(1.0, max(0.0, float(velocity)))
        self._gate_on = bool(on)
        seconds = attack_s if on else release_s
        samples = int(round(max(0.0, float(seconds)) * self.sample_rate))
        if with_frame:
            self._post("gate", at, (velocity if on else 0.0, samples, bool(on and fresh)))
        else:
            self.stage.post(self._event("gate", at, (velocity if on else 0.0, samples)))

    def set_input(self, settings: InputSettings) -> None:
        """New `[input]` settings (a patch reload or an OSC change); gain and dry/wet glide over 10 ms."""
        if self.input_settings is None:
            raise ValueError("this engine has no audio input")
        self.input_settings = settings
        self._post("input", None, (settings,))

    def set_envelope(self, envelope: EnvelopeSettings) -> None:
        """New envelope times for every voice (a patch reload); notes under way keep their segment."""
        self._post("envelope", None, (envelope,))

    def note_on(self, voice: int, velocity: float, values: dict[int, float], *, glide_s: float = 0.0,
                steal: bool = False, at: int | None = None) -> None:
        """Start a note on `voice`: its own latent values `values` (index -> model units, e.g. its
        pitch) reach the decoder on the frame that contains `at`, and its envelope opens to
        `velocity` (0..1) at `at` (with a model that can restart a voice) or at the end of that
        frame (without: see `_apply_latent_events`). With `steal`, the voice is still sounding
        another note: it fades out over STEAL_S first, then plays the new one."""
        if not 0 <= voice < self.voices or self.voices == 1:
            raise ValueError(f"voice {voice} is outside 0..{self.voices - 1} (note_on needs several voices)")
        velocity = min(1.0, max(0.0, float(velocity)))
        clean = {int(i): float(v) for i, v in values.items()}
        for i, v in clean.items():
            if not (0 <= i < self._model.latent_size and math.isfinite(v)):
                raise ValueError(f"voice {voice}: latent {i} = {v} is not a latent value of model {self._model.name}")
        self._post("note", at, (self._generation, voice, velocity, clean, self._glide_frames(glide_s), steal))

    def note_off(self, voice: int, *, at: int | None = None, fade: bool = False) -> None:
        """Release `voice` (on the frame boundary after `at`, as its note started); with `fade`,
        fade it out over STEAL_S at `at` instead (all sound off)."""
        if not 0 <= voice < self.voices or self.voices == 1:
            raise ValueError(f"voice {voice} is outside 0..{self.voices - 1} (note_off needs several voices)")
        self._post("cut" if fade else "off", at, (self._generation, voice))

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

    def _envelope_samples(self) -> tuple[int, int, float, int]:
        e, rate = self.envelope, self.sample_rate
        return (int(round(e.attack * rate)), int(round(e.decay * rate)), e.sustain, int(round(e.release * rate)))

    def _event(self, kind: str, at: int | None, args: tuple) -> _Event:
        return _Event(-1 if at is None else int(at), next(self._seq), kind, args)

    def _post(self, kind: str, at: int | None, args: tuple) -> None:
        self._inbox.append(self._event(kind, at, args))

    # ---------------------------------------------------------------- rendering (one thread)

    def render(self, frames: int, input: np.ndarray | None = None) -> np.ndarray:
        """The next `frames` samples, shape (frames, channels), float32, within ±1; before the
        output stage (gain, gate, limiter) while `stage_deferred` is set. With audio input, `input`
        `(frames,)` is the input's next block at the engine's rate (None: silence, e.g. the device
        is gone)."""
        t0 = time.perf_counter()
        out = np.zeros((frames, self.channels), dtype=np.float64)
        self._drain_inbox()
        dry = self._take_input(frames, input) if self.input_settings is not None else None
        self._mix(out, self._rendered)
        if dry is not None:
            wet = self._dry_wet.process(frames)
            out *= wet[:, None]
            out += (dry * (1.0 - wet))[:, None]
        self._rendered += frames
        out = out.astype(np.float32) if self.stage_deferred else self.stage.process(out)
        self.timer.add(time.perf_counter() - t0, frames)
        return out

    def _take_input(self, frames: int, x: np.ndarray | None) -> np.ndarray:
        """Clean the input block (non-finite samples to 0, clipped to ±4, DC removed, gain), hand it
        to every model instance, and return the dry signal, delayed as the active model's encoder
        lags, so that dry and wet line up."""
        x = np.zeros(0, np.float32) if x is None else np.asarray(x, dtype=np.float32).reshape(-1)[:frames]
        if x.shape[0] < frames:  # the end of a file, or no input at all: silence after it
            x = np.concatenate([x, np.zeros(frames - x.shape[0], np.float32)])
        x = np.clip(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), -4.0, 4.0)
        x = self._input_dc.process(x[:, None])[:, 0] * self._input_gain.process(frames)
        x = x.astype(np.float32)
        peak = float(np.abs(x).max(initial=0.0))
        self.input_level_db = 20.0 * math.log10(max(peak, 1e-6))
        for instance in self._instances:
            if instance.input is not None:
                instance.input.push(x)
        active = self._active.input
        delay = int(round(active.delay * self.sample_rate / active.model.sample_rate)) if active else 0
        line = np.concatenate([self._dry, x])
        if line.shape[0] < delay + frames:  # the delay grew (a model swap): silence first
            line = np.concatenate([np.zeros(delay + frames - line.shape[0], np.float32), line])
        end = line.shape[0] - delay
        self._dry = line[end:]
        return line[end - frames:end].astype(np.float64)

    def _drain_inbox(self) -> None:
        while self._inbox:
            ev = self._inbox.popleft()
            if ev.at < 0:
                ev.at = self._rendered
            if ev.kind == "swap":
                # applied in arrival order, so latent events posted after it find the new instance
                model, generation, values, samples = ev.args
                for instance in self._instances:
                    instance.fade.set(0.0, samples)
                self._start_instance(model, generation, values, samples)
            elif ev.kind == "hold":
                self.note_held = ev.args[0]
            elif ev.kind == "input":
                settings = ev.args[0]
                self._input_gain.set(dsp.db_to_amplitude(settings.gain_db), int(GAIN_RAMP_S * self.sample_rate))
                self._dry_wet.set(settings.dry_wet, int(GAIN_RAMP_S * self.sample_rate))
                for instance in self._instances:
                    if instance.input is not None:
                        instance.input.configure(settings)
            elif ev.kind == "envelope":
                self.envelope = ev.args[0]
                for env in self._envelopes:
                    env.configure(*self._envelope_samples())
            elif ev.kind == "note":
                voice = ev.args[1]
                if ev.args[5]:
                    # a stolen voice fades out first; its new note takes the first latent frame
                    # that starts once the fade is over, so the old note never changes pitch
                    self._note_events.push(_Event(ev.at, ev.seq, "fade", (voice,)))
                    ev.at = self._frame_start_from(ev.at + int(STEAL_S * self.sample_rate))
                self._note_at[voice] = ev.at
                self._latent_events.push(ev)
            else:
                if ev.kind in ("off", "cut"):  # never before the note it ends (a steal delays notes)
                    ev.at = max(ev.at, self._note_at[ev.args[1]])
                self._latent_events.push(ev)

    def _frame_start_from(self, at: int) -> int:
        """The start (engine samples) of the active instance's first latent frame that starts at
        or after `at`."""
        instance = self._active
        first = self._rendered + instance.pending  # the next frame it will decode starts here
        frames = max(0.0, math.ceil((at - first) / instance.frame_len - 1e-9))
        return int(math.ceil(first + frames * instance.frame_len))

    def _apply_latent_events(self, instance: _Instance, until: float, first: bool = True) -> None:
        """Apply latent and note events dated before `until` (the end of the frame being built;
        `first`: the first frame of its decode call) to the active instance (older generations'
        events are stale).

        A note starts at its pitch. With a model that can start one voice afresh (`restart`), the
        voice's stream restarts on this frame, which then plays the note's pitch from its first
        sample, and its envelope opens at the note's own time; the voice is silent before it (a
        free voice, or a stolen one whose fade is over). Without, the envelope opens at `until`,
        when the frame carrying the pitch (across which the voice glides from its last note) has
        played. A stolen voice restarts only on a call's first frame: a restart acts on a whole
        call, and the frames before the note in it still play the old note's fade.

        Of the notes a voice gets within one frame only the last is heard (a flood of notes costs
        one envelope event per voice and frame); a release that follows it in the same frame waits
        one frame more, so even the shortest note sounds.
        """
        events = self._latent_events
        last: dict[int, tuple[_Event | None, _Event | None]] = {}  # voice -> (its last note, a release after it)
        gates: list[_Event] = []  # one voice's gate moving with the frames (`set_gate`'s with_frame)
        while events and events.first() < until:
            ev = events.pop()
            if ev.kind == "latent":
                if ev.args[0] == instance.generation:
                    _, voice, index, value, glide_frames = ev.args
                    instance.set_target(voice, index, value, glide_frames)
                continue
            if ev.kind == "gate":
                gates.append(ev)
                continue
            voice = ev.args[1]
            note, _ = last.get(voice, (None, None))
            last[voice] = (ev, None) if ev.kind == "note" else (note, ev)  # "off" or "cut"
        at = int(math.ceil(until))
        frame_start = int(math.ceil(until - instance.frame_len))
        for ev in gates:
            self._gate_with_frame(instance, ev, frame_start, at, first)
        for voice, (note, off) in last.items():
            if note is not None:
                opens = at
                # a note outlives a model swap (its envelope); its values do not, as their indices
                # are the old model's: the control surface sends them again for the new one
                if note.args[0] == instance.generation:
                    _, _, _, values, glide_frames, stolen = note.args
                    fresh = self.voices > 1 and instance.model.restartable and (first or not stolen)
                    instance.start_note(voice, values, glide_frames, fresh)
                    if fresh:
                        opens = max(frame_start, note.at)
                self._note_events.push(_Event(opens, note.seq, "note", (voice, note.args[2])))
            if off is not None:  # never lost, or a note would hang
                later = int(math.ceil(instance.frame_len)) if note is not None else 0
                kind = "fade" if off.kind == "cut" else "off"
                self._note_events.push(_Event(at + later, off.seq, kind, (voice,)))

    def _gate_with_frame(self, instance: _Instance, ev: _Event, frame_start: int, frame_end: int,
                         first: bool) -> None:
        """Date one voice's gate event `ev` on the frame being built (`frame_start`..`frame_end`)
        and hand it to the output stage, which applies it when that sample plays: an opening on a
        silent voice restarts the voice on this frame and opens at its own time (a model that
        can restart), else at the frame's end, once the frame carrying the note's pitch has
        played; a closing never comes before the opening it follows (a frame after it, when both
        fall in one frame, so the shortest note sounds)."""
        level, samples, fresh = ev.args
        if level > 0.0:
            if fresh and first and instance.model.restartable:
                instance.fresh[0] = True
                when = max(frame_start, ev.at)
            else:
                when = frame_end
            self._gate_opened_at = when
        else:
            when = max(frame_start, ev.at)
            if self._gate_opened_at >= frame_start:
                when = max(when, self._gate_opened_at + int(math.ceil(instance.frame_len)))
        self.stage.post(_Event(when, ev.seq, "gate", (level, samples)))

    def rows_to_decode(self, end: float) -> np.ndarray | None:
        """The voices `(voices,)` that sound at some point from now up to engine position `end`:
        those sounding now and those whose note opens by `end` (its call carries the note's
        pitch). None with one voice: it is always decoded (its gate acts after the decode)."""
        if self.voices == 1:
            return None
        rows = np.fromiter((env.sounding for env in self._envelopes), dtype=bool, count=self.voices)
        if not rows.all():
            last = math.ceil(end)  # a note that waits for its pitch's frame opens at its end, rounded up
            for ev in self._note_events:
                if ev.kind == "note" and ev.at <= last:
                    rows[ev.args[0]] = True
        return rows

    def _start_instance(self, model: Model, generation: int, values: np.ndarray, crossfade: int) -> None:
        frames_per_call = max(1, math.ceil(self.block_frames * model.sample_rate / self.sample_rate / model.hop))
        path = (InputPath(model, self.input_settings, engine_rate=self.sample_rate, block_frames=self.block_frames,
                          frames_per_call=frames_per_call) if self.input_settings is not None else None)
        instance = _Instance(model, generation, values, self.voices, self.sample_rate, self.channels,
                             frames_per_call, fade_from=0.0 if crossfade > 0 else 1.0, input=path)
        instance.fade.set(1.0, crossfade)
        if self._active is not None:  # the notes under way keep their own values in the new model
            old, new = self._active.model, model
            for c in old.controls:
                try:
                    j = new.control(c.label).index
                except KeyError:
                    continue
                for v in np.flatnonzero(self._active.own[:, c.index]):
                    instance.set_target(int(v), j, float(self._active.target[v, c.index]), 0.0)
                    instance.value[v, j] = instance.target[v, j]
        self._instances.append(instance)
        self._active = instance

    def _levels(self, n: int, start: int) -> np.ndarray | None:
        """Each voice's envelope over the next `n` samples (voices, n), applying the note events
        due in them at their sample; None with one voice (its gate acts in the output stage).
        Each envelope is cut only at its own events: a flood of notes on one voice costs that
        voice, not every voice."""
        if self.voices == 1:
            return None
        levels = np.empty((self.voices, n))
        events = self._note_events
        due: dict[int, list[_Event]] = {}
        while events and events.first() < start + n:
            ev = events.pop()
            due.setdefault(ev.args[0], []).append(ev)
        for v, env in enumerate(self._envelopes):
            pos = 0
            for ev in due.get(v, ()):
                at = min(n, max(pos, ev.at - start))
                if at > pos:
                    levels[v, pos:at] = env.process(at - pos)
                    pos = at
                if ev.kind == "note":
                    env.start(ev.args[1])
                    for instance in self._instances:  # a model fading out (a swap) never plays it
                        if instance is not self._active:
                            instance.silenced[v] = True
                elif ev.kind == "off":
                    env.release()
                else:
                    env.fade(int(STEAL_S * self.sample_rate))
            levels[v, pos:] = env.process(n - pos)
        return levels

    def _mix(self, out: np.ndarray, start: int) -> None:
        """Mix every instance into `out` (n, channels), `start` the engine position of its first
        sample: each voice under its envelope, each instance under its crossfade."""
        n = out.shape[0]
        sigs = [(instance, instance.pull(n, start, self)) for instance in list(self._instances)]
        levels = self._levels(n, start)
        for instance, sig in sigs:
            fading = instance.fade.moving or instance.fade.value != 1.0
            gain = dsp.equal_power(instance.fade.process(n)) if fading else None
            if levels is None:
                mono = sig[:, 0, :]
            else:
                mono = np.einsum("nvc,vn->nc", sig, levels * ~instance.silenced[:, None] if instance.silenced.any()
                                 else levels)
            mixed = mono @ instance.mix
            out += mixed if gain is None else mixed * gain[:, None]
            if instance is not self._active and not instance.fade.moving and instance.fade.value == 0.0:
                self._instances.remove(instance)

    def sounding(self) -> int:
        """How many voices sound now (with one voice: 1 while its gate is open)."""
        if self.voices == 1:
            return int(self._gate_on)
        return sum(env.sounding for env in self._envelopes)

    def _decode(self, model: Model, z: np.ndarray, fresh: np.ndarray | None = None,
                rows: np.ndarray | None = None) -> np.ndarray:
        """Decode latents (voices, latent_size, frames) -> (frames * hop, voices * channels) float32,
        each voice's channels side by side; the voices `fresh` marks (voices,) start afresh first.
        Only the voices `rows` marks (voices,) need their audio (None: all): with a model that can
        decode some rows alone, at most half of them are decoded alone and the others play silence.

        A block with NaN/Inf (or a decode that raises) becomes silence, is counted, and the
        model's state is reset so that one bad block does not poison the ones after it.
        """
        voices = z.shape[0]
        expected = z.shape[2] * model.hop
        # a voice left out resumes its paused stream: only with a model that restarts a new note's voice
        alone = rows is not None and model.decodes_rows and model.restartable
        picked = np.flatnonzero(rows) if alone else None
        if picked is not None and picked.size > voices * ROWS_ALONE:
            picked = None  # past this share, gathering the rows' streams costs more than it saves
        batch = voices if picked is None else picked.size
        began = time.monotonic()
        try:
            if fresh is not None:
                model.restart(fresh)
            if picked is None:
                with torch.inference_mode():
                    y = model.module.decode(torch.from_numpy(z))
            else:
                y = model.decode_rows(z, picked)
                self.skipped_rows += voices - batch
            self.model_s += time.monotonic() - began
            ok = tuple(y.shape) == (batch, model.channels, expected)
            if ok and bool(torch.isfinite(y).all()):
                if picked is None:
                    return y.reshape(batch * model.channels, expected).numpy().T.astype(np.float32, copy=True)
                out = np.zeros((expected, voices, model.channels), dtype=np.float32)
                out[:, picked, :] = y.numpy().transpose(2, 0, 1)
                return out.reshape(expected, voices * model.channels)
            if ok:
                self.nan_blocks += 1
            else:
                self.decode_errors += 1
        except Exception as exc:  # a decode that fails mid-performance must not stop the music
            self.decode_errors += 1
            if self.decode_errors <= 3:
                log.error("decode failed (%s); the block plays as silence", exc)
        self._recover(model)
        return np.zeros((expected, voices * model.channels), dtype=np.float32)

    def _recover(self, model: Model) -> None:
        """Clear a bad block out of the model's streaming state, on the render thread: the file's
        `reset()`, or, without one, RECOVERY_FRAMES frames decoded at the defaults and dropped
        (reloading the file would stall the render thread for a load's time)."""
        try:
            if model.resettable:
                model.module.reset()
            else:
                _decode_defaults(model, RECOVERY_FRAMES, self.voices)
        except Exception:
            pass

    def _warm_up(self, model: Model) -> None:
        frames = max(1, math.ceil(self.block_frames * model.sample_rate / self.sample_rate / model.hop))
        for _ in range(WARMUP_CALLS):
            _decode_defaults(model, frames, self.voices)
            if model.decodes_rows and self.voices > 1:  # every row count the engine may ask for
                z = np.tile(np.asarray(model.defaults(), dtype=np.float32)[None, :, None], (self.voices, 1, frames))
                for n in range(1, int(self.voices * ROWS_ALONE) + 1):
                    model.decode_rows(z, np.arange(n))
            if self.input_settings is not None:
                with torch.inference_mode():
                    model.module.encode(torch.zeros(1, model.encode_channels, frames * model.hop))
        # a file without reset() keeps the state of these calls, which is that of a stream at the
        # defaults: reloading it would throw away what the warm-up calls optimised
        if model.resettable:
            model.reset()

    # ---------------------------------------------------------------- statistics

    def stats(self) -> dict[str, Any]:
        """Counters and render figures; merged with the live output's when one is attached.

        render_load_* are render time over the audio time rendered (1.0 = just real time);
        render_ms_p99 covers the last few thousand render calls, the rest the whole run.
        """
        stats: dict[str, Any] = {
            "model": self._model.name,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "block_frames": self.block_frames,
            "clock": self.clock,
            "nan_blocks": self.nan_blocks,
            "decode_errors": self.decode_errors,
            **self.timer.figures(),
            "gain_db": self._gain_db,
            "gate": self._gate_on,
            "voices": self.voices,
            "voices_sounding": self.sounding(),
            "skipped_calls": self.skipped_calls,
            "skipped_rows": self.skipped_rows,
            "models_sounding": len(self._instances),
            "underruns": 0,
            "latency_ms": 1000.0 * self._model.latency_samples / self._model.sample_rate,
        }
        if self.input_settings is not None:
            paths = [i.input for i in self._instances if i.input is not None]
            stats.update({"input_level_db": round(self.input_level_db, 1),
                          "input_encode_errors": sum(p.encode_errors for p in paths),
                          "input_lag_ms": 1000.0 * (self._model.encode_lag_samples or 0) / self._model.sample_rate})
        if self.output_stats is not None:
            out = self.output_stats()
            stats["latency_ms"] += out.get("latency_ms", 0.0)
            stats.update({k: v for k, v in out.items() if k != "latency_ms"})
        return stats


def _decode_defaults(model: Model, frames: int, batch: int = 1) -> None:
    """Decode `frames` latent frames at the model's defaults, `batch` voices at once, and drop the
    audio (warm-up at the batch the engine plays, and clearing the state of a file without
    `reset()`)."""
    z = torch.tensor(model.defaults(), dtype=torch.float32).view(1, -1, 1).expand(batch, -1, frames).contiguous()
    with torch.inference_mode():
        model.module.decode(z)
