"""`synthd-train export` and the model file it writes, through the command line and the file.

The aliasing checks run on the untrained default architecture and on the demo model trained by
the other tests; set `SYNTHD_ALIAS_MODEL=/path/to/model.ts` to run them on another file as well.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from training.aliasing import BAND_EDGE_HZ, FLOOR_DB, aliasing_report, band_edge, energy_above_db, sine_sweep
from training.checkpoint import load_run
from training.control_space import pca_space
from training.dataset import PreparedSet
from training.export import build_metadata, export_model
from training.model import VAE, ModelConfig
from support.demo_model import TRAINED_STEPS, exported_demo

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TINY = """
[model]
latent_size = 4
encoder_dim = 16
encoder_blocks = 1
decoder_dim = 24
decoder_blocks = 2
decoder_dilations = [1, 2]

[data]
batch_size = 2
crop_frames = 8

[loss]
stft_fft_sizes = [256, 1024]
mel_fft_sizes = []

[optim]
threads = 1

[validation]
every_steps = 2
max_seconds = 2.0
crop_frames = 16
"""

torch.set_num_threads(1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


def _load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(run folder, prepared set, model file) of a two-step tiny run exported through the CLI."""
    root = tmp_path_factory.mktemp("export")
    assert _cli("demo-data", str(root / "sounds"), "--count", "6").returncode == 0
    result = _cli("prepare", str(root / "sounds"), str(root / "prepared"))
    assert result.returncode == 0, result.stderr
    (root / "tiny.toml").write_text(TINY)
    result = _cli("train", str(root / "prepared"), str(root / "run"), "--steps", "2",
                  "--config", str(root / "tiny.toml"), "--seed", "1")
    assert result.returncode == 0, result.stderr
    out = root / "tiny.ts"
    result = _cli("export", str(root / "run"), str(out))
    assert result.returncode == 0, result.stderr
    assert "chunks of 1, 2, 3, 8 frames equal one whole decode" in result.stderr
    assert result.stdout.strip() == str(out)
    return root / "run", root / "prepared", out


@pytest.fixture(scope="module")
def untrained_default(tmp_path_factory) -> Path:
    """The default architecture, untrained, exported with a PCA space of its own latents."""
    torch.manual_seed(0)
    vae = VAE(ModelConfig()).eval()
    with torch.no_grad():
        mean, _ = vae.encode(torch.from_numpy(sine_sweep(2.0)).view(1, 1, -1))
    space = pca_space(mean[0].T.numpy())
    ckpt = {"step": 0, "preprocessing": {"sample_rate": 48000, "target_lufs": -20.0, "gain_db": 0.0}}
    out = tmp_path_factory.mktemp("untrained") / "untrained.ts"
    export_model(vae, space, build_metadata("untrained", vae, space, ckpt), out)
    return out


# decode's inputs: pitch and voicing, then the 4 controls of the latent space
INPUTS = 2 + 4


def test_nn_tilde_members_and_shapes(exported):
    model = _load(exported[2])
    # a model with a pitch input always has named inputs, so nn~ gets `play` with labelled inlets
    assert model.get_methods() == ["encode", "decode", "forward", "play"]
    assert model.get_attributes() == []
    assert model.decode_params.tolist() == [INPUTS, 256, 1, 1]
    assert model.encode_params.tolist() == [1, 1, INPUTS, 256]
    assert model.forward_params.tolist() == [1, 1, 1, 1]
    assert model.play_params.tolist() == [INPUTS, 256, 1, 1]
    assert model.play_input_labels[:2] == ["pitch", "voicing"]
    with torch.no_grad():
        assert model.decode(torch.zeros(1, INPUTS, 7)).shape == (1, 1, 7 * 256)
        assert model.encode(torch.zeros(1, 1, 256 * 5 + 17)).shape == (1, INPUTS, 5)
        model.reset()
        assert model.forward(torch.zeros(1, 1, 256 * 3)).shape == (1, 1, 3 * 256)
        model.reset()
        assert model.decode(torch.zeros(2, INPUTS, 3)).shape == (2, 1, 3 * 256)  # another batch size starts afresh


