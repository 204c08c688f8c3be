"""The causal VAE: an encoder that may look ahead, and a causal decoder with an iSTFT head.

Decoder: causal convolution in, a stack of causal ConvNeXt blocks at the frame rate (each
left-padded, so streaming is only a matter of passing the cache in), then an iSTFT head that
predicts per frame a log magnitude and a phase (a running per-bin phase plus an offset) for a
deterministic branch and a smooth log-magnitude envelope for a noise branch (whose phases come
from a fixed table, so the model stays deterministic), band-limited below `max_frequency` and
overlap-added with a Hann-squared window. Nothing runs at the sample rate except
the inverse FFT and overlap-add of band-limited frames, so nothing can fold back: the decoder
is alias-free by construction.

Streaming: every stateful layer takes its state as an argument and returns the new one
(`state` lists of tensors), so the training path (zero state) and the streaming export share
one code path.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from training import spectral_ops
from training.pitch import REST_PITCH, PitchTracker


@dataclass
class ModelConfig:
    """Every size of the model. The defaults are the product's defaults (hop 256 at 48 kHz)."""

    sample_rate: int = 48000
    hop: int = 256
    # the encoder's analysis window and the iSTFT head's synthesis window. 768 (3 hops): the encoder
    # looks 2 frames ahead and the residual path's latency is 512 samples, a frame (5.3 ms) less
    # each than at 1024, as the tracker's look-ahead allows. Held-out ratio to shaped noise, 12 min
    # on one thread each, two runs side by side (bench/train_quality.py, bench/pitch_accuracy.py),
    # 768 against 1024: General MIDI notes 0.260 / 0.274, triads 0.268 / 0.274, drums: HardElectro1
    # 0.585 / 0.608, ElectricEmpireKit (the tuning kit) 0.443 / 0.436
    n_fft: int = 768
    latent_size: int = 16
    # encoder (looks ahead by its analysis window, n_fft - hop samples)
    encoder_dim: int = 128
    encoder_blocks: int = 3
    encoder_kernel: int = 5
    # blocks that read only frames before their own: live input reaches the output 6 frames
    # (32 ms) sooner than through centred blocks, which look kernel // 2 frames ahead each.
    # Held-out ratio to shaped noise, 12 min on one thread each, side by side: drums (the tuning
    # kit) 0.441 causal against 0.428 centred, General MIDI notes 0.272 against 0.282
    encoder_causal: bool = True
    # decoder (causal)
    # 128 wide: on the recorded drum kit (bench/train_quality.py, 15 min) widths 128, 192 and
    # 256 reach the same held-out quality, and 128 decodes a one-frame call in about half the
    # time of 256 (bench/decoder_speed.py), as a call's weights are read from memory each time
    decoder_dim: int = 128
    decoder_blocks: int = 4
    decoder_kernel: int = 5
    decoder_dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    decoder_mlp_ratio: int = 2
    input_kernel: int = 3
    # harmonic head: partials of one phase accumulator driven by the pitch input (MIDI note
    # units) and gated by voicing; 0 = no pitch input and no harmonic head (the first decoder)
    harmonics: int = 64
    # every partial fades out below this (Hz): the harmonic path's band edge
    harmonic_max_frequency: float = 20000.0
    # iSTFT head (the residual beside the harmonic head: noise, transients, chords, drums): its
    # band edge (Hz). 22 kHz, not 20: recorded hats, cymbals and bright attacks hold energy up to
    # the source's own Nyquist (22.05 kHz at 44.1 kHz), which a 20 kHz edge leaves out of every
    # reconstruction. Held-out ratio to shaped noise, 20 min, two runs side by side on one thread
    # each (bench/train_quality.py), 22 kHz against 20 kHz: VariBreaks 0.429 / 0.522, circAfrique
    # 0.335 / 0.358, General MIDI notes 0.274 / 0.287. Each low-passed at its own edge, VariBreaks
    # reads 0.437 / 0.443: the gain is the band itself, at no cost below it
    max_frequency: float = 22000.0
    band_taper_hz: float = 1000.0
    # phase = a running per-bin phase (advanced each frame by the bin's own frequency plus a
    # predicted deviation) + a predicted offset; off: the predicted offset alone (as in Vocos)
    phase_accumulation: bool = True
    noise_branch: bool = True
    noise_bands: int = 64
    # The head's outputs are multiplied by these (log magnitudes, phases): with Adam every weight
    # moves about lr per step, so a gain lets the level and the phases move several units in the
    # few thousand steps of a short run.
    magnitude_gain: float = 4.0
    phase_gain: float = 4.0
    # level of the untrained output (RMS), near a loudness-normalised set's
    initial_rms: float = 0.05
    noise_table_frames: int = 512
    max_frame_rms: float = 1.0
    # logvar clamp keeps exp() finite on any input
    logvar_min: float = -12.0
    logvar_max: float = 4.0

    def __post_init__(self) -> None:
        if not (self.magnitude_gain > 0 and self.phase_gain > 0 and self.initial_rms > 0):
            raise ValueError("model.magnitude_gain, model.phase_gain and model.initial_rms must be > 0")
        if int(self.harmonics) < 0:
            raise ValueError(f"model.harmonics must be >= 0, got {self.harmonics}")
        for name in ("sample_rate", "hop", "n_fft", "latent_size", "encoder_dim", "encoder_blocks",
                     "decoder_dim", "decoder_blocks", "decoder_mlp_ratio", "input_kernel",
                     "encoder_kernel", "decoder_kernel", "noise_bands", "noise_table_frames"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_fft % self.hop or self.n_fft < 2 * self.hop:
            raise ValueError(f"model.n_fft ({self.n_fft}) must be a multiple of model.hop ({self.hop}) "
                             "and at least twice it")
        if self.encoder_kernel % 2 == 0 and not self.encoder_causal:
            raise ValueError(f"model.encoder_kernel must be odd (centred), got {self.encoder_kernel}")
        if len(self.decoder_dilations) != self.decoder_blocks:
            raise ValueError(f"model.decoder_dilations has {len(self.decoder_dilations)} entries, "
                             f"model.decoder_blocks is {self.decoder_blocks}")
        if any(int(d) < 1 for d in self.decoder_dilations):
            raise ValueError(f"model.decoder_dilations must be >= 1, got {self.decoder_dilations}")
        for name in ("max_frequency", "harmonic_max_frequency"):
            edge = float(getattr(self, name))
            if not self.band_taper_hz < edge <= self.sample_rate / 2:
                raise ValueError(f"model.{name} ({edge:g} Hz) must lie above model.band_taper_hz "
                                 f"({self.band_taper_hz:g}) and at most at Nyquist ({self.sample_rate / 2:g})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict (e.g. a checkpoint's "model" section); unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**data)

    @property
    def conditioning(self) -> int:
        """Decoder inputs beside the latents: pitch and voicing with a harmonic head, none without."""
        return 2 if self.harmonics > 0 else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def latency_samples(self) -> int:
        """Samples from the start of a latent frame's output block until its synthesis window
        has fully played: a control change is completely heard after this long. The causal
        convolutions add none. This is the residual (iSTFT) path's; see `harmonic_latency_samples`."""
        return self.n_fft - self.hop

    @property
    def harmonic_latency_samples(self) -> int:
        """The harmonic path's latency: a frame's pitch and amplitudes are reached at the end of its
        own output block (one hop), gliding from the previous frame's across it."""
        return self.hop


class ChannelNorm(nn.Module):
    """LayerNorm over channels of `(batch, channels, time)`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class CausalDepthwiseConv(nn.Module):
    """Depthwise convolution over time, padded on the left only; the padding is the cache of the
    previous input frames. Works in `(batch, time, channels)` layout, the decoder's layout.

    forward(x `(batch, T, dim)`, cache `(batch, context, dim)`) -> (y `(batch, T, dim)`, new cache).
    A zero cache is the start of a signal; passing each call's new cache to the next call makes
    chunked processing equal one whole call.
    """

    def __init__(self, dim: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__()
        self.dim, self.kernel_size, self.dilation = dim, kernel_size, dilation
        self.context = (kernel_size - 1) * dilation
        self.weight = nn.Parameter(torch.randn(dim, kernel_size) / math.sqrt(kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim))

    def initial_state(self, batch: int) -> Tensor:
        return torch.zeros(batch, self.context, self.dim)

    def forward(self, x: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        full = torch.cat([cache, x], dim=1)
        if x.shape[1] > 16:
            # long inputs (training): the library convolution
            y = nn.functional.conv1d(full.transpose(1, 2), self.weight.unsqueeze(1), self.bias,
                                     dilation=self.dilation, groups=self.dim).transpose(1, 2)
        else:
            # a few frames (streaming): the explicit weighted sum of the taps, as the library
            # convolution's set-up costs far more than the arithmetic at this size
            taps = full.unfold(1, self.context + 1, 1)[..., :: self.dilation]  # (batch, T, dim, kernel)
            y = self.bias + (taps * self.weight).sum(-1)
        return y, full[:, full.shape[1] - self.context:]


class CausalInput(nn.Module):
    """Causal convolution from latents to the decoder's width, `(batch, T, latent)` ->
    `(batch, T, dim)`, with its cache of the previous `kernel_size - 1` latent frames."""

    def __init__(self, latent_size: int, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.latent_size, self.context = latent_size, kernel_size - 1
        self.proj = nn.Linear(kernel_size * latent_size, dim)

    def initial_state(self, batch: int) -> Tensor:
        return torch.zeros(batch, self.context, self.latent_size)

    def forward(self, z: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        full = torch.cat([cache, z], dim=1)
        taps = full.unfold(1, self.context + 1, 1)  # (batch, T, latent, kernel)
        y = self.proj(taps.reshape(taps.shape[0], taps.shape[1], -1))
        return y, full[:, full.shape[1] - self.context:]


class CausalBlock(nn.Module):
    """ConvNeXt block at the frame rate: causal depthwise conv, norm, pointwise MLP, scaled residual.

    forward(x `(batch, T, dim)`, cache) -> (`(batch, T, dim)`, new cache).
    """

    # a constant to TorchScript, so the branch on it is compiled away: `gamma_folded` says the
    # residual scale is multiplied into pw2 (see `Decoder.folded`)
    __constants__ = ["gamma_folded"]

    def __init__(self, dim: int, kernel_size: int, dilation: int, mlp_ratio: int) -> None:
        super().__init__()
        self.dwconv = CausalDepthwiseConv(dim, kernel_size, dilation)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, mlp_ratio * dim)
        # the tanh form: three times cheaper than erf for the one-frame calls of streaming
        self.act = nn.GELU(approximate="tanh")
        self.pw2 = nn.Linear(mlp_ratio * dim, dim)
        # small residual scale: a deep stack starts close to the identity and trains stably
        self.gamma = nn.Parameter(torch.full((dim,), 1.0 / 8))
        self.gamma_folded = False

    def fold_gamma(self) -> None:
        """Multiply the residual scale into pw2 (inference only: training needs gamma apart)."""
        fold_scale(self.pw2, self.gamma)
        self.gamma_folded = True

    def forward(self, x: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        h, cache = self.dwconv(x, cache)
        h = self.pw2(self.act(self.pw1(self.norm(h))))
        if not self.gamma_folded:
            h = self.gamma * h
        return x + h, cache


class EncoderBlock(nn.Module):
    """ConvNeXt block of the encoder, `(batch, dim, T)` -> same, whose depthwise convolution reads
    `ahead` frames past its own (`kernel // 2`: centred; 0: causal) and the rest before it."""

    def __init__(self, dim: int, kernel_size: int, ahead: int, mlp_ratio: int = 3) -> None:
        super().__init__()
        if not 0 <= ahead < kernel_size:
            raise ValueError(f"an encoder block of kernel {kernel_size} cannot look {ahead} frames ahead")
        self.dim, self.kernel_size, self.ahead = dim, kernel_size, ahead
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1.0 / 8))

    def forward(self, x: Tensor) -> Tensor:
        padded = nn.functional.pad(x, (self.kernel_size - 1 - self.ahead, self.ahead))
        return x + self._residual(self.dwconv(padded))

    def _residual(self, y: Tensor) -> Tensor:
        h = self.pw2(self.act(self.pw1(self.norm(y.transpose(1, 2)))))
        return (self.gamma * h).transpose(1, 2)

    def step(self, x: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        """Streaming: new frames `x` `(batch, dim, T)` after the cache of the `kernel - 1` frames
        before them (zeros at the start: the padding of `forward`) -> the T frames that end `ahead`
        frames before the newest (`(batch, dim, T)`) and the new cache. Chunked calls equal `forward`
        on the whole, delayed by `ahead` frames."""
        full = torch.cat([cache, x], -1)
        if x.shape[-1] > 16:
            y = nn.functional.conv1d(full, self.dwconv.weight, self.dwconv.bias, 1, 0, 1, self.dim)
        else:
            # a few frames (live input): the taps' weighted sum, as the library convolution's set-up
            # costs far more than the arithmetic at this size
            bias = self.dwconv.bias
            assert bias is not None
            taps = full.unfold(-1, self.kernel_size, 1)  # (batch, dim, T, kernel)
            y = (taps * self.dwconv.weight).sum(-1) + bias.unsqueeze(-1)
        own = self.kernel_size - 1 - self.ahead
        return full[..., own:own + x.shape[-1]] + self._residual(y), full[..., full.shape[-1] - (self.kernel_size - 1):]


class Encoder(nn.Module):
    """Audio -> posterior mean and log-variance per frame.

    forward(x `(batch, 1, samples)`) -> (mean, logvar), each `(batch, latent, samples // hop)`.
    Frame t sees the spectrum of x[t*hop : t*hop + n_fft] (the span the decoder synthesises for
    frame t) and, through its blocks' convolutions, frames before it (`encoder_causal`) or a few
    either side.
    """

    def __init__(self, cfg: ModelConfig, bins: int) -> None:
        super().__init__()
        self.n_fft, self.hop, self.bins = cfg.n_fft, cfg.hop, bins
        self.logvar_min, self.logvar_max = cfg.logvar_min, cfg.logvar_max
        self.register_buffer("window", spectral_ops.hann_window(cfg.n_fft), persistent=False)
        self.input = nn.Conv1d(bins, cfg.encoder_dim, 1)
        ahead = 0 if cfg.encoder_causal else cfg.encoder_kernel // 2
        self.blocks = nn.ModuleList(EncoderBlock(cfg.encoder_dim, cfg.encoder_kernel, ahead)
                                    for _ in range(cfg.encoder_blocks))
        self.norm = ChannelNorm(cfg.encoder_dim)
        self.output = nn.Conv1d(cfg.encoder_dim, 2 * cfg.latent_size, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.input(spectral_ops.log_magnitude(x, self.n_fft, self.hop, self.window, self.bins))
        for block in self.blocks:
            h = block(h)
        return self._posterior(h)

    def _posterior(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.output(self.norm(h)).chunk(2, dim=1)
        return mean, logvar.clamp(self.logvar_min, self.logvar_max)

    @property
    def lookahead_frames(self) -> int:
        """How many frames past frame t the encoder reads to give frame t: the analysis window's
        (n_fft / hop - 1) and each block's look-ahead. Streaming gives frame t this many frames
        after its own block arrived."""
        return self.n_fft // self.hop - 1 + sum(block.ahead for block in self.blocks)

    def initial_state(self, batch: int) -> list[Tensor]:
        """The start of a stream: the analysis window's earlier samples, each block's cache of
        earlier frames (zeros: `forward`'s padding) and the count of frames received."""
        state = [torch.zeros(batch, self.n_fft - self.hop)]
        state += [torch.zeros(batch, block.dim, block.kernel_size - 1) for block in self.blocks]
        state.append(torch.zeros(1, dtype=torch.long))
        return state

    def step(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Streaming: `x` `(batch, 1, samples)` continuing the stream of `state` -> mean, logvar
        `(batch, latent, samples // hop)` and the new state; samples past a whole frame are not
        used. Output k of the stream is `forward`'s frame k - lookahead_frames of the whole signal
        (the first lookahead_frames are those of the frames before the signal, where `forward` pads
        with zeros), so chunked calls equal one call and, shifted, `forward`."""
        frames = x.shape[-1] // self.hop
        audio = torch.cat([state[0], x.reshape(x.shape[0], -1)[:, :frames * self.hop]], -1)
        h = self.input(spectral_ops.frames_log_magnitude(audio.unfold(-1, self.n_fft, self.hop), self.window, self.bins))
        count = state[-1]
        # each layer's frames before the signal are its zero padding in `forward`
        index = count + torch.arange(frames, device=x.device) - (self.n_fft // self.hop - 1)
        h = h * (index >= 0).to(h.dtype)
        new_state = [audio[:, audio.shape[1] - (self.n_fft - self.hop):]]
        for i, block in enumerate(self.blocks):
            h, cache = block.step(h, state[i + 1])
            new_state.append(cache)
            index = index - block.ahead
            h = h * (index >= 0).to(h.dtype)
        mean, logvar = self._posterior(h)
        new_state.append(count + frames)
        return mean, logvar, new_state


class ISTFTHead(nn.Module):
    """Frame features -> audio by inverse FFT and causal overlap-add.

    Per frame and bin below the band limit, a deterministic part: a log magnitude and a phase.
    With `phase_accumulation` the phase is a running phase, advanced each frame by the bin's
    centre frequency plus a predicted deviation, plus a predicted offset: a steady partial keeps
    its phase from frame to frame (no frame-rate roughness) and a transient can still align the
    bins through the offset. Without it, the predicted offset alone. With `noise_branch`, a noise
    part: a smooth spectral envelope (mel-spaced bands) with phases from a fixed random table
    indexed by the frame count, so the output depends on the latents and the stream position only.

    forward(h `(batch, T, dim)`, phase `(batch, bins)`, tail `(batch, n_fft - hop)`,
    frame_index `(1,)` int64) -> (audio `(batch, T * hop)`, new phase, new tail).
    """

    # a constant to TorchScript: `gain_folded` says the output gains are multiplied into proj
    __constants__ = ["gain_folded"]

    def __init__(self, cfg: ModelConfig, dim: int) -> None:
        super().__init__()
        self.n_fft, self.hop = cfg.n_fft, cfg.hop
        self.max_frame_rms = cfg.max_frame_rms
        window = spectral_ops.squared_hann_window(cfg.n_fft)
        self.register_buffer("window", spectral_ops.synthesis_window(window, cfg.hop), persistent=False)
        mask = spectral_ops.band_limit_mask(cfg.n_fft, cfg.sample_rate, cfg.max_frequency, cfg.band_taper_hz)
        self.bins = mask.numel()
        self.register_buffer("mask", mask, persistent=False)
        self.accumulate = cfg.phase_accumulation
        # phase advance of each bin's centre frequency over one hop, wrapped to [0, 2 pi)
        advance = torch.remainder(2 * math.pi * torch.arange(self.bins, dtype=torch.float64) * cfg.hop / cfg.n_fft,
                                  2 * math.pi)
        self.register_buffer("bin_advance", advance.float(), persistent=False)
        self.noise_branch = cfg.noise_branch
        # the noise part is a smooth spectral envelope: a few mel-spaced bands, interpolated
        self.noise_bands = cfg.noise_bands if cfg.noise_branch else 0
        self.phase_parts = 2 if cfg.phase_accumulation else 1
        outputs = (1 + self.phase_parts) * self.bins + self.noise_bands
        self.proj = nn.Linear(dim, outputs)
        gain = torch.full((outputs,), cfg.magnitude_gain)
        gain[self.bins:(1 + self.phase_parts) * self.bins] = cfg.phase_gain
        self.register_buffer("output_gain", gain, persistent=False)
        self.gain_folded = False
        # `(bins, bands)`: a linear layer's weight, so the interpolation is one matrix product
        self.register_buffer("bin_from_band", spectral_ops.band_interpolation(
            max(self.noise_bands, 2), self.bins, cfg.n_fft, cfg.sample_rate).t().contiguous(), persistent=False)
        # Start at `initial_rms` with the noise part 20 dB above the deterministic one: an
        # untrained decoder gives a soft noise floor, not a comb of steady partials.
        with torch.no_grad():
            self.proj.weight.mul_(0.1 / gain.unsqueeze(1))
            self.proj.bias.zero_()
            level = math.log(cfg.initial_rms / math.sqrt(2 * self.bins))
            self.proj.bias[: self.bins] = (level - (math.log(10.0) if cfg.noise_branch else 0.0)) / cfg.magnitude_gain
            self.proj.bias[(1 + self.phase_parts) * self.bins:] = level / cfg.magnitude_gain
        generator = torch.Generator().manual_seed(0x5D)
        angles = torch.rand(cfg.noise_table_frames, self.bins, generator=generator) * (2 * math.pi)
        # unit phasors as (real, imaginary) pairs: a real buffer, which every backend and DDP
        # broadcasts, and no cosine or sine per frame. Stored twice over, so the rows of any call
        # of up to `noise_table_frames` frames are one slice.
        phasors = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        self.register_buffer("noise_phasor", torch.cat([phasors, phasors]), persistent=False)
        self.noise_table_frames = cfg.noise_table_frames

    def fold_output_gain(self) -> None:
        """Multiply the output gains into proj (inference only: training needs them apart)."""
        fold_scale(self.proj, self.output_gain)
        self.gain_folded = True

    def noise_phasors(self, frame_index: Tensor, frames: int) -> Tensor:
        """Complex unit noise phasors `(frames, bins)` of the frames from `frame_index` (`(1,)` int64) on."""
        start = int(frame_index) % self.noise_table_frames
        if frames <= self.noise_table_frames:
            return torch.view_as_complex(self.noise_phasor.narrow(0, start, frames))
        rows = torch.remainder(start + torch.arange(frames, device=frame_index.device), self.noise_table_frames)
        return torch.view_as_complex(self.noise_phasor[rows])

    def forward(self, h: Tensor, phase: Tensor, tail: Tensor, frame_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.proj(h)  # (batch, T, outputs)
        if not self.gain_folded:
            x = x * self.output_gain
        bins = self.bins
        # safeguard: exp of an unbounded log magnitude would overflow to inf (then NaN)
        mag = torch.exp(x[..., :bins].clamp(max=8.0)) * self.mask
        angle = x[..., bins:2 * bins]
        if self.accumulate:
            # wrapped once per call: the running phase stays small, so float32 keeps it exact
            running = torch.cumsum(x[..., 2 * bins:3 * bins] + self.bin_advance, dim=1) + phase.unsqueeze(1)
            running = torch.remainder(running, 2 * math.pi)
            phase = running[:, -1]
            angle = angle + running
        spec = torch.polar(mag, angle)
        if self.noise_branch:
            noise_log_mag = nn.functional.linear(x[..., (1 + self.phase_parts) * bins:], self.bin_from_band)
            noise_mag = torch.exp(noise_log_mag.clamp(max=8.0)) * self.mask
            spec = spec + noise_mag * self.noise_phasors(frame_index, x.shape[1])
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=-1, norm="forward")
        # safeguard: bound each frame's RMS, so any latent gives bounded audio
        norm = torch.linalg.vector_norm(frames, dim=-1, keepdim=True)
        frames = frames * (self.window * torch.clamp(self.max_frame_rms * math.sqrt(self.n_fft) / (norm + 1e-6), max=1.0))
        audio, tail = spectral_ops.overlap_add(frames, tail, self.hop)
        return audio, phase, tail


# the harmonic head's gate on voicing: shut up to the tracker's own voiced threshold (noise reads
# 0.1 .. 0.45; a partial left open there learns to whistle for bright noise), open from 0.8
VOICING_GATE = (0.5, 0.8)
# calls of more frames than this (batch x T) sum their partials by recurrence (training batches),
# shorter ones from a table of sines (streaming): the same sum, whichever is faster at the size
RECURRENCE_FRAMES = 256


class HarmonicHead(nn.Module):
    """Frame features, pitch and voicing -> the harmonic part of the output: `harmonics` partials
    of one phase accumulator, as in DDSP's harmonic synthesiser.

    Per frame, the trunk gives each partial's log amplitude (each at most 1, their sum at most 1,
    so the part is bounded whatever the network says); a gate on voicing multiplies them (shut
    below 0.5, open above 0.8, linear between), so an unvoiced or noisy frame leaves the output
    to the residual head. Within output block t, pitch (Hz, linearly) and the amplitudes (along a smoothstep, so
    a step in the network's output leaves no corner in an envelope) glide from frame t - 1's
    values to frame t's, reached at the block's last sample: the path adds one hop of latency.

    Band limit: every partial is faded by a smoothstep taper between `harmonic_max_frequency -
    band_taper_hz` and `harmonic_max_frequency`, taken at the block's highest pitch and glided
    like the amplitudes; a partial that reaches `harmonic_max_frequency` anywhere within a block
    is silent in all of it. So nothing at or above it is ever made and nothing can fold. Taken per
    sample instead, the taper would cost an operation more on every sample of every partial;
    the block's taper lets a fast glide spread a little more energy past 20 kHz than an ideal
    series does (30 Hz -> 4 kHz in 3 s with 64 partials at full level: -68 dB of the signal
    against -77 dB; tests/test_pitch.py).

    The running phase is accumulated in float64 and wrapped every sample, so streaming in
    chunks equals one call.

    forward(h `(batch, T, dim)`, pitch `(batch, T)` MIDI, voicing `(batch, T)`, amp `(batch, K)` (the
    partials' amplitudes, tapered, at the end of the previous block),
    f0 `(batch, 1)` (Hz; 0 = none yet), phase `(batch, 1)` float64) -> (audio `(batch, T * hop)`,
    new amp, new f0, new phase).
    """

    __constants__ = ["hop", "sample_rate", "harmonics", "gain", "top", "taper", "gate_low", "gate_scale",
                     "hz_at_0", "recurrence_frames", "gain_folded"]

    def __init__(self, cfg: ModelConfig, dim: int) -> None:
        super().__init__()
        self.hop, self.sample_rate, self.harmonics = cfg.hop, cfg.sample_rate, cfg.harmonics
        self.gain = float(cfg.magnitude_gain)
        self.top, self.taper = float(cfg.harmonic_max_frequency), max(float(cfg.band_taper_hz), 1.0)
        self.gate_low, self.gate_scale = VOICING_GATE[0], 1.0 / (VOICING_GATE[1] - VOICING_GATE[0])
        self.hz_at_0 = 440.0 * 2.0 ** (-69.0 / 12.0)  # MIDI note 0
        self.recurrence_frames = RECURRENCE_FRAMES
        self.gain_folded = False
        self.proj = nn.Linear(dim, cfg.harmonics)
        self.register_buffer("numbers", torch.arange(1, cfg.harmonics + 1, dtype=torch.float32), persistent=False)
        ramp = (torch.arange(cfg.hop, dtype=torch.float64) + 1.0) / cfg.hop
        self.register_buffer("ramp", ramp.float(), persistent=False)
        # amplitudes glide along a smoothstep, flat at both ends of the block: a step in the
        # network's output leaves no corner in a partial's envelope (a linear glide's corners
        # spread a 14 kHz partial's sidebands past 20 kHz at -84 dB)
        self.register_buffer("amp_ramp", (ramp * ramp * (3.0 - 2.0 * ramp)).float(), persistent=False)
        # start quiet (each partial 40 dB under the untrained residual's level): the untrained
        # decoder's output is the residual's soft noise floor, not a buzz
        with torch.no_grad():
            self.proj.weight.mul_(0.1 / self.gain)
            self.proj.bias.fill_(math.log(0.01 * cfg.initial_rms / math.sqrt(cfg.harmonics)) / self.gain)

    def fold_gain(self) -> None:
        """Multiply the output gain into proj (inference only: training needs it apart)."""
        fold_scale(self.proj, torch.full((self.harmonics,), self.gain))
        self.gain_folded = True

    def initial_state(self, batch: int) -> list[Tensor]:
        return [torch.zeros(batch, self.harmonics), torch.zeros(batch, 1),
                torch.zeros(batch, 1, dtype=torch.float64)]

    def forward(self, h: Tensor, pitch: Tensor, voicing: Tensor, amp_state: Tensor, f0_state: Tensor,
                phase_state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, frames = h.shape[0], h.shape[1]
        x = self.proj(h)
        if not self.gain_folded:
            x = x * self.gain
        # safeguard: each partial at most 1 and their sum at most 1, so the part's peak is at most 1
        amp = torch.exp(x.clamp(max=0.0))
        # the voicing gate (see VOICING_GATE): a note reads 0.9 and more
        gate = ((voicing - self.gate_low) * self.gate_scale).clamp(0.0, 1.0)
        amp = amp * (gate / amp.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        f0 = torch.exp2(pitch.clamp(0.0, 127.0) * (1.0 / 12.0)) * self.hz_at_0  # (batch, T) Hz
        start = torch.where(f0_state > 0, f0_state, f0[:, :1])
        f_prev = torch.cat([start, f0[:, :-1]], 1)
        freq = f_prev.unsqueeze(-1) + (f0 - f_prev).unsqueeze(-1) * self.ramp  # (batch, T, hop) Hz
        # the running phase in float64, wrapped every sample: chunked calls equal one call
        phase = torch.cumsum(freq.reshape(batch, -1).double() * (2.0 * math.pi / self.sample_rate), 1) + phase_state
        phase = torch.remainder(phase, 2.0 * math.pi)
        highest = torch.maximum(f_prev, f0).unsqueeze(-1) * self.numbers  # (batch, T, K): each partial's top
        if float(highest.max()) > self.top - self.taper:
            # each partial's taper, a smoothstep from 1 at `top - taper` to 0 at `top`, taken at the
            # highest pitch of each block and glided with the amplitudes, so a glide toward the limit
            # fades it smoothly; a partial that reaches the limit anywhere within a block is silent
            # in all of it, so nothing at or above `top` is ever made and nothing can fold
            room = ((self.top - highest) * (1.0 / self.taper)).clamp(0.0, 1.0)
            a_next = amp * (room * room * (3.0 - 2.0 * room))
            # each block starts where the previous one ended
            a_prev = torch.cat([amp_state.unsqueeze(1), a_next[:, :-1]], 1) * (room > 0.0)
        else:
            a_next = amp
            a_prev = torch.cat([amp_state.unsqueeze(1), amp[:, :-1]], 1)
        angle = phase.float().reshape(batch, frames, self.hop)
        if batch * frames > self.recurrence_frames:
            audio = self._sum_by_recurrence(angle, a_prev, a_next)
        else:
            audio = self._sum_by_basis(angle, a_prev, a_next)
        return audio.reshape(batch, frames * self.hop), a_next[:, -1], f0[:, -1:], phase[:, -1:]

    def partials_sounding(self, a_prev: Tensor, a_next: Tensor) -> int:
        """The highest partial (1..K) with an amplitude above zero anywhere in `a_prev` and `a_next`
        `(batch, T, K)`, or 0: the band limit silences the upper partials of a high note (a C6
        keeps 19 of 64), the voicing gate every partial of an unvoiced frame (a drum hit)."""
        return int(torch.amax((a_prev + a_next > 0.0) * self.numbers))

    def _sum_by_basis(self, angle: Tensor, a_prev: Tensor, a_next: Tensor) -> Tensor:
        """Σ_k amp_k(n) sin(k angle(n)) from a `(batch, T, hop, K)` table of the sines: for short calls
        (streaming), where a few large operations beat many small ones. Each sample's amplitudes
        are formed and multiplied in elementwise: four times faster than the same sum as batched
        matrix-vector products, which the library runs one frame at a time.

        The table stops at the highest partial that sounds anywhere in the call (`partials_sounding`):
        a silent partial's terms are all zero, so leaving it out changes the sum by rounding alone."""
        count = self.partials_sounding(a_prev, a_next)
        if count == 0:
            audio = torch.zeros_like(angle)
        else:
            first = a_prev[..., :count]
            with torch.no_grad():
                basis = torch.sin(angle.unsqueeze(-1) * self.numbers[:count])
            amps = first.unsqueeze(2) + self.amp_ramp.unsqueeze(-1) * (a_next[..., :count] - first).unsqueeze(2)
            audio = (basis * amps).sum(-1)
        return audio

    def _sum_by_recurrence(self, angle: Tensor, a_prev: Tensor, a_next: Tensor) -> Tensor:
        """The same sum for long calls (training): sin(k a) = 2 cos(a) sin((k-1) a) - sin((k-2) a)
        gives each partial from the two before it, with no table and one sine and one cosine in
        all (3x faster than the table, forward and backward, on a training batch). Its rounding
        grows with k: at most 1e-4 of full scale at the 64th partial."""
        twice_cos = 2.0 * torch.cos(angle)
        before = torch.zeros_like(angle)
        sine = torch.sin(angle)
        change = a_next - a_prev
        audio = sine * (a_prev[..., 0:1] + change[..., 0:1] * self.amp_ramp)
        for k in range(1, self.harmonics):
            before, sine = sine, twice_cos * sine - before
            audio = audio + sine * (a_prev[..., k:k + 1] + change[..., k:k + 1] * self.amp_ramp)
        return audio


class Decoder(nn.Module):
    """Causal decoder: latents `(batch, latent, T)` (and, with a harmonic head, pitch and voicing
    `(batch, 2, T)`) -> audio `(batch, 1, T * hop)`.

    Output block t (samples t*hop .. (t+1)*hop) depends on frames <= t only. The trunk sees the
    latents and, normalised, the pitch and voicing; its features drive the iSTFT head (the
    residual) and the harmonic head, whose outputs add. `step` takes and returns the full
    streaming state (see `initial_state`).
    """

    __constants__ = ["harmonic_path"]

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hop, self.n_fft = cfg.hop, cfg.n_fft
        self.conditioning = cfg.conditioning
        self.harmonic_path = cfg.harmonics > 0
        dim = cfg.decoder_dim
        self.input = CausalInput(cfg.latent_size + cfg.conditioning, dim, cfg.input_kernel)
        self.blocks = nn.ModuleList(CausalBlock(dim, cfg.decoder_kernel, int(d), cfg.decoder_mlp_ratio)
                                    for d in cfg.decoder_dilations)
        self.norm = nn.LayerNorm(dim)
        self.head = ISTFTHead(cfg, dim)
        self.harmonic = HarmonicHead(cfg, dim) if self.harmonic_path else nn.Identity()

    @property
    def receptive_frames(self) -> int:
        """Latent frames before the current one that still shape its output block."""
        return self.input.context + sum(b.dwconv.context for b in self.blocks) + self.n_fft // self.hop - 1

    def initial_state(self, batch: int) -> list[Tensor]:
        """Zero state for `batch` streams: the conv caches, the harmonic head's amplitudes, pitch
        and phase (with one), the running phase, the overlap-add tail, the frame count."""
        state = [self.input.initial_state(batch)]
        state += [block.dwconv.initial_state(batch) for block in self.blocks]
        if self.harmonic_path:
            state += self.harmonic.initial_state(batch)
        state.append(torch.zeros(batch, self.head.bins))
        state.append(torch.zeros(batch, self.n_fft - self.hop))
        state.append(torch.zeros(1, dtype=torch.long))
        return state

    def folded(self) -> "Decoder":
        """A copy for inference with the training-time scales (residual and output gains)
        multiplied into the weights: the same output, with fewer operations per streaming call.
        The copy is not for training: its optimiser dynamics would differ."""
        decoder = copy.deepcopy(self)
        for block in decoder.blocks:
            block.fold_gamma()
        decoder.head.fold_output_gain()
        if decoder.harmonic_path:
            decoder.harmonic.fold_gain()
        return decoder

    def step(self, z: Tensor, state: list[Tensor], condition: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Decode `z` `(batch, latent, T)` with `condition` `(batch, conditioning, T)` (pitch and
        voicing; `(batch, 0, T)` without a harmonic head) continuing from `state`; returns audio
        `(batch, 1, T * hop)` and the state after it."""
        return self.step_frames(z.transpose(1, 2), state, condition.transpose(1, 2))

    def step_frames(self, z: Tensor, state: list[Tensor], condition: Tensor) -> tuple[Tensor, list[Tensor]]:
        """`step` for inputs laid out `(batch, T, channels)`, the decoder's own layout."""
        if self.harmonic_path:
            pitch, voicing = condition[..., 0], condition[..., 1]
            # the trunk sees pitch as octaves around middle C: inputs of order one
            trunk_in = torch.cat([z, ((pitch - 60.0) / 12.0).unsqueeze(-1), voicing.unsqueeze(-1)], -1)
        else:
            pitch, voicing = condition, condition
            trunk_in = z
        h, cache = self.input(trunk_in, state[0])
        new_state = [cache]
        for i, block in enumerate(self.blocks):
            h, cache = block(h, state[i + 1])
            new_state.append(cache)
        h = self.norm(h)
        frame_index = state[-1]
        audio, phase, tail = self.head(h, state[-3], state[-2], frame_index)
        if self.harmonic_path:
            first = len(self.blocks) + 1
            harmonic, amp, f0, accumulator = self.harmonic(h, pitch, voicing, state[first], state[first + 1],
                                                           state[first + 2])
            audio = audio + harmonic
            new_state += [amp, f0, accumulator]
        new_state.append(phase)
        new_state.append(tail)
        new_state.append(frame_index + z.shape[1])
        return audio.unsqueeze(1), new_state

    def forward(self, z: Tensor, condition: Tensor, frame_index: int = 0) -> Tensor:
        """Decode from silence (zero state): `(batch, latent, T)` with `(batch, conditioning, T)`
        -> `(batch, 1, T * hop)`. `frame_index` offsets the noise table (training varies it;
        streaming starts at 0)."""
        state = [s.to(z.device) for s in self.initial_state(z.shape[0])]
        state[-1] = state[-1] + frame_index
        return self.step(z, state, condition)[0]


class VAE(nn.Module):
    """Causal VAE. encode: audio -> (mean, logvar); decode: latents (+ pitch and voicing) -> audio.

    With a harmonic head, pitch and voicing are inputs of the decoder, not latents: `condition`
    computes them from audio with the one pitch tracker (training.pitch), and `decode` without
    them holds `default_condition` (the training set's typical pitch and voicing), which is what
    the control analysis sweeps the latents at.

    `latency_samples` is the decoder's algorithmic latency. In training mode `decode` starts the
    noise table at a random frame, so no fixed noise pattern can be learned; in eval mode at 0.
    The first `warmup_samples` of a decode from zero state lack the overlap of earlier frames:
    losses should skip them (crop inputs with that much extra audio, or zeros, in front).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg)
        self.encoder = Encoder(cfg, self.decoder.head.bins)
        self.tracker = PitchTracker(cfg.sample_rate, cfg.hop) if cfg.harmonics > 0 else None
        if cfg.harmonics > 0:
            self.register_buffer("default_condition", torch.tensor([REST_PITCH, 1.0]))
        self.latency_samples = cfg.latency_samples
        self.warmup_samples = cfg.n_fft - cfg.hop
        self.hop = cfg.hop

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(batch, 1, samples)` -> mean, logvar (log-variance), each `(batch, latent, samples // hop)`."""
        return self.encoder(x)

    def condition(self, x: Tensor) -> Tensor:
        """Pitch (MIDI note units) and voicing of `x` `(batch, 1, samples)`: `(batch, 2, samples // hop)`;
        `(batch, 0, frames)` for a decoder without a pitch input."""
        if self.tracker is None:
            return x.new_zeros(x.shape[0], 0, x.shape[-1] // self.hop)
        return self.tracker(x).to(x.dtype)

    def held_condition(self, z: Tensor) -> Tensor:
        """`default_condition` for every frame of `z` `(batch, latent, T)`: `(batch, conditioning, T)`."""
        if self.tracker is None:
            return z.new_zeros(z.shape[0], 0, z.shape[2])
        return self.default_condition.view(1, -1, 1).expand(z.shape[0], -1, z.shape[2]).to(z.dtype)

    def decode(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """`(batch, latent, T)` (+ `(batch, conditioning, T)`, default: held) -> `(batch, 1, T * hop)`,
        causal, from zero state."""
        offset = 0
        if self.training:
            offset = int(torch.randint(0, self.decoder.head.noise_table_frames, (1,)))
        return self.decoder(z, self.held_condition(z) if condition is None else condition, offset)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`(batch, 1, samples)` -> (y `(batch, 1, frames * hop)`, mean, logvar). The decoder's
        pitch and voicing are `condition` when given, else tracked from `x`.
        In training mode z is sampled (reparameterised); in eval mode z is the mean."""
        mean, logvar = self.encode(x)
        z = mean
        if self.training:
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        return self.decode(z, self.condition(x) if condition is None else condition), mean, logvar


def fold_scale(linear: nn.Linear, scale: Tensor) -> None:
    """Multiply `scale` `(out_features,)` into `linear`'s weight and bias, in place: `linear(x) * scale`
    becomes `linear(x)`."""
    with torch.no_grad():
        linear.weight.mul_(scale.unsqueeze(1))
        linear.bias.mul_(scale)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
