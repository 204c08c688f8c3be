"""Small nn~-convention model files for testing the daemon without a trained model.

`ToySynth` is a deterministic streaming synthesiser with the model-file contract of the
README: latent 0 sets the pitch (220 Hz * 2**z), latent 1 the level, latent 2 the
brightness (third-harmonic mix); further latents are accepted and ignored. Controls are
interpolated across each frame from the previous frame's values, and the oscillator phase
is carried between calls, so chunked decoding equals whole decoding.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch


class ToySynth(torch.nn.Module):
    def __init__(self, latent_size: int = 4, hop: int = 256, sample_rate: int = 48000,
                 meta: str = "", fault: str = ""):
        super().__init__()
        self.latent_size = latent_size
        self.hop = hop
        self.sample_rate = sample_rate
        self.meta = meta
        self.fault = fault
        self.register_buffer("decode_params", torch.tensor([latent_size, hop, 1, 1]))
        self.register_buffer("encode_params", torch.tensor([1, 1, latent_size, hop]))
        self.register_buffer("forward_params", torch.tensor([1, 1, 1, 1]))
        self.register_buffer("phase", torch.zeros(1))
        self.register_buffer("last", torch.zeros(latent_size))
        self.register_buffer("ramp", (torch.arange(hop, dtype=torch.float32) + 1.0) / hop)

    @torch.jit.export
    def get_methods(self) -> list[str]:
        return ["encode", "decode", "forward"]

    @torch.jit.export
    def get_attributes(self) -> list[str]:
        return []

    @torch.jit.export
    def metadata(self) -> str:
        return self.meta

    @torch.jit.export
    def reset(self) -> None:
        self.phase.zero_()
        self.last.zero_()

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, latent_size, frames) -> (batch, 1, frames * hop); batch 0 drives the state."""
        batch, _, frames = z.shape
        prev = torch.cat([self.last.view(1, -1, 1).expand(batch, -1, 1), z[:, :, :-1]], dim=2)
        # per-sample controls: a linear ramp from the previous frame to this one
        step = (z - prev).unsqueeze(-1) * self.ramp + prev.unsqueeze(-1)  # (b, latent, frames, hop)
        ctrl = step.reshape(batch, self.latent_size, frames * self.hop)
        freq = 220.0 * torch.pow(2.0, ctrl[:, 0])
        level = 0.5 * torch.sigmoid(2.0 * ctrl[:, 1])
        bright = torch.sigmoid(2.0 * ctrl[:, 2])
        phase = self.phase + torch.cumsum(2.0 * math.pi * freq / self.sample_rate, dim=1)
        out = level * (torch.sin(phase) + bright * torch.sin(3.0 * phase)) / 2.0
        self.phase.copy_(torch.remainder(phase[0, -1:], 2.0 * math.pi))
        self.last.copy_(z[0, :, -1])
        if self.fault == "nan":
            out = out * float("nan")
        if self.fault == "short":
            out = out[:, : out.shape[1] // 2]
        return out.unsqueeze(1)

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1, samples) -> (batch, latent_size, samples // hop): frame level in latent 1."""
        batch = x.shape[0]
        frames = x.shape[2] // self.hop
        rms = x[:, 0, : frames * self.hop].reshape(batch, frames, self.hop).pow(2).mean(-1).sqrt()
        z = torch.zeros(batch, self.latent_size, frames)
        z[:, 1] = torch.log(rms + 1e-4)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class RaveLikeSynth(ToySynth):
    """The same synthesiser without a `metadata` method, as in a RAVE export."""

    def metadata(self) -> str:  # not exported: TorchScript drops it
        return ""


class BrokenRestartSynth(ToySynth):
    """The same synthesiser with a `restart` that fails, as a faulty file's would."""

    @torch.jit.export
    def restart(self, rows: torch.Tensor) -> None:
        raise RuntimeError("no restart here")


class BrokenDecodeRowsSynth(ToySynth):
    """The same synthesiser with a `decode_rows` that returns every row, not the ones it is given."""

    @torch.jit.export
    def decode_rows(self, u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.decode(u)


def toy_metadata(latent_size: int = 4, hop: int = 256, sample_rate: int = 48000,
                 labels: list[str] | None = None) -> dict:
    """Metadata in the README's schema for a ToySynth."""
    labels = labels or (["pitch", "loudness", "brightness"] + [f"timbre_{i}" for i in range(1, latent_size)])
    return {
        "format": "synthd-model", "format_version": 1, "name": "toy",
        "sample_rate": sample_rate, "channels": 1, "latent_size": latent_size, "hop": hop,
        "latency_samples": hop,
        "controls": [
            {"index": i, "label": labels[i], "min": -2.0, "max": 2.0, "default": 0.0,
             "source": "attribute" if i < 3 else "pca", "attribute": labels[i] if i < 3 else None,
             "quality": None}
            for i in range(latent_size)
        ],
        "preprocessing": {"sample_rate": sample_rate, "target_lufs": -20.0, "gain_db": 0.0},
        "data": {"files": 0, "duration_s": 0.0}, "run": {"steps": 0},
    }


def build_toy_model(path: str | Path, *, latent_size: int = 4, hop: int = 256,
                    sample_rate: int = 48000, with_metadata: bool = True, fault: str = "",
                    metadata: dict | None = None) -> Path:
    """Script a ToySynth and save it to `path`.

    with_metadata=False gives a RAVE-like file (no metadata). fault="nan" makes decode
    return NaN; fault="short" makes it return half the samples `decode_params` promise;
    fault="restart" or "decode_rows" adds that method, broken.
    `metadata` replaces the generated metadata (to test how bad metadata is refused).
    """
    if metadata is None:
        metadata = toy_metadata(latent_size, hop, sample_rate) if with_metadata else None
    meta = json.dumps(metadata) if metadata is not None else ""
    faulty = {"restart": BrokenRestartSynth, "decode_rows": BrokenDecodeRowsSynth}
    cls = faulty[fault] if fault in faulty else ToySynth if with_metadata else RaveLikeSynth
    module = cls(latent_size, hop, sample_rate, meta, fault)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return Path(path)


class FrameProbe(torch.nn.Module):
    """Shows the latent values an engine feeds, frame by frame.

    Each frame's output is latent 0 held for the frame, times 0.5, times a carrier at the
    Nyquist rate (+1, -1, ...) that a DC blocker passes unchanged: so |output| in frame k is
    exactly 0.5 * z[0, k]. Channel c is scaled by 1 / (c + 1). Latent 1 is a fault switch:
    above 1.5 (beyond its declared range, so the load probe passes) decode returns NaN.
    """

    def __init__(self, hop: int = 256, sample_rate: int = 48000, channels: int = 1, meta: str = ""):
        super().__init__()
        self.hop = hop
        self.meta = meta
        self.register_buffer("decode_params", torch.tensor([2, hop, channels, 1]))
        self.register_buffer("carrier", torch.tensor([1.0, -1.0]).repeat(hop // 2))
        self.register_buffer("scale", 1.0 / (torch.arange(channels, dtype=torch.float32) + 1.0))

    @torch.jit.export
    def get_methods(self) -> list[str]:
        return ["decode"]

    @torch.jit.export
    def metadata(self) -> str:
        return self.meta

    @torch.jit.export
    def reset(self) -> None:
        pass

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, 2, frames) -> (batch, channels, frames * hop)."""
        batch, _, frames = z.shape
        held = z[:, 0].unsqueeze(-1) * (0.5 * self.carrier)  # (batch, frames, hop)
        out = held.reshape(batch, 1, frames * self.hop) * self.scale.view(1, -1, 1)
        if bool((z[:, 1] > 1.5).any()):
            out = out * float("nan")
        return out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)


def build_frame_probe(path: str | Path, *, hop: int = 256, sample_rate: int = 48000,
                      channels: int = 1) -> Path:
    """Script a FrameProbe with metadata (controls `level` 0..1 and `fault` 0..1) to `path`."""
    meta = toy_metadata(2, hop, sample_rate, labels=["level", "fault"])
    meta.update(name="probe", channels=channels)
    for c in meta["controls"]:
        c.update(min=0.0, max=1.0, default=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(FrameProbe(hop, sample_rate, channels, json.dumps(meta))), str(path))
    return Path(path)


class RaveExportMirror(torch.nn.Module):
    """What RAVE v2's `scripts/export.py --streaming` writes, built the way its nn_tilde base
    class builds it: methods `encode`, `decode`, `forward`, `get_methods`, `get_attributes`
    only (no `reset()`, no `metadata()`); buffers `{method}_params`, `latent_pca`,
    `latent_mean`, `fidelity`; attributes `sr`, `latent_size`, `full_latent_size`, `stereo`
    and the methods' `input_labels` / `output_labels`; one latent frame per `ratio` samples.

    `decode` pads the latents with fresh noise up to the full latent size (RAVE's
    `pre_process_latent`), maps them through the PCA, and runs them through a cached causal
    convolution (its cache kept in a buffer between calls, as cached_conv does) into an
    oscillator whose phase runs on: state that nothing but reloading the file clears. Latent 0
    sets the pitch (220 Hz * 2**(0.5 z)); the noise moves the level by a few percent.
    """

    def __init__(self, latent_size: int = 8, ratio: int = 2048, sample_rate: int = 48000):
        super().__init__()
        self.sr = sample_rate
        self.stereo = False
        self.latent_size = latent_size
        self.full_latent_size = max(latent_size, 16)
        self.ratio = ratio
        full = self.full_latent_size
        self.register_buffer("latent_pca", torch.eye(full))
        self.register_buffer("latent_mean", torch.zeros(full))
        self.register_buffer("fidelity", torch.linspace(0.5, 1.0, full))
        self.register_buffer("cache", torch.zeros(1, full, 2))
        self.register_buffer("phase", torch.zeros(1))
        self.register_buffer("encode_params", torch.tensor([1, 1, latent_size, ratio]))
        self.register_buffer("decode_params", torch.tensor([latent_size, ratio, 1, 1]))
        self.register_buffer("forward_params", torch.tensor([1, 1, 1, 1]))
        self.encode_input_labels = ["(signal) Input audio signal"]
        self.encode_output_labels = [f"(signal) Latent dimension {i}" for i in range(latent_size)]
        self.decode_input_labels = [f"(signal) Latent dimension {i}" for i in range(latent_size)]
        self.decode_output_labels = ["(signal) Reconstructed audio signal (mono)"]
        self.forward_input_labels = ["(signal) Input audio signal"]
        self.forward_output_labels = ["(signal) Reconstructed audio signal (mono)"]
        self._methods = ["encode", "decode", "forward"]
        self._attributes = torch.jit.Attribute([], list[str])

    @torch.jit.export
    def get_methods(self) -> list[str]:
        return self._methods

    @torch.jit.export
    def get_attributes(self) -> list[str]:
        return self._attributes

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1, samples) -> (batch, latent_size, samples // ratio): log level in latent 0."""
        frames = x.shape[-1] // self.ratio
        rms = x[:, :1, : frames * self.ratio].reshape(x.shape[0], 1, frames, self.ratio).pow(2).mean(-1).sqrt()
        return torch.cat([torch.log(rms + 1e-4), torch.zeros(x.shape[0], self.latent_size - 1, frames)], 1)

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, latent_size, frames) -> (batch, 1, frames * ratio); batch 0 drives the state."""
        batch, _, frames = z.shape
        noise = torch.randn(batch, self.full_latent_size - self.latent_size, frames)
        u = torch.nn.functional.conv1d(torch.cat([z, noise], 1), self.latent_pca.T.unsqueeze(-1))
        u = u + self.latent_mean.unsqueeze(-1)
        full = torch.cat([self.cache.expand(batch, -1, -1), u], 2)
        smooth = (full[:, :, :-2] + full[:, :, 1:-1] + full[:, :, 2:]) / 3.0  # causal, kernel 3
        self.cache.copy_(full[:1, :, -2:])
        pitch = smooth[:, 0].repeat_interleave(self.ratio, dim=1)  # (batch, samples)
        wobble = 0.05 * torch.tanh(smooth[:, self.full_latent_size - 1]).repeat_interleave(self.ratio, dim=1)
        freq = 220.0 * torch.pow(2.0, 0.5 * torch.tanh(pitch))
        phase = self.phase + torch.cumsum(2.0 * math.pi * freq / self.sr, dim=1)
        self.phase.copy_(torch.remainder(phase[0, -1:], 2.0 * math.pi))
        return (0.3 * (1.0 + wobble) * torch.sin(phase)).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def build_rave_mirror(path: str | Path, *, latent_size: int = 8, ratio: int = 2048,
                      sample_rate: int = 48000) -> Path:
    """Script a RaveExportMirror to `path`, as RAVE's export does (`torch.jit.script`, save)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(RaveExportMirror(latent_size, ratio, sample_rate).eval()), str(path))
    return Path(path)
