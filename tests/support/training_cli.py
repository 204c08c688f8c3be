"""The trainer's command line as tests run it: a child process on one thread, with the tiny model
config the training tests share."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

TINY = """
[model]
latent_size = 4
encoder_dim = 32
encoder_blocks = 1
decoder_dim = 32
decoder_blocks = 2
decoder_dilations = [1, 2]

[data]
batch_size = 4
crop_frames = 16

[loss]
stft_fft_sizes = [128, 512, 2048]
mel_fft_sizes = [1024]

[optim]
lr = 3e-3
warmup_steps = 5
threads = 1

[validation]
every_steps = 10
log_every_steps = 2
max_seconds = 3.0
crop_frames = 32
"""


def cli(*args: str, module: str = "training", **kwargs) -> subprocess.CompletedProcess:
    """`python -m <module> ARGS` from the repository, output captured, at most 300 s."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300, **kwargs)


def log_rows(run: Path) -> list[dict[str, str]]:
    """The rows of a run's log.csv."""
    with open(run / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))
