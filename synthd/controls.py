"""The control surface: the one place where wire values become latent values.

OSC, MIDI, presets and offline automation all call `ControlSurface`; it maps a wire value
(0..1) through the patch (invert, curve, range) onto the model control's useful range and
hands the result to `Engine.set_latent` with the control's smoothing. It also owns MIDI
learn, soft takeover (pickup), notes and pitch bend, presets with glide, and the
subscribers that hear about every change (OSC `/synthd/notify`).

Controls are addressed by model label (`brightness`), by decode input index (`"3"` or 3)
or by a patch alias. Every method is thread-safe: OSC, MIDI and the main thread share one
surface.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from synthd.engine import STEAL_S, Engine, EnvelopeSettings
from synthd.model import ControlInfo, Model
from synthd.patch import ControlMap, InputSettings, Patch, PatchError, Preset, save_patch
from synthd.voices import VoiceAllocator

log = logging.getLogger(__name__)

# shape of the "exponential" curve: r(u) = (e^(k u) - 1) / (e^k - 1); at k = 4 the middle
# of the knob gives 12 % of the range, like an audio-taper pot
EXP_SHAPE = 4.0
GAIN_RANGE_DB = (-120.0, 24.0)
# pickup: a knob whose value lands this close to the control's value has caught it
PICKUP_WINDOW = 2.0 / 127.0
DEFAULT_VOICES = 8
SUSTAIN_CC = 64
SLIDE_CC = 74  # MPE's third dimension: forward and back on the key
GATE_KEY = "gate"  # the voice the gate's drone plays (several voices)
ALL_SOUND_OFF_CC, ALL_NOTES_OFF_CC = 120, 123  # channel mode messages: the panic buttons
# registered parameters (RPN): CC 101/100 select one, CC 6 sets it. MPE controllers send
# "pitch bend sensitivity" (0, 0) and the MPE configuration message (0, 6) when they connect
RPN_MSB_CC, RPN_LSB_CC, DATA_ENTRY_CC = 101, 100, 6
RPN_BEND_RANGE, RPN_MPE_CONFIG, RPN_NONE = (0, 0), (0, 6), (127, 127)

Subscriber = Callable[[str, str, float], None]  # (kind: "control"|"gain"|"gate", name, value)


def shape(m: ControlMap, u: float) -> float:
    """Wire value u (0..1) -> position in the model's useful range (0 = min, 1 = max)."""
    if m.invert:
        u = 1.0 - u
    if m.curve == "exponential":
        u = math.expm1(EXP_SHAPE * u) / math.expm1(EXP_SHAPE)
    lo, hi = m.range
    return lo + u * (hi - lo)


def unshape(m: ControlMap, r: float) -> float:
    """Inverse of `shape`, clamped to 0..1: the wire value that gives range position r."""
    lo, hi = m.range
    u = min(1.0, max(0.0, (r - lo) / (hi - lo)))
    if m.curve == "exponential":
        u = math.log1p(u * math.expm1(EXP_SHAPE)) / EXP_SHAPE
    return 1.0 - u if m.invert else u


@dataclass
class Control:
    """One model control as the surface sees it."""

    info: ControlInfo
    mapping: ControlMap  # from the patch, or a plain linear one for unmapped controls
    wire: float  # the value last set, 0..1 (before pitch bend)
    offset: float = 0.0  # pitch bend, in wire units
    caught: bool = True  # pickup: False until the knob crosses the control's value
    knob: float | None = None  # pickup: where the knob was last seen
    msb: int = 0  # 14-bit CC: the last MSB
    # a pitch input in MIDI units: the note last played (exact, None once a knob or OSC sets the
    # control) and the pitch bend on top, in semitones
    note: float | None = None
    bend: float = 0.0

    def model_value(self) -> float:
        """The model-unit value the engine is heading for."""
        value = self.at_wire(self.wire + self.offset)
        if self.info.unit == "midi":
            value = (value if self.note is None else self.note) + self.bend
        return min(self.info.maximum, max(self.info.minimum, value))

    def at_wire(self, u: float) -> float:
        """The model-unit value of wire value `u` (clamped to 0..1) through the mapping."""
        lo, hi = self.info.minimum, self.info.maximum
        return lo + shape(self.mapping, min(1.0, max(0.0, u))) * (hi - lo)


def voice_count(patch: Patch, model: Model) -> int:
    """The patch's `voices`, else 8 for a model with a pitch input (it plays chords in tune) and
    1 for one without (a drone of latents, played as one instrument)."""
    if patch.voices is not None:
        return patch.voices
    return DEFAULT_VOICES if any(c.unit == "midi" for c in model.controls) else 1


