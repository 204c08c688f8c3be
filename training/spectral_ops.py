"""Signal maths of the model: the causal analysis frames, the band limit, and overlap-add.

Frame convention, shared by the encoder and the decoder so they line up sample for sample:
frame `t` covers samples `[t * hop, t * hop + n_fft)`. The encoder analyses that span; the
decoder synthesises a windowed segment for the same span, and the block `[t * hop, (t + 1) * hop)`
is complete once frame `t` has been added, so decoding is causal and streams with an
overlap-add tail of `n_fft - hop` samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def hann_window(n_fft: int) -> Tensor:
    """Periodic Hann window, `(n_fft,)`: the analysis window."""
    return torch.hann_window(n_fft, periodic=True)


def squared_hann_window(n_fft: int) -> Tensor:
    """Periodic Hann squared, `(n_fft,)`: the synthesis window. Its shifts by `n_fft / 4` sum to a
    constant (1.5), and its side lobes fall at 30 dB per octave (Hann: 18), so a band-limited
    frame leaks far less above the band limit."""
    return torch.hann_window(n_fft, periodic=True).square()


def overlap_add_gain(window: Tensor, hop: int) -> float:
    """The constant sum of `window` shifted by multiples of `hop` (2.0 for Hann at n_fft / 4).

    Raises ValueError when the shifted windows do not sum to a constant (within 1e-3), since
    overlap-add would then modulate the output at the frame rate.
    """
    n_fft = window.numel()
    if n_fft % hop:
        raise ValueError(f"n_fft {n_fft} must be a multiple of hop {hop}")
    total = window.double().reshape(n_fft // hop, hop).sum(0)
    if float(total.max() - total.min()) > 1e-3 * float(total.mean()):
        raise ValueError(f"window of {n_fft} samples does not overlap-add to a constant at hop {hop}")
    return float(total.mean())


def analysis_frames(x: Tensor, n_fft: int, hop: int) -> Tensor:
    """Causal analysis frames of `x` `(batch, 1, samples)` -> `(batch, frames, n_fft)`.

    frames = samples // hop; frame t holds x[t*hop : t*hop + n_fft], zero beyond the end.
    """
    frames = x.shape[-1] // hop
    x = x[..., : frames * hop].reshape(x.shape[0], -1)
    x = torch.nn.functional.pad(x, (0, n_fft - hop))
    return x.unfold(-1, n_fft, hop)


def log_magnitude(x: Tensor, n_fft: int, hop: int, window: Tensor, max_bin: int) -> Tensor:
    """Log magnitude of the causal analysis frames, bins 0..max_bin-1: `(batch, max_bin, frames)`."""
    return frames_log_magnitude(analysis_frames(x, n_fft, hop), window, max_bin)


def frames_log_magnitude(frames: Tensor, window: Tensor, max_bin: int) -> Tensor:
    """Log magnitude of analysis frames `(batch, frames, n_fft)`, bins 0..max_bin-1: `(batch, max_bin, frames)`."""
    spec = torch.fft.rfft(frames * window, dim=-1)[..., :max_bin]
    # floor inside the log: digital silence must stay finite
    return torch.log(spec.abs() + 1e-5).transpose(1, 2)


def band_limit_mask(n_fft: int, sample_rate: int, max_frequency: float, taper: float) -> Tensor:
    """Per-bin gain `(bins,)` with bins = the number of bins that can be nonzero.

    1 up to `max_frequency - taper`, a raised-cosine fall to 0 at `max_frequency`, and the DC bin
    0 (a DC offset is never wanted in the output). The last nonzero bin lies 7 bins below
    `max_frequency`: the synthesis window's main lobe (3 bins either side for Hann squared) and
    its first side lobes stay below it, so what leaks above `max_frequency` is under float32
    rounding noise, whatever the network says.
    """
    if not 0 < max_frequency <= sample_rate / 2:
        raise ValueError(f"max_frequency {max_frequency} must lie in (0, {sample_rate / 2}]")
    bin_hz = sample_rate / n_fft
    top = band_limit_top(n_fft, sample_rate, max_frequency)
    start = top - taper
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * bin_hz
    t = ((freqs - start) / max(taper, 1e-9)).clamp(0.0, 1.0)
    mask = 0.5 * (1.0 + torch.cos(math.pi * t))
    mask[freqs > top] = 0.0
    mask[0] = 0.0
    bins = int((mask > 0).nonzero().max()) + 1
    return mask[:bins].float()


def band_limit_top(n_fft: int, sample_rate: int, max_frequency: float) -> float:
    """Where `band_limit_mask` reaches zero (Hz): 7 bins under `max_frequency`."""
    return max_frequency - 7 * sample_rate / n_fft


def synthesis_window(window: Tensor, hop: int) -> Tensor:
    """`window` scaled for synthesis with `torch.fft.irfft(..., norm="forward")` at `hop`: a bin of
    magnitude m then gives a sinusoid of amplitude m after overlap-add."""
    return window / (2.0 * overlap_add_gain(window, hop))


def overlap_add(frames: Tensor, tail: Tensor, hop: int) -> tuple[Tensor, Tensor]:
    """Causal overlap-add of `frames` `(batch, T, n_fft)` onto the previous `tail`
    `(batch, n_fft - hop)`.

    Returns the `T * hop` completed samples `(batch, T * hop)` and the new tail. Frame t starts
    at sample t * hop of this call's output.
    """
    batch, count, n_fft = frames.shape
    if count == 1:
        # the common streaming call: the tail added into a copy of the frame, both results views of it
        acc = frames[:, 0].clone()
        acc[:, : n_fft - hop] += tail
        return acc[:, :hop], acc[:, hop:]
    parts = n_fft // hop
    # each frame is `parts` blocks of `hop` samples; block r of frame t lands in output block t + r.
    # A few strided adds: far cheaper than a general fold for the one-frame calls of streaming.
    blocks = frames.reshape(batch, count, parts, hop)
    acc = torch.nn.functional.pad(tail.reshape(batch, parts - 1, hop), (0, 0, 0, count))
    for r in range(parts):
        acc[:, r:r + count] += blocks[:, :, r]
    acc = acc.reshape(batch, (count + parts - 1) * hop)
    return acc[:, : count * hop], acc[:, count * hop:]


def band_interpolation(n_bands: int, bins: int, n_fft: int, sample_rate: int) -> Tensor:
    """Linear interpolation from `n_bands` values at mel-spaced centres to `bins` FFT bins,
    `(n_bands, bins)`: each column's weights sum to 1. Used for smooth spectral envelopes."""
    def to_mel(f: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    top = to_mel(torch.tensor((bins - 1) * sample_rate / n_fft, dtype=torch.float64))
    centres = torch.linspace(0.0, float(top), n_bands, dtype=torch.float64)
    mels = to_mel(torch.arange(bins, dtype=torch.float64) * sample_rate / n_fft)
    position = (mels - centres[0]) / (centres[1] - centres[0]) if n_bands > 1 else torch.zeros(bins, dtype=torch.float64)
    position = position.clamp(0, n_bands - 1)
    low = position.floor().long().clamp(max=n_bands - 2) if n_bands > 1 else torch.zeros(bins, dtype=torch.long)
    frac = position - low
    weights = torch.zeros(n_bands, bins, dtype=torch.float64)
    cols = torch.arange(bins)
    weights[low, cols] = 1.0 - frac
    if n_bands > 1:
        weights[low + 1, cols] += frac
    return weights.float()
