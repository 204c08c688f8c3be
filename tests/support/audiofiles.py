"""Generators of audio files for tests: plain tones, and every kind of odd or broken file a
real folder of sounds holds (empty, text named .wav, truncated, NaN, silent, unreadable,
symlink loops, many channels, 8-bit, extreme sample rates, a few milliseconds long).

Each writer takes the target path and returns it; none needs anything beyond soundfile/numpy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]


def tone(freq: float = 440.0, seconds: float = 1.0, rate: int = 48000, peak_db: float = -12.0,
         channels: int = 1, decay_s: float | None = None) -> np.ndarray:
    """A sine at `freq` peaking at `peak_db` dBFS: `(frames,)` or `(frames, channels)` with each
    channel a little different in level (so a downmix is not a copy of one channel)."""
    t = np.arange(int(round(seconds * rate))) / rate
    y = np.sin(2 * np.pi * freq * t)
    if decay_s is not None:
        y *= np.exp(-t / decay_s)
    y *= 10 ** (peak_db / 20) / max(np.max(np.abs(y)), 1e-12)
    if channels == 1:
        return y
    return np.stack([y * (1.0 - 0.05 * c) for c in range(channels)], axis=1)


def write(path: Path, data: np.ndarray, rate: int = 48000, subtype: str = "PCM_24",
          fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, rate, subtype=subtype, format=fmt)
    return path


def empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def text_named_wav(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("These are my notes for the session: kick, snare, two takes of the violin.\n")
    return path


def truncated_flac(path: Path) -> Path:
    """A FLAC cut in the middle of its frames: libsndfile loses sync and cannot decode it."""
    write(path, tone(330.0, 1.0), fmt="FLAC", subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_header_wav(path: Path) -> Path:
    """A WAV cut inside its header: no audio can be found at all."""
    write(path, tone(330.0, 0.5))
    path.write_bytes(path.read_bytes()[:30])
    return path


def truncated_data_wav(path: Path) -> Path:
    """A WAV cut halfway through its audio: the first half decodes, the header says more."""
    write(path, tone(330.0, 1.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def nan_wav(path: Path, value: float = float("nan")) -> Path:
    """A 32-bit float WAV holding a NaN (or, with `value=inf`, an infinite) sample."""
    y = tone(440.0, 0.5).astype(np.float32)
    y[1000] = value
    return write(path, y, subtype="FLOAT")


def silent(path: Path, seconds: float = 1.0) -> Path:
    return write(path, np.zeros(int(seconds * 48000)))


def unreadable(path: Path) -> Path:
    """A valid WAV with no read permission (see `run_cli(..., drop_root_override=True)`)."""
    write(path, tone(550.0, 0.5))
    path.chmod(0)
    return path


def symlink_loops(folder: Path) -> tuple[Path, Path]:
    """`loop_a.wav -> loop_b.wav -> loop_a.wav`, and `again -> .` (a folder link to its parent)."""
    folder.mkdir(parents=True, exist_ok=True)
    a, b = folder / "loop_a.wav", folder / "loop_b.wav"
    os.symlink("loop_b.wav", a)
    os.symlink("loop_a.wav", b)
    os.symlink(".", folder / "again")
    return a, folder / "again"


def restore_permissions(root: Path) -> None:
    """Make every file under `root` deletable and readable again (for cleanup)."""
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if not p.is_symlink():
                p.chmod(0o644)


def run_cli(*args: str | os.PathLike[str], drop_root_override: bool = False,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`python -m training ARGS` from the repository root, output captured as text.

    Root ignores file permissions; with `drop_root_override` the command runs without the
    capabilities that let it (setpriv), so an unreadable file is unreadable to it too."""
    cmd = [sys.executable, "-m", "training", *map(str, args)]
    if drop_root_override and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to test permissions as root"
        cmd = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
