"""The control surface against a real Engine and a toy model: mapping, MIDI logic, presets."""

from __future__ import annotations

import numpy as np
import pytest

from support.nnmodels import build_toy_model
from synthd.controls import ControlSurface, shape, unshape
from synthd.engine import Engine
from synthd.model import load_model
from synthd.patch import ControlMap, default_patch, load_patch, parse_patch

PATCH = """version = 1
[gate]
attack = 0.0
release = 0.0
[midi]
bend_control = "brightness"
bend_depth = 0.25
note_low = 60
note_high = 72
[presets]
glide = 2.0
[[control]]
label = "brightness"
cc = 74
alias = "cutoff"
[[control]]
label = "loudness"
cc = 1
hires = true
invert = true
range = [0.25, 0.75]
[[control]]
index = 3
cc = 20
pickup = true
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(build_toy_model(tmp_path_factory.mktemp("m") / "toy.ts", latent_size=4))


@pytest.fixture
def surface(model, tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(PATCH)
    engine = Engine(model, channels=1, block_frames=256)
    return ControlSurface(engine, load_patch(path))


def test_curves_invert_range_are_inverse_of_each_other():
    for m in (ControlMap(), ControlMap(curve="exponential"), ControlMap(invert=True, range=(0.2, 0.6))):
        for u in np.linspace(0, 1, 11):
            assert unshape(m, shape(m, u)) == pytest.approx(u, abs=1e-9)
    exp = ControlMap(curve="exponential")
    assert shape(exp, 0.0) == 0.0 and shape(exp, 1.0) == pytest.approx(1.0) and shape(exp, 0.5) < 0.2


def test_set_by_label_index_alias_maps_to_model_units(surface):
    eng = surface.engine  # toy ranges are -2..2
    surface.set("brightness", 0.75)
    assert eng.latents()[2] == pytest.approx(1.0)
    surface.set("cutoff", 0.25)
    assert eng.latents()[2] == pytest.approx(-1.0)
    surface.set(0, 1.0)
    assert eng.latents()[0] == pytest.approx(2.0)
    surface.set("loudness", 0.0)  # inverted, range 0.25..0.75 -> position 0.75 -> +1
    assert eng.latents()[1] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="no control 'nope'"):
        surface.set("nope", 0.5)


def test_out_of_range_values_are_clamped_and_counted(surface):
    assert surface.set("brightness", 7.0) == 1.0
    assert surface.set("brightness", -1.0) == 0.0
    assert surface.set_gain_db(99) == 24.0
    assert surface.counters.clamped == 3
    with pytest.raises(ValueError):
        surface.set("brightness", float("nan"))


def test_cc_7_and_14_bit_and_channels(surface):
    eng = surface.engine
    assert surface.midi_cc(5, 74, 127)  # omni patch: any channel
    assert eng.latents()[2] == pytest.approx(2.0)
    surface.midi_cc(1, 1, 64)  # MSB
    surface.midi_cc(1, 33, 0)  # LSB -> (64 << 7) / 16383
    u = (64 << 7) / 16383
    assert surface.find("loudness").wire == pytest.approx(u)
    assert not surface.midi_cc(1, 99, 10)


def test_pickup_waits_until_the_knob_crosses(surface):
    surface.set(3, 0.5)  # set elsewhere: the knob must catch up
    surface.midi_cc(1, 20, 10)
    surface.midi_cc(1, 20, 30)
    assert surface.find(3).wire == 0.5 and surface.counters.pickup_waits == 2
    surface.midi_cc(1, 20, 70)  # crossed 0.5
    assert surface.find(3).wire == pytest.approx(70 / 127)
    surface.midi_cc(1, 20, 20)  # caught: follows at once
    assert surface.find(3).wire == pytest.approx(20 / 127)


def test_learn_binds_next_cc_steals_it_and_writes_back(surface):
    surface.set("brightness", 0.5)
    surface.arm_learn("pitch")
    surface.midi_cc(3, 74, 0)  # brightness had CC 74
    assert surface.learning is None and surface.dirty
    surface.midi_cc(3, 74, 127)
    assert surface.find("pitch").wire == 1.0 and surface.find("brightness").wire == 0.5
    path = surface.save_patch()
    again = load_patch(path)
    by = {c.target(): c for c in again.controls}
    assert by["pitch"].cc == 74 and by["brightness"].cc is None


def test_notes_gate_pitch_and_bend(surface):
    eng = surface.engine
    surface.note_on(66, 100)
    assert surface.gate_open and surface.find("pitch").wire == pytest.approx(0.5)
    surface.note_on(72, 100)
    surface.note_off(72)  # back to the held note
    assert surface.gate_open and surface.find("pitch").wire == pytest.approx(0.5)
    surface.note_on(66, 0)  # velocity 0 = note-off
    assert not surface.gate_open
    surface.set("brightness", 0.5)
    surface.pitch_bend(8191)
    assert eng.latents()[2] == pytest.approx(-2 + 4 * (0.5 + 0.25 * 8191 / 8192))
    surface.pitch_bend(0)
    assert eng.latents()[2] == pytest.approx(0.0)


def test_gate_envelope_shapes_the_output(model):
    patch = parse_patch('version = 1\n[gate]\nopen = false\nattack = 0.1\nrelease = 0.1\n')
    engine = Engine(model, channels=1, block_frames=256)
    surface = ControlSurface(engine, patch)
    surface.set("loudness", 1.0)
    assert np.abs(engine.render(4800)).max() < 1e-4  # starts closed
    surface.note_on(60, 127)
    up = engine.render(9600)
    assert np.abs(up[:480]).max() < np.abs(up[4800:]).max() / 3  # attack ramps in
    surface.note_off(60)
    engine.render(9600)
    assert np.abs(engine.render(2400)).max() < 1e-4


def test_presets_save_recall_glide_and_survive_reload(surface):
    surface.set("brightness", 0.9)
    surface.set_gain_db(-6)
    saved = surface.save_preset("bright")
    assert saved.program == 0
    surface.set("brightness", 0.1)
    surface.set_gain_db(0)
    surface.recall_preset(0)  # program change number
    assert surface.find("brightness").wire == pytest.approx(0.9) and surface.gain_db == -6
    reloaded = load_patch(surface.patch.path)
    assert reloaded.preset("bright").values["brightness"] == pytest.approx(0.9)
    with pytest.raises(KeyError, match="no preset 'x'"):
        surface.recall_preset("x")


def test_recall_glides_instead_of_jumping(model, tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('version = 1\n[presets]\nglide = 0.5\n[[preset]]\nname = "hi"\nvalues = { pitch = 1.0 }\n')
    engine = Engine(model, channels=1, block_frames=256)
    surface = ControlSurface(engine, load_patch(path))
    engine.render(2560)
    surface.recall_preset("hi")
    # pitch (latent 0) sets the toy's frequency; count zero crossings per 50 ms
    out = engine.render(48000)[:, 0]
    crossings = [int(np.sum(np.diff(np.sign(out[i:i + 2400])) != 0)) for i in range(0, 48000, 2400)]
    assert crossings[1] < crossings[5] < crossings[-1]  # rising over half a second
    assert crossings[-1] == pytest.approx(crossings[-2], abs=2)


def test_subscribers_hear_changes_except_from_their_origin(surface):
    heard = []
    fn = lambda kind, name, value: heard.append((kind, name, round(value, 3)))
    surface.subscribe(fn)
    surface.set("brightness", 0.5)
    surface.set("brightness", 0.6, origin=fn)
    surface.set_gate(False)
    surface.midi_cc(1, 74, 127)
    assert heard == [("control", "brightness", 0.5), ("gate", "gate", 0.0), ("control", "brightness", 1.0)]


def test_default_patch_binds_most_important_controls_of_any_model(model):
    engine = Engine(model, channels=1, block_frames=256)
    surface = ControlSurface(engine, default_patch())
    assert [c.mapping.cc for c in surface.controls] == [21, 22, 23, 24]  # 4-latent model
    assert surface.warnings == ["patch 'default': model 'toy' (4 controls) has no control #4, #5, #6, #7; "
                                "those mappings are idle"]  # CCs 25-28
    surface.midi_cc(16, 21, 127)
    assert engine.latents()[0] == pytest.approx(2.0)


def test_a_pitch_input_in_midi_units_plays_notes_exactly_bends_glides_and_takes_velocity(tmp_path):
    import torch

    from support.pitched_model import build_pitched_model
    from training.pitch import PitchTracker

    pitched = load_model(build_pitched_model(tmp_path / "pitched.ts"))
    assert pitched.control("pitch").unit == "midi"
    patch = parse_patch("""version = 1
