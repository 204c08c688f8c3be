"""The causal VAE, its signal maths and the control space: tiny configs, CPU, no training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training import spectral_ops
from training.aliasing import energy_above_db
from training.control_space import ControlSpace, ControlSpec, pca_space
from training.model import VAE, ModelConfig

torch.set_num_threads(1)

TINY = dict(latent_size=4, encoder_dim=16, encoder_blocks=1, decoder_dim=24, decoder_blocks=2,
            decoder_dilations=[1, 3], noise_bands=8)


def tiny(**overrides) -> VAE:
    torch.manual_seed(0)
    return VAE(ModelConfig(**{**TINY, **overrides})).eval()


def moving_condition(batch: int, frames: int) -> torch.Tensor:
    """Pitch (a glide from 40 to 90, then a jump down an octave) and voicing (0.2 .. 1), `(batch, 2, frames)`."""
    pitch = torch.linspace(40.0, 90.0, frames)
    pitch[frames * 2 // 3:] -= 12.0
    voicing = 0.6 + 0.4 * torch.sin(torch.arange(frames) / 3.0)
    return torch.stack([pitch, voicing]).expand(batch, 2, frames).clone()


def stream(model: VAE, z: torch.Tensor, size: int, condition: torch.Tensor) -> torch.Tensor:
    state = model.decoder.initial_state(z.shape[0])
    parts = []
    for i in range(0, z.shape[2], size):
        audio, state = model.decoder.step(z[:, :, i:i + size], state, condition[:, :, i:i + size])
        parts.append(audio)
    return torch.cat(parts, dim=2)


def test_shapes_and_posterior():
    model = tiny()
    x = 0.1 * torch.randn(3, 1, 256 * 20 + 100)
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (3, 4, 20)
    assert model.decode(mean).shape == (3, 1, 20 * 256)
    y, m2, _ = model(x)
    assert y.shape == (3, 1, 20 * 256) and torch.equal(m2, mean)
    # in eval mode forward decodes the mean: deterministic
    assert torch.equal(model(x)[0], y)
    # logvar is clamped, so the posterior scale stays finite on any input
    _, lv = model.encode(1e4 * torch.randn(1, 1, 256 * 8))
    assert lv.min() >= model.cfg.logvar_min and lv.max() <= model.cfg.logvar_max


def test_decoder_is_causal():
    model = tiny()
    z = torch.randn(1, 4, 30)
    with torch.no_grad():
        base = model.decode(z)
        for k in (0, 7, 29):
            changed = z.clone()
            changed[:, :, k:] += 2.0
            out = model.decode(changed)
            assert torch.equal(out[..., : k * 256], base[..., : k * 256]), f"frame {k} changed earlier output"
            assert not torch.allclose(out[..., k * 256:], base[..., k * 256:]), f"frame {k} changed nothing"


@pytest.mark.parametrize("causal, n_fft, ahead", [(True, 768, 2), (True, 1024, 3), (False, 768, 2 + 2 * 2)])
def test_encoder_reads_exactly_its_look_ahead(causal, n_fft, ahead):
    """Frame t of the encoder depends on samples before (t + 1 + lookahead) * hop and on the last
    of them: the look-ahead the model file states is the one it has (2 frames by default, its
    analysis window's, as the pitch tracker's; 3 with a window of 1024; centred blocks add
    kernel // 2 each)."""
    model = tiny(encoder_blocks=2, encoder_causal=causal, n_fft=n_fft)
    assert model.encoder.lookahead_frames == ahead
    x = torch.randn(1, 1, 256 * 24)
    t = 10
    with torch.no_grad():
        base = model.encode(x)[0]
        later = x.clone()
        later[..., (t + 1 + ahead) * 256:] += 1.0
        assert torch.equal(model.encode(later)[0][..., :t + 1], base[..., :t + 1])
        last = x.clone()
        last[..., (t + 1 + ahead) * 256 - 64:(t + 1 + ahead) * 256] += 1.0  # the window's tail
        assert not torch.equal(model.encode(last)[0][..., t], base[..., t])


def test_a_checkpoint_from_before_causal_encoders_keeps_its_centred_blocks():
    from training.config import checkpoint_config

    old = checkpoint_config({"model": {"harmonics": 64}}, "old.pt")
    assert old.model.encoder_causal is False
    assert checkpoint_config({"model": {"encoder_causal": True}}, "new.pt").model.encoder_causal is True
    assert ModelConfig().encoder_causal is True


def test_latency_matches_the_reach_of_one_frame():
    model = tiny()
    assert model.latency_samples == ModelConfig().n_fft - ModelConfig().hop == 512
    z = torch.randn(1, 4, 40)
    changed = z.clone()
    changed[:, :, 10] += 3.0  # one frame only; the decoder's convolutions spread it over later frames
    with torch.no_grad():
        diff = (model.decode(changed) - model.decode(z)).abs()[0, 0]
    first = int(torch.nonzero(diff > 1e-7)[0])
    assert 10 * 256 <= first < 11 * 256


@pytest.mark.parametrize("harmonics", [16, 0])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_streaming_equals_whole_decoding(size, harmonics):
    model = tiny(decoder_dilations=[1, 4], harmonics=harmonics)  # a cache (16 frames) longer than every chunk
    with torch.no_grad():  # a harmonic part as loud as the residual
        if harmonics:
            model.decoder.harmonic.proj.bias.zero_()
    z = torch.randn(2, 4, 37)
    condition = moving_condition(2, 37)[:, :model.cfg.conditioning]
    with torch.no_grad():
        whole = model.decode(z, condition)
        chunked = stream(model, z, size, condition)
    # the running phase agrees to float64 rounding; each partial's phase k * phase is taken in
    # float32, whose last bit at 2 pi, times k, is a few millionths of the peak
    tolerance = 2e-5 if harmonics else 1e-6
    torch.testing.assert_close(chunked, whole, rtol=0, atol=tolerance * float(whole.abs().max()))


def test_a_pitch_change_reaches_the_output_within_one_hop_of_its_frame():
    model = tiny()
    with torch.no_grad():
        model.decoder.harmonic.proj.bias.zero_()
    z = torch.zeros(1, 4, 40)
    condition = moving_condition(1, 40)
    changed = condition.clone()
    changed[:, 0, 10:] += 7.0
    with torch.no_grad():
        diff = (model.decode(z, changed) - model.decode(z, condition)).abs()[0, 0]
    first = int(torch.nonzero(diff > 1e-6)[0])
    # frame 10's pitch is glided to across output block 10 (one hop), never earlier
    assert 10 * 256 <= first < 10 * 256 + 16
    assert float(diff[10 * 256:11 * 256].max()) > 0.01


def test_folded_decoder_gives_the_same_audio_and_leaves_the_original_alone():
    model = tiny()
    with torch.no_grad():  # scales away from their initial values, as after training
        for block in model.decoder.blocks:
            block.gamma.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    folded = model.decoder.folded()
    assert all(b.gamma_folded for b in folded.blocks) and folded.head.gain_folded
    z = torch.randn(1, 4, 23)
    condition = moving_condition(1, 23)
    with torch.no_grad():
        whole = model.decoder(z, condition)
        scripted = torch.jit.script(folded)
        state = folded.initial_state(1)
        parts = []
        for i in range(z.shape[2]):
            audio, state = scripted.step(z[:, :, i:i + 1], state, condition[:, :, i:i + 1])
            parts.append(audio)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-5 * float(whole.abs().max()))
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in before.items())
    assert not any(b.gamma_folded for b in model.decoder.blocks) and not model.decoder.head.gain_folded


