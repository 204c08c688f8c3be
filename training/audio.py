"""The one audio pipeline of the trainer: every sample the model ever sees comes through here.

A source file is read with soundfile (libsndfile: WAV, FLAC, AIFF, OGG, MP3, ... at any rate,
bit depth and channel count), downmixed to mono by averaging its channels, resampled to the
model rate with soxr at its highest quality (VHQ) and stored as float32. `prepare` converts
with `convert`; evaluation, analysis and export read new audio with `load_for_model`, which is
the same conversion followed by the set gain recorded in a prepared set's manifest, so a file
loaded either way gives the very same samples.

Files are decoded block by block, so memory stays bounded by the converted (48 kHz mono) file,
whatever the source's rate and channel count.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 48000
RESAMPLER = "soxr"
RESAMPLE_QUALITY = "VHQ"
DOWNMIX = "mean"
# Bumped whenever the conversion changes its output: prepared audio made by another version
# is converted again rather than mixed with audio from this one.
PIPELINE_VERSION = 1
# Frames decoded per block (bounded memory for long, many-channel, high-rate sources).
_BLOCK_FRAMES = 1 << 16

# libsndfile subtype -> bits per sample of the stored samples (None: lossy or compressed codec).
_BIT_DEPTH: dict[str, int | None] = {
    "PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32,
    "FLOAT": 32, "DOUBLE": 64, "ULAW": 8, "ALAW": 8,
    "DWVW_12": 12, "DWVW_16": 16, "DWVW_24": 24, "DPCM_8": 8, "DPCM_16": 16,
    "ALAC_16": 16, "ALAC_20": 20, "ALAC_24": 24, "ALAC_32": 32,
    "NMS_ADPCM_16": 16, "NMS_ADPCM_24": 24, "NMS_ADPCM_32": 32,
}


class AudioError(Exception):
    """A file that cannot become training audio; the message names the file and says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class SourceInfo:
    """What a source file was before conversion."""

    sample_rate: int
    channels: int
    frames: int               # frames actually decoded (libsndfile's header count can be wrong)
    format: str               # libsndfile container, e.g. "WAV", "FLAC", "MP3"
    subtype: str              # libsndfile sample encoding, e.g. "PCM_24", "FLOAT", "VORBIS"
    bit_depth: int | None     # None for lossy codecs
    is_float: bool
    peak: float               # largest absolute sample of the source (before downmix)
    clipped_samples: int      # samples at or beyond full scale in an integer source, > 1.0 in a float one

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    def as_dict(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "channels": self.channels, "frames": self.frames,
                "duration_s": round(self.duration_s, 6), "format": self.format,
                "subtype": self.subtype, "bit_depth": self.bit_depth, "float": self.is_float,
                "peak_dbfs": round(amplitude_to_db(self.peak), 3),
                "clipped_samples": self.clipped_samples}


@dataclass
class Converted:
    """A source converted to the model's format: `samples` is `(samples,)` float32 mono."""

    samples: np.ndarray
    sample_rate: int
    source: SourceInfo
    notes: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def amplitude_to_db(a: float) -> float:
    return 20.0 * math.log10(a) if a > 0 else -math.inf


def db_to_amplitude(db: float) -> float:
    return 10.0 ** (db / 20.0)


def pipeline_parameters(sample_rate: int = SAMPLE_RATE) -> dict[str, Any]:
    """The conversion's parameters, as recorded in a prepared set's `preprocessing`."""
    return {"sample_rate": sample_rate, "channels": 1, "downmix": DOWNMIX, "resampler": RESAMPLER,
            "resample_quality": RESAMPLE_QUALITY, "dtype": "float32",
            "pipeline_version": PIPELINE_VERSION}


def check_parameters(preprocessing: Mapping[str, Any]) -> None:
    """Raise AudioError if `preprocessing` asks for a conversion this pipeline does not do."""
    expected = pipeline_parameters(int(preprocessing.get("sample_rate", SAMPLE_RATE)))
    for key, value in expected.items():
        if preprocessing.get(key) != value:
            raise AudioError(f"preprocessing.{key}", f"is {preprocessing.get(key)!r}; this version of "
                             f"the audio pipeline does {value!r} (prepare the set again)")


def _clip_count(block: np.ndarray, is_float: bool) -> int:
    # An integer source's full scale reads as exactly -1.0 or just under +1.0.
    limit = 1.0 if is_float else (1.0 - 1.0 / 32768.0)
    return int(np.count_nonzero(np.abs(block) > limit if is_float else np.abs(block) >= limit))


