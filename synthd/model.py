"""Loading and validating nn~-convention model files (ours and RAVE-like exports).

`load_model` opens a TorchScript file, reads its description (our `metadata()` JSON, or the
nn~ buffers alone for a RAVE-like file), and probes `decode` once before anything plays:
a file that would fail on stage fails here, with a `ModelError` that names the file and
what is wrong. Loading never touches a model that is already playing, so the caller keeps
the old one when a new one is refused.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# nn~ files carry no range for their latents; RAVE's prior keeps them within a few units.
FALLBACK_RANGE = 3.0
# RAVE exports record their rate in an `sr` attribute; nn~ itself assumes 48 kHz.
FALLBACK_SAMPLE_RATE = 48000
LABEL_PATTERN = re.compile(r"^[a-z0-9_]+$")
PROBE_FRAMES = 4
# latent frames decoded (and not played) to wash a bad block out of the streaming state of a file
# without `reset()`: more than the receptive field of the causal decoders we know of
RECOVERY_FRAMES = 64


class ModelError(Exception):
    """A model file that cannot be played; the message names the file and the fault."""


def reason(exc: BaseException) -> str:
    """One line saying why a model file's code failed: TorchScript puts its own heading and a
    traceback before the error the file raised, which comes last."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if lines[0].startswith("The following operation failed in the TorchScript") else lines[0]


@dataclass(frozen=True)
class ControlInfo:
    """One latent dimension as a control: `index` is its input channel of `decode`."""

    index: int
    label: str
    minimum: float
    maximum: float
    default: float
    source: str  # "metadata:<source>" for our files, "fallback" for RAVE-like ones
    attribute: str | None = None
    unit: str | None = None  # "midi": model units are MIDI note numbers (a pitch input)