def test_training_mode_varies_the_noise_but_eval_is_deterministic():
    model = tiny()
    z = torch.randn(1, 4, 12)
    with torch.no_grad():
        assert torch.equal(model.decode(z), model.decode(z))
        model.train()
        torch.manual_seed(1)
        a = model.decode(z)
        torch.manual_seed(2)
        b = model.decode(z)
    assert not torch.equal(a, b)
    without = tiny(noise_branch=False)
    assert without.decoder.head.proj.out_features == 3 * without.decoder.head.bins  # magnitude, phase deviation, offset


def test_default_decoder_is_band_limited_and_bounded():
    model = VAE(ModelConfig()).eval()
    with torch.no_grad():
        walk = torch.cumsum(0.3 * torch.randn(1, 16, 300), dim=2)
        audio = model.decode(walk)[0, 0].numpy()
        # untrained: at the float32 floor above the band edge
        assert energy_above_db(audio, cutoff=model.cfg.max_frequency) < -130.0
        for value in (10.0, -10.0):
            loud = model.decode(torch.full((1, 16, 100), value))
            assert torch.isfinite(loud).all()
            # each frame's RMS is at most max_frame_rms; four overlapping frames, window <= 1/3
            assert float(loud.square().mean().sqrt()) <= 4 / 3 * model.cfg.max_frame_rms
            assert float(loud.abs().max()) <= 16.0


