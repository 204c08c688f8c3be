"""Per-frame audio descriptors: the one definition used in training, analysis and evaluation.

Five descriptors, each a value per latent frame (`hop` samples, frame `t` centred on sample
`t * hop + hop // 2`, `samples // hop` frames, the same count as the encoder's output):

- loudness: A-weighted mean-square level in dB (a full-scale sine at 1 kHz reads -3.01 dB);
- brightness: spectral centroid in Hz;
- pitch: f0 in Hz from our own YIN (de Cheveigné & Kawahara 2002), with a confidence 0..1;
- noisiness: spectral flatness 0..1 of the spectrum's fine structure, the power over its local
  envelope (any noise, white or dark, about 0.56; a pure tone near 0);
- attack: onset rise time in seconds (10 % to 90 % of the note's peak envelope) of the note a
  frame belongs to.

Everything is batched torch: `(batch, samples)` in, `(batch, frames)` out. Loudness,
brightness and noisiness are differentiable; pitch and attack are not (argmin, segmentation).
`analysis_values` maps descriptors onto the scales analysis and regression use (log
frequencies, log flatness, log rise time) with NaN where a value is undefined (silence,
unpitched frames). `attribute_regularization_loss` is the attribute-regularised VAE term
(Pati & Lerch) that binds one latent dimension to each chosen descriptor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.pitch import correlation_size, yin

DESCRIPTOR_NAMES: tuple[str, ...] = ("loudness", "brightness", "pitch", "noisiness", "attack")

# Power floor (mean square) under which a frame counts as digital silence in log terms.
_POWER_FLOOR = 1e-12


@dataclass(frozen=True)
class DescriptorConfig:
    """Analysis parameters. Defaults suit 48 kHz audio and the trainer's 256-sample hop."""

    sample_rate: int = 48000
    hop: int = 256
    n_fft: int = 2048
    # frames quieter than this (A-weighted dB) are silence: no brightness, pitch, noisiness, attack
    silence_db: float = -70.0
    # noisiness: half-width in bins of the local spectral envelope the flatness is taken against
    # (8 bins of a 2048-point spectrum: 200 Hz either side, wider than a harmonic's main lobe,
    # narrower than the spacing of partials above 100 Hz)
    flatness_half_width: int = 8
    f0_min: float = 40.0
    f0_max: float = 2000.0
    # YIN: integration window in samples and the dip threshold on the normalised difference
    yin_window: int = 1024
    yin_threshold: float = 0.15
    # frames whose YIN confidence is below this are unpitched for analysis
    pitch_confidence: float = 0.8
    # attack: peak-envelope window and hop in samples (the window spans a period of f0_min, so
    # the envelope of a steady tone has no ripple); a rise this large (dB) within `onset_span_s`
    # starts a new note even without silence in between
    envelope_window: int = 1200
    envelope_hop: int = 24
    onset_rise_db: float = 12.0
    onset_span_s: float = 0.03
    onset_refractory_s: float = 0.08


@dataclass
class Descriptors:
    """Descriptor values per frame, each `(batch, frames)` float32.

    `brightness`, `noisiness` and `attack` are NaN on silent frames; `pitch` is YIN's estimate
    on every frame, to be trusted where `pitch_confidence` is high.
    """

    loudness: Tensor
    brightness: Tensor
    pitch: Tensor
    pitch_confidence: Tensor
    noisiness: Tensor
    attack: Tensor


def _as_batch(audio: Tensor | np.ndarray) -> Tensor:
    """`(samples,)`, `(batch, samples)` or `(batch, 1, samples)` -> `(batch, samples)` float32."""
    x = torch.as_tensor(audio)
    if x.dim() == 3:
        if x.shape[1] != 1:
            raise ValueError(f"descriptors take mono audio, got {x.shape[1]} channels")
        x = x[:, 0]
    elif x.dim() == 1:
        x = x[None]
    elif x.dim() != 2:
        raise ValueError(f"audio must be (samples,), (batch, samples) or (batch, 1, samples), got {tuple(x.shape)}")
    return x.float()


