"""Training configuration: TOML files read into dataclasses, validated on load.

Every section is a dataclass whose defaults are the product's defaults (tuned for a
20-minute run on a 2-core CPU). A TOML file only names what it changes; an unknown key or a
value of the wrong type is an error naming the key (`optim.lr: expected float, got 'fast'`).
The resolved config (every value, defaults included) is written to the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from training.checkpoint import atomic_write_bytes
from training.model import ModelConfig


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    """How training examples are cut from the prepared files."""

    crop_frames: int = 64           # latent frames per training crop (x hop samples)
    batch_size: int = 8
    # sampling weight of a file ~ duration ** file_weight_power (0 = every file equally often,
    # 1 = every second equally often); between the two, short hits are not drowned by long takes
    file_weight_power: float = 0.5


@dataclass
class GainAugment:
    enabled: bool = True
    probability: float = 0.5
    min_db: float = -6.0
    max_db: float = 6.0


@dataclass
class PitchAugment:
    """Resampling by up to `max_semitones` (pitch and speed move together, like a varispeed)."""

    enabled: bool = False
    probability: float = 0.3
    max_semitones: float = 1.0


@dataclass
class StretchAugment:
    """Time stretch without pitch change (phase vocoder), rate in [min_rate, max_rate]."""

    enabled: bool = False
    probability: float = 0.3
    min_rate: float = 0.9
    max_rate: float = 1.1


@dataclass
class NoiseAugment:
    """White noise added to the encoder's input only, at a signal-to-noise ratio in the range."""

    enabled: bool = False
    probability: float = 0.3
    min_snr_db: float = 30.0
    max_snr_db: float = 50.0


@dataclass
class EqTiltAugment:
    """Spectral tilt around 1 kHz, up to `max_db_per_octave` either way. Drums held out
    (bench/train_quality.py, 15 min on one thread): 0.454 against 0.464 without."""

    enabled: bool = True
    probability: float = 0.3
    max_db_per_octave: float = 1.5


@dataclass
class MixAugment:
    """A second training crop, from a file drawn the same way, added at a gain in [min_db, max_db]:
    layered hits, sounds the set does not hold, so that the model must generalise rather than
    recall. Off by default. Held out (bench/train_quality.py, 20 min on 2 cores) it helps on the
    kit the defaults were tuned on (ElectricEmpireKit: 0.443 against 0.458 without) and not on one
    they were not (circAfrique, one thread, 15 min: 0.346 against 0.349), while a model trained on
    mixtures ties brightness to noisiness, so the analysis names fewer controls (make demo: loudness
    only, against loudness and brightness without; tiny demo model, seeds 0-3: brightness named
    in 1 of 4 runs with mix, 3 of 4 without). Turn it on for reconstruction alone."""

    enabled: bool = False
    probability: float = 0.5
    min_db: float = -12.0
    max_db: float = 0.0


@dataclass
class PolarityAugment:
    enabled: bool = True
    probability: float = 0.5


@dataclass
class AugmentConfig:
    gain: GainAugment = field(default_factory=GainAugment)
    pitch: PitchAugment = field(default_factory=PitchAugment)
    stretch: StretchAugment = field(default_factory=StretchAugment)
    noise: NoiseAugment = field(default_factory=NoiseAugment)
    eq_tilt: EqTiltAugment = field(default_factory=EqTiltAugment)
    polarity: PolarityAugment = field(default_factory=PolarityAugment)
    mix: MixAugment = field(default_factory=MixAugment)


@dataclass
class LossConfig:
    stft_fft_sizes: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024, 2048, 4096])
    mel_fft_sizes: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    n_mels: int = 64
    spectral_convergence_weight: float = 1.0
    log_magnitude_weight: float = 1.0
    mel_weight: float = 1.0


@dataclass
class KLConfig:
    # target weight of the KL term. 0.002: on recorded sets (bench/train_quality.py, side by side)
    # it reconstructs held-out files better than 0.01 in the same time (drums 0.458 vs 0.466 at
    # 15 min, GM notes 0.318 vs 0.334 at 10 min); free bits keep every dimension in use
    beta: float = 0.002
    beta_start: float = 1e-6
    warmup: float = 0.3             # fraction of the run over which beta ramps (log scale)
    free_bits: float = 0.05         # nats per frame and dimension
    collapse_threshold: float = 0.01  # nats per frame: a dimension below carries nothing


@dataclass
class RegularizeConfig:
    """Attribute-regularised latents: the k-th named attribute (training.descriptors) orders
    latent dimension k, so that dimension becomes a control for it. Off when the list is empty."""

    attributes: list[str] = field(default_factory=list)
    weight: float = 1.0
    delta: float = 10.0   # sharpness of the pairwise ordering term


