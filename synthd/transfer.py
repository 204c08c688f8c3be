"""Audio input into a model's controls (timbre transfer): one model instance's input path.

The engine hands each block of input (mono, at the engine's rate, gain applied) to the
`InputPath` of every model instance playing. The path resamples it to the model's rate when
they differ, keeps it until a decode call needs it, and then, per call:

- `encode`s the call's samples with the model's own streaming `encode` (one call of
  `frames_per_call` frames; the file keeps its encoder state between calls);
- combines each encoded control with its knob (the instance's ramped latent values) by the
  patch's mode: follow, offset, knob or scale (see `synthd.patch`); a pitch input in MIDI
  units gets the patch's `transpose`, and a held note takes over the pitch when
  `pitch_source = "notes"`;
- computes an input gate per latent frame from the input's level over the frames from the one
  those controls describe (the encoder lags its input by `lag` frames) to the newest, so that
  no input means silence, not whatever the model makes of the controls of silence.

Everything here runs on the render thread.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import soxr
import torch

from synthd import dsp
from synthd.model import Model
from synthd.patch import InputSettings

MODES = {"follow": 0, "offset": 1, "knob": 2, "scale": 3}
GATE_OPEN_S = 0.003  # the input gate opens this fast: an attack is never blunted
GATE_CLOSE_S = 0.06  # ... and closes over this long, under the model's own decay
GATE_HYSTERESIS_DB = 6.0  # closes this far below `gate_db`: a level near it never chatters
SILENT_DB = -200.0


def frame_levels_db(x: np.ndarray, hop: int) -> np.ndarray:
    """RMS level in dBFS of each whole frame of `x` `(frames * hop,)`: `(frames,)`."""
    frames = x[: len(x) // hop * hop].reshape(-1, hop).astype(np.float64)
    return 10.0 * np.log10(np.square(frames).mean(axis=1) + 1e-20)


class InputPath:
    """Input for one model instance: buffered at the model's rate, encoded per decode call.

    `lag` is the frames by which the model's `encode` lags its input (0 when the file does not
    say); `prefill` samples of silence lead the buffer so that each decode call finds its
    samples even when a call is longer than a block.
    """

    def __init__(self, model: Model, settings: InputSettings, *, engine_rate: int, block_frames: int,
                 frames_per_call: int):
        self.model = model
        self.hop = model.hop
        self.need = frames_per_call * model.hop
        self.lag = (model.encode_lag_samples or 0) // model.hop
        block = block_frames * model.sample_rate / engine_rate
        if model.sample_rate == engine_rate:
            prefill = self.need - math.gcd(self.need, block_frames)
            self._resampler = None
        else:  # the resampler hands out irregular chunks: one hop more of slack
            prefill = self.need + int(math.ceil(block))
            self._resampler = soxr.ResampleStream(engine_rate, model.sample_rate, 1, dtype="float32", quality="HQ")
        self._buffer = np.zeros(prefill, dtype=np.float32)
        # samples (model rate) from an input sample to the output sample that stands for it
        self.delay = self.lag * model.hop + prefill
        self._levels: deque[float] = deque([SILENT_DB] * self.lag, maxlen=self.lag + 1)
        self._gate = dsp.Ramp(0.0)
        self._open = False
        self._channels = max(1, model.encode_channels)
        self.encode_errors = 0
        self.short = 0  # decode calls that found too little input (filled with silence)
        self.configure(settings)

    def configure(self, settings: InputSettings) -> None:
        """Take the patch's `[input]` settings (resolved against this model's controls)."""
        controls = self.model.controls
        self.modes = np.array([MODES[settings.mode_of(c.label, c.unit)] for c in controls])
        self.default = np.array([c.default for c in controls])
        # scale mode: the knob's way from its default down to its minimum, or up to its maximum
        self._below = np.maximum(self.default - np.array([c.minimum for c in controls]), 1e-9)
        self._above = np.maximum(np.array([c.maximum for c in controls]) - self.default, 1e-9)
        pitched = [c.index for c in controls if c.unit == "midi"]
        self.pitch = pitched[0] if pitched else -1
        self.transpose = float(settings.transpose)
        self.notes_override = settings.pitch_source == "notes"
        self.gate_db = float(settings.gate_db)

    def push(self, x: np.ndarray) -> None:
        """Append input `(n,)` float32 at the engine's rate."""
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x)
        self._buffer = np.concatenate([self._buffer, x.astype(np.float32, copy=False)])

    def encode(self) -> tuple[np.ndarray | None, np.ndarray]:
        """Take one decode call's samples and encode them: (controls `(latent, frames_per_call)` or
        None when `encode` failed, gate `(frames_per_call * hop,)` for the call's decoded audio)."""
        if len(self._buffer) < self.need:
            self.short += 1
            self._buffer = np.concatenate([self._buffer, np.zeros(self.need - len(self._buffer), np.float32)])
        x, self._buffer = self._buffer[:self.need], self._buffer[self.need:]
        gate = self._gate_for(x)
        audio = torch.from_numpy(np.ascontiguousarray(x)).view(1, 1, -1)
        if self._channels > 1:
            audio = audio.expand(1, self._channels, -1).contiguous()
        try:
            with torch.inference_mode():
                u = self.model.module.encode(audio)
            frames = self.need // self.hop
            if tuple(u.shape) == (1, self.model.latent_size, frames) and bool(torch.isfinite(u).all()):
                return u[0].numpy().astype(np.float64), gate
        except Exception:  # a failing encode plays the knobs alone; it never stops the music
            pass
        self.encode_errors += 1
        return None, gate

    def combine(self, encoded: np.ndarray | None, knob: np.ndarray, note_held: bool) -> np.ndarray:
        """One frame's decoder input `(latent,)` from its encoded controls and the knobs' values."""
        if encoded is None:
            return knob
        out = np.where(self.modes == MODES["knob"], knob, encoded)
        offset = self.modes == MODES["offset"]
        out[offset] += knob[offset] - self.default[offset]
        scale = self.modes == MODES["scale"]
        if scale.any():
            d = knob - self.default
            factor = np.where(d <= 0, 1.0 + d / self._below, 1.0 + d / self._above)
            out[scale] = (self.default + (encoded - self.default) * factor)[scale]
        if self.pitch >= 0:
            if self.notes_override and note_held:
                out[self.pitch] = knob[self.pitch]
            elif self.modes[self.pitch] != MODES["knob"]:
                out[self.pitch] = min(127.0, max(0.0, out[self.pitch] + self.transpose))
        return out

    def _gate_for(self, x: np.ndarray) -> np.ndarray:
        """The gate over this call's output: per frame, open while any input frame from the one its
        controls describe (`lag` frames earlier) to the newest is above `gate_db`, closed when all
        are below it less the hysteresis."""
        rate = self.model.sample_rate
        out = np.empty(len(x))
        for j, level in enumerate(frame_levels_db(x, self.hop)):
            self._levels.append(float(level))
            # open as soon as sound arrives (the encoder's look-ahead already hears it), closed
            # once the frame the controls describe is quiet too, so no tail is cut
            loudest = max(self._levels)
            if loudest > self.gate_db:
                self._open = True
            elif loudest < self.gate_db - GATE_HYSTERESIS_DB:
                self._open = False
            target = 1.0 if self._open else 0.0
            if self._gate.target != target:
                self._gate.set(target, int((GATE_OPEN_S if self._open else GATE_CLOSE_S) * rate))
            out[j * self.hop:(j + 1) * self.hop] = self._gate.process(self.hop)
        return out
