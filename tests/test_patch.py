"""Patch files: validation with file/line/key in the message, round trip, atomic write-back."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthd.patch import PatchError, dump_patch, load_patch, parse_patch, save_patch

REPO = Path(__file__).resolve().parents[1]

GOOD = """# my rig
# second comment line
version = 1
name = "rig"

[output]
gain_db = -6

[gate]
open = false
attack = 0.01

[midi]
channel = 2
bend_control = "brightness"

[presets]
glide = 1.5

[[control]]
label = "brightness"
cc = 1
hires = true
curve = "exponential"
range = [0.1, 0.9]
alias = "cutoff"

[[control]]
index = 3
cc = 74
channel = "omni"
invert = true
smoothing = 0.2

[[preset]]
name = "dark"
program = 4
values = { brightness = 0.25 }
"""


def test_good_patch_reads_every_field():
    p = parse_patch(GOOD, "rig.toml")
    assert p.gain_db == -6.0 and p.gate.open is False and p.gate.attack == 0.01
    assert p.midi.channel == 2 and p.midi.bend_control == "brightness" and p.preset_glide == 1.5
    a, b = p.controls
    assert (a.label, a.cc, a.hires, a.curve, a.range, a.alias) == ("brightness", 1, True, "exponential", (0.1, 0.9), "cutoff")
    assert a.ccs() == [1, 33] and p.channel_of(a) == 2
    assert (b.index, b.invert, b.smoothing, p.channel_of(b)) == (3, True, 0.2, None)
    assert p.preset("dark").values == {"brightness": 0.25} and p.preset(4).name == "dark"


@pytest.mark.parametrize("edit, line, words", [
    (("hires = true", "hires = true\nknob = 3"), 24, ["unknown key", "knob", "[[control]] #1"]),
    (("cc = 74", "cc = 130"), 30, ["cc", "130", "0..127"]),
    (("cc = 74", "cc = 33"), 30, ["CC 33", "already used", "brightness"]),
    (("cc = 74", 'cc = "74"'), 30, ["cc", "expected int", "str"]),
    (("gain_db = -6", "gain_db = true"), 7, ["[output] gain_db", "expected float"]),
    (('curve = "exponential"', 'curve = "log"'), 24, ["curve", "'log'"]),
    (("version = 1", "version = 9"), 3, ["version 9", "not supported"]),
    (("range = [0.1, 0.9]", "range = [0.5, 0.5]"), 25, ["range"]),
    (("[gate]", "[gate]\nattack_time = 1"), 10, ["[gate] attack_time", "unknown key"]),
    (("channel = 2", "channel = 17"), 14, ["[midi] channel", "17"]),
])
def test_bad_patch_is_refused_naming_file_line_and_key(tmp_path, edit, line, words):
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(*edit, 1))
    with pytest.raises(PatchError) as err:
        load_patch(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}:"), msg
    for w in words:
        assert w in msg, msg


def test_not_toml_names_the_line(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("version = 1\n[gate\n")
    with pytest.raises(PatchError, match=r"x\.toml:2: not valid TOML"):
        load_patch(path)


def test_round_trip_and_atomic_save_keeps_header(tmp_path):
    p = parse_patch(GOOD, tmp_path / "rig.toml")
    p.path.write_text(GOOD)
    p.controls[1].cc = 75
    save_patch(p)
    text = p.path.read_text()
    assert text.startswith("# my rig\n# second comment line\n")
    again = load_patch(p.path)
    assert again.controls[1].cc == 75 and dump_patch(again) == text
    assert [f.name for f in tmp_path.iterdir()] == ["rig.toml"]  # no temp file left


def test_save_refuses_an_invalid_patch_and_keeps_the_file(tmp_path):
    path = tmp_path / "rig.toml"
    path.write_text(GOOD)
    p = load_patch(path)
    p.controls[1].cc = 1  # collides with the 14-bit control
    with pytest.raises(PatchError, match="CC 1"):
        save_patch(p)
    assert path.read_text() == GOOD


def test_shipped_patches_load():
    files = sorted((REPO / "patches").glob("*.toml"))
    assert any(f.name == "default.toml" for f in files)
    for f in files:
        p = load_patch(f)
        assert p.controls, f
    default = load_patch(REPO / "patches" / "default.toml")
    assert [(c.index, c.cc) for c in default.controls] == [(i, 21 + i) for i in range(8)]
