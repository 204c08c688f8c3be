"""JACK MIDI output ports owned by the test (rtmidi's JACK API)."""

from __future__ import annotations

import contextlib
import os

import pytest


@contextlib.contextmanager
def jack_midi_out(server, client: str = "d2sender", connect_to: str | None = None):
    """A JACK MIDI output port on `server`: a port `<client>:out` for others to connect to, or
    with `connect_to`, one connected to that port. Removed on exit."""
    import rtmidi

    saved = {k: os.environ.get(k) for k in ("JACK_DEFAULT_SERVER", "JACK_NO_START_SERVER")}
    os.environ.update({k: v for k, v in server.env().items() if k in saved})
    try:
        out = rtmidi.MidiOut(rtapi=rtmidi.API_UNIX_JACK, name=client)
        if connect_to is None:
            out.open_virtual_port("out")
        else:
            out.open_port(out.get_ports().index(connect_to))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        yield out
    finally:
        out.close_port()
        out.delete()


@pytest.fixture(scope="module")
def midi_out(jack_server):
    """A JACK MIDI output port `d2sender:out` owned by the test."""
    with jack_midi_out(jack_server) as out:
        yield out
