"""Training quality on real recorded sets, measured on files held out of `prepare` entirely.

Builds each set from sounds installed on this machine (a Hydrogen drum kit: ElectricEmpireKit,
on which the defaults were tuned, or another with `--kit`; notes of several instruments
rendered from FluidR3_GM.sf2 with fluidsynth; triads of the same instruments with `--set
chords`), holds every fifth file out, prepares the rest,
and trains with the default config (and, with `--augment both`, again with every augmentation
off) for a wall-clock budget. Every `--every` minutes it loads the run's latest checkpoint and
prints, over the held-out files (and at the end the same for the best checkpoint on the run's
own validation files, which is what `synthd-train export` writes):

    model   multi-resolution STFT distance (spectral convergence + log magnitude, FFT 64..4096)
            between each held-out file and the model's reconstruction of it
    noise   the same distance for noise shaped to each file's average spectrum and level
    ratio   model / noise   (target: <= 0.45 within 20 minutes on 2 CPU cores)
    worst   the held-out file with the highest ratio of its own (target: <= 0.65)

and at the end of each run, per held-out file, where its reconstruction misses: in each band
(below 60 Hz, 60-250 Hz, 250 Hz-1 kHz, 1-5 kHz, above 5 kHz) the share of the source's energy it
holds and the reconstruction's level against the source's there, in dB (a kick whose body below
60 Hz comes back 8 dB short reads "-1/-8" in the first column), and the same ratio over the
files the model learnt from (prepare's training split) and over prepare's validation split: how
much of the held-out shortfall is fit, and how much generalisation. Then the same figures with
every signal low-passed at the decoder's `max_frequency` (its iSTFT head's band edge, 22 kHz
by default), the band it makes by design: the targets stay on the full band.

    .venv/bin/python bench/train_quality.py --set drums --minutes 20
    .venv/bin/python bench/train_quality.py --set drums --kit "circAfrique v4" --minutes 20
    .venv/bin/python bench/train_quality.py --set chords --augment on --minutes 12
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soxr
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.audio import load_for_model  # noqa: E402
from training.checkpoint import load_run  # noqa: E402
from training.config import AugmentConfig  # noqa: E402
from training.losses import mrstft_distance  # noqa: E402

DRUMKITS = Path("/usr/share/hydrogen/data/drumkits")
# the kit the defaults were tuned on; `--kit` picks another (e.g. "circAfrique v4", hand drums)
DEFAULT_KIT = "ElectricEmpireKit"
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
# General MIDI programs: piano, vibraphone, nylon guitar, violin, cello, trumpet, flute, synth lead
GM_PROGRAMS = (0, 11, 24, 40, 42, 56, 73, 81)
GM_PITCHES = (43, 52, 60, 67, 76)
# --set chords: major, minor, first inversion, minor in open voicing, on four roots
CHORD_ROOTS = (48, 55, 60, 64)
CHORD_SHAPES = ((0, 4, 7), (0, 3, 7), (0, 3, 8), (0, 7, 15))
HOLD_OUT_EVERY = 5
NOISE_FFT = 2048
BAND_EDGES_HZ = (0.0, 60.0, 250.0, 1000.0, 5000.0, 24000.0)


def build_drums(folder: Path, kit: str = DEFAULT_KIT) -> list[Path]:
    files = sorted(f for f in (DRUMKITS / kit).glob("*") if f.suffix.lower() in (".flac", ".wav"))
    if not files:
        raise SystemExit(f"{DRUMKITS / kit}: no drum kit (Debian package hydrogen-drumkits)")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = folder / f.name
        if not target.exists():
            shutil.copy(f, target)
        out.append(target)
    return out


def render_notes(wav: Path, program: int, notes: tuple[int, ...]) -> Path:
    """`notes` struck together on General MIDI `program`: held 1.2 s, then their release (0.8 s),
    rendered by fluidsynth into `wav` (kept when it exists)."""
    import mido

    if wav.exists():
        return wav
    if not SOUNDFONT.exists():
        raise SystemExit(f"{SOUNDFONT}: no soundfont (Debian package fluid-soundfont-gm)")
    song = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    song.tracks.append(track)
    track.append(mido.MetaMessage("set_tempo", tempo=500000))  # 1 beat = 0.5 s
    track.append(mido.Message("program_change", program=program, time=0))
    for note in notes:
        track.append(mido.Message("note_on", note=note, velocity=100, time=0))
    for i, note in enumerate(notes):
        track.append(mido.Message("note_off", note=note, velocity=0, time=int(1.2 * 960) if i == 0 else 0))
    track.append(mido.MetaMessage("end_of_track", time=int(0.8 * 960)))
    with tempfile.TemporaryDirectory() as tmp:
        mid = Path(tmp) / "notes.mid"
        song.save(mid)
        subprocess.run(["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.6", "-r", "48000", "-F", str(wav),
                        str(SOUNDFONT), str(mid)], check=True, capture_output=True)
    return wav


def build_gm(folder: Path, kit: str = "") -> list[Path]:
    """One WAV per (program, pitch): a 1.2 s note and its release, rendered by fluidsynth."""
    folder.mkdir(parents=True, exist_ok=True)
    return [render_notes(folder / f"gm{program:03d}_{pitch}.wav", program, (pitch,))
            for program in GM_PROGRAMS for pitch in GM_PITCHES]


def build_chords(folder: Path, kit: str = "") -> list[Path]:
    """One WAV per (program, chord): a triad in root position or an inversion, major or minor
    (what the residual path plays: the harmonic head follows one pitch)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [render_notes(folder / f"chord{program:03d}_{root}.wav", program, tuple(root + i for i in shape))
            for program in GM_PROGRAMS for root, shape in zip(CHORD_ROOTS, CHORD_SHAPES)]


