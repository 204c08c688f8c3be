"""Realtime scheduling of the render thread and the device's (and a live input's) callback thread, through `synthd
run` on the JACK dummy server: the threads the kernel lists under SCHED_FIFO, the status fields
that report them, and a run where the system refuses it (CAP_SYS_NICE dropped, rtprio limit 0),
which still plays and says why."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support.jack import jack_server, record  # noqa: F401  (jack_server is a fixture)
from support.nnmodels import build_toy_model
from support.synthd_proc import REPO, OscClient, SynthdProcess, rms_db
from synthd.config import ConfigError, DaemonConfig
from synthd.priority import make_realtime

SCHED_FIFO = 1


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("priority") / "toy.ts")


def realtime_allowed() -> bool:
    """Whether this process may put a thread under SCHED_FIFO 1: asked of a throwaway thread."""
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.append(make_realtime(1).priority))
    thread.start()
    thread.join()
    return got == [1]


def fifo_threads(pid: int) -> list[int]:
    """The realtime priorities of the SCHED_FIFO threads of process `pid` (from /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        rt_priority, policy = int(fields[37]), int(fields[38])  # stat fields 40 and 41
        if policy == SCHED_FIFO:
            found.append(rt_priority)
    return found


def played_db(server, client: OscClient) -> float:
    client.send("/synthd/control/loudness", 0.9)
    time.sleep(0.2)
    return rms_db(record(server, 0.4, []))


def test_the_render_thread_runs_at_realtime_priority_and_only_it(jack_server, toy):  # noqa: F811
    with SynthdProcess(jack_server, "--model", str(toy)) as proc:
        client = OscClient(proc.osc_address)
        try:
            assert played_db(jack_server, client) > -30
            status = client.status()
            if realtime_allowed():
                assert status["render_scheduling"] == "realtime (SCHED_FIFO 1)"
                # the dummy server runs without realtime, so PortAudio's callback thread came
                # normal: synthd lifts it above the render thread
                assert status["callback_scheduling"] == "realtime (SCHED_FIFO 2)"
                assert sorted(fifo_threads(proc.proc.pid)) == [1, 2]
            else:  # a user without an rtprio limit: the default asks, is refused, and plays on
                assert status["render_scheduling"].startswith("normal (realtime refused: ")
                assert fifo_threads(proc.proc.pid) == []
        finally:
            client.close()
    with SynthdProcess(jack_server, "--model", str(toy), "--render-priority", "0") as proc:
        client = OscClient(proc.osc_address)
        try:
            assert played_db(jack_server, client) > -30
            status = client.status()
            assert (status["render_scheduling"], status["callback_scheduling"]) == ("normal", "")
            assert fifo_threads(proc.proc.pid) == []
        finally:
            client.close()


def test_the_input_callback_thread_is_lifted_beside_the_output_callback(jack_server, toy):  # noqa: F811
    """A live input's JACK client runs its own thread, also left normal by a server without
    realtime: a block of input that comes late makes the render late, so it goes one above the
    render thread too."""
    with SynthdProcess(jack_server, "--model", str(toy), "--input", "virtual") as proc:
        client = OscClient(proc.osc_address)
        try:
            deadline = time.monotonic() + 5.0
            expected = [1, 2, 2] if realtime_allowed() else []
            while sorted(fifo_threads(proc.proc.pid)) != expected and time.monotonic() < deadline:
                time.sleep(0.05)  # the input's first callback lifts its thread
            assert sorted(fifo_threads(proc.proc.pid)) == expected
            assert client.status()["input_fault"] == ""
        finally:
            client.close()


def test_a_refused_realtime_priority_is_reported_and_synthd_still_plays(jack_server, toy):  # noqa: F811
    # util-linux (an essential Debian package) drops the capability root would override it with
    no_realtime = ("prlimit", "--rtprio=0:0", "setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice", "--")
    with SynthdProcess(jack_server, "--model", str(toy), wrap=no_realtime) as proc:
        client = OscClient(proc.osc_address)
        try:
            assert played_db(jack_server, client) > -30
            status = client.status()
            refused = "normal (realtime refused: Operation not permitted; this user's rtprio limit is 0)"
            assert status["render_scheduling"] == status["callback_scheduling"] == refused
            # at normal priority a loaded machine may hold the render thread past a deadline now
            # and then (what realtime is for: CI saw 1); it must still keep time nearly always
            assert status["late_underruns"] <= status["callbacks"] // 50, status
            assert fifo_threads(proc.proc.pid) == []
        finally:
            client.close()
    assert proc.proc.returncode == 0
    warnings = [line for line in proc.lines if "render thread at normal priority" in line]
    assert len(warnings) == 1 and "rtprio limit is 0" in warnings[0] and "WARNING" in warnings[0]


def test_render_priority_out_of_range_is_refused_by_name(toy):
    with pytest.raises(ConfigError, match=r"render_priority 99 is outside 0..98"):
        DaemonConfig(model=str(toy), render_priority=99).check()
    run = subprocess.run([sys.executable, "-m", "synthd", "run", "--model", str(toy), "--render-priority", "-1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "render_priority -1 is outside 0..98" in run.stderr


def test_asking_for_no_realtime_priority_changes_nothing():
    before = os.sched_getscheduler(0)
    assert make_realtime(0).describe() == "normal"
    assert os.sched_getscheduler(0) == before
