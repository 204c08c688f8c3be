"""Audio input live: a JACK client plays into `synthd run --input virtual`'s port synthd:in_1 and
a recorder reads synthd's JACK output beside the played signal, on a model with a pitch input
(its decoder plays a harmonic tone at the pitch its `encode` tracks)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import soundfile as sf

from support.jack import Player, Recorder, jack_server  # noqa: F401  (fixture)
from support.pitched_model import build_pitched_model
from support.spectrum import assert_plays, note_hz
from support.synthd_proc import OscClient, SynthdProcess
from synthd.model import load_model
from synthd.render import render_performance

RATE = 48000
PATCH = """version = 1
[output]
gain_db = -12.0
"""


@pytest.fixture(scope="module")
def rig(jack_server, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("input_live")
    model = build_pitched_model(d / "pitched.ts")
    (d / "in.toml").write_text(PATCH)
    with SynthdProcess(jack_server, "--model", str(model), "--patch", str(d / "in.toml"), "--input", "virtual",
                       "--channels", "1") as proc:
        with Player(jack_server.name) as player:
            player.connect_to(r"synthd:in_1")
            osc = OscClient(proc.osc_address)
            yield {"proc": proc, "player": player, "osc": osc, "model": model, "patch": d / "in.toml",
                   "server": jack_server, "dir": d}
            osc.close()


def tone(note: float, seconds: float, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (level * np.sin(2 * np.pi * note_hz(note) * t)).astype(np.float32)


def take(rig, signal: np.ndarray, seconds: float, actions=()) -> tuple[np.ndarray, np.ndarray]:
    """Play `signal` into synthd:in_1 after 0.3 s; (synthd's output, the played signal) as recorded
    side by side for `seconds`. `actions`: (seconds after the start, callable)."""
    with Recorder(rig["server"].name, channels=2, seconds=seconds + 1) as rec:
        rec.connect_from(rec.wait_for_ports("PortAudio.*:out", 1) + [rig["player"].port.name])
        rec.start()
        t0 = time.monotonic()
        steps = sorted([(0.3, lambda: rig["player"].play(signal)), *actions], key=lambda a: a[0])
        for at, action in steps:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            action()
        rec.wait_frames(int(seconds * RATE))
        data = rec.data()[:int(seconds * RATE)]
    return data[:, 0], data[:, 1]


def onset(x: np.ndarray, threshold: float) -> int:
    return int(np.argmax(np.abs(x) > threshold))


def test_a_tone_comes_out_at_its_pitch_within_the_latency_synthd_prints(rig):
    out, played = take(rig, tone(57, 1.0), 2.2)
    start = onset(played, 0.01)
    delay_ms = 1000.0 * (onset(out, 0.01) - start) / RATE
    printed = float(re.search(r"input synthd:in_1: ([\d.]+) ms to the output", rig["proc"].startup).group(1))
    # the encoder's and the tracker's look-ahead, as the model's metadata states it
    lag_ms = 1000.0 * load_model(rig["model"]).encode_lag_samples / RATE
    assert lag_ms - 5 < delay_ms < printed + 10, (delay_ms, printed)
    assert_plays(out[start + RATE // 4:start + 3 * RATE // 4], RATE, [57], cents=5.0, window_s=0.1)
    # the input stops: the output falls silent, no drone
    assert np.abs(out[start + RATE + int(0.25 * RATE):]).max() < 1e-3


def test_osc_changes_transpose_and_modes_while_it_plays(rig):
    osc = rig["osc"]
    osc.send("/synthd/input/transpose", 7.0)
    out, played = take(rig, tone(57, 1.0), 1.6)
    start = onset(played, 0.01)
    assert_plays(out[start + RATE // 4:start + 3 * RATE // 4], RATE, [64], cents=5.0, window_s=0.1)
    # knob mode: the pitch knob's note, whatever comes in; the knob at wire 0.5 is MIDI 63.5
    osc.send("/synthd/input/mode", "pitch", "knob")
    osc.send("/synthd/control/pitch", 0.5)
    out, played = take(rig, tone(50, 1.0), 1.6)
    start = onset(played, 0.01)
    assert_plays(out[start + RATE // 4:start + 3 * RATE // 4], RATE, [63.5], cents=5.0, window_s=0.1)
    osc.send("/synthd/input/mode", "follow")
    osc.send("/synthd/input/transpose", 0)
    replies = osc.ask("/synthd/input/mode", "pitch", "loud", reply="/fail")
    assert "not an input setting" in replies[1]
    out, played = take(rig, tone(50, 1.0), 1.6)
    start = onset(played, 0.01)
    assert_plays(out[start + RATE // 4:start + 3 * RATE // 4], RATE, [50], cents=5.0, window_s=0.1)


def test_status_reports_the_input(rig):
    status = rig["osc"].status()
    assert status["input"] == "synthd:in_1" and status["input_fault"] == ""
    assert status["input_lag_ms"] == pytest.approx(1000.0 * 2 * 256 / RATE)  # 2 frames of 256 at 48 kHz
    assert status["input_level_db"] <= 0.0 and status["input_underruns"] >= 0 and status["input_overruns"] >= 0


def test_bad_input_never_makes_the_output_nan_or_louder_than_the_limiter(rig):
    rng = np.random.default_rng(1)
    bad = tone(57, 1.5, level=4.0) + 0.5  # clipped, with a DC offset
    bad[RATE // 4:RATE // 4 + 2000] = np.nan
    bad[RATE // 2:RATE // 2 + 500] = np.inf
    bad[RATE:] = rng.uniform(-10, 10, len(bad) - RATE)
    rig["osc"].send("/synthd/gain", 24.0)
    try:
        out, _ = take(rig, bad.astype(np.float32), 2.5)
    finally:
        rig["osc"].send("/synthd/gain", -12.0)
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
    assert np.abs(out).max() > 0.1  # and it still plays
    assert rig["proc"].alive


def test_an_offline_render_of_the_same_input_sounds_as_the_live_path(rig, tmp_path):
    signal = np.concatenate([tone(57, 0.6), tone(62, 0.6, level=0.15), np.zeros(RATE // 2, np.float32)])
    out, played = take(rig, signal, 2.3)
    live = out[onset(played, 0.01):][:len(signal)]
    sf.write(tmp_path / "take.wav", signal, RATE, subtype="FLOAT")
    render_performance(rig["model"], tmp_path / "offline.wav", input_path=tmp_path / "take.wav", channels=1,
                       patch_path=rig["patch"], progress=False)
    offline = sf.read(tmp_path / "offline.wav")[0][:len(signal)]
    # the same notes at the same times and levels (phases differ: the live stream ran before)
    for a, b, note in ((0.25, 0.55, 57), (0.85, 1.15, 62)):
        for y in (live, offline):
            assert_plays(y[int(a * RATE):int(b * RATE)], RATE, [note], cents=5.0, window_s=0.1)
    envelope = [np.sqrt(np.convolve(y ** 2, np.ones(2400) / 2400, "valid"))[::480] for y in (live, offline)]
    assert np.corrcoef(*envelope)[0, 1] > 0.98
    assert abs(20 * np.log10(envelope[0].max() / envelope[1].max())) < 0.5