def frames(x: Tensor, size: int, hop: int) -> Tensor:
    """Windows of `size` samples centred on each frame, `(batch, samples // hop, size)`.

    Frame `t` is centred on sample `t * hop + hop // 2`, the middle of the span the encoder's
    frame `t` summarises; the signal is zero-padded at both ends.
    """
    count = x.shape[-1] // hop
    left = size // 2 - hop // 2
    padded = F.pad(x, (left, size))
    return padded.unfold(-1, size, hop)[:, :count]


def a_weighting_db(freqs: Tensor) -> Tensor:
    """IEC 61672 A-weighting gain in dB at `freqs` (Hz); 0 dB at 1 kHz, -inf at DC."""
    f2 = freqs.double().square()
    ra = (12194.0 ** 2 * f2.square()) / (
        (f2 + 20.6 ** 2) * torch.sqrt((f2 + 107.7 ** 2) * (f2 + 737.9 ** 2)) * (f2 + 12194.0 ** 2))
    return (20.0 * torch.log10(ra.clamp(min=1e-30)) + 2.0).float()


def _power_spectrum(x: Tensor, cfg: DescriptorConfig) -> tuple[Tensor, Tensor]:
    """One-sided power spectrum scaled so its sum is the frame's mean square, `(batch, frames, bins)`,
    and the bin frequencies `(bins,)`."""
    window = torch.hann_window(cfg.n_fft, dtype=x.dtype, device=x.device)
    spec = torch.fft.rfft(frames(x, cfg.n_fft, cfg.hop) * window, dim=-1)
    power = spec.real.square() + spec.imag.square()
    # one-sided: every bin except DC and Nyquist stands for two; Parseval with the window's energy
    scale = torch.full((power.shape[-1],), 2.0, dtype=x.dtype, device=x.device)
    scale[0] = 1.0
    scale[-1] = 1.0
    power = power * scale / (cfg.n_fft * window.square().sum())
    freqs = torch.fft.rfftfreq(cfg.n_fft, 1.0 / cfg.sample_rate).to(x.device)
    return power, freqs


def loudness(audio: Tensor, cfg: DescriptorConfig = DescriptorConfig()) -> Tensor:
    """A-weighted mean-square level in dB per frame, `(batch, frames)`; differentiable.

    A sine of amplitude a at 1 kHz reads 20*log10(a) - 3.01 dB; silence reads -120 dB.
    """
    return compute_spectral(audio, cfg)[0]


def _centroid(power: Tensor, freqs: Tensor, silent: Tensor) -> Tensor:
    """Centroid (Hz, magnitude-weighted) per frame; NaN where `silent`."""
    # a floor far below any real content: an absolute one would pull the centroid of quiet
    # sounds toward the middle of the band (a level change would move their brightness)
    magnitude = torch.sqrt(power + 1e-30)
    centroid = (magnitude * freqs).sum(-1) / magnitude.sum(-1).clamp(min=1e-30)
    return torch.where(silent, torch.full_like(centroid, float("nan")), centroid)


def _fine_flatness(power: Tensor, silent: Tensor, half_width: int) -> Tensor:
    """Spectral flatness of the fine structure per frame; NaN where `silent`.

    Each bin's power is taken against its local envelope (the mean of the `half_width` bins
    either side), and the geometric mean of that ratio is weighted by the envelope: the flatness
    of every part of the spectrum, counted by how much of the sound lies there. Noise of any
    colour reads like white noise (e^-gamma, about 0.56), partials near 0. The flatness of the
    whole spectrum at once (geometric over arithmetic mean) measures bandwidth as much as noise:
    it calls a dark noise burst as tonal as a sine, so brightness and noisiness never move apart.
    """
    batch, count, bins = power.shape
    p = power.reshape(-1, 1, bins)
    # a floor relative to the frame's mean keeps log() finite on exact zeros without flattening
    # the spectrum of quiet but real sounds
    p = p + p.mean(-1, keepdim=True) * 1e-10 + 1e-30
    width = min(half_width, bins - 1)
    neighbours = 2 * width
    # the bin itself is left out of its envelope: on noise the two are then independent, and the
    # ratio's geometric mean is white noise's flatness, e^-gamma, whatever the envelope's width
    window = F.avg_pool1d(F.pad(p, (width, width), mode="reflect"), neighbours + 1, 1) * (neighbours + 1)
    envelope = (window - p) / neighbours
    weights = envelope / envelope.sum(-1, keepdim=True)
    flatness = torch.exp((weights * torch.log(p / envelope)).sum(-1)).reshape(batch, count)
    return torch.where(silent, torch.full_like(flatness, float("nan")), flatness)


