"""Losses: known values on signals whose spectra we can reason about."""

import math

import pytest
import torch

from training.losses import (MultiResolutionSpectralLoss, collapsed_dims, free_bits_kl, kl_beta,
                             kl_per_dim, mel_filterbank, mrstft_distance)

torch.set_num_threads(1)


def _signal(seconds: float = 0.25, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(48000 * seconds)) / 48000
    tone = torch.sin(2 * math.pi * 440 * t) * torch.exp(-t * 8)
    return (tone + 0.05 * torch.randn(t.shape, generator=g)).reshape(1, 1, -1)


def test_distance_is_zero_for_identical_and_known_for_a_gain():
    y = _signal()
    assert float(mrstft_distance(y, y)) == pytest.approx(0.0, abs=1e-6)
    terms = MultiResolutionSpectralLoss().terms(2 * y, y)
    # |2Y - Y| / |Y| = 1 and |log 2Y - log Y| = log 2 wherever the floor is negligible
    assert float(terms.spectral_convergence) == pytest.approx(1.0, rel=1e-3)
    assert float(terms.log_magnitude) == pytest.approx(math.log(2), rel=0.02)


def test_distance_grows_with_the_error_and_is_per_example():
    y = _signal().repeat(3, 1, 1)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    d = mrstft_distance(y + noise * torch.tensor([0.001, 0.01, 0.1]).reshape(3, 1, 1), y)
    assert d.shape == (3,)
    assert d[0] < d[1] < d[2]


def test_mel_term_and_gradients_are_finite_on_silence():
    loss = MultiResolutionSpectralLoss(fft_sizes=(64, 512), mel_fft_sizes=(512, 2048), n_mels=64)
    y_hat = torch.zeros(2, 1, 4800, requires_grad=True)
    terms = loss.terms(y_hat, torch.zeros(2, 1, 4800))
    total = (terms.distance() + terms.log_mel).sum()
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(y_hat.grad).all()
    with pytest.raises(ValueError, match="shape mismatch"):
        loss.terms(torch.zeros(1, 1, 10), torch.zeros(1, 1, 11))


def test_mel_filterbank_has_no_empty_band():
    fb = mel_filterbank(64, 16, 48000)
    assert fb.shape == (16, 33)
    assert torch.allclose(fb.sum(dim=1), torch.ones(16))


def test_kl_free_bits_beta_ramp_and_collapse():
    mean = torch.zeros(4, 3, 10)
    mean[:, 1] = 2.0  # KL = 0.5 * mean^2 = 2 nats
    logvar = torch.zeros(4, 3, 10)
    kl = kl_per_dim(mean, logvar)
    assert torch.allclose(kl, torch.tensor([0.0, 2.0, 0.0]))
    assert float(free_bits_kl(kl, 0.5)) == pytest.approx(3.0)
    assert collapsed_dims(kl, 0.01) == [0, 2]
    assert kl_beta(0.0, 1e-6, 1e-2, 0.5) == pytest.approx(1e-6)
    assert kl_beta(0.25, 1e-6, 1e-2, 0.5) == pytest.approx(1e-4)  # log-scale midpoint
    assert kl_beta(0.9, 1e-6, 1e-2, 0.5) == 1e-2


def test_a_band_limited_loss_asks_nothing_above_the_limit():
    """A tone of the target above the decoder's band limit costs (almost) nothing when the
    prediction lacks it; the same tone below the limit still counts, and so does the tone above
    for the plain loss. The rest of the target is noise up to 18 kHz, so no bin is empty."""
    noise = torch.randn(48000, generator=torch.Generator().manual_seed(0)) * 0.1
    spectrum = torch.fft.rfft(noise)
    spectrum[torch.fft.rfftfreq(48000, 1 / 48000) > 18000] = 0
    base = torch.fft.irfft(spectrum, 48000)
    t = torch.arange(48000) / 48000
    above = base + 0.1 * torch.sin(2 * torch.pi * 21500 * t)
    below = base + 0.1 * torch.sin(2 * torch.pi * 12000 * t)
    limited = MultiResolutionSpectralLoss((256, 1024, 4096), band_limit=(19672.0, 1000.0))
    plain = MultiResolutionSpectralLoss((256, 1024, 4096))

    def cost(loss, target):
        """What leaving the tone out of `target` costs, over a perfect prediction of the rest."""
        def distance(t):
            return float(loss.terms(base.view(1, 1, -1), t.view(1, 1, -1)).distance()[0])
        return distance(target) - distance(base)

    assert cost(limited, above) < 0.15  # the tone's edges leak a little below the limit
    assert cost(limited, below) > 0.5
    assert cost(plain, above) > 1.0