[midi]
note_low = 60
note_high = 72
bend_range = 12.0
glide = 0.1
velocity_control = "timbre_1"
[[control]]
label = "pitch"
curve = "exponential"
invert = true
range = [0.3, 0.6]
""", "keys.toml")
    engine = Engine(pitched, channels=1, block_frames=256)
    surface = ControlSurface(engine, patch)
    pitch = surface.find("pitch")
    surface.note_on(69, 64)
    # the note itself, whatever the mapping, note range and curve say
    assert pitch.model_value() == 69.0
    assert surface.find("timbre_1").wire == pytest.approx(64 / 127)
    surface.pitch_bend(-8192)
    assert pitch.model_value() == pytest.approx(57.0)
    surface.pitch_bend(0)
    rate = pitched.sample_rate
    engine.render(int(0.3 * rate))
    surface.note_on(45, 100)  # legato: the patch's glide from 69 to 45
    assert pitch.model_value() == 45.0
    heard = PitchTracker()(torch.from_numpy(np.ascontiguousarray(engine.render(int(0.4 * rate))[:, 0]))[None, None])[0, 0]
    seconds = (np.arange(len(heard)) + 1) * pitched.hop / rate
    # the engine's render-ahead delays what is heard a little; the glide takes 0.1 s of it
    gliding = heard[(seconds > 0.02) & (seconds < 0.2)].numpy()
    assert gliding.max() > 60 and gliding.min() < 50 and np.all(np.diff(gliding) < 0.05)
    assert np.abs(heard[(seconds > 0.3) & (seconds < 0.38)].numpy() - 45.0).max() < 0.05  # the end: the window runs out
    # a knob (or OSC) on the pitch input takes over from the notes, through the patch's mapping
    surface.set("pitch", 0.0)
    assert pitch.note is None and pitch.model_value() == pytest.approx(0.6 * 127.0)
