"""A demo set, prepared once per test session, and runs trained on it through the real CLI.

Each artefact is built at most once per session under pytest's base temporary folder, so test
modules that need the same trained run (analysis, evaluation) share it instead of training twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def synthd_train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m training ARGS` from the repository root; raise with its output on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"synthd-train {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def prepared_demo(base: Path) -> Path:
    """The built-in demo set, prepared (built once under `base`)."""
    prepared = base / "demo-prepared"
    if not (prepared / "manifest.json").exists():
        synthd_train("demo-data", str(base / "demo-sources"))
        synthd_train("prepare", str(base / "demo-sources"), str(prepared))
    return prepared


# A small model that trains in a couple of minutes on two shared cores: enough to learn the
# demo set's main axes (level, tone against noise, spectral tilt), far from the product default.
TINY_CONFIG = """
[model]
latent_size = 8
encoder_dim = 48
encoder_blocks = 2
decoder_dim = 64
decoder_blocks = 3
decoder_dilations = [1, 2, 4]

[data]
crop_frames = 32
batch_size = 8

[loss]
stft_fft_sizes = [128, 512, 2048]
mel_fft_sizes = [1024]

[kl]
beta = 0.001

[validation]
every_steps = 100
log_every_steps = 20
max_seconds = 5.0

[optim]
lr = 3e-3
warmup_steps = 20
threads = 2
"""

# steps of "the trained demo model" that the analysis, evaluation and aliasing tests share (trained
# once per test session)
TRAINED_STEPS = 400


def trained_demo(base: Path, steps: int) -> Path:
    """A run of the tiny config trained `steps` steps on the prepared demo set (built once under `base`)."""
    prepared = prepared_demo(base)
    run = base / f"demo-run-{steps}"
    if not (run / "last.pt").exists():
        config = base / "demo-tiny.toml"
        config.write_text(TINY_CONFIG)
        synthd_train("train", str(prepared), str(run), "--steps", str(steps), "--seed", "0", "--config", str(config))
    return run


def exported_demo(base: Path, steps: int) -> Path:
    """The run of `trained_demo`, exported (analysis included) to a model file."""
    run = trained_demo(base, steps)
    model = base / f"demo-{steps}.ts"
    if not model.exists():
        synthd_train("export", str(run), str(model))
    return model
