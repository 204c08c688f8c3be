"""The engine through its public interface, rendering offline (the same code as live)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support.nnmodels import build_frame_probe, build_toy_model
from synthd import dsp
from synthd.engine import Engine, channel_map
from synthd.model import load_model

SR = 48000
HOP = 256


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "probe": build_frame_probe(d / "probe.ts"),
        "probe2": build_frame_probe(d / "probe2.ts", channels=2),
        "toy": build_toy_model(d / "toy.ts"),
        "toy44": build_toy_model(d / "toy44.ts", sample_rate=44100),
        "rave": build_toy_model(d / "rave.ts", with_metadata=False),
    }


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_render_shape_and_mono_feeds_every_channel(models):
    engine = Engine(load_model(models["toy"]), channels=3)
    out = engine.render(4800)
    assert out.shape == (4800, 3) and out.dtype == np.float32
    assert rms(out) > 0.05
    assert np.array_equal(out[:, 0], out[:, 1]) and np.array_equal(out[:, 0], out[:, 2])
    assert engine.clock == 4800


def test_channel_map_rules():
    assert np.array_equal(channel_map(2, 2), np.eye(2))
    assert np.array_equal(channel_map(2, 4), np.array([[1, 0, 1, 0], [0, 1, 0, 1]]))
    assert np.array_equal(channel_map(2, 1), np.array([[0.5], [0.5]]))


def test_stereo_model_keeps_its_channels(models):
    engine = Engine(load_model(models["probe2"]), channels=2)
    engine.set_latent(0, 0.8)
    out = engine.render(HOP * 4)
    assert np.abs(out[-1, 0]) == pytest.approx(0.4, rel=1e-3)
    assert np.abs(out[-1, 1]) == pytest.approx(0.2, rel=1e-3)


def test_glide_ramps_latent_across_frames(models):
    engine = Engine(load_model(models["probe"]), channels=1)
    engine.set_latent(0, 1.0, glide_s=4 * HOP / SR)
    out = engine.render(HOP * 6)
    levels = np.abs(out[HOP // 2::HOP, 0]) / 0.5
    np.testing.assert_allclose(levels, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rtol=1e-3)


def test_latent_event_lands_on_the_frame_containing_it(models):
    engine = Engine(load_model(models["probe"]), channels=1)
    engine.set_latent(0, 0.8, at=3 * HOP + 10)
    levels = np.abs(engine.render(HOP * 6)[HOP // 2::HOP, 0]) / 0.5
    np.testing.assert_allclose(levels, [0, 0, 0, 0.8, 0.8, 0.8], atol=1e-3)


def test_gain_event_is_sample_accurate_and_ramped(models):
    engine = Engine(load_model(models["probe"]), channels=1)
    engine.set_latent(0, 1.0)
    engine.set_gain_db(-20.0, at=5000)
    out = np.abs(engine.render(8000)[:, 0])
    assert out[4990:5000].min() == pytest.approx(0.5, rel=1e-3)  # untouched before 5000
    ramp = out[5000:5480]
    assert np.all(np.diff(ramp) <= 1e-6) and ramp[0] > 0.49  # a 10 ms glide, not a step
    assert out[5480:].max() == pytest.approx(0.05, rel=1e-3)
    assert engine.stats()["gain_db"] == -20.0


def test_deferred_output_stage_gives_the_same_samples(models):
    """Live, the output stage runs after the ring, in the audio callback: rendering with it
    deferred and running it on each block afterwards gives what one staged render gives."""
    def play(deferred: bool) -> np.ndarray:
        engine = Engine(load_model(models["toy"]), channels=2, block_frames=256, gate_open=False)
        engine.stage_deferred = deferred
        engine.set_gate(True, velocity=0.8, attack_s=0.004, at=700)
        engine.set_gain_db(+12.0, at=3000)  # into the limiter
        engine.set_latent(1, 2.0, at=2000)
        blocks = [engine.render(256) for _ in range(24)]
        if deferred:
            assert np.abs(np.concatenate(blocks)[:700]).max() > 0.0  # the gate is not applied yet
            blocks = [engine.stage.process(b) for b in blocks]
        return np.concatenate(blocks)

    staged, deferred = play(False), play(True)
    assert np.abs(staged).max() <= 1.0 and np.abs(staged[:700]).max() == 0.0
    np.testing.assert_allclose(deferred, staged, atol=1e-6)


def test_gate_envelope_with_velocity(models):
    engine = Engine(load_model(models["probe"]), channels=1, gate_open=False)
    engine.set_latent(0, 1.0)
    assert np.abs(engine.render(2048)).max() == 0.0
    engine.set_gate(True, velocity=0.5, attack_s=0.01)
    out = np.abs(engine.render(2048)[:, 0])
    assert 0.0 < out[100] < out[400] < 0.25
    assert out[500:].min() == pytest.approx(0.25, rel=1e-3)
    engine.set_gate(False, release_s=0.02)
    out = np.abs(engine.render(2048)[:, 0])
    assert out[0] > 0.24 and out[480] == pytest.approx(0.125, rel=0.02)
    assert out[970:].max() < 1e-6  # only the DC blocker's decaying tail


def test_nan_block_becomes_counted_silence_and_play_goes_on(models):
    engine = Engine(load_model(models["probe"]), channels=2)
    engine.set_latent(0, 1.0)
    engine.render(HOP * 4)
    engine.set_latent(1, 2.0)  # the probe's fault switch
    bad = engine.render(HOP * 4)
    assert np.isfinite(bad).all() and np.abs(bad[HOP:]).max() < 1e-3
    assert engine.stats()["nan_blocks"] >= 3
    engine.set_latent(1, 0.0)
    good = engine.render(HOP * 8)
    assert np.abs(good[-HOP:]).min() == pytest.approx(0.5, rel=1e-2)


def test_fast_knob_makes_no_clicks(models):
    """A control thrown about at 1 kHz changes the sound without steps in the waveform."""
    steady = Engine(load_model(models["toy"]), channels=1)
    steady.set_latent(1, 2.0)
    reference = np.abs(np.diff(steady.render(SR // 2)[:, 0])).max()
    engine = Engine(load_model(models["toy"]), channels=1)
    rng = np.random.default_rng(0)
    chunks = []
    for _ in range(500):  # 0.5 s, one message per millisecond, full-range jumps
        engine.set_latent(1, float(rng.choice([-2.0, 2.0])))
        chunks.append(engine.render(48))
    out = np.concatenate(chunks)[:, 0]
    assert rms(out) > 0.02
    assert np.abs(np.diff(out)).max() <= 1.05 * reference


def test_render_is_deterministic_and_chunk_independent(models):
    def perform(chunk: int) -> np.ndarray:
        engine = Engine(load_model(models["toy"]), channels=2)
        engine.set_latent(0, 1.0, glide_s=0.05, at=1000)
        engine.set_gain_db(-6.0, at=7000)
        engine.set_gate(False, release_s=0.01, at=15000)
        engine.set_gate(True, at=18000)
        return np.concatenate([engine.render(chunk) for _ in range(24576 // chunk)])

    a = perform(256)
    assert np.array_equal(a, perform(256))
    np.testing.assert_allclose(a, perform(1024), atol=1e-6)
    np.testing.assert_allclose(a, perform(64), atol=1e-6)


def test_swap_crossfades_without_a_gap(models):
    engine = Engine(load_model(models["probe"]), channels=1)
    engine.set_latent(0, 1.0)
    engine.render(HOP * 4)
    engine.swap_model(load_model(models["toy"]), crossfade_s=0.05)
    assert engine.model.name == "toy"
    out = engine.render(SR // 5)[:, 0]
    assert engine.stats()["models_sounding"] == 1
    # the probe fades out while the toy fades in: no silent stretch anywhere
    envelope = np.array([np.abs(out[i:i + 128]).max() for i in range(0, 2400, 128)])
    assert envelope.min() > 0.1
    assert np.abs(out[HOP:HOP + 64]).max() > 0.4  # still mostly the probe early on
    assert rms(out[-4800:]) == pytest.approx(0.0988, rel=0.02)  # the toy alone at the end


def test_swap_carries_values_by_label_and_resets_others(models):
    engine = Engine(load_model(models["toy"]), channels=1)
    engine.set_latent(0, 1.5)
    engine.set_latent(3, -1.0)
    engine.swap_model(load_model(models["toy"]))
    np.testing.assert_allclose(engine.latents(), [1.5, 0.0, 0.0, -1.0])
    engine.swap_model(load_model(models["rave"]))
    np.testing.assert_allclose(engine.latents(), [0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="outside 0..3"):
        engine.set_latent(4, 0.0)


def test_other_rate_model_is_resampled_to_the_right_pitch(models):
    engine = Engine(load_model(models["toy"]), channels=1)
    engine.swap_model(load_model(models["toy44"]), crossfade_s=0.01)
    engine.render(SR // 10)
    out = engine.render(SR)[:, 0]
    assert engine.sample_rate == SR
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    assert np.argmax(spectrum) * SR / len(out) == pytest.approx(220.0, abs=1.0)


def test_invalid_values_are_refused(models):
    engine = Engine(load_model(models["toy"]), channels=1)
    with pytest.raises(ValueError):
        engine.set_latent(0, float("nan"))
    with pytest.raises(ValueError):
        engine.set_latent(-1, 0.0)
    with pytest.raises(ValueError):
        engine.set_gain_db(float("nan"))


def test_stats_report_render_load(models):
    engine = Engine(load_model(models["toy"]), channels=2)
    for _ in range(20):
        engine.render(256)
    stats = engine.stats()
    assert stats["render_calls"] == 20 and stats["sample_rate"] == SR and stats["block_frames"] == 256
    assert 0 < stats["render_load_mean"] <= stats["render_load_peak"]
    assert 0 < stats["render_ms_mean"] <= stats["render_ms_max"]
    assert stats["nan_blocks"] == 0 and stats["underruns"] == 0
    assert stats["latency_ms"] == pytest.approx(1000 * 256 / SR)


def test_dc_blocker_is_block_exact_and_removes_dc():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5000, 2)) * 0.1 + 0.5
    whole = dsp.DCBlocker(2, SR).process(x)
    blocker = dsp.DCBlocker(2, SR)
    parts = np.concatenate([blocker.process(x[i:i + 300]) for i in range(0, 5000, 300)])
    np.testing.assert_allclose(parts, whole, atol=1e-12)
    settled = dsp.DCBlocker(1, SR).process(np.full((SR, 1), 0.5))
    assert abs(settled[-1, 0]) < 1e-3


def test_soft_limiter_is_transparent_below_threshold_and_bounded():
    x = np.linspace(-4, 4, 10001)
    y = dsp.soft_limit(x)
    quiet = np.abs(x) <= 0.8
    assert np.array_equal(y[quiet], x[quiet])
    assert np.abs(y).max() <= 1.0
    assert np.all(np.diff(y) >= 0)  # monotonic: peaks bend, never fold back


def test_ramp_reaches_target_exactly():
    ramp = dsp.Ramp(0.0)
    ramp.set(1.0, 10)
    values = np.concatenate([ramp.process(4), ramp.process(4), ramp.process(4)])
    np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10)
    assert values[-1] == 1.0 and not ramp.moving
