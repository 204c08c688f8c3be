"""Model files: ours with metadata, RAVE-like ones without, and every kind of file refused."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from support.nnmodels import build_toy_model, toy_metadata
from synthd.engine import Engine
from synthd.model import ModelError, load_model


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_our_file_reads_metadata(tmp_path):
    model = load_model(build_toy_model(tmp_path / "toy.ts", latent_size=5, hop=128))
    assert (model.name, model.sample_rate, model.hop, model.latent_size, model.channels) == ("toy", 48000, 128, 5, 1)
    assert model.latency_samples == 128
    assert [c.label for c in model.controls] == ["pitch", "loudness", "brightness", "timbre_1", "timbre_2"]
    pitch = model.control("pitch")
    assert (pitch.index, pitch.minimum, pitch.maximum, pitch.default) == (0, -2.0, 2.0, 0.0)
    assert pitch.source == "metadata:attribute" and pitch.attribute == "pitch"
    assert model.control("timbre_1").source == "metadata:pca"
    assert model.metadata["format"] == "synthd-model"


def test_rave_like_file_gets_fallback_controls(tmp_path):
    model = load_model(build_toy_model(tmp_path / "rave.ts", latent_size=3, with_metadata=False))
    assert model.metadata == {}
    assert model.name == "rave"
    assert [c.label for c in model.controls] == ["latent_0", "latent_1", "latent_2"]
    assert all((c.minimum, c.maximum, c.default, c.source) == (-3.0, 3.0, 0.0, "fallback")
               for c in model.controls)
    assert model.sample_rate == 48000 and model.hop == 256


def test_probe_leaves_state_reset(tmp_path):
    """Two loads of one file give the same first block: the probe reset the oscillator."""
    path = build_toy_model(tmp_path / "toy.ts")
    a = load_model(path).module.decode(torch.zeros(1, 4, 2))
    b = load_model(path).module.decode(torch.zeros(1, 4, 2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method, found, voices, complaint", [
    ("restart", "restartable", 2, "restart() fails (builtins.RuntimeError: no restart here)"),
    ("decode_rows", "decodes_rows", 8, "decode_rows() fails (it returned (2, 1, 256) for one row of one frame"),
])
def test_an_optional_method_is_found_and_a_failing_one_is_not_used(tmp_path, caplog, method, found, voices, complaint):
    """`restart` (a voice's new note starts afresh) and `decode_rows` (silent voices cost nothing):
    our files have them, a file without them plays, and a file whose one fails plays without it."""
    from support.pitched_model import build_pitched_model

    assert getattr(load_model(build_pitched_model(tmp_path / "ours.ts")), found)
    assert not getattr(load_model(build_toy_model(tmp_path / "toy.ts")), found)
    model = load_model(build_toy_model(tmp_path / "broken.ts", fault=method))
    assert not getattr(model, found)
    assert complaint in caplog.text
    engine = Engine(model, voices=voices, channels=1)
    engine.note_on(0, 1.0, {0: 1.0})
    assert np.abs(np.concatenate([engine.render(256) for _ in range(4)])).max() > 0.01  # it plays
    assert engine.stats()["decode_errors"] == 0 and engine.stats()["skipped_rows"] == 0


def _refused(path, *fragments):
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_refuses_missing_and_non_torchscript(tmp_path):
    _refused(tmp_path / "absent.ts", "no such model file")
    text = tmp_path / "notes.ts"
    text.write_text("not a model")
    _refused(text, "not a TorchScript model file")
    pickled = tmp_path / "state.ts"
    torch.save({"w": torch.zeros(3)}, pickled)
    _refused(pickled, "not a TorchScript model file")


class _NoDecode(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _NoParams(torch.nn.Module):
    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def _save(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_refuses_module_without_usable_decode(tmp_path):
    _refused(_save(_NoDecode(), tmp_path / "nodecode.ts"), "no `decode` method")
    _refused(_save(_NoParams(), tmp_path / "noparams.ts"), "decode_params")


def test_refuses_shape_disagreeing_with_params(tmp_path):
    _refused(build_toy_model(tmp_path / "short.ts", fault="short"), "shape (1, 1, 512)", "(1, 1, 1024)")


def test_refuses_nan_on_probe(tmp_path):
    _refused(build_toy_model(tmp_path / "nan.ts", fault="nan"), "NaN")


@pytest.mark.parametrize("change, fragments", [
    (lambda m: m["controls"].pop(), ["3 entries", "(4)"]),
    (lambda m: m["controls"][1].update(label="pitch"), ["controls[1].label", "used twice"]),
    (lambda m: m["controls"][2].update(label="Bright ness"), ["controls[2].label", "[a-z0-9_]"]),
    (lambda m: m["controls"][0].update(min=1.0, max=-1.0), ["controls[0]", "min 1.0 not below max -1.0"]),
    (lambda m: m["controls"][3].update(default=9.0), ["controls[3].default"]),
    (lambda m: m.update(hop=512), ["metadata.hop = 512", "decode_params says 256"]),
    (lambda m: m.update(sample_rate="48k"), ["metadata.sample_rate", "wrong type"]),
    (lambda m: m.pop("latency_samples"), ["no `latency_samples`"]),
    (lambda m: m.update(format_version=7), ["format_version 7"]),
    (lambda m: m["controls"][0].update(unit=69), ["controls[0].unit = 69", "not a string"]),
])
def test_refuses_bad_metadata(tmp_path, change, fragments):
    meta = toy_metadata()
    change(meta)
    _refused(build_toy_model(tmp_path / "bad.ts", metadata=meta), *fragments)


def test_refusal_leaves_the_playing_model_alone(tmp_path):
    engine = Engine(load_model(build_toy_model(tmp_path / "good.ts")), channels=1)
    before = engine.render(4096)
    with pytest.raises(ModelError):
        engine.swap_model(load_model(build_toy_model(tmp_path / "nan.ts", fault="nan")))
    after = engine.render(4096)
    assert engine.model.name == "toy"
    assert np.sqrt(np.mean(after ** 2)) == pytest.approx(np.sqrt(np.mean(before ** 2)), rel=0.05)


def test_metadata_json_must_be_an_object(tmp_path):
    path = build_toy_model(tmp_path / "list.ts", metadata=[1, 2])  # type: ignore[arg-type]
    _refused(path, "not a JSON object")
