"""Options of `synthd run`: defaults, then a TOML file (`--config`), then the command line.

A config file uses the option names with underscores, all at the top level:

    model = "/srv/synthd/models/cello.ts"
    model_dir = "/srv/synthd/models"     # /synthd/model/load NAME looks here (default: the model's folder)
    patch = "/srv/synthd/patches/nanokontrol2.toml"
    patch_dir = "/srv/synthd/patches"    # /synthd/patch/load NAME looks here (default: the patch's folder)
    device = "system"                    # audio device: name substring or index
    channels = 2
    block_frames = 256
    ahead_blocks = 2                     # blocks rendered ahead of the device (1: less latency, less margin)
    threads = 1
    render_priority = 1                  # render thread's realtime (SCHED_FIFO) priority; 0: normal
    osc_host = "0.0.0.0"
    osc_port = 9000
    midi_in = "nanoKONTROL2"             # or "virtual"; empty for none
    input = "virtual"                    # audio input: JACK ports synthd:in_*, or a device name
    input_channels = 1                   # input channels, mixed to mono
    input_gain = "auto"                  # dB before the model's encoder, or the model's training gain
    log_level = "info"                   # debug, info, warning, error
    crossfade = 0.05                     # seconds, model and patch swaps

Several models at once (layers): `--model A.ts --patch PA.toml --model B.ts --patch PB.toml`
(one patch per model, in order, or none), or instead of `model` and `patch`:

    [[layer]]
    name = "pad"                         # its OSC namespace /synthd/layer/pad/... (default: the
    model = "/srv/synthd/models/pad.ts"  # model file's name)
    patch = "/srv/synthd/patches/left.toml"   # its channel, key range (split), gain, voices

    [[layer]]
    model = "/srv/synthd/models/lead.ts"
    patch = "/srv/synthd/patches/right.toml"
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from synthd.patch import TomlError, TomlSource, TomlTable, parse_input_gain
from synthd.priority import DEFAULT_PRIORITY, MAX_PRIORITY

LOG_LEVELS = ("debug", "info", "warning", "error")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LAYER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class ConfigError(TomlError):
    """A config file or option that cannot be used."""


@dataclass
class LayerSpec:
    """One layer to play: a model under a patch, known on OSC by `name`."""

    name: str
    model: str
    patch: str | None = None


@dataclass
class DaemonConfig:
    model: str | None = None
    model_dir: str | None = None
    patch: str | None = None
    patch_dir: str | None = None
    device: str | None = None
    channels: int = 2
    block_frames: int = 256
    ahead_blocks: int = 2
    threads: int = 1
    render_priority: int = DEFAULT_PRIORITY
    osc_host: str = "127.0.0.1"
    osc_port: int = 9000
    midi_in: str | None = None
    input: str | None = None  # None: no audio input
    input_channels: int = 1
    input_gain: str | float = 0.0  # dB, or "auto": the model file's preprocessing gain
    log_level: str = "info"
    crossfade: float = 0.05
    http_port: int | None = None  # None: no HTTP server
    http_host: str | None = None  # None: the OSC host
    http_token: str | None = None
    zeroconf: bool | None = None  # None: advertise unless the host is loopback
    layers: list[LayerSpec] = field(default_factory=list)  # two or more: several models at once

    def layer_specs(self) -> list[LayerSpec]:
        """The layers to play: `layers`, or the one of `model` and `patch`."""
        if self.layers:
            return self.layers
        return [LayerSpec(name=layer_name(self.model or "model", set()), model=self.model or "", patch=self.patch)]

    def check(self) -> None:
        """Raise ConfigError for values no run can use."""
        if not self.model:
            raise ConfigError("no model: give --model FILE.ts (or `model` in the --config file)")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ConfigError(f"two layers are called {next(n for n in names if names.count(n) > 1)!r}")
        if not 1 <= self.channels <= 64:
            raise ConfigError(f"channels {self.channels} is outside 1..64")
        if not 16 <= self.block_frames <= 8192:
            raise ConfigError(f"block_frames {self.block_frames} is outside 16..8192")
        if not 1 <= self.ahead_blocks <= 16:
            raise ConfigError(f"ahead_blocks {self.ahead_blocks} is outside 1..16")
        if not 1 <= self.threads <= 64:
            raise ConfigError(f"threads {self.threads} is outside 1..64")
        if not 0 <= self.render_priority <= MAX_PRIORITY:
            raise ConfigError(f"render_priority {self.render_priority} is outside 0..{MAX_PRIORITY}")
        if not 0 <= self.osc_port <= 65535:
            raise ConfigError(f"osc_port {self.osc_port} is not a UDP port")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if not 0.0 <= self.crossfade <= 10.0:
            raise ConfigError(f"crossfade {self.crossfade} is outside 0..10 seconds")
        if not 1 <= self.input_channels <= 64:
            raise ConfigError(f"input_channels {self.input_channels} is outside 1..64")
        try:
            self.input_gain = parse_input_gain(self.input_gain)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port {self.http_port} is not a TCP port")
        if self.http_token is not None and not 8 <= len(self.http_token) <= 256:
            raise ConfigError("http_token must be 8 to 256 characters")

    @property
    def models_folder(self) -> Path:
        return Path(self.model_dir) if self.model_dir else Path(self.model).parent

    @property
    def patches_folder(self) -> Path:
        if self.patch_dir:
            return Path(self.patch_dir)
        return Path(self.patch).parent if self.patch else Path("patches")


_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "model_dir": (str,), "patch": (str,), "patch_dir": (str,), "device": (str, int),
    "channels": (int,), "block_frames": (int,), "ahead_blocks": (int,), "threads": (int,), "render_priority": (int,), "osc_host": (str,), "osc_port": (int,),
    "midi_in": (str,), "input": (str,), "input_channels": (int,), "input_gain": (str, float, int), "log_level": (str,), "crossfade": (float,),
    "http_port": (int,), "http_host": (str,), "http_token": (str,), "zeroconf": (bool,),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option, with None defaults so that only what is typed overrides the file."""
    parser.add_argument("--config", metavar="FILE.toml", help="read options from this TOML file first")
    parser.add_argument("--model", metavar="FILE.ts", action="append",
                        help="model file to play (again for each layer: several models at once)")
    parser.add_argument("--model-dir", metavar="DIR", help="folder for /synthd/model/load NAME (default: the model's)")
    parser.add_argument("--patch", metavar="FILE.toml", action="append",
                        help="patch file (default: the built-in CC 21-28 patch); with several --model, one "
                             "per model in the same order")
    parser.add_argument("--patch-dir", metavar="DIR", help="folder for /synthd/patch/load NAME (default: the patch's)")
    parser.add_argument("--device", help="audio output device: index or part of its name (`synthd devices`)")
    parser.add_argument("--channels", type=int, help="output channels (default 2)")
    parser.add_argument("--block-frames", type=int, help="frames per render block (default 256)")
    parser.add_argument("--ahead-blocks", type=int, help="blocks the render thread keeps ahead of the device "
                        "(default 2; 1 takes a block off the latency of notes and controls, and leaves "
                        "less margin for a slow render)")
    parser.add_argument("--threads", type=int, help="torch threads of the render thread (default 1)")
    parser.add_argument("--render-priority", type=int,
                        help=f"realtime (SCHED_FIFO) priority of the render thread, 1..{MAX_PRIORITY}, or 0 for "
                             f"normal scheduling (default {DEFAULT_PRIORITY}: the lowest realtime one, below the "
                             "audio server's; needs an rtprio limit, else it plays at normal priority and says so)")
    parser.add_argument("--osc-host", help="OSC host to listen on (default 127.0.0.1)")
    parser.add_argument("--osc-port", type=int, help="OSC UDP port (default 9000; 0 picks a free one)")
    parser.add_argument("--midi-in", metavar="NAME|virtual", help="MIDI input: part of a port name, or `virtual`")
    parser.add_argument("--input", metavar="NAME|virtual",
                        help="audio input played through the model: part of an input device's name, or `virtual` "
                             "for JACK ports synthd:in_1.. (off unless given)")
    parser.add_argument("--input-channels", type=int, help="input channels, mixed to mono (default 1)")
    parser.add_argument("--input-gain", metavar="DB|auto",
                        help="input gain in dB before the model's encoder (default 0), or `auto`: the gain the "
                             "model's training set got, for input recorded at its level")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="stderr log level (default info)")
    parser.add_argument("--crossfade", type=float, help="seconds a model or patch swap crossfades (default 0.05)")
    parser.add_argument("--http-port", type=int, help="serve OSCQuery and the control page on this TCP port "
                        "(off unless given; 0 picks a free one)")
    parser.add_argument("--http-host", help="HTTP host to listen on (default: the OSC host)")
    parser.add_argument("--http-token", help="a token the page and the WebSocket require (?token=)")
    parser.add_argument("--zeroconf", action="store_const", const=True,
                        help="advertise over zeroconf even on loopback (default: unless the host is loopback)")