def test_metadata_follows_the_contract(exported):
    run, prepared, out = exported
    meta = json.loads(_load(out).metadata())
    assert meta["format"] == "synthd-model" and meta["format_version"] == 1
    assert (meta["sample_rate"], meta["channels"], meta["latent_size"], meta["hop"]) == (48000, 1, INPUTS, 256)
    assert meta["latency_samples"] == 512
    assert meta["latency"] == {"residual_samples": 512, "harmonic_samples": 256, "encode_samples": 2 * 256}
    assert meta["pitch"]["estimator"].startswith("yin") and meta["run"]["model"]["vae_latent_size"] == 4
    labels = [c["label"] for c in meta["controls"]]
    assert len(set(labels)) == INPUTS and all(re.fullmatch(r"[a-z0-9_]+", label) for label in labels)
    pitch, voicing = meta["controls"][:2]
    assert (pitch["label"], pitch["source"], pitch["unit"], pitch["min"], pitch["max"]) == ("pitch", "f0", "midi", 0, 127)
    assert (voicing["label"], voicing["source"], voicing["min"], voicing["max"]) == ("voicing", "voicing", 0, 1)
    for i, c in enumerate(meta["controls"]):
        assert c["index"] == i and c["min"] <= c["default"] <= c["max"] and c["min"] < c["max"]
        assert c["source"] in (("f0", "voicing") if i < 2 else ("pca", "attribute", "regularized"))
    dataset = PreparedSet.open(prepared)
    assert meta["preprocessing"] == dataset.preprocessing
    assert meta["preprocessing"]["gain_db"] == dataset.gain_db
    assert meta["data"]["files"] == len(dataset.files) == 6
    assert meta["run"]["steps"] == 2


def test_encode_returns_control_coordinates_deterministically(exported):
    run, prepared, out = exported
    model = _load(out)
    _, vae = load_run(run)
    dataset = PreparedSet.open(prepared)
    meta = json.loads(model.metadata())
    # encode streams: output frame k describes input frame k - lag
    lag = meta["latency"]["encode_samples"] // 256
    # the encoder's analysis window (768) and the pitch tracker's (half a window of 1024) each
    # reach 2 frames ahead; the encoder's causal blocks and the octave check none
    assert lag == 2
    us = []
    with torch.no_grad():
        for f in dataset.files:
            x = torch.from_numpy(dataset.load(f)).view(1, 1, -1)
            frames = x.shape[-1] // 256
            padded = torch.cat([x, torch.zeros(1, 1, lag * 256)], -1)
            model.reset()
            u = model.encode(padded)
            model.reset()
            assert torch.equal(u, model.encode(padded))  # the posterior mean: no sampling
            u = u[..., lag:lag + frames]
            # pitch and voicing come from the one tracker, as prepare stored them (a stream holds
            # the rest pitch before its first voiced frame, where prepare holds that frame's)
            stored = torch.from_numpy(dataset.load_condition(f))
            torch.testing.assert_close(u[0, 1], stored[1], rtol=0, atol=1e-4)
            voiced = torch.nonzero(stored[1] > 0.5).flatten()
            if len(voiced):
                first = int(voiced[0])
                torch.testing.assert_close(u[0, 0, first:], stored[0, first:], rtol=0, atol=1e-4)
            # offset + basis @ u is the VAE's posterior mean: the file's dimensions are its controls
            z = model.offset + torch.matmul(model.basis, u[:, 2:])
            torch.testing.assert_close(z, vae.encode(padded)[0][..., :frames], rtol=1e-4, atol=1e-4)
            us.append(u[0].T)
    middle = np.median(torch.cat(us).numpy(), axis=0)
    for j, c in enumerate(meta["controls"]):
        assert c["min"] <= middle[j] <= c["max"], (c, middle[j])
    assert abs(meta["controls"][0]["default"] - float(vae.default_condition[0])) < 1e-6


