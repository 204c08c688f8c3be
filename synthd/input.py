"""Live audio input: a JACK client of our own (`--input virtual`) or a PortAudio input device,
behind one interface, each writing a mono mix into a preallocated ring that the render thread
reads one block at a time.

`virtual` registers ports `synthd:in_1..N` on the running JACK server and connects nothing:
the musician patches what plays into them. A device name opens that PortAudio input (as
`synthd devices` lists them) at the engine's rate. Either way the callback only mixes and
copies; it never allocates beyond one period's mix, never logs, never waits.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from synthd.audio import CLOSE_TIMEOUT_S, AudioError, bounded
from synthd.priority import Scheduling, lift_if_normal
from synthd.ringbuffer import RingBuffer

log = logging.getLogger(__name__)

VIRTUAL = "virtual"
CLIENT_NAME = "synthd"
RING_S = 0.5  # input kept at most: a render thread further behind than this drops input
STALL_S = 0.5  # no input callback for this long while open: the input is gone


class LiveInput:
    """Common part of the input back-ends: the ring, the counters, the fault."""

    def __init__(self, name: str, channels: int, sample_rate: int):
        if not 1 <= channels <= 64:
            raise AudioError(f"--input-channels {channels} is outside 1..64")
        self.name = name
        self.channels = channels
        self.sample_rate = sample_rate
        self.ring = RingBuffer(int(RING_S * sample_rate), 1)
        self.on_data: Callable[[], None] = lambda: None  # the render thread's wake-up
        self.overruns = 0  # input dropped: the ring was full, or the render thread let it pile up
        self.underruns = 0  # blocks rendered without input: none had come (late or gone)
        self.callbacks = 0
        # SCHED_FIFO priority the callback's thread takes where its host left it at normal (0: none),
        # and what it got, once per start: the output sets it one above its render thread
        self.callback_priority = 0
        self.callback_scheduling: Scheduling | None = None
        self._callback_at = 0.0
        self._open = False
        self._mix = np.zeros((8192, 1), dtype=np.float32)

    @property
    def opened(self) -> bool:
        return self._open

    def available(self) -> int:
        return self.ring.fill

    def read(self, frames: int) -> np.ndarray:
        """The oldest `frames` samples `(frames,)`; zeros past what is there."""
        out = np.zeros((frames, 1), dtype=np.float32)
        self.ring.read_into(out)
        return out[:, 0]

    def drop(self, frames: int) -> None:
        """Forget the oldest `frames` samples (the render thread fell behind the input)."""
        if frames > 0:
            self.read(frames)
            self.overruns += 1

    def fault(self) -> str | None:
        """Why the input gives nothing, or None while it plays."""
        if not self._open:
            return "closed"
        silent = time.monotonic() - self._callback_at
        return f"no input for {silent:.1f} s" if silent > STALL_S else None

    def stats(self) -> dict[str, Any]:
        return {"input": self.name, "input_underruns": self.underruns, "input_overruns": self.overruns,
                "input_fault": self.fault() or ""}

    def _take(self, planes: list[np.ndarray], frames: int) -> None:
        """Callback side: the mono mix of `planes` (each `(frames,)`) into the ring."""
        self._callback_at = time.monotonic()
        if self.callback_scheduling is None and self.callback_priority:
            # as the output's callback: a block of input that comes late makes the render late,
            # so the thread that brings it must not wait behind the render thread
            self.callback_scheduling = lift_if_normal(self.callback_priority)
        self.callbacks += 1
        mix = self._mix[:frames] if frames <= self._mix.shape[0] else np.zeros((frames, 1), np.float32)
        if len(planes) == 1:
            mix[:, 0] = planes[0]
        else:
            np.mean(np.stack(planes, axis=1), axis=1, out=mix[:, 0])
        if self.ring.write(mix) < frames:
            self.overruns += 1
        self.on_data()


class JackInput(LiveInput):
    """`--input virtual`: JACK input ports `synthd:in_1..N` of a client of our own."""

    def __init__(self, channels: int, sample_rate: int):
        super().__init__(VIRTUAL, channels, sample_rate)
        self._client = None

    def start(self) -> None:
        self.callback_scheduling = None  # a new client: a new thread
        try:
            import jack
        except (ImportError, OSError) as exc:
            raise AudioError(f"--input virtual needs JACK (libjack and the JACK-Client package): {exc}") from None
        try:
            client = jack.Client(CLIENT_NAME, no_start_server=True)
        except jack.JackError as exc:
            raise AudioError(f"--input virtual needs a running JACK server: {exc}") from None
        if client.samplerate != self.sample_rate:
            client.close()
            raise AudioError(f"the JACK server runs at {client.samplerate} Hz; the model plays at {self.sample_rate} Hz")
        ports = [client.inports.register(f"in_{i + 1}") for i in range(self.channels)]

        def process(frames: int) -> None:
            self._take([p.get_array() for p in ports], frames)

        client.set_process_callback(process)
        client.set_shutdown_callback(lambda status, reason: setattr(self, "_open", False))
        client.activate()
        self._client = client
        self._callback_at = time.monotonic()
        self._open = True
        self.name = f"{client.name}:in_1" + (f"..in_{self.channels}" if self.channels > 1 else "")
        log.info("input: JACK ports %s (connect a source to them)", ", ".join(p.name for p in ports))

    def stop(self) -> None:
        client, self._client = self._client, None
        self._open = False
        if client is not None:
            def close() -> None:
                client.deactivate()
                client.close()

            if not bounded(close, CLOSE_TIMEOUT_S, "synthd-input-close"):
                log.info("input: the JACK client was left open (its server is gone)")


class DeviceInput(LiveInput):
    """`--input NAME`: a PortAudio input device, opened at the engine's rate."""

    def __init__(self, device: str, channels: int, sample_rate: int):
        super().__init__(device, channels, sample_rate)
        self._device = device
        self._stream = None

    def start(self) -> None:
        import sounddevice as sd

        self.callback_scheduling = None  # a new stream: a new thread
        try:
            info = sd.query_devices(int(self._device) if self._device.isdigit() else self._device, "input")
        except (ValueError, sd.PortAudioError) as exc:
            raise AudioError(f"input device {self._device!r}: {exc}") from None
        if info["max_input_channels"] < self.channels:
            raise AudioError(f"input device {info['name']!r} has {info['max_input_channels']} inputs, "
                             f"{self.channels} asked (--input-channels)")

        def callback(indata: np.ndarray, frames: int, time_info, status) -> None:
            self._take([indata[:, c] for c in range(indata.shape[1])], frames)

        try:
            stream = sd.InputStream(samplerate=self.sample_rate, blocksize=0, device=info["index"],
                                    channels=self.channels, dtype="float32", latency="low", callback=callback)
            stream.start()
        except Exception as exc:
            raise AudioError(f"cannot open input device {info['name']!r} at {self.sample_rate} Hz: {exc}") from None
        self._stream = stream
        self.name = info["name"]
        self._callback_at = time.monotonic()
        self._open = True

    def fault(self) -> str | None:
        if self._stream is not None and not self._stream.active:
            return "the input stream stopped (device or server gone)"
        return super().fault()

    def stop(self) -> None:
        stream, self._stream = self._stream, None
        self._open = False
        if stream is not None:
            def close() -> None:
                stream.stop()
                stream.close()

            if not bounded(close, CLOSE_TIMEOUT_S, "synthd-input-close"):
                log.info("input: the stream from %s was left open (its device is gone)", self.name)


