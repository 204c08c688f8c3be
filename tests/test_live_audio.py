"""Live output through a real, paced JACK dummy server (PortAudio's JACK host API), recorded
by a JACK client; and the listing commands against the same server.

Underruns: `ring_underruns` counts callbacks that found synthd's ring short (the render
thread fell behind). It stays 0 unless the JACK server itself missed cycles: its catch-up
cycles come faster than real time and can drain the ring, so the tests allow at most one per
server xrun seen by the recorder, and none when the server kept time. PortAudio's `output_underflow` flag reports any xrun of
the JACK server, which on an overloaded host (a non-realtime dummy server sharing two cores)
happens whatever the clients do; bench/soak.py reports both over minutes.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from support.jack import Recorder, jack_server  # noqa: F401  (jack_server is a fixture)
from support.nnmodels import build_frame_probe, build_toy_model
from synthd.audio import LiveOutput
from synthd.engine import Engine
from synthd.model import load_model

SR = 48000
TOY_RMS = 0.0988  # the toy model at its defaults


@pytest.fixture(scope="module")
def portaudio_on_jack(jack_server):  # noqa: F811
    jack_server.use_in_this_process()
    torch.set_num_threads(1)
    yield jack_server


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("live")
    return build_toy_model(d / "toy.ts"), build_toy_model(d / "toy44.ts", sample_rate=44100)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def record_live(server, engine: Engine, seconds: float, during=None) -> tuple[np.ndarray, LiveOutput, int]:
    """Play `engine` live for `seconds` while recording it; `during(output)` runs halfway.
    Returns the recording, the output and the JACK server's xruns seen meanwhile."""
    output = LiveOutput(engine, channels=engine.channels)
    output.start()
    with Recorder(server.name, channels=engine.channels, seconds=seconds + 2) as rec:
        rec.connect_from(rec.wait_for_ports(r"PortAudio.*:out_", engine.channels))
        rec.start()
        rec.wait_frames(int(seconds * SR / 2))
        if during is not None:
            during(output)
        rec.wait_frames(int(seconds * SR))
        output.stop(fade_s=0.02)
        time.sleep(0.1)
        return rec.data(), output, rec.xruns


def test_plays_sound_and_a_gain_step_shows(portaudio_on_jack, toy_models):
    engine = Engine(load_model(toy_models[0]), channels=2, block_frames=256)
    data, output, xruns = record_live(portaudio_on_jack, engine, 1.6, lambda _: engine.set_gain_db(-20.0))
    assert output.device_name == "system" and output.sample_rate == SR
    half = int(0.8 * SR)
    before, after = data[half - 24000:half - 2400], data[-30000:-6000]
    assert rms(before) == pytest.approx(TOY_RMS, rel=0.05)  # sound, at the model's level
    assert rms(after) == pytest.approx(TOY_RMS / 10, rel=0.05)  # -20 dB
    # A mono model on both outputs, while it plays: PortAudio's ports go away one at a time
    # when the stream closes, so the teardown periods may differ between channels.
    played = data[: int(1.6 * SR)]
    differ = np.flatnonzero(played[:, 0] != played[:, 1])
    assert differ.size == 0, f"channels differ from frame {differ[0]} of {len(data)}"
    assert output.ring_underruns <= xruns, output.stats()
    assert output.callbacks > 200


def test_gain_skips_the_render_ahead_ring(portaudio_on_jack, tmp_path):
    """Gain (and gate) act in the audio callback: sent together with a control change, the gain
    is heard at least one block before the control, which waits behind the rendered audio."""
    engine = Engine(load_model(build_frame_probe(tmp_path / "probe.ts")), channels=1, block_frames=256)
    engine.set_latent(0, 1.0)

    def together(output: LiveOutput) -> None:
        assert output.target_fill >= 2 * 256
        engine.set_gain_db(-20.0)
        engine.set_latent(0, 0.5)

    data, output, xruns = record_live(portaudio_on_jack, engine, 1.2, together)
    level = np.abs(data[:, 0])
    # a period the busy dummy server drops reads as silence; the probe never goes below 0.025
    sounding = level > 0.01
    start = int(0.3 * SR)  # steady at 0.5 well before the change
    assert level[start:start + 4800][sounding[start:start + 4800]].min() == pytest.approx(0.5, rel=1e-3)
    gain_at = start + int(np.flatnonzero(sounding[start:] & (level[start:] < 0.45))[0])  # the 10 ms gain glide
    latent_at = start + int(np.flatnonzero(sounding[start:] & (level[start:] < 0.04))[0])  # 0.05 -> 0.025
    assert latent_at - gain_at >= 256, (gain_at, latent_at)
    assert level[latent_at + 480:latent_at + 4800].max() == pytest.approx(0.025, rel=1e-2)


