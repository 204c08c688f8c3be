"""Reading the notes of a chord from a recording: the spectrum's peak near each expected
fundamental, in cents from it, and its level against the loudest peak."""

from __future__ import annotations

import numpy as np


def note_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69.0) / 12.0)


def peaks_near(x: np.ndarray, rate: int, notes: list[float], *, zoom: int = 8) -> list[tuple[float, float]]:
    """For each MIDI note in `notes`: (cents of the strongest spectral peak within ±60 cents of
    it, that peak's level over the whole spectrum's maximum). `x` is mono, a quarter second or more
    of steady sound; a Hann window, zero padding and a parabola through the peak put it within a cent."""
    n = x.shape[0]
    spec = np.abs(np.fft.rfft(x * np.hanning(n), zoom * n))
    freqs = np.fft.rfftfreq(zoom * n, 1.0 / rate)
    top = float(spec.max()) or 1.0
    out = []
    for note in notes:
        f = note_hz(note)
        band = np.flatnonzero((freqs > f * 2 ** (-0.6 / 12)) & (freqs < f * 2 ** (0.6 / 12)))
        k = band[int(np.argmax(spec[band]))]
        # the parabola through the log magnitudes of the peak bin and its neighbours: a fraction
        # of a bin, so a short window still reads a tenth of a cent
        a, b, c = np.log(spec[k - 1:k + 2] + 1e-30)
        shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c < 0 else 0.0
        hz = freqs[k] + shift * (freqs[1] - freqs[0])
        out.append((1200.0 * np.log2(hz / f), float(spec[k]) / top))
    return out


def median_peaks(x: np.ndarray, rate: int, notes: list[float], window_s: float) -> list[tuple[float, float]]:
    """`peaks_near` over consecutive windows of `window_s`, medians per note: a recording from a
    loaded JACK server may miss a period, whose gap smears the one window it falls in."""
    size = int(window_s * rate)
    rows = [peaks_near(x[i:i + size], rate, notes) for i in range(0, x.shape[0] - size + 1, size)]
    return [(float(np.median([r[k][0] for r in rows])), float(np.median([r[k][1] for r in rows])))
            for k in range(len(notes))]


def assert_plays(x: np.ndarray, rate: int, notes: list[float], *, cents: float = 5.0, level: float = 0.2,
                 window_s: float | None = None) -> None:
    """Every note of `notes` sounds in `x`, within `cents` of its pitch and at least `level` of
    the loudest peak (with `window_s`, the medians over windows that long)."""
    found = peaks_near(x, rate, notes) if window_s is None else median_peaks(x, rate, notes, window_s)
    for note, (off, lvl) in zip(notes, found):
        assert abs(off) < cents and lvl > level, f"note {note}: {off:+.1f} cents, level {lvl:.2f} ({found})"


def assert_silent_at(x: np.ndarray, rate: int, notes: list[float], *, level: float = 0.02,
                     window_s: float | None = None) -> None:
    """None of `notes` sounds in `x` above `level` of the loudest peak (with `window_s`, the
    medians over windows that long). What peaks further than 30 cents from a note is another
    note's skirt, or the smear of a dropped period, not the note."""
    found = peaks_near(x, rate, notes) if window_s is None else median_peaks(x, rate, notes, window_s)
    for note, (off, lvl) in zip(notes, found):
        assert abs(off) > 30.0 or lvl < level, f"note {note} still sounds: level {lvl:.3f} ({off:+.1f} cents)"
