"""A collection that grows: `train --from` against plain fine-tuning and training from scratch.

On recorded drums in two parts, an old part (a Hydrogen kit: ElectricEmpireKit) and a new part
(another kit, of other instruments: circAfrique v4, hand drums), every fifth file of each part held
out of `prepare` entirely, it trains one thread at a time:

    old        10 min on the old part alone                          (the model a user has)
    grown      5 min `--from old` on old + new (one run per --variants entry; "defaults" is
               the shipped [incremental] config)
    fine-tune  5 min from the old weights on the new part only: the same `--from`, on a set that
               keeps the old part's validation files (so old held-out figures exist) and none of its
               training files, with the plain schedule ([incremental] new_boost 1, lr_scale 1,
               anchor 0): what fine-tuning without replay does
    scratch    15 min from scratch on old + new

and prints, after each, the held-out distance (multi-resolution STFT distance between each
held-out file and the model's reconstruction of it, as bench/train_quality.py) on the old part's
and the new part's held-out files, each model measured at its own set's gain: the old run at its
best checkpoint (the model a user has, which `--from` starts from), the others at their last. Targets: the grown
run's old distance rises <= 5 % over the old model's, and its new distance lies within 5 % of
scratch's; fine-tuning shown forgetting (old distance rising more than 5 %).

    .venv/bin/python bench/incremental.py                       # about 35 minutes of training
    .venv/bin/python bench/incremental.py --scale 0.1           # a 3.5-minute smoke run
    .venv/bin/python bench/incremental.py --variants replay,boost,boost-lr-half,boost-anchor
    .venv/bin/python bench/incremental.py --new-files 6 --variants replay,boost --skip fine-tune --reuse-old
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train_quality import HOLD_OUT_EVERY, HeldOut, build_drums  # noqa: E402
from training.checkpoint import load_run  # noqa: E402

OLD_KIT = "ElectricEmpireKit"
NEW_KIT = "circAfrique v4"
MINUTES = {"old": 10.0, "grown": 5.0, "fine-tune": 5.0, "scratch": 15.0}
TOLERANCE = 0.05
# one torch thread per training process: the bench runs beside other work on a small machine
BASE_CONFIG = "[optim]\nthreads = 1\n"
# [incremental] settings of each `--variants` entry (on top of the old run's config)
VARIANTS = {
    "defaults": "",                                                   # the shipped [incremental]: replay
    "replay": "[incremental]\nnew_boost = 1.0\nlr_scale = 1.0\nanchor = 0.0\n",   # every file at its own weight
    "boost": "[incremental]\nnew_boost = 3.0\nlr_scale = 1.0\nanchor = 0.0\n",    # added files 3x at first
    "boost-lr-half": "[incremental]\nnew_boost = 3.0\nlr_scale = 0.5\nanchor = 0.0\n",
    "boost-anchor": "[incremental]\nnew_boost = 3.0\nlr_scale = 1.0\nanchor = 20.0\n",
}
# fine-tuning as it is usually done: the old weights, the plain schedule, nothing anchored
PLAIN = "[incremental]\nnew_boost = 1.0\nlr_scale = 1.0\nanchor = 0.0\n"


@dataclass
class Stage:
    name: str
    minutes: float
    steps: int
    old: float
    new: float


def split_part(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(kept for prepare, held out of it): every HOLD_OUT_EVERY-th file held out."""
    held = files[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY]
    return [f for f in files if f not in held], held


