"""`synthd render` through its command line: MIDI and automation files to 48 kHz 24-bit WAV."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import mido
import numpy as np
import pytest
import soundfile as sf

from support.nnmodels import build_toy_model
from support.synthd_proc import REPO, crossings_per_second, rms_db

RATE = 48000

AUTOMATION = """version = 1
seconds = 3.0
[[event]]
time = 0.0
control = "loudness"
value = 1.0
[[event]]
time = 1.0
control = "pitch"
value = 0.75
glide = 0.5
[[event]]
time = 2.0
gain_db = -20
"""


def synthd_render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthd", "render", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("render")
    build_toy_model(d / "toy.ts", latent_size=4)
    (d / "a.toml").write_text(AUTOMATION)
    (d / "p.toml").write_text('version = 1\n[gate]\nopen = false\nrelease = 0.1\n'
                              '[midi]\nnote_low = 54\nnote_high = 78\n[[control]]\nlabel = "loudness"\ncc = 7\n')
    midi = mido.MidiFile(ticks_per_beat=480)  # 120 bpm: 480 ticks = 0.5 s
    track = mido.MidiTrack()
    midi.tracks.append(track)
    track += [mido.Message("control_change", control=7, value=127, time=0),
              mido.Message("note_on", note=66, velocity=127, time=480),
              mido.Message("sysex", data=[1, 2, 3], time=0),
              mido.Message("note_off", note=66, time=960),
              mido.Message("note_on", note=78, velocity=64, time=480),
              mido.Message("note_off", note=78, time=480)]
    midi.save(d / "song.mid")
    return d


def w(x, a, b):
    return x[int(a * RATE):int(b * RATE)]


def test_automation_render_duration_level_format(files):
    out = files / "a.wav"
    proc = synthd_render("--model", str(files / "toy.ts"), "--automation", str(files / "a.toml"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    info = sf.info(out)
    assert (info.samplerate, info.subtype, info.format, info.channels, info.frames) == (48000, "PCM_24", "WAV", 2, 3 * RATE)
    x, _ = sf.read(out)
    assert np.array_equal(x[:, 0], x[:, 1])  # a mono model feeds both channels
    x = x[:, 0]
    assert crossings_per_second(w(x, 0.2, 0.9), RATE) / 2 == pytest.approx(220, rel=0.03)
    assert crossings_per_second(w(x, 1.6, 1.95), RATE) / 2 == pytest.approx(440, rel=0.03)  # after the glide
    assert rms_db(w(x, 1.6, 1.95)) - rms_db(w(x, 2.1, 3.0)) == pytest.approx(20, abs=0.5)
    assert "wrote" in proc.stderr and "24-bit" in proc.stderr


def test_midi_file_render_follows_notes_and_tempo(files):
    out = files / "m.wav"
    proc = synthd_render("--model", str(files / "toy.ts"), "--midi", str(files / "song.mid"),
                         "--patch", str(files / "p.toml"), "--out", str(out), "--channels", "1")
    assert proc.returncode == 0, proc.stderr
    x, rate = sf.read(out)
    # the last event at 2.5 s; + release 0.1 s + 1 s tail
    assert rate == 48000 and len(x) == int(round(3.6 * RATE))
    assert rms_db(w(x, 0.0, 0.45)) < -90  # gate closed until the first note at 0.5 s
    assert crossings_per_second(w(x, 0.6, 1.4), RATE) / 2 == pytest.approx(220, rel=0.03)
    assert rms_db(w(x, 1.7, 1.95)) < -60  # released at 1.5 s
    loud, soft = rms_db(w(x, 0.6, 1.4)), rms_db(w(x, 2.1, 2.45))
    assert loud - soft == pytest.approx(20 * np.log10(127 / 64), abs=0.5)  # velocity scales the level
    assert crossings_per_second(w(x, 2.1, 2.45), RATE) / 2 == pytest.approx(880, rel=0.03)
    assert rms_db(w(x, 2.7, 3.6)) < -60


def test_render_is_deterministic_and_atomic(files):
    digests = []
    for name in ("d1.wav", "d2.wav"):
        proc = synthd_render("--model", str(files / "toy.ts"), "--automation", str(files / "a.toml"),
                             "--midi", str(files / "song.mid"), "--out", str(files / name), "--quiet")
        assert proc.returncode == 0, proc.stderr
        digests.append(hashlib.sha256((files / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert not [p for p in files.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("edit, words", [
    (("value = 0.75", 'value = "high"'), ["a.toml:10:", "[[event]] #2 value", "expected float"]),
    (('control = "loudness"', 'control = "nope"'), ["a.toml:5:", "no control 'nope'"]),
    (("gain_db = -20", "gain_db = -20\nvalue = 3"), ["[[event]] #3", "value", "unknown key"]),
])
def test_bad_automation_is_refused_and_writes_nothing(files, edit, words):
    (files / "bad").mkdir(exist_ok=True)
    path = files / "bad" / "a.toml"
    path.write_text(AUTOMATION.replace(*edit))
    out = files / "bad" / "never.wav"
    proc = synthd_render("--model", str(files / "toy.ts"), "--automation", str(path), "--out", str(out))
    assert proc.returncode == 1 and not out.exists()
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_the_demo_performance_plays_its_melody_in_tune_then_sweeps_the_timbre(tmp_path):
    """What `make demo` renders: the melody (a MIDI file) on the pitch input, every note at its
    pitch, then the timbre sweep (automation) with the pitch input left alone."""
    import json
    import warnings

    import torch

    from support.pitched_model import build_pitched_model
    from training import demo
    from support.spectrum import assert_plays

    model = build_pitched_model(tmp_path / "pitched.ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controls = json.loads(torch.jit.load(str(model)).metadata())["controls"]
    played = demo._write_melody(controls, tmp_path / "melody.mid")
    assert played == pytest.approx(len(demo.MELODY) * demo.NOTE_SECONDS)
    seconds = demo._write_automation(controls, tmp_path / "sweep.toml", start=played + 0.5)
    automation = (tmp_path / "sweep.toml").read_text()
    assert 'control = "pitch"' not in automation and 'control = "voicing"' in automation
    result = synthd_render("--model", str(model), "--midi", str(tmp_path / "melody.mid"), "--automation",
                           str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "demo.wav"))
    assert result.returncode == 0, result.stderr
    y, rate = sf.read(tmp_path / "demo.wav", dtype="float32")
    assert rate == RATE and len(y) >= int(seconds * RATE) - RATE
    root = round(controls[0]["default"])
    for i, step in enumerate(demo.MELODY):
        # the middle of each note, clear of its onset; the previous note's release may still ring
        # (a pitched model plays voices), so each note is read as the spectrum's peak near it
        a, b = int((i + 0.3) * demo.NOTE_SECONDS * RATE), int((i + 0.95) * demo.NOTE_SECONDS * RATE)
        assert_plays(np.ascontiguousarray(y[a:b, 0]), RATE, [root + step], cents=5.0, level=0.5)
