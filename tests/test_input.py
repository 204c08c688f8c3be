"""Audio input offline: `synthd render --input` and the engine's input path on small models.

A model with a pitch input (tests/support/pitched_model.py) plays a harmonic tone at the pitch
its `encode` tracks, so the pitch of what comes out tells what the input modes did; a RAVE-like
file (tests/support/nnmodels.py) puts the input's level into a latent through its own `encode`.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from support.nnmodels import build_rave_mirror, build_toy_model
from support.pitched_model import build_pitched_model
from support.spectrum import assert_plays, note_hz
from synthd.controls import ControlSurface, engine_for
from synthd.model import ModelError, load_model
from synthd.patch import PatchError, parse_patch
from synthd.render import RenderError, render_performance

RATE = 48000
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def tone(note: float, seconds: float, rate: int = RATE, level: float = 0.3, lead_s: float = 0.25) -> np.ndarray:
    """`lead_s` of silence, then a sine at MIDI `note`."""
    t = np.arange(int(seconds * rate)) / rate
    x = level * np.sin(2 * np.pi * note_hz(note) * t)
    x[:int(lead_s * rate)] = 0.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("input")
    return {"pitched": build_pitched_model(d / "pitched.ts"), "rave": build_toy_model(d / "rave.ts", with_metadata=False),
            "mirror": build_rave_mirror(d / "mirror.ts"), "dir": d}


def play(model_path, x: np.ndarray, patch_text: str = "version = 1\n", knobs: dict[str, float] | None = None,
         block: int = 256) -> np.ndarray:
    """`x` through the engine's input path, mono out, knobs (wire values) set first."""
    model = load_model(model_path)
    patch = parse_patch(patch_text)
    engine = engine_for(model, patch, channels=1, block_frames=block, threads=1, audio_input=True)
    surface = ControlSurface(engine, patch)
    for label, wire in (knobs or {}).items():
        surface.set(label, wire, glide_s=0.0)
    return np.concatenate([engine.render(block, x[i:i + block]) for i in range(0, len(x) - block + 1, block)])[:, 0]


def steady(y: np.ndarray, a: float = 0.6, b: float = 1.4) -> np.ndarray:
    return y[int(a * RATE):int(b * RATE)]


def test_a_played_note_comes_out_at_its_pitch_and_a_transpose_moves_it(models):
    x = tone(57, 1.6)  # A3
    assert_plays(steady(play(models["pitched"], x)), RATE, [57], cents=3.0)
    up = play(models["pitched"], x, "version = 1\n[input]\ntranspose = 7.0\n")
    assert_plays(steady(up), RATE, [64], cents=3.0)  # a fifth up: E4


def test_modes_follow_offset_knob_each_do_what_they_say(models):
    x = tone(57, 1.6)
    # the pitch knob set to an octave above its default
    model = load_model(models["pitched"])
    c = model.control("pitch")
    octave_up = (c.default + 12.0 - c.minimum) / (c.maximum - c.minimum)
    follow = play(models["pitched"], x, knobs={"pitch": octave_up})  # the pitch input follows by default
    assert_plays(steady(follow), RATE, [57], cents=3.0)
    offset = play(models["pitched"], x, "version = 1\n[input]\nmodes = { pitch = \"offset\" }\n",
                  knobs={"pitch": octave_up})
    assert_plays(steady(offset), RATE, [69], cents=3.0)  # the input, an octave up
    knob = play(models["pitched"], tone(50, 1.6), "version = 1\n[input]\nmodes = { pitch = \"knob\" }\n",
                knobs={"pitch": octave_up})
    assert_plays(steady(knob), RATE, [c.default + 12.0], cents=3.0)  # the knob's, whatever is sung


def test_a_rave_like_file_plays_its_own_encode_and_knob_mode_ignores_it(models):
    # the toy's encode puts the input's log level into latent 1, which its decode plays as level
    loud_quiet = np.concatenate([tone(60, 1.0, level=0.5, lead_s=0.0), tone(60, 1.0, level=0.005, lead_s=0.0)])
    patch = "version = 1\n[input]\ngate_db = -90.0\n"
    y = play(models["rave"], loud_quiet, patch)
    loud, quiet = np.sqrt(np.mean(y[12000:40000] ** 2)), np.sqrt(np.mean(y[60000:88000] ** 2))
    assert loud > 3 * quiet > 0
    y = play(models["rave"], loud_quiet, patch + 'modes = { latent_1 = "knob" }\n')
    loud, quiet = np.sqrt(np.mean(y[12000:40000] ** 2)), np.sqrt(np.mean(y[60000:88000] ** 2))
    assert abs(20 * np.log10(loud / quiet)) < 0.5