@dataclass
class AdversarialConfig:
    """GAN stage after reconstruction has converged; 'auto' = on with CUDA, off elsewhere."""

    enabled: Literal["auto", "on", "off"] = "auto"
    start: float = 0.5              # fraction of the run before the discriminators join
    loss: Literal["hinge", "least_squares"] = "hinge"
    periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    fft_sizes: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    channels: int = 16
    normalization: Literal["weight", "spectral"] = "weight"
    adversarial_weight: float = 0.1
    feature_matching_weight: float = 2.0
    lr: float = 1e-4
    # the generator's adversarial loss is scaled down whenever it exceeds this multiple of
    # the reconstruction loss, so a strong discriminator cannot wreck what was learned
    max_loss_ratio: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.8, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 200
    final_lr_ratio: float = 0.05    # cosine decay to lr * this at the end of the run
    grad_clip: float = 5.0
    # a step whose gradient is not finite (NaN or inf: the loss blew up) is skipped, not applied,
    # so no NaN reaches the weights; this many such steps in a row stop the run as diverged
    nonfinite_patience: int = 10
    # weights used for validation, best.pt and export: an exponential moving average of the
    # trained weights with this decay per step (0 = the trained weights themselves). 0.995 (about
    # the last 200 steps): held-out drums 0.452 against 0.458 without, in 15 min on one thread
    ema_decay: float = 0.995
    amp: bool = True                # mixed precision, used on CUDA only
    threads: int = 0                # torch threads on CPU; 0 = all cores


@dataclass
class ValidationConfig:
    every_steps: int = 250
    log_every_steps: int = 25
    crop_frames: int = 188          # ~1 s at hop 256
    max_seconds: float = 20.0       # validation audio per check, spread over the held-out files
    overfit_patience: int = 3       # consecutive validation rises while training falls


@dataclass
class IncrementalConfig:
    """How a run started `--from` an earlier run learns the files added since without forgetting
    the old ones (training.incremental). Old files are always replayed, every file drawn by its
    plain weight (`data.file_weight_power`). The three settings below are off by default, because
    bench/incremental.py (10 min on a drum kit, then 5 min `--from` with another kit added, one
    thread) found none of them helping against that replay (held-out distance, old and new part):
    replay alone 1.565 and 1.672; added files drawn 3x at first 1.577 and 1.669, with 6 files added
    rather than 22 1.588 and 1.783 against replay's 1.563 and 1.746; halved learning rate 1.585 and
    1.709; anchor 20 1.590 and 1.774 (the old model: 1.579 and 2.125; 15 min from scratch on
    everything: 1.603 and 1.611; 5 min fine-tuned on the new kit alone: 1.927 and 1.617)."""

    # each added file's draw weight is multiplied by this at the start, falling linearly to 1 over
    # the first `new_focus` of the run (1 = the plain weights throughout)
    new_boost: float = 1.0
    new_focus: float = 0.5
    lr_scale: float = 1.0           # the schedule's learning rate times this
    # pull toward the old run's weights, decoupled from the loss like AdamW's weight decay: each
    # step moves every weight by lr * anchor of its distance to the old one (0 = off)
    anchor: float = 0.0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against annotation `tp`, converted where lossless (int -> float, list ->
    tuple); a ConfigError naming `key` otherwise."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in typing.get_args(tp))}, "
                          f"got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        item = typing.get_args(tp)[0]
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # the section's own checks (__post_init__)
        message = str(exc)
        raise ConfigError(message if message.startswith(prefix) else f"{prefix.rstrip('.') or 'config'}: {message}") from exc


