"""Voices live: chords, stealing, the sustain pedal and MPE per-note bend, played on rtmidi's JACK
MIDI port into `synthd run` and read at its JACK output, on a model with a pitch input."""

from __future__ import annotations

import time

import numpy as np
import pytest

from support.jack import jack_server, record  # noqa: F401  (fixture)
from support.midi import midi_out  # noqa: F401  (fixture)
from support.pitched_model import build_pitched_model
from support.spectrum import assert_plays, assert_silent_at
from support.synthd_proc import OscClient, SynthdProcess, rms_db

RATE = 48000
KEYS = """version = 1
[output]
gain_db = -20.0
[gate]
open = false
attack = 0.005
release = 0.05
velocity = false
"""
MPE = KEYS + """[midi]
mpe = "lower"
"""


@pytest.fixture(scope="module")
def synthd(jack_server, midi_out, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("voices")
    build_pitched_model(d / "pitched.ts")
    (d / "keys.toml").write_text(KEYS)
    (d / "mpe.toml").write_text(MPE)
    with SynthdProcess(jack_server, "--model", str(d / "pitched.ts"), "--patch", str(d / "keys.toml"),
                       "--midi-in", "d2sender") as proc:
        yield proc


@pytest.fixture
def osc(synthd):
    c = OscClient(synthd.osc_address)
    yield c
    c.close()


def span(x: np.ndarray, a: float, b: float) -> np.ndarray:
    return x[int(a * RATE):int(b * RATE)]


def plays(x: np.ndarray, notes: list[int], window_s: float = 0.2, **kwargs) -> None:
    # medians over short windows (five or more): a period the dummy server drops under load
    # smears the one window it falls in
    assert_plays(x, RATE, notes, window_s=window_s, **kwargs)


def test_a_chord_gives_three_pitches(jack_server, synthd, midi_out, osc):  # noqa: F811
    chord = [57, 61, 64]
    before = osc.status()
    x = record(jack_server, 1.6, [
        *[(0.2, lambda n=n: midi_out.send_message([0x90, n, 100])) for n in chord],
        *[(1.2, lambda n=n: midi_out.send_message([0x80, n, 0])) for n in chord],
    ])
    assert rms_db(span(x, 0.0, 0.15)) < -80
    plays(span(x, 0.4, 1.15), chord, window_s=0.15)
    assert rms_db(span(x, 1.4, 1.6)) < -80
    status = osc.status()
    assert status["voices"] == 8 and status["voices_sounding"] == 0
    # the five silent voices were left out of the decode calls while the chord sounded (1 s, 187
    # calls), and no call was made at all while nothing did
    assert status["skipped_rows"] - before["skipped_rows"] >= 5 * 150
    assert status["skipped_calls"] - before["skipped_calls"] >= 50


def test_a_ninth_note_steals_the_oldest_and_is_heard(jack_server, synthd, midi_out, osc):  # noqa: F811
    notes = [48, 50, 52, 53, 55, 57, 59, 60, 74]
    before = osc.status()["voices_stolen"]
    x = record(jack_server, 1.4, [
        *[(0.1 + 0.02 * i, lambda n=n: midi_out.send_message([0x90, n, 100])) for i, n in enumerate(notes)],
        *[(1.2, lambda n=n: midi_out.send_message([0x80, n, 0])) for n in notes],
    ])
    status = osc.status()
    assert status["voices_stolen"] == before + 1
    plays(span(x, 0.5, 1.15), [74, 60], level=0.05)
    assert_silent_at(span(x, 0.5, 1.15), RATE, [48])


def test_the_sustain_pedal_holds_a_released_note(jack_server, synthd, midi_out):  # noqa: F811
    x = record(jack_server, 1.5, [
        (0.1, lambda: midi_out.send_message([0xB0, 64, 127])),
        (0.2, lambda: midi_out.send_message([0x90, 62, 100])),
        (0.4, lambda: midi_out.send_message([0x80, 62, 0])),
        (1.1, lambda: midi_out.send_message([0xB0, 64, 0])),
    ])
    # key up, pedal down: the note goes on (read over five windows: the median of the default's two
    # is their mean, which one dropped period skews)
    plays(span(x, 0.5, 1.05), [62], window_s=0.1)
    assert rms_db(span(x, 1.3, 1.5)) < -80  # pedal up: released


def test_mpe_per_note_bend_moves_one_note_only(jack_server, synthd, midi_out, osc):  # noqa: F811
    # the same daemon, its patch swapped for one with an MPE zone (the voices go on)
    assert osc.ask("/synthd/patch/load", "mpe", reply="/done") == ["/synthd/patch/load", "mpe"]
    up_two = 8192 + round(2 / 48 * 8192)  # +2 of the default 48 semitones
    x = record(jack_server, 2.2, [
        (0.1, lambda: midi_out.send_message([0x91, 60, 100])),  # member channel 2
        (0.1, lambda: midi_out.send_message([0x92, 67, 100])),  # member channel 3
        (1.0, lambda: midi_out.send_message([0xE1, up_two & 0x7F, up_two >> 7])),
        (2.1, lambda: midi_out.send_message([0x81, 60, 0])),
        (2.1, lambda: midi_out.send_message([0x82, 67, 0])),
    ])
    plays(span(x, 0.25, 0.95), [60, 67], window_s=0.14)
    plays(span(x, 1.1, 2.05), [62, 67])
    assert_silent_at(span(x, 1.1, 2.05), RATE, [60], window_s=0.19)


def test_a_flood_of_note_ons_is_counted_as_steals_and_all_notes_off_clears_it(synthd, midi_out, osc):  # noqa: F811
    before = osc.status()
    # 10 000 note-ons a second for half a second, each released 20 ms later; JACK's MIDI buffers
    # drop what does not fit a period (note-offs too), the rest reaches the voices
    t0 = time.monotonic()
    pending: list[tuple[float, int]] = []
    for i in range(5000):
        while time.monotonic() < t0 + i / 10000:
            pass
        note = 36 + (i * 7) % 60
        midi_out.send_message([0x90, note, 100])
        pending.append((time.monotonic() + 0.02, note))
        while pending and pending[0][0] <= time.monotonic():
            midi_out.send_message([0x80, pending.pop(0)[1], 0])
    for _, note in pending:
        midi_out.send_message([0x80, note, 0])
    time.sleep(0.3)
    after = osc.status()
    assert synthd.alive and after["voices_stolen"] - before["voices_stolen"] > 100, (before, after)
    assert after["nan_blocks"] == before["nan_blocks"]
    # a note-off JACK dropped leaves its note held, in any synth: All Notes Off is the panic button
    midi_out.send_message([0xB0, 123, 0])
    deadline = time.monotonic() + 5.0  # the MIDI reader may still be working through the flood
    while osc.status()["voices_sounding"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert osc.status()["voices_sounding"] == 0
    osc.send("/synthd/voices")
    assert [r[1][1] for r in osc.replies(count=8)] == ["free"] * 8
