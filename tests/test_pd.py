"""Pure Data as an independent OSC client: the shipped patches/pd/synthd.pd, driven headless
by patches/pd/test-driver.pd, moves synthd's controls and shows its status reply."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from support.jack import jack_server  # noqa: F401  (fixture)
from support.nnmodels import build_toy_model
from support.synthd_proc import REPO, OscClient, SynthdProcess


@pytest.fixture(scope="module")
def synthd(jack_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("pd")
    build_toy_model(d / "toy.ts", latent_size=4)
    with SynthdProcess(jack_server, "--model", str(d / "toy.ts")) as proc:
        yield proc


def test_pd_patch_sets_controls_and_reads_status(synthd):
    pd = shutil.which("pd")
    assert pd, "Pure Data (puredata-core) is needed"
    port = synthd.osc_address[1]
    run = subprocess.run([pd, "-nogui", "-noaudio", "-nomidi", "-stderr", "-send", f"synthd-port {port}",
                          "-open", "test-driver.pd"], cwd=REPO / "patches" / "pd", capture_output=True,
                         text=True, timeout=30)
    lines = [line.split() for line in run.stderr.splitlines() if line.startswith("synthd-status:")]
    assert lines, run.stderr
    # print shows: synthd-status: list model rate block latency underruns nan ... gain sysex
    assert lines[-1][2:5] == ["toy", "48000", "256"]
    assert float(lines[-1][14]) == -6.0  # the gain Pd sent (as a float) is in the reply Pd parsed
    assert "error" not in run.stderr.lower(), run.stderr
    osc = OscClient(synthd.osc_address)
    osc.send("/synthd/controls")
    values = {r[1][0]: r[1][2] for r in osc.replies(count=4)}
    osc.close()
    assert values["pitch"] == pytest.approx(0.75)  # latent 0's slider


def test_max_patch_is_well_formed():
    """Max is not available here: check the patch's structure and the addresses it sends."""
    import json
    import re

    patcher = json.loads((REPO / "patches" / "max" / "synthd.maxpat").read_text())["patcher"]
    boxes = {b["box"]["id"]: b["box"] for b in patcher["boxes"]}
    for line in patcher["lines"]:
        (src, outlet), (dst, inlet) = line["patchline"]["source"], line["patchline"]["destination"]
        assert outlet < boxes[src]["numoutlets"] and inlet < boxes[dst]["numinlets"], line
    texts = " ".join(b.get("text", "") for b in boxes.values())
    assert "udpsend 127.0.0.1 9000" in texts and "udpreceive 9001" in texts
    addresses = set(re.findall(r"/synthd/[a-z/.]+", texts))
    assert addresses == {"/synthd/replyport", "/synthd/latent/", "/synthd/gain", "/synthd/gate", "/synthd/status",
                         "/synthd/status.reply"}
