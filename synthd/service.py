"""The service manager's side of the daemon: systemd's notify protocol (sd_notify(3)).

Under `Type=notify`, systemd passes a datagram socket in NOTIFY_SOCKET: synthd sends
READY=1 once its first block has played, STATUS= lines that `systemctl status` shows,
WATCHDOG=1 while its render loop makes progress (with `WatchdogSec=`, systemd restarts a
daemon whose pings stop), RELOADING=1 / READY=1 around a SIGHUP reload and STOPPING=1 on the
way out. Without NOTIFY_SOCKET every call does nothing, so the daemon is the same elsewhere.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages; a no-op when the process was not started by systemd."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if path.startswith("@"):  # an abstract socket: a leading NUL byte instead of the @
            self._address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self._address = path
        self._socket: socket.socket | None = None
        if self._address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # the watchdog is ours unless it names another process; ping at half its period
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._last_ping = 0.0

    @property
    def active(self) -> bool:
        return self._socket is not None

    def send(self, **fields: object) -> None:
        """One message of `KEY=value` lines, e.g. send(READY=1, STATUS="playing")."""
        if self._socket is None:
            return
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(text.encode(), self._address)
        except OSError as exc:  # the manager went away: nothing to tell
            log.debug("sd_notify %r failed: %s", text, exc)

    def ping_due(self) -> bool:
        """Whether a WATCHDOG=1 is due (half the manager's watchdog period since the last)."""
        return self.watchdog_s is not None and time.monotonic() - self._last_ping >= self.watchdog_s

    def ping(self) -> None:
        self._last_ping = time.monotonic()
        self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
