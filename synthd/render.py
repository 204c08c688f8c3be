"""`synthd render`: a performance to a 48 kHz 24-bit WAV file, offline, faster than real time.

The same Engine, ControlSurface and MidiRouter as `synthd run` play the performance; only
the clock differs (samples rendered instead of a sound card), so a render sounds like
the live instrument given the same events, and the same inputs always give the same file.

The performance comes from a MIDI file (`--midi`: notes, CCs through the patch, pitch
bend, program changes, with the file's tempo map) and/or an automation file
(`--automation`), both dated on one timeline. With `--input take.wav` an audio file plays
through the model's `encode` and `decode` as live input does (`synthd run --input`), block by
block: any format and rate soundfile reads, mixed to mono, resampled with soxr; the patch's
`[input]` settings apply, and `--input-gain` (dB, or `auto`: the gain the model's training
set got) comes before them.

Automation file (TOML, version 1):

    version = 1
    seconds = 12.0                 # length of the render (default: last event + release + 1 s)

    [[event]]
    time = 0.0                     # seconds from the start (required)
    control = "brightness"         # a control by label, index or patch alias ...
    value = 0.2                    # ... to this wire value 0..1
    glide = 2.0                    # optional: seconds to get there (default: its smoothing)

    [[event]]
    time = 4.0
    gain_db = -6.0                 # output gain

    [[event]]
    time = 6.0
    gate = false                   # close (true: open) with the patch's envelope
    velocity = 1.0                 # optional, with gate = true

    [[event]]
    time = 8.0
    preset = "dark"                # recall a preset of the patch (glides)

Each event does exactly one thing: `control` + `value`, `gain_db`, `gate` or `preset`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import soxr
import torch

from synthd.controls import ControlSurface, engine_for
from synthd.midi import MidiRouter
from synthd.model import ModelError, load_model
from synthd.patch import (PatchError, TomlError, TomlSource, TomlTable, default_patch, load_patch,
                          parse_input_gain)

log = logging.getLogger(__name__)

OUT_RATE = 48000
CHUNK_S = 0.5  # render and write in pieces this long
TAIL_S = 1.0  # after the last event (and its release), so nothing is cut off
RENDER_SEED = 0


class RenderError(TomlError):
    """An input that cannot be rendered; the message names the file and the fault."""


@dataclass(frozen=True)
class Cue:
    """One timed action on the control surface (or MIDI router)."""

    seconds: float
    order: int  # file order breaks ties, so simultaneous events keep their order
    apply: Callable[[int], None]  # called with the event's sample on the audio clock


def read_automation(path: Path, surface: ControlSurface) -> tuple[list[Cue], float | None]:
    """Cues and the declared length (None when absent) from an automation file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RenderError(f"{path}: cannot be read ({exc})") from None
    src = TomlSource(path, text, arrays=("event",), error=RenderError)
    top = TomlTable(src, src.parse(text))
    version = top.get("version", int)
    if version != 1:
        raise top.fail("version", f"automation version {version} is not supported (this synthd reads 1)")
    seconds = top.number("seconds", None, 0.0, 24 * 3600.0)
    cues: list[Cue] = []
    for i, raw in enumerate(top.get("event", list, [])):
        ev = TomlTable(src, raw if isinstance(raw, dict) else {}, "event", i)
        if not isinstance(raw, dict):
            raise ev.fail(None, "must be a table")
        t = ev.number("time", None, 0.0, 24 * 3600.0)
        if t is None:
            raise ev.fail("time", "every event needs a `time` in seconds")
        actions = [k for k in ("control", "gain_db", "gate", "preset") if k in raw]
        if len(actions) != 1:
            raise ev.fail(actions[1] if len(actions) > 1 else None,
                          "an event does exactly one of: control (+ value), gain_db, gate, preset")
        action = actions[0]
        if action == "control":
            key = ev.get("control", (str, int))
            value = ev.get("value", float)
            if value is None:
                raise ev.fail("value", "a control event needs a wire `value` 0..1")
            if surface.find(key) is None:
                raise ev.fail("control", f"model {surface.engine.model.name!r} has no control {key!r}")
            glide = ev.number("glide", None, 0.0, 3600.0)
            apply = (lambda at, key=key, value=value, glide=glide:
                     surface.set(key, value, glide_s=glide, at=at))
        elif action == "gain_db":
            db = ev.get("gain_db", float)
            apply = lambda at, db=db: surface.set_gain_db(db, at=at)
        elif action == "gate":
            on = ev.get("gate", bool)
            velocity = ev.number("velocity", 1.0, 0.0, 1.0)
            apply = lambda at, on=on, velocity=velocity: surface.set_gate(on, velocity=velocity, at=at)
        else:
            name = ev.get("preset", str)
            if surface.patch.preset(name) is None:
                raise ev.fail("preset", f"patch {surface.patch.name!r} has no preset {name!r}")
            apply = lambda at, name=name: surface.recall_preset(name, at=at)
        ev.finish()
        cues.append(Cue(t, i, apply))
    top.finish()
    return cues, seconds


