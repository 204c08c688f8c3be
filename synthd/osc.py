"""The OSC server: python-osc over UDP, routed onto the control surface.

Addresses (numbers may be int or float everywhere; Pd sends floats, Max ints):

    /synthd/control/<name> f   control by label or patch alias, wire value 0..1
    <alias address> f          a patch alias given as a whole address (e.g. /1/fader1)
    /synthd/latent/<i> f       control by decode input index, 0..1
    /synthd/gain f             output gain, dB (-120..+24)
    /synthd/gate i [f]         1 opens (optional velocity 0..1), 0 closes
    /synthd/note i i           note number, velocity 1..127 plays it, 0 releases it (as MIDI)
    /synthd/status             -> /synthd/status.reply (fields: STATUS_FIELDS, in order)
    /synthd/controls           -> one /synthd/controls.reply per control:
                                  name s, index i, value f (0..1), model value f,
                                  min f, max f (model units), label source s
    /synthd/voices             -> one /synthd/voices.reply per voice: index i, state s
                                  (held, sustained, released, free), note i (-1: none),
                                  MIDI channel i (0: none), pitch f (model units, -1: none)
    /synthd/layers             -> one /synthd/layers.reply per layer (fields: LAYER_FIELDS)
    /synthd/layer/<name>/...   any address above, on layer <name> (`synthd run` with several
                               models); the addresses without it act on the first layer, and
                               /synthd/layer/<name>/status reports that layer alone
    /synthd/model/load s       a model NAME from the model folder (never a path)
    /synthd/patch/load s       a patch NAME from the patch folder (never a path)
    /synthd/patch/save         write learned mappings and presets to the patch file
    /synthd/learn s            arm MIDI learn for control s
    /synthd/preset/save s      store the current values as preset s (in the patch file)
    /synthd/preset/recall s|i  glide to preset s (or program number i)
    /synthd/notify i           1: send this client every value change, 0: stop
                               (/synthd/control/<label> f, /synthd/gain f, /synthd/gate i)
    /synthd/replyport i        send this client's replies and notifications to port i on
                               its host instead of its source port (Max's udpsend cannot
                               receive: pair it with a udpreceive on port i)
    /synthd/input/<key> f      with audio input (`synthd run --input`): gain_db, transpose,
                               dry_wet, gate_db (as the patch's [input]); pitch_source s
                               (input|notes); mode s [s] (follow|offset|knob|scale for every
                               control, or: label, mode for one)
    /synthd/quit               fade out and stop

Sent to notification subscribers (see /synthd/notify) besides value changes:
    /synthd/audio s            `lost` when the audio device or its server goes away, `ok`
                               when synthd plays again

Replies follow scsynth: commands answer `/done <address> [detail]`; any refused message
answers `/fail <address> <reason>`; value messages (control, latent, gain, gate) answer
only when they fail, so a 1 kHz stream is not echoed. Replies carry no blobs.

Nothing a client sends can stop the server: datagrams that do not parse are counted as
`invalid` and ignored; wrong argument types are counted as `invalid` and answered with
/fail; out-of-range values are clamped and counted (`clamped`). Bundles with a future
timetag are applied on the audio clock (`Engine` events `at=`), never by sleeping in
the server thread (the dispatcher runs with `strict_timing=False`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import build_msg
from pythonosc.osc_packet import OscPacket
from pythonosc.osc_server import BlockingOSCUDPServer

from synthd.controls import ControlSurface

log = logging.getLogger(__name__)

PREFIX = "/synthd"
LAYER_PREFIX = PREFIX + "/layer/"
MAX_SUBSCRIBERS = 32
MAX_DATAGRAM = 65535  # read whole datagrams, so a huge one is judged whole, not truncated
RECEIVE_BUFFER = 4 << 20
# /fail replies per client and second, at most: a flood of bad messages is counted, and not
# answered message for message (which would flood the sender, or a spoofed victim, in turn)
FAIL_REPLIES_PER_S = 50
# (field in Host.status(), OSC type) in the order /synthd/status.reply sends them
STATUS_FIELDS: tuple[tuple[str, type], ...] = (
    ("model", str), ("sample_rate", int), ("block_frames", int), ("latency_ms", float),
    ("underruns", int), ("nan_blocks", int), ("render_load_mean", float), ("render_load_peak", float),
    ("invalid", int), ("unknown", int), ("clamped", int), ("gate", int), ("gain_db", float),
    ("sysex", int), ("render_ms_mean", float), ("render_ms_p99", float), ("render_ms_max", float),
    ("ring_underruns", int), ("output_underflows", int), ("decode_errors", int),
    ("audio", str), ("audio_losses", int), ("audio_reconnects", int),
    ("midi", str), ("midi_losses", int), ("midi_reconnects", int),
    ("late_underruns", int), ("xrun_underruns", int), ("web_clients", int), ("web_refused", int),
    ("voices", int), ("voices_sounding", int), ("voices_stolen", int), ("layers", int),
    ("input", str), ("input_underruns", int), ("input_overruns", int), ("input_level_db", float),
    ("input_lag_ms", float), ("input_fault", str), ("render_scheduling", str),
    ("callback_scheduling", str), ("callbacks_held", int), ("callback_held_ms_max", float),
    ("skipped_calls", int), ("skipped_rows", int), ("callbacks", int),
)
# (field of synthd.rack.Layer.summary(), OSC type) in the order /synthd/layers.reply sends them
LAYER_FIELDS: tuple[tuple[str, type], ...] = (
    ("name", str), ("model", str), ("patch", str), ("voices", int), ("voices_sounding", int),
    ("voices_stolen", int), ("channel", int), ("key_low", int), ("key_high", int), ("gain_db", float),
    ("nan_blocks", int), ("decode_errors", int),
)

Reply = tuple  # (address, *args)


class Host(Protocol):
    """What the OSC server needs from the daemon beyond the control surface."""

    def status(self, surface: ControlSurface | None = None) -> dict[str, Any]: ...  # of a layer, or all

    def load_model(self, name: str, surface: ControlSurface | None = None) -> str: ...  # raises on refusal

    def load_patch(self, name: str, surface: ControlSurface | None = None) -> str: ...

    def layer_summaries(self) -> list[dict[str, Any]]: ...  # see synthd.rack.Layer.summary

    def quit(self) -> None: ...


class Refused(Exception):
    """A message that is answered with /fail; the text is the reason."""


@dataclass
class OscCounters:
    received: int = 0  # messages routed (a bundle counts its messages)
    invalid: int = 0  # datagrams that do not parse, or messages with wrong arguments
    unknown: int = 0  # addresses nobody answers to
    scheduled: int = 0  # messages from bundles with a future timetag
    unanswered: int = 0  # /fail replies not sent (over FAIL_REPLIES_PER_S)


def _number(msg: OscMessage, position: int = 0) -> float:
    args = msg.params
    if len(args) <= position:
        raise Refused(f"expects a number as argument {position + 1}")
    value = args[position]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused(f"argument {position + 1} must be a number (int or float), not {type(value).__name__}")
    return float(value)


def _text(msg: OscMessage) -> str:
    args = msg.params
    if len(args) != 1 or not isinstance(args[0], str) or not args[0]:
        raise Refused("expects one non-empty string")
    return args[0]


class _ClockedDispatcher(Dispatcher):
    """Parses each datagram itself, so that failures are counted and timetags kept."""

    def __init__(self, route: Callable[[OscMessage, float, tuple], None], counters: OscCounters):
        super().__init__(strict_timing=False)
        self._route = route
        self._counters = counters

    def call_handlers_for_packet(self, data: bytes, client_address: tuple) -> list[Reply]:
        """Route every message of the datagram; replies are sent by the router, so none
        are returned for python-osc to send."""
        try:
            packet = OscPacket(data)
            messages = packet.messages
        except Exception:  # python-osc raises several types on garbage; none may escape
            self._counters.invalid += 1
            return []
        if not messages:  # a bundle whose contents were all unreadable (python-osc skips them)
            self._counters.invalid += 1
            return []
        for timed in messages:
            self._route(timed.message, timed.time, client_address)
        return []


def looks_like_osc(data: bytes) -> bool:
    """An OSC packet is a whole number of 4-byte words and starts with an address or "#bundle":
    anything else is refused before any parsing, so garbage costs little."""
    return len(data) % 4 == 0 and (data[:1] == b"/" or data[:8] == b"#bundle\0")


class _Server(BlockingOSCUDPServer):
    max_packet_size = MAX_DATAGRAM

    def __init__(self, address: tuple[str, int], dispatcher: Dispatcher, counters: OscCounters):
        self._counters = counters
        super().__init__(address, dispatcher)
        # room for a burst: the kernel drops what does not fit, a status request included
        # (capped by net.core.rmem_max; best effort)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        except OSError:
            pass

    def verify_request(self, request, client_address) -> bool:
        ok = looks_like_osc(request[0]) and super().verify_request(request, client_address)
        if not ok:
            self._counters.invalid += 1
        return ok

    def handle_error(self, request, client_address) -> None:
        self._counters.invalid += 1
        log.debug("OSC message from %s failed", client_address, exc_info=True)


class OscServer:
    """Serves the OSC addresses above on UDP `host:port` in a thread of its own."""

    def __init__(self, surface: ControlSurface, host_app: Host, *, host: str = "127.0.0.1", port: int = 9000,
                 layers: dict[str, ControlSurface] | None = None):
        self.surface = surface  # the first layer's: today's addresses act on it
        self.layers = layers or {}
        self.app = host_app
        self.counters = OscCounters()
        self._subscribers: dict[tuple, Callable[[str, str, float], None]] = {}
        self._reply_ports: dict[tuple, tuple] = {}  # sender -> where its replies go
        self._fails: dict[tuple, tuple[int, int]] = {}  # sender -> (second, /fail replies in it)
        # clients that are not UDP senders (WebSocket connections, synthd.web): where their
        # replies go, and the subscriber that stands for them (their own changes are not echoed)
        self._external: dict[tuple, tuple[Callable[[Reply], None], object]] = {}
        self._busy = threading.Lock()  # one model/patch load at a time
        self._dispatcher = _ClockedDispatcher(self._route, self.counters)
        self._server = _Server((host, port), self._dispatcher, self.counters)
        self.address: tuple[str, int] = self._server.server_address[:2]
        self._thread: threading.Thread | None = None
        self._exact: dict[str, Callable[[OscMessage, tuple, int | None, ControlSurface], list[Reply]]] = {
            f"{PREFIX}/gain": self._gain,
            f"{PREFIX}/gate": self._gate,
            f"{PREFIX}/note": self._note,
            f"{PREFIX}/status": self._status,
            f"{PREFIX}/controls": self._controls,
            f"{PREFIX}/voices": self._voices,
            f"{PREFIX}/layers": self._layers,
            f"{PREFIX}/model/load": self._model_load,
            f"{PREFIX}/patch/load": self._patch_load,
            f"{PREFIX}/patch/save": self._patch_save,
            f"{PREFIX}/learn": self._learn,
            f"{PREFIX}/preset/save": self._preset_save,
            f"{PREFIX}/preset/recall": self._preset_recall,
            f"{PREFIX}/notify": self._notify,
            f"{PREFIX}/replyport": self._replyport,
            f"{PREFIX}/quit": self._quit,
        }

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="synthd-osc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        for fn in list(self._subscribers.values()):
            self.surface.unsubscribe(fn)
        self._subscribers.clear()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    @property
    def endpoint(self) -> str:
        return f"osc.udp://{self.address[0]}:{self.address[1]}"

    def send(self, client: tuple, address: str, *args: Any) -> None:
        """Send one message to `client` from the server's socket (so replies reach the sender),
        or through its own channel for an attached client."""
        external = self._external.get(client)
        if external is not None:
            external[0]((address, *args))
            return
        try:
            self._server.socket.sendto(build_msg(address, list(args)).dgram, client)
        except OSError as exc:
            log.debug("cannot send %s to %s: %s", address, client, exc)

    def broadcast(self, address: str, *args: Any) -> None:
        """Send one message to every notification subscriber."""
        for client in list(self._subscribers):
            self.send(self._reply_ports.get(client, client), address, *args)

    def subscribers(self) -> list[tuple[str, int]]:
        """Where notifications go, one (host, port) per subscriber."""
        return [tuple(self._reply_ports.get(client, client))[:2] for client in self._subscribers]

    def resubscribe(self, targets: list[tuple[str, int]]) -> None:
        """Subscribe `targets` again (a daemon resumed after its audio device came back)."""
        for target in targets[:MAX_SUBSCRIBERS]:
            self._subscribe(target)

    def _subscribe(self, client: tuple) -> None:
        fn = self._feedback(client)
        self._subscribers[client] = fn
        self.surface.subscribe(fn)

    def attach(self, client: tuple, deliver: Callable[[Reply], None], origin: object) -> None:
        """Serve a client that is not a UDP sender: `deliver(reply)` sends it its replies, and
        changes it makes are announced with `origin` (so its own subscriber skips them)."""
        self._external[client] = (deliver, origin)

    def detach(self, client: tuple) -> None:
        self._external.pop(client, None)
        self._fails.pop(client, None)

    def route_packet(self, data: bytes, client: tuple) -> None:
        """Handle one OSC packet from an attached client, with the checks and counters of a
        UDP datagram."""
        if not looks_like_osc(data):
            self.counters.invalid += 1
            return
        self._dispatcher.call_handlers_for_packet(data, client)

    def _origin(self, client: tuple) -> object:
        external = self._external.get(client)
        return external[1] if external is not None else self._subscribers.get(client)

    # ---------------------------------------------------------------- routing

    def _at(self, when: float) -> int | None:
        """Audio-clock sample for a bundle time (seconds since the epoch); None = now."""
        ahead = when - time.time()
        if ahead <= 0.0:
            return None
        engine = self.surface.engine
        self.counters.scheduled += 1
        return engine.clock + int(round(ahead * engine.sample_rate))

    def _route(self, msg: OscMessage, when: float, client: tuple) -> None:
        replies = self._answer(msg, when, client)
        target = self._reply_ports.get(client, client)
        for reply in replies:
            if reply[0] == "/fail" and not self._may_fail(client):
                self.counters.unanswered += 1
                continue
            self.send(target, *reply)

    def _may_fail(self, client: tuple) -> bool:
        """Whether `client` may get another /fail this second (FAIL_REPLIES_PER_S)."""
        second = int(time.monotonic())
        start, sent = self._fails.get(client, (second, 0))
        if start != second:
            start, sent = second, 0
        if len(self._fails) > 4 * MAX_SUBSCRIBERS and client not in self._fails:
            self._fails.clear()  # many senders (spoofed): forget the old ones, bounded memory
        self._fails[client] = (start, sent + 1)
        return sent < FAIL_REPLIES_PER_S

    def _layer_of(self, address: str) -> tuple[ControlSurface, str] | None:
        """The surface an address acts on and the address within it: `/synthd/layer/<name>/x` is
        `/synthd/x` on layer <name>; every other address acts on the first layer."""
        if not address.startswith(LAYER_PREFIX):
            return self.surface, address
        name, _, rest = address[len(LAYER_PREFIX):].partition("/")
        surface = self.layers.get(name)
        return None if surface is None or not rest else (surface, f"{PREFIX}/{rest}")

    def _answer(self, msg: OscMessage, when: float, client: tuple) -> list[Reply]:
        self.counters.received += 1
        address = msg.address
        try:
            found = self._layer_of(address)
            if found is None:
                self.counters.unknown += 1
                names = ", ".join(self.layers) or "none"
                return [("/fail", address, f"no such layer (layers: {names})")]
            surface, local = found
            handler = self._exact.get(local)
            if handler is not None:
                return handler(msg, client, self._at(when), surface)
            name = None
            if local.startswith(f"{PREFIX}/control/"):
                name = local[len(PREFIX) + 9:]
            elif local.startswith(f"{PREFIX}/latent/"):
                name = local[len(PREFIX) + 8:]
                if not name.isdigit():
                    raise Refused(f"{name!r} is not a latent index")
            elif local.startswith(f"{PREFIX}/input/"):
                return self._input(local[len(PREFIX) + 7:], msg, surface)
            elif surface.find(local) is not None:
                name = local  # a patch alias given as a whole address
            if name is None or surface.find(name) is None:
                self.counters.unknown += 1
                return [("/fail", address, "unknown address" if name is None else f"no control {name!r}")]
            if len(msg.params) != 1:
                raise Refused("expects exactly one number, 0..1")
            surface.set(name, _number(msg), at=self._at(when), origin=self._origin(client))
            return []
        except Refused as exc:
            self.counters.invalid += 1
            return [("/fail", address, str(exc))]
        except (KeyError, ValueError) as exc:
            self.counters.invalid += 1
            return [("/fail", address, str(exc.args[0]) if exc.args else type(exc).__name__)]
        except Exception as exc:  # a fault of ours: answer and log it, never stop serving
            log.exception("OSC %s failed", address)
            return [("/fail", address, f"internal error: {exc}")]

    # ---------------------------------------------------------------- handlers

    def _gain(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        if len(msg.params) != 1:
            raise Refused("expects exactly one number, in dB")
        surface.set_gain_db(_number(msg), at=at, origin=self._origin(client))
        return []

    def _input(self, key: str, msg: OscMessage, surface: ControlSurface) -> list[Reply]:
        if key == "mode" and len(msg.params) == 2:
            surface.set_input("mode", str(msg.params[1]), label=str(msg.params[0]))
        elif len(msg.params) != 1:
            raise Refused("expects one value (mode: a mode, or a control label and a mode)")
        elif key in ("mode", "pitch_source"):
            surface.set_input(key, str(msg.params[0]))
        else:
            surface.set_input(key, _number(msg))
        return []

    def _gate(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        if len(msg.params) not in (1, 2):
            raise Refused("expects 0 or 1, and optionally a velocity 0..1")
        on = _number(msg) >= 0.5
        velocity = _number(msg, 1) if len(msg.params) > 1 else 1.0
        if not 0.0 <= velocity <= 1.0:
            surface.counters.clamped += 1
            velocity = min(1.0, max(0.0, velocity))
        surface.set_gate(on, velocity=velocity, at=at, origin=self._origin(client))
        return []

    def _note(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        if len(msg.params) != 2:
            raise Refused("expects a note number 0..127 and a velocity 0..127 (0 releases)")
        note, velocity = _number(msg), _number(msg, 1)
        if not (note.is_integer() and 0 <= note <= 127 and 0 <= velocity <= 127):
            raise Refused("expects a note number 0..127 and a velocity 0..127 (0 releases)")
        if velocity > 0:
            surface.note_on(int(note), max(1, int(round(velocity))), at=at)
        else:
            surface.note_off(int(note), at=at)
        return []

    def _status(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        # /synthd/status is the whole daemon's; /synthd/layer/<name>/status that layer's
        status = self.app.status(surface if msg.address.startswith(LAYER_PREFIX) else None)
        return [("/synthd/status.reply", *(kind(status.get(key, kind())) for key, kind in STATUS_FIELDS))]

    def _layers(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        return [("/synthd/layers.reply", *(kind(row[key]) for key, kind in LAYER_FIELDS))
                for row in self.app.layer_summaries()]

    def _controls(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        return [("/synthd/controls.reply", label, index, float(wire), float(value), float(lo), float(hi), source)
                for label, index, wire, value, lo, hi, source in surface.snapshot()]

    def _voices(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        return [("/synthd/voices.reply", index, state, note, channel, float(pitch))
                for index, state, note, channel, pitch in surface.voice_snapshot()]

    def _in_background(self, address: str, client: tuple, job: Callable[[], str]) -> list[Reply]:
        """Run a slow job (a model load) off the server thread; reply when it ends."""
        if not self._busy.acquire(blocking=False):
            return [("/fail", address, "another load is in progress")]

        target = self._reply_ports.get(client, client)

        def run() -> None:
            try:
                reply: Reply = ("/done", address, job())
            except Exception as exc:
                log.error("%s refused: %s", address, exc)
                reply = ("/fail", address, str(exc))
            finally:
                self._busy.release()  # before replying: the client may ask for the next load at once
            self.send(target, *reply)

        threading.Thread(target=run, name="synthd-load", daemon=True).start()
        return []

    def _model_load(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        name = _text(msg)
        return self._in_background(msg.address, client, lambda: self.app.load_model(name, surface))

    def _patch_load(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        name = _text(msg)
        return self._in_background(msg.address, client, lambda: self.app.load_patch(name, surface))

    def _patch_save(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        try:
            return [("/done", msg.address, surface.save_patch())]
        except Exception as exc:  # PatchError or OSError: the file is as it was
            return [("/fail", msg.address, str(exc))]

    def _learn(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        return [("/done", msg.address, surface.arm_learn(_text(msg)))]

    def _preset_save(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        try:
            preset = surface.save_preset(_text(msg))
        except OSError as exc:
            return [("/fail", msg.address, f"preset kept in memory, but the patch file cannot be written: {exc}")]
        return [("/done", msg.address, preset.name)]

    def _preset_recall(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        args = msg.params
        if len(args) == 1 and isinstance(args[0], (int, float)) and not isinstance(args[0], bool):
            key: str | int = int(args[0])
        else:
            key = _text(msg)
        return [("/done", msg.address, surface.recall_preset(key, at=at).name)]

    def _notify(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        if client in self._external:
            raise Refused("a WebSocket client asks for values with LISTEN")
        if surface is not self.surface:
            raise Refused("notifications cover the first layer: send /synthd/notify")
        on = _number(msg) >= 0.5
        old = self._subscribers.pop(client, None)
        if old is not None:
            surface.unsubscribe(old)
        if on:
            if len(self._subscribers) >= MAX_SUBSCRIBERS:
                raise Refused(f"already {MAX_SUBSCRIBERS} subscribers")
            self._subscribe(client)
        return [("/done", msg.address, 1 if on else 0)]

    def _replyport(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        if client in self._external:
            raise Refused("a WebSocket client gets its replies on its connection")
        port = _number(msg)
        if not port.is_integer() or not 1 <= port <= 65535:
            raise Refused(f"{port} is not a UDP port")
        if len(self._reply_ports) >= MAX_SUBSCRIBERS and client not in self._reply_ports:
            raise Refused(f"already {MAX_SUBSCRIBERS} clients with a reply port")
        self._reply_ports[client] = (client[0], int(port))
        return [("/done", msg.address, int(port))]

    def _feedback(self, client: tuple) -> Callable[[str, str, float], None]:
        client = self._reply_ports.get(client, client)

        def fn(kind: str, name: str, value: float) -> None:
            if kind == "control":
                self.send(client, f"{PREFIX}/control/{name}", float(value))
            elif kind == "gain":
                self.send(client, f"{PREFIX}/gain", float(value))
            else:
                self.send(client, f"{PREFIX}/gate", int(value))
        return fn

    def _quit(self, msg: OscMessage, client: tuple, at: int | None, surface: ControlSurface) -> list[Reply]:
        self.app.quit()
        return [("/done", msg.address)]