def brightness(audio: Tensor, cfg: DescriptorConfig = DescriptorConfig()) -> Tensor:
    """Spectral centroid in Hz per frame, `(batch, frames)`, NaN on silent frames; differentiable."""
    return compute_spectral(audio, cfg)[1]


def noisiness(audio: Tensor, cfg: DescriptorConfig = DescriptorConfig()) -> Tensor:
    """Spectral flatness of the fine structure (geometric over arithmetic mean of the power
    against its local envelope, see `_fine_flatness`) per frame, `(batch, frames)`, NaN on silent
    frames; differentiable."""
    return compute_spectral(audio, cfg)[2]


def compute_spectral(audio: Tensor, cfg: DescriptorConfig = DescriptorConfig()) -> tuple[Tensor, Tensor, Tensor]:
    """Loudness, brightness and noisiness from one shared spectrum, each `(batch, frames)`."""
    x = _as_batch(audio)
    power, freqs = _power_spectrum(x, cfg)
    weights = 10.0 ** (a_weighting_db(freqs) / 10.0)
    level = 10.0 * torch.log10((power * weights).sum(-1) + _POWER_FLOOR)
    silent = level < cfg.silence_db
    return level, _centroid(power, freqs, silent), _fine_flatness(power, silent, cfg.flatness_half_width)


def pitch(audio: Tensor, cfg: DescriptorConfig = DescriptorConfig()) -> tuple[Tensor, Tensor]:
    """YIN f0 in Hz and its confidence (1 - the normalised difference at the chosen lag) per
    frame, each `(batch, frames)`. Not differentiable.

    Lags run from `sample_rate / f0_max` to `sample_rate / f0_min`; the chosen lag is the
    bottom of the first dip under `yin_threshold` (the global minimum when none dips that far),
    refined by parabolic interpolation: `training.pitch.yin`, the estimator the model's pitch
    input comes from, on this module's analysis frames.
    """
    x = _as_batch(audio)
    sr = cfg.sample_rate
    tau_min = max(2, int(sr / cfg.f0_max))
    tau_max = int(math.ceil(sr / cfg.f0_min))
    w = cfg.yin_window
    span = w + tau_max + 1
    with torch.no_grad():
        seg = frames(x, span, cfg.hop).double()  # (B, T, span)
        if seg.shape[1] == 0:
            empty = x.new_zeros(seg.shape[0], 0)
            return empty, empty.clone()
        f0, confidence = yin(seg, sr, w, tau_min, tau_max, cfg.yin_threshold, correlation_size(span, w))
        silent = seg[..., :w].square().mean(-1) < _POWER_FLOOR * 1e3
        confidence = torch.where(silent, torch.zeros_like(confidence), confidence)
    return f0.float(), confidence.float()


