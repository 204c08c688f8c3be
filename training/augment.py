"""Data augmentation of training crops.

Each augmentation has its own switch, probability and range in `AugmentConfig`. Pitch shift
and time stretch change the length of what they are given, so the sampler cuts a longer
source (`source_length`) and `Augmenter.__call__` returns exactly the crop length asked for.
`mix` (a second crop added) needs other files, so the sampler (training.data) applies it, before
the rest. All randomness comes from the generator passed in, so a step's batch is a function of the
seed and the step alone.
"""

from __future__ import annotations

import math

import numpy as np
import soxr

from training.config import AugmentConfig

_STRETCH_FFT = 1024
_STRETCH_HOP = 256


def _pitch_shift(x: np.ndarray, semitones: float, sample_rate: int) -> np.ndarray:
    """Varispeed: resampled so that pitch rises by `semitones` (and the sound gets shorter)."""
    ratio = 2.0 ** (semitones / 12.0)
    return soxr.resample(x, sample_rate * ratio, sample_rate, quality="HQ").astype(np.float32)


def _time_stretch(x: np.ndarray, rate: float) -> np.ndarray:
    """Phase-vocoder stretch: `rate` > 1 plays faster (output ~len/rate samples), same pitch."""
    window = np.hanning(_STRETCH_FFT).astype(np.float32)
    pad = np.pad(x, (_STRETCH_FFT // 2, _STRETCH_FFT // 2))
    n_frames = 1 + (len(pad) - _STRETCH_FFT) // _STRETCH_HOP
    if n_frames < 3:
        return x
    idx = np.arange(_STRETCH_FFT)[None] + _STRETCH_HOP * np.arange(n_frames)[:, None]
    spec = np.fft.rfft(pad[idx] * window, axis=1)  # (frames, bins)
    steps = np.arange(0, n_frames - 1, rate)
    bins = np.arange(spec.shape[1])
    expected = 2 * np.pi * _STRETCH_HOP * bins / _STRETCH_FFT
    phase = np.angle(spec[0])
    out = np.zeros((len(steps), spec.shape[1]), dtype=np.complex64)
    for k, t in enumerate(steps):
        i = int(t)
        frac = t - i
        mag = (1 - frac) * np.abs(spec[i]) + frac * np.abs(spec[i + 1])
        out[k] = mag * np.exp(1j * phase)
        delta = np.angle(spec[i + 1]) - np.angle(spec[i]) - expected
        delta -= 2 * np.pi * np.round(delta / (2 * np.pi))
        phase = phase + expected + delta
    frames = np.fft.irfft(out, n=_STRETCH_FFT, axis=1) * window
    length = _STRETCH_FFT + _STRETCH_HOP * (len(steps) - 1)
    y = np.zeros(length, dtype=np.float64)
    norm = np.zeros(length, dtype=np.float64)
    for k in range(len(steps)):
        y[k * _STRETCH_HOP:k * _STRETCH_HOP + _STRETCH_FFT] += frames[k]
        norm[k * _STRETCH_HOP:k * _STRETCH_HOP + _STRETCH_FFT] += window ** 2
    y = y / np.maximum(norm, 1e-3)
    return y[_STRETCH_FFT // 2:].astype(np.float32)


def _eq_tilt(x: np.ndarray, db_per_octave: float, sample_rate: int) -> np.ndarray:
    """Spectral tilt pivoting at 1 kHz (flat below 20 Hz, where octaves stop meaning much)."""
    spec = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    octaves = np.log2(np.maximum(freqs, 20.0) / 1000.0)
    return np.fft.irfft(spec * 10 ** (db_per_octave * octaves / 20.0), n=len(x)).astype(np.float32)


class Augmenter:
    """Applies the enabled augmentations of `cfg` to one crop at a time."""

    def __init__(self, cfg: AugmentConfig, sample_rate: int) -> None:
        self.cfg = cfg
        self.sample_rate = sample_rate

    @property
    def active(self) -> bool:
        """Whether any augmentation of one crop can happen (`mix`, which needs a second crop, is
        the sampler's)."""
        return any(a.enabled and a.probability > 0 for name, a in vars(self.cfg).items() if name != "mix")

    def source_length(self, length: int) -> int:
        """Samples to cut from a file so that the augmented crop has at least `length`."""
        factor = 1.0
        if self.cfg.pitch.enabled:
            factor *= 2.0 ** (abs(self.cfg.pitch.max_semitones) / 12.0)
        if self.cfg.stretch.enabled:
            factor *= self.cfg.stretch.max_rate
        return length if factor == 1.0 else int(math.ceil(length * factor)) + _STRETCH_FFT

    def __call__(self, source: np.ndarray, length: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(target, encoder input), each `(length,)` float32, from `(source_length(length),)`.

        The two differ only by the added noise: the model learns to give back the clean sound.
        """
        c = self.cfg
        x = source
        if c.pitch.enabled and rng.random() < c.pitch.probability:
            x = _pitch_shift(x, rng.uniform(-c.pitch.max_semitones, c.pitch.max_semitones), self.sample_rate)
        if c.stretch.enabled and rng.random() < c.stretch.probability:
            x = _time_stretch(x, rng.uniform(c.stretch.min_rate, c.stretch.max_rate))
        x = x[:length]
        if len(x) < length:
            x = np.pad(x, (0, length - len(x)))
        if c.eq_tilt.enabled and rng.random() < c.eq_tilt.probability:
            x = _eq_tilt(x, rng.uniform(-c.eq_tilt.max_db_per_octave, c.eq_tilt.max_db_per_octave),
                         self.sample_rate)
        if c.gain.enabled and rng.random() < c.gain.probability:
            x = x * np.float32(10 ** (rng.uniform(c.gain.min_db, c.gain.max_db) / 20))
        if c.polarity.enabled and rng.random() < c.polarity.probability:
            x = -x
        x = np.ascontiguousarray(x, dtype=np.float32)
        noisy = x
        if c.noise.enabled and rng.random() < c.noise.probability:
            rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
            level = rms * 10 ** (-rng.uniform(c.noise.min_snr_db, c.noise.max_snr_db) / 20)
            noisy = (x + level * rng.standard_normal(length)).astype(np.float32)
        return x, noisy