def test_head_output_calibration():
    """A bin of magnitude m gives a sinusoid of amplitude m (the level the init is set by)."""
    cfg = ModelConfig()
    window = spectral_ops.synthesis_window(spectral_ops.squared_hann_window(cfg.n_fft), cfg.hop)
    k = 64
    spec = torch.zeros(1, 20, 420, dtype=torch.complex64)
    spec[:, :, k] = torch.polar(torch.full((1, 20), 0.5), 2 * math.pi * k * cfg.hop / cfg.n_fft * torch.arange(20.0))
    frames = torch.fft.irfft(spec, n=cfg.n_fft, dim=-1, norm="forward") * window
    out, _ = spectral_ops.overlap_add(frames, torch.zeros(1, cfg.n_fft - cfg.hop), cfg.hop)
    steady = out[0, cfg.n_fft:]
    assert abs(float(steady.abs().max()) - 0.5) < 1e-3


@pytest.mark.parametrize("count", [1, 5])
def test_overlap_add_matches_a_direct_sum(count):
    frames = torch.randn(2, count, 16)
    tail = torch.randn(2, 12)
    kept = frames.clone(), tail.clone()
    out, new_tail = spectral_ops.overlap_add(frames, tail, 4)
    full = torch.zeros(2, count * 4 + 12)
    full[:, :12] += tail
    for t in range(count):
        full[:, t * 4:t * 4 + 16] += frames[:, t]
    torch.testing.assert_close(out, full[:, :count * 4])
    torch.testing.assert_close(new_tail, full[:, count * 4:])
    # the inputs are state the caller keeps: never written to
    assert torch.equal(frames, kept[0]) and torch.equal(tail, kept[1])


def test_windows_and_band_limit():
    assert spectral_ops.overlap_add_gain(spectral_ops.squared_hann_window(1024), 256) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="does not overlap-add"):
        spectral_ops.overlap_add_gain(spectral_ops.squared_hann_window(1024), 512)
    mask = spectral_ops.band_limit_mask(1024, 48000, 20000.0, 1000.0)
    bin_hz = 48000 / 1024
    assert mask[0] == 0 and mask[1] == 1
    assert (mask.numel() - 1) * bin_hz <= 20000.0 - 7 * bin_hz
    assert torch.all(mask[1:-1] >= mask[2:])  # falls monotonically
    with pytest.raises(ValueError, match="max_frequency"):
        spectral_ops.band_limit_mask(1024, 48000, 30000.0, 1000.0)
    for name in ("max_frequency", "harmonic_max_frequency"):
        with pytest.raises(ValueError, match=f"model.{name} .* at most at Nyquist"):
            ModelConfig(sample_rate=44100, **{name: 23000.0})
    # a 44.1 kHz model keeps the default edges: both under its Nyquist
    assert ModelConfig(sample_rate=44100).max_frequency < 22050


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="n_fft"):
        ModelConfig(n_fft=1000)
    with pytest.raises(ValueError, match="decoder_dilations"):
        ModelConfig(decoder_blocks=3)
    with pytest.raises(ValueError, match="latent_size"):
        ModelConfig(latent_size=0)
    with pytest.raises(ValueError, match="unknown model config key.*latent_dim"):
        ModelConfig.from_dict({"latent_dim": 8})
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()


def test_pca_space_orders_by_variance_and_inverts():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 3)) * [0.1, 3.0, 1.0] + [1.0, -2.0, 0.5]
    space = pca_space(z)
    assert [c.label for c in space.controls] == ["timbre_1", "timbre_2", "timbre_3"]
    u = space.from_latent(z)
    variances = u.var(axis=0)
    assert variances[0] > variances[1] > variances[2]
    np.testing.assert_allclose(space.to_latent(u), z, atol=1e-5)
    for j, c in enumerate(space.controls):
        assert c.minimum == pytest.approx(np.percentile(u[:, j], 2), abs=1e-4)
        assert c.maximum == pytest.approx(np.percentile(u[:, j], 98), abs=1e-4)
        assert c.default == pytest.approx(np.median(u[:, j]), abs=1e-4)
    # a direction the data never moves along stays playable
    flat = pca_space(np.column_stack([rng.normal(size=500), np.zeros(500)]))
    assert flat.controls[1].maximum - flat.controls[1].minimum == pytest.approx(1.0)


def test_control_space_validation():
    spec = ControlSpec("a", -1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="used twice"):
        ControlSpace(np.zeros(2), np.eye(2), [spec, spec]).validate()
    with pytest.raises(ValueError, match="lowercase"):
        ControlSpace(np.zeros(1), np.eye(1), [ControlSpec("Bright ness", -1, 1, 0)]).validate()
    with pytest.raises(ValueError, match="invertible"):
        ControlSpace(np.zeros(2), np.ones((2, 2)), [spec, ControlSpec("b", -1, 1, 0)]).validate()
    with pytest.raises(ValueError, match="2 controls for a latent size of 3"):
        ControlSpace(np.zeros(3), np.eye(3), [spec, ControlSpec("b", -1, 1, 0)]).validate()
    with pytest.raises(ValueError, match="outside"):
        ControlSpace(np.zeros(1), np.eye(1), [ControlSpec("a", -1, 1, 2)]).validate()


