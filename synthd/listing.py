"""`synthd ports` (MIDI ports) and `synthd devices` (audio devices): what the options can name.

MIDI goes through rtmidi's JACK API when a JACK server is running (the ALSA sequencer is
often missing in containers and on JACK-only rigs), else through rtmidi's default API.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# jackd2 puts its server socket here, named jack_<server>_<uid>_0
JACK_SOCKET_DIR = Path(os.environ.get("JACK_SOCKET_DIR", "/dev/shm"))


def jack_running() -> bool:
    """Whether the JACK server this process would connect to (JACK_DEFAULT_SERVER) is up.

    Checked through its socket, so nothing is started and libjack prints nothing.
    """
    server = os.environ.get("JACK_DEFAULT_SERVER") or "default"
    return (JACK_SOCKET_DIR / f"jack_{server}_{os.getuid()}_0").exists()


def midi_api() -> int:
    """The rtmidi API to use: JACK when its server runs, else rtmidi's default (unspecified)."""
    import rtmidi

    if jack_running() and rtmidi.API_UNIX_JACK in rtmidi.get_compiled_api():
        return rtmidi.API_UNIX_JACK
    return rtmidi.API_UNSPECIFIED


def midi_ports() -> tuple[str, list[str], list[str]]:
    """(API name, input port names, output port names); RuntimeError when no API opens."""
    import rtmidi

    api = midi_api()
    try:
        ins = rtmidi.MidiIn(rtapi=api, name="synthd-ports")
        outs = rtmidi.MidiOut(rtapi=api, name="synthd-ports")
    except rtmidi.SystemError as exc:
        raise RuntimeError(f"no MIDI back-end could be opened ({exc}); start a JACK server "
                           "or make the ALSA sequencer available") from None
    try:
        name = rtmidi.get_api_display_name(ins.get_current_api())
        return name, ins.get_ports(), outs.get_ports()
    finally:
        ins.delete()
        outs.delete()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Neither command takes options."""


def run(args: argparse.Namespace) -> int:
    if args.command == "ports":
        return _print_ports()
    if args.command == "devices":
        return _print_devices()
    raise ValueError(f"synthd.listing does not serve {args.command!r}")


def _print_ports() -> int:
    try:
        api, ins, outs = midi_ports()
    except RuntimeError as exc:
        print(f"synthd ports: {exc}", file=sys.stderr)
        return 1
    print(f"MIDI API: {api}")
    for title, names in (("MIDI inputs (for --midi-in, any part of the name)", ins), ("MIDI outputs", outs)):
        print(f"{title}:")
        for i, name in enumerate(names):
            print(f"  {i:3d}  {name}")
        if not names:
            print("  (none)")
    return 0


def _print_devices() -> int:
    import sounddevice as sd

    devices = sd.query_devices()
    apis = sd.query_hostapis()
    try:
        default_out = sd.default.device[1]
    except Exception:
        default_out = -1
    print("audio devices (for --device: the index or any part of the name):")
    if not len(devices):
        print("  (none)")
    for dev in devices:
        mark = "  [default output]" if dev["index"] == default_out else ""
        print(f"  {dev['index']:3d}  {dev['name']}  ({apis[dev['hostapi']]['name']})  "
              f"out {dev['max_output_channels']}, in {dev['max_input_channels']}, "
              f"{int(dev['default_samplerate'])} Hz{mark}")
    return 0
