"""`synthd-train train` through its command line, on the demo data, with a tiny model."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from support.training_cli import ENV, REPO, TINY
from support.training_cli import cli as _cli
from support.training_cli import log_rows as _rows
from training.augment import Augmenter
from training.checkpoint import load_checkpoint, load_run
from training.config import AugmentConfig, load_config
from training.data import CropSampler, ValidationSet


def _train(data: Path, run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training", "train", str(data), str(run), *extra],
                            cwd=REPO, env={**ENV, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "log.csv").exists() and any(int(r["step"]) >= step for r in _rows(run) if r["step"]):
            return
        time.sleep(0.05)
    raise AssertionError(f"training never reached step {step}: {proc.communicate()[1][-2000:]}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(prepared demo set, tiny config)."""
    root = tmp_path_factory.mktemp("train")
    assert _cli("demo-data", str(root / "sounds"), "--count", "15").returncode == 0
    result = _cli("prepare", str(root / "sounds"), str(root / "prepared"))
    assert result.returncode == 0, result.stderr
    config = root / "tiny.toml"
    config.write_text(TINY)
    return root / "prepared", config


def test_training_lowers_the_validation_distance_and_reports_kl(setup, tmp_path):
    data, config = setup
    run = tmp_path / "run"
    result = _cli("train", str(data), str(run), "--steps", "60", "--config", str(config), "--seed", "3")
    assert result.returncode == 0, result.stderr
    validations = [r for r in _rows(run) if r["val_distance"]]
    untrained, trained = float(validations[0]["val_distance"]), float(validations[-1]["val_distance"])
    assert validations[0]["step"] == "0" and validations[-1]["step"] == "60"
    assert trained < 0.8 * untrained, (untrained, trained)

    # KL of every dimension is logged; the report names exactly the dimensions under the threshold
    last = [r for r in _rows(run) if r["kl_0"]][-1]
    kl = [float(last[f"kl_{i}"]) for i in range(4)]
    assert "KL per latent dimension" in result.stderr
    dead = [i for i, v in enumerate(kl) if v < 0.01]
    if dead:
        assert "collapsed latent dimensions (KL < 0.01): " + ", ".join(map(str, dead)) in result.stderr
    else:
        assert "no collapsed latent dimension" in result.stderr

    # the run folder: resolved config, checkpoints loadable with weights_only, model in eval mode
    assert load_config(run / "config.toml").model.latent_size == 4
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        assert ckpt["config"]["model"]["latent_size"] == 4 and ckpt["manifest_hash"].startswith("sha256:")
    ckpt, model = load_run(run)
    assert not model.training and ckpt["step"] == int(ckpt["best"]["step"])
    # the model in use is the moving average of the trained weights, kept beside them
    assert ckpt["config"]["optim"]["ema_decay"] > 0
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, ckpt["model"][k]) for k, v in ckpt["ema"].items())
    assert ckpt["dataset_dir"] == str(data.resolve()) and ckpt["preprocessing"]["sample_rate"] == 48000

    # a finished run is never overwritten by accident
    again = _cli("train", str(data), str(run), "--steps", "5", "--config", str(config))
    assert again.returncode == 2 and "--resume" in again.stderr


