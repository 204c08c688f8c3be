"""Pitch as an exact input: the tracker through `prepare`, and a model file's pitch input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from support.demo_model import synthd_train
from support.pitched_model import build_pitched_model, pitched_vae
from training.aliasing import energy_above_db, new_partials
from training.export import check_streaming
from training.pitch import PitchTracker, hz_to_midi, track_long

RATE = 48000
NOTES = (31, 45, 57, 69, 81, 93)  # G1 .. A6


def harmonic_note(midi: float, seconds: float = 1.5, partials: int = 12) -> np.ndarray:
    """A decaying tone with `partials` harmonics (1/k), band-limited below 20 kHz."""
    f0 = 440.0 * 2.0 ** ((midi - 69.0) / 12.0)
    t = np.arange(int(seconds * RATE)) / RATE
    x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, partials + 1) if k * f0 < 20000)
    return (0.3 * x * np.exp(-t / 1.5) * np.minimum(1.0, t / 0.01)).astype(np.float32)


def drum_hit(seconds: float = 0.6) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(3).normal(size=len(t))
    return (0.5 * noise * np.exp(-t / 0.08)).astype(np.float32)


def glide(seconds: float = 2.0, low: float = 110.0, high: float = 880.0) -> tuple[np.ndarray, np.ndarray]:
    """A harmonic glide low -> high (exponential), and its frequency at every sample."""
    t = np.arange(int(seconds * RATE)) / RATE
    f = low * (high / low) ** (t / seconds)
    phase = 2 * np.pi * np.cumsum(f) / RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 6))
    return (0.3 * x).astype(np.float32), f


def midi_at_frames(f: np.ndarray, hop: int = 256) -> np.ndarray:
    """The pitch (MIDI) at sample (t + 1) * hop of a per-sample frequency: the tracker's frame times."""
    frames = len(f) // hop
    return 69.0 + 12.0 * np.log2(f[(np.arange(frames) + 1) * hop - 1] / 440.0)


