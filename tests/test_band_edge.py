"""No whistle at the band edge: a model trained on full-band hits (content up to 24 kHz, like
cymbals) reconstructs them without a steady partial between 18 kHz and its band edge (22 kHz)
that they lack.

The first decoder whistled at 19.65 kHz on every reconstruction, 2 to 10 dB under the loudest
bin: the losses asked for the hits' energy above the decoder's band limit, and the only way it
had to put energy there was to push its top sinusoidal bins up until their leakage reached it.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from support.demo_model import TINY_CONFIG, synthd_train
from training.aliasing import steady_partials
from training.checkpoint import load_run
from training.dataset import PreparedSet

RATE = 48000


def full_band_hits(folder, count: int = 16) -> None:
    """Decaying white-noise bursts (every fourth with a low sine body, like a kick)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(count):
        n = int(RATE * rng.uniform(0.25, 0.6))
        t = np.arange(n) / RATE
        x = rng.normal(size=n) * np.exp(-t / rng.uniform(0.03, 0.2))
        if i % 4 == 0:
            x = 0.3 * x + np.sin(2 * np.pi * rng.uniform(60, 200) * t) * np.exp(-t / 0.1)
        sf.write(folder / f"hit{i:02d}.wav", (0.3 * x / np.abs(x).max()).astype(np.float32), RATE, subtype="PCM_24")


@pytest.mark.timeout(900)
def test_no_steady_partial_at_the_band_edge_on_full_band_hits(tmp_path):
    full_band_hits(tmp_path / "hits")
    synthd_train("prepare", str(tmp_path / "hits"), str(tmp_path / "prepared"))
    (tmp_path / "tiny.toml").write_text(TINY_CONFIG)
    synthd_train("train", str(tmp_path / "prepared"), str(tmp_path / "run"), "--steps", "200", "--seed", "0",
                 "--config", str(tmp_path / "tiny.toml"))
    _, vae = load_run(tmp_path / "run")
    dataset = PreparedSet.open(tmp_path / "prepared")
    context = -(-vae.warmup_samples // vae.hop) * vae.hop
    for f in dataset.files:
        a = dataset.load(f)
        n = -(-len(a) // vae.hop) * vae.hop
        x = torch.from_numpy(np.pad(a, (context, n - len(a)))).view(1, 1, -1)
        with torch.no_grad():
            y = vae(x)[0][0, 0, context:context + len(a)].numpy()
        lines = steady_partials(a, y, low=18000.0, high=vae.cfg.max_frequency)
        assert lines == [], (f.source, f.split, [(round(p.frequency_hz), round(p.level_db, 1)) for p in lines])
