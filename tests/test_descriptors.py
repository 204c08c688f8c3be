"""Descriptors against synthetic signals whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training import descriptors as D

SR = 48000
T = torch.arange(SR // 2, dtype=torch.float64) / SR


def sine(freq: float, amp: float = 1.0) -> torch.Tensor:
    return (amp * torch.sin(2 * math.pi * freq * T)).float()


def saw(freq: float) -> torch.Tensor:
    return sum(sine(freq * k, 0.5 / k) for k in range(1, 40) if freq * k < 20000)


def inner(x: torch.Tensor) -> torch.Tensor:
    """Frames away from the zero-padded ends."""
    return x[..., 12:-12]


def test_frame_count_matches_encoder_and_is_centred():
    x = torch.zeros(2, 1000)
    assert D.frames(x, 512, 256).shape == (2, 3, 512)
    # frame t is centred on t * hop + hop // 2: an impulse there sits in the window's middle
    x = torch.zeros(1, 4096)
    x[0, 5 * 256 + 128] = 1.0
    assert int(torch.argmax(D.frames(x, 512, 256)[0, 5])) == 256


@pytest.mark.parametrize("freq,weight_db", [(1000, 0.0), (100, -19.1), (4000, 1.0)])
def test_loudness_is_a_weighted_mean_square_db(freq, weight_db):
    level = inner(D.loudness(sine(freq, 0.5)))
    expected = 20 * math.log10(0.5) - 3.01 + weight_db
    assert float((level - expected).abs().max()) < 0.3


def test_loudness_scales_with_gain_and_reads_silence_as_floor():
    quiet, loud = D.loudness(sine(1000, 0.01)), D.loudness(sine(1000, 0.1))
    assert float((inner(loud - quiet) - 20.0).abs().max()) < 0.05
    assert float(D.loudness(torch.zeros(1, 4096)).max()) <= -119.0


def test_brightness_is_spectral_centroid():
    assert abs(float(inner(D.brightness(sine(1000))).mean()) - 1000) < 25
    # equal magnitudes at 500 and 2000 Hz: centroid at their mean
    assert abs(float(inner(D.brightness(sine(500) + sine(2000))).mean()) - 1250) < 30
    noise = torch.randn(SR // 2, generator=torch.Generator().manual_seed(1)) * 0.1
    assert abs(float(inner(D.brightness(noise)).mean()) - SR / 4) < 300  # flat spectrum: Nyquist / 2
    assert torch.isnan(D.brightness(torch.zeros(1, 4096))).all()


def test_noisiness_is_spectral_flatness():
    noise = torch.randn(SR // 2, generator=torch.Generator().manual_seed(2)) * 0.1
    # a periodogram of white noise is exponential per bin: geometric/arithmetic mean = e^-gamma
    assert abs(float(inner(D.noisiness(noise)).mean()) - math.exp(-0.5772)) < 0.03
    assert float(inner(D.noisiness(sine(440))).max()) < 1e-3
    assert float(inner(D.noisiness(saw(220))).max()) < 0.05


def test_noisiness_tells_noise_from_tone_whatever_the_bandwidth():
    """Noise of any colour reads noisy, a harmonic tone of any brightness tonal: flatness of the
    fine structure, not of the whole spectrum (which reads a dark noise as tonal as a sine)."""
    from scipy import signal

    white = torch.randn(SR // 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def filtered(kind: str, cutoff: float) -> torch.Tensor:
        sos = signal.butter(4, cutoff, kind, fs=SR, output="sos")
        return torch.from_numpy(signal.sosfilt(sos, white.numpy())).float()

    bright_noise, dark_noise = filtered("highpass", 8000.0), filtered("lowpass", 400.0)
    assert abs(float(inner(D.noisiness(bright_noise)).mean()) - math.exp(-0.5772)) < 0.03
    assert float(inner(D.noisiness(dark_noise)).mean()) > 0.4
    # a dark tone (few partials) and a bright one (39) both read tonal
    dull = sine(220) + sine(440, 0.5)
    assert float(inner(D.noisiness(dull)).max()) < 0.01 and float(inner(D.noisiness(saw(220))).max()) < 0.05
    # noise mixed into a tone raises it step by step
    tone = saw(220)
    mixes = [float(inner(D.noisiness(tone + k * tone.std() * white.float())).mean()) for k in (0.1, 1.0, 10.0)]
    assert mixes[0] < 0.02 < mixes[1] < 0.4 < mixes[2], mixes


@pytest.mark.parametrize("freq", [55.0, 110.0, 233.08, 440.0, 1000.0, 1900.0])
def test_pitch_of_harmonic_tone_within_five_cents(freq):
    f0, confidence = D.pitch(saw(freq))
    cents = 1200 * torch.log2(inner(f0) / freq)
    assert float(cents.abs().max()) < 5.0
    assert float(inner(confidence).min()) > 0.95


def test_pitch_of_pure_sine_and_confidence_on_noise():
    f0, confidence = D.pitch(sine(330.0))
    assert float((1200 * torch.log2(inner(f0) / 330.0)).abs().max()) < 5.0
    noise = torch.randn(SR // 2, generator=torch.Generator().manual_seed(3))
    _, noise_confidence = D.pitch(noise)
    assert float(inner(noise_confidence).mean()) < 0.4
    values = D.analysis_values(D.compute(noise))
    assert float(torch.isnan(inner(values["pitch"])).float().mean()) > 0.9  # unpitched for analysis


@pytest.mark.parametrize("ramp_s", [0.01, 0.1, 0.4])
def test_attack_is_ten_to_ninety_percent_rise_time(ramp_s):
    envelope = torch.clamp(T.float() / ramp_s, max=1.0)
    x = torch.cat([torch.zeros(4800), sine(1000) * envelope])
    rise = D.attack(x)[0]
    sounding = rise[~torch.isnan(rise)]
    assert sounding.numel() > 0
    assert float((sounding - 0.8 * ramp_s).abs().max()) < 0.002 + 0.02 * ramp_s
    assert torch.isnan(rise[:15]).all()  # the leading silence has no attack


def test_attack_tells_two_notes_apart():
    fast = sine(500) * torch.exp(-T.float() * 8)  # a pluck: instant rise, then a decay
    slow = sine(500) * torch.clamp(T.float() / 0.2, max=1.0)
    x = torch.cat([fast, slow])  # the slow note starts while the pluck still rings (-35 dB)
    rise = D.attack(x)[0].numpy()
    half = len(rise) // 2
    assert np.nanmedian(rise[5:half - 5]) < 0.005
    assert abs(np.nanmedian(rise[half + 5:]) - 0.16) < 0.01


def test_compute_is_batched_and_consistent():
    batch = torch.stack([sine(220, 0.3), saw(440), torch.zeros(SR // 2)])
    d = D.compute(batch[:, None])
    frames = (SR // 2) // 256
    for field in ("loudness", "brightness", "pitch", "pitch_confidence", "noisiness", "attack"):
        assert getattr(d, field).shape == (3, frames), field
    alone = D.compute(batch[1])
    assert torch.allclose(d.loudness[1], alone.loudness[0], atol=1e-4)
    assert float(d.pitch_confidence[2].max()) == 0.0
    values = D.analysis_values(d)
    assert set(values) == set(D.DESCRIPTOR_NAMES)
    assert torch.isnan(values["brightness"][2]).all()


def test_spectral_descriptors_are_differentiable():
    x = sine(440, 0.2).clone().requires_grad_(True)
    level, centroid, flatness = D.compute_spectral(x)
    (inner(level).mean() + inner(centroid).mean() * 1e-3 + inner(flatness).mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_attribute_regularization_rewards_ordered_dimension():
    g = torch.Generator().manual_seed(4)
    attr = torch.rand(4, 50, generator=g)
    ordered = torch.randn(4, 3, 50, generator=g)
    ordered[:, 1] = attr * 3.0
    shuffled = ordered.clone()
    shuffled[:, 1] = -attr * 3.0
    attrs = {"brightness": attr}
    good = D.attribute_regularization_loss(ordered, attrs, {"brightness": 1})
    bad = D.attribute_regularization_loss(shuffled, attrs, {"brightness": 1})
    assert float(good) < 0.3 < 1.5 < float(bad)
    z = ordered.clone().requires_grad_(True)
    attr_nan = attr.clone()
    attr_nan[0, :10] = float("nan")
    D.attribute_regularization_loss(z, {"brightness": attr_nan}, {"brightness": 1}).backward()
    assert torch.isfinite(z.grad).all() and float(z.grad[:, 1].abs().sum()) > 0
    with pytest.raises(KeyError, match="loudness"):
        D.attribute_regularization_loss(z, attrs, {"loudness": 0})


def test_attribute_targets_match_the_full_descriptors():
    batch = torch.stack([saw(220), sine(1000, 0.1)])[:, None]
    full = D.analysis_values(D.compute(batch))
    some = D.attribute_targets(batch, ["brightness", "pitch"])
    assert set(some) == {"brightness", "pitch"}
    for name, values in some.items():
        assert torch.allclose(values, full[name], equal_nan=True), name
    with pytest.raises(ValueError, match="timbre"):
        D.attribute_targets(batch, ["timbre"])
