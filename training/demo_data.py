"""`synthd-train demo-data OUT_DIR`: the built-in demo set of synthesised one-shots.

Five kinds of sound, in turn: plucked strings (Karplus-Strong), FM bells, filtered-saw tones
with slow or fast attacks, filtered noise bursts and drum-like hits. Each sound's pitch,
brightness, attack, noisiness and level are drawn so that the set spans each of them evenly
(several octaves, dark to bright, slow to percussive, pure to noisy, quiet to loud): a model
trained on it has those controls to discover. Each file's pitch, brightness, attack, noisiness,
level and duration are written to `OUT_DIR/demo-data.json`, the ground truth against which
discovered controls can be checked.

Deterministic: file i of seed S is the same whatever `--count` is. Files are 24-bit WAV at
48 kHz, 0.2 to 3 s long.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
from scipy import signal

SAMPLE_RATE = 48000
KINDS = ("pluck", "bell", "saw", "noise", "hit")
SIDECAR = "demo-data.json"
_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


@dataclass
class Voice:
    """The drawn parameters of one sound (all also written to the sidecar)."""

    file: str
    kind: str
    midi: float           # pitch as a MIDI note number (fractional); the hit's resting pitch
    pitch_hz: float
    brightness: float     # 0 dark .. 1 bright
    attack_s: float       # time to the envelope's peak
    noisiness: float      # 0 pure tone .. 1 noise
    level_db: float       # peak level in dBFS
    duration_s: float


def midi_to_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


def note_name(midi: float) -> str:
    n = int(round(midi))
    return f"{_NOTE_NAMES[n % 12]}{n // 12 - 1}".replace("#", "s")


# --- the five instruments: each returns `(samples,)` float64 with a peak near 1 ---------------

def _envelope(n: int, attack_s: float, decay_s: float, sr: int) -> np.ndarray:
    """Attack ramp (raised cosine) then exponential decay with time constant `decay_s`
    (`math.inf`: none)."""
    t = np.arange(n) / sr
    a = max(attack_s, 1.0 / sr)
    rise = np.where(t < a, 0.5 - 0.5 * np.cos(np.pi * np.clip(t / a, 0.0, 1.0)), 1.0)
    return rise * np.exp(-np.maximum(t - a, 0.0) / decay_s)


def _pluck(v: Voice, n: int, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Karplus-Strong string: a noise burst circulating in a tuned, damped delay loop.

    Brightness sets the excitation's bandwidth and the loop lowpass `(1-s) + s z^-1`; a
    first-order allpass supplies the fractional part of the period so high notes stay in tune.
    The loop `y = x + g L(z) A(z) z^-D y` is a single IIR filter, run by scipy in C."""
    period = sr / v.pitch_hz
    s = 0.05 + 0.45 * (1.0 - v.brightness)   # the loop lowpass delays by s samples
    delay = int(math.floor(period - s - 0.1))  # the allpass supplies 0.1 .. 1.1 samples
    frac = period - s - delay
    c = (1.0 - frac) / (1.0 + frac)
    g = math.exp(-period / (sr * v.duration_s / 5.0))
    burst = rng.standard_normal(delay + 1)
    b, a = signal.butter(1, 0.03 + 0.9 * v.brightness ** 1.5)
    excitation = np.zeros(n)
    excitation[: delay + 1] = signal.lfilter(b, a, burst)
    den = np.zeros(delay + 3)
    den[:2] = (1.0, c)
    den[delay:] -= g * np.convolve([1.0 - s, s], [c, 1.0])
    y = signal.lfilter([1.0, c], den, excitation)
    y = _breathe(y, min((0.03 + 0.9 * v.brightness ** 1.5) * sr / 2.0, 0.45 * sr), v, rng, sr)
    return y * _envelope(n, v.attack_s, math.inf, sr)


