"""Speed and memory of `synthd-train prepare` on a folder like a musician's.

Writes N files (default 200) of 2 s, 44.1 kHz stereo 24-bit WAV (so every one is downmixed and
resampled), then times, each in a fresh process through the real CLI:

    decode    reading every file with soundfile and nothing else (the floor any tool pays)
    prepare   a first run: hash, decode, downmix, soxr VHQ resample, BS.1770, write
    rerun     a second run on the unchanged folder (everything reused)

and prints seconds, audio seconds per wall second, peak memory, and prepare / decode.

    .venv/bin/python bench/prepare_speed.py --files 200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
DECODE = ("import sys, pathlib, soundfile as sf\n"
          "for p in sorted(pathlib.Path(sys.argv[1]).glob('*.wav')):\n"
          "    sf.read(p, dtype='float64')\n")


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "sounds", Path(tmp) / "prepared"
        src.mkdir()
        n = int(args.seconds * 44100)
        t = np.arange(n) / 44100
        for i in range(args.files):
            tone = np.sin(2 * np.pi * (80 + 10 * i) * t) * np.exp(-t * (1 + i % 5))
            noise = 0.05 * rng.standard_normal((n, 2))
            sf.write(src / f"take_{i:04d}.wav", 0.5 * tone[:, None] + noise, 44100, subtype="PCM_24")
        audio_s = args.files * args.seconds
        py = sys.executable
        rows = [("decode", timed([py, "-c", DECODE, str(src)])),
                ("prepare", timed([py, "-m", "training", "prepare", str(src), str(out)])),
                ("rerun", timed([py, "-m", "training", "prepare", str(src), str(out)]))]
    print(f"{args.files} files x {args.seconds:g} s, 44.1 kHz stereo 24-bit ({audio_s:.0f} s of audio)")
    print(f"{'step':<8} {'seconds':>8} {'x real time':>12} {'peak MB':>8}")
    for name, (wall, mb) in rows:
        print(f"{name:<8} {wall:8.2f} {audio_s / wall:12.0f} {mb:8.0f}")
    print(f"prepare / decode: {rows[1][1][0] / rows[0][1][0]:.1f}x; "
          f"rerun / prepare: {rows[2][1][0] / rows[1][1][0]:.2f}")


if __name__ == "__main__":
    main()
