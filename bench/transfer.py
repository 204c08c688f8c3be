"""Timbre transfer through `synthd render --input`: the render against the model's own `forward`,
and the pitch of held-out notes through it.

Builds the General MIDI note set `bench/train_quality.py --set gm` renders with fluidsynth (8
instruments x 5 pitches, 43..76), holds every sixth note out of `prepare` entirely, trains the
default config for `--minutes` and exports it (or takes `--model M.ts --files DIR`: an existing
model and a folder of files it never saw). Then, for each held-out file:

    render    `synthd render --input FILE --input-gain auto --channels 1` (the engine's streaming
              encode -> decode, 256-sample blocks, input gate, DC blocker, soft limiter, 24-bit)
    forward   the model file's own `forward` on the same samples (read and resampled as the render
              reads them, the same auto gain, zeros to the render's length), after `reset()`: once
              in one call, once in 256-sample calls, which must agree (streaming)
    max diff  largest |render - forward| over the whole render; corr: their correlation
    distance  multi-resolution log-STFT L1 distance (FFT 256..4096) of each to the source at the
              model's input level, both aligned to it by the encode lag (metadata
              latency.encode_samples) plus the best envelope cross-correlation shift; render and
              forward distances should match within 1 % (target), since only the output stage,
              the gate and 24 bits separate them
    chain     largest |render - forward through the chain the render documents| (input DC blocker
              and gain, 256-sample calls, input gate, output DC blocker, soft limiter, 24-bit
              rounding), rebuilt here from synthd.dsp: what is left is a fault of the render
              (target: <= 2 steps of 24 bits, 2.4e-7)

With a pitch input (the default architecture: decode's first input `pitch`, unit midi), the
held-out notes are joined into one melody, rendered, and the one pitch tracker (training.pitch,
YIN) reads source and render; printed over the source's voiced frames:

    median |error|   cents between render and source (target <= 20)
    transpose +7     the melody again with a patch whose `[input]` has `transpose = 7.0`: the
                     median interval render - source in cents (target about +700)

The whole bench took 13 minutes on 2 shared CPU cores with the default `--minutes` (9 of training).

    .venv/bin/python bench/transfer.py
    .venv/bin/python bench/transfer.py --model M.ts --files HELD_OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train_quality import build_gm  # noqa: E402
from synthd import dsp  # noqa: E402
from synthd.transfer import GATE_CLOSE_S, GATE_HYSTERESIS_DB, GATE_OPEN_S, SILENT_DB, frame_levels_db  # noqa: E402
from training.pitch import VOICED_THRESHOLD, PitchTracker, track_long  # noqa: E402

HOLD_OUT_EVERY = 6  # as bench/pitch_accuracy.py: 6 of the 40 notes, one or two per instrument
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aif", ".aiff")
CALL = 256  # the render's engine block: forward is also run in calls this long
FFT_SIZES = (256, 512, 1024, 2048, 4096)
LOG_FLOOR = 1e-5  # -100 dBFS: the log-STFT distance ignores what lies below
ENVELOPE_HOP = 64
SEARCH_S = 0.05  # the envelope cross-correlation looks this far either side of the encode lag
MIN_VOICED = 0.25  # a file joins the melody when at least this share of its frames is voiced
TRANSPOSE = 7.0
DISTANCE_MATCH = 0.01  # render and forward distances agree within this (relative)
GATE_DB = -60.0  # the input gate of a patch without `[input] gate_db`
LSB = 2.0 ** -23  # one step of a 24-bit file
CHAIN_TOLERANCE = 2 * LSB


# ---------------------------------------------------------------------------------- helpers


def cli(module: str, *args: str, log: Path | None = None) -> list[str]:
    """Run `python -m module ARGS` from the repository (stderr to `log` or captured); exit with
    its output when it fails. Returns the command, for the summary."""
    cmd = [sys.executable, "-m", module, *args]
    if log is not None:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        detail = f"see {log}"
    else:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {proc.returncode}): {detail}")
    return cmd


def read_like_render(path: Path, rate: int) -> np.ndarray:
    """The file as `synthd render --input` reads it (synthd.render.read_input): float32, the
    channels' mean, soxr VHQ to `rate`. Read here on purpose, not imported: the bench checks the
    render against an independent reading of the same contract."""
    x, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = x.mean(axis=1)
    if file_rate != rate:
        mono = soxr.resample(mono, file_rate, rate, quality="VHQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def read_render(path: Path) -> np.ndarray:
    """A mono render as float64 `(samples,)`."""
    y, _ = sf.read(str(path), dtype="float64", always_2d=True)
    return y[:, 0]


@dataclass
class ModelFile:
    """The exported model and the metadata this bench uses."""

    module: torch.jit.ScriptModule
    sample_rate: int
    hop: int
    encode_lag: int  # samples
    gain_db: float  # --input-gain auto
    pitched: bool  # decode's first input is a pitch in MIDI units

    @classmethod
    def load(cls, path: Path) -> "ModelFile":
        module = torch.jit.load(str(path)).eval()
        meta = json.loads(module.metadata())
        controls = meta.get("controls") or []
        return cls(module, int(meta["sample_rate"]), int(meta["hop"]),
                   int((meta.get("latency") or {}).get("encode_samples") or 0),
                   float((meta.get("preprocessing") or {}).get("gain_db") or 0.0),
                   bool(controls) and controls[0].get("label") == "pitch" and controls[0].get("unit") == "midi")

    @torch.no_grad()
    def forward(self, x: np.ndarray, call: int | None = None) -> np.ndarray:
        """`forward` of the file on `x` `(samples,)` after `reset()`: one call, or calls of `call`
        samples. Output `(samples,)`; `x` is padded to whole frames and the output cut back."""
        n = len(x)
        padded = np.pad(x, (0, -n % self.hop)).astype(np.float32)
        t = torch.from_numpy(padded).view(1, 1, -1)
        self.module.reset()
        if call is None:
            y = self.module.forward(t)
        else:
            y = torch.cat([self.module.forward(t[..., i:i + call]) for i in range(0, t.shape[-1], call)], -1)
        self.module.reset()
        return y[0, 0, :n].double().numpy()


# ---------------------------------------------------------------------------------- measures


def log_stft_distance(y: np.ndarray, x: np.ndarray) -> float:
    """Mean over FFT_SIZES of the mean |log |Y| - log |X||, magnitudes in amplitude units (the
    STFT divided by its window's sum) floored at LOG_FLOOR, hann windows, hop a quarter."""
    yt, xt = torch.from_numpy(y).float(), torch.from_numpy(x).float()
    total = 0.0
    for n in FFT_SIZES:
        window = torch.hann_window(n)
        spectra = [torch.stft(s, n, n // 4, window=window, return_complex=True).abs() / window.sum()
                   for s in (yt, xt)]
        total += float((spectra[0].clamp(min=LOG_FLOOR).log() - spectra[1].clamp(min=LOG_FLOOR).log()).abs().mean())
    return total / len(FFT_SIZES)


def envelope(x: np.ndarray) -> np.ndarray:
    """RMS per ENVELOPE_HOP samples, one value per sample (the hop's value repeated): fine enough
    for a shift to the sample, smooth enough that waveforms of another phase still line up."""
    n = len(x) // ENVELOPE_HOP * ENVELOPE_HOP
    rms = np.sqrt(np.square(x[:n]).reshape(-1, ENVELOPE_HOP).mean(1))
    smooth = np.convolve(rms, np.hanning(9) / np.hanning(9).sum(), mode="same")
    return np.interp(np.arange(n), np.arange(len(smooth)) * ENVELOPE_HOP + ENVELOPE_HOP / 2, smooth)


def best_shift(y: np.ndarray, x: np.ndarray, lag: int, rate: int) -> int:
    """Samples of `y` before `x`'s first: `lag` plus the shift within ±SEARCH_S that best
    correlates the envelopes (every 8th shift, then to the sample around the best)."""
    reach = int(SEARCH_S * rate)
    ex = envelope(x)
    ey = envelope(np.pad(y, (reach, reach + len(x))))  # shifts past either end read silence

    def score(s: int) -> float:
        return float(np.dot(ey[s + reach:s + reach + len(ex)], ex))

    coarse = max(range(lag - reach, lag + reach + 1, 8), key=score)
    return max(range(coarse - 8, coarse + 9), key=score)


def aligned(y: np.ndarray, shift: int, n: int) -> np.ndarray:
    """`y[shift:shift + n]`, zeros past either end."""
    out = np.zeros(n)
    lo, hi = max(0, shift), min(len(y), shift + n)
    if hi > lo:
        out[lo - shift:hi - shift] = y[lo:hi]
    return out


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-20))


