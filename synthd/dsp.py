"""Small block-based signal processors for the output stage; each keeps its state between blocks.

All take and return float arrays shaped `(frames, channels)` (or `(frames,)` for control
curves), so that calling them block by block equals calling them once on the whole signal.
"""

from __future__ import annotations

import math

import numpy as np


class Ramp:
    """A value that moves linearly to its target over a set time, sample by sample."""

    def __init__(self, value: float = 0.0):
        self.value = float(value)
        self.target = float(value)
        self._step = 0.0

    def set(self, target: float, samples: int) -> None:
        """Head for `target`, arriving after `samples` samples (at once when 0)."""
        self.target = float(target)
        if samples <= 0:
            self.value = self.target
            self._step = 0.0
        else:
            self._step = (self.target - self.value) / samples

    @property
    def moving(self) -> bool:
        return self.value != self.target

    def process(self, frames: int) -> np.ndarray:
        """The next `frames` values, shape (frames,), float64; the last one is the new value."""
        if not self.moving:
            return np.full(frames, self.value)
        out = self.value + self._step * np.arange(1, frames + 1)
        if self._step > 0:
            np.minimum(out, self.target, out=out)
        else:
            np.maximum(out, self.target, out=out)
        self.value = float(out[-1])
        if self.value == self.target:
            self._step = 0.0
        return out


class DCBlocker:
    """First-order high-pass, y[n] = x[n] - x[n-1] + r * y[n-1], about 5 Hz at the given rate."""

    # chunks keep r**-k small, so the closed form stays exact in float64
    _CHUNK = 1024

    def __init__(self, channels: int, sample_rate: int, cutoff_hz: float = 5.0):
        self.r = math.exp(-2.0 * math.pi * cutoff_hz / sample_rate)
        self._x1 = np.zeros(channels)
        self._y1 = np.zeros(channels)
        k = np.arange(self._CHUNK)
        self._pow = self.r ** k  # r**k
        self._inv = self.r ** -k  # r**-k

    def process(self, x: np.ndarray) -> np.ndarray:
        """Filter `x` (frames, channels); returns a new float64 array of the same shape."""
        out = np.empty(x.shape, dtype=np.float64)
        for start in range(0, x.shape[0], self._CHUNK):
            chunk = x[start:start + self._CHUNK].astype(np.float64)
            n = chunk.shape[0]
            d = np.diff(chunk, axis=0, prepend=self._x1[None, :])
            # y[k] = r**k * (r*y[-1] + sum_{j<=k} r**-j d[j]), the recursion in closed form
            acc = np.cumsum(d * self._inv[:n, None], axis=0) + self.r * self._y1
            y = acc * self._pow[:n, None]
            out[start:start + n] = y
            self._x1 = chunk[-1].copy()
            self._y1 = y[-1].copy()
        return out

    def reset(self) -> None:
        self._x1[:] = 0.0
        self._y1[:] = 0.0


def soft_limit(x: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    """Memoryless soft limiter: linear below `threshold`, tanh knee above, never past ±1.

    Continuous in value and slope at the threshold, so a peak bends instead of clipping.
    """
    knee = 1.0 - threshold
    mag = np.abs(x)
    over = mag > threshold
    if not over.any():
        return x
    y = x.copy()
    y[over] = np.sign(x[over]) * (threshold + knee * np.tanh((mag[over] - threshold) / knee))
    return y


def equal_power(fade: np.ndarray) -> np.ndarray:
    """Crossfade gain for a linear fade position 0..1: sin(fade * pi / 2).

    A voice fading in at f and one fading out at 1 - f keep their summed power constant,
    which suits uncorrelated signals (two models) better than a linear fade's 3 dB dip.
    """
    return np.sin(np.clip(fade, 0.0, 1.0) * (math.pi / 2.0))


def db_to_amplitude(db: float, floor_db: float = -120.0) -> float:
    """Amplitude for `db`; at or below `floor_db` the result is exactly 0."""
    return 0.0 if db <= floor_db else 10.0 ** (db / 20.0)


class Envelope:
    """One voice's level: attack, decay, sustain, release, each a linear segment, sample by sample.

    `start(peak)` runs attack (to `peak`) then decay (to `peak * sustain`) from wherever the level
    is, so a retriggered voice never jumps; `release()` and `fade(samples)` go to 0 (release over
    the set time, fade over `samples`, for a stolen voice) and then stay idle. Times are in samples.
    """

    def __init__(self, attack: int, decay: int, sustain: float, release: int):
        self.configure(attack, decay, sustain, release)
        self._ramp = Ramp(0.0)
        self._left = 0  # samples left in the timed segment under way (0: holding)
        self._stage = "idle"
        self._peak = 0.0

    def configure(self, attack: int, decay: int, sustain: float, release: int) -> None:
        """New segment times and sustain level; a segment under way finishes as it started."""
        self.attack, self.decay, self.release_samples = max(0, attack), max(0, decay), max(0, release)
        self.sustain = min(1.0, max(0.0, sustain))

    @property
    def sounding(self) -> bool:
        """False once the level is 0 and nothing moves it: the voice may be skipped."""
        return self._stage != "idle"

    @property
    def level(self) -> float:
        return self._ramp.value

    def start(self, peak: float) -> None:
        self._peak = peak
        self._segment("attack", peak, self.attack)

    def release(self) -> None:
        if self._stage != "idle":
            self._segment("release", 0.0, self.release_samples)

    def fade(self, samples: int) -> None:
        if self._stage != "idle":
            self._segment("release", 0.0, samples)

    def _segment(self, stage: str, target: float, samples: int) -> None:
        self._stage = stage
        self._ramp.set(target, samples)
        self._left = samples
        if samples <= 0:
            self._next()

    def _next(self) -> None:
        if self._stage == "attack":
            self._segment("decay", self._peak * self.sustain, self.decay)
        elif self._stage == "decay":
            self._stage, self._left = "sustain", 0
        elif self._stage == "release":
            self._stage, self._left = "idle", 0
            self._ramp.set(0.0, 0)

    def process(self, frames: int) -> np.ndarray:
        """The next `frames` levels, shape (frames,), float64."""
        if self._left == 0:
            return np.full(frames, self._ramp.value)
        out = np.empty(frames)
        pos = 0
        while pos < frames:
            if self._left == 0:
                out[pos:] = self._ramp.value
                break
            k = min(self._left, frames - pos)
            out[pos:pos + k] = self._ramp.process(k)
            self._left -= k
            pos += k
            if self._left == 0:
                self._next()
        return out
