"""`synthd-train demo OUT_DIR`: the main job, end to end, on the built-in demo data.

demo-data -> prepare -> train (a short budget) -> export -> render a performance with a slow
sweep of its first controls through the daemon's offline renderer, then play that
performance through the default audio output when the machine has one. Each step runs as its own
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

# long enough on 2 cores for the analysis to find more than loudness: at 3 minutes the decoder's
# response along brightness still dips 17 dB in the middle of its range; at 5 it names brightness
DEFAULT_MINUTES = 5.0
SWEPT_CONTROLS = 4
SWEEP_SECONDS = 4.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for everything the demo makes")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"training budget (default {DEFAULT_MINUTES:g} minutes)")
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


def _write_automation(controls: list[dict], path: Path) -> float:
    """An automation file (synthd render's format) that opens the gate, then sweeps the first
    SWEPT_CONTROLS controls one after another slowly from their minimum to their maximum and
    back to their default, so each can be heard on its own. Returns its length in seconds."""
    lines = ["version = 1", "", "[[event]]", "time = 0.0", "gate = true", ""]
    t = 0.5
    for c in controls[:SWEPT_CONTROLS]:
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
                            "--minutes", f"{args.minutes:g}", "--seed", str(args.seed), *resume])
        made.append(("training run", run_dir))

        _step("export", ["-m", "training", "export", str(run_dir), str(model_path)])
        made.append(("model file", model_path))

        controls = _model_metadata(model_path)["controls"]
        automation = out / "demo-sweep.toml"
        _write_automation(controls, automation)
        _step("render", ["-m", "synthd", "render", "--model", str(model_path), "--automation", str(automation),
                         "--out", str(wav_path), "--play"])
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
