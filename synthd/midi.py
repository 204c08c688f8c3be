"""MIDI in: messages (mido) from a port (python-rtmidi) onto the control surface.

`MidiRouter` turns one MIDI message into control-surface calls; live input and the
offline renderer (MIDI files) share it. `MidiInput` opens a port through rtmidi's JACK
API when a JACK server runs, else rtmidi's default API: `--midi-in virtual` creates a
port `synthd:midi_in` for others to connect to, `--midi-in NAME` connects to the first
output port whose name contains NAME (case-insensitive). A port found by name that goes
away (a keyboard unplugged, a bridge restarted) is looked for each second and connected
again when a port of that name is back; the status counts both.

Message handling: CC -> patch controls (or MIDI learn; with several voices, an unmapped
CC 64 is the sustain pedal and CC 74 on an MPE member channel the note's slide); note on/off
-> gate (or a voice) and the patch's note control; pitch bend -> the patch's bend control
(per note on an MPE member channel); channel and polyphonic aftertouch -> the patch's
pressure control; program change -> preset recall. System exclusive and anything that does not parse is counted and ignored.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import mido

from synthd.controls import ControlSurface

log = logging.getLogger(__name__)

VIRTUAL = "virtual"
CLIENT_NAME = "synthd"
PORT_NAME = "midi_in"
# rtmidi's queue between its JACK thread and our reader: room for 8192 messages between two drains
QUEUE_SIZE = 8192
POLL_INTERVAL_S = 0.001
# messages the render thread takes from rtmidi's queue before each block (see `MidiInput.drain`):
# a chord's worth, so a flood leaves its rest to the reader instead of delaying the block
RENDER_DRAIN_LIMIT = 32
# how long after the audio callback the render thread waits before it drains the port (see
# `LiveOutput.event_grace_s`): a note-on in an 8-voice chord came a period late in 14 % of 57
# trials without it, 2.7 % of 75 with it (JACK dummy server, 2 blocks ahead, 2-core VM)
SAME_CYCLE_GRACE_S = 0.001
RESCAN_S = 1.0  # how often a port found by name is looked for
CLOSE_TIMEOUT_S = 1.0  # closing a client of a JACK server that died can block


class MidiError(Exception):
    """A MIDI port that cannot be opened; the message lists what is there."""


@dataclass
class MidiCounters:
    messages: int = 0
    sysex: int = 0  # system exclusive: counted, ignored
    invalid: int = 0  # bytes that are no MIDI message
    ignored: int = 0  # valid but unused (other channel, clock, aftertouch, ...)


class MidiRouter:
    """Applies MIDI messages to the control surfaces of the layers; `at` dates them on the audio
    clock. Each surface takes what its patch listens to: its channel, and for notes its key range
    (a split), so layers on one channel with the same range play together (a layer)."""

    def __init__(self, surface: ControlSurface, *more: ControlSurface):
        self.surfaces = [surface, *more]
        self.counters = MidiCounters()

    @property
    def surface(self) -> ControlSurface:
        """The first layer's surface."""
        return self.surfaces[0]

    def handle_bytes(self, data: list[int] | bytes, *, at: int | None = None) -> None:
        """One raw MIDI message as a port delivers it."""
        if data and data[0] == 0xF0:
            self.counters.sysex += 1
            return
        try:
            msg = mido.Message.from_bytes(list(data))
        except (ValueError, TypeError, IndexError):
            self.counters.invalid += 1
            return
        self.handle(msg, at=at)

    def handle(self, msg: mido.Message, *, at: int | None = None) -> None:
        """One parsed message (channels are 0-based in mido, 1-based in patches)."""
        self.counters.messages += 1
        if msg.type == "sysex":
            self.counters.sysex += 1
            return
        if not hasattr(msg, "channel"):
            self.counters.ignored += 1
            return
        used = False
        for surface in self.surfaces:
            used = self._apply(surface, msg, msg.channel + 1, at) or used
        if not used:
            self.counters.ignored += 1

    def _apply(self, surface: ControlSurface, msg: mido.Message, channel: int, at: int | None) -> bool:
        """Apply `msg` to one surface; whether it took it."""
        kind = msg.type
        if kind == "control_change":
            return surface.midi_cc(channel, msg.control, msg.value, at=at)
        if kind == "note_off" or kind == "note_on" and msg.velocity == 0:
            # to every layer, whatever its channel and key range say now (a patch reloaded while
            # the key was down): only the layer holding the key has anything to release
            return surface.note_off(msg.note, channel=channel, at=at)
        midi = surface.patch.midi
        if midi.channel is not None and channel != midi.channel:
            return False
        if kind in ("note_on", "note_off", "polytouch") and not midi.key_low <= msg.note <= midi.key_high:
            return False
        if kind == "note_on":
            surface.note_on(msg.note, msg.velocity, channel=channel, at=at)
        elif kind == "note_off":
            surface.note_off(msg.note, channel=channel, at=at)
        elif kind == "pitchwheel":
            surface.pitch_bend(msg.pitch, channel=channel, at=at)
        elif kind in ("aftertouch", "polytouch"):
            return surface.pressure(msg.value, channel=channel, note=msg.note if kind == "polytouch" else None, at=at)
        elif kind == "program_change" and midi.program_change:
            try:
                surface.recall_preset(msg.program, at=at)
            except KeyError:
                log.info("program change %d: the patch has no preset with that program", msg.program)
                return False
        else:
            return False
        return True