def _check(cfg: TrainConfig) -> None:
    """Cross-field checks the types alone cannot express."""
    positive = {"data.crop_frames": cfg.data.crop_frames, "data.batch_size": cfg.data.batch_size,
                "optim.lr": cfg.optim.lr, "validation.every_steps": cfg.validation.every_steps,
                "validation.log_every_steps": cfg.validation.log_every_steps,
                "validation.crop_frames": cfg.validation.crop_frames,
                "validation.max_seconds": cfg.validation.max_seconds, "kl.beta": cfg.kl.beta,
                "kl.beta_start": cfg.kl.beta_start, "optim.nonfinite_patience": cfg.optim.nonfinite_patience}
    for key, value in positive.items():
        if not 0 < value < math.inf:  # TOML spells nan and inf too
            raise ConfigError(f"{key}: must be > 0 and finite, got {value}")
    if not 0 <= cfg.optim.grad_clip < math.inf:
        raise ConfigError(f"optim.grad_clip: must be >= 0 (0: no clipping) and finite, got {cfg.optim.grad_clip}")
    for key, value in {"kl.warmup": cfg.kl.warmup, "adversarial.start": cfg.adversarial.start,
                       "optim.final_lr_ratio": cfg.optim.final_lr_ratio}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: must be between 0 and 1, got {value}")
    # a finite boost: the added files never take the whole batch, old files are always replayed
    if not 1.0 <= cfg.incremental.new_boost <= 100.0:
        raise ConfigError(f"incremental.new_boost: must be between 1 and 100, got {cfg.incremental.new_boost}")
    if not 0.0 <= cfg.incremental.new_focus <= 1.0:
        raise ConfigError(f"incremental.new_focus: must be between 0 and 1, got {cfg.incremental.new_focus}")
    if cfg.incremental.lr_scale <= 0:
        raise ConfigError(f"incremental.lr_scale: must be > 0, got {cfg.incremental.lr_scale}")
    # a step may move a weight at most all the way back to the old one, never past it
    pull = cfg.optim.lr * cfg.incremental.lr_scale * cfg.incremental.anchor
    if not 0.0 <= pull < 1.0:
        raise ConfigError(f"incremental.anchor: must be >= 0 and below 1 / (optim.lr * incremental.lr_scale) "
                          f"= {1 / (cfg.optim.lr * cfg.incremental.lr_scale):g}, got {cfg.incremental.anchor}")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay: must be at least 0 and below 1, got {cfg.optim.ema_decay}")
    for name in (f.name for f in dataclasses.fields(cfg.augment)):
        p = getattr(cfg.augment, name).probability
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"augment.{name}.probability: must be between 0 and 1, got {p}")
    for key, sizes in {"loss.stft_fft_sizes": cfg.loss.stft_fft_sizes,
                       "loss.mel_fft_sizes": cfg.loss.mel_fft_sizes,
                       "adversarial.fft_sizes": cfg.adversarial.fft_sizes}.items():
        for n in sizes:
            if n < 16 or n & (n - 1):
                raise ConfigError(f"{key}: FFT size {n} is not a power of two >= 16")
    from training.descriptors import DESCRIPTOR_NAMES
    for i, name in enumerate(cfg.regularize.attributes):
        if name not in DESCRIPTOR_NAMES or cfg.regularize.attributes.index(name) != i:
            raise ConfigError(f"regularize.attributes[{i}]: {name!r} is not one of {', '.join(DESCRIPTOR_NAMES)} "
                              "or is listed twice")
    if len(cfg.regularize.attributes) > cfg.model.latent_size:
        raise ConfigError(f"regularize.attributes: {len(cfg.regularize.attributes)} attributes for "
                          f"{cfg.model.latent_size} latent dimensions")
    if not cfg.loss.stft_fft_sizes and not cfg.loss.mel_fft_sizes:
        raise ConfigError("loss.stft_fft_sizes: no reconstruction loss left (mel_fft_sizes is empty too)")
    if not 0.5 <= cfg.augment.stretch.min_rate <= cfg.augment.stretch.max_rate <= 2.0:
        raise ConfigError("augment.stretch.min_rate: need 0.5 <= min_rate <= max_rate <= 2")
    for name in ("gain", "mix"):
        if getattr(cfg.augment, name).min_db > getattr(cfg.augment, name).max_db:
            raise ConfigError(f"augment.{name}.min_db: greater than augment.{name}.max_db")
    if cfg.augment.noise.min_snr_db > cfg.augment.noise.max_snr_db:
        raise ConfigError("augment.noise.min_snr_db: greater than augment.noise.max_snr_db")


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """A validated TrainConfig from a (possibly partial) nested dict; errors name `source` and the key."""
    try:
        cfg = _build(TrainConfig, values)
        _check(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def checkpoint_config(values: dict[str, Any], source: str) -> TrainConfig:
    """The config a checkpoint holds. One written before the harmonic head existed names no
    `model.harmonics`: its decoder had none, which is 0, not today's default; one written before
    causal encoders names no `model.encoder_causal`: its encoder's blocks were centred."""
    model = {"harmonics": 0, "encoder_causal": False, **values.get("model", {})}
    return config_from_dict({**values, "model": model}, source)


def read_overrides(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The values a TOML config file names, as a nested dict (nothing filled in or checked yet)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str | os.PathLike[str] | None) -> TrainConfig:
    """The defaults overridden by the TOML file at `path` (None: the defaults alone)."""
    if path is None:
        return config_from_dict({})
    return config_from_dict(read_overrides(path), str(path))


def overlay(base: TrainConfig, path: str | os.PathLike[str] | None) -> TrainConfig:
    """`base` with the values the TOML file at `path` names in place of its own (None: `base`),
    validated like any config; what the file does not name keeps `base`'s value, not the default."""
    if path is None:
        return base

    def merge(into: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        out = dict(into)
        for key, value in values.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    return config_from_dict(merge(config_to_dict(base), read_overrides(path)), str(path))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) of every value: what checkpoints and config.toml hold."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as TOML, atomically."""
    atomic_write_bytes(path, tomli_w.dumps(config_to_dict(cfg)).encode())