def envelope_of(patch: Patch) -> EnvelopeSettings:
    g = patch.gate
    return EnvelopeSettings(attack=g.attack, decay=g.decay, sustain=g.sustain, release=g.release)


def engine_for(model: Model, patch: Patch, *, channels: int, block_frames: int, threads: int,
               audio_input: bool = False, input_trim_db: float = 0.0) -> Engine:
    """The engine that plays `model` under `patch`: its voices, envelope, gate and gain. With
    `audio_input`, one voice driven by the input under the patch's `[input]` settings, whose gain
    adds to `input_trim_db` (the command line's `--input-gain`); ModelError when the model has no
    usable `encode`."""
    settings = input_settings_of(patch, input_trim_db) if audio_input else None
    return Engine(model, channels=channels, block_frames=block_frames, threads=threads,
                  gate_open=patch.gate.open, gain_db=patch.gain_db,
                  voices=1 if audio_input else voice_count(patch, model), envelope=envelope_of(patch),
                  input_settings=settings)


def input_trim_db(gain: str | float, model: Model) -> float:
    """The command line's `--input-gain` for `model`: a number of dB, or "auto": the gain the
    model's training set got in `prepare` (its metadata's `preprocessing.gain_db`; 0 when the file
    does not say), so input recorded at the level of that set's files meets the encoder as they did."""
    if gain != "auto":
        return float(gain)
    value = (model.metadata.get("preprocessing") or {}).get("gain_db")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    log.warning("%s: no training gain in the model file; --input-gain auto is 0 dB", model.path)
    return 0.0


def input_settings_of(patch: Patch, trim_db: float) -> InputSettings:
    """The patch's `[input]` with the command line's trim added to its gain."""
    return dataclasses.replace(patch.input, gain_db=patch.input.gain_db + trim_db)


@dataclass
class Counters:
    clamped: int = 0  # out-of-range values brought into range
    learned: int = 0
    recalled: int = 0
    pickup_waits: int = 0  # knob moves ignored while waiting for pickup


@dataclass
class _Notes:
    held: list[int] = field(default_factory=list)  # last-note priority


