"""Options of `synthd run`: defaults, then a TOML file (`--config`), then the command line.

A config file uses the option names with underscores, all at the top level:

    model = "/srv/synthd/models/cello.ts"
    model_dir = "/srv/synthd/models"     # /synthd/model/load NAME looks here (default: the model's folder)
    patch = "/srv/synthd/patches/nanokontrol2.toml"
    patch_dir = "/srv/synthd/patches"    # /synthd/patch/load NAME looks here (default: the patch's folder)
    device = "system"                    # audio device: name substring or index
    channels = 2
    block_frames = 256
    threads = 1
    osc_host = "0.0.0.0"
    osc_port = 9000
    midi_in = "nanoKONTROL2"             # or "virtual"; empty for none
    log_level = "info"                   # debug, info, warning, error
    crossfade = 0.05                     # seconds, model and patch swaps
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields
from pathlib import Path

from synthd.patch import TomlError, TomlSource, TomlTable

LOG_LEVELS = ("debug", "info", "warning", "error")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(TomlError):
    """A config file or option that cannot be used."""


@dataclass
class DaemonConfig:
    model: str | None = None
    model_dir: str | None = None
    patch: str | None = None
    patch_dir: str | None = None
    device: str | None = None
    channels: int = 2
    block_frames: int = 256
    threads: int = 1
    osc_host: str = "127.0.0.1"
    osc_port: int = 9000
    midi_in: str | None = None
    log_level: str = "info"
    crossfade: float = 0.05
    http_port: int | None = None  # None: no HTTP server
    http_host: str | None = None  # None: the OSC host
    http_token: str | None = None
    zeroconf: bool | None = None  # None: advertise unless the host is loopback

    def check(self) -> None:
        """Raise ConfigError for values no run can use."""
        if not self.model:
            raise ConfigError("no model: give --model FILE.ts (or `model` in the --config file)")
        if not 1 <= self.channels <= 64:
            raise ConfigError(f"channels {self.channels} is outside 1..64")
        if not 16 <= self.block_frames <= 8192:
            raise ConfigError(f"block_frames {self.block_frames} is outside 16..8192")
        if not 1 <= self.threads <= 64:
            raise ConfigError(f"threads {self.threads} is outside 1..64")
        if not 0 <= self.osc_port <= 65535:
            raise ConfigError(f"osc_port {self.osc_port} is not a UDP port")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if not 0.0 <= self.crossfade <= 10.0:
            raise ConfigError(f"crossfade {self.crossfade} is outside 0..10 seconds")
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
    "channels": (int,), "block_frames": (int,), "threads": (int,), "osc_host": (str,), "osc_port": (int,),
    "midi_in": (str,), "log_level": (str,), "crossfade": (float,),
    "http_port": (int,), "http_host": (str,), "http_token": (str,), "zeroconf": (bool,),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option, with None defaults so that only what is typed overrides the file."""
    parser.add_argument("--config", metavar="FILE.toml", help="read options from this TOML file first")
    parser.add_argument("--model", metavar="FILE.ts", help="model file to play")
    parser.add_argument("--model-dir", metavar="DIR", help="folder for /synthd/model/load NAME (default: the model's)")
    parser.add_argument("--patch", metavar="FILE.toml", help="patch file (default: the built-in CC 21-28 patch)")
    parser.add_argument("--patch-dir", metavar="DIR", help="folder for /synthd/patch/load NAME (default: the patch's)")
    parser.add_argument("--device", help="audio output device: index or part of its name (`synthd devices`)")
    parser.add_argument("--channels", type=int, help="output channels (default 2)")
    parser.add_argument("--block-frames", type=int, help="frames per render block (default 256)")
    parser.add_argument("--threads", type=int, help="torch threads of the render thread (default 1)")
    parser.add_argument("--osc-host", help="OSC host to listen on (default 127.0.0.1)")
    parser.add_argument("--osc-port", type=int, help="OSC UDP port (default 9000; 0 picks a free one)")
    parser.add_argument("--midi-in", metavar="NAME|virtual", help="MIDI input: part of a port name, or `virtual`")
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
    src = TomlSource(path, text, arrays=(), error=ConfigError)
    table = TomlTable(src, src.parse(text))
    values = {key: table.get(key, kinds) for key, kinds in _TYPES.items() if key in table.data}
    table.finish()
    if isinstance(values.get("device"), int):
        values["device"] = str(values["device"])
    return values


def resolve(args: argparse.Namespace) -> DaemonConfig:
    """Defaults, then `--config`, then the command line; checked."""
    config = DaemonConfig()
    values = load_config(args.config) if getattr(args, "config", None) else {}
    for f in fields(DaemonConfig):
        cli = getattr(args, f.name, None)
        if cli is not None:
            values[f.name] = cli
    for key, value in values.items():
        setattr(config, key, value)
    if config.midi_in == "":
        config.midi_in = None
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
