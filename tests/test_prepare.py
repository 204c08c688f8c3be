"""`synthd-train prepare` through its command line, on generated folders of sounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from support import audiofiles as af
from training.audio import load_for_model
from training.dataset import PreparedSet

SR = 48000


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def by_source(m: dict) -> dict[str, dict]:
    return {f["source"]: f for f in m["files"]}


def rejected(m: dict) -> dict[str, str]:
    return {r["source"]: r["reason"] for r in m["rejected"]}


def prepare(src: Path, out: Path, *extra: str, **kw) -> subprocess.CompletedProcess[str]:
    return af.run_cli("prepare", src, out, *extra, **kw)


def tones(folder: Path, count: int, seconds: float = 0.6, start_hz: float = 200.0) -> list[Path]:
    return [af.write(folder / f"tone_{i:02d}.wav", af.tone(start_hz * 1.1 ** i, seconds,
                                                           peak_db=-6.0 - i % 7))
            for i in range(count)]


def dominant_hz(x: np.ndarray, rate: int) -> float:
    """Frequency of the strongest spectral peak, refined by parabolic interpolation."""
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1: k + 2] + 1e-30)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / len(x)


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("demo")
    src, out = root / "sounds", root / "prepared"
    assert af.run_cli("demo-data", src).returncode == 0
    return src, out, prepare(src, out)


def test_demo_set_is_prepared_with_report_and_manifest(demo_set) -> None:
    src, out, proc = demo_set
    assert proc.returncode == 0, proc.stderr
    m = manifest(out)
    assert m["summary"]["files"] == 40 and m["rejected"] == []
    assert m["ignored"] == ["demo-data.json"]
    pre = m["preprocessing"]
    assert pre["sample_rate"] == SR and pre["resampler"] == "soxr" and pre["resample_quality"] == "VHQ"
    assert pre["target_lufs"] == -20.0
    n_valid = m["summary"]["validation_files"]
    assert 4 <= n_valid <= 8, "about 15 % of 40 files held out"
    for f in m["files"]:
        for key in ("source", "content_hash", "original", "loudness_lufs", "gain_db", "split", "duration_s"):
            assert key in f, key
        assert f["original"]["sample_rate"] == SR and f["original"]["bit_depth"] == 24
        assert f["gain_db"] == pre["gain_db"]
    # the end table, and progress (with an ETA) on stderr
    for word in ("accepted    40 files", "rejected    0 files", "loudness", "gain", "split       train 34"):
        assert word in proc.stdout, (word, proc.stdout)
    assert "ETA" in proc.stderr and "prepare: 40/40" in proc.stderr
    ds = PreparedSet.open(out)
    assert len(ds.validation_files) == n_valid and len(ds.train_files) == 40 - n_valid
    x = ds.load(ds.files[0])
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) == ds.files[0].frames
    assert np.max(np.abs(x)) <= 10 ** (pre["peak_ceiling_dbfs"] / 20) + 1e-6


def test_bad_and_odd_files_are_rejected_or_noted_and_the_rest_is_prepared(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    tones(src / "good", 3)
    # other containers and sample formats libsndfile reads
    af.write(src / "formats/deep.aiff", af.tone(250.0, 0.6), subtype="PCM_32")
    af.write(src / "formats/double.wav", af.tone(260.0, 0.6), subtype="DOUBLE")
    af.write(src / "formats/voice.ogg", af.tone(270.0, 0.6), subtype="VORBIS")
    af.write(src / "formats/take.mp3", af.tone(280.0, 0.6), subtype="MPEG_LAYER_III")
    af.empty(src / "bad/empty.wav")
    af.text_named_wav(src / "bad/notes.wav")
    af.truncated_flac(src / "bad/cut.flac")
    af.truncated_header_wav(src / "bad/header_cut.wav")
    af.nan_wav(src / "bad/nan.wav")
    af.nan_wav(src / "bad/inf.wav", float("inf"))
    af.silent(src / "bad/silent.wav")
    af.unreadable(src / "bad/locked.wav")
    af.symlink_loops(src / "links")
    af.write(src / "odd/six.wav", af.tone(300.0, 0.8, channels=6))
    af.write(src / "odd/eight.wav", af.tone(300.0, 0.8), subtype="PCM_U8")
    af.write(src / "odd/hi.wav", af.tone(1000.0, 0.8, rate=192000), rate=192000)
    af.write(src / "odd/lo.wav", af.tone(500.0, 0.8, rate=8000), rate=8000, subtype="PCM_16")
    af.write(src / "odd/tick.wav", af.tone(2000.0, 0.010))
    af.write(src / "odd/stereo.flac", af.tone(400.0, 0.8, channels=2), subtype="PCM_16")
    af.truncated_data_wav(src / "odd/half.wav")
    (src / "readme.txt").write_text("not audio")
    try:
        proc = prepare(src, out, drop_root_override=True)
    finally:
        af.restore_permissions(src)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = manifest(out)
    rej = rejected(m)
    expected_reasons = {
        "bad/empty.wav": "empty file (0 bytes)",
        "bad/notes.wav": "a text file, not audio",
        "bad/cut.flac": "truncated or corrupt",
        "bad/header_cut.wav": "not a readable audio file",
        "bad/nan.wav": "NaN or infinite",
        "bad/inf.wav": "NaN or infinite",
        "bad/silent.wav": "silent",
        "bad/locked.wav": "Permission denied",
        "links/loop_a.wav": "symlink loop",
        "links/loop_b.wav": "symlink loop",
        "links/again/": "symlink loop",
    }
    assert set(rej) == set(expected_reasons), rej
    for source, reason in expected_reasons.items():
        assert reason in rej[source], (source, rej[source])
        assert f"{source}: {rej[source]}" in proc.stdout  # console report names file and reason
    files = by_source(m)
    expected_notes = {
        "odd/six.wav": "downmixed 6 channels",
        "odd/eight.wav": "8-bit",
        "odd/hi.wav": "resampled 192000 Hz -> 48000 Hz",
        "odd/lo.wav": "no content above 4 kHz",
        "odd/tick.wav": "very short (10 ms): kept",
        "odd/stereo.flac": "downmixed stereo",
        "odd/half.wav": "truncated",
    }
    for source, note in expected_notes.items():
        assert any(note in n for n in files[source]["notes"]), (source, files[source]["notes"])
        assert note in proc.stdout
    formats = {"formats/deep.aiff": 32, "formats/double.wav": 64, "formats/voice.ogg": None,
               "formats/take.mp3": None}
    assert set(files) == set(expected_notes) | set(formats) | {f"good/tone_0{i}.wav" for i in range(3)}
    for source, bits in formats.items():
        assert files[source]["original"]["bit_depth"] == bits and files[source]["notes"] == []
    assert m["ignored"] == ["readme.txt"]
    ds = PreparedSet.open(out)
    tick = next(f for f in ds.files if f.source == "odd/tick.wav")
    assert tick.frames == 480 and tick.original["duration_s"] == pytest.approx(0.01)
    assert tick.split == "train", "a 10 ms file validates only when nothing else can"
    assert tick.loudness_lufs > -40, "a 10 ms tick is measured by the short-file fallback"
    lo = ds.load(next(f for f in ds.files if f.source == "odd/lo.wav"))
    assert abs(dominant_hz(lo, SR) - 500.0) < 1.0
    assert (src / "bad/empty.wav").stat().st_size == 0  # sources untouched


def test_mono_stereo_and_6_channels_are_downmixed_by_their_mean(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    data = {f"ch{c}.wav": af.tone(440.0 + c, 0.5, channels=c).astype(np.float32) for c in (1, 2, 6)}
    for name, x in data.items():
        af.write(src / name, x, subtype="FLOAT")
    proc = prepare(src, out)
    assert proc.returncode == 0, proc.stderr
    for f in PreparedSet.open(out).files:
        x = data[f.source]
        assert f.original["channels"] == (1 if x.ndim == 1 else x.shape[1])
        expected = x if x.ndim == 1 else x.astype(np.float64).mean(axis=1)
        np.testing.assert_allclose(np.load(f.audio_path), expected, atol=1e-7)


def test_44k1_and_96k_inputs_keep_their_pitch_and_duration(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    for rate in (44100, 96000):
        af.write(src / f"sine_{rate}.wav", af.tone(1000.0, 1.0, rate=rate, peak_db=-6.0), rate=rate)
    assert prepare(src, out).returncode == 0
    for f in PreparedSet.open(out).files:
        rate = f.original["sample_rate"]
        x = PreparedSet.open(out).load(f)
        assert len(x) == SR, "one second stays one second"
        assert abs(dominant_hz(x[2000:-2000], SR) - 1000.0) < 0.5, rate
        assert any(f"resampled {rate} Hz -> 48000 Hz" in n for n in f.notes)


def rms_db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.square(x.astype(np.float64))))


def test_one_gain_keeps_files_12_db_apart_and_reaches_the_target(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    af.write(src / "loud.wav", af.tone(500.0, 2.0, peak_db=-20.0))
    af.write(src / "quiet.wav", af.tone(500.0, 2.0, peak_db=-32.0))
    af.write(src / "mid.wav", af.tone(500.0, 2.0, peak_db=-26.0))
    af.write(src / "short.wav", af.tone(500.0, 0.2, peak_db=-26.0))  # the RMS fallback
    proc = prepare(src, out, "--target-lufs", "-18")
    assert proc.returncode == 0, proc.stderr
    ds = PreparedSet.open(out)
    files = {f.source: f for f in ds.files}
    assert files["loud.wav"].loudness_lufs - files["quiet.wav"].loudness_lufs == pytest.approx(12.0, abs=0.05)
    loud, quiet = ds.load(files["loud.wav"]), ds.load(files["quiet.wav"])
    assert rms_db(loud) - rms_db(quiet) == pytest.approx(12.0, abs=0.05)
    # the median file sits at the target; nothing was per-file normalised
    assert ds.preprocessing["gain_limited"] is False
    assert files["mid.wav"].loudness_lufs + ds.gain_db == pytest.approx(-18.0, abs=0.05)
    # a 0.2 s file (RMS fallback) and a 2 s file of the same tone measure about the same
    assert files["short.wav"].loudness_lufs == pytest.approx(files["mid.wav"].loudness_lufs, abs=0.5)
    gain_line = next(line for line in proc.stdout.splitlines() if line.startswith("  gain"))
    assert f"{ds.gain_db:+.1f} dB" in gain_line  # the table shows the applied gain


def test_gain_is_lowered_when_it_would_clip(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    tones(src, 2, seconds=1.0)
    click = np.zeros(SR)
    click[100] = 0.9  # loud peak, almost no loudness
    af.write(src / "click.wav", click + af.tone(100.0, 1.0, peak_db=-50.0))
    af.write(src / "soft.wav", af.tone(300.0, 1.0, peak_db=-40.0))
    proc = prepare(src, out)
    assert proc.returncode == 0, proc.stderr
    ds = PreparedSet.open(out)
    assert ds.preprocessing["gain_limited"] is True and ds.preprocessing["limiting_file"] == "click.wav"
    assert ds.gain_db < ds.preprocessing["wanted_gain_db"]
    peak = max(float(np.max(np.abs(ds.load(f)))) for f in ds.files)
    assert 20 * np.log10(peak) == pytest.approx(-1.0, abs=0.01)
    assert "lowered from" in proc.stdout and "click.wav" in proc.stdout


def test_incremental_rerun_reuses_files_and_keeps_the_validation_split(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    tones(src, 14, seconds=0.3)
    assert prepare(src, out, "--validation", "tone_05.wav").returncode == 0
    first = by_source(manifest(out))
    valid = {s for s, f in first.items() if f["split"] == "validation"}
    assert "tone_05.wav" in valid and len(valid) == 2  # forced + 15 % of 14
    inodes = {s: (out / f["audio"]).stat().st_ino for s, f in first.items()}
    removed = next(s for s, f in first.items() if f["split"] == "train")
    (src / removed).unlink()
    for i in range(14, 30):
        af.write(src / f"new/tone_{i:02d}.wav", af.tone(200.0 * 1.1 ** i, 0.3, channels=2))
    proc = prepare(src, out)  # no --validation now: the forced file keeps its split anyway
    assert proc.returncode == 0, proc.stderr
    assert "16 converted, 13 unchanged" in proc.stdout
    # a note shared by many files is said once in the report (and kept per file in the manifest)
    assert "  16 files (new/tone_14.wav, new/tone_15.wav, ...): downmixed stereo to mono" in proc.stdout
    assert "new/tone_16.wav: downmixed" not in proc.stdout
    second = by_source(manifest(out))
    assert removed not in second
    assert {s for s in valid} <= {s for s, f in second.items() if f["split"] == "validation"}
    for s, f in first.items():
        if s != removed:
            assert second[s]["split"] == f["split"]
            assert (out / second[s]["audio"]).stat().st_ino == inodes[s], "unchanged file rewritten"
    assert sum(f["split"] == "validation" for f in second.values()) == round(0.15 * 29)
    # same folder again: nothing converted, same data identity
    before = PreparedSet.open(out).manifest_hash
    proc = prepare(src, out)
    assert "0 converted, 29 unchanged" in proc.stdout
    assert PreparedSet.open(out).manifest_hash == before
    # a new loudness target changes the one gain only: nothing is converted again
    gain = PreparedSet.open(out).gain_db
    proc = prepare(src, out, "--target-lufs", "-23")
    assert "0 converted, 29 unchanged" in proc.stdout
    assert PreparedSet.open(out).gain_db == pytest.approx(gain - 3.0, abs=1e-3)
    # a moved validation file keeps its split (found by content)
    moved = sorted(valid - {"tone_05.wav"})[0]
    os.rename(src / moved, src / "new" / Path(moved).name)
    third = by_source(manifest(out) if prepare(src, out).returncode == 0 else {})
    assert third["new/" + Path(moved).name]["split"] == "validation"


def test_split_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tones(src, 20, seconds=0.2)
    splits = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert prepare(src, tmp_path / name, "--seed", seed).returncode == 0
        splits.append({s for s, f in by_source(manifest(tmp_path / name)).items() if f["split"] == "validation"})
    assert splits[0] == splits[1] and len(splits[0]) == 3
    assert splits[0] != splits[2]


def test_interrupted_run_leaves_the_previous_set_readable(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    tones(src, 3, seconds=0.3)
    assert prepare(src, out).returncode == 0
    old = manifest(out)
    for i in range(30):  # slow enough to interrupt: 44.1 kHz files need resampling
        af.write(src / f"more/m_{i:02d}.wav", af.tone(100.0 + 13 * i, 1.0, rate=44100), rate=44100)
    for sig in (signal.SIGKILL, signal.SIGINT):
        # SIGINT as a terminal's Ctrl-C delivers it: a job a shell started in the background
        # ignores SIGINT, and the children of such a test run would inherit that
        proc = subprocess.Popen([sys.executable, "-m", "training", "prepare", str(src), str(out)],
                                cwd=af.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert "prepare: 1/33" in proc.stderr.readline()  # the run is under way
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
        assert manifest(out) == old
        ds = PreparedSet.open(out)
        assert len(ds) == 3 and all(len(ds.load(f)) == f.frames for f in ds.files)
        if sig == signal.SIGINT:  # a clean interruption removes its staging folder itself
            assert not list(tmp_path.glob(".out.prepare-*"))
    proc = prepare(src, out)  # the next run clears what the killed one left and completes
    assert proc.returncode == 0 and manifest(out)["summary"]["files"] == 33
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == [".out.lock"]


def test_ctrl_c_while_decoding_is_never_swallowed(tmp_path: Path) -> None:
    """A KeyboardInterrupt raised at any moment of a decode reaches the caller: none is lost
    inside libsndfile's reads (where it would also have cut the file short)."""
    from training.audio import convert

    path = af.write(tmp_path / "long.wav", af.tone(220.0, 20.0, rate=44100), rate=44100)
    decode_s = min(_timed(lambda: convert(path)) for _ in range(3))
    fired = []

    def interrupt(*_):
        fired.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        for i in range(24):
            fired.clear()
            try:
                signal.setitimer(signal.ITIMER_REAL, decode_s * (0.05 + 0.04 * i))
                convert(path)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                continue
            assert not fired, f"an interrupt {0.05 + 0.04 * i:.2f} of the way through the decode was swallowed"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def test_prepare_and_load_for_model_give_the_same_samples(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    af.write(src / "take.flac", af.tone(660.0, 0.7, rate=44100, channels=2), rate=44100, subtype="PCM_24")
    af.write(src / "other.wav", af.tone(220.0, 0.5, rate=96000), rate=96000)
    assert prepare(src, out).returncode == 0
    ds = PreparedSet.open(out)
    for f in ds.files:
        via_set = ds.load(f)
        assert ds.source_path(f) == (src / f.source).resolve()
        via_model = load_for_model(ds.source_path(f), ds.preprocessing)
        assert via_set.dtype == via_model.dtype == np.float32
        np.testing.assert_array_equal(via_set, via_model)


def test_too_few_files_and_no_audio_are_clear_errors(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "docs").mkdir(parents=True)
    (src / "docs/readme.txt").write_text("hello")
    proc = prepare(src, out)
    assert proc.returncode != 0 and "no audio files found" in proc.stderr
    assert not out.exists()
    af.write(src / "one.wav", af.tone())
    af.empty(src / "two.wav")
    proc = prepare(src, out)
    assert proc.returncode == 1
    assert "only 1 usable file(s)" in proc.stderr and "at least 2" in proc.stderr
    assert "two.wav: empty file" in proc.stdout
    assert not out.exists()
    af.write(src / "three.wav", af.tone(300.0))
    proc = prepare(src, out)
    assert proc.returncode == 0 and "mostly memorise" in proc.stdout
    assert manifest(out)["summary"]["validation_files"] == 1
    # the existing set survives a later run that finds too few files
    (src / "three.wav").unlink()
    assert prepare(src, out).returncode == 1
    assert manifest(out)["summary"]["files"] == 2


def test_refuses_to_replace_a_folder_that_is_not_a_prepared_set(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "precious"
    tones(src, 2)
    out.mkdir()
    (out / "mix.wav").write_bytes(b"keep me")
    proc = prepare(src, out)
    assert proc.returncode == 2 and "not a prepared set" in proc.stderr
    assert (out / "mix.wav").read_bytes() == b"keep me"


def test_many_files_with_memory_bounded_by_one_file(tmp_path: Path) -> None:
    def peak_rss_mb(src: Path, out: Path) -> float:
        proc = subprocess.Popen([sys.executable, "-m", "training", "prepare", str(src), str(out)],
                                cwd=af.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0
        return usage.ru_maxrss / 1024.0

    few, many = tmp_path / "few", tmp_path / "many"
    tone = af.tone(440.0, 0.5).astype(np.float32)
    for i in range(520):
        af.write(many / f"{i // 100}" / f"n{i:03d}.wav", tone * (0.3 + 0.001 * i), subtype="FLOAT")
    for i in range(5):
        af.write(few / f"n{i}.wav", tone * (0.3 + 0.01 * i), subtype="FLOAT")
    small = peak_rss_mb(few, tmp_path / "few_out")
    large = peak_rss_mb(many, tmp_path / "many_out")
    assert manifest(tmp_path / "many_out")["summary"]["files"] == 520
    # holding all 520 converted files would add ~50 MB (float32) to ~100 MB (float64)
    assert large - small < 20.0, (small, large)
