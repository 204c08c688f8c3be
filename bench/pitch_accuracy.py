"""Pitch accuracy of reconstructions of held-out recorded notes: the decoder with a pitch input and
a harmonic head (the defaults) against the previous decoder (`model.harmonics = 0`), trained side
by side (at once, the cores shared between them) for the same wall-clock budget on the same notes.

The notes are the General MIDI set `bench/train_quality.py --set gm` renders with fluidsynth
(8 instruments x 5 pitches, 43..76); every sixth note is held out of `prepare` entirely. Every
`--every` minutes each run's latest checkpoint reconstructs the held-out notes (encode -> decode,
as `synthd render --input` would), and the one pitch tracker (training.pitch) reads source and
reconstruction. Printed per run, over the source's voiced frames:

    median |error|   cents between the reconstruction's pitch and the source's (target <= 20)
    within 50 c      share of voiced frames within 50 cents (target >= 90 %)
    ratio            held-out distance over shaped noise's, as bench/train_quality.py (target <= 0.50)

    .venv/bin/python bench/pitch_accuracy.py --minutes 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train_quality import HeldOut, build_gm, latest  # noqa: E402
from training.pitch import VOICED_THRESHOLD, PitchTracker  # noqa: E402

HOLD_OUT_EVERY = 6
# harmonic: the defaults; previous: the decoder before the harmonic head; centred: the defaults with
# the encoder's blocks centred (2 frames of look-ahead each, 6 in all), as before causal encoders;
# fft-1024: the defaults with analysis and synthesis windows of 1024 (a frame more look-ahead and
# residual latency), as before windows of 768
RUNS = {"harmonic": "", "previous": "[model]\nharmonics = 0\n", "centred": "[model]\nencoder_causal = false\n",
        "fft-1024": "[model]\nn_fft = 1024\n"}


@torch.no_grad()
def pitch_errors(model: torch.nn.Module, held: HeldOut, hop: int) -> np.ndarray:
    """Cents between each held-out note's reconstruction and the note, on the note's voiced frames."""
    tracker = PitchTracker(hop=hop)
    context = -(-model.warmup_samples // hop) * hop
    errors = []
    for a in held.audio:
        n = -(-len(a) // hop) * hop
        x = torch.from_numpy(np.pad(a, (context, n - len(a)))).reshape(1, 1, -1)
        y = model(x)[0][..., context:context + n]
        source = tracker(x[..., context:context + n])[0]
        output = tracker(y)[0]
        voiced = source[1] > VOICED_THRESHOLD
        errors.append(((output[0] - source[0]) * 100).abs()[voiced].numpy())
    return np.concatenate(errors) if errors else np.zeros(0)


def measure(run_dir: Path, held_files: list[Path], cache: dict) -> str | None:
    found = latest(run_dir, held_files, cache)
    if found is None:
        return None
    ckpt, model, held = found
    hop = int(ckpt["config"]["model"]["hop"])
    cents = pitch_errors(model, held, hop)
    ratio = held.model_distance(model, hop) / held.noise_distance
    return (f"step {int(ckpt['step']):6d}  median |error| {np.median(cents):7.1f} cents  "
            f"within 50 c {100 * np.mean(cents < 50):5.1f} %  ratio {ratio:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget of each run")
    parser.add_argument("--every", type=float, default=5.0, help="minutes between measurements")
    parser.add_argument("--runs", default="harmonic,previous", help=f"which of {', '.join(RUNS)} to train")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "synthd-pitch-accuracy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # measurements must not starve the training process

    files = build_gm(args.work / "sources")
    held = files[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY]
    train_dir = args.work / "train-sources"
    shutil.rmtree(train_dir, ignore_errors=True)
    train_dir.mkdir(parents=True)
    for f in files:
        if f not in held:
            (train_dir / f.name).symlink_to(f)
    prepared = args.work / "prepared"
    subprocess.run([sys.executable, "-m", "training", "prepare", str(train_dir), str(prepared)], cwd=REPO,
                   check=True, capture_output=True)
    print(f"gm notes: {len(files) - len(held)} prepared, {len(held)} held out: "
          f"{', '.join(f.stem for f in held)}", flush=True)
    # the runs train side by side, each on its own share of the cores, so that neither gets
    # the machine the other was denied and both see the same wall clock
    names = args.runs.split(",")
    threads = max(1, (os.cpu_count() or 1) // len(names))
    procs, caches, final = {}, {}, {}
    for name in names:
        config = args.work / f"{name}.toml"
        config.write_text(RUNS[name] + f"[optim]\nthreads = {threads}\n")
        run_dir = args.work / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "training", "train", str(prepared), str(run_dir), "--minutes",
               f"{args.minutes:g}", "--seed", str(args.seed), "--config", str(config)]
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        with open(args.work / f"train-{name}.log", "w") as log:
            procs[name] = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        caches[name] = {}
    started, next_check = time.monotonic(), args.every * 60
    while procs:
        finished = [name for name, proc in procs.items() if proc.poll() is not None]
        due = time.monotonic() - started >= next_check
        for name in list(procs):
            if due or name in finished:
                line = measure(args.work / f"run-{name}", held, caches[name])
                if line:
                    final[name] = line
                    print(f"[{name}] {(time.monotonic() - started) / 60:5.1f} min  {line}", flush=True)
        if due:
            next_check += args.every * 60
        for name in finished:
            if procs.pop(name).returncode != 0:
                raise SystemExit(f"[{name}] training failed; see {args.work / f'train-{name}.log'}")
        time.sleep(2)
    print("\n".join(f"{name:9s} {line}" for name, line in final.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
