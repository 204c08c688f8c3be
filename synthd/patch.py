"""Patch files: how MIDI, OSC and presets map onto a model's controls (versioned TOML).

A patch is read with `load_patch`, which validates every key and value and refuses a bad
file with a `PatchError` naming the file, the line and the key at fault; nothing is
half-loaded. `save_patch` writes a patch back (after MIDI learn or a preset save)
atomically, keeping the file's leading comment block.

Schema, version 1 (every key optional unless marked):

    version = 1                      # required
    name = "nanoKONTROL2"
    description = "..."

    voices = 8                       # 1..64 notes at once; default 8 for a model with a pitch
                                     # input, 1 otherwise. 1 is mono and legato (glide works)

    [output]
    gain_db = 0.0                    # -120..+24

    [gate]
    open = true                      # with no notes played, the model drones (true) or waits
    attack = 0.005                   # seconds, note-on / gate-open ramp
    decay = 0.0                      # seconds from the peak to the sustain level (voices > 1)
    sustain = 1.0                    # level held while a key is down, 0..1 of the peak (voices > 1)
    release = 0.25                   # seconds, note-off / gate-close ramp
    velocity = true                  # note velocity scales the level

    [midi]
    channel = "omni"                 # default channel of the controls: 1..16 or "omni"
    pickup = false                   # soft takeover for every control (a control may override)
    program_change = true            # program change N recalls the preset with program N
    notes = true                     # notes open and close the gate
    note_control = "pitch"           # the control a note sets ("" for none); default "pitch"
    note_low = 36                    # this note sets note_control to wire value 0 ...
    note_high = 96                   # ... and this one to 1 (linear in between)
    key_low = 0                      # notes below key_low or above key_high are not played:
    key_high = 127                   # a layer's share of a split keyboard
    bend_control = ""                # control that pitch bend moves ("" for none)
    bend_depth = 0.0833              # wire units added at full bend up (subtracted at full down)
    bend_range = 2.0                 # semitones of full bend, for a pitch input in MIDI units
    glide = 0.0                      # seconds a note takes to reach its pitch (portamento)
    velocity_control = ""            # control that note velocity sets (wire = velocity / 127)
    pressure_control = ""            # control that aftertouch sets (wire = pressure / 127)
    slide_control = ""               # control that CC 74 on an MPE member channel sets
    mpe = "off"                      # "lower" (master 1, notes on 2..16) or "upper" (16; 1..15)
    mpe_bend_range = 48.0            # semitones of full per-note bend on MPE member channels

    [input]                          # with audio input (`synthd run --input`, `render --input`)
    gain_db = 0.0                    # input gain, -60..+40 dB, before the model's encoder
    mode = "offset"                  # how the input and each knob combine (see below)
    modes = { brightness = "follow" }   # per control, by label; the pitch input's default is "follow"
    transpose = 0.0                  # semitones added to the tracked pitch (a pitch input)
    pitch_source = "input"           # or "notes": a held MIDI note sets the pitch, the input the rest
    dry_wet = 1.0                    # 0 = the input alone, 1 = the model alone
    gate_db = -60.0                  # input quieter than this (dBFS) leaves the model silent

    [presets]
    glide = 0.5                      # seconds a preset recall takes to reach its values

    [[control]]                      # one per mapped control
    label = "brightness"             # the model control, by label ...
    index = 0                        # ... or by decode input (0 = most important); not both
    cc = 21                          # MIDI CC 0..127
    hires = false                    # 14-bit: cc is the MSB (0..31), cc + 32 the LSB
    channel = 1                      # overrides [midi].channel
    alias = "cutoff"                 # also /synthd/control/cutoff; or a whole address "/1/fader1"
    range = [0.0, 1.0]               # part of the model's useful range the wire's 0..1 covers
    curve = "linear"                 # or "exponential"
    invert = false
    smoothing = 0.0                  # seconds of glide for each change (0 = one latent frame)
    default = 0.5                    # wire value at start (else the model's default)
    pickup = false

    [[preset]]
    name = "dark pad"                # required, unique
    program = 0                      # 0..127, for program change
    values = { brightness = 0.2 }    # wire values 0..1 by model control label
    gain_db = -3.0                   # optional

Wire values are 0..1; a control maps wire `u` to model units through
`min + r(u) * (max - min)` where `r` applies curve, invert and range (see controls.py).

Input modes, per control: "follow" (the input alone: the knob is ignored), "offset" (the
input plus the knob's distance from its default), "knob" (the knob alone: the input is ignored
for that control), "scale" (the input's distance from the default, times a factor the knob
sets: 0 at its minimum, 1 at its default, 2 at its maximum).

A model whose note control is a pitch input in MIDI units (metadata `"unit": "midi"`) is
played in tune: a note sets it to the note number exactly, whatever note_low, note_high and
the control's mapping say, and pitch bend (with or without bend_control) adds up to
±bend_range semitones.

With several voices each note has its own pitch, velocity_control, pressure_control and
slide_control values (per voice) and its own envelope; every other control is shared by all
voices. Sustain (CC 64) holds released notes. With `mpe`, each member channel is one note:
its pitch bend (±mpe_bend_range), channel pressure and CC 74 move that note alone, and the
master channel's act on all.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
CURVES = ("linear", "exponential")
NAME_PATTERN = re.compile(r"^[a-z0-9_]+$")
ADDRESS_PATTERN = re.compile(r"^/[A-Za-z0-9_./-]+$")
OMNI = 0  # a control's channel that listens on all 16, whatever [midi].channel says
RANGE_LIMIT = (-1.0, 2.0)  # a range may reach one whole useful range past either end


class TomlError(Exception):
    """A TOML file (patch, config, automation) that cannot be used; the message names the
    file, line and key at fault."""


class PatchError(TomlError):
    """A patch that cannot be used."""


@dataclass
class ControlMap:
    """One `[[control]]`: a model control (by label or index) and how the wire reaches it."""

    label: str | None = None
    index: int | None = None
    cc: int | None = None
    hires: bool = False
    channel: int | None = None  # 1..16, OMNI, or None for the patch's [midi].channel
    alias: str | None = None
    range: tuple[float, float] = (0.0, 1.0)
    curve: str = "linear"
    invert: bool = False
    smoothing: float = 0.0
    default: float | None = None
    pickup: bool | None = None  # None = the patch's [midi].pickup

    def ccs(self) -> list[int]:
        """The CC numbers this control listens to (two for a 14-bit control)."""
        if self.cc is None:
            return []
        return [self.cc, self.cc + 32] if self.hires else [self.cc]

    def target(self) -> str:
        """A human name for the model control this maps to."""
        return self.label if self.label is not None else f"#{self.index}"


@dataclass
class Preset:
    name: str
    values: dict[str, float] = field(default_factory=dict)  # label -> wire value 0..1
    program: int | None = None
    gain_db: float | None = None


MPE_ZONES = ("off", "lower", "upper")
MAX_VOICES = 64


@dataclass
class GateSettings:
    open: bool = True
    attack: float = 0.005
    decay: float = 0.0
    sustain: float = 1.0
    release: float = 0.25
    velocity: bool = True


INPUT_MODES = ("follow", "offset", "knob", "scale")
PITCH_SOURCES = ("input", "notes")
# the numbers of [input]: (low, high), as a patch, OSC and --input-gain may set them
INPUT_RANGES = {"gain_db": (-60.0, 40.0), "transpose": (-48.0, 48.0), "dry_wet": (0.0, 1.0),
                "gate_db": (-120.0, 0.0)}


def parse_input_gain(value: str | float | int) -> str | float:
    """`--input-gain` (or the config's `input_gain`): dB within INPUT_RANGES["gain_db"], or "auto";
    ValueError otherwise."""
    if value == "auto":
        return "auto"
    try:
        gain = float(value)
    except ValueError:
        raise ValueError(f"--input-gain {value!r} is neither a number of dB nor `auto`") from None
    lo, hi = INPUT_RANGES["gain_db"]
    if not (math.isfinite(gain) and lo <= gain <= hi):
        raise ValueError(f"--input-gain {value} is outside {lo:+g}..{hi:+g} dB")
    return gain


@dataclass
class InputSettings:
    """How audio input drives the model (see the module docstring's `[input]`)."""

    gain_db: float = 0.0
    mode: str = "offset"
    modes: dict[str, str] = field(default_factory=dict)
    transpose: float = 0.0
    pitch_source: str = "input"
    dry_wet: float = 1.0
    gate_db: float = -60.0

    def mode_of(self, label: str, unit: str | None = None) -> str:
        """The mode of the control `label`: its own, else "follow" for a pitch input (a knob
        offset would detune the input) and the patch's `mode` for the others."""
        if label in self.modes:
            return self.modes[label]
        return "follow" if unit == "midi" else self.mode


@dataclass
class MidiSettings:
    channel: int | None = None  # None = omni
    pickup: bool = False
    program_change: bool = True
    notes: bool = True
    note_control: str = "pitch"
    note_low: int = 36
    note_high: int = 96
    bend_control: str = ""
    bend_depth: float = 1.0 / 12.0
    bend_range: float = 2.0
    glide: float = 0.0
    key_low: int = 0
    key_high: int = 127
    velocity_control: str = ""
    pressure_control: str = ""
    slide_control: str = ""
    mpe: str = "off"
    mpe_bend_range: float = 48.0

    def mpe_zone(self) -> tuple[int, range] | None:
        """(master channel, member channels), 1-based, for an MPE zone; None without one."""
        if self.mpe == "lower":
            return 1, range(2, 17)
        if self.mpe == "upper":
            return 16, range(1, 16)
        return None


@dataclass
class Patch:
    """A validated patch. `path` is where it was read from (None for the built-in one)."""

    version: int = SCHEMA_VERSION
    name: str = ""
    description: str = ""
    voices: int | None = None  # None: 8 for a model with a pitch input, 1 otherwise
    gain_db: float = 0.0
    gate: GateSettings = field(default_factory=GateSettings)
    midi: MidiSettings = field(default_factory=MidiSettings)
    input: InputSettings = field(default_factory=InputSettings)
    preset_glide: float = 0.5
    controls: list[ControlMap] = field(default_factory=list)
    presets: list[Preset] = field(default_factory=list)
    path: Path | None = None
    header: str = ""  # the file's leading comment block, kept when written back

    def channel_of(self, control: ControlMap) -> int | None:
        """The MIDI channel (1..16) a control listens on, None for omni."""
        if control.channel is None:
            return self.midi.channel
        return None if control.channel == OMNI else control.channel

    def pickup_of(self, control: ControlMap) -> bool:
        return control.pickup if control.pickup is not None else self.midi.pickup

    def preset(self, key: str | int) -> Preset | None:
        """The preset called `key` (str) or with program number `key` (int)."""
        for p in self.presets:
            if (p.name == key) if isinstance(key, str) else (p.program == key):
                return p
        return None

    def cc_conflict(self) -> tuple[int, int, int] | None:
        """(i, j, cc) when controls i > j listen to CC `cc` on overlapping channels, else None."""
        seen: dict[tuple[int | None, int], int] = {}
        for i, c in enumerate(self.controls):
            ch = self.channel_of(c)
            for cc in c.ccs():
                for (other_ch, other_cc), j in seen.items():
                    if other_cc == cc and (ch is None or other_ch is None or ch == other_ch):
                        return i, j, cc
                seen[(ch, cc)] = i
        return None


# ---------------------------------------------------------------- reading


class TomlSource:
    """The TOML text of a file, to point errors at the line a key stands on."""

    def __init__(self, path: Path, text: str, arrays: tuple[str, ...] = ("control", "preset"),
                 error: type[TomlError] = PatchError):
        self.path = path
        self.lines = text.splitlines()
        self.arrays = arrays  # tables written [[name]], numbered in messages
        self.error = error

    def parse(self, text: str) -> dict[str, Any]:
        """tomllib's reading of `text`; a syntax error names the line."""
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"line (\d+)", str(exc))
            at = f"{self.path}:{m.group(1)}" if m else str(self.path)
            raise self.error(f"{at}: not valid TOML ({exc})") from None

    def line_of(self, table: str, occurrence: int, key: str | None) -> int | None:
        """1-based line of `key` inside the `occurrence`-th `[table]`/`[[table]]` ("" = top level).

        Without `key`, the header's line. None when it cannot be found (e.g. inline tables).
        """
        current, count, header_line = "", 0, None
        for n, raw in enumerate(self.lines, 1):
            line = raw.strip()
            m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", line)
            if m:
                current = m.group(1)
                if current == table:
                    count += 1
                    if count - 1 == occurrence:
                        header_line = n
                continue
            in_it = (table == "" and current == "") or (current == table and count - 1 == occurrence)
            if in_it and key is not None and re.match(rf'^("?){re.escape(key)}\1\s*=', line):
                return n
        return header_line if key is None or table else None

    def fail(self, message: str, table: str = "", occurrence: int = 0, key: str | None = None) -> TomlError:
        line = self.line_of(table, occurrence, key)
        name = (f"[[{table}]] #{occurrence + 1}" if table in self.arrays
                else f"[{table}]" if table else "")
        where = f"{name} {key}" if key and name else (key or name)
        at = f"{self.path}:{line}" if line else str(self.path)
        return self.error(f"{at}: {where}: {message}" if where else f"{at}: {message}")


class TomlTable:
    """Typed access to one TOML table; every key read is marked, leftovers are unknown."""

    def __init__(self, src: TomlSource, data: dict, table: str = "", occurrence: int = 0):
        self.src, self.data, self.table, self.occurrence = src, data, table, occurrence
        self.used: set[str] = set()

    def fail(self, key: str | None, message: str) -> TomlError:
        return self.src.fail(message, self.table, self.occurrence, key)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(key, f"expected {names}, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(key, f"{value} is not a finite number")
        return value

    def number(self, key: str, default: float | None, lo: float, hi: float) -> float | None:
        value = self.get(key, float, default)
        if value is not None and not lo <= value <= hi:
            raise self.fail(key, f"{value} is outside {lo}..{hi}")
        return value

    def integer(self, key: str, default: int | None, lo: int, hi: int) -> int | None:
        value = self.get(key, int, default)
        if value is not None and not lo <= value <= hi:
            raise self.fail(key, f"{value} is outside {lo}..{hi}")
        return value

    def channel(self, key: str, default: int | None) -> int | None:
        value = self.get(key, (int, str), "omni" if default is None else default)
        if value == "omni":
            return None
        if isinstance(value, str) or not 1 <= value <= 16:
            raise self.fail(key, f"{value!r} is not a MIDI channel 1..16 or \"omni\"")
        return value

    def table_of(self, key: str) -> dict:
        """The sub-table `key` ({} when absent; refused when it is not a table)."""
        return self.get(key, dict, {})

    def finish(self) -> None:
        unknown = [k for k in self.data if k not in self.used]
        if unknown:
            raise self.fail(unknown[0], f"unknown key (known here: {', '.join(sorted(self.used))})")


def load_patch(path: str | Path) -> Patch:
    """Read and validate the patch at `path`.

    Promises a Patch whose every field is in range, whose controls name a model control
    by exactly one of label/index, and in which no two controls share a CC on overlapping
    channels. Raises PatchError (file, line and key in the message) otherwise.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PatchError(f"{path}: no such patch file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PatchError(f"{path}: cannot be read ({exc})") from None
    return parse_patch(text, path)


def parse_patch(text: str, path: str | Path = "<patch>") -> Patch:
    """Validate patch TOML `text`; `path` is only used to name the file in errors."""
    path = Path(path)
    src = TomlSource(path, text)
    data = src.parse(text)

    top = TomlTable(src, data)
    version = top.get("version", int)
    if version is None:
        raise top.fail(None, f"no `version` key (this synthd reads version {SCHEMA_VERSION})")
    if version != SCHEMA_VERSION:
        raise top.fail("version", f"patch version {version} is not supported (this synthd reads {SCHEMA_VERSION})")
    patch = Patch(path=path, header=_header(text))
    patch.name = top.get("name", str, path.stem)
    patch.description = top.get("description", str, "")
    patch.voices = top.integer("voices", None, 1, MAX_VOICES)

    out = TomlTable(src, top.table_of("output"), "output")
    patch.gain_db = out.number("gain_db", 0.0, -120.0, 24.0)
    out.finish()

    g = TomlTable(src, top.table_of("gate"), "gate")
    patch.gate = GateSettings(open=g.get("open", bool, True), attack=g.number("attack", 0.005, 0.0, 30.0),
                              decay=g.number("decay", 0.0, 0.0, 30.0), sustain=g.number("sustain", 1.0, 0.0, 1.0),
                              release=g.number("release", 0.25, 0.0, 30.0), velocity=g.get("velocity", bool, True))
    g.finish()

    m = TomlTable(src, top.table_of("midi"), "midi")
    patch.midi = MidiSettings(
        channel=m.channel("channel", None), pickup=m.get("pickup", bool, False),
        program_change=m.get("program_change", bool, True), notes=m.get("notes", bool, True),
        note_control=m.get("note_control", str, "pitch"), note_low=m.integer("note_low", 36, 0, 127),
        note_high=m.integer("note_high", 96, 0, 127), bend_control=m.get("bend_control", str, ""),
        bend_depth=m.number("bend_depth", 1.0 / 12.0, 0.0, 1.0),
        bend_range=m.number("bend_range", 2.0, 0.0, 96.0), glide=m.number("glide", 0.0, 0.0, 30.0),
        key_low=m.integer("key_low", 0, 0, 127), key_high=m.integer("key_high", 127, 0, 127),
        velocity_control=m.get("velocity_control", str, ""), pressure_control=m.get("pressure_control", str, ""),
        slide_control=m.get("slide_control", str, ""), mpe=m.get("mpe", str, "off"),
        mpe_bend_range=m.number("mpe_bend_range", 48.0, 0.0, 96.0))
    if patch.midi.mpe not in MPE_ZONES:
        raise m.fail("mpe", f"{patch.midi.mpe!r} is not one of {', '.join(MPE_ZONES)}")
    if patch.midi.mpe != "off" and patch.midi.channel is not None:
        raise m.fail("channel", "an MPE zone sets its own channels: leave `channel` at \"omni\" with `mpe`")
    if patch.midi.key_high < patch.midi.key_low:
        raise m.fail("key_high", f"{patch.midi.key_high} is below key_low {patch.midi.key_low}")
    if patch.midi.note_high <= patch.midi.note_low:
        raise m.fail("note_high", f"{patch.midi.note_high} must be above note_low {patch.midi.note_low}")
    for key in ("note_control", "bend_control", "velocity_control", "pressure_control", "slide_control"):
        value = getattr(patch.midi, key)
        if value and not NAME_PATTERN.match(value):
            raise m.fail(key, f"{value!r} is not a control label (lowercase [a-z0-9_])")
    m.finish()

    patch.input = _read_input(TomlTable(src, top.table_of("input"), "input"))

    p = TomlTable(src, top.table_of("presets"), "presets")
    patch.preset_glide = p.number("glide", 0.5, 0.0, 60.0)
    p.finish()

    for i, raw in enumerate(top.get("control", list, [])):
        patch.controls.append(_read_control(src, raw, i, patch))
    for i, raw in enumerate(top.get("preset", list, [])):
        patch.presets.append(_read_preset(src, raw, i, patch))
    top.finish()

    seen_target: dict[str, int] = {}
    seen_alias: dict[str, int] = {}
    for i, c in enumerate(patch.controls):
        r = TomlTable(src, {}, "control", i)
        if c.target() in seen_target:
            raise r.fail("label" if c.label is not None else "index",
                         f"{c.target()} is already mapped by [[control]] #{seen_target[c.target()] + 1}")
        seen_target[c.target()] = i
        if c.alias is not None:
            if c.alias in seen_alias:
                raise r.fail("alias", f"{c.alias!r} is already the alias of [[control]] #{seen_alias[c.alias] + 1}")
            seen_alias[c.alias] = i
    conflict = patch.cc_conflict()
    if conflict is not None:
        i, j, cc = conflict
        raise TomlTable(src, {}, "control", i).fail(
            "cc", f"CC {cc} is already used by [[control]] #{j + 1} ({patch.controls[j].target()})")
    return patch


def _read_input(t: TomlTable) -> InputSettings:
    defaults = InputSettings()
    numbers = {key: t.number(key, getattr(defaults, key), lo, hi) for key, (lo, hi) in INPUT_RANGES.items()}
    settings = InputSettings(mode=t.get("mode", str, "offset"), pitch_source=t.get("pitch_source", str, "input"),
                             **numbers)
    if settings.mode not in INPUT_MODES:
        raise t.fail("mode", f"{settings.mode!r} is not one of {', '.join(INPUT_MODES)}")
    if settings.pitch_source not in PITCH_SOURCES:
        raise t.fail("pitch_source", f"{settings.pitch_source!r} is not one of {', '.join(PITCH_SOURCES)}")
    for label, mode in t.get("modes", dict, {}).items():
        if not NAME_PATTERN.match(label):
            raise t.fail("modes", f"{label!r} is not a control label (lowercase [a-z0-9_])")
        if mode not in INPUT_MODES:
            raise t.fail("modes", f"{label} = {mode!r} is not one of {', '.join(INPUT_MODES)}")
        settings.modes[label] = mode
    t.finish()
    return settings


def _read_control(src: TomlSource, raw: Any, i: int, patch: Patch) -> ControlMap:
    r = TomlTable(src, raw if isinstance(raw, dict) else {}, "control", i)
    if not isinstance(raw, dict):
        raise r.fail(None, "must be a table")
    c = ControlMap()
    c.label = r.get("label", str)
    c.index = r.integer("index", None, 0, 4095)
    if (c.label is None) == (c.index is None):
        raise r.fail("label", "give exactly one of `label` (a model control's name) or `index` (its decode input)")
    if c.label is not None and not NAME_PATTERN.match(c.label):
        raise r.fail("label", f"{c.label!r} is not a control label (lowercase [a-z0-9_])")
    c.cc = r.integer("cc", None, 0, 127)
    c.hires = r.get("hires", bool, False)
    if c.hires and (c.cc is None or c.cc > 31):
        raise r.fail("hires", f"a 14-bit control needs an MSB `cc` in 0..31 (its LSB is cc + 32), not {c.cc}")
    if "channel" in r.data:
        channel = r.channel("channel", None)
        c.channel = OMNI if channel is None else channel
    alias = r.get("alias", str)
    if alias is not None and not (NAME_PATTERN.match(alias) or ADDRESS_PATTERN.match(alias)):
        raise r.fail("alias", f"{alias!r} is neither a name [a-z0-9_] nor an OSC address starting with '/'")
    c.alias = alias
    rng = r.get("range", list, [0.0, 1.0])
    if (len(rng) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in rng)
            or not all(math.isfinite(v) for v in rng)):
        raise r.fail("range", f"expected two numbers [low, high], got {rng!r}")
    lo, hi = float(rng[0]), float(rng[1])
    if not (RANGE_LIMIT[0] <= lo <= RANGE_LIMIT[1] and RANGE_LIMIT[0] <= hi <= RANGE_LIMIT[1]) or lo == hi:
        raise r.fail("range", f"[{lo}, {hi}] must be two different values within {RANGE_LIMIT[0]}..{RANGE_LIMIT[1]} "
                              "(fractions of the model's useful range)")
    c.range = (lo, hi)
    c.curve = r.get("curve", str, "linear")
    if c.curve not in CURVES:
        raise r.fail("curve", f"{c.curve!r} is not one of {', '.join(CURVES)}")
    c.invert = r.get("invert", bool, False)
    c.smoothing = r.number("smoothing", 0.0, 0.0, 60.0)
    c.default = r.number("default", None, 0.0, 1.0)
    c.pickup = r.get("pickup", bool)
    r.finish()
    return c


def _read_preset(src: TomlSource, raw: Any, i: int, patch: Patch) -> Preset:
    r = TomlTable(src, raw if isinstance(raw, dict) else {}, "preset", i)
    if not isinstance(raw, dict):
        raise r.fail(None, "must be a table")
    name = r.get("name", str)
    if not name:
        raise r.fail("name", "every preset needs a non-empty `name`")
    if patch.preset(name) is not None:
        raise r.fail("name", f"preset {name!r} is defined twice")
    program = r.integer("program", None, 0, 127)
    if program is not None and patch.preset(program) is not None:
        raise r.fail("program", f"program {program} already recalls preset {patch.preset(program).name!r}")
    values = r.get("values", dict, {})
    for label, v in values.items():
        if not NAME_PATTERN.match(label):
            raise r.fail("values", f"{label!r} is not a control label")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise r.fail("values", f"{label} = {v!r}: expected a wire value 0..1")
    gain = r.number("gain_db", None, -120.0, 24.0)
    r.finish()
    return Preset(name=name, values={k: float(v) for k, v in values.items()}, program=program, gain_db=gain)


def _header(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("#") or (not line.strip() and lines):
            lines.append(line)
        else:
            break
    return "\n".join(lines).rstrip() + "\n" if lines else ""


# ---------------------------------------------------------------- writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(round(value, 6))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} to TOML")


def _toml_key(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else _toml_value(key)


def dump_patch(patch: Patch) -> str:
    """The TOML text of `patch` (schema version 1); `parse_patch(dump_patch(p))` equals p."""
    out = [patch.header.rstrip()] if patch.header.strip() else []
    out += [f"version = {SCHEMA_VERSION}", f"name = {_toml_value(patch.name)}"]
    if patch.description:
        out.append(f"description = {_toml_value(patch.description)}")
    if patch.voices is not None:
        out.append(f"voices = {patch.voices}")
    out += ["", "[output]", f"gain_db = {_toml_value(float(patch.gain_db))}", "", "[gate]"]
    for f in fields(GateSettings):
        out.append(f"{f.name} = {_toml_value(getattr(patch.gate, f.name))}")
    out += ["", "[midi]", f"channel = {_toml_value(patch.midi.channel or 'omni')}"]
    for f in fields(MidiSettings)[1:]:
        out.append(f"{f.name} = {_toml_value(getattr(patch.midi, f.name))}")
    out += ["", "[input]"]
    for f in fields(InputSettings):
        out.append(f"{f.name} = {_toml_value(getattr(patch.input, f.name))}")
    out += ["", "[presets]", f"glide = {_toml_value(float(patch.preset_glide))}"]
    defaults = ControlMap()
    for c in patch.controls:
        out += ["", "[[control]]"]
        for f in fields(ControlMap):
            value = getattr(c, f.name)
            if value is None or (f.name not in ("label", "index", "cc") and value == getattr(defaults, f.name)):
                continue
            if f.name == "range":
                value = list(value)
            elif f.name == "channel" and value == OMNI:
                value = "omni"
            out.append(f"{f.name} = {_toml_value(value)}")
    for p in patch.presets:
        out += ["", "[[preset]]", f"name = {_toml_value(p.name)}"]
        if p.program is not None:
            out.append(f"program = {p.program}")
        if p.gain_db is not None:
            out.append(f"gain_db = {_toml_value(float(p.gain_db))}")
        out.append(f"values = {_toml_value({k: float(v) for k, v in p.values.items()})}")
    return "\n".join(out) + "\n"


def save_patch(patch: Patch, path: str | Path | None = None) -> Path:
    """Write `patch` to `path` (default: where it was read) atomically; returns the path.

    The text is validated before it replaces anything, so a failed save leaves the old
    file as it was.
    """
    target = Path(path) if path is not None else patch.path
    if target is None:
        raise PatchError("this patch has no file to be saved to")
    text = dump_patch(patch)
    parse_patch(text, target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def default_patch() -> Patch:
    """The built-in patch when none is given: CCs 21..28 on the eight most important controls."""
    return Patch(name="default", controls=[ControlMap(index=i, cc=21 + i) for i in range(8)])

