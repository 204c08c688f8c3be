"""HTTP and WebSocket for `synthd run --http-port`: the OSCQuery namespace, live values, and
the control page (synthd/page.html), all in one asyncio loop on a thread of its own: nothing
here runs on the audio or render thread, and a slow or hostile client only ever waits on
this loop.

- `GET /any/path` answers that node of the OSCQuery namespace as JSON (synthd.oscquery);
  `?HOST_INFO`, `?VALUE`, `?RANGE`, ... one attribute (204 when the node has none, 400 for
  an attribute that does not exist). A browser asking for `/` (Accept: text/html) gets the page.
- A WebSocket on any path speaks the proposal's extension: text frames `{"COMMAND":
  "LISTEN"|"IGNORE", "DATA": path}`; values come back as binary OSC packets when they change,
  at most MAX_PUSH_HZ times a second (several paths changed at once: one bundle);
  `{"COMMAND": "PATH_CHANGED", "DATA": "/synthd"}` when a model or patch swap changes the tree. Binary frames are OSC packets, handled exactly as UDP
  datagrams are (synthd.osc: the same checks, counters and replies, here on the connection).
- `--http-token`: the page and the WebSocket need `?token=` (the start line prints the URL).
- Limits: MAX_CONNECTIONS WebSockets, frames up to MAX_FRAME bytes, MAX_RATE messages a second
  per connection (the rest counted and dropped).
- Zeroconf: `_oscjson._tcp` (this server) and `_osc._udp` (the OSC port) are advertised when
  the host is not loopback, or always with `--zeroconf`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import logging
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from pythonosc.osc_message_builder import build_msg

from synthd import oscquery
from synthd.controls import ControlSurface
from synthd.osc import PREFIX, STATUS_FIELDS, OscServer

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
MAX_FRAME = 64 * 1024
MAX_RATE = 2000  # messages a second per connection
MAX_PUSH_HZ = 60.0  # value pushes per path and second, at most
WATCH_S = 0.5  # how often the tree is compared for PATH_CHANGED
PAGE = Path(__file__).with_name("page.html")


class WebError(OSError):
    """The HTTP server cannot start as asked (the port is taken, the host is not ours)."""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def bundle(messages: list[bytes]) -> bytes:
    """One OSC bundle (timetag "immediately") holding `messages`; a single message as it is."""
    if len(messages) == 1:
        return messages[0]
    return b"#bundle\0" + struct.pack(">Q", 1) + b"".join(struct.pack(">i", len(m)) + m for m in messages)


class _Connection:
    """One WebSocket client: what it listens to, and its message budget."""

    ids = itertools.count(1)

    def __init__(self, ws: web.WebSocketResponse, loop: asyncio.AbstractEventLoop):
        self.ws = ws
        self.loop = loop
        self.key = ("ws", next(self.ids))
        self.listens: set[str] = set()
        self.second = 0
        self.messages = 0

    def deliver(self, reply: tuple) -> None:
        """An OSC reply for this client, from any thread."""
        self.loop.call_soon_threadsafe(self.send_bytes, build_msg(reply[0], list(reply[1:])).dgram)

    def send_bytes(self, data: bytes) -> None:
        if not self.ws.closed:
            self.loop.create_task(self._send(self.ws.send_bytes(data)))

    def send_json(self, data: dict) -> None:
        if not self.ws.closed:
            self.loop.create_task(self._send(self.ws.send_str(json.dumps(data))))

    @staticmethod
    async def _send(coro) -> None:
        try:
            await coro
        except (ConnectionError, RuntimeError):  # the client went away meanwhile
            pass

    def within_rate(self) -> bool:
        second = int(time.monotonic())
        if second != self.second:
            self.second, self.messages = second, 0
        self.messages += 1
        return self.messages <= MAX_RATE


class WebServer:
    """The HTTP/WebSocket server; `start()` returns once it listens (WebError if it cannot)."""

    def __init__(self, surface: ControlSurface, osc: OscServer, *,
                 host: str, port: int, token: str | None = None, zeroconf: bool | None = None):
        self.surface = surface
        self.osc = osc
        self.host = host
        self.port = port
        self.token = token or None
        self.advertise = (not is_loopback(host)) if zeroconf is None else zeroconf
        self.refused = 0  # connections and messages turned away (token, limits, bad frames)
        self._connections: dict[tuple, _Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._zeroconf = None
        self._page = PAGE.read_text(encoding="utf-8")
        # value changes waiting for the next push: path -> latest value. Filled from any thread
        # (the surface's subscriber), emptied on the loop at most MAX_PUSH_HZ times a second,
        # each message built once and sent to every listener in one frame
        self._pending: dict[str, Any] = {}
        self._pending_lock = threading.Lock()
        self._flush_due = False
        self._flushed_at = 0.0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="synthd-web", daemon=True)
        self._thread.start()
        self._ready.wait(15)
        if self._error is not None:
            raise WebError(f"cannot serve HTTP on {self.host}:{self.port}: {self._error}") from None
        if self.advertise:
            threading.Thread(target=self._register_zeroconf, name="synthd-zeroconf", daemon=True).start()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.create_task(self._watch_tree())
        self.surface.subscribe(self._changed)
        loop.run_forever()
        self.surface.unsubscribe(self._changed)
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=MAX_FRAME)
        app.router.add_get("/{path:.*}", self._get)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the port taken, for port 0

    def stop(self) -> None:
        if self._zeroconf is not None:
            zc, self._zeroconf = self._zeroconf, None
            try:
                zc.unregister_all_services()
                zc.close()
            except Exception as exc:  # the network went away: nothing to withdraw
                log.debug("zeroconf close: %s", exc)
        if self._loop is not None and self._thread is not None:
            for conn in list(self._connections.values()):
                self._loop.call_soon_threadsafe(lambda c=conn: self._loop.create_task(c.ws.close()))
            time.sleep(0.05)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=3)
        for conn in list(self._connections.values()):
            self._forget(conn)

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "") else socket.gethostname()
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def stats(self) -> dict[str, Any]:
        return {"web_clients": len(self._connections), "web_refused": self.refused}

    # ---------------------------------------------------------------- zeroconf

    def _register_zeroconf(self) -> None:
        try:
            from zeroconf import IPVersion, ServiceInfo, Zeroconf

            ip = socket.gethostbyname(self.host) if self.host not in ("0.0.0.0", "") else _primary_ip()
            name = f"synthd on {socket.gethostname()}"
            zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
            infos = [ServiceInfo(kind, f"{name}.{kind}", addresses=[socket.inet_aton(ip)], port=port,
                                 properties={"txtvers": "1"}, server=f"{socket.gethostname()}.local.")
                     for kind, port in (("_oscjson._tcp.local.", self.port), ("_osc._udp.local.", self.osc.address[1]))]
            # both at once: each registration probes the network for a second or two
            waits = [threading.Thread(target=zc.register_service, args=(info,), kwargs={"allow_name_change": True})
                     for info in infos]
            for t in waits:
                t.start()
            for t in waits:
                t.join()
            self._zeroconf = zc
            log.info("zeroconf: advertising _oscjson._tcp on %s:%d and _osc._udp on port %d", ip, self.port,
                     self.osc.address[1])
        except Exception as exc:  # no multicast here: the server still works without discovery
            log.warning("zeroconf: cannot advertise (%s)", exc)

    # ---------------------------------------------------------------- HTTP

    def _token_ok(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        given = request.query.get("token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        path = "/" + request.match_info["path"].strip("/")
        query = [k for k in request.query if k != "token"]
        if path == "/" and not query and "text/html" in request.headers.get("Accept", ""):
            return self._serve_page(request)
        if query == ["HOST_INFO"]:
            return web.json_response(oscquery.host_info(
                f"synthd ({self.surface.engine.model.name})", self.osc.address[0], self.osc.address[1],
                self.host, self.port))
        found = oscquery.node(oscquery.namespace(self.surface), path)
        if found is None:
            return web.json_response({"error": f"no node {path}"}, status=404)
        if not query:
            return web.json_response(found)
        if len(query) != 1 or query[0] not in oscquery.ATTRIBUTES:
            return web.json_response({"error": f"unknown attribute query {'&'.join(query)!r}"}, status=400)
        if query[0] not in found:
            return web.Response(status=204)
        return web.json_response({query[0]: found[query[0]]})

    def _serve_page(self, request: web.Request) -> web.Response:
        if not self._token_ok(request):
            self.refused += 1
            return web.Response(status=401, text="synthd: this page needs the token from the start line "
                                                 "(…/?token=…)\n")
        page = self._page.replace("__STATUS_FIELDS__", json.dumps([name for name, _ in STATUS_FIELDS]))
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    # ---------------------------------------------------------------- WebSocket

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if not self._token_ok(request):
            self.refused += 1
            return web.Response(status=401, text="wrong or missing token\n")
        if len(self._connections) >= MAX_CONNECTIONS:
            self.refused += 1
            return web.Response(status=503, text=f"already {MAX_CONNECTIONS} WebSocket clients\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=20.0)
        await ws.prepare(request)
        conn = _Connection(ws, asyncio.get_running_loop())
        self._connections[conn.key] = conn
        # its own changes come back to it too (as to every listener): the page ignores values for
        # a slider under the finger, and the echo confirms what was applied
        self.osc.attach(conn.key, conn.deliver, None)
        try:
            async for message in ws:
                if not conn.within_rate():
                    self.refused += 1
                    continue
                if message.type == WSMsgType.TEXT:
                    self._command(conn, message.data)
                elif message.type == WSMsgType.BINARY:
                    self.osc.route_packet(message.data, conn.key)
                elif message.type == WSMsgType.ERROR:
                    self.refused += 1  # an oversized or broken frame: aiohttp closes the connection
        finally:
            self._forget(conn)
        return ws

    def _forget(self, conn: _Connection) -> None:
        self.osc.detach(conn.key)
        self._connections.pop(conn.key, None)

    def _command(self, conn: _Connection, text: str) -> None:
        try:
            data = json.loads(text)
            command, path = data["COMMAND"], data.get("DATA")
            if command not in ("LISTEN", "IGNORE") or not isinstance(path, str):
                raise ValueError(f"unknown command {command!r} (LISTEN or IGNORE, with DATA a path)")
        except (ValueError, KeyError, TypeError) as exc:
            self.refused += 1
            self.osc.counters.invalid += 1
            conn.send_json({"COMMAND": "ERROR", "DATA": f"refused: {exc}"})
            return
        if command == "IGNORE":
            conn.listens.discard(path)
            return
        found = oscquery.node(oscquery.namespace(self.surface), path)
        if found is None or "VALUE" not in found:
            self.osc.counters.unknown += 1
            conn.send_json({"COMMAND": "ERROR", "DATA": f"nothing to listen to at {path}"})
            return
        conn.listens.add(path)

    # ---------------------------------------------------------------- pushes

    def _changed(self, kind: str, name: str, value: float) -> None:
        """The surface's subscriber (any thread): note the value, wake the loop once per push."""
        path = f"{PREFIX}/control/{name}" if kind == "control" else f"{PREFIX}/{kind}"
        with self._pending_lock:
            self._pending[path] = int(value) if kind == "gate" else float(value)
            if self._flush_due or not self._connections:
                return
            self._flush_due = True
        self._loop.call_soon_threadsafe(self._schedule_flush)

    def _schedule_flush(self) -> None:
        delay = self._flushed_at + 1.0 / MAX_PUSH_HZ - time.monotonic()
        self._loop.call_later(max(0.0, delay), self._flush)

    def _flush(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
            self._flush_due = False
        self._flushed_at = time.monotonic()
        built: dict[str, bytes] = {}
        for conn in list(self._connections.values()):
            wanted = [path for path in pending if path in conn.listens]
            if wanted:
                for path in wanted:
                    if path not in built:
                        built[path] = build_msg(path, [pending[path]]).dgram
                conn.send_bytes(bundle([built[path] for path in wanted]))

    async def _watch_tree(self) -> None:
        """PATH_CHANGED to every client when a model or patch swap changes the tree."""
        def signature() -> tuple:
            s = self.surface
            return (s.engine.model.name, s.patch.name, tuple(c.info.label for c in s.controls),
                    tuple(p.name for p in s.patch.presets))

        last = signature()
        while True:
            await asyncio.sleep(WATCH_S)
            now = signature()
            if now != last:
                last = now
                for conn in list(self._connections.values()):
                    conn.send_json({"COMMAND": "PATH_CHANGED", "DATA": PREFIX})


def _primary_ip() -> str:
    """The address of the interface with the default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