class ControlSurface:
    """Binds a patch to the engine's model and applies every control change."""

    def __init__(self, engine: Engine, patch: Patch):
        self.engine = engine
        self.patch = patch
        self.counters = Counters()
        self.learning: str | None = None  # label armed for MIDI learn
        self.dirty = False  # learned mappings not yet written back
        self._lock = threading.RLock()
        self._subscribers: list[Subscriber] = []
        self._notes = _Notes()
        self._controls: list[Control] = []
        self._by_name: dict[str, Control] = {}
        self.gain_db = patch.gain_db
        self.warnings: list[str] = []
        # several voices: who plays what, and what MPE member channels last said
        self.voices = VoiceAllocator(engine.voices) if engine.voices > 1 else None
        self._bend = 0.0  # semitones of the (master) pitch bend, on every voice
        self._channel_bend: dict[int, float] = {}  # MPE member channel -> semitones
        self._channel_pressure: dict[int, float] = {}  # MPE member channel -> wire value
        self._channel_slide: dict[int, float] = {}
        self._rpn: dict[int, list[int]] = {}  # channel -> the RPN selected (MSB, LSB)
        self._zone = patch.midi.mpe_zone()  # (master, member channels), as the patch or an MCM says
        self._bend_ranges = (patch.midi.bend_range, patch.midi.mpe_bend_range)  # master, members (RPN 0)
        self._bind(engine.model, patch, keep={})
        # with audio input: the command line's trim under the patch's input gain
        settings = engine.input_settings
        self.input_trim_db = settings.gain_db - patch.input.gain_db if settings is not None else 0.0
        self.gate_open = False
        self._gate_closed_at: int | None = None  # one voice: the clock when its gate last closed
        engine.set_gain_db(self.gain_db)
        if self.voices is None:
            self.gate_open = patch.gate.open
            engine.set_gate(self.gate_open, attack_s=0.0, release_s=0.0)
        elif patch.gate.open:
            self.set_gate(True)

    # ---------------------------------------------------------------- binding

    def _bind(self, model: Model, patch: Patch, keep: dict[str, float]) -> None:
        """Build the controls of `model` under `patch`; `keep` holds wire values by label."""
        maps: dict[int, ControlMap] = {}
        missing = []
        for m in patch.controls:
            info = next((c for c in model.controls if c.label == m.label), None) if m.label is not None \
                else (model.controls[m.index] if m.index < model.latent_size else None)
            if info is None:
                missing.append(m.target())
            else:
                maps[info.index] = m
        self.warnings = ([f"patch {patch.name!r}: model {model.name!r} ({model.latent_size} controls) has no "
                          f"control {', '.join(missing)}; those mappings are idle"] if missing else [])
        controls = []
        for info in model.controls:
            m = maps.get(info.index, ControlMap(label=info.label))
            if info.label in keep:
                wire = keep[info.label]
            elif m.default is not None:
                wire = m.default
            else:
                span = info.maximum - info.minimum
                wire = unshape(m, (info.default - info.minimum) / span)
            caught = not patch.pickup_of(m) or m.cc is None
            controls.append(Control(info=info, mapping=m, wire=wire, caught=caught))
        by_name: dict[str, Control] = {}
        for c in controls:
            by_name[c.info.label] = c
            by_name[str(c.info.index)] = c
            if c.mapping.alias is not None:
                by_name[c.mapping.alias] = c
        self._controls, self._by_name = controls, by_name
        for c in controls:
            self.engine.set_latent(c.info.index, c.model_value(), glide_s=0.0)
        for w in self.warnings:
            log.warning("%s", w)

    def rebind(self, *, model: Model | None = None, patch: Patch | None = None) -> None:
        """After a model swap or a patch reload: keep every value whose label still exists.

        With a new patch, its output gain is applied (ramped by the engine).
        """
        with self._lock:
            keep = {c.info.label: c.wire for c in self._controls}
            if patch is not None:
                self.patch = patch
                self.learning = None
                self.dirty = False
                self.gain_db = patch.gain_db
                self.engine.set_gain_db(self.gain_db)
                self._zone = patch.midi.mpe_zone()
                self._bend_ranges = (patch.midi.bend_range, patch.midi.mpe_bend_range)
                if self.engine.input_settings is not None:
                    self.engine.set_input(input_settings_of(patch, self.input_trim_db))
                if self.voices is not None:
                    self.engine.set_envelope(envelope_of(patch))
                    wanted = voice_count(patch, self.engine.model)
                    if wanted != self.engine.voices:
                        log.warning("patch %r asks for %d voices; %d play until synthd restarts",
                                    patch.name, wanted, self.engine.voices)
            self._bind(model or self.engine.model, self.patch, keep)
            if self.voices is not None:  # the notes under way, in the new model's indices
                for v in range(self.engine.voices):
                    if self.voices.sounding(v, self.engine.clock):
                        self._post_voice(v, None)

    @property
    def controls(self) -> list[Control]:
        return list(self._controls)

    @property
    def lock(self) -> threading.RLock:
        """The surface's lock, for a caller that must change the engine and the surface at once."""
        return self._lock

    def find(self, key: str | int) -> Control | None:
        """The control called `key` (label, index or alias), None when there is none."""
        return self._by_name.get(str(key))

    def _require(self, key: str | int) -> Control:
        c = self.find(key)
        if c is None:
            raise KeyError(f"no control {key!r} (model {self.engine.model.name!r} has "
                           f"{', '.join(c.info.label for c in self._controls)})")
        return c

    # ---------------------------------------------------------------- subscribers

    def subscribe(self, fn: Subscriber) -> None:
        with self._lock:
            if fn not in self._subscribers:
                self._subscribers.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        with self._lock:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

    def _notify(self, kind: str, name: str, value: float, origin: object) -> None:
        for fn in list(self._subscribers):
            if fn is origin:
                continue  # the sender knows what it sent
            try:
                fn(kind, name, value)
            except Exception as exc:  # a broken listener must not break playing
                log.debug("subscriber %r failed: %s", fn, exc)

    # ---------------------------------------------------------------- setting values

    def _clamp(self, value: float, lo: float, hi: float, count: bool) -> float:
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        if value < lo or value > hi:
            if count:
                self.counters.clamped += 1
            return min(hi, max(lo, value))
        return value

    def _apply(self, c: Control, *, glide_s: float | None, at: int | None, origin: object) -> None:
        glide = c.mapping.smoothing if glide_s is None else glide_s
        self.engine.set_latent(c.info.index, c.model_value(), glide_s=glide, at=at)
        mid = self.patch.midi
        if self.voices is not None and c.info.label in (mid.pressure_control, mid.slide_control):
            # the notes that press or slide this control ride on its knob: they follow it
            now = self._now(at)
            for v, voice in enumerate(self.voices.voices):
                extra = voice.extra
                if self.voices.sounding(v, now) and (extra.get("pressure") is not None
                                                     or extra.get("slide") is not None):
                    self._post_voice(v, at)
        self._notify("control", c.info.label, c.wire, origin)

    def set(self, key: str | int, value: float, *, glide_s: float | None = None, at: int | None = None,
            origin: object = None, count_clamp: bool = True) -> float:
        """Set control `key` to wire value `value` (clamped to 0..1, counted); returns it.

        `at` is a time on the audio clock (samples); `glide_s` overrides the control's
        smoothing. A knob under pickup is released: the next MIDI move must catch it.
        Raises KeyError for an unknown control, ValueError for a non-finite value.
        """
        with self._lock:
            c = self._require(key)
            c.wire = self._clamp(float(value), 0.0, 1.0, count_clamp)
            c.note = None
            if self.patch.pickup_of(c.mapping) and c.mapping.cc is not None:
                c.caught = False
            self._apply(c, glide_s=glide_s, at=at, origin=origin)
            return c.wire

    def set_gain_db(self, db: float, *, at: int | None = None, origin: object = None) -> float:
        """Output gain in dB, clamped to -120..+24 (counted); returns the value applied."""
        with self._lock:
            self.gain_db = self._clamp(float(db), *GAIN_RANGE_DB, True)
            self.engine.set_gain_db(self.gain_db, at=at)
            self._notify("gain", "gain", self.gain_db, origin)
            return self.gain_db

    def set_gate(self, on: bool, *, velocity: float = 1.0, at: int | None = None, origin: object = None) -> None:
        """Open or close the gate with the patch's attack and release.

        With several voices, an open gate is a drone: one voice held at the shared controls (the
        `pitch` knob, not a note), as one voice's open gate is; closing it releases every voice."""
        with self._lock:
            g = self.patch.gate
            was_open, self.gate_open = self.gate_open, bool(on)
            if self.voices is None:
                # one voice of a model with a pitch input: its gate moves with the latent frames
                # (see Engine.set_gate), so a note opens on its own pitch, never on the last one's;
                # it starts afresh when its last note's release is surely over
                closed_at = self._gate_closed_at
                silent = not was_open and (closed_at is None or self._now(at) >= closed_at + self._release_samples())
                if was_open and not on:
                    self._gate_closed_at = self._now(at)
                self.engine.set_gate(self.gate_open, velocity=velocity, attack_s=g.attack, release_s=g.release,
                                     at=at, with_frame=self._pitch_input() is not None, fresh=silent)
            elif on:
                self._start_voice(GATE_KEY, None, None, velocity, at)
            else:
                now = self._now(at)
                for v in self.voices.held():
                    self.voices.voices[v].sustained = False
                    self.voices.release(self.voices.voices[v].key, now, self._release_samples())
                    self.engine.note_off(v, at=at)
            self._notify("gate", "gate", 1.0 if on else 0.0, origin)

    def set_input(self, key: str, value: float | str, label: str | None = None) -> None:
        """Change one `[input]` setting while playing (numbers clamped and counted, as controls are):
        gain_db, transpose, dry_wet, gate_db, pitch_source, or mode (of control `label`, or of all).
        ValueError when synthd has no input or the setting or value is not one."""
        from synthd.patch import INPUT_MODES, INPUT_RANGES, PITCH_SOURCES

        with self._lock:
            if self.engine.input_settings is None:
                raise ValueError("synthd plays without audio input (start it with --input)")
            current = self.patch.input
            if key in INPUT_RANGES:
                lo, hi = INPUT_RANGES[key]
                number = float(value)
                if not math.isfinite(number):
                    raise ValueError(f"{key}: {value} is not a number")
                changed = dataclasses.replace(current, **{key: self._clamp(number, lo, hi, True)})
            elif key == "pitch_source" and value in PITCH_SOURCES:
                changed = dataclasses.replace(current, pitch_source=str(value))
            elif key == "mode" and value in INPUT_MODES:
                if label is None:
                    changed = dataclasses.replace(current, mode=str(value), modes={})
                elif self.find(label) is None:
                    raise ValueError(f"no control {label!r}")
                else:
                    changed = dataclasses.replace(current, modes={**current.modes, self.find(label).info.label: str(value)})
            else:
                raise ValueError(f"{key} {value!r}: not an input setting (gain_db, transpose, dry_wet, gate_db f; "
                                 f"pitch_source {'|'.join(PITCH_SOURCES)}; mode [label] {'|'.join(INPUT_MODES)})")
            self.patch = dataclasses.replace(self.patch, input=changed)
            self.engine.set_input(input_settings_of(self.patch, self.input_trim_db))

    # ---------------------------------------------------------------- MIDI

    def midi_cc(self, channel: int, number: int, value: int, *, at: int | None = None) -> bool:
        """A CC on `channel` (1..16): learn, or move every control listening to it.

        Returns True when the CC was used (learned or applied).
        """
        with self._lock:
            if self.learning is not None:
                self._learn(channel, number)
                return True
            hears = self._hears(channel)
            if hears and number in (ALL_SOUND_OFF_CC, ALL_NOTES_OFF_CC) and not self._listened(channel, number):
                self.all_notes_off(at=at, now=number == ALL_SOUND_OFF_CC)
                return True
            if hears and number in (RPN_MSB_CC, RPN_LSB_CC, DATA_ENTRY_CC) and not self._listened(channel, number):
                self._registered(channel, number, value)
                return True
            if hears and self.voices is not None and not self._listened(channel, number):
                if number == SUSTAIN_CC:
                    now = self._now(at)
                    for v in self.voices.pedal(value >= 64, now, self._release_samples()):
                        self.engine.note_off(v, at=at)
                    return True
                if number == SLIDE_CC and self._member(channel) and self.find(self.patch.midi.slide_control):
                    self._channel_slide[channel] = value / 127.0
                    self._post_channel(channel, at)
                    return True
            used = False
            for c in self._controls:
                m = c.mapping
                if m.cc is None or number not in m.ccs():
                    continue
                ch = self.patch.channel_of(m)
                if ch is not None and ch != channel:
                    continue
                used = True
                if m.hires:
                    if number == m.cc:
                        c.msb = value
                        u = (value << 7) / 16383.0
                    else:
                        u = ((c.msb << 7) | value) / 16383.0
                else:
                    u = value / 127.0
                if not self._pickup(c, u):
                    continue
                c.wire = u
                self._apply(c, glide_s=None, at=at, origin=None)
            return used

    def _pickup(self, c: Control, u: float) -> bool:
        """Soft takeover: True once the knob has reached or crossed the control's value."""
        if c.caught:
            c.knob = u
            return True
        prev, c.knob = c.knob, u
        target = c.wire
        if abs(u - target) <= PICKUP_WINDOW or (prev is not None and (prev - target) * (u - target) <= 0):
            c.caught = True
            return True
        self.counters.pickup_waits += 1
        return False

    def arm_learn(self, key: str | int) -> str:
        """Arm MIDI learn: the next CC moved binds to control `key`. Returns its label."""
        with self._lock:
            self.learning = self._require(key).info.label
            return self.learning

    def _learn(self, channel: int, number: int) -> None:
        c = self._by_name[self.learning]
        self.learning = None
        patch = self.patch
        for other in patch.controls:  # a learned CC moves away from whoever had it
            if other.cc is not None and number in other.ccs() and other is not c.mapping:
                other.cc, other.hires = None, False
        m = c.mapping
        if m not in patch.controls:
            patch.controls.append(m)
        m.cc, m.hires = number, False
        m.channel = channel if patch.midi.channel is not None else None
        c.caught, c.knob = True, None
        self.counters.learned += 1
        self.dirty = True
        log.info("MIDI learn: CC %d (channel %d) -> %s", number, channel, c.info.label)

    def note_on(self, note: int, velocity: int, *, channel: int | None = None, at: int | None = None) -> None:
        """Note-on: the note control follows the note, the gate opens scaled by velocity. With
        several voices, the note gets a voice of its own (see `synthd.voices`)."""
        if velocity <= 0:
            self.note_off(note, channel=channel, at=at)
            return
        with self._lock:
            if not self.patch.midi.notes:
                return
            if self.voices is not None:
                drone = self.voices.find(GATE_KEY)
                if drone is not None:  # a played note ends the drone, as it closes one voice's gate
                    self.voices.release(GATE_KEY, self._now(at), self._release_samples())
                    self.engine.note_off(drone, at=at)
                    self.gate_open = False
                self._start_voice(self._key(note, channel), note, channel, velocity / 127.0, at)
                return
            if note in self._notes.held:
                self._notes.held.remove(note)
            self._notes.held.append(note)
            self._note_pitch(note, at)
            target = self.find(self.patch.midi.velocity_control) if self.patch.midi.velocity_control else None
            if target is not None:
                self.set(target.info.label, velocity / 127.0, glide_s=0.0, at=at)
            vel = velocity / 127.0 if self.patch.gate.velocity else 1.0
            self.set_gate(True, velocity=vel, at=at)

    def note_off(self, note: int, *, channel: int | None = None, at: int | None = None) -> bool:
        """Note-off: back to the previous held note (legato), or close the gate. With several
        voices, the note's voice is released (or held on by the sustain pedal). Whether this
        surface held the note."""
        with self._lock:
            if self.voices is not None:  # whatever the patch says now: a held key always lets go
                held = self.voices.find(self._key(note, channel)) is not None
                v = self.voices.release(self._key(note, channel), self._now(at), self._release_samples())
                if v is not None:
                    self.engine.note_off(v, at=at)
                return held
            if not self.patch.midi.notes or note not in self._notes.held:
                return False
            was_last = self._notes.held[-1] == note
            self._notes.held.remove(note)
            if not self._notes.held:
                self.set_gate(False, at=at)
            elif was_last:
                self._note_pitch(self._notes.held[-1], at)
            return True

    def _pitch_input(self) -> Control | None:
        """The note control when it is a pitch input in MIDI units (played in tune)."""
        mid = self.patch.midi
        c = self.find(mid.note_control) if mid.note_control else None
        return c if c is not None and c.info.unit == "midi" else None

    def _note_pitch(self, note: int, at: int | None) -> None:
        mid = self.patch.midi
        pitch = self._pitch_input()
        if pitch is not None:
            # the note number is the model value: no range, curve or learned scaling between
            span = pitch.info.maximum - pitch.info.minimum
            pitch.wire = min(1.0, max(0.0, (note - pitch.info.minimum) / span))
            pitch.note = float(note)
            self._apply(pitch, glide_s=mid.glide, at=at, origin=None)
            return
        c = self.find(mid.note_control) if mid.note_control else None
        if c is not None:
            self.set(c.info.label, (note - mid.note_low) / (mid.note_high - mid.note_low), glide_s=mid.glide,
                     at=at, count_clamp=False)

    def pitch_bend(self, value: int, *, channel: int | None = None, at: int | None = None) -> None:
        """Pitch bend (-8192..8191): a pitch input in MIDI units moves by up to ±bend_range
        semitones; the patch's bend control (another one) by up to ±bend_depth wire units. With
        several voices it bends every note; on an MPE member channel, that channel's note alone,
        by up to ±mpe_bend_range."""
        with self._lock:
            mid = self.patch.midi
            amount = max(-1.0, min(1.0, value / 8192.0))
            if self.voices is not None:
                if self._member(channel):
                    self._channel_bend[channel] = amount * self._bend_ranges[1]
                    self._post_channel(channel, at)
                    return
                self._bend = amount * self._bend_ranges[0]
                for v in range(self.engine.voices):
                    if self.voices.voices[v].extra.get("note") is not None:
                        self._post_voice(v, at)
            pitch = self._pitch_input()
            if pitch is not None:
                pitch.bend = amount * self._bend_ranges[0]
                self.engine.set_latent(pitch.info.index, pitch.model_value(), glide_s=0.0, at=at)
            c = self.find(mid.bend_control) if mid.bend_control else None
            if c is None or c is pitch:
                return
            c.offset = amount * mid.bend_depth
            self.engine.set_latent(c.info.index, c.model_value(), glide_s=0.0, at=at)

    def all_notes_off(self, *, at: int | None = None, now: bool = False) -> None:
        """Release every note, pedal or not (MIDI's All Notes Off); with `now`, fade them out at
        once instead of over their release (All Sound Off)."""
        with self._lock:
            if self.voices is None:
                self._notes.held.clear()
                if self.patch.midi.notes:
                    self.set_gate(False, at=at)
                return
            clock = self._now(at)
            self.voices.pedal(False, clock, self._release_samples())
            for v in range(self.engine.voices):
                if self.voices.sounding(v, clock):
                    # cut: the fade alone instead of the release
                    tail = self._release_samples(0.0 if now else None)
                    self.voices.release(self.voices.voices[v].key, clock, tail)
                    self.engine.note_off(v, at=at, fade=now)
            self.gate_open = False

    def pressure(self, value: int, *, channel: int | None = None, note: int | None = None,
                 at: int | None = None) -> bool:
        """Aftertouch (0..127) to the patch's pressure_control: of one note (polyphonic aftertouch,
        or channel pressure on an MPE member channel) when voices play notes, else shared.
        Whether a control took it."""
        with self._lock:
            c = self.find(self.patch.midi.pressure_control) if self.patch.midi.pressure_control else None
            if c is None:
                return False
            wire = min(1.0, max(0.0, value / 127.0))
            if self.voices is None or (note is None and not self._member(channel)):
                self.set(c.info.label, wire, glide_s=0.0, at=at)
            elif note is not None:
                v = self.voices.find(self._key(note, channel))
                if v is None:
                    return False
                self.voices.voices[v].extra["pressure"] = wire
                self._post_voice(v, at)
            else:
                self._channel_pressure[channel] = wire
                self._post_channel(channel, at)
            return True

    # ---------------------------------------------------------------- voices

    def _now(self, at: int | None) -> int:
        return self.engine.clock if at is None else at

    def _release_samples(self, release_s: float | None = None) -> int:
        """How long after its key-up a voice still sounds: the release (the patch's, or
        `release_s`), plus the latent frames its release may wait for (its own, and one more when
        its note started in the same frame) and a stolen note's fade."""
        model = self.engine.model
        release = self.patch.gate.release if release_s is None else release_s
        return int(math.ceil((release + STEAL_S) * self.engine.sample_rate
                             + 2 * model.hop * self.engine.sample_rate / model.sample_rate))

    def _hears(self, channel: int) -> bool:
        """Whether channel messages on `channel` (pedal, panic, RPN) are this patch's: its channel,
        any with omni, or any of its MPE zone."""
        wanted = self.patch.midi.channel
        zone = self._zone
        return (wanted is None or channel == wanted
                or zone is not None and (channel == zone[0] or channel in zone[1]))

    def _member(self, channel: int | None) -> bool:
        zone = self._zone
        return zone is not None and channel is not None and channel in zone[1]

    def _registered(self, channel: int, number: int, value: int) -> None:
        """RPN selection and data entry. Pitch bend sensitivity (RPN 0) sets the bend range of the
        channel's kind (a member channel's: every member's, as MPE asks; else the master's); the
        MPE configuration message (RPN 6) on channel 1 or 16 sets a lower or upper zone of
        `value` member channels (0: no zone), as an MPE controller asks when it connects."""
        rpn = self._rpn.setdefault(channel, list(RPN_NONE))
        if number == RPN_MSB_CC:
            rpn[0] = value
            return
        if number == RPN_LSB_CC:
            rpn[1] = value
            return
        if tuple(rpn) == RPN_BEND_RANGE:
            ranges = list(self._bend_ranges)
            ranges[1 if self._member(channel) else 0] = float(value)
            self._bend_ranges = (ranges[0], ranges[1])
        elif tuple(rpn) == RPN_MPE_CONFIG and channel in (1, 16):
            members = min(15, value)
            if members == 0:
                self._zone = None
            else:
                self._zone = (1, range(2, 2 + members)) if channel == 1 else (16, range(16 - members, 16))
                # the specification's default bend range of a new zone's members
                self._bend_ranges = (self._bend_ranges[0], 48.0)
            log.info("MPE configuration: %s", "no zone" if self._zone is None else
                     f"{'lower' if channel == 1 else 'upper'} zone, member channels "
                     f"{self._zone[1].start}..{self._zone[1].stop - 1}")

    def _key(self, note: int, channel: int | None) -> tuple[int, int]:
        """What a note is known by: its channel and number, whatever the zone says now (a zone set
        up or taken down while keys are held must not strand their note-offs)."""
        return (channel or 0, note)

    def _listened(self, channel: int, number: int) -> bool:
        """Whether a patch control listens to CC `number` on `channel` (it then wins over the
        sustain pedal and MPE slide)."""
        for c in self._controls:
            m = c.mapping
            ch = self.patch.channel_of(m)
            if m.cc is not None and number in m.ccs() and (ch is None or ch == channel):
                return True
        return False

    def _start_voice(self, key: object, note: int | None, channel: int | None, velocity: float,
                     at: int | None) -> None:
        """Give note `key` a voice and start it: its own values (pitch, velocity, pressure, slide)
        and its envelope, peaking at `velocity` (0..1) when the patch scales level by velocity."""
        v, steal = self.voices.allocate(key, self._now(at))
        extra = {"note": note, "channel": channel, "velocity": velocity}
        if self._member(channel):
            extra["pressure"] = self._channel_pressure.get(channel)
            extra["slide"] = self._channel_slide.get(channel)
        self.voices.voices[v].extra = extra
        peak = velocity if self.patch.gate.velocity else 1.0
        self.engine.note_on(v, peak, self._voice_values(v), glide_s=self.patch.midi.glide, steal=steal, at=at)

    def _voice_values(self, v: int) -> dict[int, float]:
        """Voice `v`'s own latent values (index -> model units): its note's pitch (exact for a
        pitch input, with the bends), and its velocity, pressure and slide controls."""
        mid = self.patch.midi
        extra = self.voices.voices[v].extra
        values: dict[int, float] = {}
        note = extra.get("note")
        if note is not None:
            pitch = self._pitch_input()
            c = self.find(mid.note_control) if mid.note_control else None
            if pitch is not None:
                bend = self._bend + self._channel_bend.get(extra.get("channel"), 0.0)
                values[pitch.info.index] = min(pitch.info.maximum, max(pitch.info.minimum, note + bend))
            elif c is not None:
                values[c.info.index] = c.at_wire((note - mid.note_low) / (mid.note_high - mid.note_low))
        wires: dict[int, tuple[Control, float]] = {}  # index -> (control, wire value for this note)
        c = self.find(mid.velocity_control) if mid.velocity_control else None
        if c is not None:  # as with one voice, velocity sets its control outright
            wires[c.info.index] = (c, extra["velocity"])
        # pressure and slide are offsets on top of their control's knob (or velocity), for this note
        for name, key in ((mid.pressure_control, "pressure"), (mid.slide_control, "slide")):
            c = self.find(name) if name else None
            if c is not None and extra.get(key) is not None:
                wires[c.info.index] = (c, wires.get(c.info.index, (c, c.wire))[1] + extra[key])
        for index, (c, wire) in wires.items():
            values[index] = c.at_wire(wire)
        return values

    def _post_voice(self, v: int, at: int | None) -> None:
        for index, value in self._voice_values(v).items():
            self.engine.set_latent(index, value, glide_s=0.0, at=at, voice=v)

    def _post_channel(self, channel: int, at: int | None) -> None:
        """An MPE member channel changed: its sounding note follows (pressure and slide too)."""
        now = self._now(at)
        for v, voice in enumerate(self.voices.voices):
            if voice.extra.get("channel") == channel and self.voices.sounding(v, now):
                voice.extra["pressure"] = self._channel_pressure.get(channel)
                voice.extra["slide"] = self._channel_slide.get(channel)
                self._post_voice(v, at)

    # ---------------------------------------------------------------- presets

    def save_preset(self, name: str) -> Preset:
        """Store the current values under `name` (replacing one of that name) and write the
        patch file back when it has one, so the set list survives a restart."""
        if not name:
            raise ValueError("a preset needs a name")
        with self._lock:
            patch = self.patch
            old = patch.preset(name)
            used = {p.program for p in patch.presets if p.program is not None}
            program = old.program if old is not None else next((n for n in range(128) if n not in used), None)
            preset = Preset(name=name, values={c.info.label: round(c.wire, 6) for c in self._controls},
                            program=program, gain_db=self.gain_db)
            if old is not None:
                patch.presets[patch.presets.index(old)] = preset
            else:
                patch.presets.append(preset)
            self._write_back()
            return preset

    def recall_preset(self, key: str | int, *, at: int | None = None) -> Preset:
        """Glide to preset `key` (name, or program number for an int) over the patch's glide
        time. Raises KeyError when there is no such preset."""
        with self._lock:
            preset = self.patch.preset(key)
            if preset is None:
                names = ", ".join(p.name for p in self.patch.presets) or "none"
                raise KeyError(f"no preset {key!r} in patch {self.patch.name!r} (presets: {names})")
            for label, value in preset.values.items():
                if self.find(label) is not None:
                    self.set(label, value, glide_s=self.patch.preset_glide, at=at)
            if preset.gain_db is not None:
                self.set_gain_db(preset.gain_db, at=at)
            self.counters.recalled += 1
            return preset

    def save_patch(self) -> str:
        """Write learned mappings and presets to the patch file; returns its path.

        Raises PatchError when the patch in use has no file (the built-in default)."""
        with self._lock:
            path = self._write_back()
            if path is None:
                raise PatchError("the patch in use is the built-in default and has no file "
                                 "(start with --patch FILE.toml to keep changes)")
            return str(path)

    def _write_back(self) -> Path | None:
        """Save the patch where it came from; None (and a warning) when it has no file."""
        if self.patch.path is None:
            log.warning("patch %r has no file: the change lives until synthd stops", self.patch.name)
            return None
        path = save_patch(self.patch)
        self.dirty = False
        return path

    # ---------------------------------------------------------------- reading

    def voice_snapshot(self) -> list[tuple[int, str, int, int, float]]:
        """Per voice: (index, state "held" | "sustained" | "released" | "free", note (-1: none or
        the gate's drone), MIDI channel (0: none), pitch in model units (-1: no pitch control)).
        One voice plays as one instrument: its row is the gate and the pitch control."""
        with self._lock:
            pitch = self._pitch_input() or (self.find(self.patch.midi.note_control)
                                            if self.patch.midi.note_control else None)
            if self.voices is None:
                note = self._notes.held[-1] if self._notes.held else -1
                return [(0, "held" if self.gate_open else "free", note, 0,
                         pitch.model_value() if pitch is not None else -1.0)]
            now, rows = self.engine.clock, []
            for v, voice in enumerate(self.voices.voices):
                state = ("sustained" if voice.sustained else "held" if voice.held
                         else "released" if self.voices.sounding(v, now) else "free")
                value = -1.0
                if pitch is not None:
                    value = self._voice_values(v).get(pitch.info.index, pitch.model_value())
                note = voice.extra.get("note")
                rows.append((v, state, -1 if note is None else note, voice.extra.get("channel") or 0, value))
            return rows

    def snapshot(self) -> list[tuple[str, int, float, float, float, float, str]]:
        """Per control: (label, index, wire value, model value, min, max, label source)."""
        with self._lock:
            return [(c.info.label, c.info.index, c.wire, c.model_value(), c.info.minimum, c.info.maximum,
                     c.info.source) for c in self._controls]