def test_prepare_tracks_notes_and_glides_in_cents_and_reads_drums_unvoiced(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in NOTES:
        sf.write(src / f"note_{n}.wav", harmonic_note(n), RATE, subtype="PCM_24")
    x, f = glide()
    sf.write(src / "glide.wav", x, RATE, subtype="FLOAT")
    sf.write(src / "hit.wav", drum_hit(), RATE, subtype="PCM_24")
    out = tmp_path / "prepared"
    report = synthd_train("prepare", str(src), str(out)).stdout
    assert "mostly voiced" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["pitch"]["estimator"].startswith("yin")
    files = {e["source"]: e for e in manifest["files"]}
    for n in NOTES:
        e = files[f"note_{n}.wav"]
        condition = np.load(out / e["condition"])
        voiced = condition[1] > 0.5
        assert e["voiced_share"] > 0.9
        # within a few cents on every voiced frame but the first and last few (the tracker's
        # parabolic interpolation reads A6, a lag of 27 samples, 2.4 cents sharp)
        assert np.abs(condition[0][voiced][3:-3] - n).max() * 100 < 4.0, n
        assert abs(e["median_pitch"] - n) * 100 < 3.0, n
    e = files["glide.wav"]
    condition = np.load(out / e["condition"])
    error = np.abs(condition[0] - midi_at_frames(f))[5:-5] * 100
    assert np.median(error) < 5.0 and error.max() < 20.0
    hit = files["hit.wav"]
    assert hit["voiced_share"] < 0.1 and hit["median_pitch"] is None


def test_tracker_in_chunks_equals_one_call_and_fills_gaps():
    tracker = PitchTracker()
    x = torch.from_numpy(np.concatenate([harmonic_note(57, 0.5), np.zeros(RATE // 4, np.float32),
                                         harmonic_note(64, 0.5), drum_hit(0.3)]))
    whole = tracker(x[None, None])[0]
    assert torch.allclose(track_long(tracker, x, chunk_frames=7), whole, atol=1e-4)
    pitch, voicing = whole
    silent = slice(int(0.55 * RATE) // 256, int(0.7 * RATE) // 256)
    # the gap is silent (voicing 0) and holds the last voiced pitch, so a phase keeps its speed
    assert voicing[silent].max() == 0.0
    assert torch.allclose(pitch[silent], torch.full_like(pitch[silent], 57.0), atol=0.05)
    assert torch.isfinite(whole).all() and 0.0 <= float(pitch.min()) and float(pitch.max()) <= 127.0


def test_tracker_reads_two_frames_ahead_and_no_more():
    """Frame t's pitch depends on samples up to (t + 3) * hop (its window's second half; the
    octave check reads no later frame) and on none after: live input reaches the output 2 frames
    after it arrives, as the model file says."""
    tracker = PitchTracker()
    assert tracker.lookahead_frames == 2
    a, b = harmonic_note(57, 1.0), harmonic_note(64, 1.0)
    t = 100
    cut = (t + 1 + tracker.lookahead_frames) * 256
    base = tracker(torch.from_numpy(a)[None, None])[0]
    switched = tracker(torch.from_numpy(np.concatenate([a[:cut], b[cut:]]))[None, None])[0]
    assert torch.equal(switched[:, :t + 1], base[:, :t + 1])
    # the new note is read from its first whole window on
    assert abs(float(switched[0, t + 6]) - 64.0) < 0.1


def test_octave_check_fixes_an_octave_error_and_reads_new_notes_without_look_ahead():
    """An isolated octave error within a note is snapped back; a note an octave up after a rest is
    read on its first frame (the check trusts only voiced frames); a legato leap of an octave is
    read one frame late (its first frame cannot be told from an error without look-ahead)."""
    tracker = PitchTracker()

    def read(hz: list[float], confidence: list[float]) -> list[float]:
        pitch = tracker.finish(torch.tensor([hz]), torch.tensor([confidence]))[0, 0]
        return [round(float(p), 3) for p in pitch]

    a3, a4 = 220.0, 440.0
    assert read([a3] * 5 + [a4] + [a3] * 4, [0.9] * 10) == [57.0] * 10
    assert read([a3] * 4 + [a3] * 2 + [a4] * 4, [0.9] * 4 + [0.0] * 2 + [0.9] * 4) == [57.0] * 6 + [69.0] * 4
    assert read([a3] * 5 + [a4] * 5, [0.9] * 10) == [57.0] * 6 + [69.0] * 4
    # a real interval is never moved
    assert read([a3] * 5 + [a3 * 2 ** (7 / 12)] * 5, [0.9] * 10) == [57.0] * 5 + [64.0] * 5
    # shorter than the check's reach: a one-frame file, and none
    assert read([a4], [0.9]) == [69.0] and read([], []) == []
    state = tracker.initial_state(1)
    out, state = tracker.step(torch.zeros(1, 1, 100), state)  # less than a hop: no frame yet
    assert out.shape == (1, 2, 0) and len(state) == len(tracker.initial_state(1))


def test_tracker_scripts_and_matches_itself():
    tracker = PitchTracker()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(tracker)
    x = torch.from_numpy(harmonic_note(50))[None, None]
    assert torch.equal(scripted(x), tracker(x))


def decode(module, u: torch.Tensor) -> np.ndarray:
    module.reset()
    with torch.no_grad():
        return module.decode(u)[0, 0].numpy()


def load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))


def test_decode_at_pitch_69_is_440_hz_and_encode_reads_it_back(tmp_path):
    module = load(build_pitched_model(tmp_path / "pitched.ts"))
    meta = json.loads(module.metadata())
    pitch = meta["controls"][0]
    assert (pitch["label"], pitch["source"], pitch["unit"], pitch["min"], pitch["max"]) == ("pitch", "f0", "midi", 0, 127)
    assert meta["controls"][1]["label"] == "voicing"
    assert meta["latency"] == {"residual_samples": 512, "harmonic_samples": 256, "encode_samples": 2 * 256}
    frames = 200
    u = torch.zeros(1, int(module.decode_params[0]), frames)
    u[:, 0], u[:, 1] = 69.0, 1.0
    y = decode(module, u)
    # the frequency of the strongest peak of a long Kaiser-windowed spectrum, parabolically refined
    steady = y[RATE // 10:]
    spectrum = np.abs(np.fft.rfft(steady * np.kaiser(len(steady), 12), 1 << 20))
    k = int(np.argmax(spectrum))
    a, b, c = np.log(spectrum[k - 1:k + 2])
    hz = (k + 0.5 * (a - c) / (a - 2 * b + c)) * RATE / (1 << 20)
    assert abs(1200 * math.log2(hz / 440.0)) < 0.5
    with torch.no_grad():
        encoded = module.encode(torch.from_numpy(y)[None, None])[0]
    assert np.abs(encoded[0, 10:-10].numpy() - 69.0).max() < 0.03  # 3 cents
    assert encoded[1, 10:-10].min() > 0.9


def test_streaming_in_chunks_equals_one_call_with_a_moving_pitch(tmp_path):
    module = load(build_pitched_model(tmp_path / "pitched.ts"))
    frames = 48
    u = torch.zeros(1, int(module.decode_params[0]), frames)
    u[:, 0] = torch.linspace(40.0, 100.0, frames)  # a glide, then a jump down
    u[:, 0, 30:] = 45.0
    u[:, 1] = 1.0
    assert check_streaming(module, u) < 1e-4


def ideal_harmonics(hz: np.ndarray, harmonics: int, hop: int = 256, top: float = 20000.0,
                    taper: float = 1000.0) -> np.ndarray:
    """The band-limited harmonic series the head should play for frame pitches `hz`, made sample by
    sample with nothing to fold: the same per-sample frequency (a linear glide across each block),
    every partial at 1/K, each faded by the raised-cosine taper at its own instantaneous frequency."""
    prev = np.concatenate([hz[:1], hz[:-1]])
    f = (prev[:, None] + (hz - prev)[:, None] * (np.arange(hop) + 1) / hop).reshape(-1)
    phase = 2 * np.pi * np.cumsum(f) / RATE
    out = np.zeros_like(f)
    for k in range(1, harmonics + 1):
        fade = np.clip((k * f - (top - taper)) / taper, 0.0, 1.0)
        out += np.sin(k * phase) * (0.5 + 0.5 * np.cos(np.pi * fade)) / harmonics
    return out


def test_glide_with_every_harmonic_at_full_level_stays_alias_free(tmp_path):
    module = load(build_pitched_model(tmp_path / "full.ts", harmonics=64, partials=[]))
    frames = int(3.0 * RATE / 256)
    glide_hz = 30.0 * (4000.0 / 30.0) ** (np.arange(frames) / (frames - 1))
    jump_hz = glide_hz.copy()
    jump_hz[frames // 2:] *= 2.0  # an octave up within one frame: partials leap past the band edge
    for hz in (glide_hz, jump_hz):
        u = torch.zeros(1, int(module.decode_params[0]), frames)
        u[:, 0] = hz_to_midi(torch.from_numpy(hz)).float()
        u[:, 1] = 1.0
        y = decode(module, u)
        assert np.isfinite(y).all() and np.abs(y).max() <= 1.0
        reference = ideal_harmonics(hz, 64)
        assert np.sqrt(np.mean(y ** 2)) == pytest.approx(np.sqrt(np.mean(reference ** 2)), rel=0.05)
        # a partial gliding fast near 20 kHz spreads a little energy above it even when made
        # sample by sample (about -77 dB here); the head may add a little (its taper is taken
        # per block: -68 dB), and no partial may appear that the band-limited series lacks: a
        # fold would
        assert energy_above_db(y) < energy_above_db(reference) + 10.0
        assert energy_above_db(y) < -50.0
        assert new_partials(reference, y) == []


def test_unvoiced_input_silences_the_harmonic_head():
    vae = pitched_vae()
    z = torch.zeros(1, vae.cfg.latent_size, 100)
    condition = torch.stack([torch.full((100,), 69.0), torch.zeros(100)])[None]
    with torch.no_grad():
        y = vae.decode(z, condition)
    assert float(y.abs().max()) < 1e-4
