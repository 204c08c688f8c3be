"""Real-time factor of the exported streaming decoder on one thread, per call size.

    python bench/decoder_speed.py [MODEL.ts] [--seconds 3] [--threads 1]

Without MODEL.ts it exports the default architecture (untrained: the speed does not depend on
the weights) to a temporary file and loads that, so the figures are those of a real model file.
For each call size (256, 512, 1024, 2048 samples) it streams `--seconds` of audio through
`decode` and prints the median and 99th-percentile time per call and the real-time factor
(audio duration / compute time), by wall clock and by this thread's CPU time (the second is
what the decoder costs when other processes share the cores). Each call size gets the file
loaded afresh, as a host calls one size: TorchScript specialises its graph to the shapes it has
seen, and a module that has run several sizes is slower at all of them. Calls run under
`torch.inference_mode()`, as synthd makes them (under `no_grad` each call takes about a seventh
longer: autograd still tracks views and versions there). The inputs are a pitch anywhere from
C2 to C7 with voicing on: every partial of the harmonic head that the band limit lets through
sounds, its dearest case (an unvoiced call, a drum hit, skips the harmonic sum).

Baseline, measured in the same run: the same file decoded without its streaming caches, i.e.
each call re-decodes the decoder's whole receptive field in front of the new frames (what a
decoder without cached padding must do to stay continuous).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CALL_SIZES = (256, 512, 1024, 2048)


def default_model_file(folder: str, harmonics: int | None = None) -> Path:
    import numpy as np

    from training.control_space import pca_space
    from training.export import build_metadata, export_model
    from training.model import VAE, ModelConfig

    torch.manual_seed(0)
    vae = VAE(ModelConfig() if harmonics is None else ModelConfig(harmonics=harmonics)).eval()
    space = pca_space(np.random.default_rng(0).normal(size=(1000, vae.cfg.latent_size)))
    out = Path(folder) / "default.ts"
    export_model(vae, space, build_metadata("bench", vae, space, {"step": 0}), out)
    return out


def receptive_frames(meta: dict) -> int:
    """Latent frames in front of a call that a cache-free decoder must re-decode."""
    recorded = meta.get("run", {}).get("model", {}).get("receptive_frames")
    # a file without the figure (e.g. from elsewhere): a generous 64 frames
    return int(recorded) if recorded else 64


def random_inputs(meta: dict, frames: int, generator: torch.Generator) -> torch.Tensor:
    """`(1, latent, frames)`: normal latents; a pitch input (unit "midi") anywhere from C2 to C7
    and voicing at 1, so the harmonic head plays every partial it has (its dearest case)."""
    u = torch.randn(1, meta["latent_size"], frames, generator=generator)
    for i, c in enumerate(meta.get("controls") or []):
        if c.get("unit") == "midi":
            u[:, i] = 36.0 + 60.0 * torch.rand(frames, generator=generator)
        elif c.get("source") == "voicing":
            u[:, i] = 1.0
    return u


def timed(step: Callable[[int], object], calls: int, warmup: int = 10) -> tuple[list[float], list[float]]:
    """Wall and thread-CPU seconds of `step(i)` for i in 0..calls-1, after `step(0..warmup-1)` once
    untimed (TorchScript optimises on the first calls)."""
    for i in range(min(warmup, calls)):
        step(i)
    wall, cpu = [], []
    for i in range(calls):
        w0, c0 = time.perf_counter(), time.thread_time()
        step(i)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return wall, cpu


def time_calls(call, frames_per_call: int, meta: dict, seconds: float, sample_rate: int, hop: int):
    calls = max(20, int(seconds * sample_rate / (frames_per_call * hop)))
    generator = torch.Generator().manual_seed(0)
    inputs = [random_inputs(meta, frames_per_call, generator) for _ in range(calls)]
    return timed(lambda i: call(inputs[i]), calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model file (default: export the default architecture)")
    parser.add_argument("--seconds", type=float, default=3.0, help="audio streamed per call size (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--harmonics", type=int, help="without MODEL.ts: the default architecture with this "
                        "many partials in its harmonic head (0: the decoder without a pitch input)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(args.model) if args.model else default_model_file(folder, args.harmonics)
        data = path.read_bytes()

    def fresh() -> torch.jit.ScriptModule:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(io.BytesIO(data))

    meta = json.loads(fresh().metadata())
    latent, hop, rate = meta["latent_size"], meta["hop"], meta["sample_rate"]
    context = receptive_frames(meta)
    print(f"model: {path if args.model else 'default architecture (untrained)'}; latent {latent}, hop {hop}, "
          f"{rate} Hz, latency {meta['latency_samples']} samples; {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"baseline: no streaming caches, re-decoding {context} frames of context per call\n")
    header = (f"{'call':>6} {'frames':>6} | {'median ms':>9} {'p99 ms':>7} {'RTF wall':>8} {'RTF cpu':>8} | "
              f"{'baseline RTF cpu':>16} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for size in CALL_SIZES:
            frames = size // hop
            model = fresh()
            wall, cpu = time_calls(model.decode, frames, meta, args.seconds, rate, hop)
            history: list[torch.Tensor] = []
            baseline = fresh()

            def cache_free(u: torch.Tensor) -> torch.Tensor:
                history.append(u)
                del history[:-(context // frames + 2)]
                window = torch.cat(history, dim=2)[:, :, -(context + frames):]
                baseline.reset()
                return baseline.decode(window)[..., -frames * hop:]

            _, base_cpu = time_calls(cache_free, frames, meta, args.seconds / 2, rate, hop)
            audio = size / rate
            med_wall, med_cpu, base = statistics.median(wall), statistics.median(cpu), statistics.median(base_cpu)
            p99 = sorted(wall)[int(0.99 * (len(wall) - 1))]
            print(f"{size:>6} {frames:>6} | {1e3 * med_wall:>9.3f} {1e3 * p99:>7.3f} {audio / med_wall:>8.1f} "
                  f"{audio / med_cpu:>8.1f} | {audio / base:>16.1f} {base / med_cpu:>7.1f}x")
    print("\nRTF = audio duration / compute time per call (median); targets: >= 10 at 256, >= 40 at 2048")
    return 0


if __name__ == "__main__":
    sys.exit(main())
