"""MIDI end to end: an rtmidi JACK MIDI port in the test drives `synthd run --midi-in`."""

from __future__ import annotations

import time

import numpy as np
import pytest

from support.jack import jack_server, record  # noqa: F401  (fixture)
from support.midi import jack_midi_out, midi_out  # noqa: F401  (fixture)
from support.nnmodels import build_toy_model
from support.synthd_proc import OscClient, SynthdProcess, dominant_hz, rms_db

RATE = 48000
PATCH = """version = 1
[gate]
open = false
attack = 0.005
release = 0.05
[midi]
note_low = 54
note_high = 78
[[control]]
label = "loudness"
cc = 7
[[control]]
label = "brightness"
cc = 1
hires = true
[[preset]]
name = "low"
program = 5
values = { pitch = 0.25 }
"""


@pytest.fixture(scope="module")
def synthd(jack_server, midi_out, tmp_path_factory):
    d = tmp_path_factory.mktemp("midi")
    build_toy_model(d / "toy.ts", latent_size=4)
    (d / "rig.toml").write_text(PATCH)
    with SynthdProcess(jack_server, "--model", str(d / "toy.ts"), "--patch", str(d / "rig.toml"),
                       "--midi-in", "d2sender") as proc:
        proc.patch_file = d / "rig.toml"
        yield proc


@pytest.fixture
def osc(synthd):
    c = OscClient(synthd.osc_address)
    yield c
    c.close()


def values(osc: OscClient) -> dict[str, float]:
    osc.send("/synthd/controls")
    return {r[1][0]: r[1][2] for r in osc.replies(count=4)}


def polled(get, check, timeout: float = 3.0) -> dict:
    """`get()` once `check` holds for it (MIDI travels through two JACK periods and a busy
    machine); the last one seen otherwise, for the assertion to show."""
    deadline = time.monotonic() + timeout
    while True:
        v = get()
        if check(v) or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


def settled(osc: OscClient, check) -> dict[str, float]:
    """Control values once `check(values)` holds (see `polled`)."""
    return polled(lambda: values(osc), check)


def w(x, a, b):
    return x[int(a * RATE):int(b * RATE)]


def test_startup_names_the_midi_port(synthd):
    assert "MIDI midi:d2sender:out (Jack)" in synthd.startup, synthd.startup


def test_cc_7_and_14_bit_move_controls(synthd, osc, midi_out):
    midi_out.send_message([0xB0, 7, 127])
    midi_out.send_message([0xB3, 1, 32])  # 14-bit MSB on channel 4 (omni patch)
    midi_out.send_message([0xB3, 33, 64])  # ... and its LSB
    hires = ((32 << 7) | 64) / 16383
    v = settled(osc, lambda v: v["brightness"] == pytest.approx(hires, abs=1e-6))
    assert v["loudness"] == 1.0 and v["brightness"] == pytest.approx(hires, abs=1e-6)


def test_notes_gate_and_set_pitch(jack_server, synthd, osc, midi_out):
    midi_out.send_message([0xB0, 7, 127])
    midi_out.send_message([0xB0, 1, 0])
    x = record(jack_server, 1.6, [
        (0.3, lambda: midi_out.send_message([0x90, 66, 127])),  # wire 0.5 -> 220 Hz on the toy
        (0.8, lambda: midi_out.send_message([0x90, 72, 127])),  # wire 0.75 -> 440 Hz (legato)
        (1.2, lambda: midi_out.send_message([0x80, 72, 0])),
        (1.2, lambda: midi_out.send_message([0x80, 66, 0])),
    ])
    assert rms_db(w(x, 0.0, 0.25)) < -80  # the patch starts closed
    assert rms_db(w(x, 0.45, 0.75)) > -20
    assert dominant_hz(w(x, 0.45, 0.75), RATE) == pytest.approx(220, rel=0.02)
    assert dominant_hz(w(x, 0.95, 1.15), RATE) == pytest.approx(440, rel=0.02)
    assert rms_db(w(x, 1.4, 1.6)) < -80  # closed again after the release


def test_program_change_recalls_a_preset(synthd, osc, midi_out):
    midi_out.send_message([0xC0, 5])
    assert settled(osc, lambda v: v["pitch"] == 0.25)["pitch"] == 0.25


def test_learn_binds_the_next_cc_and_saves(synthd, osc, midi_out):
    assert osc.ask("/synthd/learn", "timbre_1", reply="/done") == ["/synthd/learn", "timbre_1"]
    midi_out.send_message([0xB0, 30, 10])  # the learning move
    midi_out.send_message([0xB0, 30, 127])
    assert settled(osc, lambda v: v["timbre_1"] == 1.0)["timbre_1"] == 1.0
    assert osc.ask("/synthd/patch/save", reply="/done")[1] == str(synthd.patch_file)
    assert "cc = 30" in synthd.patch_file.read_text()