def _bell(v: Voice, n: int, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Two-operator FM bell: an inharmonic modulator whose index (brightness) decays faster
    than the tone, so the strike is brighter than the ring."""
    t = np.arange(n) / sr
    ratio = (1.4, 2.76, 3.5)[int(rng.integers(3))]
    index = (0.3 + 7.0 * v.brightness) * np.exp(-t / (0.25 * v.duration_s))
    y = np.sin(2 * np.pi * v.pitch_hz * t + index * np.sin(2 * np.pi * ratio * v.pitch_hz * t))
    # Carson's rule: the strike's partials reach about (index + 1) modulator frequencies
    bandwidth = v.pitch_hz * (1.0 + ratio * (1.3 + 7.0 * v.brightness))
    y = _breathe(y, min(bandwidth, 0.45 * sr), v, rng, sr)
    return y * _envelope(n, v.attack_s, v.duration_s / 3.5, sr)


def _saw(v: Voice, n: int, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Two slightly detuned band-limited (polyBLEP) saws through a lowpass at a multiple of the
    pitch set by brightness, with an attack from percussive to slow swell and a release."""
    y = np.zeros(n)
    for cents in (-6.0, 6.0):
        f = v.pitch_hz * 2.0 ** (cents / 1200.0)
        dt = f / sr
        phase = (rng.random() + dt * np.arange(n)) % 1.0
        saw = 2.0 * phase - 1.0
        lo, hi = phase < dt, phase > 1.0 - dt
        x = phase[lo] / dt
        saw[lo] -= 2.0 * x - x * x - 1.0
        x = (phase[hi] - 1.0) / dt
        saw[hi] -= x * x + 2.0 * x + 1.0
        y += 0.5 * saw
    cutoff = min(v.pitch_hz * (1.0 + 40.0 * v.brightness ** 2), 0.45 * sr)
    y = signal.sosfilt(signal.butter(2, cutoff, fs=sr, output="sos"), y)
    t = np.arange(n) / sr
    release_start = 0.7 * v.duration_s
    env = _envelope(n, v.attack_s, math.inf, sr) * np.where(
        t < release_start, 1.0, np.exp(-(t - release_start) / (0.08 * v.duration_s)))
    return _breathe(y, cutoff, v, rng, sr) * env


def _noise(v: Voice, n: int, rng: np.random.Generator, sr: int) -> np.ndarray:
    """A band of noise centred on `pitch_hz`, wider when brighter, with attack and decay."""
    width = 0.3 + 1.5 * v.brightness  # octaves either side of the centre
    lo, hi = v.pitch_hz * 2.0 ** -width, min(v.pitch_hz * 2.0 ** width, 0.45 * sr)
    y = signal.sosfilt(signal.butter(2, (lo, hi), btype="bandpass", fs=sr, output="sos"),
                       rng.standard_normal(n))
    return y * _envelope(n, v.attack_s, v.duration_s / 4.0, sr)


def _hit(v: Voice, n: int, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Drum-like hit: a sine falling to `pitch_hz` (a kick or tom body) plus a noise part
    (snare wires) whose share is the noisiness; brightness opens the noise and the click."""
    t = np.arange(n) / sr
    freq = v.pitch_hz * (1.0 + 3.0 * np.exp(-t / 0.03))
    body = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / (0.3 * v.duration_s))
    cutoff = 1000.0 + 14000.0 * v.brightness
    wires = signal.sosfilt(signal.butter(2, cutoff, fs=sr, output="sos"), rng.standard_normal(n))
    wires *= np.exp(-t / (0.15 * v.duration_s)) / max(np.std(wires), 1e-9) * 0.5
    click = np.exp(-t / 0.002) * (0.2 + 0.8 * v.brightness)
    y = (1.0 - v.noisiness) * body + v.noisiness * wires + click * rng.standard_normal(n) * 0.3
    return y * _envelope(n, v.attack_s, math.inf, sr)


def _breathe(tone: np.ndarray, cutoff: float, v: Voice, rng: np.random.Generator, sr: int) -> np.ndarray:
    """`tone` with noise mixed in at `noisiness` times its level (0: none), peak near 1.

    The noise has the tone's spectral envelope (lowpassed at the tone's own `cutoff`) and
    follows its amplitude envelope, so noisiness changes how noisy the sound is, not how bright
    it is nor how that changes over the note: the demo set moves the two independently."""
    window = max(1, int(0.005 * sr))
    level = np.sqrt(np.convolve(tone ** 2, np.ones(window) / window, "same"))
    noise = signal.sosfilt(signal.butter(2, cutoff, fs=sr, output="sos"), rng.standard_normal(len(tone)))
    noise *= level / max(np.sqrt(np.mean(noise ** 2)), 1e-12)
    y = tone + v.noisiness * noise
    return y / max(np.max(np.abs(y)), 1e-9)


_SYNTHS: dict[str, Callable[[Voice, int, np.random.Generator, int], np.ndarray]] = {
    "pluck": _pluck, "bell": _bell, "saw": _saw, "noise": _noise, "hit": _hit}

# Per kind: (lowest, highest) MIDI pitch, attack range in s, noisiness range, duration range.
_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float],
                         tuple[float, float]]] = {
    "pluck": ((36.0, 84.0), (0.0005, 0.004), (0.0, 0.4), (0.8, 3.0)),
    "bell": ((55.0, 91.0), (0.001, 0.03), (0.0, 0.3), (1.2, 3.0)),
    "saw": ((33.0, 81.0), (0.002, 0.6), (0.0, 0.5), (0.5, 2.5)),
    "noise": ((60.0, 120.0), (0.001, 0.4), (1.0, 1.0), (0.2, 1.5)),  # pitch = band centre
    "hit": ((28.0, 55.0), (0.0003, 0.002), (0.05, 0.9), (0.2, 0.9)),
}


def _low_discrepancy(j: int, offsets: np.ndarray) -> np.ndarray:
    """Point j of a Kronecker (R_d) sequence: any first k points spread evenly over [0,1)^d."""
    d = len(offsets)
    phi = 2.0
    for _ in range(30):  # phi_d solves x^(d+1) = x + 1
        phi = (1.0 + phi) ** (1.0 / (d + 1))
    alpha = (1.0 / phi) ** np.arange(1, d + 1)
    return (offsets + (j + 1) * alpha) % 1.0


def draw_voice(index: int, seed: int) -> Voice:
    """The parameters of file `index` for `seed` (independent of how many files are made)."""
    kind = KINDS[index % len(KINDS)]
    kind_rng = np.random.default_rng([seed, KINDS.index(kind)])
    u = _low_discrepancy(index // len(KINDS), kind_rng.random(6))
    (p_lo, p_hi), (a_lo, a_hi), (n_lo, n_hi), (d_lo, d_hi) = _RANGES[kind]
    midi = p_lo + u[0] * (p_hi - p_lo)
    attack = a_lo * (a_hi / a_lo) ** u[2]
    duration = d_lo + u[5] * (d_hi - d_lo)
    # slow swells need room to be heard: the attack never takes more than a third of the sound
    attack = min(attack, duration / 3.0)
    if kind == "noise":
        midi = min(midi, 69.0 + 12.0 * math.log2(0.3 * SAMPLE_RATE / 440.0))
        label = f"{midi_to_hz(midi) / 1000.0:.1f}kHz"
    else:
        label = note_name(midi)
    return Voice(file=f"{index:03d}_{kind}_{label}.wav", kind=kind, midi=round(midi, 3),
                 pitch_hz=round(midi_to_hz(midi), 3), brightness=round(float(u[1]), 4),
                 attack_s=round(attack, 5), noisiness=round(n_lo + u[3] * (n_hi - n_lo), 4),
                 level_db=round(-24.0 + 21.0 * float(u[4]), 2), duration_s=round(duration, 3))


def render(v: Voice, seed: int, index: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """`(samples,)` float64 audio of voice `v`, peaking at `v.level_db` dBFS."""
    n = int(round(v.duration_s * sr))
    y = _SYNTHS[v.kind](v, n, np.random.default_rng([seed, index, 1]), sr)
    y -= np.mean(y)  # no DC offset, whatever the synthesis did
    fade = min(n // 4, int(0.01 * sr))  # a click-free end
    y[n - fade:] *= 0.5 + 0.5 * np.cos(np.linspace(0.0, np.pi, fade))
    return y * (10.0 ** (v.level_db / 20.0) / max(np.max(np.abs(y)), 1e-12))


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate(out_dir: str | os.PathLike[str], count: int = 40, seed: int = 0) -> list[Voice]:
    """Write `count` demo one-shots and the sidecar into `out_dir` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    voices = []
    for index in range(count):
        v = draw_voice(index, seed)
        y = render(v, seed, index)
        _write_atomic(out / v.file, lambda tmp, y=y: sf.write(tmp, y, SAMPLE_RATE, subtype="PCM_24",
                                                              format="WAV"))
        voices.append(v)
    sidecar = {"generator": "synthd-train demo-data", "seed": seed, "count": count,
               "sample_rate": SAMPLE_RATE, "voices": [asdict(v) for v in voices]}
    _write_atomic(out / SIDECAR, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1) + "\n"))
    return voices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the WAV files into")
    parser.add_argument("--count", type=int, default=40, help="number of files (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise SystemExit("synthd-train demo-data: --count must be at least 1")
    voices = generate(args.out_dir, args.count, args.seed)
    total = sum(v.duration_s for v in voices)
    kinds = ", ".join(f"{sum(v.kind == k for v in voices)} {k}" for k in KINDS)
    print(f"wrote {len(voices)} one-shots ({total:.1f} s: {kinds}) to {args.out_dir}, "
          f"24-bit WAV at {SAMPLE_RATE} Hz; parameters in {Path(args.out_dir) / SIDECAR}")
    return 0
