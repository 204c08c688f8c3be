"""A JACK MIDI output port owned by the test (rtmidi's JACK API), as a module fixture."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def midi_out(jack_server):
    """A JACK MIDI output port `d2sender:out` owned by the test."""
    import rtmidi

    saved = {k: os.environ.get(k) for k in ("JACK_DEFAULT_SERVER", "JACK_NO_START_SERVER")}
    os.environ.update({k: v for k, v in jack_server.env().items() if k in saved})
    out = rtmidi.MidiOut(rtapi=rtmidi.API_UNIX_JACK, name="d2sender")
    out.open_virtual_port("out")
    yield out
    out.close_port()
    out.delete()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