def _rise_times(env: np.ndarray, env_db: np.ndarray, cfg: DescriptorConfig) -> np.ndarray:
    """Rise time (s) at every envelope point of the note it belongs to; NaN in silence."""
    sr_env = cfg.sample_rate / cfg.envelope_hop
    loud = env_db >= cfg.silence_db
    out = np.full(env.shape, np.nan)
    span = max(1, int(round(cfg.onset_span_s * sr_env)))
    refractory = int(round(cfg.onset_refractory_s * sr_env))
    # note starts: silence -> sound, and re-attacks (a large rise from a recent minimum)
    starts = [i for i in range(len(env)) if loud[i] and (i == 0 or not loud[i - 1])]
    recent_min = np.array([env_db[max(0, i - span):i + 1].min() for i in range(len(env))])
    rising = (env_db - recent_min >= cfg.onset_rise_db) & loud
    for i in np.flatnonzero(rising & ~np.roll(rising, 1)):
        lo = max(0, i - span)
        onset = lo + int(np.argmin(env_db[lo:i + 1]))
        if all(abs(onset - s) > refractory for s in starts):
            starts.append(onset)
    starts = sorted(starts)
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(env)
        peak_at = s + int(np.argmax(env[s:end]))
        peak = env[peak_at]
        below = np.flatnonzero(env[s:peak_at + 1] < 0.1 * peak)
        t10 = s + (below[-1] + 1 if below.size else 0)
        t90 = t10 + int(np.flatnonzero(env[t10:peak_at + 1] >= 0.9 * peak)[0])

        def crossing(i: int, level: float) -> float:
            # sub-sample position where the envelope crosses `level` between points i-1 and i
            if i <= 0 or env[i] == env[i - 1]:
                return float(i)
            return i - 1 + float(np.clip((level - env[i - 1]) / (env[i] - env[i - 1]), 0.0, 1.0))

        rise = (crossing(t90, 0.9 * peak) - crossing(t10, 0.1 * peak)) / sr_env
        out[s:end] = max(rise, 1.0 / sr_env)
    out[~loud] = np.nan
    return out


