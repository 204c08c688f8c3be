"""Bad input while playing: garbage and malformed OSC, broken patches and models.

synthd must go on playing, count what it ignored, and refuse broken files with a message
that names them, keeping the old model or patch."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import time

import pytest
from pythonosc.osc_message_builder import build_msg

from support.jack import Recorder, jack_server  # noqa: F401  (fixture)
from support.nnmodels import build_toy_model
from support.synthd_proc import REPO, OscClient, SynthdProcess, rms_db

RATE = 48000


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("rig")
    build_toy_model(d / "toy.ts", latent_size=4)
    build_toy_model(d / "nan.ts", latent_size=4, fault="nan")
    build_toy_model(d / "short.ts", latent_size=4, fault="short")
    (d / "junk.ts").write_bytes(b"PK\x03\x04 this is not a model" * 10)
    (d / "good.toml").write_text('version = 1\n[[control]]\nlabel = "loudness"\ncc = 7\n')
    (d / "broken.toml").write_text('version = 1\n\n[[control]]\nlabel = "loudness"\ncc = 300\n')
    return d


@pytest.fixture(scope="module")
def synthd(jack_server, folders):
    with SynthdProcess(jack_server, "--model", str(folders / "toy.ts"), "--patch", str(folders / "good.toml")) as p:
        yield p


def playing(server, seconds: float = 0.4) -> float:
    """RMS in dBFS of synthd's output over `seconds`."""
    with Recorder(server.name, channels=1, seconds=seconds + 0.5) as rec:
        rec.connect_from(rec.wait_for_ports("PortAudio.*:out", 1))
        rec.start()
        rec.wait_frames(int(seconds * RATE))
        return rms_db(rec.data()[:, 0])


def test_ten_thousand_random_datagrams(jack_server, synthd):
    client = OscClient(synthd.osc_address)
    before = client.status()
    rng = random.Random(1234)
    heads = [b"", b"/", b"/synthd/", b"#bundle\0", b"/synthd/gain\0\0\0\0,s\0\0"]  # the last: a string where a number belongs
    n = 10_000
    for i in range(n):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        client.send_raw(heads[i % len(heads)] + body)
        if i % 200 == 199:
            time.sleep(0.01)  # stay inside the socket's receive buffer: count, not kernel drops
    after = client.status()
    assert synthd.alive
    counted = (after["invalid"] - before["invalid"]) + (after["unknown"] - before["unknown"])
    assert counted >= 0.97 * n, (before, after)
    assert playing(jack_server) > -40
    client.close()


def test_malformed_osc_is_refused_and_counted(jack_server, synthd):
    client = OscClient(synthd.osc_address)
    before = client.status()
    good = build_msg("/synthd/control/loudness", [0.5]).dgram
    client.send_raw(good[:31])  # cut inside the type tags (python-osc pads a cut float)
    client.send_raw(good[:13])  # truncated type tags
    client.send_raw(b"/synthd/gain\0\0\0\0,f")  # tag without a value
    client.send_raw(b"#bundle\0" + b"\0" * 8 + struct.pack(">i", 999) + b"/x")  # bundle element too long
    client.send("/synthd/control/loudness", b"blob")  # blob where a number belongs
    client.send("/synthd/control/loudness", 0.5, 0.5)  # too many arguments
    client.send("/synthd/control/loudness", float("nan"))
    client.send("/synthd/gain", float("inf"))
    client.send("/synthd/model/load", 3)
    client.send("/synthd/" + "x" * 60_000, 1.0)  # a huge address
    client.send("/synthd/gain", *([1.0] * 10_000))  # a huge argument list
    fails = [r for r in client.replies(timeout=1.0) if r[0] == "/fail"]
    assert len(fails) == 7, fails  # every parsed-but-wrong message answers, with a reason
    assert all(len(f[1]) == 2 and isinstance(f[1][1], str) for f in fails)
    after = client.status()
    assert after["invalid"] - before["invalid"] == 10 and after["unknown"] - before["unknown"] == 1
    assert synthd.alive and playing(jack_server) > -40
    client.close()


def test_broken_patch_and_models_are_refused_old_keeps_playing(jack_server, synthd, folders):
    client = OscClient(synthd.osc_address)
    reason = client.ask("/synthd/patch/load", "broken", reply="/fail")[1]
    assert f"{folders / 'broken.toml'}:5:" in reason and "cc" in reason and "0..127" in reason, reason
    for name, words in (("nan", "NaN"), ("short", "shape"), ("junk", "not a TorchScript"), ("gone", "no .ts file")):
        reason = client.ask("/synthd/model/load", name, reply="/fail")[1]
        assert words in reason, reason
    assert client.status()["model"] == "toy"
    client.send("/synthd/controls")
    assert len(client.replies(timeout=0.5)) == 4
    assert synthd.alive and playing(jack_server) > -40
    client.close()


@pytest.mark.parametrize("args, words", [
    (["--model", "nan.ts"], ["nan.ts", "NaN"]),
    (["--model", "toy.ts", "--patch", "broken.toml"], ["broken.toml:5:", "cc", "0..127"]),
    (["--model", "toy.ts", "--channels", "0"], ["channels 0"]),
])
def test_refused_at_start_with_a_clear_message(jack_server, folders, args, words):
    args = [str(folders / a) if a.endswith((".ts", ".toml")) else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "synthd", "run", "--osc-port", "0", *args], cwd=REPO,
                          env=jack_server.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode in (1, 2)
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def malformed_datagrams(n: int, seed: int = 7) -> list[bytes]:
    """Random bytes, truncated floats and huge indices, in turn."""
    rng = random.Random(seed)
    good = build_msg("/synthd/control/loudness", [0.5]).dgram
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 120))))
        elif kind == 1:
            out.append(good[: rng.randrange(len(good) - 3, len(good))])  # a float cut short
        else:
            out.append(build_msg(f"/synthd/latent/{rng.randrange(10**6, 10**9)}", [0.5]).dgram)
    return out


def test_status_answers_within_100_ms_after_a_burst_of_3000_malformed_datagrams(synthd):
    """The burst from one socket, as fast as Python sends; the status from another, once."""
    client, attacker = OscClient(synthd.osc_address), OscClient(synthd.osc_address)
    burst = malformed_datagrams(3000)
    before = client.status()
    for data in burst:
        attacker.send_raw(data)
    t0 = time.monotonic()
    client.send("/synthd/status")
    replies = client.replies(timeout=1.0, count=1)
    took = time.monotonic() - t0
    time.sleep(0.2)
    after = client.status()
    fails = len(attacker.replies(timeout=0.2))
    client.close()
    attacker.close()
    assert replies and replies[0][0] == "/synthd/status.reply" and took < 0.1, (replies, took)
    counted = after["invalid"] + after["unknown"] - before["invalid"] - before["unknown"]
    assert counted == 3000  # none lost before it was counted
    assert fails <= 100  # bad messages are not answered one for one