def convert(path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE) -> Converted:
    """Decode `path` and convert it to mono float32 at `sample_rate`.

    Raises AudioError (naming the file) when it is empty, not audio, cannot be decoded to the
    end, or holds NaN or infinite samples. The source is opened read-only. Notes say what was
    done to an unusual but usable file (downmix, resampling, low bit depth)."""
    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
    except OSError as exc:
        raise AudioError(name, f"cannot be read ({exc.strerror})") from None
    if size == 0:
        raise AudioError(name, "empty file (0 bytes)")
    try:
        with open(name, "rb"):
            pass  # the reason a file cannot be read, in the system's words
    except OSError as exc:
        raise AudioError(name, f"cannot be read ({exc.strerror})") from None
    try:
        # libsndfile opens the path itself, read-only. Through a Python file object it would call
        # back into Python for every read, and an exception raised there (Ctrl-C's
        # KeyboardInterrupt) is swallowed by cffi and reads as a short file.
        snd = sf.SoundFile(name, mode="r")
    except sf.LibsndfileError as exc:
        raise AudioError(name, _describe_unreadable(name, exc)) from None
    except (RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(name, f"not a readable audio file ({exc})") from None
    with snd:
        return _convert_open(name, snd, sample_rate)


def _describe_unreadable(name: str, exc: sf.LibsndfileError) -> str:
    with open(name, "rb") as fh:
        head = fh.read(512)
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file, not audio"
    reason = exc.error_string if hasattr(exc, "error_string") else str(exc)
    return f"not a readable audio file (libsndfile: {reason.strip()})"


def _convert_open(name: str, snd: sf.SoundFile, sample_rate: int) -> Converted:
    rate, channels = int(snd.samplerate), int(snd.channels)
    subtype = str(snd.subtype)
    is_float = subtype in ("FLOAT", "DOUBLE")
    if rate <= 0 or channels <= 0:
        raise AudioError(name, f"invalid header ({rate} Hz, {channels} channels)")
    resampler = None if rate == sample_rate else soxr.ResampleStream(
        rate, sample_rate, 1, dtype="float64", quality=RESAMPLE_QUALITY)
    out: list[np.ndarray] = []
    frames = 0
    peak = 0.0
    clipped = 0
    bad = 0
    try:
        while True:
            block = snd.read(_BLOCK_FRAMES, dtype="float64", always_2d=True)
            if len(block) == 0:
                break
            finite = np.isfinite(block)
            if not finite.all():
                bad += int(block.size - np.count_nonzero(finite))
                block = np.where(finite, block, 0.0)
            frames += len(block)
            peak = max(peak, float(np.max(np.abs(block))))
            clipped += _clip_count(block, is_float)
            mono = block.mean(axis=1) if channels > 1 else block[:, 0]
            # float32 from here: the converted file is the one thing held whole in memory
            out.append((mono if resampler is None else resampler.resample_chunk(mono)).astype(np.float32))
    except sf.LibsndfileError as exc:
        raise AudioError(name, f"truncated or corrupt, cannot be decoded "
                         f"(libsndfile: {str(exc).strip()})") from None
    if bad:
        raise AudioError(name, f"{bad} NaN or infinite sample(s) out of {frames * channels}")
    if frames == 0:
        raise AudioError(name, "no audio frames (header only, or truncated before any audio)")
    notes = _notes_truncated(snd, frames)
    if resampler is not None:
        out.append(resampler.resample_chunk(np.zeros(0, dtype=np.float64), last=True).astype(np.float32))
    samples = np.concatenate(out)
    info = SourceInfo(sample_rate=rate, channels=channels, frames=frames, format=str(snd.format),
                      subtype=subtype, bit_depth=_BIT_DEPTH.get(subtype), is_float=is_float,
                      peak=peak, clipped_samples=clipped)
    return Converted(samples=samples, sample_rate=sample_rate, source=info,
                     notes=_notes(info, sample_rate) + notes)


# libsndfile's header log line for a chunk shorter than its header says, e.g.
# "data : 144000 (should be 71978)".
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _notes_truncated(snd: sf.SoundFile, frames: int) -> list[str]:
    """A note when the file ends before its header says it does (its audio up to there is kept)."""
    match = _SHORT_CHUNK.search(snd.extra_info or "")
    if match:
        return [f"truncated: the header declares {int(match.group(2))} bytes of audio, the file "
                f"holds {int(match.group(3))}; kept the {frames / snd.samplerate:.3f} s that are there"]
    # compressed formats' frame counts are estimates: only a real shortfall counts
    if snd.frames - frames > max(0.01 * snd.frames, 4096):
        return [f"truncated: the header declares {snd.frames} frames, {frames} could be decoded; "
                f"kept what is there"]
    return []


def _notes(info: SourceInfo, sample_rate: int) -> list[str]:
    """What was done to a usable but unusual source, in words a musician reads."""
    notes = []
    if info.channels > 1:
        notes.append(f"downmixed {info.channels} channels to mono (mean)" if info.channels != 2
                     else "downmixed stereo to mono (mean)")
    if info.sample_rate != sample_rate:
        note = f"resampled {info.sample_rate} Hz -> {sample_rate} Hz"
        if info.sample_rate < 40000:  # only a band-limit within hearing is worth saying
            note += (f"; no content above {info.sample_rate / 2000:g} kHz "
                     f"(the source's Nyquist frequency)")
        notes.append(note)
    if info.bit_depth is not None and info.bit_depth <= 8:
        notes.append(f"{info.bit_depth}-bit source ({info.subtype}): about "
                     f"{6 * info.bit_depth} dB of dynamic range, audible quantisation noise")
    if info.clipped_samples:
        notes.append(f"source clips: {info.clipped_samples} sample(s) at or beyond full scale")
    if info.is_float and info.peak > 1.0:
        notes.append(f"float source peaks above full scale ({amplitude_to_db(info.peak):+.1f} dBFS); "
                     f"kept as is, the set gain accounts for it")
    return notes


def apply_gain(samples: np.ndarray, gain_db: float) -> np.ndarray:
    """`samples` scaled by `gain_db`, as float32 (a new array)."""
    return (samples * np.float32(db_to_amplitude(gain_db))).astype(np.float32, copy=False)


def load_for_model(path: str | os.PathLike[str], preprocessing: Mapping[str, Any]) -> np.ndarray:
    """New audio through the very pipeline a prepared set went through, set gain included.

    `preprocessing` is a prepared set's (or a checkpoint's copy of its) `preprocessing` object.
    Returns `(samples,)` float32 mono at `preprocessing["sample_rate"]`, bit-identical to what
    `PreparedSet.load` returns for the same source file. Raises AudioError naming the file."""
    check_parameters(preprocessing)
    converted = convert(path, int(preprocessing["sample_rate"]))
    return apply_gain(converted.samples, float(preprocessing["gain_db"]))
