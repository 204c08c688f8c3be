"""`synthd-train demo-data`: the built-in demo set, through the command line, plus checks that
each drawn parameter really moves the sound it names (so a model has controls to discover)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from support import audiofiles as af
from training import demo_data

SR = 48000


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "sounds"
    proc = af.run_cli("demo-data", out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 40 one-shots" in proc.stdout
    return out, json.loads((out / demo_data.SIDECAR).read_text())


def test_default_set_is_40_varied_24_bit_one_shots(demo) -> None:
    out, sidecar = demo
    voices = sidecar["voices"]
    wavs = sorted(p.name for p in out.glob("*.wav"))
    assert wavs == sorted(v["file"] for v in voices) and len(wavs) == 40
    assert {k: sum(v["kind"] == k for v in voices) for k in demo_data.KINDS} == {k: 8 for k in demo_data.KINDS}
    for v in voices:
        info = sf.info(out / v["file"])
        assert (info.samplerate, info.channels, info.subtype, info.format) == (SR, 1, "PCM_24", "WAV")
        assert 0.2 <= info.duration <= 3.0
        assert info.duration == pytest.approx(v["duration_s"], abs=1e-4)
        y, _ = sf.read(out / v["file"])
        assert np.all(np.isfinite(y))
        assert 20 * np.log10(np.max(np.abs(y))) == pytest.approx(v["level_db"], abs=0.05)
        assert abs(np.mean(y)) < 1e-3
    tonal = [v for v in voices if v["kind"] in ("pluck", "bell", "saw")]
    assert max(v["midi"] for v in tonal) - min(v["midi"] for v in tonal) >= 36, "three octaves or more"
    for key, span in (("brightness", 0.7), ("noisiness", 0.8), ("level_db", 15.0)):
        values = [v[key] for v in voices]
        assert max(values) - min(values) >= span, key
    saw_attacks = [v["attack_s"] for v in voices if v["kind"] == "saw"]
    assert max(saw_attacks) >= 0.2 and min(saw_attacks) <= 0.01, "slow swells and fast attacks"


def test_same_seed_same_files_and_count_only_adds_files(demo, tmp_path: Path) -> None:
    out, _ = demo
    assert af.run_cli("demo-data", tmp_path / "a", "--count", "6").returncode == 0
    demo_data.generate(tmp_path / "b", count=6, seed=1)
    for p in sorted((tmp_path / "a").glob("*.wav")):
        assert p.read_bytes() == (out / p.name).read_bytes()
    a = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.wav")}
    b = {p.name: p.read_bytes() for p in (tmp_path / "b").glob("*.wav")}
    assert len(a) == len(b) == 6 and not set(a.values()) & set(b.values())
    assert af.run_cli("demo-data", tmp_path / "c", "--count", "0").returncode != 0


def _f0(y: np.ndarray, fmin: float = 30.0, fmax: float = 2500.0, start: int | None = None) -> float:
    """Pitch by autocorrelation over 8192 samples from `start` (default: the peak), with
    parabolic refinement of the lag."""
    start = int(np.argmax(np.abs(y))) if start is None else start
    seg = y[start: start + 8192]
    ac = np.correlate(seg, seg, "full")[len(seg) - 1:]
    # search past the first zero crossing: the lag-0 lobe always correlates best
    lo, hi = max(int(SR / fmax), int(np.argmax(ac < 0))), int(SR / fmin)
    k = lo + int(np.argmax(ac[lo:hi]))
    a, b, c = ac[k - 1: k + 2]
    return SR / (k + 0.5 * (a - c) / (a - 2 * b + c))


def test_plucks_and_saws_sound_at_their_pitch(demo) -> None:
    out, sidecar = demo
    for v in sidecar["voices"]:
        if v["kind"] in ("pluck", "saw"):
            y, _ = sf.read(out / v["file"])
            assert _f0(y) == pytest.approx(v["pitch_hz"], rel=0.01), v["file"]


def _centroid(y: np.ndarray) -> float:
    mag = np.abs(np.fft.rfft(y))
    return float(np.sum(mag * np.fft.rfftfreq(len(y), 1 / SR)) / np.sum(mag))


def _flatness(y: np.ndarray) -> float:
    power = np.abs(np.fft.rfft(y[: 16384] * np.hanning(min(len(y), 16384)))) ** 2 + 1e-20
    return float(np.exp(np.mean(np.log(power))) / np.mean(power))


def _rise_s(y: np.ndarray) -> float:
    """Time from 10 % to 90 % of the peak of a 5 ms RMS envelope."""
    win = int(0.005 * SR)
    env = np.sqrt(np.convolve(y ** 2, np.ones(win) / win, "same"))
    peak = env.max()
    return (np.argmax(env >= 0.9 * peak) - np.argmax(env >= 0.1 * peak)) / SR


@pytest.mark.parametrize("kind", demo_data.KINDS)
def test_each_parameter_moves_the_attribute_it_names(kind: str) -> None:
    base = demo_data.Voice(file="x.wav", kind=kind, midi=57.0, pitch_hz=demo_data.midi_to_hz(57.0),
                           brightness=0.5, attack_s=0.002, noisiness=0.1, level_db=-6.0, duration_s=1.0)

    def render(**changes: float) -> np.ndarray:
        return demo_data.render(replace(base, **changes), seed=0, index=0)

    centroids = [_centroid(render(brightness=b)) for b in (0.1, 0.5, 0.9)]
    assert centroids[0] < centroids[1] < centroids[2], centroids
    if kind != "noise":  # noise is all noise; elsewhere noisiness adds noise to a tone
        assert _flatness(render(noisiness=0.9)) > 2 * _flatness(render(noisiness=0.0))
    if kind in ("saw", "noise"):
        assert _rise_s(render(attack_s=0.25)) > 0.1 > _rise_s(render(attack_s=0.002))
    for hz in (110.0, 440.0):
        y = render(pitch_hz=hz, noisiness=0.0)
        if kind in ("pluck", "saw"):
            assert _f0(y) == pytest.approx(hz, rel=0.01)
        elif kind == "hit":  # the body settles on its pitch after the initial drop
            assert _f0(y, start=int(0.2 * SR)) == pytest.approx(hz, rel=0.03)
    if kind in ("bell", "noise"):  # inharmonic or unpitched: the spectrum moves with the pitch
        assert _centroid(render(pitch_hz=440.0)) > 2 * _centroid(render(pitch_hz=110.0))


def test_brightness_and_noisiness_vary_apart_across_the_set(demo) -> None:
    """The set draws brightness and noisiness independently, and the sounds keep them apart:
    over all sounding frames the two descriptors barely rank together (a model can then find
    a direction for each)."""
    import torch
    from scipy.stats import spearmanr

    from training.descriptors import DescriptorConfig, analysis_values, compute

    out, _ = demo
    cfg = DescriptorConfig()
    bright, noisy = [], []
    for path in sorted(out.glob("*.wav")):
        x, _ = sf.read(path, dtype="float32")
        v = analysis_values(compute(torch.from_numpy(x)[None], cfg), cfg)
        b, n = v["brightness"][0].numpy(), v["noisiness"][0].numpy()
        ok = np.isfinite(b) & np.isfinite(n)
        bright.append(b[ok])
        noisy.append(n[ok])
    rho = spearmanr(np.concatenate(bright), np.concatenate(noisy))[0]
    assert abs(rho) < 0.3, rho