def test_sysex_flood_and_garbage_keep_it_playing(jack_server, synthd, osc, midi_out):
    before = osc.status()
    midi_out.send_message([0xB0, 7, 127])
    midi_out.send_message([0x90, 66, 100])
    playing = polled(osc.status, lambda st: st["gate"] == 1)
    assert playing["gate"] == 1, ("the note-on never opened the gate", playing, synthd.log[-2000:])
    for i in range(2000):
        midi_out.send_message([0xF0, 0x7D] + [i % 128] * 254 + [0xF7])
        if i % 20 == 19:
            time.sleep(0.005)  # about one JACK period: a port carries some kB per period
    x = record(jack_server, 0.4, [])
    after = osc.status()
    # counted; some may be dropped before synthd by JACK's per-period MIDI buffers (on a loaded
    # machine a few more: 1896 of 2000 seen)
    assert after["sysex"] - before["sysex"] >= 1800, (before, after)
    assert synthd.alive and after["gate"] == 1 and rms_db(x) > -25, (rms_db(x), after, synthd.log[-2000:])
    midi_out.send_message([0x80, 66, 0])


def test_virtual_port(jack_server, tmp_path):
    build_toy_model(tmp_path / "toy.ts", latent_size=4)
    (tmp_path / "p.toml").write_text('version = 1\n[[control]]\nlabel = "brightness"\ncc = 74\n')
    with SynthdProcess(jack_server, "--model", str(tmp_path / "toy.ts"), "--patch", str(tmp_path / "p.toml"),
                       "--midi-in", "virtual") as proc:
        # the module's synthd holds `synthd:midi_in`, so this one takes the next free name
        assert "MIDI midi:synthd-2:midi_in (Jack)" in proc.startup, proc.startup
        with jack_midi_out(jack_server, "d2virtual", connect_to="synthd-2:midi_in") as out:
            time.sleep(0.2)  # the JACK connection is made asynchronously
            out.send_message([0xB0, 74, 0])
            osc = OscClient(proc.osc_address)
            assert settled(osc, lambda v: v["brightness"] == 0.0)["brightness"] == 0.0
            osc.close()


def test_the_render_thread_takes_waiting_midi_but_never_waits_for_a_busy_surface(jack_server, tmp_path,
                                                                                monkeypatch):
    """`MidiInput.drain` as the render thread calls it before each block (`wait=False`): it hands
    over what has reached the port, at most `limit` messages, and gives up at once while a control
    surface is held (a model swap, a preset being written) instead of holding up the block."""
    import threading

    from synthd.controls import ControlSurface
    from synthd.engine import Engine
    from synthd.midi import MidiInput, MidiRouter
    from synthd.model import load_model
    from synthd.patch import parse_patch

    for key, value in jack_server.env({}).items():
        monkeypatch.setenv(key, value)
    engine = Engine(load_model(build_toy_model(tmp_path / "toy.ts", latent_size=4)), channels=1)
    surface = ControlSurface(engine, parse_patch(PATCH))
    with jack_midi_out(jack_server, "d2drain") as out:
        midi = MidiInput(MidiRouter(surface), "d2drain")
        try:
            midi._stop.set()  # the reader stops: only the drains below hand messages over
            midi._thread.join(timeout=2.0)
            time.sleep(0.2)  # the JACK connection is made asynchronously
            loudness = lambda: next(c for c in surface.controls if c.info.label == "loudness").wire  # noqa: E731

            out.send_message([0xB0, 7, 0])
            time.sleep(0.1)
            assert midi.drain(32, wait=False) == 1 and loudness() == 0.0

            held, done = threading.Event(), threading.Event()

            def hold() -> None:
                with surface.lock:
                    held.set()
                    done.wait(5.0)

            holder = threading.Thread(target=hold)
            holder.start()
            held.wait(5.0)
            out.send_message([0xB0, 7, 127])
            time.sleep(0.1)
            t0 = time.perf_counter()
            assert midi.drain(32, wait=False) == 0
            assert time.perf_counter() - t0 < 0.05 and loudness() == 0.0
            done.set()
            holder.join()
            assert midi.drain(32, wait=False) == 1 and loudness() == 1.0

            for value in range(40):
                out.send_message([0xB0, 7, value])
            time.sleep(0.1)
            assert midi.drain(32, wait=False) == 32 and midi.drain(32, wait=False) == 8
            assert loudness() == pytest.approx(39 / 127)
        finally:
            midi.close()