def test_stop_fades_out_instead_of_cutting(portaudio_on_jack, toy_models):
    engine = Engine(load_model(toy_models[0]), channels=1)
    data, output, xruns = record_live(portaudio_on_jack, engine, 0.6)
    sound = np.flatnonzero(np.abs(data[:, 0]) > 1e-4)
    tail = np.abs(data[sound[-1] - 480:sound[-1] + 1, 0])
    steady = np.abs(data[SR // 4:SR // 2, 0]).max()
    assert tail[-48:].max() < 0.2 * steady  # the last millisecond before silence is quiet
    assert output.ring_underruns <= xruns, output.stats()


def test_model_at_another_rate_is_resampled_not_detuned(portaudio_on_jack, toy_models):
    engine = Engine(load_model(toy_models[1]), channels=1)
    assert engine.sample_rate == 44100
    data, output, xruns = record_live(portaudio_on_jack, engine, 1.2)
    assert output.sample_rate == SR and output.stats()["resampling"]
    steady = data[SR // 4:SR // 4 + SR // 2, 0]
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady))))
    assert np.argmax(spectrum) * SR / len(steady) == pytest.approx(220.0, abs=2.5)
    assert output.ring_underruns <= xruns, output.stats()


def test_swap_while_playing_never_stops_the_stream(portaudio_on_jack, toy_models):
    engine = Engine(load_model(toy_models[0]), channels=1)
    other = load_model(toy_models[0])
    data, output, xruns = record_live(portaudio_on_jack, engine, 1.2,
                               lambda _: engine.swap_model(other, crossfade_s=0.05))
    playing = data[SR // 10:int(1.1 * SR), 0]
    windows = np.abs(playing[: len(playing) // 256 * 256]).reshape(-1, 256).max(axis=1)
    # no silent stretch: the same sine at two phases can cancel in the middle of the 50 ms
    # crossfade (a few blocks near silence when the phases happen to be opposite), but a
    # stream that stopped would be silent from then on
    quiet = np.flatnonzero(windows <= 0.01)
    assert quiet.size == 0 or (quiet.size <= 10 and quiet[-1] - quiet[0] < 10), quiet
    assert output.ring_underruns <= xruns and engine.stats()["voices"] == 1


def _synthd(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthd", *args], env=server.env(),
                          capture_output=True, text=True, timeout=60)


def test_devices_lists_the_jack_device(portaudio_on_jack):
    result = _synthd(portaudio_on_jack, "devices")
    assert result.returncode == 0, result.stderr
    assert "system" in result.stdout and "JACK Audio Connection Kit" in result.stdout
    assert "[default output]" in result.stdout


def test_ports_lists_jack_midi_ports(portaudio_on_jack):
    import rtmidi

    out = rtmidi.MidiOut(rtapi=rtmidi.API_UNIX_JACK, name="keys")
    out.open_virtual_port("d1-keyboard")
    try:
        result = _synthd(portaudio_on_jack, "ports")
    finally:
        out.close_port()
        out.delete()
    assert result.returncode == 0, result.stderr
    assert "MIDI API: Jack" in result.stdout
    inputs = result.stdout.split("MIDI outputs")[0]
    assert "d1-keyboard" in inputs


def test_portaudio_is_released_within_its_bound(portaudio_on_jack, monkeypatch):
    """The daemon's exit terminates PortAudio itself: on a live server it finishes, and a
    terminate that hangs (a busy or dying JACK server) is given up after the bound."""
    import threading

    import sounddevice as sd

    from synthd.audio import release_portaudio

    try:
        assert release_portaudio(timeout=5.0) and sd._initialized == 0
    finally:
        sd._initialize()
    held = threading.Event()

    def hang() -> None:
        held.wait(10)
        sd._initialized = 0

    monkeypatch.setattr(sd, "_initialized", 1)
    monkeypatch.setattr(sd, "_terminate", hang)
    started = time.monotonic()
    assert not release_portaudio(timeout=0.2)
    assert time.monotonic() - started < 1.0
    held.set()
    for thread in threading.enumerate():  # the stuck call ends before the real PortAudio is put back
        if thread.name == "synthd-portaudio-exit":
            thread.join(5)


def test_a_render_not_yet_due_waits_for_events_of_the_same_cycle(portaudio_on_jack, toy_models):
    """With `event_grace_s`, a render whose block is not due for a period runs its hooks (the
    MIDI port's drain) that long after the callback that woke it, so a note another client of
    the server took in during that cycle is in the block; a render that is due waits for none."""
    engine = Engine(load_model(toy_models[0]), channels=1, block_frames=256)
    output = LiveOutput(engine, channels=1)
    output.event_grace_s = 0.002
    seen: list[tuple[float, int]] = []  # (seconds since the callback, ring fill) at each hook
    output.before_render.append(lambda: seen.append((time.monotonic() - output._callback_at,
                                                     output._ring.fill)))
    output.start()
    time.sleep(1.0)
    output.stop(fade_s=0.02)
    waited = [delay for delay, fill in seen if fill >= output.block_frames]
    assert len(waited) > 100
    assert min(waited) >= 0.002
    # the wait moves each render, not the cadence: one block per callback
    assert abs(len(seen) - output.callbacks) <= output.target_fill // output.block_frames + 1


@pytest.mark.parametrize("stall, cause", [("sleep", "waiting"), ("spin", "computing"), ("garbage", "computing")])
def test_a_late_underrun_is_traced_with_what_held_the_render_thread(portaudio_on_jack, toy_models, stall, cause):
    """A render held 30 ms (three times the ring's time) empties the ring while the server keeps
    time: the trace of that late underrun shows the render, and splits its time into computing
    (matrix products; the garbage collector's share of it apart) or waiting off the CPU (a sleep,
    as for the interpreter's lock)."""
    engine = Engine(load_model(toy_models[0]), channels=1, block_frames=256)
    output = LiveOutput(engine, channels=1)
    held = []

    def hold() -> None:
        # held 3 times, 0.5 s apart: a host's stall of the audio server during a hold makes it an
        # xrun (the server's), and one of the render thread during a hold adds its own cause
        if output.callbacks > 100 * (len(held) + 1) and len(held) < 3:
            held.append(time.monotonic())
            if stall == "sleep":
                time.sleep(0.03)
            elif stall == "garbage":
                # collections of the youngest generation, each over 20 000 new objects (1-2 ms):
                # a collection holds the interpreter's lock, so between them the callback gets its
                # turn, or the server would call its lateness an xrun
                gc.disable()
                try:
                    while time.monotonic() - held[-1] < 0.03:
                        junk = [[i] for i in range(20000)]
                        gc.collect(0)
                        del junk
                        time.sleep(0)
                finally:
                    gc.enable()
            else:  # work that lets go of the interpreter's lock, as a model call does
                a = torch.ones(192, 192)
                while time.monotonic() - held[-1] < 0.03:
                    a = torch.tanh(a @ a)

    output.before_render.append(hold)
    output.start()
    time.sleep(1.8)
    output.stop(fade_s=0.02)
    traces, lost = output.late_traces()
    assert output.late_underruns >= 1 and lost == 0, output.stats()
    assert 1 <= len(traces) <= output.late_underruns
    # the traces that show a held render (in ms): one the host made may come between them, and a
    # host's stall during a hold can outweigh it (seen once in 36 runs: 17 ms off the CPU in a
    # spin): one of them at least reads the hold's cause
    holds = [t for t in traces if (t.renders[:, 2] - t.renders[:, 1]).max() >= 29.0]
    assert holds, [t.describe() for t in traces]
    first = next((t for t in holds if t.cause() == cause), None)
    assert first is not None, [t.describe() for t in holds]
    slow = first.renders[np.argmax(first.renders[:, 2] - first.renders[:, 1])]
    assert first.renders[:, 7].max() > 0 and slow[7] < 10.0  # model calls: timed, and not what held the render
    parts = first.components()
    assert parts["cpu" if cause == "computing" else cause] >= 25.0, first.describe()
    assert (parts["gc"] >= 3.0) == (stall == "garbage"), first.describe()
    assert f"late underrun at {first.at:.4f} s: {cause} (" in first.describe()
    assert output.late_traces() == ([], 0)  # taken once


def test_a_callback_held_by_the_interpreters_lock_is_counted(portaudio_on_jack, toy_models):
    """The device's callback runs Python code, so another thread that holds the interpreter's lock
    (here a 20-35 ms collection of 4 million references) holds the callback too, and the server
    calls the late cycle an xrun: the output counts such callbacks and the longest hold, and reads
    no hold anywhere near as long while nothing holds the lock."""
    engine = Engine(load_model(toy_models[0]), channels=1, block_frames=256)
    output = LiveOutput(engine, channels=1)
    output.start()
    time.sleep(0.5)
    quiet = 1000.0 * output.callback_held_max_s
    gc.disable()
    try:
        junk = [list(range(200)) for _ in range(20000)]
        began = time.monotonic()
        gc.collect(0)
        collected_ms = 1000.0 * (time.monotonic() - began)
        time.sleep(0.2)
        output.stop(fade_s=0.02)
        # freeing the 4 million references holds the lock too, for 8-34 ms: only once the output
        # has stopped, so the collection is the one hold it reads
        del junk
    finally:
        gc.enable()
    stats = output.stats()
    assert quiet < 10.0, quiet  # a host's stall of the callback's thread reads as a hold too
    assert stats["callbacks_held"] >= 1
    # never longer than the hold; shorter by the cycles the server skipped meanwhile (see LiveOutput)
    # (a host's stall of the callback's thread during the collection adds to it: up to the quiet bound)
    assert 0.4 * collected_ms <= stats["callback_held_ms_max"] <= collected_ms + 10.0, (stats, collected_ms)
