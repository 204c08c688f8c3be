"""Discriminators and adversarial losses for the optional GAN stage.

Multi-period discriminators (the waveform folded by a prime period, so each one sees a
different periodic structure) and multi-resolution STFT discriminators (log magnitude
spectrograms at several FFT sizes). Every convolution is weight- or spectral-normalised,
which keeps the discriminators Lipschitz-ish and the stage stable on small data.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

Normalization = Literal["weight", "spectral"]
# one discriminator's verdict: (logits, feature maps of every layer)
Verdict = tuple[Tensor, list[Tensor]]


def _norm(layer: nn.Module, kind: Normalization) -> nn.Module:
    if kind == "spectral":
        return parametrizations.spectral_norm(layer)
    return parametrizations.weight_norm(layer)


class _Conv2dStack(nn.Module):
    """Strided 2-D convolutions along the first spatial axis, then a 1-channel projection."""

    def __init__(self, channels: int, norm: Normalization, stride: tuple[int, int],
                 kernel: tuple[int, int]) -> None:
        super().__init__()
        widths = [1, channels, channels * 2, channels * 4, channels * 4]
        pad = (kernel[0] // 2, kernel[1] // 2)
        self.convs = nn.ModuleList(
            _norm(nn.Conv2d(widths[i], widths[i + 1], kernel, stride=stride if i < 3 else 1, padding=pad), norm)
            for i in range(len(widths) - 1))
        self.out = _norm(nn.Conv2d(widths[-1], 1, (3, 3 if kernel[1] > 1 else 1),
                                   padding=(1, 1 if kernel[1] > 1 else 0)), norm)

    def forward(self, x: Tensor) -> Verdict:
        """`(batch, 1, H, W)` -> (logits `(batch, 1, H', W')`, features)."""
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        x = self.out(x)
        features.append(x)
        return x, features


class PeriodDiscriminator(nn.Module):
    """Sees the waveform folded into `(time / period, period)`."""

    def __init__(self, period: int, channels: int, norm: Normalization) -> None:
        super().__init__()
        self.period = period
        self.stack = _Conv2dStack(channels, norm, stride=(3, 1), kernel=(5, 1))

    def forward(self, x: Tensor) -> Verdict:
        """`(batch, 1, time)` -> verdict."""
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), mode="reflect")
        return self.stack(x.reshape(b, c, -1, self.period))


class ResolutionDiscriminator(nn.Module):
    """Sees the log-magnitude spectrogram `(frames, bins)` at one FFT size."""

    def __init__(self, n_fft: int, channels: int, norm: Normalization) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.stack = _Conv2dStack(channels, norm, stride=(1, 2), kernel=(3, 9))

    def forward(self, x: Tensor) -> Verdict:
        """`(batch, 1, time)` -> verdict."""
        spec = torch.stft(x.squeeze(1).float(), self.n_fft, self.n_fft // 4, window=self.window,
                          return_complex=True)
        mag = torch.log(spec.abs().clamp(min=1e-5)).transpose(1, 2)  # (batch, frames, bins)
        return self.stack(mag.unsqueeze(1))


class Discriminators(nn.Module):
    """All discriminators; `forward` returns one verdict each."""

    def __init__(self, periods: list[int], fft_sizes: list[int], channels: int = 16,
                 norm: Normalization = "weight") -> None:
        super().__init__()
        self.members = nn.ModuleList(
            [PeriodDiscriminator(p, channels, norm) for p in periods]
            + [ResolutionDiscriminator(n, channels, norm) for n in fft_sizes])

    def forward(self, x: Tensor) -> list[Verdict]:
        return [d(x) for d in self.members]


def split_verdicts(verdicts: list[Verdict], n: int) -> tuple[list[Verdict], list[Verdict]]:
    """Verdicts on `cat([a, b])` split into those on the first `n` examples and on the rest:
    one discriminator pass over both halves (one forward per backward, as DDP requires)."""
    first = [(logits[:n], [f[:n] for f in feats]) for logits, feats in verdicts]
    rest = [(logits[n:], [f[n:] for f in feats]) for logits, feats in verdicts]
    return first, rest


def discriminator_loss(real: list[Verdict], fake: list[Verdict], kind: str) -> Tensor:
    """Loss of the discriminators: push real logits up, fake ones down (hinge or least squares)."""
    total = real[0][0].new_zeros(())
    for (r, _), (f, _) in zip(real, fake):
        if kind == "hinge":
            total = total + F.relu(1 - r).mean() + F.relu(1 + f).mean()
        else:
            total = total + (r - 1).square().mean() + f.square().mean()
    return total / len(real)


def generator_loss(fake: list[Verdict], kind: str) -> Tensor:
    """Adversarial loss of the generator: make the discriminators call its output real."""
    total = fake[0][0].new_zeros(())
    for f, _ in fake:
        total = total + ((-f).mean() if kind == "hinge" else (f - 1).square().mean())
    return total / len(fake)


def feature_matching_loss(real: list[Verdict], fake: list[Verdict]) -> Tensor:
    """Mean L1 distance between the discriminators' features of real and generated audio."""
    terms = [(rf.detach() - ff).abs().mean() for (_, r_feats), (_, f_feats) in zip(real, fake)
             for rf, ff in zip(r_feats, f_feats)]
    return torch.stack(terms).mean()


def guard_ratio(adversarial: Tensor, reconstruction: Tensor, max_ratio: float) -> Tensor:
    """`adversarial` scaled down (without gradient through the scale) so that it never exceeds
    `max_ratio` times the reconstruction loss: the GAN may refine, never dominate."""
    limit = max_ratio * reconstruction.detach()
    scale = torch.clamp(limit / adversarial.detach().abs().clamp(min=1e-8), max=1.0)
    return adversarial * scale
