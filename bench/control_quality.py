"""Control quality with and without attribute regularisation, trained side by side.

Trains the default model twice on one set for the same wall-clock budget, one thread each, at
the same time (so both see the same machine): once as is, once with `--regularize` binding a
latent dimension to each listed attribute. Then runs `synthd-train analyze` on both and prints,
for each its
table (per descriptor: held-out fit rho, rho along its own sweep, the worst crosstalk the rule
counts, and the verdict), then a summary: the controls each run names and their range shares,
the worst crosstalk along each descriptor both runs swept, and regularised over plain (the
baseline of the same run).

    .venv/bin/python bench/control_quality.py --set demo --minutes 5
    .venv/bin/python bench/control_quality.py --set gm --minutes 10 --regularize brightness,loudness,pitch
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_quality import SETS as RECORDED_SETS  # noqa: E402
from training.analyze import Sweep, counted_crosstalk  # noqa: E402


def build_demo(folder: Path) -> None:
    """The built-in demo set: 40 synthesised one-shots."""
    subprocess.run([sys.executable, "-m", "training", "demo-data", str(folder)], cwd=REPO, check=True,
                   capture_output=True)


def sources(set_name: str, folder: Path) -> Path:
    """The set's sound folder, built on first use."""
    if set_name == "demo":
        if not folder.exists():
            build_demo(folder)
    else:
        RECORDED_SETS[set_name](folder)
    return folder


def train_both(prepared: Path, work: Path, minutes: float, regularize: str, seed: int) -> dict[str, Path]:
    """Train the plain and the regularised model at once, one thread each; their run folders."""
    config = work / "one-thread.toml"
    config.write_text("[optim]\nthreads = 1\n")
    runs = {"plain": work / "run-plain", "regularized": work / "run-regularized"}
    procs = {}
    for name, run in runs.items():
        cmd = [sys.executable, "-m", "training", "train", str(prepared), str(run), "--minutes", f"{minutes:g}",
               "--seed", str(seed), "--config", str(config)]
        if name == "regularized":
            cmd += ["--regularize", regularize]
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        with open(work / f"train-{name}.log", "w") as log:  # the child keeps its own copy of the handle
            procs[name] = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"[{name}] training failed (exit {proc.returncode}); see {work / f'train-{name}.log'}")
    return runs


def analysis(run: Path) -> tuple[dict, str]:
    """`synthd-train analyze RUN`: its summary (analysis.json) and the table it prints."""
    proc = subprocess.run([sys.executable, "-m", "training", "analyze", str(run)], cwd=REPO, check=True,
                          capture_output=True, text=True)
    return json.loads((run / "analysis.json").read_text()), proc.stdout


def worst_crosstalk(summary: dict, name: str) -> float:
    """The largest |rho| the sweep rule counts along control `name`'s last sweep (0: none)."""
    sweep = Sweep(**summary["sweeps"][name])
    return max((abs(r) for r in counted_crosstalk(sweep, name).values()), default=0.0)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=["demo", *sorted(RECORDED_SETS)], default="demo")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of each run")
    parser.add_argument("--regularize", default="loudness,brightness,noisiness",
                        help="attributes bound to latent dimensions in the regularised run")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "synthd-control-quality")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = args.work / args.set
    work.mkdir(parents=True, exist_ok=True)
    src = sources(args.set, work / "sources")
    prepared = work / "prepared"
    subprocess.run([sys.executable, "-m", "training", "prepare", str(src), str(prepared)], cwd=REPO, check=True,
                   capture_output=True)
    runs = train_both(prepared, work, args.minutes, args.regularize, args.seed)
    summaries = {}
    for name, run in runs.items():
        summaries[name], table = analysis(run)
        print(f"\n{args.set} / {name}" + (f" (--regularize {args.regularize})" if name == "regularized" else ""))
        print(table.strip())
    print()
    # crosstalk over the descriptors both runs swept (named or not): the figure that moves
    # before a control crosses the naming line
    swept = sorted(set(summaries["plain"]["sweeps"]) & set(summaries["regularized"]["sweeps"]))
    figures = {}
    for name, summary in summaries.items():
        named = summary["named"]
        worst = {n: worst_crosstalk(summary, n) for n in swept}
        shares = {c["label"]: (c.get("quality") or {}).get("range_share") for c in summary["controls"]
                  if c["label"] in named}
        figures[name] = (len(named), sum(worst.values()) / len(worst) if worst else None)
        print(f"{name:<12} named {len(named)} ({', '.join(named) or 'none'}), range shares {shares or '-'}; "
              f"worst counted crosstalk {', '.join(f'{n} {fmt(v)}' for n, v in worst.items()) or '-'}")
    (plain_n, plain_x), (reg_n, reg_x) = figures["plain"], figures["regularized"]
    ratio = f"{reg_x / plain_x:.2f}" if plain_x and reg_x is not None else "-"
    print(f"regularised / plain: named {reg_n} / {plain_n}; mean worst crosstalk over {', '.join(swept) or '-'}: "
          f"{fmt(reg_x)} / {fmt(plain_x)} = {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
