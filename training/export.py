"""`synthd-train export RUN_DIR OUT.ts`: a trained run as an nn~-convention TorchScript file.

The file's latent dimensions are the controls of its metadata (see training/control_space.py):
`decode` maps control values to VAE latents and streams them through the causal decoder,
keeping the convolution caches, the overlap-add tail and the noise-table position between
calls; `encode` streams audio to the posterior mean in control coordinates (and the tracked
pitch and voicing), a fixed number of frames behind its input (its look-ahead). Before the
file is written, decoding and encoding in chunks of 1, 2, 3 and 8 frames are checked against
one whole call, and the saved file is loaded back and checked again.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from training.control_space import ControlSpace, ControlSpec
from training.model import VAE

FORMAT_VERSION = 1
CHECK_CHUNKS = (1, 2, 3, 8)


def input_controls(vae: VAE, space: ControlSpace) -> list[ControlSpec]:
    """decode's inputs in order: with a pitch input, `pitch` (MIDI note units, 0..127, the note a
    keyboard plays) and `voicing` (0..1, how much of the sound is the harmonic part), at the
    training set's typical values; then the control space's controls."""
    if not vae.cfg.conditioning:
        return list(space.controls)
    pitch, voicing = (float(v) for v in vae.default_condition)
    return [ControlSpec("pitch", 0.0, 127.0, min(max(pitch, 0.0), 127.0), source="f0", attribute="pitch", unit="midi"),
            ControlSpec("voicing", 0.0, 1.0, min(max(voicing, 0.0), 1.0), source="voicing")] + list(space.controls)


class StreamingModel(nn.Module):
    """The exported module: nn~ methods over a VAE, in control coordinates, with streaming state.

    decode(u `(batch, C + L, T)`) -> `(batch, 1, T * hop)`; encode(x `(batch, 1, N)`) ->
    `(batch, C + L, N // hop)`, where the first C = 2 inputs are pitch (MIDI) and voicing for a
    decoder with a pitch input (C = 0 without) and the L others the control space's controls.
    State is kept for one batch size at a time; a call with another batch size starts afresh.
    """

    __constants__ = ["pitched", "encoder_lag", "tracker_lag", "encode_lag"]

    def __init__(self, vae: VAE, space: ControlSpace, metadata: str) -> None:
        super().__init__()
        space.validate()
        self.decoder = vae.decoder.folded()
        self.encoder = vae.encoder
        self.conditioning = vae.cfg.conditioning
        self.pitched = vae.tracker is not None
        # the one pitch tracker: `encode` reads pitch and voicing as `prepare` and training did
        self.tracker = vae.tracker if vae.tracker is not None else nn.Identity()
        size = vae.cfg.latent_size
        inputs = size + self.conditioning
        self.latent_size = inputs
        self.hop = vae.cfg.hop
        basis = torch.as_tensor(np.asarray(space.basis), dtype=torch.float64)
        self.register_buffer("offset", torch.as_tensor(np.asarray(space.offset), dtype=torch.float32).view(1, size, 1))
        self.register_buffer("basis", basis.float())
        self.register_buffer("inverse", torch.linalg.inv(basis).float())
        self.register_buffer("decode_params", torch.tensor([inputs, self.hop, 1, 1]))
        self.register_buffer("encode_params", torch.tensor([1, 1, inputs, self.hop]))
        self.register_buffer("forward_params", torch.tensor([1, 1, 1, 1]))
        self.meta = metadata
        self.state: list[Tensor] = self.decoder.initial_state(1)
        # encode streams too: the encoder and the tracker each give frame t some frames after block
        # t arrived; the quicker one is delayed to the slower, so both describe the same frame
        self.encoder_lag = self.encoder.lookahead_frames
        self.tracker_lag = vae.tracker.lookahead_frames if vae.tracker is not None else 0
        self.encode_lag = max(self.encoder_lag, self.tracker_lag)
        self.encoder_state: list[Tensor] = self.encoder.initial_state(1)
        self.tracker_state: list[Tensor] = self._tracker_state(1)
        self.encoder_delay = torch.zeros(1, size, self.encode_lag - self.encoder_lag)
        self.tracker_delay = torch.zeros(1, self.conditioning, self.encode_lag - self.tracker_lag)

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
        self.state = self.decoder.initial_state(self.state[0].shape[0])
        self._reset_encode(self.encoder_delay.shape[0])

    @torch.jit.export
    def restart(self, rows: Tensor) -> None:
        """Start the decode streams of the batch rows where `rows` `(batch,)` is true afresh, as
        `reset()` would, and leave the other rows as they are: a synth voice's new note then starts
        from silence at its own pitch on its first frame, instead of gliding from the voice's last
        note across it. `rows` of another batch size than the stream's change nothing (a call of
        another size starts every row afresh anyway)."""
        if rows.shape[0] != self.state[0].shape[0]:
            return
        fresh = rows.to(torch.bool)
        state: list[Tensor] = []
        last = len(self.state) - 1
        for i, s in enumerate(self.state):
            if i == last:  # the frame count dates the noise table: the stream's, not a row's
                state.append(s)
            else:
                shape = [s.shape[0]] + [1 for _ in range(s.dim() - 1)]
                state.append(torch.where(fresh.view(shape), torch.zeros_like(s), s))
        self.state = state

    def _tracker_state(self, batch: int) -> list[Tensor]:
        if self.pitched:
            return self.tracker.initial_state(batch)
        return [torch.zeros(batch, 0)]

    def _reset_encode(self, batch: int) -> None:
        self.encoder_state = self.encoder.initial_state(batch)
        self.tracker_state = self._tracker_state(batch)
        self.encoder_delay = torch.zeros(batch, self.encoder_delay.shape[1], self.encode_lag - self.encoder_lag)
        self.tracker_delay = torch.zeros(batch, self.tracker_delay.shape[1], self.encode_lag - self.tracker_lag)

    @torch.jit.export
    def decode(self, u: Tensor) -> Tensor:
        """Control values `(batch, latent_size, frames)` -> audio `(batch, 1, frames * hop)`, continuing
        the stream of the previous call."""
        if u.shape[0] != self.state[0].shape[0]:
            self.state = self.decoder.initial_state(u.shape[0])
        audio, self.state = self._step(u, self.state)
        return audio

    @torch.jit.export
    def decode_rows(self, u: Tensor, rows: Tensor) -> Tensor:
        """`decode` for some rows of the batch only: control values `(batch, latent_size, frames)`
        and row indices `rows` `(n,)` (int64, ascending, each once) -> audio `(n, 1, frames * hop)`
        of those rows, continuing their streams; the other rows' streams stay as they were, and
        their values are not read. A synth's silent voices then cost nothing: `decode_rows(u, rows)`
        equals `decode(u)[rows]` to float rounding for as long as every row is decoded on every call
        (the harmonic head may sum a batch of another size another way). The noise
        table's position is the stream's: it moves on with every call, whichever rows it decodes."""
        if u.shape[0] != self.state[0].shape[0]:
            self.state = self.decoder.initial_state(u.shape[0])
        last = len(self.state) - 1
        picked: list[Tensor] = []
        for i, s in enumerate(self.state):
            picked.append(s if i == last else s.index_select(0, rows))
        audio, stepped = self._step(u.index_select(0, rows), picked)
        state: list[Tensor] = []
        for i, s in enumerate(self.state):
            state.append(stepped[i] if i == last else s.index_copy(0, rows, stepped[i]))
        self.state = state
        return audio

    def _step(self, u: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        # one affine map straight into the decoder's `(batch, T, latent)` layout
        z = nn.functional.linear(u[:, self.conditioning:].transpose(1, 2), self.basis, self.offset.view(-1))
        return self.decoder.step_frames(z, state, u[:, :self.conditioning].transpose(1, 2))

    @torch.jit.export
    def encode(self, x: Tensor) -> Tensor:
        """Audio `(batch, 1, samples)` -> control values `(batch, latent_size, samples // hop)`,
        continuing the stream of the previous call: pitch and voicing from the tracker (with a pitch
        input), then the posterior mean, so the same audio always gives the same controls. Output k
        describes input frame k - encode_lag (the metadata's `latency.encode_samples`): the
        encoder's look-ahead. Samples past a whole frame are not used."""
        if x.shape[0] != self.encoder_delay.shape[0]:
            self._reset_encode(x.shape[0])
        frames = x.shape[-1] // self.hop
        mean, _, self.encoder_state = self.encoder.step(x, self.encoder_state)
        controls = torch.cat([self.encoder_delay, torch.matmul(self.inverse, mean - self.offset)], -1)
        self.encoder_delay = controls[..., controls.shape[-1] - self.encoder_delay.shape[-1]:]
        controls = controls[..., :frames]
        if self.pitched:
            condition, self.tracker_state = self.tracker.step(x, self.tracker_state)
            condition = torch.cat([self.tracker_delay, condition], -1)
            self.tracker_delay = condition[..., condition.shape[-1] - self.tracker_delay.shape[-1]:]
            return torch.cat([condition[..., :frames], controls], 1)
        return controls

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def check_streaming(module: Any, u: Tensor, chunks: tuple[int, ...] = CHECK_CHUNKS, tolerance: float = 1e-4) -> float:
    """Decode `u` `(1, L, T)` whole, then in chunks of each size in `chunks` (after `reset()`); raise
    RuntimeError when any chunked decode differs from the whole by more than `tolerance` relative to
    the whole's peak. Returns the largest relative difference. Leaves the module reset."""
    with torch.no_grad():
        module.reset()
        whole = module.decode(u)
        expected = (u.shape[0], 1, u.shape[2] * int(module.decode_params[1]))
        if tuple(whole.shape) != expected:
            raise RuntimeError(f"decode returned {tuple(whole.shape)}, expected {expected}")
    return _chunked_against_whole(module, module.decode, u, whole, 1, chunks, tolerance, "decode")


def encode_lag(vae: VAE) -> int:
    """Frames by which the exported `encode` lags its input (see `StreamingModel.encode`)."""
    return max(vae.encoder.lookahead_frames, vae.tracker.lookahead_frames if vae.tracker is not None else 0)


def check_encode_streaming(module: Any, x: Tensor, chunks: tuple[int, ...] = CHECK_CHUNKS,
                           tolerance: float = 1e-4) -> float:
    """`check_streaming` for `encode`, on audio `x` `(1, 1, samples)` in chunks of whole frames."""
    with torch.no_grad():
        module.reset()
        whole = module.encode(x)
    return _chunked_against_whole(module, module.encode, x, whole, int(module.encode_params[3]), chunks, tolerance,
                                  "encode")


def _chunked_against_whole(module: Any, method: Any, x: Tensor, whole: Tensor, step: int, chunks: tuple[int, ...],
                           tolerance: float, what: str) -> float:
    """`method` on `x` in chunks of each size in `chunks` times `step` along the last axis (after
    `reset()`) against `whole`, its one call: RuntimeError past `tolerance` of whole's largest value."""
    if not bool(torch.isfinite(whole).all()):
        raise RuntimeError(f"{what} returned NaN or infinity")
    scale = max(float(whole.abs().max()), 1e-6)
    worst = 0.0
    with torch.no_grad():
        for size in chunks:
            module.reset()
            parts = [method(x[..., i:i + size * step]) for i in range(0, x.shape[-1], size * step)]
            error = float((torch.cat(parts, dim=2) - whole).abs().max()) / scale
            worst = max(worst, error)
            if error > tolerance:
                raise RuntimeError(f"streaming {what} in chunks of {size} frames differs from one whole "
                                   f"call by {error:.3g} of its largest value (tolerance {tolerance:g})")
        module.reset()
    return worst


def build_metadata(name: str, vae: VAE, space: ControlSpace, ckpt: dict[str, Any]) -> str:
    """The metadata JSON of the README's model-file contract."""
    cfg = vae.cfg
    run: dict[str, Any] = {"steps": int(ckpt.get("step", 0)),
                           "minutes": round(float(ckpt.get("elapsed_s", 0.0)) / 60.0, 2),
                           "manifest_hash": ckpt.get("manifest_hash")}
    run["model"] = {"n_fft": cfg.n_fft, "decoder_dim": cfg.decoder_dim, "decoder_blocks": cfg.decoder_blocks,
                    "decoder_parameters": sum(p.numel() for p in vae.decoder.parameters()),
                    "receptive_frames": vae.decoder.receptive_frames,
                    "noise_branch": cfg.noise_branch, "max_frequency": cfg.max_frequency,
                    "harmonic_max_frequency": cfg.harmonic_max_frequency,
                    "harmonics": cfg.harmonics, "vae_latent_size": cfg.latent_size,
                    "encoder_causal": cfg.encoder_causal}
    controls = input_controls(vae, space)
    meta = {
        "format": "synthd-model", "format_version": FORMAT_VERSION, "name": name,
        "sample_rate": cfg.sample_rate, "channels": 1, "latent_size": len(controls), "hop": cfg.hop,
        "latency_samples": vae.latency_samples,
        # a note or pitch change is heard through the harmonic path within one hop of its frame;
        # the residual (iSTFT) path has played a frame in full after `latency_samples`
        "latency": {"residual_samples": vae.latency_samples,
                    "harmonic_samples": cfg.harmonic_latency_samples if cfg.harmonics else None,
                    # `encode` streams: its output frame k describes the input's frame k - lag
                    "encode_samples": encode_lag(vae) * cfg.hop},
        "controls": [c.to_metadata(i) for i, c in enumerate(controls)],
        "preprocessing": dict(ckpt.get("preprocessing") or {}),
        "data": dict(ckpt.get("data_summary") or {}),
        "pitch": vae.tracker.parameters_dict() if vae.tracker is not None else None,
        "run": run,
    }
    if ckpt.get("lineage"):
        # a run grown `--from` another: where it came from, the files added, the old labels' fate
        from training.incremental import lineage_metadata
        meta["lineage"] = lineage_metadata(ckpt["lineage"], meta["controls"])
    return json.dumps(meta, allow_nan=False)


def freeze(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """The scripted model frozen and optimised for inference: weights and settings become constants
    of the code and submodules are inlined, which takes a tenth off each streaming call (most of a
    one-frame call is per-operation overhead); then the library's inference passes run on every
    method that computes (each linear layer becomes a product with its weight stored transposed:
    another tenth off an 8-frame or 8-voice call). What a host reads stays: the nn~ methods, their
    `_params` buffers and labels, `decode_rows`, `reset`, `restart`, `metadata`, the streaming
    state, and the map from controls to latents (`offset + basis @ controls`)."""
    methods = list(scripted.get_methods())
    keep = methods + ["decode_rows", "reset", "restart", "metadata", "get_methods", "get_attributes", "state", "offset", "basis",
                      "encoder_state", "tracker_state", "encoder_delay", "tracker_delay"]
    keep += [f"{m}_{part}" for m in methods for part in ("params", "input_labels", "output_labels")]
    frozen = torch.jit.freeze(scripted.eval(), preserved_attrs=[name for name in keep if hasattr(scripted, name)])
    computing = [m for m in methods + ["decode_rows"] if m != "forward" and hasattr(frozen, m)]
    return torch.jit.optimize_for_inference(frozen, other_methods=computing)


def export_model(vae: VAE, space: ControlSpace, metadata: str, out: str | Path, check_frames: int = 48) -> float:
    """Script, check, and atomically write the model file; returns the worst streaming error found.

    Checks (before the file replaces anything): chunked decoding equals whole decoding on the
    scripted module and again on the file loaded back from bytes.
    """
    from training.checkpoint import atomic_write_bytes

    vae = vae.eval()
    playable = has_named_controls(space) or vae.cfg.conditioning > 0
    module = PlayableModel(vae, space, metadata) if playable else StreamingModel(vae, space, metadata)
    generator = torch.Generator().manual_seed(0)
    controls = input_controls(vae, space)
    lo = torch.tensor([c.minimum for c in controls]).view(1, -1, 1)
    hi = torch.tensor([c.maximum for c in controls]).view(1, -1, 1)
    # a latent walk across each control's useful range
    u = lo + (hi - lo) * torch.rand(1, len(controls), check_frames, generator=generator)
    # a tone gliding under noise, for the encoder and the pitch tracker
    t = torch.arange(check_frames * vae.cfg.hop) / vae.cfg.sample_rate
    x = (0.3 * torch.sin(2 * math.pi * 110.0 * (t + t * t)) + 0.02 * torch.randn(t.shape, generator=generator)).view(1, 1, -1)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = freeze(torch.jit.script(module))
        worst = max(check_streaming(scripted, u), check_encode_streaming(scripted, x))
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    worst = max(worst, check_streaming(loaded, u), check_encode_streaming(loaded, x))
    if loaded.metadata() != metadata:
        raise RuntimeError("the saved file's metadata does not read back unchanged")
    atomic_write_bytes(out, buffer.getvalue())
    # the temporary file was private; a model file is as readable as any file the user writes
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)
    return worst


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder")
    parser.add_argument("out", metavar="OUT.ts", help="the model file to write")
    parser.add_argument("--which", choices=("best", "last"), default="best",
                        help="checkpoint to export (default: best by validation)")
    parser.add_argument("--data", metavar="DATASET_DIR", help="prepared set the controls are measured on (default: the run's own)")
    parser.add_argument("--name", help="model name in the metadata (default: the output file's stem)")
    parser.add_argument("--scratch", action="store_true",
                        help="a working copy: not remembered as the run's export (RUN_DIR/exported.json), which a run "
                             "grown from this one compares its controls with")


def run(args: argparse.Namespace) -> int:
    from training.checkpoint import load_run
    from training.dataset import PreparedSet, PreparedSetError

    started = time.monotonic()
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"synthd-train export: {out.parent}: no such folder for the model file", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    try:
        ckpt, vae = load_run(args.run_dir, args.which)
        data_dir = args.data or ckpt.get("dataset_dir")
        if not data_dir:
            print(f"synthd-train export: {args.run_dir}: the run does not name its prepared set; pass --data",
                  file=sys.stderr)
            return 2
        dataset = PreparedSet.open(data_dir)
        from training.analyze import control_space, regularized_attributes
        space = control_space(vae, dataset, regularized=regularized_attributes(ckpt))  # control space
        metadata = build_metadata(args.name or out.stem, vae, space, ckpt)
        worst = export_model(vae, space, metadata, out)
    except (FileNotFoundError, PreparedSetError, ValueError, RuntimeError) as exc:
        print(f"synthd-train export: {exc}", file=sys.stderr)
        return 2
    from training.incremental import describe_control_changes, record_export
    meta = json.loads(metadata)
    if not args.scratch:
        record_export(Path(args.run_dir), out, meta)
    if meta.get("lineage"):
        for line in describe_control_changes(meta["lineage"]):
            print(line, file=sys.stderr)
    print(f"streaming check: chunks of {', '.join(map(str, CHECK_CHUNKS))} frames equal one whole decode "
          f"(worst difference {worst:.2g} of peak)", file=sys.stderr)
    rate = vae.cfg.sample_rate
    harmonic = (f"; pitch and harmonics {vae.cfg.harmonic_latency_samples} samples "
                f"({1000 * vae.cfg.harmonic_latency_samples / rate:.1f} ms)" if vae.cfg.harmonics else "")
    print(f"latency {vae.latency_samples} samples ({1000 * vae.latency_samples / rate:.1f} ms){harmonic}, "
          f"{len(input_controls(vae, space))} controls, written in {time.monotonic() - started:.1f} s", file=sys.stderr)
    print(out)
    return 0


# -- nn~ `play` method ---------------------------------------------------------------------------

def has_named_controls(space: ControlSpace) -> bool:
    """Whether any control is named for what it does (the README's condition for `play`)."""
    return any(c.source != "pca" for c in space.controls)


class PlayableModel(StreamingModel):
    """The exported module plus the nn~ method `play`: its input channels are the control values
    0..1 in decode's order (labelled by `play_input_labels`, the control labels), mapped to each
    control's range and decoded at decode's ratio, so a Max or Pd user gets the named controls as
    inlets. `play` and `decode` share one stream."""

    def __init__(self, vae: VAE, space: ControlSpace, metadata: str) -> None:
        super().__init__(vae, space, metadata)
        controls = input_controls(vae, space)
        size = len(controls)
        low = torch.tensor([c.minimum for c in controls], dtype=torch.float32).view(1, size, 1)
        high = torch.tensor([c.maximum for c in controls], dtype=torch.float32).view(1, size, 1)
        self.register_buffer("control_min", low)
        self.register_buffer("control_span", high - low)
        self.register_buffer("play_params", torch.tensor([size, self.hop, 1, 1]))
        self.play_input_labels: list[str] = [c.label for c in controls]
        self.play_output_labels: list[str] = ["audio"]

    @torch.jit.export
    def get_methods(self) -> list[str]:
        return ["encode", "decode", "forward", "play"]

    @torch.jit.export
    def play(self, x: Tensor) -> Tensor:
        """Control values 0..1 `(batch, latent_size, frames)` -> audio `(batch, 1, frames * hop)`."""
        return self.decode(self.control_min + x * self.control_span)