@pytest.mark.parametrize("deviation", [0.0, math.pi / 4])
def test_running_phase_gives_a_steady_partial_at_the_predicted_frequency(deviation):
    """One bin with a constant phase deviation d per frame is a pure sinusoid at the bin frequency
    plus d / (2 pi hop) cycles per sample, continuous across frames and calls. (Off the bin
    centre a single bin loses a little level to the overlap and ripples at the frame rate: with
    three windows overlapping (768 / 256), -34 dB at 3/8 of a bin off, against -50 dB with four;
    neighbouring bins make it up.)"""
    cfg = ModelConfig(noise_branch=False, magnitude_gain=1.0, phase_gain=1.0)  # biases are the outputs
    head = VAE(cfg).decoder.head
    k, bins = 64, head.bins
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        head.proj.bias[:bins] = -30.0
        head.proj.bias[k] = math.log(0.5)
        head.proj.bias[bins + k] = 0.3  # a constant offset: must not matter for a steady partial
        head.proj.bias[2 * bins:3 * bins] = deviation
        phase, tail, index = torch.zeros(1, bins), torch.zeros(1, cfg.n_fft - cfg.hop), torch.zeros(1, dtype=torch.long)
        parts = []
        for frames in (5, 1, 3, 31):  # calls of several sizes: the phase carries over
            audio, phase, tail = head(torch.zeros(1, frames, cfg.decoder_dim), phase, tail, index)
            parts.append(audio)
    steady = torch.cat(parts, dim=1)[0, cfg.n_fft:].double().numpy()
    n = np.arange(len(steady))
    freq = (k / cfg.n_fft + deviation / (2 * math.pi * cfg.hop))  # cycles per sample
    basis = np.column_stack([np.cos(2 * math.pi * freq * n), np.sin(2 * math.pi * freq * n)])
    coef, *_ = np.linalg.lstsq(basis, steady, rcond=None)
    residual = steady - basis @ coef
    amplitude = np.hypot(*coef)
    assert amplitude == pytest.approx(0.5, rel=0.02 if deviation == 0 else 0.15)
    assert np.sqrt(np.mean(residual ** 2)) < (1e-4 if deviation == 0 else 0.025) * amplitude


def test_the_harmonic_sum_by_recurrence_equals_the_table_of_sines():
    """Training batches sum the partials by recurrence, streaming calls from a table of sines:
    the same sound either way (every partial at full level, pitch gliding over four octaves)."""
    model = tiny(harmonics=64)
    with torch.no_grad():
        model.decoder.harmonic.proj.bias.zero_()
    z = torch.randn(4, 4, 100)
    condition = moving_condition(4, 100)
    condition[:, 1] = 1.0
    head = model.decoder.harmonic
    assert 4 * 100 > head.recurrence_frames
    with torch.no_grad():
        by_recurrence = model.decode(z, condition)
        head.recurrence_frames = 10 ** 9
        by_table = model.decode(z, condition)
    torch.testing.assert_close(by_recurrence, by_table, rtol=0, atol=1e-4 * float(by_table.abs().max()))


@pytest.mark.parametrize("pitch, voicing, partials", [(96.0, 1.0, 9), (60.0, 0.2, 0)])
def test_the_table_of_sines_stops_at_the_highest_partial_that_sounds(pitch, voicing, partials):
    """A streaming call's table of sines leaves out the partials that are silent all through it
    (above the band limit at C7, 2093 Hz: the 10th is at 20.9 kHz; every one of an unvoiced frame):
    the sum is what the recurrence over all 64 partials gives, and an unvoiced call's harmonic part
    is exactly nothing."""
    model = tiny(harmonics=64)
    head = model.decoder.harmonic
    counted = []
    count = head.partials_sounding
    head.partials_sounding = lambda a_prev, a_next: counted.append(count(a_prev, a_next)) or counted[-1]
    with torch.no_grad():
        head.proj.bias.zero_()
        h = torch.randn(2, 3, model.cfg.decoder_dim)
        pitch_in, voicing_in = torch.full((2, 3), pitch), torch.full((2, 3), voicing)
        state = head.initial_state(2)
        head.recurrence_frames = 0
        by_recurrence = head(h, pitch_in, voicing_in, *state)[0]
        head.recurrence_frames = 10 ** 9
        by_table = head(h, pitch_in, voicing_in, *state)[0]
    assert counted == [partials]
    if voicing < 0.5:
        assert not by_table.any() and not by_recurrence.any()
    else:
        assert by_table.abs().max() > 0.1
        torch.testing.assert_close(by_table, by_recurrence, rtol=0, atol=1e-5)
