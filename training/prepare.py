"""`synthd-train prepare SRC_DIR OUT_DIR`: a folder of sounds -> a prepared training set.

Every file libsndfile reads is converted by the one audio pipeline (`training.audio`), its
loudness measured (`training.loudness`), and stored before gain as `audio/<id>.npy`; one gain
for the whole set brings its median loudness to the target (lowered if it would push any peak
past the ceiling), so the files keep their relative dynamics. Files are split into train and
validation by file. `manifest.json` records every file, rejection, note and preprocessing
parameter (the format is in the README; `training.dataset.PreparedSet` reads it).

Re-running is incremental: files whose content hash is in the previous manifest are reused
without decoding, and they keep their split. The new set is built in a hidden folder beside
OUT_DIR and swapped in with one atomic rename, so an interruption leaves the old set or the new
one, never a mixture. Memory holds one converted file at a time.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import fnmatch
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from training.audio import SAMPLE_RATE, AudioError, amplitude_to_db, convert, pipeline_parameters
from training.dataset import AUDIO_DIR, CONDITION_DIR, FORMAT, FORMAT_VERSION, MANIFEST
from training.progress import Progress

DEFAULT_TARGET_LUFS = -20.0
DEFAULT_VALIDATION_FRACTION = 0.15
DEFAULT_PEAK_CEILING_DBFS = -1.0
MIN_FILES = 2          # one to train on, one to validate on
FEW_FILES = 5          # below this the model mostly memorises
VERY_SHORT_S = 0.1     # shorter files get a note: the trainer pads them
GROUP_NOTES = 3        # the report says a note shared by more files once, with a count
EXIT_OK, EXIT_TOO_FEW, EXIT_USAGE = 0, 1, 2

# Extensions of the formats libsndfile reads (its own names plus the usual aliases).
AUDIO_EXTENSIONS = frozenset(
    {fmt.lower() for fmt in sf.available_formats()}
    | {"wav", "wave", "bwf", "aif", "aiff", "aifc", "flac", "ogg", "oga", "opus", "mp3", "mp2",
       "mpga", "au", "snd", "caf", "w64", "rf64", "sd2", "voc", "sph", "nist", "sf", "ircam",
       "paf", "pvf", "xi", "htk", "sds", "avr", "wve", "mat", "mpc", "iff", "svx", "8svx"})

class PrepareError(Exception):
    """A problem with the arguments, the sources or the output folder; nothing was written."""

    exit_code = EXIT_USAGE


class NoUsableAudio(PrepareError):
    """Fewer than MIN_FILES usable files (none at all included): there is no set to write."""

    exit_code = EXIT_TOO_FEW

    def __init__(self, message: str, rejected: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.rejected = rejected or []


@dataclass
class Candidate:
    rel: str        # '/'-separated, relative to SRC_DIR (the path as the user sees it)
    path: Path


@dataclass
class Walk:
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def walk_sources(src: Path, exclude: list[Path]) -> Walk:
    """Every audio file under `src` (symlinks followed, hidden entries and `exclude` skipped),
    in sorted order; symlink loops and unreadable folders are reported, not followed."""
    result = Walk()
    excluded = {_identity(p) for p in exclude if p.exists()}

    def visit(folder: Path, rel: str, ancestors: dict[tuple[int, int], str]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            result.rejected.append({"source": rel + "/", "reason": f"folder cannot be read ({exc.strerror})"})
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden: .DS_Store, AppleDouble ._ files, our own temporary folders
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            path = folder / entry.name
            try:
                st = os.stat(path)  # follows symlinks
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    result.rejected.append({"source": child_rel, "reason": "symlink loop (the link "
                                            f"resolves to itself: {os.readlink(path)!r}), not followed"})
                elif entry.is_symlink():
                    if _is_audio_name(entry.name):
                        result.rejected.append({"source": child_rel, "reason": "broken symlink "
                                                f"(target {os.readlink(path)!r} does not exist)"})
                    else:
                        result.ignored.append(child_rel)
                else:
                    result.rejected.append({"source": child_rel, "reason": f"cannot be read ({exc.strerror})"})
                continue
            key = (st.st_dev, st.st_ino)
            if os.path.isdir(path):
                if key in excluded:
                    continue
                if key in ancestors:
                    result.rejected.append({"source": child_rel + "/", "reason": "symlink loop (points "
                                            f"back to {ancestors[key] or 'SRC_DIR'}/), not followed"})
                    continue
                visit(path, child_rel, {**ancestors, key: child_rel})
            elif _is_audio_name(entry.name):
                result.candidates.append(Candidate(child_rel, path))
            else:
                result.ignored.append(child_rel)

    visit(src, "", {_identity(src): ""})
    return result


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _is_audio_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in AUDIO_EXTENSIONS


def content_hash(path: Path) -> str:
    """sha256 of the file's bytes (read-only, in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass
