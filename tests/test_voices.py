"""Voices offline: allocation, envelopes, chords, stealing, sustain and MPE through the engine and
control surface that `synthd run` and `synthd render` share, on a model with a pitch input."""

from __future__ import annotations

import numpy as np
import pytest

from support.pitched_model import build_pitched_model
from support.spectrum import assert_plays, assert_silent_at
from synthd.controls import ControlSurface, engine_for, voice_count
from synthd.dsp import Envelope
from synthd.midi import MidiRouter
from synthd.model import load_model
from synthd.patch import PatchError, default_patch, parse_patch
from synthd.voices import VoiceAllocator

RATE = 48000
KEYS = """version = 1
[gate]
open = false
attack = 0.005
release = 0.05
velocity = false
"""


@pytest.fixture(scope="module")
def pitched(tmp_path_factory):
    return build_pitched_model(tmp_path_factory.mktemp("voices") / "pitched.ts")


def rig(path, patch_text: str = KEYS):
    patch = parse_patch(patch_text)
    engine = engine_for(load_model(path), patch, channels=1, block_frames=256, threads=1)
    surface = ControlSurface(engine, patch)
    return engine, surface, MidiRouter(surface)


def play(engine, seconds: float) -> np.ndarray:
    return np.concatenate([engine.render(256) for _ in range(int(seconds * RATE) // 256)])[:, 0]


def seconds(t: float) -> int:
    return int(t * RATE)


# ---------------------------------------------------------------- allocation and envelope


def test_allocation_round_robin_then_oldest_released_then_oldest_held():
    a = VoiceAllocator(3)
    assert [a.allocate(n, 0) for n in (60, 61, 62)] == [(0, False), (1, False), (2, False)]
    assert a.release(61, 100, 1000) == 1 and a.release(60, 200, 1000) == 0
    # both still sound (until 1100 and 1200): the one released first is stolen
    assert a.allocate(63, 300) == (1, True) and a.stolen == 1
    assert a.allocate(64, 400) == (0, True)
    assert a.allocate(65, 500) == (2, True)  # every voice held: the oldest held note gives way
    assert a.stolen == 3
    assert a.allocate(65, 600) == (2, True) and a.stolen == 3  # a repeated key retriggers its voice
    for key in (63, 64, 65):
        a.release(key, 1000, 10)
    # all free again: round robin goes on after the last voice given, not back to voice 0
    assert a.allocate(70, 2000) == (0, False) and a.allocate(71, 2000) == (1, False)


def test_sustain_pedal_holds_released_keys_until_it_goes_up():
    a = VoiceAllocator(4)
    a.allocate(60, 0)
    a.pedal(True, 10, 100)
    assert a.release(60, 20, 100) is None and a.held() == [0]
    assert a.pedal(False, 30, 100) == [0] and a.held() == []
    assert a.sounding(0, 129) and not a.sounding(0, 130)


def test_envelope_attack_decay_sustain_release_and_a_fade_that_never_jumps():
    env = Envelope(attack=10, decay=10, sustain=0.5, release=20)
    assert not env.sounding
    env.start(1.0)
    x = env.process(40)
    assert x[9] == pytest.approx(1.0) and x[19] == pytest.approx(0.5) and x[-1] == pytest.approx(0.5)
    env.release()
    y = env.process(30)
    assert y[19] == 0.0 and not env.sounding
    assert np.abs(np.diff(np.concatenate([x, y]))).max() <= 0.1 + 1e-9  # linear segments, no step
    env.start(0.8)
    env.process(5)
    env.fade(4)
    z = env.process(6)
    assert z[3] == 0.0 and np.abs(np.diff(z)).max() < 0.11 and not env.sounding


# ---------------------------------------------------------------- patch


def test_voices_default_to_eight_with_a_pitch_input_and_one_without(pitched, tmp_path):
    from support.nnmodels import build_toy_model

    toy = load_model(build_toy_model(tmp_path / "toy.ts"))
    assert voice_count(default_patch(), load_model(pitched)) == 8
    assert voice_count(default_patch(), toy) == 1
    assert voice_count(parse_patch("version = 1\nvoices = 3\n"), toy) == 3
    with pytest.raises(PatchError, match=r"<patch>:2: voices: 0 is outside 1..64"):
        parse_patch("version = 1\nvoices = 0\n")
    with pytest.raises(PatchError, match=r"mpe: 'both' is not one of off, lower, upper"):
        parse_patch('version = 1\n[midi]\nmpe = "both"\n')
    with pytest.raises(PatchError, match=r"sustain: 1.5 is outside 0.0..1.0"):
        parse_patch("version = 1\n[gate]\nsustain = 1.5\n")


# ---------------------------------------------------------------- through the engine


def test_a_chord_plays_every_note_in_tune_and_only_while_held(pitched):
    engine, surface, _ = rig(pitched)
    chord = [57, 61, 64]  # A3, C#4, E4
    for n in chord:
        surface.note_on(n, 100, at=seconds(0.1))
    for n in chord:
        surface.note_off(n, at=seconds(1.2))
    x = play(engine, 1.6)
    assert np.abs(x[:seconds(0.09)]).max() == 0.0  # nothing before the notes: not even decoded
    assert_plays(x[seconds(0.2):seconds(1.1)], RATE, chord)
    # released: the DC blocker's own tail is all that is left
    assert engine.stats()["voices_sounding"] == 0 and np.abs(x[seconds(1.3):]).max() < 1e-4
    # each note starts at its own time, its voice afresh on the frame that carries its pitch
    onset = np.flatnonzero(np.abs(x) > 0)[0]
    assert seconds(0.1) <= onset <= seconds(0.1) + 8
    assert engine.stats()["skipped_calls"] > 0


def played_both_ways(play_once) -> list[dict]:
    """`play_once(alone)` -> (output, engine stats), with silent voices left out of the decode
    (alone) and with every voice decoded: checks that both sound and are the same to float
    rounding, and returns their stats in that order."""
    outputs, stats = zip(*(play_once(alone) for alone in (True, False)))
    assert np.abs(outputs[1]).max() > 0.1
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-5)
    return list(stats)


def test_silent_voices_are_not_decoded_and_the_output_is_the_same(pitched):
    """With fewer than half the voices sounding, only theirs are decoded (`decode_rows`): the
    output equals, to float rounding, that of decoding every voice on every call."""
    def play_once(alone: bool) -> tuple[np.ndarray, dict]:
        engine, surface, _ = rig(pitched)
        assert engine.voices == 8 and engine.model.decodes_rows
        engine.model.decodes_rows = alone  # False: a file without `decode_rows` (RAVE, older files)
        surface.note_on(60, 100, at=seconds(0.05))  # one voice, then three, then six, then one again
        for k, n in enumerate((64, 67)):
            surface.note_on(n, 90, at=seconds(0.3) + 37 * k)
        for k, n in enumerate((48, 52, 55)):
            surface.note_on(n, 80, at=seconds(0.6) + 101 * k)
        for n in (64, 67, 48, 52, 55):
            surface.note_off(n, at=seconds(0.9))
        surface.note_off(60, at=seconds(1.3))
        return play(engine, 1.5), engine.stats()

    stats = played_both_ways(play_once)
    assert stats[1]["skipped_rows"] == 0
    # one note for 0.25 s (7 rows skipped a call), three for 0.3 s (5) ...
    assert stats[0]["skipped_rows"] > 7 * seconds(0.2) / 256 + 5 * seconds(0.25) / 256
    assert stats[0]["skipped_calls"] == stats[1]["skipped_calls"] > 0


def test_silent_voices_left_out_through_steals_a_resampled_model_and_a_swap(pitched, tmp_path_factory):
    """The same as above where it is hardest: a 44.1 kHz model resampled to 48 kHz (a latent frame
    is not a whole number of engine samples) in 512-sample blocks (two frames a call), a steal, and
    a swap to another model while voices sound (the old model's voices go silent as new notes come)."""
    resampled = build_pitched_model(tmp_path_factory.mktemp("voices44") / "pitched44.ts", sample_rate=44100)
    patch = parse_patch(KEYS.replace("[gate]", "voices = 4\n[gate]"))

    def play_once(alone: bool) -> tuple[np.ndarray, dict]:
        model = load_model(resampled)
        model.decodes_rows = alone
        engine = engine_for(model, patch, channels=1, block_frames=512, threads=1)
        surface = ControlSurface(engine, patch)
        for k, n in enumerate((48, 55, 60, 64, 67)):  # the fifth steals the first
            surface.note_on(n, 100, at=seconds(0.05) + 997 * k)
        for n in (55, 60, 64):
            surface.note_off(n, at=seconds(0.3) + 211)
        surface.note_on(72, 90, at=seconds(0.5) + 13)
        x = [engine.render(512)[:, 0] for _ in range(seconds(0.6) // 512)]
        other = load_model(pitched)
        other.decodes_rows = alone
        engine.swap_model(other, crossfade_s=0.05)
        surface.note_on(76, 80, at=engine.clock + 301)
        surface.note_off(67, at=engine.clock + 4000)
        x += [engine.render(512)[:, 0] for _ in range(seconds(0.6) // 512)]
        assert surface.voices.stolen == 1
        return np.concatenate(x), engine.stats()

    stats = played_both_ways(play_once)
    assert stats[0]["skipped_rows"] > 0 and stats[1]["skipped_rows"] == 0


def upward_crossings(x: np.ndarray) -> np.ndarray:
    """Where `x` crosses zero going up, to a fraction of a sample."""
    k = np.flatnonzero((x[:-1] <= 0.0) & (x[1:] > 0.0))
    return k + x[k] / (x[k] - x[k + 1])


@pytest.mark.parametrize("restart", [True, False])
def test_a_free_voice_plays_its_new_note_at_its_pitch_from_the_first_sample(pitched, restart):
    engine, surface, _ = rig(pitched, KEYS.replace("[gate]", "voices = 2\n[gate]").replace("attack = 0.005",
                                                                                           "attack = 0.0"))
    engine.model.restartable = restart  # False: a file without `restart` (a RAVE export, an older file)
    surface.note_on(48, 100, at=seconds(0.05))  # C3 on voice 0 ...
    surface.note_off(48, at=seconds(0.2))
    surface.note_on(52, 100, at=seconds(0.25))  # ... E3 on voice 1 ...
    surface.note_off(52, at=seconds(0.4))
    frame = seconds(0.6) - seconds(0.6) % 256
    at = frame + 4  # ... and A4 on voice 0 again, early in a frame: its old pitch would glide across it
    surface.note_on(69, 100, at=at)
    x = play(engine, 0.8)
    onset = at + np.flatnonzero(np.abs(x[at:]) > 1e-4)[0]
    periods = np.diff(upward_crossings(x[onset:onset + 512]))
    if restart:
        # the voice starts afresh: 440 Hz from its first period, heard from the note's own sample
        assert onset - at < 24, onset - at
        assert np.abs(periods - RATE / 440.0).max() < 0.5, periods
    else:
        # it waits for the frame that carries its pitch (its voice glides from C3 across it)
        assert onset == frame + 256, (onset, at)
        assert np.abs(periods - RATE / 440.0).max() < 0.5, periods
    assert_plays(x[at + 2048:], RATE, [69])


def test_one_voice_opens_its_gate_on_its_own_pitch_and_glides_legato(pitched):
    """`voices = 1` with a pitch input: a note after silence is heard from its own sample at its
    own pitch (its gate moves with the frame that carries the pitch, and the voice restarts);
    a legato note glides from the held one without opening the gate again."""
    engine, surface, _ = rig(pitched, KEYS.replace("[gate]", "voices = 1\n[gate]").replace("attack = 0.005",
                                                                                           "attack = 0.0"))
    frame = seconds(0.3) - seconds(0.3) % 256
    surface.note_on(48, 100, at=seconds(0.05))  # C3, released ...
    surface.note_off(48, at=seconds(0.2))
    surface.note_on(69, 100, at=frame + 4)  # ... and A4 after its release, early in a frame
    surface.note_on(76, 100, at=seconds(0.5))  # E5, legato: a glide from A4, no new attack
    x = play(engine, 0.7)
    assert np.abs(x[seconds(0.25):frame]).max() < 1e-3  # silent between the notes (the DC blocker's tail)
    onset = frame + 4 + np.flatnonzero(np.abs(x[frame + 4:]) > 1e-3)[0]
    assert onset - (frame + 4) < 24, onset - frame
    periods = np.diff(upward_crossings(x[onset:onset + 512]))
    assert np.abs(periods - RATE / 440.0).max() < 0.5, periods
    assert_plays(x[seconds(0.35):seconds(0.5)], RATE, [69])
    assert_plays(x[seconds(0.6):], RATE, [76])
    # legato: no gap in any 5 ms around the change
    assert np.abs(x[seconds(0.48):seconds(0.56)]).reshape(-1, 240).max(1).min() > 0.05


def test_a_ninth_note_steals_the_oldest_without_a_click_and_is_heard(pitched):
    engine, surface, _ = rig(pitched, KEYS + "[output]\ngain_db = -24.0\n")  # eight notes, below the limiter
    notes = [48, 50, 52, 53, 55, 57, 59, 60]
    for i, n in enumerate(notes):
        surface.note_on(n, 100, at=seconds(0.05 + 0.01 * i))
    surface.note_on(80, 100, at=seconds(0.5))  # nine held notes on eight voices (G#5: clear of their partials)
    x = play(engine, 1.2)
    assert surface.voices.stolen == 1
    assert engine.stats()["voices_sounding"] == 8
    assert_plays(x[seconds(0.7):seconds(1.2)], RATE, [80, 50, 57], level=0.05)
    assert_silent_at(x[seconds(0.7):seconds(1.2)], RATE, [48])  # the oldest note gave way
    # the steal fades the old note out over 5 ms: no sample-to-sample step beyond the music's own
    steady = np.abs(np.diff(x[seconds(0.6):seconds(0.9)])).max()  # the chord after the steal
    around = np.abs(np.diff(x[seconds(0.49):seconds(0.53)])).max()
    assert around < 1.5 * steady, (around, steady)


def test_the_sustain_pedal_holds_notes_after_their_keys_go_up(pitched):
    engine, surface, router = rig(pitched)
    router.handle_bytes([0xB0, 64, 127], at=seconds(0.05))
    router.handle_bytes([0x90, 60, 100], at=seconds(0.1))
    router.handle_bytes([0x80, 60, 0], at=seconds(0.3))
    router.handle_bytes([0xB0, 64, 0], at=seconds(1.0))
    x = play(engine, 1.3)
    assert_plays(x[seconds(0.4):seconds(0.95)], RATE, [60])  # key up, pedal down: still sounding
    assert np.abs(x[seconds(1.12):]).max() < 1e-4  # pedal up: released (50 ms release)


def test_all_notes_off_releases_even_sustained_notes_and_all_sound_off_cuts_at_once(pitched):
    engine, surface, router = rig(pitched, KEYS.replace("release = 0.05", "release = 2.0"))
    router.handle_bytes([0xB0, 64, 127], at=seconds(0.05))
    router.handle_bytes([0x90, 60, 100], at=seconds(0.1))
    router.handle_bytes([0x90, 64, 100], at=seconds(0.1))
    router.handle_bytes([0x80, 60, 0], at=seconds(0.2))  # held on by the pedal
    router.handle_bytes([0xB0, 123, 0], at=seconds(0.5))  # all notes off: both released (2 s release)
    router.handle_bytes([0xB0, 120, 0], at=seconds(0.8))  # all sound off: cut within 5 ms
    x = play(engine, 1.0)
    assert [r[1] for r in surface.voice_snapshot()].count("held") == 0
    assert np.abs(x[seconds(0.6):seconds(0.75)]).max() > 0.05  # releasing, not cut
    # cut: what is left is the DC blocker settling
    assert np.abs(x[seconds(0.82):]).max() < 5e-3 and engine.stats()["voices_sounding"] == 0


MPE = KEYS + """[midi]
mpe = "lower"
mpe_bend_range = 48.0
"""


def test_mpe_per_note_bend_moves_one_note_only(pitched):
    engine, surface, router = rig(pitched, MPE)
    router.handle_bytes([0x91, 60, 100], at=seconds(0.05))  # member channel 2
    router.handle_bytes([0x92, 67, 100], at=seconds(0.05))  # member channel 3
    up_two = 8192 + round(2 / 48 * 8192)  # +2 semitones of 48
    router.handle_bytes([0xE1, up_two & 0x7F, up_two >> 7], at=seconds(0.6))
    x = play(engine, 1.2)
    assert_plays(x[seconds(0.1):seconds(0.55)], RATE, [60, 67])
    assert_plays(x[seconds(0.7):seconds(1.2)], RATE, [62, 67])
    assert_silent_at(x[seconds(0.7):seconds(1.2)], RATE, [60])
    rows = {r[0]: r for r in surface.voice_snapshot()}
    assert sorted((r[2], r[3], round(r[4], 2)) for r in rows.values() if r[1] == "held") == [(60, 2, 62.0), (67, 3, 67.0)]


def test_master_channel_bend_moves_every_note_and_the_patch_refuses_a_channel_with_mpe(pitched):
    engine, surface, router = rig(pitched, MPE)
    router.handle_bytes([0x91, 60, 100], at=seconds(0.05))
    router.handle_bytes([0x92, 64, 100], at=seconds(0.05))
    router.handle_bytes([0xE0, 0x7F, 0x7F], at=seconds(0.5))  # master channel 1: ±2 semitones
    x = play(engine, 1.0)
    assert_plays(x[seconds(0.6):seconds(1.0)], RATE, [62, 66], cents=8.0)
    with pytest.raises(PatchError, match="MPE zone sets its own channels"):
        parse_patch(MPE.replace('mpe = "lower"', 'mpe = "lower"\nchannel = 3'))


def test_a_flood_of_note_ons_steals_and_leaves_no_note_hanging(pitched):
    engine, surface, router = rig(pitched)
    rng = np.random.default_rng(1)
    # 10 000 note-ons a second for half a second, each with its note-off 20 ms later
    for i in range(5000):
        t = seconds(0.05) + i * RATE // 10000
        note = int(rng.integers(36, 96))
        router.handle_bytes([0x90, note, 100], at=t)
        router.handle_bytes([0x80, note, 0], at=t + seconds(0.02))
    x = play(engine, 1.0)
    stats = engine.stats()
    assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
    assert surface.voices.stolen > 1000 and stats["nan_blocks"] == 0
    # every note got its release: after the last one's, nothing sounds (bench/voices.py and
    # bench/soak.py time the render under such floods)
    assert stats["voices_sounding"] == 0 and np.abs(x[seconds(0.7):]).max() < 1e-3


def test_render_plays_an_mpe_chord_file_in_tune_and_the_same_twice(pitched, tmp_path):
    import subprocess
    import sys

    import mido
    import soundfile as sf

    midi = mido.MidiFile(ticks_per_beat=480)  # 120 bpm: 480 ticks = 0.5 s
    track = mido.MidiTrack()
    midi.tracks.append(track)
    chord = [(1, 57), (2, 61), (3, 64)]  # member channels 2, 3, 4 (mido counts from 0)
    for ch, note in chord:
        track.append(mido.Message("note_on", channel=ch, note=note, velocity=100, time=0))
    up = round(5 / 48 * 8192)  # the note on channel 3 (61) bends up 5 semitones, to 66
    track.append(mido.Message("pitchwheel", channel=2, pitch=up, time=960))  # at 1.0 s
    for i, (ch, note) in enumerate(chord):
        track.append(mido.Message("note_off", channel=ch, note=note, velocity=0, time=960 if i == 0 else 0))
    midi.save(tmp_path / "chord.mid")
    (tmp_path / "mpe.toml").write_text(MPE)
    outs = []
    for name in ("a.wav", "b.wav"):
        result = subprocess.run([sys.executable, "-m", "synthd", "render", "--model", str(pitched), "--midi",
                                 str(tmp_path / "chord.mid"), "--patch", str(tmp_path / "mpe.toml"), "--out",
                                 str(tmp_path / name), "--quiet", "--channels", "1"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    y, rate = sf.read(tmp_path / "a.wav", dtype="float32")
    assert rate == RATE
    assert_plays(y[seconds(0.1):seconds(0.95)], RATE, [57, 61, 64])
    # after the bend: 57 and 64 as before, 61 now on 66
    assert_plays(y[seconds(1.1):seconds(1.95)], RATE, [57, 64, 66])
    assert_silent_at(y[seconds(1.1):seconds(1.95)], RATE, [61])


def test_mpe_pressure_and_slide_ride_on_their_knob_for_one_note(pitched):
    engine, surface, router = rig(pitched, MPE + 'pressure_control = "timbre_1"\nslide_control = "timbre_2"\n')
    t1, t2 = surface.find("timbre_1"), surface.find("timbre_2")
    surface.set("timbre_1", 0.3, at=0)
    router.handle_bytes([0x91, 60, 100], at=100)  # member channel 2
    router.handle_bytes([0x92, 64, 100], at=100)  # member channel 3
    router.handle_bytes([0xD1, 64], at=2000)  # channel pressure on channel 2 only
    router.handle_bytes([0xB2, 74, 127], at=2000)  # slide on channel 3 only
    surface.set("timbre_1", 0.1, at=8000)  # the knob moves: the pressed note rides on it
    rows = {}
    for until in (6000, 12000):
        play(engine, (until - engine.clock) / RATE)
        held = {r[2]: r[0] for r in surface.voice_snapshot() if r[1] == "held"}
        target = engine._active.target
        rows[until] = {note: (target[v, t1.info.index], target[v, t2.info.index]) for note, v in held.items()}
    assert rows[6000][60][0] == pytest.approx(t1.at_wire(0.3 + 64 / 127))
    assert rows[6000][64][0] == pytest.approx(t1.at_wire(0.3))
    assert rows[6000][64][1] == pytest.approx(t2.at_wire(1.0)) and rows[6000][60][1] == pytest.approx(t2.model_value())
    assert rows[12000][60][0] == pytest.approx(t1.at_wire(0.1 + 64 / 127))
    assert rows[12000][64][0] == pytest.approx(t1.at_wire(0.1))


def test_a_note_released_before_its_steal_fade_ends_still_ends(pitched):
    # the ninth note waits 5 ms for the voice it steals to fade; its key-up comes sooner
    engine, surface, _ = rig(pitched)
    chord = [48, 50, 52, 53, 55, 57, 59, 60]
    for n in chord:  # events in time order, as a port delivers them
        surface.note_on(n, 100, at=seconds(0.05))
    surface.note_on(80, 100, at=seconds(0.2))
    surface.note_off(80, at=seconds(0.2) + 1)
    play(engine, 0.3)
    assert [r[1] for r in surface.voice_snapshot()].count("held") == 7
    for n in chord:
        surface.note_off(n, at=seconds(0.35))
    play(engine, 0.3)
    assert engine.stats()["voices_sounding"] == 0


def test_an_mpe_controller_configures_its_zone_and_bend_range_over_rpn(pitched):
    engine, surface, router = rig(pitched)  # the patch has no MPE zone: the controller asks for one
    for data in ([0xB0, 101, 0], [0xB0, 100, 6], [0xB0, 6, 3],  # MCM: lower zone, channels 2..4
                 [0xB1, 101, 0], [0xB1, 100, 0], [0xB1, 6, 12]):  # members' bend range: 12 semitones
        router.handle_bytes(data, at=0)
    router.handle_bytes([0x91, 60, 100], at=seconds(0.05))  # channel 2
    router.handle_bytes([0x94, 67, 100], at=seconds(0.05))  # channel 5: not a member, not bent
    router.handle_bytes([0xE1, 0x00, 0x60], at=seconds(0.1))  # channel 2: +half of 12 = +6 semitones
    router.handle_bytes([0xE0, 0x7F, 0x7F], at=seconds(0.1))  # master channel 1: ±2 on every note
    play(engine, 0.3)
    held = sorted((r[2], r[3], round(r[4], 2)) for r in surface.voice_snapshot() if r[1] == "held")
    assert held == [(60, 2, 68.0), (67, 5, 69.0)], held


def test_all_sound_off_before_a_note_has_started_still_silences_it(pitched):
    engine, surface, router = rig(pitched)
    router.handle_bytes([0x90, 60, 100], at=4800)  # its release waits for the end of its frame ...
    router.handle_bytes([0xB0, 120, 0], at=4810)  # ... and the cut comes within it
    play(engine, 0.3)
    assert engine.stats()["voices_sounding"] == 0


def test_a_zone_set_up_while_keys_are_held_strands_no_note_off(pitched):
    engine, surface, router = rig(pitched)
    router.handle_bytes([0x91, 60, 100], at=100)  # channel 2, no zone yet
    for data in ([0xB0, 101, 0], [0xB0, 100, 6], [0xB0, 6, 15]):  # now channel 2 is an MPE member
        router.handle_bytes(data, at=200)
    router.handle_bytes([0x81, 60, 0], at=seconds(0.1))
    play(engine, 0.4)
    assert engine.stats()["voices_sounding"] == 0


def test_the_pedal_and_the_panic_buttons_of_one_layers_channel_leave_the_other_alone(pitched):
    left = parse_patch(KEYS + "[midi]\nchannel = 1\n")
    right = parse_patch(KEYS + "[midi]\nchannel = 2\n")
    engines = [engine_for(load_model(pitched), p, channels=1, block_frames=256, threads=1) for p in (left, right)]
    surfaces = [ControlSurface(e, p) for e, p in zip(engines, (left, right))]
    router = MidiRouter(*surfaces)
    router.handle_bytes([0xB0, 64, 127], at=100)  # the pedal, on channel 1
    router.handle_bytes([0x90, 60, 100], at=200)
    router.handle_bytes([0x91, 64, 100], at=200)
    router.handle_bytes([0x80, 60, 0], at=300)
    router.handle_bytes([0x81, 64, 0], at=300)
    states = [[r[1] for r in s.voice_snapshot() if r[1] != "free"] for s in surfaces]
    assert states == [["sustained"], ["released"]]
    router.handle_bytes([0xB1, 123, 0], at=400)  # all notes off on channel 2: the left pedal stays
    assert [r[1] for r in surfaces[0].voice_snapshot() if r[1] != "free"] == ["sustained"]
