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
