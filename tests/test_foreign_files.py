"""Model files from elsewhere: a file shaped exactly like RAVE's streaming export (no `reset()`,
no `metadata()`, noise padding inside `decode`, ratio 2048) loads, plays live, renders, and swaps
in over OSC; its state is cleared by reloading the file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from support.jack import jack_server, record  # noqa: F401  (fixture)
from support.nnmodels import build_rave_mirror
from support.synthd_proc import REPO, OscClient, SynthdProcess, crossings_per_second, rms_db
from synthd.engine import Engine
from synthd.model import load_model

RATE = 48000
LATENT_SIZES = (1, 8, 128)


@pytest.fixture(scope="module")
def raves(tmp_path_factory):
    d = tmp_path_factory.mktemp("rave")
    for size in LATENT_SIZES:
        build_rave_mirror(d / f"rave{size}.ts", latent_size=size)
    build_rave_mirror(d / "rave44k.ts", latent_size=8, sample_rate=44100)
    return d


@pytest.mark.parametrize("size", LATENT_SIZES)
def test_a_file_without_reset_loads_and_is_reset_by_reloading(raves, size, caplog):
    caplog.set_level("INFO")
    model = load_model(raves / f"rave{size}.ts")
    assert (model.latent_size, model.hop, model.sample_rate, model.resettable) == (size, 2048, RATE, False)
    assert [c.label for c in model.controls] == [f"latent_{i}" for i in range(size)]
    assert "has no reset(): reloaded" in caplog.text
    z = torch.zeros(1, size, 2)
    z[0, 0] = 1.5
    with torch.inference_mode():
        torch.manual_seed(1)
        first = model.module.decode(z)
        model.module.decode(z)  # the stream moves on: phase and cache
        model.reset()
        torch.manual_seed(1)
        again = model.module.decode(z)
    assert torch.equal(first, again)  # the reloaded file starts exactly where the first did


def test_an_engine_plays_it_and_recovers_without_reset(raves):
    model = load_model(raves / "rave8.ts")
    engine = Engine(model, channels=1, block_frames=256)
    engine.set_latent(0, 2.0)
    out = np.concatenate([engine.render(256) for _ in range(40)])
    assert np.isfinite(out).all() and rms_db(out[-4096:, 0]) > -20
    engine._recover(model)  # the render thread's path after a bad block: no reset() to call
    assert np.isfinite(engine.render(4096)).all()


def synthd_render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthd", "render", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", ["rave1", "rave128", "rave44k"])
def test_synthd_render_plays_it_the_same_twice(raves, tmp_path, name):
    automation = tmp_path / "a.toml"
    automation.write_text('version = 1\nseconds = 2.0\n[[event]]\ntime = 0.0\ncontrol = 0\nvalue = 0.9\n')
    outs = []
    for i in range(2):
        out = tmp_path / f"{name}-{i}.wav"
        proc = synthd_render("--model", str(raves / f"{name}.ts"), "--automation", str(automation), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        outs.append(out)
    x, rate = sf.read(outs[0])
    assert rate == RATE and x.shape[0] == 2 * RATE
    assert rms_db(x[RATE:, 0]) > -20  # sound, at a raised pitch: latent 0 at 0.9 of its range
    assert crossings_per_second(x[RATE:, 0], RATE) / 2 > 300
    assert outs[0].read_bytes() == outs[1].read_bytes()  # noise padding and all


def test_synthd_run_plays_it_and_swaps_between_rave_files_over_osc(jack_server, raves):  # noqa: F811
    with SynthdProcess(jack_server, "--model", str(raves / "rave8.ts")) as proc:
        client = OscClient(proc.osc_address)
        try:
            assert "playing rave8" in proc.startup and "8 controls" in proc.startup
            assert rms_db(record(jack_server, 0.5, [])) > -20
            for name, size in (("rave128", 128), ("rave1", 1), ("rave44k", 8)):
                assert client.ask("/synthd/model/load", name, reply="/done") == ["/synthd/model/load", name]
                assert client.status()["model"] == name
                client.send("/synthd/controls")
                assert len(client.replies(timeout=0.5, count=size)) == size
                assert rms_db(record(jack_server, 0.4, [])) > -20
            assert client.status()["decode_errors"] == 0
        finally:
            client.close()
        assert proc.stop() == 0, proc.log
    assert "Traceback" not in proc.log and "has no reset()" in proc.log