def read_midi_file(path: Path, router: MidiRouter, first_order: int) -> list[Cue]:
    """Cues for every channel message of a MIDI file, dated with its tempo map."""
    import mido

    try:
        midi = mido.MidiFile(str(path))
        events = []
        now = 0.0
        for msg in midi:  # merged tracks, `time` in seconds since the previous message
            now += msg.time
            if not msg.is_meta:
                events.append((now, msg))
    except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise RenderError(f"{path}: not a readable MIDI file ({exc})") from None
    return [Cue(t, first_order + i, lambda at, msg=msg: router.handle(msg, at=at))
            for i, (t, msg) in enumerate(events)]


class Progress:
    """Progress with an ETA on stderr, at most twice a second; silent for short renders."""

    def __init__(self, total_s: float, label: str, enabled: bool = True):
        self.total_s, self.label, self.enabled = total_s, label, enabled
        self.t0 = time.monotonic()
        self._last = self.t0

    def update(self, done_s: float) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.5:
            return
        self._last = now
        spent = now - self.t0
        speed = done_s / spent if spent > 0 else 0.0
        eta = (self.total_s - done_s) / speed if speed > 0 else float("inf")
        print(f"{self.label}: {done_s:.1f}/{self.total_s:.1f} s audio, {speed:.1f}x real time, "
              f"ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self, done_s: float) -> float:
        spent = time.monotonic() - self.t0
        return done_s / spent if spent > 0 else float("inf")


def read_input(path: Path, rate: int) -> np.ndarray:
    """An audio file as live input would bring it: `(samples,)` float32, mono (the channels'
    mean), at `rate` (soxr, very high quality), at its own level. RenderError naming the file
    when it cannot be read."""
    try:
        x, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise RenderError(f"{path}: cannot be read as audio ({exc})") from None
    if x.shape[0] == 0:
        raise RenderError(f"{path}: holds no audio")
    mono = x.mean(axis=1)
    if file_rate != rate:
        mono = soxr.resample(mono, file_rate, rate, quality="VHQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def render_performance(model_path: Path, out: Path, *, midi: Path | None = None, automation: Path | None = None,
                       seconds: float | None = None, patch_path: Path | None = None, channels: int = 2,
                       block_frames: int = 256, threads: int = 1, progress: bool = True,
                       input_path: Path | None = None, input_gain: str | float = 0.0) -> dict[str, float]:
    """Render to `out` (48 kHz, 24-bit PCM WAV, written atomically); returns figures.

    Raises ModelError, PatchError or RenderError (naming the file at fault) before any
    audio is rendered, so a bad input never leaves a partial file. Torch's random generator is
    seeded for the render (and restored after): a file that draws noise in `decode`, as RAVE's
    do, renders the same twice too.
    """
    with torch.random.fork_rng():
        torch.manual_seed(RENDER_SEED)
        return _render(model_path, out, midi=midi, automation=automation, seconds=seconds, patch_path=patch_path,
                       channels=channels, block_frames=block_frames, threads=threads, progress=progress,
                       input_path=input_path, input_gain=input_gain)


def _render(model_path: Path, out: Path, *, midi: Path | None, automation: Path | None, seconds: float | None,
            patch_path: Path | None, channels: int, block_frames: int, threads: int,
            progress: bool, input_path: Path | None, input_gain: str | float) -> dict[str, float]:
    from synthd.controls import input_trim_db

    torch.set_num_threads(threads)  # before the load's probe: the first call fixes the pools
    model = load_model(model_path)
    patch = load_patch(patch_path) if patch_path else default_patch()
    trim = input_trim_db(input_gain, model) if input_path is not None else 0.0
    engine = engine_for(model, patch, channels=channels, block_frames=block_frames, threads=threads,
                        audio_input=input_path is not None, input_trim_db=trim)
    source = read_input(input_path, engine.sample_rate) if input_path is not None else None
    surface = ControlSurface(engine, patch)
    router = MidiRouter(surface)
    cues: list[Cue] = []
    declared = None
    if automation is not None:
        cues, declared = read_automation(automation, surface)
    if midi is not None:
        cues += read_midi_file(midi, router, first_order=len(cues))
    cues.sort(key=lambda c: (c.seconds, c.order))
    if seconds is None:
        seconds = declared
    if seconds is None and source is not None:  # the input, its way through the encoder, a tail
        lag = (model.encode_lag_samples or 0) / model.sample_rate
        seconds = max(len(source) / engine.sample_rate + lag, cues[-1].seconds if cues else 0.0) + TAIL_S
    if seconds is None:
        seconds = (cues[-1].seconds + patch.gate.release if cues else 0.0) + TAIL_S
    if not (math.isfinite(seconds) and seconds > 0):
        raise RenderError(f"render length {seconds} s is not a positive number of seconds")
    total = int(round(seconds * engine.sample_rate))
    for cue in cues:  # dated on the audio clock; the engine applies each at its sample
        at = int(round(cue.seconds * engine.sample_rate))
        if at < total:
            cue.apply(at)

    resampler = (soxr.ResampleStream(engine.sample_rate, OUT_RATE, channels, dtype="float32", quality="VHQ")
                 if engine.sample_rate != OUT_RATE else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    meter = Progress(seconds, f"render {out.name}", progress)
    peak = 0.0
    square = 0.0
    written = 0
    try:
        with sf.SoundFile(tmp, "w", samplerate=OUT_RATE, channels=channels, subtype="PCM_24", format="WAV") as f:
            # whole blocks, as live: the input path encodes what each block brings
            chunk = max(1, int(CHUNK_S * engine.sample_rate) // block_frames) * block_frames
            done = 0
            while done < total:
                n = min(chunk, total - done)
                if source is None:
                    block = engine.render(n)
                else:  # the input in the live path's blocks
                    block = np.concatenate([engine.render(m, source[done + i:done + i + m])
                                            for i in range(0, n, block_frames)
                                            for m in [min(block_frames, n - i)]])
                done += n
                if resampler is not None:
                    block = resampler.resample_chunk(block, last=done >= total)
                peak = max(peak, float(np.abs(block).max(initial=0.0)))
                square += float(np.square(block, dtype=np.float64).sum())
                written += block.shape[0]
                f.write(block)
                meter.update(done / engine.sample_rate)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    speed = meter.close(seconds)
    rms = math.sqrt(square / max(1, written * channels))
    return {"seconds": written / OUT_RATE, "peak_dbfs": 20 * math.log10(max(peak, 1e-12)),
            "rms_dbfs": 20 * math.log10(max(rms, 1e-12)), "speed": speed, "events": float(len(cues)),
            "nan_blocks": float(engine.nan_blocks), "sysex": float(router.counters.sysex)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="M.ts", help="model file")
    parser.add_argument("--out", required=True, metavar="OUT.wav", help="WAV file to write (48 kHz, 24-bit)")
    parser.add_argument("--midi", metavar="FILE.mid", help="MIDI file to play through the patch")
    parser.add_argument("--automation", metavar="A.toml", help="automation file (format: `synthd.render` docs)")
    parser.add_argument("--seconds", type=float, help="length (default: the automation's, else last event + 1 s)")
    parser.add_argument("--patch", metavar="P.toml", help="patch file (default: the built-in CC 21-28 patch)")
    parser.add_argument("--input", metavar="TAKE.wav", help="audio file played through the model (timbre transfer)")
    parser.add_argument("--input-gain", default="0", metavar="DB|auto",
                        help="input gain in dB (default 0), or `auto`: the gain the model's training set got")
    parser.add_argument("--channels", type=int, default=2, help="output channels (default 2)")
    parser.add_argument("--block-frames", type=int, default=256, help="engine block, as live (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--play", action="store_true",
                        help="then play the file through the default audio output, when there is one")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.seconds is not None and not (math.isfinite(args.seconds) and args.seconds > 0):
        print(f"synthd render: --seconds {args.seconds} must be a positive number", file=sys.stderr)
        return 2
    if not 1 <= args.channels <= 64:
        print(f"synthd render: --channels {args.channels} is outside 1..64", file=sys.stderr)
        return 2
    try:
        input_gain = parse_input_gain(args.input_gain)
    except ValueError as exc:
        print(f"synthd render: {exc}", file=sys.stderr)
        return 2
    try:
        figures = render_performance(
            Path(args.model), Path(args.out), midi=Path(args.midi) if args.midi else None,
            automation=Path(args.automation) if args.automation else None, seconds=args.seconds,
            patch_path=Path(args.patch) if args.patch else None, channels=args.channels,
            block_frames=args.block_frames, threads=args.threads, progress=not args.quiet,
            input_path=Path(args.input) if args.input else None, input_gain=input_gain)
    except (ModelError, PatchError, RenderError, OSError) as exc:
        print(f"synthd render: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {figures['seconds']:.2f} s, 48000 Hz, 24-bit, peak {figures['peak_dbfs']:.1f} dBFS, "
          f"RMS {figures['rms_dbfs']:.1f} dBFS, {int(figures['events'])} events, "
          f"{figures['speed']:.1f}x real time", file=sys.stderr)
    if args.play:
        play_file(Path(args.out))
    return 0


def play_file(path: Path) -> bool:
    """Play a rendered file through the default output device; False (and a note) when
    this machine has none, which is not an error for a headless rig."""
    from synthd.audio import AudioError, resolve_output

    import sounddevice as sd

    try:
        device = resolve_output(None)
    except AudioError as exc:
        print(f"not played: no audio output ({exc})", file=sys.stderr)
        return False
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    channels = min(data.shape[1], int(device["max_output_channels"]))
    print(f"playing {path.name} on {device['name']} ({data.shape[0] / rate:.1f} s)", file=sys.stderr)
    try:
        sd.play(data[:, :channels], rate, blocking=True)
    except sd.PortAudioError as exc:
        print(f"not played: {device['name']}: {exc}", file=sys.stderr)
        return False
    return True