SETS = {"drums": build_drums, "gm": build_gm, "chords": build_chords}


def shaped_noise(x: np.ndarray, seed: int) -> np.ndarray:
    """White noise filtered to `x`'s average power spectrum and scaled to its RMS level."""
    xt = torch.from_numpy(x).float()
    window = torch.hann_window(NOISE_FFT)
    power = torch.stft(xt, NOISE_FFT, NOISE_FFT // 4, window=window, return_complex=True).abs().square().mean(1)
    noise = torch.randn(len(x), generator=torch.Generator().manual_seed(seed))
    spec = torch.stft(noise, NOISE_FFT, NOISE_FFT // 4, window=window, return_complex=True)
    shaped = torch.istft(spec * power.sqrt()[:, None], NOISE_FFT, NOISE_FFT // 4, window=window, length=len(x))
    rms_x = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    rms_n = float(shaped.square().mean().sqrt())
    return (shaped * (rms_x / max(rms_n, 1e-12))).numpy()


def band_energies(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """Energy of `x` `(samples,)` in each band of BAND_EDGES_HZ `(bands,)`, from one long FFT (a hit
    is short: its whole length, zero-padded, resolves 60 Hz)."""
    n = max(1 << 16, 1 << int(np.ceil(np.log2(max(len(x), 1)))))
    power = np.abs(np.fft.rfft(x.astype(np.float64), n)) ** 2
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    return np.array([power[(freqs >= lo) & (freqs < hi)].sum() for lo, hi in zip(BAND_EDGES_HZ, BAND_EDGES_HZ[1:])])


class HeldOut:
    """The held-out files in the model's format and their noise baselines."""

    def __init__(self, files: list[Path], preprocessing: dict, below_hz: float | None = None) -> None:
        self.names = [f.name for f in files]
        self.rate = int(preprocessing["sample_rate"])
        # with `below_hz`, every signal compared (source, noise, reconstruction) is low-passed there first
        self.below_hz = below_hz
        self.audio = [self._band(load_for_model(f, preprocessing)) for f in files]
        self.noise_distances = [
            float(mrstft_distance(torch.from_numpy(self._band(shaped_noise(a, i))).reshape(1, 1, -1),
                                  torch.from_numpy(a).reshape(1, 1, -1)))
            for i, a in enumerate(self.audio)]
        self.noise_distance = float(np.mean(self.noise_distances))

    def _band(self, x: np.ndarray) -> np.ndarray:
        """`x` low-passed at `below_hz` (soxr's steep linear-phase filter, down to twice that rate
        and back), or `x` itself."""
        if self.below_hz is None:
            return x
        low = int(2 * self.below_hz)
        y = soxr.resample(soxr.resample(x.astype(np.float64), self.rate, low, "VHQ"), low, self.rate, "VHQ")
        return np.pad(y, (0, max(0, len(x) - len(y))))[:len(x)].astype(np.float32)

    @torch.no_grad()
    def model_distance(self, model: torch.nn.Module, hop: int) -> float:
        return float(np.mean(self.model_distances(model, hop)))

    def worst_file(self, distances: list[float]) -> tuple[str, float]:
        """The held-out file with the highest ratio of its model distance (`distances`, as
        `model_distances` gives them) to its noise's."""
        ratios = [m / n for m, n in zip(distances, self.noise_distances)]
        i = int(np.argmax(ratios))
        return self.names[i], ratios[i]

    @torch.no_grad()
    def model_distances(self, model: torch.nn.Module, hop: int) -> list[float]:
        return [float(mrstft_distance(torch.from_numpy(self._band(y)).reshape(1, 1, -1),
                                      torch.from_numpy(a).reshape(1, 1, -1)))
                for a, y in zip(self.audio, self.reconstructions(model, hop))]

    @torch.no_grad()
    def reconstructions(self, model: torch.nn.Module, hop: int) -> list[np.ndarray]:
        """The model's reconstruction of each held-out file, as long as the file `(samples,)`."""
        out = []
        # silence in front for the decoder's warm-up, as in training: the onset is decoded in full
        context = -(-model.warmup_samples // hop) * hop
        for a in self.audio:
            n = -(-len(a) // hop) * hop
            x = torch.from_numpy(np.pad(a, (context, n - len(a)))).reshape(1, 1, -1)
            out.append(model(x)[0][0, 0, context:context + len(a)].numpy())
        return out

    def band_table(self, model: torch.nn.Module, hop: int) -> str:
        """Per file and band (BAND_EDGES_HZ): the source's share of its energy there and the
        reconstruction's level against the source's there, in dB, as "share/difference"."""
        rate = self.rate  # the files were read at the model's rate
        bands = [f"{lo:g}-{hi:g} Hz" for lo, hi in zip(BAND_EDGES_HZ, BAND_EDGES_HZ[1:])]
        width = max(len(n) for n in self.names)
        lines = [" " * width + "  " + "".join(f"{b:>15s}" for b in bands)]
        for name, a, y in zip(self.names, self.audio, self.reconstructions(model, hop)):
            source, made = band_energies(a, rate), band_energies(y, rate)
            cells = [f"{10 * np.log10(s / source.sum() + 1e-12):5.0f}/{10 * np.log10((m + 1e-20) / (s + 1e-20)):+4.0f}"
                     for s, m in zip(source, made)]
            lines.append(f"{name:{width}s}  " + "".join(f"{c:>15s}" for c in cells))
        return "\n".join(lines)


def fit_summary(prepared: Path, model: torch.nn.Module, ckpt: dict, below_hz: float | None = None) -> str:
    """The held-out ratio (mean model distance / mean noise distance) on the prepared set's own
    files, by split: "train" (what the model fit) and "validation" (prepare's split: files it never
    trained on, which choose best.pt). A held-out ratio near the training files' says the set is
    short of fit, not of generalisation."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    source_dir = Path(manifest["source_dir"])
    parts = []
    for split in ("train", "validation"):
        files = [source_dir / f["source"] for f in manifest["files"] if f.get("split") == split]
        if not files:
            continue
        h = HeldOut(files, ckpt["preprocessing"], below_hz)
        distances = h.model_distances(model, int(ckpt["config"]["model"]["hop"]))
        worst, worst_ratio = h.worst_file(distances)
        parts.append(f"{split} {len(files)} files: ratio {np.mean(distances) / h.noise_distance:.3f} "
                     f"(worst {worst} {worst_ratio:.3f})")
    return "; ".join(parts)


def latest(run_dir: Path, held: list[Path], cache: dict, which: str = "last") -> tuple[dict, torch.nn.Module, HeldOut] | None:
    """(checkpoint, model, held-out files) of the run's `which` checkpoint ("last": the latest;
    "best": the best on the run's own validation files, which `export` writes), None before the
    first; the held-out files are read (and their noise measured) once, into `cache`."""
    try:
        ckpt, model = load_run(run_dir, which)
    except (FileNotFoundError, ValueError):
        return None
    if "held" not in cache:
        cache["held"] = HeldOut(held, ckpt["preprocessing"])
    return ckpt, model, cache["held"]


def measure(run_dir: Path, held: list[Path], cache: dict,
            which: str = "last") -> tuple[int, float, float, tuple[str, float]] | None:
    """(step, model distance, noise distance, (worst file, its ratio)) of the run's `which`
    checkpoint (see `latest`), None before the first."""
    found = latest(run_dir, held, cache, which)
    if found is None:
        return None
    ckpt, model, h = found
    distances = h.model_distances(model, int(ckpt["config"]["model"]["hop"]))
    return int(ckpt["step"]), float(np.mean(distances)), h.noise_distance, h.worst_file(distances)


def print_misses(name: str, run_dir: Path, held: list[Path], prepared: Path, cache: dict) -> None:
    """Where the run's last checkpoint misses: per held-out file and band, then the ratio over the
    files it learnt from (`fit_summary`), then both within the band the decoder makes."""
    found = latest(run_dir, held, cache)
    if found is None:
        return
    ckpt, model, h = found
    hop, top = int(ckpt["config"]["model"]["hop"]), float(ckpt["config"]["model"]["max_frequency"])
    print(f"[{name}] where the last checkpoint misses, per held-out file and band: the source's share of "
          f"its energy there / the reconstruction's level against the source's there (dB)\n"
          f"{h.band_table(model, hop)}", flush=True)
    print(f"[{name}] the same measure on the files it learnt from (last checkpoint): "
          f"{fit_summary(prepared, model, ckpt)}", flush=True)
    if top < h.rate / 2:
        banded = HeldOut(held, ckpt["preprocessing"], top)
        print(f"[{name}] below {top:g} Hz only, the band the decoder makes (the targets are on the full band): "
              f"held out {banded.model_distance(model, hop) / banded.noise_distance:.3f}; "
              f"{fit_summary(prepared, model, ckpt, top)}", flush=True)


def run_one(name: str, prepared: Path, held: list[Path], work: Path, minutes: float, every: float,
            config: Path | None, seed: int) -> tuple[float, float]:
    """Train one run, measuring its latest checkpoint every `every` minutes; (the last measured
    held-out ratio, the best checkpoint's)."""
    run_dir = work / f"run-{name.split('/')[-1]}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "training", "train", str(prepared), str(run_dir), "--minutes", f"{minutes:g}",
           "--seed", str(seed)] + (["--config", str(config)] if config else [])
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    log_path = work / f"train-{name.split('/')[-1]}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    cache: dict = {}
    started = time.monotonic()
    next_check = every * 60
    ratio = float("nan")
    while True:
        done = proc.poll() is not None
        if done or time.monotonic() - started >= next_check:
            result = measure(run_dir, held, cache)
            if result is not None:
                step, model_d, noise_d, (worst, worst_ratio) = result
                ratio = model_d / noise_d
                print(f"[{name}] {(time.monotonic() - started) / 60:5.1f} min  step {step:6d}  "
                      f"held-out distance: model {model_d:.4f}  noise {noise_d:.4f}  ratio {ratio:.3f}  "
                      f"worst file {worst} {worst_ratio:.3f}", flush=True)
            next_check += every * 60
        if done:
            break
        time.sleep(2)
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] training failed (exit {proc.returncode}); see {log_path}")
    print_misses(name, run_dir, held, prepared, cache)
    best = measure(run_dir, held, cache, "best")
    if best is not None:
        step, model_d, noise_d, (worst, worst_ratio) = best
        print(f"[{name}] best checkpoint (what `export` writes): step {step}  held-out ratio "
              f"{model_d / noise_d:.3f}  worst file {worst} {worst_ratio:.3f}", flush=True)
        return ratio, model_d / noise_d
    return ratio, float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(SETS) + ["all"], default="drums")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=4.0, help="minutes between held-out measurements")
    parser.add_argument("--augment", choices=["on", "off", "both"], default="both",
                        help="defaults (on), every augmentation off, or one run of each")
    parser.add_argument("--kit", default=DEFAULT_KIT,
                        help=f"Hydrogen drum kit of --set drums (default {DEFAULT_KIT}, the kit the defaults "
                             f"were tuned on; any folder of {DRUMKITS})")
    parser.add_argument("--config", type=Path, help="config for the default run (e.g. to try a change)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "synthd-train-quality")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # measurements must not starve the training process

    names = sorted(SETS) if args.set == "all" else [args.set]
    summary = []
    for set_name in names:
        # another kit gets a folder of its own: no source or prepared file of one kit mixes into the other's
        work = args.work / (f"{set_name}-{args.kit}" if set_name == "drums" and args.kit != DEFAULT_KIT else set_name)
        files = SETS[set_name](work / "sources", args.kit)
        held = files[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY]
        train_dir = work / "train-sources"
        shutil.rmtree(train_dir, ignore_errors=True)
        train_dir.mkdir(parents=True)
        for f in files:
            if f not in held:
                (train_dir / f.name).symlink_to(f)
        prepared = work / "prepared"
        subprocess.run([sys.executable, "-m", "training", "prepare", str(train_dir), str(prepared)],
                       cwd=REPO, check=True)
        print(f"{set_name}: {len(files) - len(held)} files prepared, {len(held)} held out", flush=True)
        runs = []
        if args.augment in ("on", "both"):
            runs.append(("defaults", args.config))
        if args.augment in ("off", "both"):
            off = work / "augment-off.toml"
            off.write_text("".join(f"[augment.{a.name}]\nenabled = false\n" for a in dataclasses.fields(AugmentConfig)))
            runs.append(("augment-off", off))
        for name, config in runs:
            ratio, best = run_one(f"{set_name}/{name}", prepared, held, work, args.minutes, args.every, config,
                                  args.seed)
            summary.append(f"{set_name:6s} {name:12s} final ratio {ratio:.3f}, best checkpoint {best:.3f}")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