@dataclass
class FileFigures:
    name: str
    seconds: float
    chunk_diff: float  # forward in one call vs in CALL-sample calls
    chain_diff: float  # render vs the documented chain around forward
    chain_diff_at: float  # seconds into the render
    max_diff: float  # render vs forward
    max_diff_at: float  # seconds into the render
    corr: float
    shift_render: int
    shift_forward: int
    d_render: float
    d_forward: float

    @property
    def mismatch(self) -> float:
        return abs(self.d_render - self.d_forward) / max(self.d_forward, 1e-12)


def input_gate(x: np.ndarray, hop: int, lag_frames: int, rate: int) -> np.ndarray:
    """The render's input gate over its output `(samples,)`, from input `x` at the model's level, as
    synthd/transfer.py documents it: output frame k is open while any input frame k - lag .. k is
    above GATE_DB, closed once all are GATE_HYSTERESIS_DB below it; opens in GATE_OPEN_S, closes
    over GATE_CLOSE_S."""
    levels = [SILENT_DB] * lag_frames
    ramp, is_open = dsp.Ramp(0.0), False
    gate = np.zeros(len(x))
    for k, level in enumerate(frame_levels_db(x, hop)):
        levels = (levels + [float(level)])[-(lag_frames + 1):]
        loudest = max(levels)
        if loudest > GATE_DB:
            is_open = True
        elif loudest < GATE_DB - GATE_HYSTERESIS_DB:
            is_open = False
        target = 1.0 if is_open else 0.0
        if ramp.target != target:
            ramp.set(target, int((GATE_OPEN_S if is_open else GATE_CLOSE_S) * rate))
        gate[k * hop:(k + 1) * hop] = ramp.process(hop)
    return gate


