"""A collection that grows: `synthd-train train DATA NEW_RUN --from OLD_RUN` through the command line,
on generated one-shots with a tiny model: what it reports, what it refuses, what it records."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from support.training_cli import ENV, REPO, TINY
from support.training_cli import cli as _cli
from support.training_cli import log_rows as _rows
from training.checkpoint import load_checkpoint
from training.incremental import ReplaySchedule

OLD_FILES, ADDED_FILES = 12, 5


def _ok(*args: str) -> subprocess.CompletedProcess:
    result = _cli(*args)
    assert result.returncode == 0, f"synthd-train {' '.join(args)}:\n{result.stderr[-3000:]}"
    return result


def _metadata(path: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return json.loads(torch.jit.load(str(path)).metadata())


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict[str, Path | str]:
    """An old run (trained and exported on 12 one-shots) and the set grown since: the same folder
    with 5 sounds added and one old training sound removed, prepared again over the old set."""
    root = tmp_path_factory.mktemp("incremental")
    sounds, old_set, grown_set = root / "sounds", root / "prepared-old", root / "prepared-grown"
    config = root / "tiny.toml"
    config.write_text(TINY)
    _ok("demo-data", str(sounds), "--count", str(OLD_FILES))
    _ok("prepare", str(sounds), str(old_set))
    _ok("train", str(old_set), str(root / "old"), "--steps", "30", "--config", str(config), "--seed", "2")
    _ok("export", str(root / "old"), str(root / "old.ts"))
    # demo-data is deterministic per index: a larger count adds files and keeps the first ones
    _ok("demo-data", str(sounds), "--count", str(OLD_FILES + ADDED_FILES))
    manifest = json.loads((old_set / "manifest.json").read_text())
    removed = next(e["source"] for e in manifest["files"] if e["split"] == "train")
    (sounds / removed).unlink()
    shutil.copytree(old_set, grown_set)  # a user's set is prepared again in place; the copy keeps the old one
    _ok("prepare", str(sounds), str(grown_set))
    return {"root": root, "sounds": sounds, "old_set": old_set, "grown_set": grown_set, "config": config,
            "old": root / "old", "removed": removed}


@pytest.fixture(scope="module")
def new_run(grown) -> tuple[Path, subprocess.CompletedProcess]:
    """The grown set trained 20 steps `--from` the old run."""
    run = grown["root"] / "new"
    return run, _ok("train", str(grown["grown_set"]), str(run), "--from", str(grown["old"]), "--steps", "20")


def test_prepare_holds_out_some_of_the_added_files(grown):
    files = json.loads((grown["grown_set"] / "manifest.json").read_text())["files"]
    old = {e["content_hash"]: e["split"] for e in json.loads((grown["old_set"] / "manifest.json").read_text())["files"]}
    added = [e for e in files if e["content_hash"] not in old]
    assert len(added) == ADDED_FILES
    assert any(e["split"] == "validation" for e in added) and any(e["split"] == "train" for e in added)
    assert all(e["split"] == old[e["content_hash"]] for e in files if e["content_hash"] in old)


def test_from_reports_the_change_and_validates_old_and_new_files_apart(grown, new_run):
    run, result = new_run
    err = result.stderr
    assert f"files: {OLD_FILES - 1} unchanged, {ADDED_FILES} added, 1 removed" in err, err
    added_names = [f"{i:03d}_" for i in range(OLD_FILES, OLD_FILES + ADDED_FILES)]
    added_line = next(line for line in err.splitlines() if line.startswith("  added: "))
    assert all(name in added_line for name in added_names), added_line
    assert f"  removed: {grown['removed']} (train)" in err

    # every validation row has both groups; the run started from the old weights, not from scratch
    checks = [r for r in _rows(run) if r["val_distance"]]
    assert [r["step"] for r in checks] == ["0", "10", "20"]
    assert all(r["val_old_distance"] and r["val_new_distance"] for r in checks)
    untrained = float([r for r in _rows(grown["old"]) if r["val_distance"]][0]["val_distance"])
    assert float(checks[0]["val_old_distance"]) < 0.8 * untrained
    # the log's lines and the progress line carry the two figures
    assert any(line.startswith("step 20: validation distance") and "old files" in line and "new files" in line
               for line in err.splitlines()), err
    final = next(line for line in err.splitlines() if line.startswith("train: 20/20"))
    assert f"val_old={float(checks[-1]['val_old_distance']):.4g}" in final, final
    assert f"val_new={float(checks[-1]['val_new_distance']):.4g}" in final, final
    assert "held-out files, the old run's: distance" in err and "held-out files, the added: distance" in err

    # old files are replayed beside the added ones, each file by its plain weight (the default)
    shares = {float(r["new_share"]) for r in _rows(run) if r["new_share"]}
    assert len(shares) == 1 and 0 < shares.pop() < 1

    ckpt = load_checkpoint(run / "best.pt")
    old_ckpt = load_checkpoint(grown["old"] / "best.pt")
    lineage = ckpt["lineage"]
    assert lineage["from_run"] == str(grown["old"].resolve()) and lineage["from_step"] == old_ckpt["step"]
    assert sorted(f["source"][:4] for f in lineage["added"]) == added_names
    assert [f["source"] for f in lineage["removed"]] == [grown["removed"]]
    assert ckpt["config"] == old_ckpt["config"]  # the model and its settings carry over


def test_the_added_files_are_drawn_more_often_at_first_and_the_old_ones_always():
    base = np.array([1.0, 1.0, 1.0, 1.0])
    schedule = ReplaySchedule(base, np.array([False, False, False, True]), boost=3.0, focus=0.5)
    assert schedule.natural == pytest.approx(0.25)
    assert schedule.share(0.0) == pytest.approx(3 / 6)      # one added file at 3x against three old ones
    assert schedule.share(0.25) == pytest.approx(2 / 5)
    assert schedule.share(0.5) == pytest.approx(0.25) and schedule.share(1.0) == pytest.approx(0.25)
    for progress in (0.0, 0.3, 1.0):
        p = schedule.weights(progress)
        assert p.sum() == pytest.approx(1.0) and (p[:3] > 0).all()
        assert p[0] == p[1] == p[2]  # old files keep their relative weights


def test_a_model_config_of_another_shape_is_refused(grown, tmp_path):
    bigger = tmp_path / "bigger.toml"
    bigger.write_text("[model]\nlatent_size = 8\n")
    result = _cli("train", str(grown["grown_set"]), str(tmp_path / "run"), "--from", str(grown["old"]),
                  "--steps", "2", "--config", str(bigger))
    assert result.returncode == 2
    assert "differs in shape" in result.stderr and "model.latent_size: 4 in" in result.stderr, result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
    # settings outside [model] may change: they overlay the old run's config
    lower = tmp_path / "lower.toml"
    lower.write_text("[incremental]\nlr_scale = 0.5\n")
    ok = _ok("train", str(grown["grown_set"]), str(tmp_path / "ok"), "--from", str(grown["old"]), "--steps", "1",
             "--config", str(lower))
    cfg = load_checkpoint(tmp_path / "ok" / "last.pt")["config"]
    assert cfg["incremental"]["lr_scale"] == 0.5 and cfg["model"]["latent_size"] == 4, ok.stderr


def test_a_set_prepared_differently_is_refused(grown, tmp_path):
    other = tmp_path / "quieter"
    shutil.copytree(grown["grown_set"], other)
    _ok("prepare", str(grown["sounds"]), str(other), "--target-lufs", "-23")
    result = _cli("train", str(other), str(tmp_path / "run"), "--from", str(grown["old"]), "--steps", "2")
    assert result.returncode == 2
    assert "prepared differently" in result.stderr and "target_lufs: -20.0" in result.stderr, result.stderr
    assert "-23.0" in result.stderr and not (tmp_path / "run").exists()


def test_a_set_tracked_by_an_earlier_pitch_tracker_still_grows_a_run(grown, tmp_path):
    # an earlier version's tracker (forward lags, a 5-frame octave median) in the set's manifest:
    # no prepare option chooses it and training tracks every crop itself, so the run still grows
    other = tmp_path / "earlier-tracker"
    shutil.copytree(grown["grown_set"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    pitch = manifest["preprocessing"]["pitch"]
    pitch.pop("lags")
    pitch["octave_fix"] = "snapped to the 5-frame median"
    (other / "manifest.json").write_text(json.dumps(manifest))
    _ok("train", str(other), str(tmp_path / "run"), "--from", str(grown["old"]), "--steps", "1")


def test_a_set_that_lost_every_old_file_is_a_new_run(grown, tmp_path):
    _ok("demo-data", str(tmp_path / "others"), "--count", "4", "--seed", "7")
    _ok("prepare", str(tmp_path / "others"), str(tmp_path / "set"))
    result = _cli("train", str(tmp_path / "set"), str(tmp_path / "run"), "--from", str(grown["old"]), "--steps", "2")
    assert result.returncode == 2
    assert f"holds none of the old run's {OLD_FILES} files" in result.stderr, result.stderr
    assert "new run" in result.stderr and "without --from" in result.stderr
    assert not (tmp_path / "run").exists()


def test_export_records_the_lineage_and_which_labels_changed(grown, new_run, tmp_path):
    run, _ = new_run
    result = _ok("export", str(run), str(tmp_path / "new.ts"))
    old_meta, new_meta = _metadata(grown["root"] / "old.ts"), _metadata(tmp_path / "new.ts")
    lineage = new_meta["lineage"]
    assert lineage["from_run"] == str(grown["old"].resolve())
    assert lineage["from_model"] == str((grown["root"] / "old.ts").resolve())
    assert lineage["unchanged"] == OLD_FILES - 1 and len(lineage["added"]) == ADDED_FILES
    assert [f["source"] for f in lineage["removed"]] == [grown["removed"]]
    assert all(f["content_hash"].startswith("sha256:") for f in lineage["added"])
    # the controls were measured afresh; the comparison agrees with the two files' own labels
    old_labels = [c["label"] for c in old_meta["controls"]]
    new_labels = [c["label"] for c in new_meta["controls"]]
    changes = lineage["controls"]
    assert changes["kept"] == [label for label in new_labels if label in old_labels]
    assert changes["gone"] == [label for label in old_labels if label not in new_labels]
    assert changes["added"] == [label for label in new_labels if label not in old_labels]
    assert f"a patch for it finds {len(changes['kept'])} of its {len(old_labels)} controls by label" in result.stderr
    for label in changes["gone"]:
        assert label in next(line for line in result.stderr.splitlines() if line.startswith("  gone"))


def test_a_patch_for_the_old_model_plays_the_new_one(grown, new_run, tmp_path):
    run, _ = new_run
    _ok("export", str(run), str(tmp_path / "new.ts"))
    old_labels = [c["label"] for c in _metadata(grown["root"] / "old.ts")["controls"]]
    new_labels = {c["label"] for c in _metadata(tmp_path / "new.ts")["controls"]}
    patch = tmp_path / "old-rig.toml"
    patch.write_text("version = 1\nname = \"old rig\"\n" + "".join(
        f'[[control]]\nlabel = "{label}"\ncc = {20 + i}\n' for i, label in enumerate(old_labels)))
    kept = [label for label in old_labels if label in new_labels]
    automation = tmp_path / "a.toml"
    automation.write_text("version = 1\nseconds = 0.5\n" + "".join(
        f'[[event]]\ntime = 0.1\ncontrol = "{label}"\nvalue = 0.7\n' for label in kept))
    out = tmp_path / "take.wav"
    result = _cli("render", "--model", str(tmp_path / "new.ts"), "--patch", str(patch), "--automation",
                  str(automation), "--out", str(out), module="synthd")
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0
    gone = [label for label in old_labels if label not in new_labels]
    idle = [line for line in result.stderr.splitlines() if "those mappings are idle" in line]
    assert bool(idle) == bool(gone), result.stderr
    for line in idle:  # only the labels the new model lacks go idle
        assert all(label in line for label in gone) and not any(f" {label}" in line.split("has no control")[1]
                                                             for label in kept)


def test_evaluate_reports_old_and_new_held_out_files_apart(grown, new_run, tmp_path):
    run, _ = new_run
    record = run / "exported.json"
    before = record.read_text() if record.exists() else None
    _ok("evaluate", str(run), "--data", str(grown["grown_set"]), "--out", str(tmp_path / "report"), "--max-files", "4")
    # the report's own export is a working copy: the run's record of its export is left alone
    assert (record.read_text() if record.exists() else None) == before
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    values = report["figures"]["reconstruction"]["values"]
    manifest = json.loads((grown["grown_set"] / "manifest.json").read_text())
    old = {e["content_hash"] for e in json.loads((grown["old_set"] / "manifest.json").read_text())["files"]}
    held_new = sum(e["split"] == "validation" and e["content_hash"] not in old for e in manifest["files"])
    assert values["validation_new"]["files"] == held_new
    assert values["validation_old"]["files"] + held_new == values["validation"]["files"]
    assert values["validation_old"]["mrstft"] > 0 and values["validation_new"]["mrstft"] > 0
    assert "old files" in report["verdicts"]["reconstruction"]
    curves = report["figures"]["curves"]["values"]
    rows = [r for r in _rows(run) if r["val_old_distance"]]
    assert curves["old_files_distance"]["end"] == pytest.approx(float(rows[-1]["val_old_distance"]))
    assert "index.html" in os.listdir(tmp_path / "report")


def test_forgetting_is_warned_of(grown, tmp_path):
    """Old files dropped from the replay, new files unlike them and a high learning rate: old-file
    validation rises, and the run says so at the check where it passes 5 %."""
    ft_sounds = tmp_path / "new-only"
    ft_sounds.mkdir()
    manifest = json.loads((grown["old_set"] / "manifest.json").read_text())
    keep = {e["source"] for e in manifest["files"] if e["split"] == "validation"}
    for name in sorted(keep):
        shutil.copy(grown["sounds"] / name, ft_sounds / name)
    # what is added is hiss, nothing like the old one-shots: the model can only learn it by
    # forgetting them (added one-shots like the old ones teach the young old run about both)
    rng = np.random.default_rng(5)
    for i in range(ADDED_FILES):
        hiss = 0.3 * rng.uniform(-1.0, 1.0, 48000) * np.linspace(1.0, 0.2, 48000)
        sf.write(ft_sounds / f"hiss{i}.wav", hiss.astype(np.float32), 48000, subtype="PCM_24")
    ft_set = tmp_path / "set"
    shutil.copytree(grown["old_set"], ft_set)
    _ok("prepare", str(ft_sounds), str(ft_set))
    hot = tmp_path / "hot.toml"
    hot.write_text("[optim]\nlr = 0.02\nwarmup_steps = 1\n")
    result = _ok("train", str(ft_set), str(tmp_path / "run"), "--from", str(grown["old"]), "--steps", "30",
                 "--config", str(hot))
    assert "none of the old run's training files is left to replay" in result.stderr
    checks = [r for r in _rows(tmp_path / "run") if r["val_old_distance"]]
    start = float(checks[0]["val_old_distance"])
    for r in checks[1:]:
        rose = float(r["val_old_distance"]) > 1.05 * start
        assert ("forgetting" in r["warning"]) == rose, (r["step"], r["val_old_distance"], start, r["warning"])
    assert any("forgetting" in r["warning"] for r in checks), [(r["step"], r["val_old_distance"]) for r in checks]
    assert "the model is forgetting them" in result.stderr


def test_a_grown_run_resumes_exactly(grown, tmp_path):
    """Stopped by SIGTERM and resumed, a `--from` run (its replay schedule with the added files drawn
    more often at first, anchor and averaged weights) repeats the run that was not stopped; --resume
    keeps its origin."""
    anchored = tmp_path / "anchored.toml"
    anchored.write_text("[incremental]\nanchor = 50.0\nlr_scale = 0.5\nnew_boost = 3.0\n")
    args = ("--steps", "40", "--from", str(grown["old"]), "--config", str(anchored), "--seed", "4")
    _ok("train", str(grown["grown_set"]), str(tmp_path / "straight"), *args)
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "training", "train", str(grown["grown_set"]), str(run), *args],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "log.csv").exists() and any(r["step"] and int(r["step"]) >= 6 for r in _rows(run))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 6 <= load_checkpoint(run / "last.pt")["step"] < 40
    other = _cli("train", str(grown["grown_set"]), str(run), "--resume", "--from", str(grown["root"] / "new"))
    assert other.returncode == 2 and "keeps its origin" in other.stderr, other.stderr
    _ok("train", str(grown["grown_set"]), str(run), "--resume")
    columns = ("step", "loss", "new_share", "val_distance", "val_old_distance", "val_new_distance")
    straight = [[r[c] for c in columns] for r in _rows(tmp_path / "straight")]
    resumed = [[r[c] for c in columns] for r in _rows(run)]
    assert straight == resumed
    shares = [float(r["new_share"]) for r in _rows(run) if r["new_share"]]
    assert shares[0] > shares[-1] > 0 and max(shares) < 1  # boosted at first, down to the plain weights
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["lineage"]["from_run"] == str(grown["old"].resolve()) and len(ckpt["anchor"]) > 0