class Options:
    src: Path
    out: Path
    target_lufs: float = DEFAULT_TARGET_LUFS
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    seed: int = 0
    validation_patterns: list[str] = field(default_factory=list)
    peak_ceiling_dbfs: float = DEFAULT_PEAK_CEILING_DBFS
    force: bool = False
    sample_rate: int = SAMPLE_RATE


def _previous_manifest(out: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The manifest of the set already at `out` (None if there is none); PrepareError if `out`
    holds something else, which prepare must not replace."""
    warnings: list[str] = []
    if not out.exists():
        return None, warnings
    if not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder; refusing to replace it")
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        if any(out.iterdir()):
            raise PrepareError(f"{out}: exists, is not empty and holds no {MANIFEST}: it is not a "
                               f"prepared set, refusing to replace it (choose another OUT_DIR)")
        return None, warnings
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}")
    except (OSError, ValueError, AttributeError) as exc:
        warnings.append(f"the previous {manifest_path} is unreadable ({exc}); rebuilding the set "
                        f"from scratch, so its validation assignment cannot be kept")
        return None, warnings
    return manifest, warnings


def _pipeline_matches(manifest: dict[str, Any], sample_rate: int) -> bool:
    pre = manifest.get("preprocessing", {})
    return all(pre.get(k) == v for k, v in pipeline_parameters(sample_rate).items())


@dataclass
class Accepted:
    entry: dict[str, Any]
    peak: float      # of the converted audio, before gain
    reused: bool


def _process(c: Candidate, opts: Options, staging: Path, reusable: dict[str, dict[str, Any]],
             old_root: Path | None) -> Accepted:
    """Convert (or reuse) one candidate into `staging/audio`; AudioError if it is rejected."""
    try:
        digest = content_hash(c.path)
        st = os.stat(c.path)
    except OSError as exc:
        raise AudioError(c.rel, f"cannot be read ({exc.strerror})") from None
    file_id = digest.split(":", 1)[1][:16]
    audio_rel = f"{AUDIO_DIR}/{file_id}.npy"
    old = reusable.get(digest)
    if old is not None and old_root is not None and not opts.force:
        old_audio = old_root / old["audio"]
        if _valid_npy(old_audio, int(old["frames"])):
            _link_or_copy(old_audio, staging / audio_rel)
            entry = {**old, "source": c.rel, "audio": audio_rel, "id": file_id,
                     "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            return Accepted(entry, 10.0 ** (float(old["peak_dbfs"]) / 20.0), True)
    # imported here: pyloudnorm pulls in scipy (a second at start-up) and a re-run that
    # changes nothing, or fails early, never needs it
    from training import loudness

    converted = convert(c.path, opts.sample_rate)
    x = converted.samples
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    if peak == 0.0:
        raise AudioError(c.rel, "silent (every sample is zero)")
    lufs, method = loudness.measure(x, opts.sample_rate)
    if not math.isfinite(lufs):
        raise AudioError(c.rel, f"silent (loudness below the {loudness.ABSOLUTE_GATE_LUFS:g} LUFS "
                         f"gate of BS.1770, peak {amplitude_to_db(peak):.1f} dBFS)")
    notes = list(converted.notes)
    if converted.duration_s < VERY_SHORT_S:
        notes.append(f"very short ({converted.duration_s * 1000:.0f} ms): kept; the trainer pads it "
                     f"where it needs longer examples")
    with open(staging / audio_rel, "wb") as fh:
        np.save(fh, x, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())  # the set is swapped in only once all of it is on disk
    entry = {"id": file_id, "source": c.rel, "audio": audio_rel, "content_hash": digest,
             "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
             "original": converted.source.as_dict(), "frames": len(x),
             "duration_s": round(converted.duration_s, 6), "loudness_lufs": round(lufs, 3),
             "loudness_method": method, "peak_dbfs": round(amplitude_to_db(peak), 4),
             "notes": notes}
    return Accepted(entry, peak, False)


def track_pitch(entries: list[dict[str, Any]], staging: Path, sample_rate: int, gain_db: float) -> dict[str, Any]:
    """Pitch and voicing of every file, after the set gain (the level the model hears), with the
    tracker the model's pitch input and its `encode` use: `condition/<id>.npy`, float32
    `(2, samples // hop)` (pitch in MIDI note units, voicing 0..1), and each entry's
    `voiced_share` (frames with voicing over the tracker's threshold) and `median_pitch` (MIDI,
    over voiced frames; null without any). Returns the tracker's parameters for `preprocessing`."""
    import torch

    from training.audio import apply_gain
    from training.model import ModelConfig
    from training.pitch import PitchTracker, track_long

    tracker = PitchTracker(sample_rate, ModelConfig().hop)
    (staging / CONDITION_DIR).mkdir(exist_ok=True)
    progress = Progress(len(entries), "pitch", unit="file")
    for e in entries:
        x = apply_gain(np.load(staging / e["audio"], allow_pickle=False), gain_db)
        condition = track_long(tracker, torch.from_numpy(x)).numpy()
        rel = f"{CONDITION_DIR}/{e['id']}.npy"
        with open(staging / rel, "wb") as fh:
            np.save(fh, condition.astype(np.float32), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        voiced = condition[1] > tracker.voiced_threshold
        e["condition"] = rel
        e["voiced_share"] = round(float(voiced.mean()), 4) if voiced.size else 0.0
        e["median_pitch"] = round(float(np.median(condition[0][voiced])), 3) if voiced.any() else None
        progress.update(file=e["source"])
    progress.close()
    return tracker.parameters_dict()


def _valid_npy(path: Path, frames: int) -> bool:
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return x.dtype == np.float32 and x.shape == (frames,)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the old set is replaced, never edited: sharing the inode is safe
    except OSError:
        shutil.copy2(src, dst)


def set_gain(accepted: list[Accepted], opts: Options) -> dict[str, Any]:
    """The one gain for the whole set: the median file reaches the target loudness, unless a
    peak would then pass the ceiling, in which case the gain is lowered to keep it under."""
    levels = [a.entry["loudness_lufs"] for a in accepted]
    set_loudness = statistics.median(levels)
    wanted = opts.target_lufs - set_loudness
    loudest = max(accepted, key=lambda a: a.peak)
    peak_db = amplitude_to_db(loudest.peak)
    limit = opts.peak_ceiling_dbfs - peak_db
    gain = min(wanted, limit)
    return {"set_loudness_lufs": round(set_loudness, 3), "wanted_gain_db": round(wanted, 3),
            "gain_db": round(gain, 3), "gain_limited": limit < wanted,
            "limiting_file": loudest.entry["source"] if limit < wanted else None,
            "limiting_peak_dbfs": round(peak_db, 3)}


def _matches(source: str, pattern: str) -> bool:
    """`--validation` patterns match the path under SRC_DIR or the file name alone."""
    return fnmatch.fnmatchcase(source, pattern) or fnmatch.fnmatchcase(source.rsplit("/", 1)[-1], pattern)


def _order_key(seed: int, digest: str) -> str:
    return hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()


def assign_splits(entries: list[dict[str, Any]], previous: dict[str, Any] | None,
                  opts: Options) -> list[str]:
    """Set each entry's `split`; returns warnings. Files forced by `--validation` go to
    validation; files the previous set held keep their split (found by path, then by content,
    so an edited or moved file stays where it was); new files fill validation up to the
    fraction (at least one file, at most all but one) in a seeded order, the rest train. Files
    added to an earlier set also fill validation up to the fraction of themselves (at least one
    of three or more), so a model grown on them can be measured on some it has not heard."""
    warnings: list[str] = []
    by_path: dict[str, str] = {}
    by_hash: dict[str, str] = {}
    for e in (previous or {}).get("files", []):
        by_path[e["source"]] = e["split"]
        by_hash[e["content_hash"]] = e["split"]
    new: list[dict[str, Any]] = []
    forced_new = 0
    for e in entries:
        forced = any(_matches(e["source"], p) for p in opts.validation_patterns)
        old = by_path.get(e["source"]) or by_hash.get(e["content_hash"])
        forced_new += forced and old is None
        if forced:
            e["split"], e["split_reason"] = "validation", "forced"
            if old == "train":
                warnings.append(f"{e['source']}: moved from train to validation (--validation); "
                                f"models trained on the earlier set have heard it")
        elif old is not None:
            e["split"], e["split_reason"] = old, "kept"
        else:
            new.append(e)
    for p in opts.validation_patterns:
        if not any(_matches(e["source"], p) for e in entries):
            warnings.append(f"--validation {p!r} matches no accepted file")
    n = len(entries)
    target = min(max(1, round(opts.validation_fraction * n)), n - 1)
    have = sum(e.get("split") == "validation" for e in entries)
    # seeded order; a file too short to measure anything on validates only if nothing else can
    new.sort(key=lambda e: (e["duration_s"] < VERY_SHORT_S, _order_key(opts.seed, e["content_hash"])))
    need = max(0, target - have)
    if previous is not None and new and opts.validation_fraction > 0:
        # files added to a set are held out in their own proportion too (one of three or more at
        # least), even where the old files already fill the fraction: `train --from` measures
        # what a model learns of them on these
        added = len(new) + forced_new
        own = max(1 if added >= 3 else 0, round(opts.validation_fraction * added)) - forced_new
        need = max(need, min(own, len(new) - 1))
    for i, e in enumerate(new):
        e["split"], e["split_reason"] = ("validation" if i < need else "train"), "new"
    if have + min(need, len(new)) == 0:
        # every validation file is gone and no new file can take the place: one training file
        # must move, or the trainer has nothing to validate on
        train = sorted((e for e in entries if e["split"] == "train"),
                       key=lambda e: _order_key(opts.seed, e["content_hash"]))
        moved = train[0]
        moved["split"], moved["split_reason"] = "validation", "moved"
        warnings.append(f"{moved['source']}: moved from train to validation because no validation "
                        f"file was left; models trained on the earlier set have heard it")
    if all(e["split"] == "validation" for e in entries):
        raise PrepareError("every file is in validation (--validation matches them all): "
                           "nothing is left to train on")
    return warnings


# --- writing the set: a hidden staging folder beside OUT_DIR, swapped in atomically ----------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _backup_path(out: Path) -> Path:
    return out.parent / f".{out.name}.previous"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(staging: Path, out: Path) -> None:
    """Make `staging` the set at `out`. Readers see the old set or the new one, nothing else."""
    _fsync_dir(staging / AUDIO_DIR)
    _fsync_dir(staging / CONDITION_DIR)
    _fsync_dir(staging)
    if not out.exists():
        os.rename(staging, out)
    elif _exchange(staging, out):
        shutil.rmtree(staging)  # now the old set
    else:
        # Two renames; if interrupted between them, the next run restores the backup first.
        backup = _backup_path(out)
        os.rename(out, backup)
        os.rename(staging, out)
        shutil.rmtree(backup)
    _fsync_dir(out.parent)


class _Lock:
    """One prepare at a time per OUT_DIR (an flock on a hidden file beside it)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.parent / f".{out.name}.lock"

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise PrepareError(f"{self.out}: another prepare is writing this set; "
                               f"wait for it to finish") from None
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _recover(out: Path) -> None:
    """Undo what an interrupted run left beside `out` (run under the lock)."""
    backup = _backup_path(out)
    if backup.exists():
        if out.exists():
            shutil.rmtree(backup)
        else:
            os.rename(backup, out)
    for stale in out.parent.glob(f".{out.name}.prepare-*"):
        shutil.rmtree(stale, ignore_errors=True)


# --- the command ------------------------------------------------------------------------------

@dataclass
class Result:
    manifest: dict[str, Any]
    reused: int
    warnings: list[str]


def prepare(opts: Options) -> Result:
    """Build the set and install it at `opts.out`. Raises PrepareError (nothing written) for
    bad arguments, too few usable files, or an OUT_DIR that is not a prepared set."""
    src, out = opts.src.resolve(), opts.out.resolve()
    if not src.is_dir():
        raise PrepareError(f"{opts.src}: no such folder")
    if out == src or src.is_relative_to(out):
        raise PrepareError(f"{opts.out}: OUT_DIR must not be SRC_DIR or contain it")
    if not 0.0 <= opts.validation_fraction < 1.0:
        raise PrepareError(f"--validation-fraction {opts.validation_fraction}: must be in [0, 1)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        _recover(out)
        previous, warnings = _previous_manifest(out)
        walk = walk_sources(src, exclude=[out])
        if not walk.candidates and not walk.rejected:
            raise NoUsableAudio(f"{opts.src}: no audio files found in it or its subfolders (WAV, FLAC, "
                                f"AIFF, OGG, MP3, ...)" + (f"; {len(walk.ignored)} other file(s) ignored"
                                                           if walk.ignored else ""))
        reusable: dict[str, dict[str, Any]] = {}
        if previous is not None and _pipeline_matches(previous, opts.sample_rate):
            reusable = {e["content_hash"]: e for e in previous.get("files", [])}
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
        try:
            result = _build(opts, src, out, staging, walk, previous, reusable, warnings)
            _install(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return result


def _build(opts: Options, src: Path, out: Path, staging: Path, walk: Walk,
           previous: dict[str, Any] | None, reusable: dict[str, dict[str, Any]],
           warnings: list[str]) -> Result:
    (staging / AUDIO_DIR).mkdir()
    rejected = list(walk.rejected)
    accepted: list[Accepted] = []
    seen: dict[str, str] = {}
    progress = Progress(len(walk.candidates), "prepare", unit="file")
    for c in walk.candidates:
        try:
            a = _process(c, opts, staging, reusable, out if previous is not None else None)
        except AudioError as exc:
            rejected.append({"source": c.rel, "reason": exc.reason})
        else:
            digest = a.entry["content_hash"]
            if digest in seen:
                rejected.append({"source": c.rel, "reason": f"identical content to {seen[digest]} "
                                 f"(a duplicate would sit in both splits)"})
            else:
                seen[digest] = c.rel
                accepted.append(a)
        progress.update(file=c.rel)
    progress.close()
    rejected.sort(key=lambda r: r["source"])
    if len(accepted) < MIN_FILES:
        raise NoUsableAudio(f"only {len(accepted)} usable file(s) in {opts.src}: prepare needs at least "
                            f"{MIN_FILES} (one to train on, one to validate on); the previous set, "
                            f"if any, is unchanged", rejected)
    if len(accepted) < FEW_FILES:
        warnings.append(f"only {len(accepted)} usable files: the model will mostly memorise them; "
                        f"20 or more varied sounds give it something to generalise from")
    entries = [a.entry for a in accepted]
    gain = set_gain(accepted, opts)
    for e in entries:
        e["gain_db"] = gain["gain_db"]
        e["loudness_after_gain_lufs"] = round(e["loudness_lufs"] + gain["gain_db"], 3)
    warnings += assign_splits(entries, previous, opts)
    pitch_parameters = track_pitch(entries, staging, opts.sample_rate, gain["gain_db"])
    preprocessing = {**pipeline_parameters(opts.sample_rate),
                     "target_lufs": opts.target_lufs,
                     "loudness": "ITU-R BS.1770-4 integrated (pyloudnorm); files under 0.4 s: "
                                 "K-weighted mean square over the whole file",
                     "set_loudness": "median of the files' loudness",
                     "set_loudness_lufs": gain["set_loudness_lufs"],
                     "peak_ceiling_dbfs": opts.peak_ceiling_dbfs,
                     "gain_db": gain["gain_db"], "wanted_gain_db": gain["wanted_gain_db"],
                     "gain_limited": gain["gain_limited"], "limiting_file": gain["limiting_file"],
                     "pitch": pitch_parameters}
    train = [e for e in entries if e["split"] == "train"]
    valid = [e for e in entries if e["split"] == "validation"]
    after = [e["loudness_after_gain_lufs"] for e in entries]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "generator": "synthd-train prepare",
        "updated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_dir": str(src),
        "preprocessing": preprocessing,
        "split": {"seed": opts.seed, "validation_fraction": opts.validation_fraction,
                  "validation_patterns": list(opts.validation_patterns)},
        "summary": {"files": len(entries), "rejected": len(rejected), "ignored": len(walk.ignored),
                    "duration_s": round(sum(e["duration_s"] for e in entries), 3),
                    "train_files": len(train), "validation_files": len(valid),
                    "train_duration_s": round(sum(e["duration_s"] for e in train), 3),
                    "validation_duration_s": round(sum(e["duration_s"] for e in valid), 3),
                    "loudness_min_lufs": min(e["loudness_lufs"] for e in entries),
                    "loudness_max_lufs": max(e["loudness_lufs"] for e in entries),
                    "loudness_after_gain_min_lufs": min(after),
                    "loudness_after_gain_max_lufs": max(after)},
        "warnings": warnings,
        "files": sorted(entries, key=lambda e: e["source"]),
        "rejected": rejected,
        "ignored": walk.ignored,
    }
    path = staging / MANIFEST
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return Result(manifest, sum(a.reused for a in accepted), warnings)


def _report(result: Result, out: Path) -> str:
    m = result.manifest
    s, pre = m["summary"], m["preprocessing"]
    new = s["files"] - result.reused
    lines = [f"prepared set: {out}",
             f"  accepted    {_count(s['files'], 'file')}, {s['duration_s']:.1f} s "
             f"({new} converted, {result.reused} unchanged)",
             f"  rejected    {_count(s['rejected'], 'file')}"
             + (f"; {_count(s['ignored'], 'non-audio file')} ignored" if s["ignored"] else ""),
             f"  loudness    {s['loudness_min_lufs']:.1f} .. {s['loudness_max_lufs']:.1f} LUFS "
             f"(median {pre['set_loudness_lufs']:.1f}); after gain "
             f"{s['loudness_after_gain_min_lufs']:.1f} .. {s['loudness_after_gain_max_lufs']:.1f} LUFS",
             f"  gain        {pre['gain_db']:+.1f} dB for every file (target {pre['target_lufs']:.1f} LUFS)"]
    if pre["gain_limited"]:
        lines.append(f"              lowered from {pre['wanted_gain_db']:+.1f} dB so that the loudest "
                     f"peak ({pre['limiting_file']}) stays under {pre['peak_ceiling_dbfs']:.1f} dBFS: "
                     f"the set reaches {pre['set_loudness_lufs'] + pre['gain_db']:.1f} LUFS")
    voiced = [f["voiced_share"] for f in m["files"] if f.get("voiced_share") is not None]
    if voiced:
        pitched = sum(v >= 0.5 for v in voiced)
        lines.append(f"  pitch       {pitched} of {_count(len(voiced), 'file')} mostly voiced (median voiced share "
                     f"{statistics.median(voiced):.2f}; per file in manifest.json)")
    lines.append(f"  split       train {_count(s['train_files'], 'file')} ({s['train_duration_s']:.1f} s), "
                 f"validation {_count(s['validation_files'], 'file')} ({s['validation_duration_s']:.1f} s)")
    lines += _details(m["rejected"], [f for f in m["files"] if f["notes"]])
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _details(rejected: list[dict[str, str]], noted: list[dict[str, Any]]) -> list[str]:
    lines = []
    if rejected:
        lines.append("rejected:")
        lines += [f"  {r['source']}: {r['reason']}" for r in rejected]
    if noted:
        lines.append("notes:")
        # a note shared by many files (a folder of 44.1 kHz stereo takes) is said once
        sharing: dict[str, list[str]] = {}
        for f in noted:
            for note in f["notes"]:
                sharing.setdefault(note, []).append(f["source"])
        for f in noted:
            lines += [f"  {f['source']}: {note}" for note in f["notes"] if len(sharing[note]) <= GROUP_NOTES]
        for note, sources in sharing.items():
            if len(sources) > GROUP_NOTES:
                lines.append(f"  {len(sources)} files ({', '.join(sources[:2])}, ...): {note}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC_DIR", type=Path, help="folder of sounds (walked recursively)")
    parser.add_argument("out", metavar="OUT_DIR", type=Path, help="prepared set to create or update")
    parser.add_argument("--target-lufs", type=float, default=DEFAULT_TARGET_LUFS,
                        help=f"loudness the set's median file is brought to (default {DEFAULT_TARGET_LUFS:g})")
    parser.add_argument("--validation-fraction", type=float, default=DEFAULT_VALIDATION_FRACTION,
                        help="share of files held out for validation (default 0.15; at least one file)")
    parser.add_argument("--validation", metavar="PATTERN", action="append", default=[],
                        help="force files into validation: a path under SRC_DIR or a file name, "
                             "shell wildcards allowed (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--peak-ceiling", type=float, default=DEFAULT_PEAK_CEILING_DBFS,
                        metavar="DBFS", help="the set gain never pushes a peak above this (default -1)")
    parser.add_argument("--force", action="store_true", help="convert every file again, even unchanged ones")


def run(args: argparse.Namespace) -> int:
    opts = Options(src=args.src, out=args.out, target_lufs=args.target_lufs,
                   validation_fraction=args.validation_fraction, seed=args.seed,
                   validation_patterns=list(args.validation), peak_ceiling_dbfs=args.peak_ceiling,
                   force=args.force)
    try:
        result = prepare(opts)
    except PrepareError as exc:
        for line in _details(getattr(exc, "rejected", []), []):
            print(line)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(_report(result, opts.out.resolve()))
    return EXIT_OK