def attack(audio: Tensor, cfg: DescriptorConfig = DescriptorConfig()) -> Tensor:
    """Onset rise time in seconds per frame, `(batch, frames)`: for each note (sound after
    silence, or a re-attack rising `onset_rise_db` within `onset_span_s`), the time its peak
    envelope (max |x| over `envelope_window`) takes from 10 % to 90 % of the note's peak; NaN on
    silent frames. Not differentiable.
    """
    x = _as_batch(audio)
    hop, win, ehop = cfg.hop, cfg.envelope_window, cfg.envelope_hop
    count = x.shape[-1] // hop
    with torch.no_grad():
        # a peak envelope, unlike RMS, rises as fast as the sound does and has no ripple
        env = F.max_pool1d(x.double().abs()[:, None], win, ehop, padding=win // 2)[:, 0].numpy()
    result = np.full((x.shape[0], count), np.nan)
    centres = np.arange(count) * hop + hop // 2
    idx = np.clip(np.round(centres / ehop).astype(int), 0, env.shape[-1] - 1) if count else centres
    for b in range(x.shape[0]):
        e = env[b]
        e_db = 10.0 * np.log10(e ** 2 + _POWER_FLOOR)
        result[b] = _rise_times(e, e_db, cfg)[idx]
    return torch.from_numpy(result).float()


def compute(audio: Tensor | np.ndarray, cfg: DescriptorConfig = DescriptorConfig()) -> Descriptors:
    """All descriptors of `audio` (`(samples,)`, `(batch, samples)` or `(batch, 1, samples)`)."""
    x = _as_batch(audio)
    level, centroid, flatness = compute_spectral(x, cfg)
    f0, confidence = pitch(x, cfg)
    silent = level < cfg.silence_db
    confidence = torch.where(silent, torch.zeros_like(confidence), confidence)
    rise = attack(x, cfg)
    rise = torch.where(silent, torch.full_like(rise, float("nan")), rise)
    return Descriptors(loudness=level, brightness=centroid, pitch=f0, pitch_confidence=confidence,
                       noisiness=flatness, attack=rise)


def analysis_values(d: Descriptors, cfg: DescriptorConfig = DescriptorConfig()) -> dict[str, Tensor]:
    """Descriptors on the scales analysis fits and compares, each `(batch, frames)`, NaN where
    undefined: loudness dB; brightness log2 Hz; pitch log2 Hz where confident; noisiness log10
    flatness; attack log10 seconds. Each is a monotone map of its descriptor, so rank statistics
    are the same on either scale."""
    nan = torch.full_like(d.loudness, float("nan"))
    silent = d.loudness < cfg.silence_db
    pitched = (d.pitch_confidence >= cfg.pitch_confidence) & ~silent
    return {
        "loudness": d.loudness.clone(),
        "brightness": torch.where(silent, nan, torch.log2(d.brightness.clamp(min=1.0))),
        "pitch": torch.where(pitched, torch.log2(d.pitch.clamp(min=1.0)), nan),
        "noisiness": torch.where(silent, nan, torch.log10(d.noisiness.clamp(min=1e-12))),
        "attack": torch.where(silent, nan, torch.log10(d.attack.clamp(min=1e-5))),
    }


def attribute_targets(audio: Tensor, names: list[str] | tuple[str, ...],
                      cfg: DescriptorConfig = DescriptorConfig()) -> dict[str, Tensor]:
    """The `analysis_values` of just the descriptors in `names`, each `(batch, frames)`, computing
    only what they need (no YIN unless pitch is asked for, no segmentation unless attack is):
    the targets of `attribute_regularization_loss` for a training batch `(batch, 1, samples)`."""
    unknown = [n for n in names if n not in DESCRIPTOR_NAMES]
    if unknown:
        raise ValueError(f"unknown attribute(s) {', '.join(unknown)}; choose from {', '.join(DESCRIPTOR_NAMES)}")
    x = _as_batch(audio).detach()
    with torch.no_grad():
        level, centroid, flatness = compute_spectral(x, cfg)
        nan = torch.full_like(level, float("nan"))
        f0, confidence = pitch(x, cfg) if "pitch" in names else (nan, torch.zeros_like(level))
        rise = attack(x, cfg).to(level.device) if "attack" in names else nan
    d = Descriptors(loudness=level, brightness=centroid, pitch=f0, pitch_confidence=confidence,
                    noisiness=flatness, attack=rise)
    values = analysis_values(d, cfg)
    return {n: values[n] for n in names}


def attribute_regularization_loss(z: Tensor, attributes: dict[str, Tensor], dims: dict[str, int],
                                  delta: float = 10.0, max_frames: int = 512) -> Tensor:
    """Attribute-regularised VAE term (Pati & Lerch, 2021): for each attribute `a` bound to
    latent dimension `dims[a]`, the mean |tanh(delta * (z_i - z_j)) - sign(a_i - a_j)| over pairs
    of frames, so that dimension's order follows the attribute's. Scalar, 0 when every pair agrees.

    `z`: `(batch, latent, frames)` latent samples or means; `attributes[a]`: `(batch, frames)`
    values on any monotone scale (e.g. `analysis_values`), NaN where undefined (those frames are
    left out). At most `max_frames` frames (spread evenly) enter the pairwise matrix.
    """
    if not dims:
        return z.new_zeros(())
    flat_z = z.permute(0, 2, 1).reshape(-1, z.shape[1])
    terms = []
    for name, dim in dims.items():
        if name not in attributes:
            raise KeyError(f"attribute {name!r} has no values (have: {', '.join(sorted(attributes))})")
        a = attributes[name].reshape(-1).to(z.device, z.dtype)
        valid = torch.nonzero(torch.isfinite(a)).flatten()
        if valid.numel() < 2:
            continue
        if valid.numel() > max_frames:
            valid = valid[torch.linspace(0, valid.numel() - 1, max_frames, device=z.device).long()]
        zd = flat_z[valid, dim]
        av = a[valid]
        dz = zd[:, None] - zd[None, :]
        da = av[:, None] - av[None, :]
        terms.append((torch.tanh(delta * dz) - torch.sign(da)).abs().mean())
    return torch.stack(terms).mean() if terms else z.new_zeros(())
