"""Reading the notes of a chord from a recording: the spectrum's peak near each expected
fundamental, in cents from it, and its level against the loudest peak."""

from __future__ import annotations

import numpy as np


def note_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69.0) / 12.0)


def peaks_near(x: np.ndarray, rate: int, notes: list[float], *, zoom: int = 8) -> list[tuple[float, float]]:
    """For each MIDI note in `notes`: (cents of the strongest spectral peak within ±60 cents of
    it, that peak's level over the whole spectrum's maximum). `x` is mono, a second or so of
    steady sound; a Hann window and zero padding put each peak within a cent."""
    n = x.shape[0]
    spec = np.abs(np.fft.rfft(x * np.hanning(n), zoom * n))
    freqs = np.fft.rfftfreq(zoom * n, 1.0 / rate)
    top = float(spec.max()) or 1.0
    out = []
    for note in notes:
        f = note_hz(note)
        band = np.flatnonzero((freqs > f * 2 ** (-0.6 / 12)) & (freqs < f * 2 ** (0.6 / 12)))
        k = band[int(np.argmax(spec[band]))]
        out.append((1200.0 * np.log2(freqs[k] / f), float(spec[k]) / top))
    return out


def assert_plays(x: np.ndarray, rate: int, notes: list[float], *, cents: float = 5.0, level: float = 0.2) -> None:
    """Every note of `notes` sounds in `x`, within `cents` of its pitch and at least `level` of
    the loudest peak."""
    found = peaks_near(x, rate, notes)
    for note, (off, lvl) in zip(notes, found):
        assert abs(off) < cents and lvl > level, f"note {note}: {off:+.1f} cents, level {lvl:.2f} ({found})"


def assert_silent_at(x: np.ndarray, rate: int, notes: list[float], *, level: float = 0.02) -> None:
    """None of `notes` sounds in `x` above `level` of the loudest peak."""
    for note, (off, lvl) in zip(notes, peaks_near(x, rate, notes)):
        assert lvl < level, f"note {note} still sounds: level {lvl:.3f} ({off:+.1f} cents)"