def test_sigterm_saves_and_resume_repeats_the_uninterrupted_run(setup, tmp_path):
    data, config = setup
    # the adversarial stage joins at step 9 (its discriminators' state must resume exactly too);
    # the loudness attribute orders latent 0
    adversarial = tmp_path / "adversarial.toml"
    adversarial.write_text(config.read_text() + '[adversarial]\nenabled = "on"\nstart = 0.3\nchannels = 4\n'
                           'periods = [2, 3]\nfft_sizes = [256]\n[regularize]\nattributes = ["loudness"]\n')
    args = ("--steps", "30", "--config", str(adversarial), "--seed", "1")
    straight = _cli("train", str(data), str(tmp_path / "a"), *args)
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "b"
    proc = _train(data, run, *args)
    _wait_for_step(run, proc, 8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = load_checkpoint(run / "last.pt")["step"]
    assert 8 <= stopped < 30 and "stopped by signal" in err

    resumed = _cli("train", str(data), str(run), "--resume", "--steps", "30")
    assert resumed.returncode == 0, resumed.stderr
    columns = ("step", "loss", "recon", "kl", "regularize", "disc", "feature_matching", "val_distance", "kl_0",
               "kl_3")
    a = [[r[c] for c in columns] for r in _rows(tmp_path / "a")]
    b = [[r[c] for c in columns] for r in _rows(run)]
    assert a == b
    assert float(a[-1][columns.index("disc")]) > 0 and float(a[-1][columns.index("regularize")]) > 0


def test_kill_9_never_leaves_an_unreadable_run(setup, tmp_path):
    data, config = setup
    run = tmp_path / "run"
    # a checkpoint at every step: many writes for the kills to land in
    config.with_name("every-step.toml").write_text(TINY.replace("every_steps = 10", "every_steps = 1"))
    every_step = config.with_name("every-step.toml")
    rng = random.Random(0)
    for attempt in range(3):
        extra = ("--resume",) if attempt else ("--config", str(every_step))
        proc = _train(data, run, "--steps", "200", *extra)
        _wait_for_step(run, proc, 1 + 3 * attempt)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.communicate()
        for name in ("last.pt", "best.pt"):
            assert load_checkpoint(run / name)["step"] >= 0
        load_config(run / "config.toml")
    assert load_run(run, "last")[0]["step"] >= 1


def test_config_errors_name_the_key(setup, tmp_path):
    data, _ = setup
    for text, key in (('[optim]\nlr = "fast"\n', "optim.lr"), ("[model]\nlatent_dims = 8\n", "model.latent_dims"),
                      ("[augment.gain]\nprobability = 2.0\n", "augment.gain.probability"),
                      ("[optim]\nema_decay = 1.0\n", "optim.ema_decay"), ("[optim]\nlr = nan\n", "optim.lr"),
                      ("[optim]\nnonfinite_patience = 0\n", "optim.nonfinite_patience"),
                      ("[optim]\ngrad_clip = nan\n", "optim.grad_clip"),
                      ("[augment.mix]\nmin_db = 0.0\nmax_db = -6.0\n", "augment.mix.min_db")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        result = _cli("train", str(data), str(tmp_path / "run"), "--steps", "1", "--config", str(bad))
        assert result.returncode == 2 and key in result.stderr, result.stderr
        assert not (tmp_path / "run" / "last.pt").exists()


def test_regularize_flag_binds_attributes_and_is_checked(setup, tmp_path):
    data, config = setup
    bad = _cli("train", str(data), str(tmp_path / "bad"), "--steps", "1", "--config", str(config),
               "--regularize", "brightness,sparkle")
    assert bad.returncode == 2 and "--regularize" in bad.stderr and "'sparkle'" in bad.stderr, bad.stderr
    run = tmp_path / "run"
    ok = _cli("train", str(data), str(run), "--steps", "3", "--config", str(config), "--regularize", "brightness,loudness")
    assert ok.returncode == 0, ok.stderr
    assert load_config(run / "config.toml").regularize.attributes == ["brightness", "loudness"]
    assert all(float(r["regularize"]) >= 0.0 for r in _rows(run) if r.get("regularize"))
    assert any(r.get("regularize") for r in _rows(run))
    again = _cli("train", str(data), str(run), "--steps", "4", "--resume", "--regularize", "pitch")
    assert again.returncode == 2 and "resumed" in again.stderr, again.stderr


def test_two_process_ddp_with_gloo(setup, tmp_path):
    data, config = setup
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "training", "train", str(data), str(run), "--steps", "12", "--config", str(config)],
        cwd=REPO, env={**ENV, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # a hang: every training process prints where its threads are (SIGUSR1), one at a time,
        # then the launcher (faulthandler on SIGABRT)
        workers = _descendants(proc.pid)
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGABRT)
        time.sleep(0.5)
        for pid in [*workers, proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        pytest.fail(f"two-process training hung; the processes' stacks:\n{stderr[-12000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert "(2 processes)" in stderr
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 12 and ckpt["finished"]
    rows = [r for r in _rows(run) if r["val_distance"]]
    assert float(rows[-1]["val_distance"]) < float(rows[0]["val_distance"])


def _descendants(pid: int) -> list[int]:
    """Process ids of `pid`'s children and their children (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _augment_only(name: str | None = None) -> AugmentConfig:
    """The augmentation config with every augmentation off but `name` (None: all off)."""
    cfg = AugmentConfig()
    for field_ in dataclasses.fields(cfg):
        getattr(cfg, field_.name).enabled = field_.name == name
    return cfg


def test_mix_adds_a_second_file_at_a_gain_in_range():
    # two files that cannot be confused: constant 1.0 and constant 0.001, both longer than a crop
    audio = [np.ones(8000, np.float32), np.full(8000, 1e-3, np.float32)]
    cfg = _augment_only("mix")
    cfg.mix.probability, cfg.mix.min_db, cfg.mix.max_db = 1.0, -12.0, -6.0
    sampler = CropSampler(audio, 1024, 64, Augmenter(cfg, 48000))
    target, encoder_input = sampler.batch(np.random.default_rng(0))
    values = target[:, 0, 0].double().numpy()
    assert torch.equal(target, encoder_input)
    assert (target == target[:, :, :1]).all()  # every example a sum of two constants
    low, high = 10 ** (-12 / 20), 10 ** (-6 / 20)
    # each value is a + g * b: a and b the two files' levels, g the mix gain within its range
    assert all(any(low - 1e-6 <= (v - a) / b <= high + 1e-6 for a in (1.0, 1e-3) for b in (1.0, 1e-3))
               for v in values)
    # both kinds of pair occur, and no example is a single file alone
    assert not np.isin(np.round(values, 6), [1.0, 1e-3]).any()
    assert (values > 1.0).any() and (values < 0.6).any()
    cfg.mix.enabled = False
    plain, _ = CropSampler(audio, 1024, 64, Augmenter(cfg, 48000)).batch(np.random.default_rng(0))
    assert np.isin(plain[:, 0, 0].numpy(), np.array([1.0, 1e-3], np.float32)).all()


def test_augmentations_keep_the_length_and_noise_only_the_input():
    cfg = AugmentConfig()
    for name in ("gain", "pitch", "stretch", "noise", "eq_tilt", "polarity"):
        getattr(cfg, name).enabled = True
        getattr(cfg, name).probability = 1.0
    augmenter = Augmenter(cfg, 48000)
    t = np.arange(augmenter.source_length(4096)) / 48000
    source = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    target, noisy = augmenter(source, 4096, np.random.default_rng(0))
    assert target.shape == noisy.shape == (4096,) and target.dtype == np.float32
    residual = noisy - target
    assert 0 < np.sqrt(np.mean(residual ** 2)) < 0.05 * np.sqrt(np.mean(target ** 2))
    again, _ = augmenter(source, 4096, np.random.default_rng(0))
    assert np.array_equal(target, again)


def _only(name: str, **settings) -> Augmenter:
    """An augmenter that applies `name` alone, every time, with `settings` for its range."""
    cfg = _augment_only(name)
    getattr(cfg, name).probability = 1.0
    for key, value in settings.items():
        setattr(getattr(cfg, name), key, value)
    return Augmenter(cfg, 48000)


def _peak_hz(x: np.ndarray, lo: float, hi: float) -> float:
    """Frequency of the strongest component of `x` (48 kHz) between `lo` and `hi` Hz, to 0.25 Hz."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=4 * 48000))
    freqs = np.fft.rfftfreq(4 * 48000, 1 / 48000)
    band = (freqs >= lo) & (freqs <= hi)
    return float(freqs[band][spectrum[band].argmax()])


def _level_db(x: np.ndarray, hz: float) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(20 * np.log10(spectrum[int(round(hz * len(x) / 48000))]))


def test_each_augmentation_does_what_it_says_within_its_range():
    """Each augmentation alone on signals whose change can be read off: a 1 kHz tone beating at
    10 Hz (pitch moves both, stretch only the beat), two tones (tilt), any signal (gain, polarity)."""
    n = 48000
    t = np.arange(4 * n) / 48000
    beating = (0.3 * np.sin(2 * np.pi * 1000 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 10 * t))).astype(np.float32)

    def rngs():  # the same eight draws for each augmentation
        return [np.random.default_rng(seed) for seed in range(8)]

    def beat_hz(x: np.ndarray) -> float:
        envelope = np.convolve(np.abs(x), np.ones(480) / 480, mode="same")  # 10 ms: the carrier averaged out
        return _peak_hz(envelope - envelope.mean(), 2.0, 40.0)

    gains = [20 * np.log10(np.std(_only("gain", min_db=-6.0, max_db=6.0)(beating, n, r)[0]) / np.std(beating[:n]))
             for r in rngs()]
    assert all(-6.01 <= g <= 6.01 for g in gains) and min(gains) < -1 and max(gains) > 1, gains

    flipped, _ = _only("polarity")(beating, n, rngs()[0])
    assert np.array_equal(flipped, -beating[:n])

    pitch = _only("pitch", max_semitones=2.0)
    for r in rngs():
        shifted, _ = pitch(beating[:pitch.source_length(n)], n, r)
        semitones = 12 * np.log2(_peak_hz(shifted, 500, 2000) / 1000)
        assert -2.02 <= semitones <= 2.02 and abs(semitones) > 0.01, semitones
        # varispeed: the beat speeds up by the same ratio
        assert 12 * np.log2(beat_hz(shifted) / 10) == pytest.approx(semitones, abs=0.3)

    stretch = _only("stretch", min_rate=0.8, max_rate=1.25)
    rates = []
    for r in rngs():
        stretched, _ = stretch(beating[:stretch.source_length(n)], n, r)
        assert _peak_hz(stretched, 500, 2000) == pytest.approx(1000, abs=2)  # same pitch
        rates.append(beat_hz(stretched) / 10)
    assert all(0.78 <= rate <= 1.27 for rate in rates) and min(rates) < 0.97 and max(rates) > 1.03, rates

    two_tones = (0.2 * np.sin(2 * np.pi * 250 * t[:n]) + 0.2 * np.sin(2 * np.pi * 4000 * t[:n])).astype(np.float32)
    tilts = []
    for r in rngs():
        tilted, _ = _only("eq_tilt", max_db_per_octave=1.5)(two_tones, n, r)
        low, high = (_level_db(tilted, f) - _level_db(two_tones, f) for f in (250, 4000))
        # pivoting at 1 kHz: two octaves below and two above move by the same amount, opposite ways
        assert low == pytest.approx(-high, abs=0.05) and abs(high) <= 2 * 1.5 + 0.05, (low, high)
        tilts.append(high / 2)
    assert min(tilts) < -0.1 and max(tilts) > 0.1, tilts


def test_a_file_shorter_than_a_crop_is_padded_never_dropped():
    """A 50 ms hit among long files: drawn like the others, whole, after the decoder's context of
    silence and before silence; the validation set keeps it too."""
    hit = np.linspace(1.0, 0.1, 2400, dtype=np.float32)  # 50 ms at 48 kHz, no zero inside
    long = np.full(48000, 0.5, np.float32)
    cfg = _augment_only()
    context, crop = 768, 8192
    sampler = CropSampler([long, hit, long], crop, 64, Augmenter(cfg, 48000), context=context)
    target, _ = sampler.batch(np.random.default_rng(0))
    assert target.shape == (64, 1, context + crop)
    hits = [x for x in target[:, 0].numpy() if not np.isclose(x[context:], 0.5).all()]
    assert hits, "the short file was never drawn"
    for x in hits:
        assert np.array_equal(x[:context], np.zeros(context, np.float32))
        assert np.array_equal(x[context:context + len(hit)], hit)
        assert not x[context + len(hit):].any()
    validation = ValidationSet.build([long, hit], crop, 10.0, 48000, context)
    assert any(np.array_equal(c[0, context:context + len(hit)].numpy(), hit) for c in validation.crops)


def test_overfitting_is_flagged_once_validation_rises_while_training_falls_for_patience_checks():
    from types import SimpleNamespace

    from training.train import Trainer

    patience = 2
    trainer = object.__new__(Trainer)  # the bookkeeping alone: no model, no data
    trainer.cfg = SimpleNamespace(validation=SimpleNamespace(overfit_patience=patience))
    trainer.history, trainer.best, trainer.overfit_streak, trainer.main, trainer.step = [], None, 0, False, 0
    # (training recon, validation recon) per check: both fall, then validation turns up while
    # training keeps falling, then both rise (no longer the overfitting pattern)
    checks = [(3.0, 3.0), (2.0, 2.5), (1.5, 2.6), (1.2, 2.7), (1.0, 2.8), (1.1, 2.9)]
    warnings_seen = []
    for i, (train_recon, val_recon) in enumerate(checks):
        trainer.step = 10 * i
        trainer.interval_train = [train_recon]
        trainer.validate = lambda v=val_recon: {"val_recon": v, "val_score": v, "val_distance": v}
        row = trainer._validation_round({"step": trainer.step})
        warnings_seen.append(row.get("warning"))
    assert warnings_seen == [None, None, None, "overfitting", "overfitting", None]
    assert trainer.best == {"step": 10, "val_score": 2.5, "val_distance": 2.5}  # kept from before the rise


def test_a_blown_up_step_is_skipped_and_a_run_that_keeps_blowing_up_stops_with_its_reason(setup, tmp_path):
    """A learning rate far too high: the steps whose gradient is not finite are skipped and
    counted, never applied, and after `optim.nonfinite_patience` in a row the run stops with
    status 1, naming the rate, with no NaN in any checkpoint."""
    data, _ = setup
    hot = tmp_path / "hot.toml"
    hot.write_text(TINY.replace("lr = 3e-3", "lr = 1e6").replace("[optim]", "[optim]\nnonfinite_patience = 4"))
    run = tmp_path / "run"
    result = _cli("train", str(data), str(run), "--steps", "60", "--config", str(hot), "--seed", "3")
    assert result.returncode == 1, result.stderr
    assert "the loss or its gradient was not finite (NaN or inf) at learning rate" in result.stderr
    assert "error: training diverged at step" in result.stderr and "lower [optim] lr (it is 1e+06)" in result.stderr
    assert "Traceback" not in result.stderr
    skipped = sum(int(r["skipped"]) for r in _rows(run) if r["skipped"])
    assert skipped >= 4, skipped
    last, best = (torch.load(run / name, weights_only=True) for name in ("last.pt", "best.pt"))
    assert last["step"] < 60 and last["skip_streak"] >= 4 and best["step"] == 0
    for ckpt in (last, best):
        for part in ("model", "ema"):
            bad = [k for k, t in ckpt[part].items() if t.is_floating_point() and not torch.isfinite(t).all()]
            assert not bad, (part, bad[:5])
    # resumed, it stops where it stopped, as the uninterrupted run did
    again = _cli("train", str(data), str(run), "--steps", "60", "--resume")
    assert again.returncode == 1 and "error: training diverged at step" in again.stderr, again.stderr
    assert torch.load(run / "last.pt", weights_only=True)["step"] == last["step"]


def test_a_figure_some_steps_lack_is_averaged_over_the_steps_that_gave_it():
    from training.train import Meter

    meter = Meter()
    for step in range(4):
        meter.add({"loss": 1.0, **({"disc": 2.0} if step >= 2 else {})}, torch.ones(3))
    meter.skipped = 1
    assert meter.row() == {"skipped": 1.0, "loss": 1.0, "disc": 2.0, "kl_0": 1.0, "kl_1": 1.0, "kl_2": 1.0}
    old = Meter(sums={"loss": 3.0}, kl_dims=torch.ones(2) * 3, count=3)  # a checkpoint's, from before counts
    old.add({"loss": 1.0, "disc": 4.0}, torch.ones(2))
    assert old.row()["loss"] == 1.0 and old.row()["disc"] == 4.0


def test_a_non_finite_gradient_leaves_the_weights_and_the_optimiser_as_they_were():
    from training.train import finite_step

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 4)).sum().backward()
    assert finite_step(optimizer, layer.parameters(), 5.0)  # a finite step is taken
    before = [p.detach().clone() for p in layer.parameters()]
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    for clip in (5.0, 0.0):
        (layer(torch.randn(2, 4)) * float("nan")).sum().backward()
        assert not finite_step(optimizer, layer.parameters(), clip)
        assert all(p.grad is None for p in layer.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
        assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, optimizer.state.values()))
    layer(torch.randn(2, 4)).sum().backward()
    assert finite_step(optimizer, layer.parameters(), 0.0)  # and training goes on
    assert not all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