def link_folder(folder: Path, files: dict[str, Path]) -> Path:
    """A fresh folder of symlinks `name -> file`."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, f in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(f)
    return folder


def prepare(sources: Path, prepared: Path, start_from: Path | None = None) -> None:
    """`synthd-train prepare`; `start_from`: a prepared set copied to `prepared` first, so the
    files it holds keep their split (a folder that grew, as a user's would)."""
    shutil.rmtree(prepared, ignore_errors=True)
    if start_from is not None:
        shutil.copytree(start_from, prepared, symlinks=True)
    subprocess.run([sys.executable, "-m", "training", "prepare", str(sources), str(prepared)], cwd=REPO, check=True,
                   capture_output=True)


def train(name: str, prepared: Path, run_dir: Path, minutes: float, config: Path, seed: int,
          origin: Path | None = None) -> None:
    """One training run, its output in `run_dir`.log; prints its validation lines as they come."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "training", "train", str(prepared), str(run_dir), "--minutes", f"{minutes:g}",
           "--seed", str(seed), "--config", str(config)] + (["--from", str(origin)] if origin else [])
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    log_path = run_dir.with_suffix(".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        shown = 0
        while proc.poll() is None:
            time.sleep(5)
            shown = _echo(name, log_path, shown)
        _echo(name, log_path, shown)
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] training failed (exit {proc.returncode}); see {log_path}")


def _echo(name: str, log_path: Path, shown: int) -> int:
    """Print the run's report lines (files, warnings, validations) written since line `shown`."""
    lines = log_path.read_text(errors="replace").splitlines()
    for line in lines[shown:]:
        if line.startswith(("step ", "warning", "from ", "  added", "  removed", "replaying", "no old", "held-out",
                            "done")):
            print(f"[{name}]   {line}", flush=True)
    return len(lines)


def measure(name: str, run_dir: Path, held_old: list[Path], held_new: list[Path], which: str = "last") -> Stage:
    """Held-out distances of the run's `which` checkpoint on both parts, at the run's own set gain."""
    ckpt, model = load_run(run_dir, which)
    hop = int(ckpt["config"]["model"]["hop"])
    old = HeldOut(held_old, ckpt["preprocessing"]).model_distance(model, hop)
    new = HeldOut(held_new, ckpt["preprocessing"]).model_distance(model, hop)
    stage = Stage(name, float(ckpt["elapsed_s"]) / 60, int(ckpt["step"]), old, new)
    print(f"[{name}] {stage.minutes:5.1f} min  step {stage.steps:6d}  held-out distance: old {old:.4f}  new {new:.4f}",
          flush=True)
    return stage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every stage's minutes (0.1: a smoke run of the same stages)")
    parser.add_argument("--variants", default="defaults",
                        help=f"comma-separated [incremental] settings for the grown stage: {', '.join(VARIANTS)}")
    parser.add_argument("--new-files", type=int, default=None,
                        help="prepare only N of the new part's files, spread over it (a small addition to a larger "
                             "set); its held-out files stay the same")
    parser.add_argument("--skip", default="", help="comma-separated stages not to run: fine-tune, scratch")
    parser.add_argument("--reuse-old", action="store_true", help="keep the old run of an earlier call in --work")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "synthd-incremental")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the measurements share the machine with nothing else, one thread suffices
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    minutes = {k: v * args.scale for k, v in MINUTES.items()}
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    old_files = build_drums(work / "sources-old", OLD_KIT)
    new_files = build_drums(work / "sources-new", NEW_KIT)
    old_kept, held_old = split_part(old_files)
    new_kept, held_new = split_part(new_files)
    if args.new_files is not None:  # spread over the kit: a few of each kind of sound, not the first kind only
        new_kept = [new_kept[i * len(new_kept) // args.new_files] for i in range(min(args.new_files, len(new_kept)))]
    print(f"old part: {OLD_KIT}, {len(old_kept)} files prepared, {len(held_old)} held out; new part: {NEW_KIT}, "
          f"{len(new_kept)} prepared, {len(held_new)} held out", flush=True)
    old_names = {f"old/{f.name}": f for f in old_kept}
    new_names = {f"new/{f.name}": f for f in new_kept}
    # one source folder that grows: the old part, then the new part added beside it
    config = work / "base.toml"
    config.write_text(BASE_CONFIG)
    stages: list[Stage] = []

    old_run = work / "run-old"
    prepared_old = work / "prepared-old"
    if not (args.reuse_old and (old_run / "last.pt").exists()):
        prepare(link_folder(work / "folder-old", old_names), prepared_old)
        train("old", prepared_old, old_run, minutes["old"], config, args.seed)
    # the old model is the one a user has and `--from` starts from: the run's best checkpoint (what
    # export ships); every later stage is measured where its budget left it (last)
    stages.append(measure("old", old_run, held_old, held_new, which="best"))

    prepared_grown = work / "prepared-grown"
    prepare(link_folder(work / "folder-grown", {**old_names, **new_names}), prepared_grown, start_from=prepared_old)
    for variant in variants:
        name = f"grown/{variant}"
        variant_config = work / f"variant-{variant}.toml"
        variant_config.write_text(VARIANTS[variant])
        run_dir = work / f"run-grown-{variant}"
        train(name, prepared_grown, run_dir, minutes["grown"], variant_config, args.seed, origin=old_run)
        stages.append(measure(name, run_dir, held_old, held_new))

    skip = set(filter(None, args.skip.split(",")))
    if "fine-tune" not in skip:
        # the new part only, beside the old part's validation files (never trained on): the old
        # run's training files are gone, so nothing old is replayed
        manifest = json.loads((prepared_old / "manifest.json").read_text())
        old_validation = {f"old/{Path(e['source']).name}" for e in manifest["files"] if e["split"] == "validation"}
        prepared_ft = work / "prepared-fine-tune"
        prepare(link_folder(work / "folder-fine-tune", {**{k: old_names[k] for k in old_validation}, **new_names}),
                prepared_ft, start_from=prepared_old)
        plain = work / "plain.toml"
        plain.write_text(PLAIN)
        run_dir = work / "run-fine-tune"
        train("fine-tune", prepared_ft, run_dir, minutes["fine-tune"], plain, args.seed, origin=old_run)
        stages.append(measure("fine-tune", run_dir, held_old, held_new))
    scratch = None
    if "scratch" not in skip:
        run_dir = work / "run-scratch"
        train("scratch", prepared_grown, run_dir, minutes["scratch"], config, args.seed)
        scratch = measure("scratch", run_dir, held_old, held_new)
        stages.append(scratch)

    base = stages[0]
    print(f"\n{'stage':22s} {'min':>5s} {'steps':>6s} {'old held-out':>14s} {'vs old model':>12s} "
          f"{'new held-out':>13s} {'vs scratch':>10s}")
    for s in stages:
        versus = f"{s.new / scratch.new - 1:+10.1%}" if scratch is not None else f"{'':>10s}"
        print(f"{s.name:22s} {s.minutes:5.1f} {s.steps:6d} {s.old:14.4f} {s.old / base.old - 1:+12.1%} "
              f"{s.new:13.4f} {versus}")
    print()
    for s in stages:
        if s.name.startswith("grown/"):
            rise = s.old / base.old - 1
            line = f"{s.name}: old held-out {rise:+.1%} ({'met' if rise <= TOLERANCE else 'missed'}: <= +5 %)"
            if scratch is not None:
                gap = s.new / scratch.new - 1
                verdict = "met" if gap <= TOLERANCE else "missed"
                line += f"; new held-out {gap:+.1%} against scratch ({verdict}: <= +5 %)"
            print(line)
        if s.name == "fine-tune":
            rise = s.old / base.old - 1
            print(f"fine-tune: old held-out {rise:+.1%} ({'forgets' if rise > TOLERANCE else 'does not forget'} "
                  "beyond 5 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
