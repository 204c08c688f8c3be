"""`synthd-train demo OUT_DIR`: the main job, end to end, on the built-in demo data.

demo-data -> prepare -> train (a fixed number of steps, so every machine and every run trains
the same model and names the same controls) -> export -> render a performance through the
daemon's offline renderer: a melody played on the pitch input from a MIDI file, then a slow
sweep of the first timbre controls; then play it through the default audio output when the
machine has one. Each step runs as its own
command (`python -m training ...`, `python -m synthd render ...`), exactly as a user would
run it, and a step whose output is already complete is not redone, so a second run is fast.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

# a step budget, not wall-clock: the same steps on a fast or a busy machine give the same model
DEFAULT_STEPS = 800
SWEPT_CONTROLS = 4
SWEEP_SECONDS = 4.0
# the melody: semitones from the set's typical pitch, each note NOTE_SECONDS long
MELODY = (0, 4, 7, 12, 7, 4, 0, -5, -1, 2, 0)
NOTE_SECONDS = 0.35


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for everything the demo makes")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training budget in optimiser steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0)


def _step(title: str, argv: list[str]) -> None:
    print(f"\n== {title}: {' '.join(argv)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    result = subprocess.run([sys.executable, *argv])
    if result.returncode != 0:
        raise RuntimeError(f"{title} failed (exit status {result.returncode}); see the messages above")
    print(f"== {title}: done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def _skip(title: str, why: str) -> None:
    print(f"\n== {title}: skipped, {why}", file=sys.stderr, flush=True)


def _run_finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run that ended normally (not one cut short by a signal)."""
    from training.checkpoint import load_checkpoint
    try:
        return bool(load_checkpoint(run_dir / "last.pt").get("finished"))
    except (FileNotFoundError, ValueError):
        return False


def _model_metadata(model_path: Path) -> dict:
    import torch

    with warnings.catch_warnings():  # TorchScript's deprecation notice: we load it on purpose
        warnings.simplefilter("ignore")
        return json.loads(torch.jit.load(str(model_path)).metadata())


def _write_melody(controls: list[dict], path: Path) -> float:
    """A MIDI file playing MELODY around the pitch input's default (the set's typical pitch), or
    nothing for a model without a pitch input. Returns its length in seconds (0 without one)."""
    import mido

    pitch = next((c for c in controls if c.get("unit") == "midi"), None)
    if pitch is None:
        return 0.0
    root = int(round(pitch["default"]))
    song = mido.MidiFile(ticks_per_beat=480)  # 120 bpm: a beat is 0.5 s, 960 ticks a second
    track = mido.MidiTrack()
    song.tracks.append(track)
    ticks = int(NOTE_SECONDS * 960)
    for step in MELODY:
        note = min(127, max(0, root + step))
        track.append(mido.Message("note_on", note=note, velocity=100, time=0))
        track.append(mido.Message("note_off", note=note, velocity=0, time=ticks))
    song.save(str(path))
    return len(MELODY) * NOTE_SECONDS


def _write_automation(controls: list[dict], path: Path, start: float = 0.0) -> float:
    """An automation file (synthd render's format) that opens the gate at `start`, then sweeps the
    first SWEPT_CONTROLS timbre controls (the pitch input aside: the melody plays it) one after
    another slowly from their minimum to their maximum and back to their default, so each can be
    heard on its own. Returns its length in seconds."""
    lines = ["version = 1", "", "[[event]]", f"time = {start:.2f}", "gate = true", ""]
    t = start + 0.5
    for c in [c for c in controls if c.get("unit") != "midi"][:SWEPT_CONTROLS]:
        span = c["max"] - c["min"]
        default = (c["default"] - c["min"]) / span if span > 0 else 0.5
        for value, glide in ((0.0, 1.0), (1.0, SWEEP_SECONDS), (default, 1.0)):
            lines += ["[[event]]", f"time = {t:.2f}", f'control = "{c["label"]}"', f"value = {value:.4f}",
                      f"glide = {glide:.2f}", ""]
            t += glide
    seconds = t + 1.0
    lines.insert(1, f"seconds = {seconds:.2f}")
    path.write_text("\n".join(lines) + "\n")
    return seconds


def run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sounds, prepared, run_dir = out / "sounds", out / "prepared", out / "run"
    model_path, wav_path = out / "demo.ts", out / "demo-sweep.wav"
    made: list[tuple[str, Path]] = []
    try:
        if any(sounds.glob("*.wav")):
            _skip("demo data", f"{sounds} already holds the demo sounds")
        else:
            _step("demo data", ["-m", "training", "demo-data", str(sounds)])
        made.append(("demo sounds", sounds))

        _step("prepare", ["-m", "training", "prepare", str(sounds), str(prepared)])
        made.append(("prepared set", prepared))

        if _run_finished(run_dir):
            _skip("train", f"{run_dir} holds a finished run (delete it to train again)")
        else:
            resume = ["--resume"] if (run_dir / "last.pt").exists() else []
            _step("train", ["-m", "training", "train", str(prepared), str(run_dir),
                            "--steps", str(args.steps), "--seed", str(args.seed), *resume])
        made.append(("training run", run_dir))

        _step("export", ["-m", "training", "export", str(run_dir), str(model_path)])
        made.append(("model file", model_path))

        controls = _model_metadata(model_path)["controls"]
        melody, automation = out / "demo-melody.mid", out / "demo-sweep.toml"
        played = _write_melody(controls, melody)
        _write_automation(controls, automation, start=played + 0.5 if played else 0.0)
        _step("render", ["-m", "synthd", "render", "--model", str(model_path), "--automation", str(automation),
                         *(["--midi", str(melody)] if played else []), "--out", str(wav_path), "--play"])
        if played:
            made.append(("melody", melody))
        made.append(("sweep automation", automation))
        made.append(("rendered sweep", wav_path))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if made:
            print("\n" + "\n".join(f"{label}: {path}" for label, path in made))
    print("controls: " + ", ".join(c["label"] for c in controls))
    return 0