@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_file_encodes_in_chunks_as_in_one_call(exported, size):
    model = _load(exported[2])
    t = torch.arange(40 * 256) / 48000
    x = (0.3 * torch.sin(2 * math.pi * 196.0 * t) * (t > 0.05)).view(1, 1, -1)
    with torch.no_grad():
        model.reset()
        whole = model.encode(x)
        model.reset()
        chunked = torch.cat([model.encode(x[..., i:i + size * 256]) for i in range(0, x.shape[-1], size * 256)], 2)
        # a reset starts the stream afresh; without one it goes on
        again = model.encode(x[..., :4 * 256])
        model.reset()
        fresh = model.encode(x[..., :4 * 256])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(fresh, whole[..., :4], rtol=0, atol=1e-6)
    assert not torch.allclose(again, fresh)
    # the tone comes out as G3 on the frames it sounds in, 9 frames late
    assert (whole[0, 0, 9 + 12:] - 55.0).abs().max() < 0.01 and whole[0, 1, 9 + 12:].min() > 0.9


@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_file_streams_in_chunks_and_resets(exported, size):
    model = _load(exported[2])
    meta = json.loads(model.metadata())
    lo = torch.tensor([c["min"] for c in meta["controls"]]).view(1, -1, 1)
    hi = torch.tensor([c["max"] for c in meta["controls"]]).view(1, -1, 1)
    u = lo + (hi - lo) * torch.rand(1, INPUTS, 29, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        model.reset()
        whole = model.decode(u)
        model.reset()
        chunked = torch.cat([model.decode(u[:, :, i:i + size]) for i in range(0, 29, size)], dim=2)
        # without reset the stream goes on: the next call differs from a fresh start
        continued = model.decode(u[:, :, :4])
        model.reset()
        fresh = model.decode(u[:, :, :4])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5 * float(whole.abs().max()))
    torch.testing.assert_close(fresh, whole[..., : 4 * 256], rtol=0, atol=1e-6)
    assert not torch.allclose(continued, fresh)


def test_restart_starts_the_rows_it_names_afresh_and_leaves_the_others(exported):
    """`restart(rows)`: a synth voice's new note decodes as a fresh stream would (on the stream's
    own frame count, which dates the residual's noise), and the other voices go on untouched."""
    model = _load(exported[2])
    meta = json.loads(model.metadata())
    lo = torch.tensor([c["min"] for c in meta["controls"]]).view(1, -1, 1)
    hi = torch.tensor([c["max"] for c in meta["controls"]]).view(1, -1, 1)
    g = torch.Generator().manual_seed(5)
    before, after = (lo + (hi - lo) * torch.rand(2, INPUTS, n, generator=g) for n in (11, 7))
    with torch.no_grad():
        model.reset()
        model.decode(before)
        model.restart(torch.tensor([True, False]))
        restarted = model.decode(after)
        model.reset()
        model.decode(before)
        model.restart(torch.tensor([True]))  # another batch size: nothing changes
        went_on = model.decode(after)
        model.reset()
        model.decode(before)
        model.state = [torch.zeros_like(t) for t in model.state[:-1]] + [model.state[-1]]
        fresh = model.decode(after)
    torch.testing.assert_close(restarted[1], went_on[1], rtol=0, atol=0)
    torch.testing.assert_close(restarted[0], fresh[0], rtol=0, atol=1e-6)
    assert not torch.allclose(restarted[0], went_on[0], atol=1e-3)


