"""A preallocated single-producer, single-consumer ring of float32 audio frames.

The render thread writes, the audio callback reads. Each side moves only its own counter
(a Python int, replaced atomically under the GIL), so neither ever waits for the other:
the callback copies what is there and reports a shortfall instead of blocking.
"""

from __future__ import annotations

import numpy as np


class RingBuffer:
    """`capacity` frames of `channels` float32 samples; counters grow without wrapping."""

    def __init__(self, capacity: int, channels: int):
        if capacity < 1 or channels < 1:
            raise ValueError(f"ring of {capacity} frames x {channels} channels")
        self.capacity = capacity
        self.channels = channels
        self._buf = np.zeros((capacity, channels), dtype=np.float32)
        self._written = 0  # frames ever written (producer only)
        self._read = 0  # frames ever read (consumer only)

    @property
    def fill(self) -> int:
        """Frames written and not yet read."""
        return self._written - self._read

    @property
    def free(self) -> int:
        return self.capacity - self.fill

    @property
    def frames_read(self) -> int:
        return self._read

    def write(self, frames: np.ndarray) -> int:
        """Producer: append (n, channels) frames; returns how many fitted (the rest is dropped)."""
        n = min(frames.shape[0], self.free)
        start = self._written % self.capacity
        first = min(n, self.capacity - start)
        self._buf[start:start + first] = frames[:first]
        if n > first:
            self._buf[:n - first] = frames[first:n]
        self._written += n
        return n

    def read_into(self, out: np.ndarray) -> int:
        """Consumer: fill `out` (n, channels) in place; returns frames copied, zero-fills the rest.

        Allocates no sample memory and never blocks: safe in an audio callback.
        """
        n = min(out.shape[0], self.fill)
        start = self._read % self.capacity
        first = min(n, self.capacity - start)
        out[:first] = self._buf[start:start + first]
        if n > first:
            out[first:n] = self._buf[:n - first]
        if n < out.shape[0]:
            out[n:] = 0.0
        self._read += n
        return n
