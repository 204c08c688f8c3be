"""A stage's faults through the real interfaces: the JACK server under a playing `synthd run`
killed and started again (it comes back where it was), and SIGTERM with the server gone."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from support.jack import JackServer, record
from support.midi import jack_midi_out
from support.nnmodels import build_toy_model
from support.synthd_proc import REPO, OscClient, SynthdProcess, rms_db
from synthd.recovery import RESUME_ENV, ResumeState


@pytest.fixture
def server():
    with JackServer() as srv:  # a server of the test's own: it gets killed
        yield srv


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("faults") / "toy.ts")


def wait_for(client: OscClient, address: str, timeout: float) -> tuple[list, float]:
    """The arguments of the first message at `address`, and the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for addr, args in client.replies(timeout=timeout - (time.monotonic() - t0), count=1):
            if addr == address:
                return args, time.monotonic() - t0
    raise TimeoutError(f"no {address} within {timeout} s")


def test_a_killed_server_is_reported_and_synthd_plays_again_when_it_returns(server, toy):
    with SynthdProcess(server, "--model", str(toy)) as proc:
        client = OscClient(proc.osc_address)
        try:
            assert client.ask("/synthd/notify", 1, reply="/done") == ["/synthd/notify", 1]
            client.send("/synthd/control/loudness", 0.9)
            client.send("/synthd/gain", -6.0)
            time.sleep(0.2)
            before = rms_db(record(server, 0.4, []))
            assert before > -30
            server.kill()
            args, took = wait_for(client, "/synthd/audio", 5.0)
            assert args == ["lost"] and took < 1.5, took
            status = client.status()  # OSC still answers
            assert (status["audio"], status["audio_losses"], status["audio_reconnects"]) == ("lost", 1, 0)
            server.start()
            args, took = wait_for(client, "/synthd/audio", 30.0)
            assert args == ["ok"]
            status = client.status()
            assert (status["audio"], status["audio_losses"], status["audio_reconnects"]) == ("ok", 1, 1)
            assert status["gain_db"] == -6.0
            client.send("/synthd/controls")
            values = {r[1][0]: r[1][2] for r in client.replies(count=6) if r[0] == "/synthd/controls.reply"}
            assert values["loudness"] == pytest.approx(0.9)
            after = rms_db(record(server, 0.4, []))
            assert after == pytest.approx(before, abs=1.5)  # where it was: same controls, same gain
        finally:
            client.close()
        assert proc.stop() == 0, proc.log
    log = proc.log
    assert log.count("audio: lost") == 1 and "is back after" in log, log
    assert "Traceback" not in log


def test_a_killed_server_takes_the_input_away_and_both_come_back(server, toy):
    """With `--input virtual`: the input falls silent with the server, and when the server returns,
    synthd's input ports are there again and what plays into them is heard."""
    from support.jack import Player, Recorder

    def through(seconds: float = 1.0) -> float:
        """RMS (dB) of synthd's output while a tone plays into synthd:in_1."""
        with Player(server.name) as player, Recorder(server.name, channels=1, seconds=seconds + 0.5) as rec:
            player.connect_to("synthd:in_1")
            rec.connect_from(rec.wait_for_ports("PortAudio.*:out", 1))
            t = np.arange(int(seconds * 48000)) / 48000
            player.play((0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32))
            rec.start()
            rec.wait_frames(int(seconds * 48000))
            return rms_db(rec.data()[int(0.3 * 48000):, 0])

    with SynthdProcess(server, "--model", str(toy), "--input", "virtual") as proc:
        client = OscClient(proc.osc_address)
        try:
            before = through()
            assert before > -55  # the toy's level follows its input's (about -41 dB here); silence is -inf
            assert client.ask("/synthd/notify", 1, reply="/done") == ["/synthd/notify", 1]
            server.kill()
            assert wait_for(client, "/synthd/audio", 5.0)[0] == ["lost"]
            server.start()
            assert wait_for(client, "/synthd/audio", 30.0)[0] == ["ok"]
            status = client.status()
            assert status["input"] == "synthd:in_1" and status["input_fault"] == ""
            assert through() == pytest.approx(before, abs=3.0)
        finally:
            client.close()
        assert proc.stop() == 0, proc.log
    assert "Traceback" not in proc.log


