"""`PreparedSet`: the one reader of a prepared set (what `synthd-train prepare` writes).

A prepared set is a folder holding `manifest.json`, `audio/<id>.npy`: each file converted
by `training.audio` to `(samples,)` float32 mono at the set's rate, stored *before* the set
gain, and `condition/<id>.npy`: its pitch (MIDI note units) and voicing per latent frame,
`(2, samples // hop)` float32, from `training.pitch` after the gain. The set gain and every
other preprocessing parameter live in the manifest's `preprocessing` object; `load` applies
the gain, so every reader gets the same samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from training.audio import apply_gain

FORMAT = "synthd-prepared-set"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
AUDIO_DIR = "audio"
CONDITION_DIR = "condition"


class PreparedSetError(Exception):
    """A folder that is not a usable prepared set; the message names the path and the problem."""


@dataclass(frozen=True)
class PreparedFile:
    """One accepted source file of a prepared set."""

    id: str                   # stable: derived from the content hash
    source: str               # path relative to the set's source folder, '/'-separated
    split: str                # "train" or "validation"
    frames: int               # samples of the converted audio, at the set's sample rate
    duration_s: float
    loudness_lufs: float      # of the converted audio, before the set gain
    content_hash: str         # "sha256:<hex>" of the source file's bytes
    audio_path: Path          # the converted audio (.npy, float32, before the set gain)
    original: dict[str, Any] = field(default_factory=dict)  # source rate, channels, bit depth, ...
    notes: tuple[str, ...] = ()
    condition_path: Path | None = None   # pitch and voicing (.npy, (2, frames)); None in older sets
    voiced_share: float | None = None    # frames voiced, 0..1


class PreparedSet:
    """A prepared set opened for reading. Construct with `PreparedSet.open(path)`."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.preprocessing: dict[str, Any] = dict(manifest["preprocessing"])
        self.sample_rate = int(self.preprocessing["sample_rate"])
        self.gain_db = float(self.preprocessing["gain_db"])
        self.files: list[PreparedFile] = [self._file(entry) for entry in manifest["files"]]
        self._by_id = {f.id: f for f in self.files}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> PreparedSet:
        """Open the prepared set at `path`; PreparedSetError if it is not one (or is damaged)."""
        root = Path(path).resolve()
        manifest_path = root / MANIFEST
        if not root.is_dir():
            raise PreparedSetError(f"{root}: no such folder (run `synthd-train prepare SRC_DIR {path}` first)")
        try:
            with open(manifest_path, encoding="utf-8") as fh:
                manifest = json.load(fh)
        except FileNotFoundError:
            raise PreparedSetError(f"{root}: not a prepared set (no {MANIFEST}; "
                                   f"run `synthd-train prepare SRC_DIR {path}`)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PreparedSetError(f"{manifest_path}: unreadable manifest ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise PreparedSetError(f"{manifest_path}: not a synthd prepared-set manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise PreparedSetError(f"{manifest_path}: format_version {manifest.get('format_version')!r} "
                                   f"is not supported (expected {FORMAT_VERSION}); prepare the set again")
        try:
            prepared = cls(root, manifest)
        except (KeyError, TypeError, ValueError) as exc:
            raise PreparedSetError(f"{manifest_path}: malformed manifest ({type(exc).__name__}: {exc})") from None
        if not prepared.files:
            raise PreparedSetError(f"{manifest_path}: the set holds no files")
        return prepared

    def _file(self, entry: dict[str, Any]) -> PreparedFile:
        split = entry["split"]
        if split not in ("train", "validation"):
            raise ValueError(f"file {entry.get('source')!r}: split {split!r}")
        return PreparedFile(id=str(entry["id"]), source=str(entry["source"]), split=split,
                            frames=int(entry["frames"]), duration_s=float(entry["duration_s"]),
                            loudness_lufs=float(entry["loudness_lufs"]),
                            content_hash=str(entry["content_hash"]),
                            audio_path=self.root / entry["audio"],
                            original=dict(entry.get("original", {})),
                            notes=tuple(entry.get("notes", ())),
                            condition_path=self.root / entry["condition"] if entry.get("condition") else None,
                            voiced_share=entry.get("voiced_share"))

    @property
    def train_files(self) -> list[PreparedFile]:
        return [f for f in self.files if f.split == "train"]

    @property
    def validation_files(self) -> list[PreparedFile]:
        return [f for f in self.files if f.split == "validation"]

    @property
    def source_dir(self) -> Path:
        """The folder the set was prepared from (its files may have moved since)."""
        return Path(self.manifest["source_dir"])

    def source_path(self, f: PreparedFile) -> Path:
        """Where `f`'s original file was when the set was prepared."""
        return self.source_dir / f.source

    @property
    def duration_s(self) -> float:
        return sum(f.duration_s for f in self.files)

    @property
    def manifest_hash(self) -> str:
        """Identifies the training data: the files' contents, their split and the preprocessing.

        Stable across re-runs of prepare that change nothing (timestamps are not part of it)."""
        key = {"preprocessing": self.preprocessing,
               "files": sorted((f.content_hash, f.split) for f in self.files)}
        blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    def summary(self) -> dict[str, Any]:
        """A short description of the data, for checkpoints and model metadata."""
        return {"files": len(self.files), "duration_s": round(self.duration_s, 3),
                "train_files": len(self.train_files),
                "validation_files": len(self.validation_files),
                "sample_rate": self.sample_rate, "gain_db": self.gain_db}

    def file(self, file_id: str) -> PreparedFile:
        try:
            return self._by_id[file_id]
        except KeyError:
            raise PreparedSetError(f"{self.root}: no file with id {file_id!r}") from None

    def load(self, f: PreparedFile | str) -> np.ndarray:
        """`(samples,)` float32 mono at `sample_rate`, the set gain applied."""
        f = self.file(f) if isinstance(f, str) else f
        try:
            samples = np.load(f.audio_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise PreparedSetError(f"{f.audio_path}: cannot read the prepared audio of {f.source} "
                                   f"({exc}); prepare the set again") from None
        if samples.dtype != np.float32 or samples.ndim != 1 or len(samples) != f.frames:
            raise PreparedSetError(f"{f.audio_path}: expected {f.frames} float32 mono samples, found "
                                   f"{samples.dtype} {samples.shape}; prepare the set again")
        return apply_gain(samples, self.gain_db)

    def load_condition(self, f: PreparedFile | str) -> np.ndarray | None:
        """`(2, samples // hop)` float32: pitch (MIDI note units) and voicing per latent frame, or
        None for a set prepared before pitch was tracked."""
        f = self.file(f) if isinstance(f, str) else f
        if f.condition_path is None:
            return None
        try:
            condition = np.load(f.condition_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise PreparedSetError(f"{f.condition_path}: cannot read the pitch track of {f.source} "
                                   f"({exc}); prepare the set again") from None
        if condition.dtype != np.float32 or condition.ndim != 2 or condition.shape[0] != 2:
            raise PreparedSetError(f"{f.condition_path}: expected (2, frames) float32, found "
                                   f"{condition.dtype} {condition.shape}; prepare the set again")
        return condition

    def __iter__(self) -> Iterator[PreparedFile]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)
