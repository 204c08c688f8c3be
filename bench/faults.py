"""Faults on stage, each as a scripted scenario on the JACK dummy server, with how long each
recovery or stop took and what synthd printed.

    .venv/bin/python bench/faults.py [--model M.ts] [--restarts 20]

1. A RAVE-shaped file (RAVE's streaming export: no reset(), no metadata(), noise padding in
   decode, ratio 2048; latent sizes 1, 8, 128): `synthd render` and `synthd run` with it.
2. The JACK server killed under a playing synthd and started again, `--restarts` times in a
   row: seconds to `/synthd/audio lost` after the kill and to `/synthd/audio ok` after the
   server is back, the level after each return against the level before the first kill, and
   synthd's threads, file descriptors and resident memory after each return (a leak grows).
3. SIGTERM with the server gone, just after the kill and once synthd has said `lost`: seconds
   to exit and the exit status.

Targets: loss seen within 1 s, stop within 2 s with status 0, no growth over the restarts.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from support.jack import JackServer, record  # noqa: E402
from support.nnmodels import build_rave_mirror, build_toy_model  # noqa: E402
from support.synthd_proc import OscClient, SynthdProcess, rms_db  # noqa: E402


def wait_for(client: OscClient, address: str, timeout: float, since: float | None = None) -> tuple[list, float]:
    """The first message at `address` and the seconds from `since` (default: now) to its arrival."""
    t0 = time.monotonic() if since is None else since
    while time.monotonic() - t0 < timeout:
        for addr, args in client.replies(timeout=max(0.01, timeout - (time.monotonic() - t0)), count=1):
            if addr == address:
                return args, time.monotonic() - t0
    return [], float("nan")


def resources(pid: int) -> tuple[int, int, float]:
    """(threads, open file descriptors, resident MB) of process `pid`."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = next(int(line.split()[1]) / 1024.0 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return threads, fds, rss


def rave_files(scratch: Path) -> None:
    print("1. RAVE-shaped files (no reset(), no metadata(), ratio 2048)")
    server = JackServer().start()
    try:
        for size in (1, 8, 128):
            path = build_rave_mirror(scratch / f"rave{size}.ts", latent_size=size)
            t0 = time.monotonic()
            render = subprocess.run([sys.executable, "-m", "synthd", "render", "--model", str(path), "--seconds", "2",
                                     "--out", str(scratch / f"rave{size}.wav")], cwd=REPO, capture_output=True, text=True)
            rendered = time.monotonic() - t0
            t0 = time.monotonic()
            with SynthdProcess(server, "--model", str(path)) as proc:
                started = time.monotonic() - t0
                level = rms_db(record(server, 0.5, []))
                code = proc.stop()
            said = next((line.split(": ", 2)[-1].strip() for line in proc.lines if "has no reset()" in line), "-")
            print(f"   latent {size:>3}: render exit {render.returncode} ({rendered:.1f} s); run started in "
                  f"{started:.1f} s, level {level:.1f} dBFS, exit {code}; log: {said}")
    finally:
        server.stop()


def restarts(model: Path, count: int) -> bool:
    print(f"\n2. the JACK server killed and started again, {count} times, under a playing synthd")
    server = JackServer().start()
    ok = True
    try:
        proc = SynthdProcess(server, "--model", str(model))
        client = OscClient(proc.osc_address)
        client.ask("/synthd/notify", 1, reply="/done")
        pid = proc.proc.pid
        reference = rms_db(record(server, 0.5, []))
        start = resources(pid)
        print(f"   before: level {reference:.1f} dBFS; threads {start[0]}, fds {start[1]}, RSS {start[2]:.1f} MB")
        print(f"   {'#':>3} {'lost s':>7} {'ok s':>6} {'level dB':>9} {'threads':>8} {'fds':>5} {'RSS MB':>7}")
        seen, back, rows = [], [], []
        for i in range(count):
            killed = time.monotonic()
            server.kill()
            _, lost = wait_for(client, "/synthd/audio", 5.0, since=killed)
            server.start()  # returns once a client can connect
            _, returned = wait_for(client, "/synthd/audio", 30.0)
            time.sleep(0.3)
            level = rms_db(record(server, 0.4, []))
            row = resources(pid)
            rows.append(row)
            seen.append(lost)
            back.append(returned)
            print(f"   {i + 1:>3} {lost:>7.2f} {returned:>6.2f} {level:>9.1f} {row[0]:>8} {row[1]:>5} {row[2]:>7.1f}",
                  flush=True)
            ok &= lost < 1.0 and abs(level - reference) < 1.5
        status = client.status()
        client.close()
        code = proc.stop()
        settled = rows[min(2, len(rows) - 1)]  # after the first returns: imports and caches warm
        growth = (rows[-1][0] - settled[0], rows[-1][1] - settled[1], rows[-1][2] - settled[2])
        print(f"   loss seen after {statistics.median(seen):.2f} s median, {max(seen):.2f} s max; back "
              f"{statistics.median(back):.2f} s median after the server ({max(back):.2f} s max)")
        print(f"   status at the end: audio {status['audio']}, losses {status['audio_losses']}, reconnects "
              f"{status['audio_reconnects']}; exit {code}")
        print(f"   growth from return 3 to return {len(rows)}: threads {growth[0]:+d}, fds {growth[1]:+d}, "
              f"RSS {growth[2]:+.1f} MB")
        ok &= code == 0 and growth[0] <= 0 and growth[1] <= 0 and growth[2] < 5.0
    finally:
        server.stop()
    return ok


def sigterm(model: Path) -> bool:
    print("\n3. SIGTERM with the JACK server gone")
    ok = True
    for label, delay in (("just after the kill", 0.05), ("once synthd said lost", 1.5)):
        server = JackServer().start()
        try:
            proc = SynthdProcess(server, "--model", str(model))
            server.kill()
            time.sleep(delay)
            t0 = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            try:
                code = proc.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - t0
            proc.stop()
            last = [line.strip() for line in proc.lines if "stopp" in line]
            print(f"   {label}: exit {code} after {took:.2f} s; {' | '.join(s.split(': ', 1)[-1] for s in last)}")
            ok &= code == 0 and took < 2.0
        finally:
            server.stop()
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file (default: a toy test model)")
    parser.add_argument("--restarts", type=int, default=20, help="server restarts in a row (default 20)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="synthd-faults-") as folder:
        scratch = Path(folder)
        model = Path(args.model) if args.model else build_toy_model(scratch / "toy.ts")
        rave_files(scratch)
        ok = restarts(model, args.restarts)
        ok &= sigterm(model)
    print(f"\ntargets (loss seen < 1 s, level back within 1.5 dB, stop < 2 s with 0, no growth): "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