def load_config(path: str | Path) -> dict[str, object]:
    """The options set in TOML file `path`, validated (unknown key, wrong type -> ConfigError)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    src = TomlSource(path, text, arrays=("layer",), error=ConfigError)
    table = TomlTable(src, src.parse(text))
    values = {key: table.get(key, kinds) for key, kinds in _TYPES.items() if key in table.data}
    raw_layers = table.get("layer", list, [])
    table.finish()
    if raw_layers:
        if "model" in values or "patch" in values:
            raise table.fail("model" if "model" in values else "patch",
                             "give either `model` (and `patch`) or [[layer]] tables, not both")
        values["layers"] = _read_layers(src, raw_layers)
    if isinstance(values.get("device"), int):
        values["device"] = str(values["device"])
    return values


def layer_name(model: str, taken: set[str]) -> str:
    """A layer's default name: its model file's, made an OSC path segment, unique among `taken`."""
    base = re.sub(r"[^a-z0-9_-]+", "_", Path(model).stem.lower()).strip("_") or "layer"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def _read_layers(src: TomlSource, raw_layers: list) -> list[LayerSpec]:
    layers: list[LayerSpec] = []
    for i, raw in enumerate(raw_layers):
        t = TomlTable(src, raw if isinstance(raw, dict) else {}, "layer", i)
        if not isinstance(raw, dict):
            raise t.fail(None, "must be a table")
        model = t.get("model", str)
        if not model:
            raise t.fail("model", "every [[layer]] needs a `model` file")
        name = t.get("name", str) or layer_name(model, {layer.name for layer in layers})
        if not LAYER_NAME.match(name):
            raise t.fail("name", f"{name!r} is not a layer name (lowercase [a-z0-9_-], for OSC addresses)")
        layers.append(LayerSpec(name=name, model=model, patch=t.get("patch", str)))
        t.finish()
    return layers


def _layers_from_command_line(models: list[str], patches: list[str]) -> list[LayerSpec]:
    if patches and len(patches) != len(models):
        raise ConfigError(f"{len(models)} --model and {len(patches)} --patch: give one --patch per --model "
                          "(in the same order), or none")
    layers: list[LayerSpec] = []
    for i, model in enumerate(models):
        layers.append(LayerSpec(layer_name(model, {layer.name for layer in layers}), model,
                                patches[i] if patches else None))
    return layers


def resolve(args: argparse.Namespace) -> DaemonConfig:
    """Defaults, then `--config`, then the command line; checked."""
    config = DaemonConfig()
    values = load_config(args.config) if getattr(args, "config", None) else {}
    models, patches = getattr(args, "model", None) or [], getattr(args, "patch", None) or []
    if len(models) > 1:
        values["layers"] = _layers_from_command_line(models, patches)
    elif models or patches:
        if len(patches) > 1:
            raise ConfigError(f"{len(patches)} --patch for one model: give one --patch per --model")
        values.pop("layers", None)
        values.update({"model": models[0]} if models else {})
        values.update({"patch": patches[0]} if patches else {})
    for f in fields(DaemonConfig):
        cli = getattr(args, f.name, None)
        if cli is not None and f.name not in ("model", "patch"):
            values[f.name] = cli
    for key, value in values.items():
        setattr(config, key, value)
    if config.layers:  # the first layer stands for the daemon where one model is meant
        config.model, config.patch = config.layers[0].model, config.layers[0].patch
    if config.midi_in == "":
        config.midi_in = None
    if config.input == "":
        config.input = None
    config.check()
    return config


def in_folder(folder: Path, name: str, suffix: str) -> Path:
    """The file called `name` (suffix optional) directly inside `folder`.

    A name arrives over the network, so it may never be a path: separators, `..`, a
    leading dot or anything outside [A-Za-z0-9_.-] is refused (ValueError), and the
    resolved file must lie in `folder` itself.
    """
    if not NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(f"{name!r} is not a plain name (letters, digits, _ . -; no paths)")
    file = folder / (name if name.endswith(suffix) else name + suffix)
    if file.resolve().parent != folder.resolve():
        raise ValueError(f"{name!r} is not inside {folder}")
    if not file.is_file():
        raise ValueError(f"no {suffix} file called {name!r} in {folder}")
    return file
