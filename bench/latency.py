"""Control latency: time from an OSC gain step, or a MIDI note-on, to the change in
synthd's recorded output, on the JACK dummy server at 256-frame periods.

Each trial marks the recording (the first JACK period processed after the mark is the
earliest any client can react in), sends the message, and later finds the first recorded
sample where the output moved by more than 5 % of the step. Times count from the start of
that period, in recorded frames, so they stay exact when the server misses cycles; the wait
for that period (up to one) comes on top, and the verdict adds a whole one. They include
OSC/MIDI handling and PortAudio, up to synthd's JACK output port. Gain and gate act in the
audio callback, after the render-ahead ring; a third series times a control step, which goes
through the ring and the model. The dummy driver's playback latency is printed separately
(from `jack_lsp -l`), as it would be added before a loudspeaker.

The model is the tests' FrameProbe (a constant-level Nyquist carrier): gain and gate act
after the decoder, so the model's content does not change the path being timed, and a
constant |x| makes the change visible at the exact sample. Target: <= 15 ms in all.

A fourth series plays a model with a pitch input (8 voices, the tests' pitched model: a sine
at the pitch) and times a note-on in a busy chord: seven low notes held, then a high note
(C7), whose onset is read after a zero-phase high-pass that leaves the chord out. A voice's
envelope acts before the ring, so this path is the control step's: the voice restarts on the
frame that carries its pitch and its envelope opens at the note (a model file without
`restart` waits for the end of that frame). Target: <= 15 ms too.

With `--input`, the script times audio input instead (`synthd run --input virtual --channels
1`): a JACK client of its own plays a tone burst into synthd's input port, and a recorder
takes both synthd's output and that client's own output in the same periods, so the burst's
onset in the recording is exact (to the sample). Each trial pads the burst with a random
0..period-1 samples of silence, so its onset falls anywhere within a period, and leaves
0.5-0.7 s of silence after it (the input gate closes over 60 ms, after the encoder's
look-ahead): the output is silent again before the next. The burst is 150 ms of a 220 Hz sine
at -6 dBFS (starting at phase 0, 5 ms cosine fade-out): the default model (the tests' pitched
model, whose decoder plays a harmonic tone at its pitch input gated by voicing) answers only
pitched input, and a click of a few milliseconds is too short for its pitch tracker to call
voiced. A trial's latency runs from the burst's first sample in the player's channel to the
first sample of synthd's output whose magnitude reaches 5 % of that trial's response peak; a
trial is not timed when the output before the onset was not silent (above a tenth of that
threshold) or the response does not stand 20 dB above the output's noise floor (the RMS over
the 100 ms before the onset). The time includes the rest of the burst's period (input comes in
whole periods), the part of the model's encoder look-ahead the response waits for (a model
property, not synthd's; the printed look-ahead is the file's `latency.encode_samples`, and a
response can start earlier, as the encoder's analysis window reaches past the frame it
describes), the render-ahead ring and the decoder's latency, up to synthd's JACK output port
(the device's own buffer, which synthd's start-up figure counts, comes after it). It runs at
`--ahead-blocks` (2) and at 1, one synthd each, and prints the first and the last trials apart,
timed from the start of the burst's period (which takes the burst's random place out): the
latency should not move over a run. Target: <= 25 ms at 256-frame periods.

    .venv/bin/python bench/latency.py               # 20 trials each
    .venv/bin/python bench/latency.py --trials 40
    .venv/bin/python bench/latency.py --input                       # the pitched test model
    .venv/bin/python bench/latency.py --input --model runs/x/model.ts
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from live_rig import LiveRig, Recorder

THRESHOLD = 0.05  # fraction of the step that counts as "changed"
# --input: the burst played into synthd's input, and the target
BURST_HZ = 220.0
BURST_S = 0.15
BURST_AMP = 0.5  # -6 dBFS
BURST_FADE_S = 0.005
GAP_S = (0.5, 0.7)  # silence after each burst: the output is silent again long before the next
INPUT_TARGET_MS = 25.0


def first_change(x: np.ndarray, start: int, rate: int) -> int | None:
    """Index of the first sample from `start` that moved THRESHOLD of the way from the level
    just before `start` to the level 100 ms later. None when the trial cannot be timed: the
    level was not steady for 10 ms before `start` (an xrun, a release still sounding) or did
    not move afterwards."""
    pre = np.abs(x[max(0, start - rate // 100):start])
    post = np.abs(x[start + rate // 10:start + rate // 10 + rate // 50])
    if pre.size == 0 or post.size == 0:
        return None
    before, after = float(np.median(pre)), float(np.median(post))
    step = abs(after - before)
    if step < 0.1 * max(before, after, 1e-6) or np.ptp(pre) > THRESHOLD * step:
        return None
    edge = before + THRESHOLD * (after - before)
    seg = np.abs(x[start:start + rate // 10])
    hit = np.flatnonzero(seg < edge) if after < before else np.flatnonzero(seg > edge)
    return start + int(hit[0]) if hit.size else None


def first_rise(x: np.ndarray, start: int, rate: int, cutoff_hz: float = 1000.0) -> int | None:
    """Index of the first sample from `start` where a high note's envelope (the maximum of |x|
    over half a millisecond, after a zero-phase high-pass at `cutoff_hz` that removes a low
    chord) reaches THRESHOLD of its level 100 ms later; None when it was not quiet before."""
    seg = x[max(0, start - rate // 10):start + rate // 5].astype(np.float64)
    spec = np.fft.rfft(seg)
    spec[np.fft.rfftfreq(seg.size, 1.0 / rate) < cutoff_hz] = 0.0
    high = np.abs(np.fft.irfft(spec, seg.size))
    width = rate // 2000
    env = np.array([high[i:i + width].max() for i in range(seg.size - width)])
    offset = start - max(0, start - rate // 10)
    level = float(np.median(env[offset + rate // 10:offset + rate // 10 + rate // 50]))
    if level <= 0 or env[offset - rate // 100:offset].max() > THRESHOLD * level:
        return None
    hit = np.flatnonzero(env[offset:] > THRESHOLD * level)
    # the envelope's window looks half a millisecond ahead: count the rise where its window ends
    return start + int(hit[0]) + width if hit.size else None


def chord_trials(args: argparse.Namespace, rng: random.Random, scratch: str) -> tuple[list[float], int, int]:
    """Note-on latencies (ms) of a high note in a held 7-note chord; (times, untimed, underruns)."""
    from support.pitched_model import build_pitched_model

    model = build_pitched_model(Path(scratch) / "pitched.ts", partials=[1.0])
    patch = Path(scratch) / "keys.toml"
    patch.write_text("version = 1\n[output]\ngain_db = -12.0\n[gate]\nopen = false\nattack = 0.0\n"
                     "release = 0.05\nvelocity = false\n")
    times, untimed = [], 0
    extra = ("--patch", str(patch), "--ahead-blocks", str(args.ahead_blocks))
    with LiveRig(str(model), period=args.period, extra_args=extra) as rig:
        rig.watchdog(args.trials * 1.5 + 60.0)
        rate = rig.server.rate
        with Recorder(rig.server.name, channels=1, seconds=args.trials * 0.8 + 3, name="chord-rec") as rec:
            rec.connect_from(rec.wait_for_ports(r"PortAudio.*:out_0", 1))
            chord = [36, 40, 43, 47, 50, 53, 57]
            for note in chord:
                rig.midi.send_message([0x90, note, 100])
            time.sleep(0.3)
            rec.start()
            time.sleep(0.2)
            marks = []
            for _ in range(args.trials):
                time.sleep(rng.uniform(0.1, 0.2))
                sent = rec.mark()
                rig.midi.send_message([0x90, 96, 100])
                marks.append(sent)
                time.sleep(0.3)
                rig.midi.send_message([0x80, 96, 0])
                time.sleep(0.2)  # its release (50 ms) is over long before the next
            time.sleep(0.3)
            x = rec.data()[:, 0]
        status = rig.status()
    for key in marks:
        start = rec.mark_index(key)
        hit = None if start is None else first_rise(x, start, rate)
        if hit is None:
            untimed += 1
        else:
            times.append(1000.0 * (hit - start) / rate)
    return times, untimed, status["underruns"]


def tone_burst(rate: int, pad: int) -> np.ndarray:
    """`pad` samples of silence, then BURST_S of a BURST_HZ sine at BURST_AMP from phase 0 (its
    first sample is 0, the second is not), with a BURST_FADE_S cosine fade-out."""
    n = int(BURST_S * rate)
    x = BURST_AMP * np.sin(2 * np.pi * BURST_HZ * np.arange(n) / rate)
    fade = int(BURST_FADE_S * rate)
    x[-fade:] *= 0.5 * (1.0 + np.cos(np.pi * np.arange(fade) / fade))
    return np.concatenate([np.zeros(pad), x]).astype(np.float32)


def burst_onsets(played: np.ndarray, rate: int) -> list[int]:
    """Recording index of each burst's first sample in the player's channel: the sample before
    the first non-zero one after at least 100 ms of silence (the sine starts at phase 0)."""
    loud = np.flatnonzero(played != 0.0)
    if loud.size == 0:
        return []
    starts = loud[np.concatenate([[True], np.diff(loud) > rate // 10])]
    return [max(0, int(i) - 1) for i in starts]


def dbfs(amplitude: float) -> float:
    return 20.0 * float(np.log10(max(amplitude, 1e-9)))


def response_onset(y: np.ndarray, onset: int, rate: int) -> tuple[int | None, float, float]:
    """(index of the first output sample from `onset` whose magnitude reaches THRESHOLD of the
    response's peak, or None when the trial cannot be timed; the noise floor and the peak in dBFS).
    The response is looked for up to 0.5 s after the onset; the noise floor is the RMS over the
    100 ms before it. Not timed: output above a tenth of the threshold before the onset (the last
    trial still sounding), or a peak less than 20 dB above the noise floor."""
    pre = y[max(0, onset - rate // 10):onset].astype(np.float64)
    seg = np.abs(y[onset:onset + rate // 2].astype(np.float64))
    noise = float(np.sqrt(np.mean(pre ** 2))) if pre.size else 0.0
    peak = float(seg.max(initial=0.0))
    edge = THRESHOLD * peak
    if peak <= 0.0 or pre.size == 0 or np.abs(pre).max() > 0.1 * edge or peak < 10.0 * noise:
        return None, dbfs(noise), dbfs(peak)
    return onset + int(np.flatnonzero(seg >= edge)[0]), dbfs(noise), dbfs(peak)


def input_trials(args: argparse.Namespace, rng: random.Random, model: Path, ahead: int) -> dict:
    """One synthd with `--input virtual --ahead-blocks ahead`: `args.trials` bursts into its input,
    timed at its output. A dict: times (ms), framed (ms, the same from the start of the burst's
    period: steady while the latency holds still, whatever the burst's place in it), untimed, told (the start-up line's input latency, ms,
    None if it gives none), status (/synthd/status after the run), xruns (JACK server xruns seen),
    noise_db, peak_db (medians), recording, onsets, rate."""
    from support.jack import Player

    extra = ("--input", "virtual", "--channels", "1", "--ahead-blocks", str(ahead))
    with LiveRig(str(model), period=args.period, extra_args=extra) as rig:
        rig.watchdog(args.trials * (BURST_S + GAP_S[1]) * 1.5 + 60.0)
        rate = rig.server.rate
        m = re.search(r"; input (\S+?): ([\d.]+) ms to the output", rig.synthd.startup)
        told = float(m.group(2)) if m else None
        port = rig.status()["input"]  # the name JACK gave synthd's input client (see the report)
        seconds = args.trials * (BURST_S + GAP_S[1] + 0.02) + 2.0
        with Player(rig.server.name, name="bench-player") as player, \
                Recorder(rig.server.name, channels=2, seconds=seconds, name="input-rec") as rec:
            player.connect_to(port)
            rec.connect_from([rec.wait_for_ports(r"PortAudio.*:out_", 1)[0], player.port.name])
            xruns_before = rig.xruns
            rec.start()
            time.sleep(0.5)
            for _ in range(args.trials):
                player.play(tone_burst(rate, rng.randrange(args.period)))
                time.sleep(BURST_S + rng.uniform(*GAP_S))
            time.sleep(0.2)
            x = rec.data()
            xruns = rig.xruns - xruns_before
        status = rig.status()
    onsets = burst_onsets(x[:, 1], rate)
    times, framed, noise, peak = [], [], [], []
    for onset in onsets:
        hit, noise_db, peak_db = response_onset(x[:, 0], onset, rate)
        noise.append(noise_db)
        peak.append(peak_db)
        if hit is not None:
            times.append(1000.0 * (hit - onset) / rate)
            # the recording starts on a period boundary and grows by whole periods
            framed.append(1000.0 * (hit - onset + onset % args.period) / rate)
    return {"times": times, "framed": framed, "untimed": args.trials - len(times), "told": told,
            "status": status, "xruns": xruns,
            "noise_db": float(np.median(noise)) if noise else float("nan"),
            "peak_db": float(np.median(peak)) if peak else float("nan"),
            "recording": x, "onsets": np.array(onsets), "rate": rate}


def input_main(args: argparse.Namespace, rng: random.Random) -> int:
    """--input: the input-to-output latency at --ahead-blocks and at 1; the exit status."""
    from support.pitched_model import build_pitched_model

    aheads = list(dict.fromkeys([args.ahead_blocks, 1]))
    with tempfile.TemporaryDirectory(prefix="synthd-latency-") as scratch:
        model = Path(args.model) if args.model else build_pitched_model(Path(scratch) / "pitched.ts")
        runs = {ahead: input_trials(args, rng, model, ahead) for ahead in aheads}
    if args.dump:
        np.savez(args.dump, rate=runs[aheads[0]]["rate"],
                 **{f"{k}_ahead{a}": r[k] for a, r in runs.items() for k in ("recording", "onsets")})
    first = runs[aheads[0]]
    status = first["status"]
    rate = first["rate"]
    lag_ms = status["input_lag_ms"]
    period_ms = 1000.0 * args.period / rate
    print(f"latency --input: JACK dummy {rate} Hz / {args.period} frames, synthd block {status['block_frames']}, "
          f"model {status['model']} ({'--model' if args.model else 'the tests pitched model'}; encoder look-ahead "
          f"{lag_ms:.1f} ms), input {status['input']}")
    print(f"  burst: {BURST_HZ:g} Hz sine, {1000 * BURST_S:g} ms at {20 * np.log10(BURST_AMP):.0f} dBFS, onset at a "
          f"random place in a period; response onset: first output sample at {100 * THRESHOLD:g} % of the "
          f"trial's peak (median peak {first['peak_db']:.1f} dBFS, noise floor before the bursts "
          f"{first['noise_db']:.1f} dBFS)")
    worst: dict[int, float] = {}
    for ahead, run in runs.items():
        times, st = run["times"], run["status"]
        print(summary(f"input -> output, ahead {ahead}", times))
        median = float(np.median(times)) if times else float("nan")
        told = f"{run['told']:.1f} ms" if run["told"] is not None else "no figure (line changed?)"
        line = f"      synthd's start-up line says {told}"
        if run["told"] is not None and times:
            line += f" (the measured median is {run['told'] - median:.2f} ms below it)"
        if ahead != aheads[0] and first["times"] and times:
            line += (f"; {median - float(np.median(first['times'])):+.2f} ms against ahead {aheads[0]} "
                     f"(one block is {period_ms:.2f} ms)")
        print(line)
        framed = run["framed"]
        if len(framed) >= 10:  # the latency should hold still over the run; it moves in whole blocks if not
            print(f"      drift, timed from the start of the burst's period: first 5 trials median "
                  f"{np.median(framed[:5]):.2f} ms, last 5 {np.median(framed[-5:]):.2f} ms, all within "
                  f"{min(framed):.2f}..{max(framed):.2f} ms")
        print(f"      /synthd/status after the run: underruns {st['underruns']} (late {st['late_underruns']}, "
              f"after a server xrun {st['xrun_underruns']}; PortAudio output underflows {st['output_underflows']}), "
              f"input underruns {st['input_underruns']}, input overruns {st['input_overruns']}, input fault "
              f"{st['input_fault'] or 'none'}; render ms p99 {st['render_ms_p99']:.2f} (a period is "
              f"{period_ms:.2f}); JACK server xruns seen {run['xruns']}; untimed trials {run['untimed']}")
        worst[ahead] = max(times) if times else float("inf")
    for ahead, run in runs.items():
        ok = run["untimed"] == 0 and worst[ahead] <= INPUT_TARGET_MS
        print(f"  target (<= {INPUT_TARGET_MS:g} ms at {args.period}-frame periods, worst trial), ahead {ahead}: "
              f"{'met' if ok else 'NOT met'} (worst {worst[ahead]:.2f} ms; the model's encoder looks ahead "
              f"{lag_ms:.1f} ms; untimed {run['untimed']})")
    first_ok = first["untimed"] == 0 and worst[aheads[0]] <= INPUT_TARGET_MS
    return 0 if first_ok else 1


def playback_latency(env: dict[str, str]) -> int:
    """The JACK server's playback latency of system:playback_1 in frames (from jack_lsp -l)."""
    out = subprocess.run(["jack_lsp", "-l", "system:playback_1"], env=env, capture_output=True,
                         text=True, timeout=10).stdout
    m = re.search(r"playback latency = \[ *(\d+) +(\d+) *\]", out)
    if not m:
        raise RuntimeError(f"jack_lsp -l gave no playback latency: {out!r}")
    return int(m.group(2))


def summary(name: str, ms: list[float]) -> str:
    a = np.array(ms)
    if a.size == 0:
        return f"  {name:<22} no trial could be timed"
    return (f"  {name:<22} median {np.median(a):6.2f} ms, mean {a.mean():6.2f}, p95 {np.percentile(a, 95):6.2f}, "
            f"min {a.min():6.2f}, max {a.max():6.2f}  ({len(a)} trials)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per kind (default 20)")
    parser.add_argument("--period", type=int, default=256, help="JACK period and synthd block (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ahead-blocks", type=int, default=2, help="synthd's --ahead-blocks for the chord "
                        "series, and for --input's first series (default 2, synthd's default; --input also "
                        "runs at 1)")
    parser.add_argument("--input", action="store_true", help="time audio input to output instead (synthd run "
                        "--input virtual)")
    parser.add_argument("--model", help="model for --input (default: the tests' pitched model); it needs an encode")
    parser.add_argument("--dump", metavar="FILE.npz", help="save the recording and the send times to inspect")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so synthd and the JACK server are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rng = random.Random(args.seed)
    if args.input:
        return input_main(args, rng)
    if args.model:
        parser.error("--model is for --input (the other series play models of their own)")

    from support.nnmodels import build_frame_probe

    with tempfile.TemporaryDirectory(prefix="synthd-latency-") as scratch:
        chord_ms, chord_untimed, chord_underruns = chord_trials(args, rng, scratch)
        model = build_frame_probe(Path(scratch) / "probe.ts")
        with LiveRig(str(model), period=args.period) as rig:
            rig.watchdog(args.trials * 1.5 + 60.0)
            rate = rig.server.rate
            seconds = args.trials * 3 * 0.6 + 3
            with Recorder(rig.server.name, channels=1, seconds=seconds, name="latency-rec") as rec:
                rec.connect_from(rec.wait_for_ports(r"PortAudio.*:out_0", 1))
                driver_frames = playback_latency(rig.server.env())
                rig.osc.send("/synthd/control/level", 1.0)
                rig.osc.send("/synthd/gain", 0.0)
                time.sleep(0.3)
                rec.start()
                time.sleep(0.2)
                trials: list[tuple[str, int]] = []  # (kind, JACK frame when sent)
                for i in range(args.trials):  # OSC gain steps, alternately down and up
                    time.sleep(rng.uniform(0.15, 0.3))
                    down = i % 2 == 0
                    sent = rec.mark()
                    rig.osc.send("/synthd/gain", -20.0 if down else 0.0)
                    trials.append(("osc", sent))
                rig.osc.send("/synthd/gain", 0.0)
                rig.osc.send("/synthd/gate", 0)
                time.sleep(0.6)
                for _ in range(args.trials):  # MIDI note-on into a closed gate
                    time.sleep(rng.uniform(0.1, 0.2))
                    sent = rec.mark()
                    rig.midi.send_message([0x90, 60, 127])
                    trials.append(("midi", sent))
                    time.sleep(0.15)
                    rig.midi.send_message([0x80, 60, 0])
                    time.sleep(0.6)  # let the release (0.25 s in the default patch) finish
                rig.osc.send("/synthd/gate", 1)
                time.sleep(0.3)
                for i in range(args.trials):  # control steps: through the render-ahead ring and the model
                    time.sleep(rng.uniform(0.15, 0.3))
                    sent = rec.mark()
                    rig.osc.send("/synthd/control/level", 0.3 if i % 2 == 0 else 1.0)
                    trials.append(("control", sent))
                time.sleep(0.3)
                x = rec.data()[:, 0]
            status = rig.status()

    trials = [(kind, rec.mark_index(key)) for kind, key in trials]
    if args.dump:
        np.savez(args.dump, recording=x, sent=np.array([-1 if sent is None else sent for _, sent in trials]),
                 kinds=np.array([kind for kind, _ in trials]), rate=rate)
    results: dict[str, list[float]] = {"osc": [], "midi": [], "control": []}
    missed = {kind: 0 for kind in results}
    for kind, start in trials:
        hit = None if start is None else first_change(x, start, rate)
        if hit is None:
            missed[kind] += 1
            continue
        results[kind].append(1000.0 * (hit - start) / rate)
    print(f"latency: JACK dummy {rate} Hz / {args.period} frames, synthd block {status['block_frames']}, "
          f"synthd's own estimate {status['latency_ms']:.1f} ms (ring + device + model)")
    print(summary("OSC /synthd/gain step", results["osc"]))
    print(summary("MIDI note-on (gate)", results["midi"]))
    print(summary("OSC control step", results["control"]) + "  (not in the target: through the "
          "render-ahead ring and the model, whose own latency is 0 here)")
    period_ms = 1000.0 * args.period / rate
    print(summary("MIDI note-on in chord", chord_ms) + f"  (8 voices, 7 held, --ahead-blocks "
          f"{args.ahead_blocks}; untimed {chord_untimed}, underruns {chord_underruns})")
    print(f"  (from the start of the first period after the send; the wait for it adds up to {period_ms:.2f} ms)")
    print(f"  dummy driver playback latency: {driver_frames} frames ({1000.0 * driver_frames / rate:.2f} ms) "
          "more to the (virtual) loudspeaker")
    print(f"  trials that could not be timed (level not steady before, or no change): "
          f"{', '.join(f'{k} {n}' for k, n in missed.items())}; underruns during the run: {status['underruns']}")
    timed = [results["osc"], results["midi"], chord_ms]
    worst = max(max(v) for v in timed if v) if any(timed) else float("inf")
    ok = missed["osc"] == missed["midi"] == chord_untimed == 0 and worst + period_ms <= 15.0
    print(f"  target (<= 15 ms in all, at synthd's output port): {'met' if ok else 'NOT met'} "
          f"(worst {worst:.2f} ms + {period_ms:.2f} ms of waiting for the period)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
