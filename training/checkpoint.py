"""Checkpoints and run folders.

A run folder holds `config.toml` (resolved config), `last.pt` (latest state), `best.pt`
(best by validation) and `log.csv`. Every file is written to a temporary name in the same
folder, flushed to disk and renamed over the old one, so `kill -9` at any moment leaves the
previous complete file or the new complete file, never a torn one. Checkpoints contain only
tensors and plain Python values and are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAMES = ("best", "last")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # the rename itself is durable only once the directory entry is on disk
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """Serialise `obj` (tensors and plain values only) to `path` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint dict read with `weights_only=True`; a clear error if it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or damaged files
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a synthd training checkpoint (no model state or config)")
    return ckpt


def run_checkpoint_path(run_dir: str | os.PathLike[str], which: str = "best") -> Path:
    """Path of the `which` ("best" or "last") checkpoint of a run; "best" falls back to "last"
    when no validation has completed yet."""
    if which not in CHECKPOINT_NAMES:
        raise ValueError(f"which must be one of {CHECKPOINT_NAMES}, got {which!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    path = run_dir / f"{which}.pt"
    if which == "best" and not path.exists():
        path = run_dir / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: not a training run (no best.pt or last.pt)")
    return path


def load_run(run_dir: str | os.PathLike[str], which: str = "best"):
    """(checkpoint dict, VAE with its weights, in eval mode on the CPU) for a run folder."""
    from training.config import checkpoint_config
    from training.model import VAE

    path = run_checkpoint_path(run_dir, which)
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt["config"], f"{path} config")
    model = VAE(cfg.model)
    # the moving average of the weights, where the run kept one, is the model in use
    model.load_state_dict(ckpt.get("ema", ckpt["model"]))
    model.eval()
    return ckpt, model