@pytest.mark.parametrize("delay", [0.05, 1.5])
def test_sigterm_with_the_server_gone_exits_0_within_2_s(server, toy, delay):
    """Just after the server died (before synthd noticed) and once it has said `lost`."""
    proc = SynthdProcess(server, "--model", str(toy))
    try:
        server.kill()
        time.sleep(delay)
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        code = proc.proc.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        proc.stop()
    assert code == 0 and took < 2.0, (code, took, proc.log)
    assert "Traceback" not in proc.log


def test_a_midi_port_that_goes_away_is_connected_again_when_it_returns(server, toy):
    def pitch(client: OscClient) -> float:
        client.send("/synthd/controls")
        return {r[1][0]: r[1][2] for r in client.replies(count=4)}["pitch"]

    def until(check, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.1)
        return False

    with jack_midi_out(server, "keys") as keys:
        proc = SynthdProcess(server, "--model", str(toy), "--midi-in", "keys")
    client = OscClient(proc.osc_address)
    try:
        # the port went with the `with` above
        assert until(lambda: client.status()["midi"] == "lost" and client.status()["midi_losses"] == 1)
        with jack_midi_out(server, "keys") as keys:
            assert until(lambda: client.status()["midi"] == "ok")
            keys.send_message([0xB0, 21, 127])  # the default patch: CC 21 moves control 0
            assert until(lambda: pitch(client) == 1.0)
        status = client.status()
        assert (status["midi_losses"], status["midi_reconnects"]) == (1, 1)
    finally:
        client.close()
        assert proc.stop() == 0, proc.log
    assert "MIDI: connected again to keys:out" in proc.log, proc.log


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket collecting what is sent."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def until(self, key: str, value: str | None = None, timeout: float = 10.0) -> dict[str, str]:
        """The first message (from now on) carrying `key` (= `value`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                break
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if key in message and (value is None or message[key] == value):
                return message
        raise TimeoutError(f"no {key}={value} in {self.messages}")


def test_sighup_reloads_the_patch_and_systemd_hears_ready_watchdog_and_stopping(server, toy, tmp_path):
    notify = NotifySocket(tmp_path / "notify")
    patch = tmp_path / "rig.toml"
    patch.write_text('version = 1\nname = "first"\n[output]\ngain_db = -3\n')
    proc = SynthdProcess(server, "--model", str(toy), "--patch", str(patch),
                         env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    client = OscClient(proc.osc_address)
    try:
        assert "playing toy" in notify.until("READY", "1")["STATUS"]
        t0 = time.monotonic()
        notify.until("WATCHDOG", "1")
        notify.until("WATCHDOG", "1")
        assert time.monotonic() - t0 < 1.0  # every half period
        patch.write_text('version = 1\nname = "second"\n[output]\ngain_db = -12\n')
        proc.proc.send_signal(signal.SIGHUP)
        notify.until("RELOADING", "1")
        notify.until("READY", "1")
        assert client.status()["gain_db"] == -12.0
        patch.write_text('version = 1\n[output]\ngain_db = "loud"\n')  # refused: the old one stays
        proc.proc.send_signal(signal.SIGHUP)
        notify.until("READY", "1")
        assert client.status()["gain_db"] == -12.0
    finally:
        client.close()
        code = proc.stop()
    notify.until("STOPPING", "1")
    assert code == 0
    assert "patch second loaded" in proc.log and "reload: patch refused" in proc.log, proc.log


def test_a_resume_that_finds_its_device_gone_again_keeps_looking(toy):
    """The device went away again between the look that found it and the new image's start."""
    server = JackServer()  # not running yet
    state = ResumeState(model=str(toy), patch=None, osc_port=0, values={"loudness": 0.9}, gain_db=-6.0,
                        device="system", host_api="JACK Audio Connection Kit", audio_losses=1,
                        lost_at=time.time())
    env = {**server.env(), RESUME_ENV: state.dumps()}
    proc = subprocess.Popen([sys.executable, "-m", "synthd", "run", "--model", str(toy), "--osc-port", "0"],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def seen(text: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in list(lines) if text in line), None)
            if found:
                return found
            time.sleep(0.1)
        return None

    try:
        assert seen("looking for system again", 60), "".join(lines)
        assert proc.poll() is None
        server.start()
        startup = seen("synthd: playing", 60)
        assert startup, "".join(lines)
        client = OscClient(("127.0.0.1", int(re.search(r"127\.0\.0\.1:(\d+)", startup).group(1))))
        status = client.status()
        client.close()
        assert (status["audio"], status["audio_losses"], status["audio_reconnects"], status["gain_db"]) == (
            "ok", 1, 1, -6.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        reader.join(timeout=5)
        server.stop()
    assert code == 0, "".join(lines)
