"""A model file with a pitch input, made by the real export path from a VAE whose weights are set
by hand: its harmonic head plays a fixed spectrum (or every partial at full level) at the pitch
input and its residual is silent, so a test can read the pitch of what synthd plays without
training a model first."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from training.control_space import pca_space
from training.export import build_metadata, export_model
from training.model import VAE, ModelConfig

SMALL = dict(latent_size=2, encoder_dim=16, encoder_blocks=1, decoder_dim=16, decoder_blocks=1,
             decoder_dilations=[1])


def pitched_vae(harmonics: int = 16, partials: list[float] | None = None, sample_rate: int = 48000) -> VAE:
    """A VAE whose decoder plays `partials` (relative amplitudes of harmonics 1, 2, ...; default
    1, 1/2, 1/4) at its pitch input, gated by voicing, and nothing else. `partials=[]` sets every
    harmonic to full level (the loudest the head allows)."""
    partials = [1.0, 0.5, 0.25] if partials is None else partials
    vae = VAE(ModelConfig(harmonics=harmonics, sample_rate=sample_rate, **SMALL)).eval()
    head, harmonic = vae.decoder.head, vae.decoder.harmonic
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.fill_(-30.0 / vae.cfg.magnitude_gain)  # the residual: e^-30, silence
        harmonic.proj.weight.zero_()
        levels = torch.full((harmonics,), -40.0)
        levels[:] = 0.0 if not partials else -40.0
        for k, a in enumerate(partials):
            levels[k] = math.log(a)
        harmonic.proj.bias.copy_(levels / harmonic.gain)
        vae.default_condition.copy_(torch.tensor([60.0, 1.0]))
    return vae


def build_pitched_model(path: Path, **kwargs) -> Path:
    """Export `pitched_vae(**kwargs)` to `path`: decode's inputs are pitch, voicing, timbre_1, timbre_2."""
    vae = pitched_vae(**kwargs)
    latents = np.random.default_rng(0).normal(size=(64, vae.cfg.latent_size))
    space = pca_space(latents)
    export_model(vae, space, build_metadata(path.stem, vae, space, {"step": 0}), path)
    return path