def open_input(spec: str, channels: int, sample_rate: int) -> LiveInput:
    """The input back-end for `--input SPEC` (not started)."""
    if spec == VIRTUAL:
        return JackInput(channels, sample_rate)
    return DeviceInput(spec, channels, sample_rate)


class InputFeeder:
    """The render thread's side of a live input: hands the engine one block of input per block it
    renders, as soon as the block has arrived, so input reaches the output after the ring's
    blocks and no more. Input that piled up while the render thread was held up is all rendered
    (skipping it would break the signal the encoder hears) until the output ring holds a block
    more than it should; what comes beyond that is dropped and counted (the output device runs
    slower than the input, or the output ran dry and the ring's latency would grow). When no
    input has come and the output is about to run dry, a block is rendered without input
    (counted)."""

    def __init__(self, source: LiveInput, block_frames: int):
        self.source = source
        self.block = block_frames
        self._resync = False
        self._holding = True

    def hold(self) -> None:
        """Let input go, uncounted, until the output plays (`playing`): rendered meanwhile, it
        would pile up in the ring as latency, and be dropped as overruns once the ring was full."""
        self._holding = True

    def playing(self) -> None:
        """The output has called for its first block since `hold`: input from now on is rendered,
        what came before is forgotten (not counted). Cheap enough for the audio callback."""
        if self._holding:
            self._resync = True
            self._holding = False

    def next_block(self, output_fill: int, target_fill: int) -> tuple[bool, np.ndarray | None]:
        """(render now?, the input block or None for silence), given the output ring's fill and the
        fill the render thread keeps it at."""
        source = self.source
        if self._holding or self._resync:  # forget the whole blocks that came before now
            source.read(source.available() - source.available() % self.block)
            if self._holding:
                return False, None
            self._resync = False
        if source.available() >= self.block:
            if output_fill >= target_fill + 2 * self.block:
                source.drop(self.block)
                return False, None
            return True, source.read(self.block)
        if output_fill < target_fill - self.block or (output_fill < target_fill and source.fault() is not None):
            source.underruns += 1
            return True, None
        return False, None