def test_decode_rows_decodes_the_rows_it_names_and_leaves_the_others_as_they_were(exported):
    """`decode_rows(u, rows)`: the rows named decode as `decode` decodes them, sample for sample,
    and a row left out keeps its stream exactly as it was (a silent voice costs nothing and loses
    nothing); the frame count that dates the noise moves on with every call."""
    model = _load(exported[2])
    assert "decode_rows" not in model.get_methods()  # an extra for synthd, not an nn~ method
    meta = json.loads(model.metadata())
    lo = torch.tensor([c["min"] for c in meta["controls"]]).view(1, -1, 1)
    hi = torch.tensor([c["max"] for c in meta["controls"]]).view(1, -1, 1)
    g = torch.Generator().manual_seed(6)
    calls = [lo + (hi - lo) * torch.rand(3, INPUTS, n, generator=g) for n in (5, 2, 3, 1)]
    with torch.no_grad():
        model.reset()
        whole = [model.decode(u) for u in calls]
        model.reset()
        got = [model.decode_rows(calls[0], torch.arange(3))]
        kept = [t.clone() for t in model.state]
        got.append(model.decode_rows(calls[1], torch.tensor([0, 2])))
        assert all(torch.equal(a[1], b[1]) for a, b in zip(kept[:-1], model.state[:-1]))  # row 1 untouched
        assert int(model.state[-1]) == int(kept[-1]) + 2
        got.append(model.decode_rows(calls[2], torch.tensor([0, 2])))
        got.append(model.decode_rows(calls[3], torch.tensor([2])))
        assert tuple(got[1].shape) == (2, 1, 2 * 256) and tuple(got[3].shape) == (1, 1, 256)
        model.decode_rows(calls[0][:2], torch.tensor([1]))  # another batch size starts afresh, as decode does
        assert model.state[0].shape[0] == 2 and not model.state[0][0].any()
    for w, y, rows in zip(whole, got, ([0, 1, 2], [0, 2], [0, 2], [2])):
        torch.testing.assert_close(y, w[rows], rtol=0, atol=1e-6)