def test_a_model_whose_frame_is_longer_than_a_block_gets_its_input(models):
    # RAVE's 2048-sample frames from 256-sample blocks: the encode takes whole frames
    x = np.concatenate([tone(60, 1.0, level=0.5, lead_s=0.0), np.zeros(RATE, np.float32)])
    y = play(models["mirror"], x)
    assert np.isfinite(y).all()
    assert np.abs(y[RATE // 2:RATE]).max() > 0.05
    assert np.abs(y[int(1.5 * RATE):]).max() < 1e-3  # the gate: no input, no drone


def test_no_input_is_silence_not_a_drone(models):
    y = play(models["pitched"], np.zeros(RATE, np.float32))
    assert np.abs(y).max() == 0.0
    # and after a note the output falls silent with its input
    y = play(models["pitched"], np.concatenate([tone(57, 1.0), np.zeros(RATE, np.float32)]))
    assert np.abs(y[int(0.5 * RATE):RATE]).max() > 0.05
    assert np.abs(y[int(1.3 * RATE):]).max() < 1e-4


def test_bad_input_never_makes_the_output_nan_or_louder_than_the_limiter(models):
    rng = np.random.default_rng(0)
    bad = tone(57, 2.0, level=3.0)  # clipped far past full scale
    bad[RATE // 2:RATE // 2 + 3000] = np.nan
    bad[RATE:RATE + 100] = np.inf
    bad[RATE + 200:RATE + 300] = -np.inf
    bad += 0.5  # a DC offset
    bad[int(1.5 * RATE):] = rng.uniform(-8, 8, len(bad) - int(1.5 * RATE))
    for name in ("pitched", "rave"):
        y = play(models[name], bad.astype(np.float32), "version = 1\n[output]\ngain_db = 24.0\n")
        assert np.isfinite(y).all()
        assert np.abs(y).max() <= 1.0


def test_a_model_without_encode_is_refused_by_name(models, tmp_path):
    import torch

    class DecodeOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("decode_params", torch.tensor([2, 256, 1, 1]))

        @torch.jit.export
        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return torch.zeros(z.shape[0], 1, z.shape[2] * 256)

        @torch.jit.export
        def get_methods(self) -> list[str]:
            return ["decode"]

    path = tmp_path / "decode_only.ts"
    torch.jit.save(torch.jit.script(DecodeOnly()), str(path))
    model = load_model(path)
    with pytest.raises(ModelError, match=r"decode_only\.ts: the model has no `encode`"):
        engine_for(model, parse_patch("version = 1\n"), channels=1, block_frames=256, threads=1, audio_input=True)


def test_input_settings_are_validated_with_the_line_at_fault():
    with pytest.raises(PatchError, match=r":4: \[input\] mode: 'loud' is not one of follow, offset, knob, scale"):
        parse_patch('version = 1\n\n[input]\nmode = "loud"\n')
    with pytest.raises(PatchError, match=r"\[input\].*pitch = 'up'"):
        parse_patch('version = 1\n[input]\nmodes = { pitch = "up" }\n')
    with pytest.raises(PatchError, match=r"pitch_source"):
        parse_patch('version = 1\n[input]\npitch_source = "keys"\n')
    with pytest.raises(PatchError, match=r"dry_wet"):
        parse_patch('version = 1\n[input]\ndry_wet = 1.5\n')


def test_dry_wet_mixes_the_input_in_line_with_the_model(models):
    x = tone(57, 1.6)
    dry = play(models["pitched"], x, "version = 1\n[input]\ndry_wet = 0.0\n")
    lag = load_model(models["pitched"]).encode_lag_samples
    # the dry signal is the input, late by the encoder's look-ahead: in line with the wet (the input's
    # DC blocker shifts a 220 Hz tone's phase by a degree)
    late, source = dry[lag + RATE // 2:RATE], x[RATE // 2:RATE - lag]
    assert np.corrcoef(late, source)[0, 1] > 0.995 and np.abs(late - source).max() < 0.03
    assert np.corrcoef(dry[RATE // 2:RATE - lag], source)[0, 1] < 0.9  # not in line without the delay


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthd", "render", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_render_input_through_the_cli_any_format_and_rate_byte_identical_twice(models, tmp_path):
    take = tmp_path / "take.flac"
    t = np.arange(int(1.5 * 44100)) / 44100
    x = 0.3 * np.sin(2 * np.pi * note_hz(57) * t)
    x[:11025] = 0.0
    sf.write(take, np.stack([x, x], 1), 44100)  # stereo FLAC at 44.1 kHz
    patch = tmp_path / "fifth.toml"
    patch.write_text("version = 1\n[input]\ntranspose = 7.0\n")
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}.wav"
        result = _cli("--input", str(take), "--model", str(models["pitched"]), "--patch", str(patch),
                      "--out", str(out), "--quiet", "--input-gain", "auto")
        assert result.returncode == 0, result.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    y, rate = sf.read(tmp_path / "out0.wav")
    assert rate == RATE and sf.info(tmp_path / "out0.wav").subtype == "PCM_24"
    lag = load_model(models["pitched"]).encode_lag_samples / RATE
    assert y.shape[0] / RATE == pytest.approx(1.5 + lag + 1.0, abs=0.01)  # input, look-ahead, a tail
    assert_plays(y[int(0.6 * RATE):int(1.4 * RATE), 0], RATE, [64], cents=3.0)


def test_render_input_errors_name_the_file(models, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    result = _cli("--input", str(bad), "--model", str(models["pitched"]), "--out", str(tmp_path / "o.wav"))
    assert result.returncode == 1 and "bad.wav: cannot be read as audio" in result.stderr
    assert not (tmp_path / "o.wav").exists()
    result = _cli("--input", str(bad), "--model", str(models["pitched"]), "--out", str(tmp_path / "o.wav"),
                  "--input-gain", "loud")
    assert result.returncode == 2 and "--input-gain" in result.stderr
    with pytest.raises(RenderError):
        render_performance(models["pitched"], tmp_path / "o.wav", input_path=tmp_path / "none.wav", progress=False)


class _Source:
    """A live input's ring, filled by hand (the feeder's logic alone)."""

    def __init__(self):
        from synthd.input import LiveInput

        self.live = LiveInput("test", 1, RATE)
        self.live._open = True
        self.live._callback_at = __import__("time").monotonic()

    def arrive(self, blocks: int) -> None:
        self.live._take([np.arange(256 * blocks, dtype=np.float32)], 256 * blocks)


def test_the_feeder_renders_input_as_it_comes_and_bounds_the_latency():
    from synthd.input import InputFeeder

    src = _Source()
    feeder = InputFeeder(src.live, 256)
    target = 512
    src.arrive(20)  # before the output plays, input goes, uncounted: it would pile up as latency
    assert feeder.next_block(target, target) == (False, None)
    assert src.live.available() == 0 and src.live.overruns == 0
    feeder.playing()  # the output's first callback
    assert feeder.next_block(target, target) == (False, None)  # nothing yet, the ring is full enough
    src.arrive(3)  # the render thread was held up: every block is rendered, in order
    got = [feeder.next_block(target - 512, target) for _ in range(3)]
    assert all(go for go, _ in got)
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), np.arange(768, dtype=np.float32))
    src.arrive(1)  # the ring already holds two blocks over its fill: this one is dropped, counted
    assert feeder.next_block(target + 512, target) == (False, None) and src.live.overruns == 1
    go, block = feeder.next_block(target - 257, target)  # no input and the ring about to run dry
    assert go and block is None and src.live.underruns == 1
    src.arrive(2)
    feeder.hold()  # the output restarts (its device came back)
    src.arrive(2)
    feeder.playing()  # and plays: what came before is forgotten, uncounted
    assert feeder.next_block(0, target) == (True, None) and src.live.available() == 0
    assert src.live.overruns == 1


def test_an_input_that_stops_calling_back_is_a_fault():
    src = _Source()
    assert src.live.fault() is None
    src.live._callback_at -= 1.0
    assert src.live.fault().startswith("no input for")
    assert src.live.stats()["input_fault"].startswith("no input for")


def test_render_keeps_the_last_partial_block_and_a_click_shorter_than_one(models, tmp_path):
    for n in (200, RATE + 200):
        x = np.zeros(n, np.float32)
        x[-200:] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(200) / RATE)  # the input's last 200 samples
        sf.write(tmp_path / "click.wav", x, RATE, subtype="FLOAT")
        render_performance(models["rave"], tmp_path / "out.wav", input_path=tmp_path / "click.wav", channels=1,
                           patch_path=None, progress=False)
        y = sf.read(tmp_path / "out.wav")[0]
        assert np.abs(y[n - 200:]).max() > 0.01, n  # the toy's level follows it: heard, not dropped
