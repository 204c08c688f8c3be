"""Measures of folded (aliased) energy, for any model file's output.

Signs of aliasing, each compared with the signal the model was given:
- energy above the model's band edge (20 kHz unless its metadata names another, see
  `band_edge`), as a fraction of the total (dB): a decoder that upsamples through a
  nonlinearity folds energy up there; a band-limited iSTFT head puts (almost) none;
- partials the source lacks: spectral peaks that stand well above their neighbourhood, persist
  over several analysis frames, and sit where the source (in the same frame) has no energy;
- folded partials, for a source that is one moving partial (a sweep): output peaks where the
  harmonics of the source's frequency that lie above the Nyquist frequency reflect to. They move
  against the sweep, which is what tells them from a trained model's own tones and from the
  harmonics it adds below Nyquist: those are new partials, but nothing folded them.

`sine_sweep` is the standard probe; `aliasing_report(source, output)` measures both. The functions
take numpy arrays and know nothing about the model, so they run unchanged on a trained file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy.ndimage import maximum_filter, median_filter
from scipy.signal import stft, welch


def sine_sweep(seconds: float = 3.0, sample_rate: int = 48000, f0: float = 20.0, f1: float = 20000.0,
               amplitude: float = 0.5) -> np.ndarray:
    """Exponential sine sweep f0 -> f1, `(samples,)` float32, with 10 ms raised-cosine fades."""
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    rate = np.log(f1 / f0) / seconds
    x = amplitude * np.sin(2 * np.pi * f0 * (np.exp(rate * t) - 1) / rate)
    fade = int(0.01 * sample_rate)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    x[:fade] *= ramp
    x[-fade:] *= ramp[::-1]
    return x.astype(np.float32)


# The band edge of a file that does not name its own (a RAVE export, an older synthd file)
BAND_EDGE_HZ = 20000.0


def band_edge(metadata: dict[str, Any]) -> float:
    """The highest frequency (Hz) a model file's decoder makes by design: the higher of its iSTFT
    and harmonic band edges as its metadata names them, else `BAND_EDGE_HZ`. Energy above it is
    what folding leaves; below it, a trained model's own sound."""
    model = (metadata.get("run") or {}).get("model") or {}
    edges = [float(model[k]) for k in ("max_frequency", "harmonic_max_frequency") if model.get(k)]
    return max(edges, default=BAND_EDGE_HZ)


def energy_above_db(x: np.ndarray, sample_rate: int = 48000, cutoff: float = BAND_EDGE_HZ) -> float:
    """Energy above `cutoff` relative to the total, in dB (Welch, 8192 points, Kaiser window with
    beta 20: side lobes near -150 dB, so the measure's own leakage does not mask the signal's)."""
    freqs, psd = welch(np.asarray(x, dtype=np.float64), fs=sample_rate, window=("kaiser", 20.0),
                       nperseg=8192, noverlap=6144)
    total = psd.sum()
    if total <= 0:
        return float("-inf")
    return float(10 * np.log10(max(psd[freqs > cutoff].sum(), 1e-30) / total))


# The level under which energy above the band edge counts as none: 100 dB below the signal, beyond the
# range of 16-bit audio. A sweep that ends at 20 kHz measures about -160 dB, which no float32 model
# can match: rounding noise alone is near -145 dB, and the band-limited synthesis leaks -145 dB
# (untrained) to about -112 dB (a model trained on bright sounds) over the band edge. Folding
# puts -60 to -20 dB there.
FLOOR_DB = -100.0


@dataclass
class Partial:
    time_s: float
    frequency_hz: float
    level_db: float  # relative to the output's loudest bin


@dataclass
class AliasReport:
    source_above_db: float
    output_above_db: float
    new_partials: list[Partial] = field(default_factory=list)
    folded_partials: list[Partial] = field(default_factory=list)
    cutoff_hz: float = BAND_EDGE_HZ  # where "above" starts

    def passes(self, margin_db: float = 1.0, floor_db: float = FLOOR_DB, any_new_partial: bool = True) -> bool:
        """No more energy above the cutoff than the source (or the floor, when the source has less)
        plus `margin_db`, no folded partial, and (with `any_new_partial`) no new partial at all."""
        return (self.output_above_db <= max(self.source_above_db, floor_db) + margin_db
                and not self.folded_partials and not (any_new_partial and self.new_partials))

    def describe(self) -> str:
        def listing(partials: list[Partial]) -> str:
            return ", ".join(f"{p.frequency_hz:.0f} Hz at {p.time_s:.2f} s ({p.level_db:.0f} dB)" for p in partials[:8])

        return (f"energy above {self.cutoff_hz / 1000:g} kHz: output {self.output_above_db:.1f} dB, source {self.source_above_db:.1f} dB; "
                f"{len(self.folded_partials)} folded partial(s) {listing(self.folded_partials)}; "
                f"{len(self.new_partials)} new partial(s) {listing(self.new_partials)}")