def _free_client_name(api: int) -> str:
    """`synthd`, or `synthd-2`, `synthd-3`... when another synthd already has a port, so the
    name printed at start-up is the one other programs see (JACK would rename silently)."""
    import rtmidi

    probe = rtmidi.MidiOut(rtapi=api, name=f"{CLIENT_NAME}-probe")
    try:
        taken = {p.split(":", 1)[0] for p in probe.get_ports()}
    finally:
        probe.delete()
    if api == rtmidi.API_UNIX_JACK:  # audio clients too: `--input virtual`'s ports are synthd:in_*
        taken |= _jack_clients()
    n = 1
    while (name := CLIENT_NAME if n == 1 else f"{CLIENT_NAME}-{n}") in taken:
        n += 1
    return name


def _jack_clients() -> set[str]:
    """Names of the JACK clients with ports (empty when JACK cannot be asked)."""
    try:
        import jack

        probe = jack.Client(f"{CLIENT_NAME}-probe", no_start_server=True)
    except Exception:
        return set()
    try:
        return {p.name.split(":", 1)[0] for p in probe.get_ports()}
    finally:
        probe.close()


class MidiInput:
    """A live MIDI input port feeding a router from a reader thread of its own.

    `wait_for_port`: a port named by `spec` that is not there yet is looked for each second
    instead of refused (a daemon resumed after its audio server came back)."""

    def __init__(self, router: MidiRouter, spec: str, *, wait_for_port: bool = False):
        import rtmidi

        from synthd.listing import midi_api

        self.router = router
        self.spec = spec
        self.losses = 0
        self.reconnects = 0
        self.abandoned = False
        self._closed = False
        api = midi_api()
        try:
            client = _free_client_name(api) if spec == VIRTUAL else CLIENT_NAME
            self._port = rtmidi.MidiIn(rtapi=api, name=client, queue_size_limit=QUEUE_SIZE)
        except rtmidi.SystemError as exc:
            raise MidiError(f"no MIDI back-end could be opened ({exc}); start a JACK server or make "
                            "the ALSA sequencer available") from None
        self.api = rtmidi.get_api_display_name(self._port.get_current_api())
        # sysex arrives so that it is counted; clock and active sensing never reach Python
        self._port.ignore_types(sysex=False, timing=True, active_sense=True)
        self.connected = True
        try:
            if spec == VIRTUAL:
                self._port.open_virtual_port(PORT_NAME)
                self.name = f"{client}:{PORT_NAME}" if "jack" in self.api.lower() else PORT_NAME
            elif not self._connect():
                ports = self._port.get_ports()
                if not wait_for_port:
                    raise MidiError(f"no MIDI input port matches {spec!r} ({self.api}); ports: "
                                    f"{', '.join(ports) or 'none'} (or use --midi-in virtual)")
                self.connected = False
                self.name = spec
                log.warning("MIDI: no input port matches %r yet; looking for it every %.0f s", spec, RESCAN_S)
        except rtmidi.SystemError as exc:
            self._port.delete()
            raise MidiError(f"cannot open MIDI port {spec!r} ({self.api}): {exc}") from None
        except MidiError:
            self._port.delete()
            raise
        self._stop = threading.Event()
        self._port_lock = threading.Lock()  # one reader of rtmidi's queue at a time; the port stays open
        self._thread = threading.Thread(target=self._poll, name="synthd-midi", daemon=True)
        self._thread.start()

    def _connect(self) -> bool:
        """Connect to the first port whose name contains `spec`; whether one was there."""
        ports = self._port.get_ports()
        match = next((i for i, p in enumerate(ports) if self.spec.lower() in p.lower()), None)
        if match is None:
            return False
        if self._port.is_port_open():
            self._port.close_port()
        self._port.open_port(match, PORT_NAME)
        self.name = ports[match]
        return True

    def _poll(self) -> None:
        """Drain rtmidi's queue every POLL_INTERVAL_S until closed; every RESCAN_S, look for a
        port found by name that went away.

        No rtmidi callback on purpose: with one, rtmidi's JACK back-end runs the Python handler
        inside the JACK process cycle, which then waits for the GIL (measured: up to 5 ms of a
        5.3 ms period) and makes the whole graph late. The queue is lock-free, so JACK's thread
        never waits on Python; the cost is at most POLL_INTERVAL_S of added latency."""
        import time

        next_scan = time.monotonic() + RESCAN_S
        while not self._stop.is_set():
            self.drain()
            if self.spec != VIRTUAL and time.monotonic() >= next_scan:
                next_scan = time.monotonic() + RESCAN_S
                with self._port_lock:
                    self._rescan()
            self._stop.wait(POLL_INTERVAL_S)

    def drain(self, limit: int | None = None, *, wait: bool = True) -> int:
        """Hand the messages waiting in rtmidi's queue to the router now (at most `limit`); how
        many. The render thread calls it without `wait` just before each block, so a note that
        reached the port by then plays in that block rather than the next (the reader's poll
        would come up to a millisecond later, after the block began). Without `wait` it does
        nothing when the reader or a control surface is busy (a model swap, a preset being
        written): the render thread never waits for them, and the reader takes the message."""
        if not self._port_lock.acquire(blocking=wait):
            return 0
        held: list[threading.RLock] = []
        try:
            if not wait:
                for surface in self.router.surfaces:
                    if not surface.lock.acquire(blocking=False):
                        return 0
                    held.append(surface.lock)
            count = 0
            while not self._closed and (limit is None or count < limit):
                event = self._port.get_message()
                if event is None:
                    break
                self._handle(event[0])
                count += 1
            return count
        except Exception:  # a port closing under us: the reader counts and reconnects
            log.debug("MIDI drain failed", exc_info=True)
            return 0
        finally:
            for lock in reversed(held):
                lock.release()
            self._port_lock.release()

    def _rescan(self) -> None:
        try:
            present = any(self.name == p for p in self._port.get_ports())
            if self.connected and not present:
                self.connected = False
                self.losses += 1
                log.warning("MIDI: %s went away; connecting again when a port matching %r is back",
                            self.name, self.spec)
            elif not self.connected and self._connect():
                self.connected = True
                self.reconnects += 1
                log.warning("MIDI: connected again to %s", self.name)
        except Exception as exc:  # a back-end that fails now may work next time
            log.debug("MIDI rescan failed: %s", exc)

    def _handle(self, data: list[int]) -> None:
        try:
            self.router.handle_bytes(data)
        except Exception:  # the reader thread must survive any message
            self.router.counters.invalid += 1
            log.debug("MIDI message %r failed", data, exc_info=True)

    @property
    def endpoint(self) -> str:
        return f"midi:{self.name} ({self.api})"

    def stats(self) -> dict[str, object]:
        return {"midi": "ok" if self.connected else "lost", "midi_losses": self.losses,
                "midi_reconnects": self.reconnects}

    def close(self) -> None:
        """Stop the reader and close the port, within CLOSE_TIMEOUT_S (else `abandoned`)."""
        if self._closed:
            return
        # a drain under way finishes first and none starts after; a rescan stuck in a dead JACK
        # server's call keeps the lock, so the wait is bounded
        locked = self._port_lock.acquire(timeout=CLOSE_TIMEOUT_S)
        self._closed = True
        if locked:
            self._port_lock.release()
        self._stop.set()
        self._thread.join(timeout=2.0)

        def close_port() -> None:
            try:
                self._port.close_port()
            finally:
                self._port.delete()

        from synthd.audio import bounded

        if not bounded(close_port, CLOSE_TIMEOUT_S, "synthd-midi-close"):
            self.abandoned = True
