"""Real-time factor of N voices on one thread: one batched decode call per block (batch = voices)
against one call per voice, and the whole engine (envelopes and mix included) with N notes held;
then the 8-voice engine with fewer notes held, its silent voices decoded or left out.

    python bench/voices.py [MODEL.ts] [--seconds 3] [--threads 1]

Without MODEL.ts it exports the default architecture (with its pitch input; untrained: the speed
does not depend on the weights), as bench/decoder_speed.py does. Calls are 256 samples (one
latent frame), as `synthd run` makes them at its default block. Each row loads the file afresh
(TorchScript specialises to the shapes it has seen). "separate" is the baseline, measured in the
same run: N modules, one per voice (each keeps its own streaming state), each called once a block.

RTF = audio duration / compute time (median per block; cpu = this thread's CPU time).
Target: 8 voices at >= 3x real time on one thread (batched, and through the engine).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decoder_speed import default_model_file, random_inputs, timed  # noqa: E402

VOICE_COUNTS = (1, 2, 4, 8, 16)
BLOCK = 256


def median_rtf(times: list[float], audio_s: float) -> float:
    return audio_s / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model file (default: export the default architecture)")
    parser.add_argument("--seconds", type=float, default=3.0, help="audio per measurement (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from synthd.controls import ControlSurface, engine_for
    from synthd.model import load_model
    from synthd.patch import parse_patch

    with tempfile.TemporaryDirectory() as folder:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = Path(args.model) if args.model else default_model_file(folder)
        data = path.read_bytes()

        def fresh() -> torch.jit.ScriptModule:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.jit.load(io.BytesIO(data))

        import json

        meta = json.loads(fresh().metadata())
        hop, rate = meta["hop"], meta["sample_rate"]
        frames = BLOCK // hop
        blocks = max(20, int(args.seconds * rate / BLOCK))
        audio = BLOCK / rate
        print(f"model: {path if args.model else 'default architecture (untrained)'}; latent {meta['latent_size']}, "
              f"hop {hop}; {args.threads} thread(s); {BLOCK}-sample blocks; load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")
        header = (f"{'voices':>6} | {'batched ms':>10} {'RTF':>6} {'RTF cpu':>7} | {'separate ms':>11} {'RTF':>6} | "
                  f"{'batched/separate':>16} | {'engine ms':>9} {'RTF':>6}")
        print(header)
        print("-" * len(header))
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for n in VOICE_COUNTS:
                inputs = [random_inputs(meta, frames, generator) for _ in range(n)]
                batch = torch.cat(inputs)
                batched = fresh()
                wall, cpu = timed(lambda _: batched.decode(batch), blocks)
                modules = [fresh() for _ in range(n)]
                sep_wall, _ = timed(lambda _: [m.decode(u) for m, u in zip(modules, inputs)], blocks // 2)

                # the engine as synthd plays it: n notes held, envelopes and the mix included
                patch = parse_patch(f"version = 1\nvoices = {n}\n[gate]\nopen = false\n")
                engine = engine_for(load_model(path), patch, channels=2, block_frames=BLOCK, threads=args.threads)
                surface = ControlSurface(engine, patch)
                if n == 1:
                    surface.set_gate(True)
                for k in range(n if n > 1 else 0):
                    surface.note_on(40 + 3 * k, 100)
                eng_wall, _ = timed(lambda _: engine.render(BLOCK), blocks)
                print(f"{n:>6} | {1e3 * statistics.median(wall):>10.3f} {median_rtf(wall, audio):>6.1f} "
                      f"{median_rtf(cpu, audio):>7.1f} | {1e3 * statistics.median(sep_wall):>11.3f} "
                      f"{median_rtf(sep_wall, audio):>6.1f} | "
                      f"{statistics.median(sep_wall) / statistics.median(wall):>15.1f}x | "
                      f"{1e3 * statistics.median(eng_wall):>9.3f} {median_rtf(eng_wall, audio):>6.1f}")
                assert np.isfinite(engine.render(BLOCK)).all()
        print("\ntarget: 8 voices >= 3x real time on one thread (today's single voice: about 14x)")
        sounding_table(path, blocks, audio, args.threads)
    return 0


def sounding_table(path: Path, blocks: int, audio: float, threads: int) -> None:
    """The 8-voice engine with some of its voices sounding: silent voices left out of the decode
    (`decode_rows`, as synthd plays a file that has it) against every voice decoded on every call
    (a file without it), measured one after the other in this run."""
    from synthd.controls import ControlSurface, engine_for
    from synthd.model import load_model
    from synthd.patch import parse_patch

    model = load_model(path)
    if not model.decodes_rows:
        print("\nthe file has no decode_rows: every voice is decoded on every call")
        return
    print("\nthe engine with 8 voices, N of them sounding (median ms per 256-sample render):")
    header = f"{'sounding':>8} | {'silent ones left out':>20} | {'every voice decoded':>19} | {'ratio':>5}"
    print(header)
    print("-" * len(header))
    patch = parse_patch("version = 1\nvoices = 8\n[gate]\nopen = false\n")
    for n in (0, 1, 2, 3, 4, 5, 6, 8):
        times = []
        for alone in (True, False):
            engine = engine_for(load_model(path), patch, channels=2, block_frames=BLOCK, threads=threads)
            engine.model.decodes_rows = alone
            surface = ControlSurface(engine, patch)
            for k in range(n):
                surface.note_on(40 + 3 * k, 100)
            wall, _ = timed(lambda _: engine.render(BLOCK), blocks)
            times.append(statistics.median(wall))
        print(f"{n:>8} | {1e3 * times[0]:>15.3f} ms | {1e3 * times[1]:>16.3f} ms | {times[0] / times[1]:>5.2f}")


if __name__ == "__main__":
    sys.exit(main())
