"""Reconstruction and latent losses of the trainer.

Multi-resolution STFT (spectral convergence + log magnitude), multi-scale log-mel L1, and
the KL of a diagonal Gaussian posterior with free bits per latent dimension. The spectra
of one resolution are computed once and shared by the STFT and mel terms, because on a
CPU the transforms dominate the cost of the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Floor under magnitudes: keeps log() finite and its gradient bounded on digital silence.
_MAG_FLOOR = 1e-5
# RMS level (-60 dBFS) under which a target's energy no longer scales spectral convergence
REFERENCE_FLOOR_RMS = 1e-3


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> Tensor:
    """Triangular mel filters (HTK mel scale), `(n_mels, n_fft // 2 + 1)`, each of unit area.

    Filters narrower than one FFT bin (low bands of a small FFT) still cover the nearest bin,
    so no mel band is identically zero.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    n_bins = n_fft // 2 + 1
    freqs = torch.linspace(0, sample_rate / 2, n_bins, dtype=torch.float64)

    def to_mel(f: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def to_hz(m: Tensor) -> Tensor:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    mel_points = torch.linspace(float(to_mel(torch.tensor(f_min))), float(to_mel(torch.tensor(f_max))),
                                n_mels + 2, dtype=torch.float64)
    hz = to_hz(mel_points)
    lower, centre, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    nearest = torch.argmin((freqs[None] - centre).abs(), dim=1)
    empty = fb.sum(dim=1) == 0
    fb[empty, nearest[empty]] = 1.0
    fb = fb / fb.sum(dim=1, keepdim=True)
    return fb.float()


def _safe_sqrt(x: Tensor) -> Tensor:
    # sqrt has an infinite slope at 0: a perfect reconstruction must not give NaN gradients
    return torch.sqrt(x + 1e-14)


@dataclass(frozen=True)
class SpectralTerms:
    """Loss terms of a batch. The energies are `(stft_resolutions, batch)`."""

    error_energy: Tensor    # ||Y - Ŷ||_F^2 per STFT resolution and example
    target_energy: Tensor   # ||Y||_F^2 per STFT resolution and example
    floor_energy: Tensor    # `(stft_resolutions, 1)`: ||Y||_F^2 of white noise at REFERENCE_FLOOR_RMS
    log_magnitude: Tensor   # `(batch,)` mean |log Y - log Ŷ|, averaged over the resolutions
    log_mel: Tensor | None  # `(batch,)` mean |log mel Y - log mel Ŷ|, averaged over the mel resolutions

    @property
    def spectral_convergence(self) -> Tensor:
        """`(batch,)` ||Y - Ŷ||_F / ||Y||_F of each example, averaged over the resolutions.

        A silent target would make the ratio infinite: its reference energy is floored at that of
        noise at -60 dBFS, so errors far below the level of the sound stop counting."""
        return _safe_sqrt(self.error_energy / torch.maximum(self.target_energy, self.floor_energy)).mean(0)

    def batch_spectral_convergence(self) -> Tensor:
        """Spectral convergence of the batch taken as one signal (scalar), the training form: a
        crop of silence or of a quiet tail adds its error without dividing by its own tiny energy."""
        batch = self.target_energy.shape[1]
        reference = torch.maximum(self.target_energy.sum(1), self.floor_energy[:, 0] * batch)
        return _safe_sqrt(self.error_energy.sum(1) / reference).mean()

    def distance(self) -> Tensor:
        """The multi-resolution STFT distance: spectral convergence + log magnitude, `(batch,)`."""
        return self.spectral_convergence + self.log_magnitude


class MultiResolutionSpectralLoss(nn.Module):
    """Spectral distances between two signals at several STFT resolutions.

    At every FFT size in `fft_sizes` (Hann window of that size, hop = size // 4):
    spectral convergence ||Y - Ŷ||_F / ||Y||_F and the mean |log Y - log Ŷ|; at the sizes also in
    `mel_fft_sizes`, the mean |log mel(Y) - log mel(Ŷ)| with `n_mels` bands (scaled down for small
    FFTs so that no band is narrower than a bin). With `band_limit` (max_frequency, taper in Hz)
    the target's spectra are faded to nothing above `max_frequency` as the decoder's band limit
    is, so nothing asks the decoder for what it cannot make.
    """

    def __init__(self, fft_sizes: tuple[int, ...] | list[int] = (64, 128, 256, 512, 1024, 2048, 4096),
                 mel_fft_sizes: tuple[int, ...] | list[int] = (),
                 n_mels: int = 80, sample_rate: int = 48000,
                 band_limit: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.band_limited = band_limit is not None
        self.fft_sizes = sorted(set(fft_sizes) | set(mel_fft_sizes))
        self.stft_sizes = set(fft_sizes)
        self.mel_sizes = set(mel_fft_sizes)
        for n in self.fft_sizes:
            if n < 16 or n & (n - 1):
                raise ValueError(f"FFT size {n} must be a power of two >= 16")
            self.register_buffer(f"window_{n}", torch.hann_window(n), persistent=False)
            if band_limit is not None:
                top, taper = band_limit
                freqs = torch.arange(n // 2 + 1, dtype=torch.float64) * sample_rate / n
                fade = ((freqs - (top - taper)) / max(taper, 1e-9)).clamp(0.0, 1.0)
                self.register_buffer(f"band_{n}", (0.5 + 0.5 * torch.cos(math.pi * fade)).float().view(-1, 1),
                                     persistent=False)
            if n in self.mel_sizes:
                bands = min(n_mels, n // 4)
                self.register_buffer(f"mel_{n}", mel_filterbank(n, bands, sample_rate), persistent=False)

    def _magnitude(self, x: Tensor, n: int) -> Tensor:
        """|STFT| of `x` `(batch, time)` at FFT size `n`, `(batch, bins, frames)`."""
        spec = torch.stft(x, n_fft=n, hop_length=n // 4, window=getattr(self, f"window_{n}"),
                          center=True, pad_mode="constant", return_complex=True)
        # sqrt with a floor inside: the gradient of |z| is undefined at z = 0
        return torch.sqrt(spec.real.square() + spec.imag.square() + _MAG_FLOOR ** 2)

    def terms(self, y_hat: Tensor, y: Tensor) -> SpectralTerms:
        """Per-example terms for `y_hat`, `y` of shape `(batch, 1, time)` or `(batch, time)`.

        Gradients flow into `y_hat` only: the target is detached and transformed on its own, so
        autograd records none of its spectra, which halves the backward pass of the loss (most of
        a CPU training step)."""
        if y_hat.shape != y.shape:
            raise ValueError(f"shape mismatch: prediction {tuple(y_hat.shape)} vs target {tuple(y.shape)}")
        batch = y.shape[0]
        y_hat = y_hat.reshape(batch, -1).float()
        y = y.reshape(batch, -1).float().detach()
        err, ref, floors, lm, mel = [], [], [], [], []
        for n in self.fft_sizes:
            pred, true = self._magnitude(y_hat, n), self._magnitude(y, n)
            if self.band_limited:
                true = (true * getattr(self, f"band_{n}")).clamp(min=_MAG_FLOOR)
            if n in self.stft_sizes:
                err.append((true - pred).square().sum(dim=(1, 2)))
                window = getattr(self, f"window_{n}")
                floors.append(REFERENCE_FLOOR_RMS ** 2 * window.square().sum() * true.shape[1] * true.shape[2])
                ref.append(true.square().sum(dim=(1, 2)))
                lm.append((torch.log(true) - torch.log(pred)).abs().mean(dim=(1, 2)))
            if n in self.mel_sizes:
                fb = getattr(self, f"mel_{n}")
                mel_pred = torch.log(torch.matmul(fb, pred).clamp(min=_MAG_FLOOR))
                mel_true = torch.log(torch.matmul(fb, true).clamp(min=_MAG_FLOOR))
                mel.append((mel_true - mel_pred).abs().mean(dim=(1, 2)))
        zero = y.new_zeros(1, batch)
        return SpectralTerms(
            error_energy=torch.stack(err) if err else zero,
            target_energy=torch.stack(ref) if ref else zero + 1.0,
            floor_energy=torch.stack(floors)[:, None] if floors else zero[:, :1] + 1.0,
            log_magnitude=torch.stack(lm).mean(0) if lm else zero[0],
            log_mel=torch.stack(mel).mean(0) if mel else None,
        )


def mrstft_distance(y_hat: Tensor, y: Tensor,
                    fft_sizes: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)) -> Tensor:
    """The evaluation distance (spectral convergence + log magnitude, FFT 64..4096), `(batch,)`."""
    module = MultiResolutionSpectralLoss(fft_sizes).to(y.device)
    with torch.no_grad():
        return module.terms(y_hat, y).distance()


def kl_per_dim(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) of each latent dimension in nats per frame, `(latent,)`.

    `mean`, `logvar`: `(batch, latent, frames)`; averaged over batch and frames.
    """
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.mean(dim=(0, 2))


def free_bits_kl(kl_dims: Tensor, free_bits: float) -> Tensor:
    """Sum over dimensions of max(KL_d, free_bits): a dimension below its free allowance gets no
    pressure toward the prior, so the encoder can afford to use every dimension a little."""
    return torch.clamp(kl_dims, min=free_bits).sum()


def kl_beta(progress: float, start: float, target: float, warmup: float) -> float:
    """KL weight ramped on a log scale from `start` to `target` over the first `warmup` of the run.

    `progress` and `warmup` are fractions of the run in [0, 1]; with warmup 0 the weight is
    `target` from the first step.
    """
    if warmup <= 0 or progress >= warmup:
        return target
    t = max(progress, 0.0) / warmup
    return math.exp(math.log(start) + t * (math.log(target) - math.log(start)))


def collapsed_dims(kl_dims: Tensor, threshold: float) -> list[int]:
    """Indices of latent dimensions whose KL (nats per frame) is below `threshold`: they carry
    (almost) no information and the decoder ignores them."""
    return [i for i, v in enumerate(kl_dims.tolist()) if v < threshold]
