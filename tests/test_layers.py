"""Layers: several models at once in one `synthd run`, split by key range, each with its own patch,
gain and OSC namespace, read at the JACK output; and how the config names them."""

from __future__ import annotations

import argparse

import pytest

from support.jack import jack_server, record  # noqa: F401  (fixture)
from support.midi import midi_out  # noqa: F401  (fixture)
from support.pitched_model import build_pitched_model
from support.spectrum import assert_plays, assert_silent_at
from support.synthd_proc import OscClient, SynthdProcess, rms_db
from synthd import config as config_mod
from synthd.config import ConfigError
from synthd.osc import LAYER_FIELDS

RATE = 48000
LEFT = """version = 1
[output]
gain_db = -12.0
[gate]
open = false
release = 0.05
velocity = false
[midi]
key_high = 59
"""
RIGHT = LEFT.replace("key_high = 59", "key_low = 60")


@pytest.fixture(scope="module")
def rig(jack_server, midi_out, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("layers")
    # two models told apart by ear: "sine" plays the note's fundamental alone, "octave" its second
    # harmonic alone (an octave up)
    build_pitched_model(d / "sine.ts", partials=[1.0])
    build_pitched_model(d / "octave.ts", partials=[1e-4, 1.0])
    (d / "broken.ts").write_bytes(b"not a model")
    (d / "left.toml").write_text(LEFT)
    (d / "right.toml").write_text(RIGHT)
    with SynthdProcess(jack_server, "--model", str(d / "sine.ts"), "--patch", str(d / "left.toml"),
                       "--model", str(d / "octave.ts"), "--patch", str(d / "right.toml"),
                       "--model", str(d / "broken.ts"), "--patch", str(d / "right.toml"),
                       "--midi-in", "d2sender") as proc:
        yield proc


@pytest.fixture
def osc(rig):
    c = OscClient(rig.osc_address)
    yield c
    c.close()


def layers(osc: OscClient) -> dict[str, dict]:
    osc.send("/synthd/layers")
    return {r[1][0]: dict(zip((k for k, _ in LAYER_FIELDS), r[1])) for r in osc.replies(count=2)}


def test_a_layer_that_cannot_load_is_refused_by_name_while_the_others_play(rig, osc):
    assert "layer broken refused" in rig.log and "broken.ts" in rig.log
    rows = layers(osc)
    assert set(rows) == {"sine", "octave"}
    assert (rows["sine"]["model"], rows["sine"]["key_high"]) == ("sine", 59)
    assert (rows["octave"]["model"], rows["octave"]["key_low"]) == ("octave", 60)
    assert osc.status()["layers"] == 2


def test_two_layers_split_by_key_range_each_play_their_own_model(jack_server, rig, midi_out, osc):  # noqa: F811
    x = record(jack_server, 1.4, [
        (0.1, lambda: midi_out.send_message([0x90, 48, 100])),  # left hand: the sine layer
        (0.1, lambda: midi_out.send_message([0x90, 72, 100])),  # right hand: the octave layer
        (1.2, lambda: midi_out.send_message([0x80, 48, 0])),
        (1.2, lambda: midi_out.send_message([0x80, 72, 0])),
    ])
    steady = x[int(0.3 * RATE):int(1.15 * RATE)]
    assert_plays(steady, RATE, [48, 84], window_s=0.17)
    assert_silent_at(steady, RATE, [60, 72])  # neither layer played the other's note
    assert rms_db(x[int(1.3 * RATE):]) < -80


def test_each_layer_has_its_own_gain_status_and_model_swap(jack_server, rig, midi_out, osc):  # noqa: F811
    osc.send("/synthd/layer/octave/gain", -120.0)
    x = record(jack_server, 0.9, [
        (0.1, lambda: midi_out.send_message([0x90, 48, 100])),
        (0.1, lambda: midi_out.send_message([0x90, 72, 100])),
        (0.8, lambda: midi_out.send_message([0x80, 48, 0])),
        (0.8, lambda: midi_out.send_message([0x80, 72, 0])),
    ])
    steady = x[int(0.3 * RATE):int(0.75 * RATE)]
    assert_plays(steady, RATE, [48], window_s=0.15)
    assert_silent_at(steady, RATE, [84])
    assert layers(osc)["octave"]["gain_db"] == -120.0 and layers(osc)["sine"]["gain_db"] == -12.0
    assert osc.ask("/synthd/layer/octave/status", reply="/synthd/status.reply")[0] == "octave"
    assert osc.ask("/synthd/layer/nope/gain", 0.0, reply="/fail")[1].startswith("no such layer")

    osc.send("/synthd/layer/octave/gain", -12.0)
    # the right hand's layer crossfades to the sine model; the left hand's plays on
    assert osc.ask("/synthd/layer/octave/model/load", "sine", reply="/done") == ["/synthd/layer/octave/model/load",
                                                                                 "sine"]
    x = record(jack_server, 0.9, [
        (0.1, lambda: midi_out.send_message([0x90, 72, 100])),
        (0.8, lambda: midi_out.send_message([0x80, 72, 0])),
    ])
    steady = x[int(0.3 * RATE):int(0.75 * RATE)]
    assert_plays(steady, RATE, [72], window_s=0.15)
    assert_silent_at(steady, RATE, [84])
    assert layers(osc)["octave"]["model"] == "sine"


def resolve(*argv: str) -> config_mod.DaemonConfig:
    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    return config_mod.resolve(parser.parse_args(list(argv)))


def test_layers_from_the_command_line_and_the_config_file(tmp_path):
    cfg = resolve("--model", "a/Pad One.ts", "--model", "b/pad one.ts", "--patch", "l.toml", "--patch", "r.toml")
    assert [(s.name, s.model, s.patch) for s in cfg.layers] == [("pad_one", "a/Pad One.ts", "l.toml"),
                                                                ("pad_one-2", "b/pad one.ts", "r.toml")]
    assert (cfg.model, cfg.patch) == ("a/Pad One.ts", "l.toml")
    with pytest.raises(ConfigError, match="2 --model and 1 --patch: give one --patch per --model"):
        resolve("--model", "a.ts", "--model", "b.ts", "--patch", "l.toml")
    file = tmp_path / "rig.toml"
    file.write_text('[[layer]]\nname = "pad"\nmodel = "pad.ts"\npatch = "l.toml"\n\n[[layer]]\nmodel = "lead.ts"\n')
    cfg = resolve("--config", str(file))
    assert [(s.name, s.model, s.patch) for s in cfg.layers] == [("pad", "pad.ts", "l.toml"), ("lead", "lead.ts", None)]
    assert len(resolve("--config", str(file), "--model", "solo.ts").layer_specs()) == 1  # the command line wins
    file.write_text('model = "x.ts"\n[[layer]]\nmodel = "pad.ts"\n')
    with pytest.raises(ConfigError, match=r"rig.toml:1: model: give either `model` \(and `patch`\) or \[\[layer\]\]"):
        resolve("--config", str(file))
    file.write_text('[[layer]]\nmodel = "pad.ts"\nname = "Pad!"\n')
    with pytest.raises(ConfigError, match=r"rig.toml:3: \[\[layer\]\] #1 name: 'Pad!' is not a layer name"):
        resolve("--config", str(file))
    file.write_text('[[layer]]\nmodel = "a.ts"\nname = "x"\n[[layer]]\nmodel = "b.ts"\nname = "x"\n')
    with pytest.raises(ConfigError, match="two layers are called 'x'"):
        resolve("--config", str(file))