def chain(model: ModelFile, x: np.ndarray) -> np.ndarray:
    """What the render should write for input `x` (the file as read, at its own level, padded to
    the render's length): the documented chain around `forward`, 24-bit rounding included."""
    # the engine cleans the input (a DC blocker) before its gain, in float32
    x = (dsp.DCBlocker(1, model.sample_rate).process(x[:, None].astype(np.float64))[:, 0]
         * 10.0 ** (model.gain_db / 20.0)).astype(np.float32)
    y = model.forward(x, CALL).astype(np.float32)
    gate = input_gate(x, model.hop, model.encode_lag // model.hop, model.sample_rate).astype(np.float32)
    y = (y * gate).astype(np.float64)
    out = dsp.soft_limit(dsp.DCBlocker(1, model.sample_rate).process(y[:, None]))[:, 0].astype(np.float32)
    return np.clip(np.round(out.astype(np.float64) / LSB), -2 ** 23, 2 ** 23 - 1) * LSB


def render(model_path: Path, source: Path, out: Path, patch: Path | None = None) -> list[str]:
    """`synthd render --input` of one file, mono, auto gain; returns the command."""
    args = ["render", "--input", str(source), "--model", str(model_path), "--out", str(out),
            "--input-gain", "auto", "--channels", "1", "--quiet"] + (["--patch", str(patch)] if patch else [])
    return cli("synthd", *args)


def compare_file(model: ModelFile, model_path: Path, source: Path, work: Path) -> tuple[FileFigures, list[str]]:
    """Render one held-out file and set it against the model's offline forward."""
    out = work / f"render-{source.stem}.wav"
    cmd = render(model_path, source, out)
    y_render = read_render(out)
    raw = read_like_render(source, model.sample_rate)
    x = raw * 10.0 ** (model.gain_db / 20.0)
    # the render's length: the input, the encoder's lag and a tail; forward sees zeros there
    x_long = np.pad(x, (0, max(0, len(y_render) - len(x))))
    expected = chain(model, np.pad(raw, (0, len(x_long) - len(raw))))
    y_forward = model.forward(x_long)
    y_chunked = model.forward(x_long, CALL)
    chunk_diff = float(np.abs(y_forward - y_chunked).max())
    diff = np.abs(y_render - y_forward)
    chain_diff = np.abs(y_render - expected[:len(y_render)])
    shifts = [best_shift(y, x, model.encode_lag, model.sample_rate) for y in (y_render, y_forward)]
    distances = [log_stft_distance(aligned(y, s, len(x)), x.astype(np.float64))
                 for y, s in zip((y_render, y_forward), shifts)]
    return FileFigures(source.name, len(x) / model.sample_rate, chunk_diff, float(chain_diff.max()),
                       float(chain_diff.argmax()) / model.sample_rate, float(diff.max()),
                       float(diff.argmax()) / model.sample_rate, correlation(y_render, y_forward),
                       shifts[0], shifts[1], distances[0], distances[1]), cmd


# ---------------------------------------------------------------------------------- pitch


def pitch_track(x: np.ndarray, rate: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """(pitch in MIDI units, voicing) per frame of `x`, by the project's one YIN tracker."""
    track = track_long(PitchTracker(sample_rate=rate, hop=hop), torch.from_numpy(x.astype(np.float32)))
    return track[0].numpy().astype(np.float64), track[1].numpy().astype(np.float64)


def make_melody(files: list[Path], model: ModelFile, out: Path) -> list[str]:
    """Join the held-out files that are pitched (MIN_VOICED of their frames voiced) into one take
    at the model's rate, each at its own level; returns the names used."""
    parts, names = [], []
    for f in files:
        x = read_like_render(f, model.sample_rate)
        _, voicing = pitch_track(x, model.sample_rate, model.hop)
        if len(voicing) and np.mean(voicing > VOICED_THRESHOLD) >= MIN_VOICED:
            parts.append(x)
            names.append(f.stem)
    if parts:
        # float: the take the render reads is the one analysed here, with no 24-bit rounding between
        sf.write(str(out), np.concatenate(parts), model.sample_rate, subtype="FLOAT")
    return names


def interval_cents(model: ModelFile, take: Path, rendered: Path) -> np.ndarray:
    """Cents from the take's pitch to the render's, on the take's voiced frames, the render
    aligned to the take as the distances are."""
    x = read_like_render(take, model.sample_rate)
    y = read_render(rendered)
    shift = best_shift(y, x, model.encode_lag, model.sample_rate)
    source_pitch, source_voicing = pitch_track(x, model.sample_rate, model.hop)
    render_pitch, _ = pitch_track(aligned(y, shift, len(x)), model.sample_rate, model.hop)
    voiced = source_voicing > VOICED_THRESHOLD
    return 100.0 * (render_pitch - source_pitch)[voiced]


# ---------------------------------------------------------------------------------- model


def train_model(work: Path, minutes: float, seed: int) -> tuple[Path, Path, list[list[str]]]:
    """The GM note set, every HOLD_OUT_EVERY-th note held out, prepared, trained, exported:
    (model file, folder of held-out files, commands)."""
    files = build_gm(work / "sources")
    held = files[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY]
    train_dir, held_dir = work / "train-sources", work / "held-out"
    for folder, chosen in ((train_dir, [f for f in files if f not in held]), (held_dir, held)):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in chosen:
            (folder / f.name).symlink_to(f)
    prepared, run_dir, model_path = work / "prepared", work / "run", work / "model.ts"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmds = [cli("training", "prepare", str(train_dir), str(prepared), log=work / "prepare.log")]
    print(f"gm notes: {len(files) - len(held)} prepared, {len(held)} held out: "
          f"{', '.join(f.stem for f in held)}", flush=True)
    started = time.monotonic()
    cmds.append(cli("training", "train", str(prepared), str(run_dir), "--minutes", f"{minutes:g}", "--seed",
                    str(seed), log=work / "train.log"))
    print(f"trained {(time.monotonic() - started) / 60:.1f} min (log {work / 'train.log'})", flush=True)
    cmds.append(cli("training", "export", str(run_dir), str(model_path), log=work / "export.log"))
    return model_path, held_dir, cmds


def held_out_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise SystemExit(f"{folder}: no audio files")
    return files


# ---------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=9.0, help="training budget (default 9)")
    parser.add_argument("--model", type=Path, help="an exported model: skip training (needs --files)")
    parser.add_argument("--files", type=Path, help="held-out audio files for --model")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "synthd-transfer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.model is None) != (args.files is None):
        parser.error("--model and --files go together")
    torch.set_num_threads(1)  # as the render: one thread, and the same float paths
    started = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    commands: list[list[str]] = []
    if args.model is None:
        model_path, files_dir, commands = train_model(args.work, args.minutes, args.seed)
    else:
        model_path, files_dir = args.model.resolve(), args.files.resolve()
    files = held_out_files(files_dir)
    model = ModelFile.load(model_path)
    print(f"model {model_path}: {model.sample_rate} Hz, hop {model.hop}, encode lag {model.encode_lag} samples, "
          f"auto gain {model.gain_db:+.2f} dB, pitch input {'yes' if model.pitched else 'no'}", flush=True)

    print(f"\n{'file':18s} {'sec':>5s} {'chunked':>8s} {'chain':>8s} {'at s':>6s} {'max diff':>9s} {'at s':>6s} {'corr':>7s} "
          f"{'shift r/f':>11s} {'dist render':>11s} {'dist fwd':>9s} {'mismatch':>9s}", flush=True)
    figures = []
    for f in files:
        fig, cmd = compare_file(model, model_path, f, args.work)
        figures.append(fig)
        print(f"{fig.name:18s} {fig.seconds:5.2f} {fig.chunk_diff:8.1e} {fig.chain_diff:8.1e} {fig.chain_diff_at:6.2f} "
              f"{fig.max_diff:9.4f} {fig.max_diff_at:6.2f} "
              f"{fig.corr:7.4f} {fig.shift_render:5d}/{fig.shift_forward:<5d} {fig.d_render:11.4f} "
              f"{fig.d_forward:9.4f} {100 * fig.mismatch:8.2f}%", flush=True)
    commands.append(cmd)
    matched = sum(fig.mismatch <= DISTANCE_MATCH for fig in figures)
    d_render = float(np.mean([f.d_render for f in figures]))
    d_forward = float(np.mean([f.d_forward for f in figures]))

    summary = [f"files                      {len(figures)} held out ({files_dir})",
               f"forward 1 call vs {CALL}-sample calls  max |diff| {max(f.chunk_diff for f in figures):.2e}",
               f"render vs chain            max |diff| {max(f.chain_diff for f in figures):.2e} "
               f"(target <= {CHAIN_TOLERANCE:.1e}): {sum(f.chain_diff <= CHAIN_TOLERANCE for f in figures)}/"
               f"{len(figures)} files",
               f"render vs forward          max |diff| {max(f.max_diff for f in figures):.4f}, "
               f"min corr {min(f.corr for f in figures):.4f}",
               f"log-STFT distance          render {d_render:.4f}, forward {d_forward:.4f}; "
               f"within {100 * DISTANCE_MATCH:g} %: {matched}/{len(figures)} files (target: all)"]
    if model.pitched:
        melody = args.work / "melody.wav"
        names = make_melody(files, model, melody)
        if names:
            patch = args.work / "transpose.toml"
            patch.write_text(f"version = 1\n\n[input]\ntranspose = {TRANSPOSE}\n")
            plain, up = args.work / "render-melody.wav", args.work / "render-melody-transposed.wav"
            commands.append(render(model_path, melody, plain))
            commands.append(render(model_path, melody, up, patch))
            errors = np.abs(interval_cents(model, melody, plain))
            interval = interval_cents(model, melody, up)
            print(f"\nmelody of {len(names)} held-out notes ({', '.join(names)}), {len(errors)} voiced frames", flush=True)
            print(f"  pitch error      median |error| {np.median(errors):7.1f} cents  within 50 c "
                  f"{100 * np.mean(errors < 50):5.1f} %  (target <= 20)", flush=True)
            print(f"  transpose {TRANSPOSE:+g}   median interval {np.median(interval):+7.1f} cents  within 50 c of "
                  f"{100 * TRANSPOSE:+.0f}: {100 * np.mean(np.abs(interval - 100 * TRANSPOSE) < 50):5.1f} %  "
                  f"(target about {100 * TRANSPOSE:+.0f})", flush=True)
            summary += [f"pitch, median |error|      {np.median(errors):.1f} cents (target <= 20)",
                        f"transpose {TRANSPOSE:+g}, median     {np.median(interval):+.1f} cents "
                        f"(target about {100 * TRANSPOSE:+.0f})"]
        else:
            summary.append("pitch                      no held-out file is pitched: not measured")
    else:
        summary.append("pitch                      the model has no pitch input: not measured")

    print("\nsummary")
    print("\n".join(f"  {line}" for line in summary))
    print(f"commands (the render's for the last file; each held-out file is rendered alike), "
          f"{(time.monotonic() - started) / 60:.1f} min in all")
    print("\n".join(f"  {shlex.join(c)}" for c in commands))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