def _db_spectrogram(x: np.ndarray, sample_rate: int, n_fft: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    freqs, times, spec = stft(np.asarray(x, dtype=np.float64), fs=sample_rate, window="hann",
                              nperseg=n_fft, noverlap=3 * n_fft // 4, boundary=None, padded=False)
    return freqs, times, 10 * np.log10(np.abs(spec) ** 2 + 1e-20)


def _spectra(source: np.ndarray, output: np.ndarray, sample_rate: int, n_fft: int):
    """Both signals' dB spectrograms over their common length, and what every partial measure
    compares against: (freqs, times, output dB, source dB, the output's prominence over the median
    of its ±32-bin neighbourhood, the output's loudest bin in dB)."""
    n = min(len(source), len(output))
    freqs, times, out_db = _db_spectrogram(output[:n], sample_rate, n_fft)
    _, _, src_db = _db_spectrogram(source[:n], sample_rate, n_fft)
    prominence = out_db - median_filter(out_db, size=(65, 1), mode="reflect")
    return freqs, times, out_db, src_db, prominence, out_db.max()


def new_partials(source: np.ndarray, output: np.ndarray, sample_rate: int = 48000, n_fft: int = 4096,
                 prominence_db: float = 15.0, range_db: float = 50.0, absent_db: float = 40.0,
                 tolerance_bins: int = 3, persist_frames: int = 3) -> list[Partial]:
    """Partials of `output` that `source` lacks.

    A partial is a local spectral maximum (STFT of `n_fft` points, hop n_fft/4) at least
    `prominence_db` above the median of its ±32-bin neighbourhood and within `range_db` of the
    output's loudest bin. It is new when, in the same frame, the source within ±`tolerance_bins`
    is more than `absent_db` below the source frame's own maximum, and it persists (within ±2 bins)
    for `persist_frames` consecutive frames: a lone noise peak is not a partial.
    """
    freqs, times, out_db, src_db, prominence, top = _spectra(source, output, sample_rate, n_fft)
    local_max = np.zeros_like(out_db, dtype=bool)
    local_max[1:-1] = (out_db[1:-1] > out_db[:-2]) & (out_db[1:-1] >= out_db[2:])
    candidate = local_max & (prominence >= prominence_db) & (out_db >= top - range_db)
    src_near = maximum_filter(src_db, size=(2 * tolerance_bins + 1, 1), mode="nearest")
    absent = src_near < src_db.max(axis=0, keepdims=True) - absent_db
    new = candidate & absent
    # persistence: the same partial (±2 bins) in `persist_frames` consecutive frames
    spread = maximum_filter(new.astype(np.uint8), size=(5, 1), mode="constant").astype(bool)
    run = np.zeros_like(new, dtype=int)
    for j in range(new.shape[1]):
        run[:, j] = np.where(spread[:, j], (run[:, j - 1] if j else 0) + 1, 0)
    persistent = new & (run >= persist_frames)
    found = []
    for b, j in zip(*np.nonzero(persistent)):
        found.append(Partial(float(times[j]), float(freqs[b]), float(out_db[b, j] - top)))
    return found


def folded_partials(source: np.ndarray, output: np.ndarray, sample_rate: int = 48000, n_fft: int = 1024,
                    harmonics: int = 9, prominence_db: float = 15.0, range_db: float = 60.0,
                    excess_db: float = 20.0, tolerance_bins: int = 2, persist_frames: int = 3,
                    own_partials: Callable[[float], np.ndarray] | None = None) -> list[Partial]:
    """Partials of `output` where folding would put the harmonics of a one-partial `source`.

    Per STFT frame (`n_fft` points, short: a fast sweep must not smear its images flat) the
    source's frequency f is its loudest bin. Each harmonic m*f (m <= `harmonics`) above the
    Nyquist frequency reflects to |m*f - k*sample_rate|, in 0..Nyquist. An output peak within
    ±`tolerance_bins` of that image, `prominence_db` above the median of its ±32-bin
    neighbourhood, within `range_db` of the output's loudest bin and `excess_db` above the source
    in the same bin, marks the image. A folded partial is an image of one harmonic marked in
    `persist_frames` consecutive frames, the image and the marked peak each moving by more than
    2 * `tolerance_bins` from frame to frame: an output peak that keeps pace with a moving image
    is folded energy, while a steady tone of the model's own that an image passes (or crosses
    slowly, where the image turns at 0 Hz or at Nyquist) is not. Images that land on the source's
    own main lobe cannot be told from it and are skipped, as are frames where the source is
    silent (40 dB below its loudest). `own_partials(t)` gives the frequencies (Hz) the model
    itself made at time t (a harmonic head's partials, known from its pitch input): a peak on one
    of them is the model's own tone, whatever image passes it.
    """
    freqs, times, out_db, src_db, prominence, top = _spectra(source, output, sample_rate, n_fft)
    nyquist, bin_hz = sample_rate / 2, freqs[1]
    src_level = src_db.max(axis=0)
    # harmonic -> frame -> (image bin, marked peak bin)
    marks: dict[int, dict[int, tuple[int, int]]] = {m: {} for m in range(2, harmonics + 1)}
    for j in np.flatnonzero(src_level >= src_db.max() - 40.0):
        peak = int(src_db[:, j].argmax())
        f = freqs[peak]
        for m in range(2, harmonics + 1):
            if m * f <= nyquist:
                continue
            image = (m * f) % sample_rate
            image = sample_rate - image if image > nyquist else image
            b = int(round(image / bin_hz))
            if abs(b - peak) <= tolerance_bins + 4:
                continue
            lo, hi = max(0, b - tolerance_bins), min(len(freqs) - 1, b + tolerance_bins)
            k = lo + int(out_db[lo:hi + 1, j].argmax())
            if own_partials is not None and np.any(
                    np.abs(own_partials(float(times[j])) - freqs[k]) <= (tolerance_bins + 1) * bin_hz):
                continue
            if (prominence[k, j] >= prominence_db and out_db[k, j] >= top - range_db
                    and out_db[k, j] - src_db[k, j] >= excess_db):
                marks[m][int(j)] = (b, k)
    found = []
    for frames in marks.values():
        for j, (_, k) in frames.items():
            run = [frames.get(j + i) for i in range(persist_frames)]
            if any(r is None for r in run):
                continue
            steps = [(abs(b1 - b0), abs(k1 - k0)) for (b0, k0), (b1, k1) in zip(run, run[1:])]
            if all(db > 2 * tolerance_bins and dk > 2 * tolerance_bins for db, dk in steps):
                found.append(Partial(float(times[j]), float(freqs[k]), float(out_db[k, j] - top)))
    return sorted(found, key=lambda p: p.time_s)


def steady_partials(source: np.ndarray, output: np.ndarray, sample_rate: int = 48000, low: float = 18000.0,
                    high: float = 20000.0, n_fft: int = 4096, prominence_db: float = 10.0,
                    excess_db: float = 10.0) -> list[Partial]:
    """Steady lines of `output` between `low` and `high` Hz that `source` lacks: a whistle at the
    band edge, a partial that sounds whatever the input, which no transient or noise makes.

    Each bin's level is its mean power over the frames where the source sounds (within 60 dB of
    its loudest), so that noise averages out. A line is a bin `prominence_db` above the median of
    its ±32-bin neighbourhood and `excess_db` above the source's level around it (the same
    neighbourhood's median: a dip of the source's own noise at one bin is no reason)."""
    n = min(len(source), len(output))
    freqs, _, out_spec = stft(np.asarray(output[:n], dtype=np.float64), fs=sample_rate, window="hann", nperseg=n_fft,
                              noverlap=3 * n_fft // 4, boundary=None, padded=False)
    _, times, src_spec = stft(np.asarray(source[:n], dtype=np.float64), fs=sample_rate, window="hann",
                              nperseg=n_fft, noverlap=3 * n_fft // 4, boundary=None, padded=False)
    src_power, out_power = np.abs(src_spec) ** 2, np.abs(out_spec) ** 2
    frame_level = src_power.sum(axis=0)
    sounding = frame_level >= frame_level.max() * 1e-6
    if not sounding.any():
        return []
    out_line = 10 * np.log10(out_power[:, sounding].mean(axis=1) + 1e-20)
    src_line = 10 * np.log10(src_power[:, sounding].mean(axis=1) + 1e-20)
    prominence = out_line - median_filter(out_line, size=65, mode="reflect")
    excess = out_line - median_filter(src_line, size=65, mode="reflect")
    band = (freqs >= low) & (freqs <= high)
    found = np.flatnonzero(band & (prominence >= prominence_db) & (excess >= excess_db))
    return [Partial(float(times[0]), float(freqs[b]), float(out_line[b] - out_line.max())) for b in found]


def aliasing_report(source: np.ndarray, output: np.ndarray, sample_rate: int = 48000,
                    own_partials: Callable[[float], np.ndarray] | None = None,
                    cutoff: float = BAND_EDGE_HZ) -> AliasReport:
    """Every measure for `output` (what a model made of `source`), energy counted above `cutoff`
    (the model's `band_edge`); see `folded_partials` for `own_partials`."""
    return AliasReport(energy_above_db(source, sample_rate, cutoff), energy_above_db(output, sample_rate, cutoff),
                       new_partials(source, output, sample_rate),
                       folded_partials(source, output, sample_rate, own_partials=own_partials), cutoff)