def test_file_decodes_what_the_trained_decoder_decodes(exported):
    """The file's inference-only rearrangements (scales folded into weights, the control basis
    applied in the decoder's layout) change no sample."""
    run, _, out = exported
    model = _load(out)
    _, vae = load_run(run)
    u = torch.randn(1, INPUTS, 17, generator=torch.Generator().manual_seed(3))
    u[:, 0] = torch.linspace(30.0, 90.0, 17)
    u[:, 1] = torch.rand(17, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.reset()
        got = model.decode(u)
        want = vae.eval().decode(model.offset + torch.matmul(model.basis, u[:, 2:]), u[:, :2])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_loads_in_a_fresh_process_with_only_torch(exported):
    # `training` made unimportable: the file must carry everything it needs
    code = (
        "import sys; sys.modules['training'] = None\n"
        "import json, torch\n"
        f"m = torch.jit.load({str(exported[2])!r})\n"
        "meta = json.loads(m.metadata())\n"
        "y = m.decode(torch.zeros(1, meta['latent_size'], 3))\n"
        "print(tuple(y.shape), m.get_methods())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                            timeout=120, env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 1, 768) ['encode', 'decode', 'forward', 'play']"
    assert "Warning" not in result.stderr


def test_file_is_frozen_and_optimised_with_portable_operations_only(exported):
    """export's inference passes run on every method that computes: no linear layer reads a
    weight it must transpose at each call, and nothing was turned into a oneDNN (MKLDNN)
    operation, which a host's libtorch built without it could not run."""
    model = _load(exported[2])
    for method in model.get_methods() + ["decode_rows"]:
        nodes = list(getattr(model, method).graph.nodes())
        # the one linear map left is from controls to latents, whose `basis` a host may read
        weights = [list(node.inputs())[1].node() for node in nodes if node.kind() == "aten::linear"]
        assert all(w.kind() == "prim::GetAttr" and w.s("name") == "basis" for w in weights), method
        assert not [node.kind() for node in nodes if "mkldnn" in node.kind().lower()], method


def test_export_errors_are_clear_and_leave_nothing(exported, tmp_path):
    run, _, _ = exported
    result = _cli("export", str(tmp_path / "nowhere"), str(tmp_path / "x.ts"))
    assert result.returncode != 0 and "nowhere" in result.stderr and "Traceback" not in result.stderr
    result = _cli("export", str(run), str(tmp_path / "missing" / "x.ts"))
    assert result.returncode != 0 and "missing" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_replaces_a_file_atomically(exported, tmp_path):
    run, _, _ = exported
    out = tmp_path / "model.ts"
    out.write_bytes(b"old")
    result = _cli("export", str(run), str(out), "--which", "last", "--name", "second")
    assert result.returncode == 0, result.stderr
    assert json.loads(_load(out).metadata())["name"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts"]  # no temporary left behind
    assert out.stat().st_mode & 0o044 == 0o044  # readable like any file the user writes


def _alias_models() -> list[str]:
    extra = os.environ.get("SYNTHD_ALIAS_MODEL")
    return ["untrained", "trained"] + ([extra] if extra else [])


@pytest.fixture(params=_alias_models())
def alias_model(request, untrained_default, tmp_path_factory) -> torch.jit.ScriptModule:
    if request.param == "untrained":
        return _load(untrained_default)
    if request.param == "trained":
        return _load(exported_demo(tmp_path_factory.getbasetemp(), TRAINED_STEPS))
    return _load(Path(request.param))


def test_sweep_through_the_file_folds_nothing(alias_model):
    sweep = sine_sweep(3.0)
    with torch.no_grad():
        alias_model.reset()
        out = alias_model.forward(torch.from_numpy(sweep).view(1, 1, -1))[0, 0].numpy()
    meta = json.loads(alias_model.metadata())
    report = aliasing_report(sweep, out, cutoff=band_edge(meta))
    assert np.isfinite(out).all()
    untrained = meta["run"]["steps"] == 0
    if untrained:
        # no tones of its own: no partial at all may appear, folded or not
        assert report.passes(any_new_partial=True), report.describe()
    else:
        # A trained model remakes the sweep in its own timbre: partials the sweep lacks, some of
        # them moving as fast as an image would (the 200-step demo model makes one near 562 Hz that
        # keeps pace with the sweep's 6th-harmonic image for three frames), which the partial
        # trackers cannot tell from folding. What folding must leave, energy above the band edge,
        # stays at the floor.
        assert report.output_above_db <= max(report.source_above_db, FLOOR_DB) + 1.0, report.describe()


def test_the_band_edge_is_read_from_the_file_and_bounds_what_the_decoder_makes(untrained_default):
    """The aliasing measures count energy above the edge the file names: 22 kHz for today's
    iSTFT head, whose noise fills 20-22 kHz by design; 20 kHz for a file that names none."""
    meta = json.loads(_load(untrained_default).metadata())
    assert band_edge(meta) == ModelConfig().max_frequency == 22000.0
    assert meta["run"]["model"]["harmonic_max_frequency"] == 20000.0
    assert band_edge({"run": {"model": {"max_frequency": 20000.0}}}) == band_edge({}) == BAND_EDGE_HZ == 20000.0
    noise = np.random.default_rng(0).normal(size=48000).astype(np.float32)
    with torch.no_grad():
        module = _load(untrained_default)
        module.reset()
        y = module.decode(torch.zeros(1, int(module.decode_params[0]), 200))[0, 0].numpy()
    # the untrained residual's soft noise reaches into 20-22 kHz, and nothing lies above 22 kHz
    assert energy_above_db(y, cutoff=20000.0) > -60.0
    assert energy_above_db(y, cutoff=band_edge(meta)) <= FLOOR_DB
    assert aliasing_report(noise, noise, cutoff=22000.0).describe().startswith("energy above 22 kHz")


def test_alias_measures_catch_folding_and_spare_a_models_own_partials():
    """The measures the aliasing tests rely on, on signals whose folding is known."""
    sweep = sine_sweep(3.0).astype(np.float64)
    t = np.arange(len(sweep)) / 48000
    rate = np.log(20000.0 / 20.0) / 3.0
    phase = 2 * np.pi * 20.0 * (np.exp(rate * t) - 1) / rate  # the sweep's own phase
    third_hz = 3 * 20.0 * np.exp(rate * t)
    naive = sweep + 0.6 * sweep ** 3  # a cubic at 48 kHz: the third harmonic folds above 8 kHz
    harmonic = sweep + 0.05 * np.sin(3 * phase) * np.clip((16000 - third_hz) / 2000, 0, 1)  # band-limited
    own_tone = sweep + 0.05 * np.sin(2 * np.pi * 70.0 * t)
    reports = {name: aliasing_report(sweep.astype(np.float32), y.astype(np.float32))
               for name, y in (("clean", sweep), ("naive", naive), ("harmonic", harmonic), ("tone", own_tone))}
    assert reports["clean"].passes(), reports["clean"].describe()
    assert len(reports["naive"].folded_partials) >= 10 and not reports["naive"].passes(any_new_partial=False)
    for name in ("harmonic", "tone"):
        report = reports[name]
        assert report.new_partials and not report.passes(), report.describe()  # partials the sweep lacks
        assert report.passes(any_new_partial=False), report.describe()         # but nothing folded


def test_decoded_latent_walks_fold_nothing_and_extremes_stay_bounded(alias_model):
    meta = json.loads(alias_model.metadata())
    size = meta["latent_size"]
    lo = torch.tensor([c["min"] for c in meta["controls"]]).view(1, -1, 1)
    hi = torch.tensor([c["max"] for c in meta["controls"]]).view(1, -1, 1)
    generator = torch.Generator().manual_seed(0)
    steps = torch.rand(1, size, 300, generator=generator)
    walk = 0.5 + 0.5 * torch.sin(torch.cumsum(0.2 * torch.randn(1, size, 300, generator=generator), dim=2))
    # the pitch input held at its default: a pitch leaping across the keyboard every 5 ms chirps its
    # partials across kHz within a block, whose spread above its edge is not folding (test_pitch
    # plays glides and leaps against the ideal band-limited series)
    for i, c in enumerate(meta["controls"]):
        if c.get("unit") == "midi":
            steps[:, i] = walk[:, i] = (c["default"] - c["min"]) / (c["max"] - c["min"])
    with torch.no_grad():
        for u01 in (steps, walk):
            alias_model.reset()
            audio = alias_model.decode(lo + (hi - lo) * u01)[0, 0].numpy()
            assert np.isfinite(audio).all()
            assert energy_above_db(audio, cutoff=band_edge(meta)) <= FLOOR_DB + 1.0
        for value in (10.0, -10.0):
            alias_model.reset()
            audio = alias_model.decode(torch.full((1, size, 100), value))
            assert torch.isfinite(audio).all()
            assert float(audio.square().mean().sqrt()) <= 4 / 3 and float(audio.abs().max()) <= 16.0


def test_a_decoder_without_a_pitch_input_still_exports_and_plays_as_before(tmp_path):
    """`model.harmonics = 0` (the first decoder, and every file exported before pitch was an input):
    decode takes the controls alone, and synthd loads it with no pitch input to play in tune."""
    from synthd.model import load_model

    torch.manual_seed(0)
    vae = VAE(ModelConfig(harmonics=0, latent_size=4, encoder_dim=16, encoder_blocks=1, decoder_dim=24,
                          decoder_blocks=2, decoder_dilations=[1, 2])).eval()
    with torch.no_grad():
        mean, _ = vae.encode(torch.from_numpy(sine_sweep(1.0)).view(1, 1, -1))
    space = pca_space(mean[0].T.numpy())
    out = tmp_path / "first.ts"
    export_model(vae, space, build_metadata("first", vae, space, {"step": 0}), out)
    module = _load(out)
    meta = json.loads(module.metadata())
    assert module.decode_params.tolist() == [4, 256, 1, 1] and module.get_methods() == ["encode", "decode", "forward"]
    assert meta["pitch"] is None and meta["latency"]["harmonic_samples"] is None
    assert all(c["source"] == "pca" and "unit" not in c for c in meta["controls"])
    model = load_model(out)
    assert model.latent_size == 4 and all(c.unit is None for c in model.controls)