@dataclass
class Model:
    """A loaded, probed model. `metadata` is {} for files without one (RAVE-like)."""

    path: Path
    name: str
    module: torch.jit.ScriptModule
    sample_rate: int
    hop: int
    latent_size: int
    channels: int
    latency_samples: int
    controls: list[ControlInfo]
    metadata: dict[str, Any] = field(default_factory=dict)
    # the file's bytes as loaded: a file without `reset()` (a RAVE export) is reset by reloading them
    source: bytes = field(default=b"", repr=False)
    # the file's `restart(rows)` starts single voices afresh (ours since voices; found by the probe)
    restartable: bool = False
    # the file's `decode_rows(u, rows)` decodes some voices and leaves the others' streams as they
    # are, so silent voices cost nothing (ours since it; found by the probe)
    decodes_rows: bool = False

    @property
    def encode_lag_samples(self) -> int | None:
        """Samples by which `encode`'s frames lag its input (our files' `latency.encode_samples`);
        None when the file does not say (a RAVE export, or a synthd file from before `encode`
        streamed)."""
        value = (self.metadata.get("latency") or {}).get("encode_samples")
        return int(value) if isinstance(value, int) and value >= 0 else None

    def check_encode(self) -> None:
        """Refuse (ModelError) a model that cannot take audio input: it must have an `encode` that
        turns one frame of audio `(1, channels, hop)` into `(1, latent_size, 1)` finite values. The
        streaming state is reset after the probe."""
        params = getattr(self.module, "encode_params", None)
        if not hasattr(self.module, "encode") or params is None:
            raise ModelError(f"{self.path}: the model has no `encode` method: it cannot take audio input")
        in_channels, in_ratio, out_channels, out_ratio = (int(v) for v in params.tolist())
        if out_channels != self.latent_size or out_ratio // max(in_ratio, 1) != self.hop:
            raise ModelError(f"{self.path}: encode_params {[in_channels, in_ratio, out_channels, out_ratio]} "
                             f"do not give decode's {self.latent_size} inputs every {self.hop} samples")
        try:
            with torch.inference_mode():
                out = self.module.encode(torch.zeros(1, in_channels, 2 * self.hop))
        except Exception as exc:
            raise ModelError(f"{self.path}: encode fails on two frames of silence: {reason(exc)}") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, self.latent_size, 2):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"{self.path}: encode returned {got} for two frames, expected {(1, self.latent_size, 2)}")
        if not torch.isfinite(out).all():
            raise ModelError(f"{self.path}: encode returned NaN or Inf on silence")
        _reset(self)

    @property
    def encode_channels(self) -> int:
        """Audio channels `encode` takes (1 for ours)."""
        return int(self.module.encode_params[0])

    @property
    def resettable(self) -> bool:
        """Whether the file has its own `reset()`."""
        return hasattr(self.module, "reset")

    def reset(self) -> None:
        """Fresh streaming state: the file's `reset()`, or, for a file without one, the module
        loaded anew from the file's bytes (milliseconds to a second: never on the render thread)."""
        if self.resettable:
            self.module.reset()
        else:
            self.module = _load_torchscript(self.path, self.source)

    def restart(self, rows: np.ndarray) -> None:
        """Start the decode streams of the voices where `rows` `(voices,)` is true afresh on the next
        `decode` (the file's `restart`; only when `restartable`)."""
        with torch.inference_mode():
            self.module.restart(torch.from_numpy(np.ascontiguousarray(rows, dtype=bool)))

    def decode_rows(self, z: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """Decode the voices `rows` `(n,)` (ascending indices) of `z` `(voices, latent_size, frames)`
        -> `(n, channels, frames * hop)`, continuing their streams and leaving the other voices'
        streams as they were (the file's `decode_rows`; only when `decodes_rows`)."""
        with torch.inference_mode():
            return self.module.decode_rows(torch.from_numpy(z), torch.from_numpy(rows.astype(np.int64, copy=False)))

    def control(self, label: str) -> ControlInfo:
        """The control called `label`; KeyError when the model has none."""
        for c in self.controls:
            if c.label == label:
                return c
        raise KeyError(label)

    def defaults(self) -> list[float]:
        """Default latent values in model units, in decode's channel order."""
        return [c.default for c in self.controls]


def load_model(path: str | Path) -> Model:
    """Load, validate and probe the model at `path`.

    Promises: the returned model's `decode` turns `(1, latent_size, T)` into
    `(1, channels, T * hop)` finite samples, its streaming state is reset, and every field
    of `Model` is filled (from metadata, or from fallbacks for RAVE-like files). Raises
    ModelError otherwise, naming the file and the fault.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model file ({exc.strerror})") from None
    module = _load_torchscript(path, source)
    latent_size, hop, channels = _decode_shape(path, module)
    raw_meta = _read_metadata(path, module)
    if raw_meta:
        model = _from_metadata(path, module, raw_meta, latent_size, hop, channels)
    else:
        model = _fallback(path, module, latent_size, hop, channels)
    model.source = source
    _probe(model)
    if not model.resettable:
        log.info("%s has no reset(): reloaded after the load's probe; after a bad block, %d frames are "
                 "decoded at the defaults to clear its state", path, RECOVERY_FRAMES)
    return model


def _load_torchscript(path: Path, source: bytes) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is deprecated but is our format
            module = torch.jit.load(io.BytesIO(source), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError or zip errors
        raise ModelError(f"{path}: not a TorchScript model file ({reason(exc)})") from None
    module.eval()
    return module


def _decode_shape(path: Path, module: torch.jit.ScriptModule) -> tuple[int, int, int]:
    """(latent_size, hop, channels) from the nn~ `decode_params` buffer."""
    if not hasattr(module, "decode"):
        raise ModelError(f"{path}: the module has no `decode` method (not an nn~-convention model)")
    params = getattr(module, "decode_params", None)
    if not isinstance(params, torch.Tensor) or params.numel() != 4:
        raise ModelError(f"{path}: `decode_params` is missing or is not "
                         "[in_channels, in_ratio, out_channels, out_ratio]")
    in_ch, in_ratio, out_ch, out_ratio = (int(v) for v in params.flatten().tolist())
    if min(in_ch, in_ratio, out_ch, out_ratio) < 1:
        raise ModelError(f"{path}: `decode_params` {params.tolist()} has a value below 1")
    if in_ratio % out_ratio:
        raise ModelError(f"{path}: `decode_params` {params.tolist()}: in_ratio is not a "
                         "multiple of out_ratio, so a latent frame is not a whole number of samples")
    return in_ch, in_ratio // out_ratio, out_ch


def _read_metadata(path: Path, module: torch.jit.ScriptModule) -> dict[str, Any]:
    if not hasattr(module, "metadata"):
        return {}
    try:
        text = module.metadata()
    except Exception as exc:
        raise ModelError(f"{path}: `metadata()` failed: {exc}") from None
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: `metadata()` is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: `metadata()` is not a JSON object")
    return meta


def _field(path: Path, meta: dict, key: str, kind: type | tuple[type, ...], where: str = "metadata") -> Any:
    if key not in meta:
        raise ModelError(f"{path}: {where} has no `{key}`")
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ModelError(f"{path}: {where}.{key} = {value!r} has the wrong type")
    return value


def _from_metadata(path: Path, module: torch.jit.ScriptModule, meta: dict, latent_size: int,
                   hop: int, channels: int) -> Model:
    fmt = meta.get("format")
    if fmt != "synthd-model":
        raise ModelError(f"{path}: metadata.format is {fmt!r}, expected 'synthd-model'")
    version = _field(path, meta, "format_version", int)
    if version != 1:
        raise ModelError(f"{path}: metadata.format_version {version} is not supported (this synthd reads 1)")
    rate = _field(path, meta, "sample_rate", int)
    if rate < 8000:
        raise ModelError(f"{path}: metadata.sample_rate {rate} is not an audio rate")
    for key, actual in (("latent_size", latent_size), ("hop", hop), ("channels", channels)):
        declared = _field(path, meta, key, int)
        if declared != actual:
            raise ModelError(f"{path}: metadata.{key} = {declared} but decode_params says {actual}")
    latency = _field(path, meta, "latency_samples", int)
    controls_raw = _field(path, meta, "controls", list)
    if len(controls_raw) != latent_size:
        raise ModelError(f"{path}: metadata.controls has {len(controls_raw)} entries, "
                         f"expected one per latent dimension ({latent_size})")
    controls: list[ControlInfo] = []
    seen: set[str] = set()
    for i, raw in enumerate(controls_raw):
        where = f"metadata.controls[{i}]"
        if not isinstance(raw, dict):
            raise ModelError(f"{path}: {where} is not an object")
        index = _field(path, raw, "index", int, where)
        if index != i:
            raise ModelError(f"{path}: {where}.index is {index}; controls must be listed in decode's channel order")
        label = _field(path, raw, "label", str, where)
        if not LABEL_PATTERN.match(label):
            raise ModelError(f"{path}: {where}.label {label!r} is not lowercase [a-z0-9_]")
        if label in seen:
            raise ModelError(f"{path}: {where}.label {label!r} is used twice")
        seen.add(label)
        lo = float(_field(path, raw, "min", (int, float), where))
        hi = float(_field(path, raw, "max", (int, float), where))
        default = float(_field(path, raw, "default", (int, float), where))
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ModelError(f"{path}: {where} has min {lo} not below max {hi}")
        if not lo <= default <= hi:
            raise ModelError(f"{path}: {where}.default {default} lies outside [{lo}, {hi}]")
        source = raw.get("source")
        attribute = raw.get("attribute")
        unit = raw.get("unit")
        if unit is not None and not isinstance(unit, str):
            raise ModelError(f"{path}: {where}.unit = {unit!r} is not a string")
        controls.append(ControlInfo(index=i, label=label, minimum=lo, maximum=hi, default=default,
                                    source=f"metadata:{source}" if source else "metadata",
                                    attribute=attribute if isinstance(attribute, str) else None,
                                    unit=unit))
    name = meta.get("name") if isinstance(meta.get("name"), str) and meta.get("name") else path.stem
    return Model(path=path, name=name, module=module, sample_rate=rate, hop=hop,
                 latent_size=latent_size, channels=channels, latency_samples=latency,
                 controls=controls, metadata=meta)


def _fallback(path: Path, module: torch.jit.ScriptModule, latent_size: int, hop: int,
              channels: int) -> Model:
    rate = None
    for attr in ("sr", "sample_rate", "sampling_rate"):
        value = getattr(module, attr, None)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 8000:
            rate = int(value)
            break
    if rate is None:
        log.warning("%s: no sample rate in the file; assuming %d Hz (the nn~ default)",
                    path, FALLBACK_SAMPLE_RATE)
        rate = FALLBACK_SAMPLE_RATE
    controls = [ControlInfo(index=i, label=f"latent_{i}", minimum=-FALLBACK_RANGE,
                            maximum=FALLBACK_RANGE, default=0.0, source="fallback")
                for i in range(latent_size)]
    # a causal streaming decoder's delay is unknown without metadata; one frame is the floor
    return Model(path=path, name=path.stem, module=module, sample_rate=rate, hop=hop,
                 latent_size=latent_size, channels=channels, latency_samples=hop,
                 controls=controls, metadata={})


def _probe(model: Model) -> None:
    """Decode a few frames at the defaults and at the range ends; then reset the state."""
    path = model.path
    lo = torch.tensor([c.minimum for c in model.controls])
    hi = torch.tensor([c.maximum for c in model.controls])
    mid = torch.tensor(model.defaults())
    z = torch.stack([mid, lo, hi, mid], dim=1).unsqueeze(0).to(torch.float32)  # (1, latent, 4)
    if model.resettable:  # a file without reset() is fresh from its load
        _reset(model)
    try:
        with torch.inference_mode():
            out = model.module.decode(z)
    except Exception as exc:
        raise ModelError(f"{path}: decode fails on a ({model.latent_size}, {PROBE_FRAMES})-frame "
                         f"probe: {reason(exc)}") from None
    expected = (1, model.channels, PROBE_FRAMES * model.hop)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{path}: decode returned shape {got} for {PROBE_FRAMES} frames, "
                         f"but decode_params promise {expected}")
    if not torch.isfinite(out).all():
        raise ModelError(f"{path}: decode returned NaN or Inf on a probe at the controls' "
                         "defaults and range ends")
    if hasattr(model.module, "restart"):
        model.restartable = _probe_restart(model, z)
    if hasattr(model.module, "decode_rows"):
        model.decodes_rows = _probe_decode_rows(model, z)
    _reset(model)


def _probe_restart(model: Model, z: torch.Tensor) -> bool:
    """Whether the file's `restart` takes a row mask and leaves a stream that still decodes; a file
    whose `restart` fails plays as one without it (each note then waits a frame for its pitch)."""
    try:
        model.restart(np.ones(1, dtype=bool))
        with torch.inference_mode():
            out = model.module.decode(z[..., :1])
        if not torch.isfinite(out).all():
            raise ValueError("decode after it returned NaN or Inf")
    except Exception as exc:
        log.warning("%s: restart() fails (%s); notes wait a latent frame for their pitch", model.path, reason(exc))
        return False
    return True


def _probe_decode_rows(model: Model, z: torch.Tensor) -> bool:
    """Whether the file's `decode_rows` decodes one row of a two-voice stream to what its `decode`
    promises for one voice; a file whose `decode_rows` fails decodes every voice on every call."""
    pair = torch.cat([z[..., :1], z[..., :1]]).numpy()
    try:
        out = model.decode_rows(pair, np.array([1]))
        expected = (1, model.channels, model.hop)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"it returned {got} for one row of one frame, expected {expected}")
        if not torch.isfinite(out).all():
            raise ValueError("it returned NaN or Inf")
    except Exception as exc:
        log.warning("%s: decode_rows() fails (%s); silent voices are decoded with the others", model.path,
                    reason(exc))
        return False
    return True


def _reset(model: Model) -> None:
    try:
        model.reset()
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{model.path}: reset() fails: {exc}") from None
