"""Loudness of one converted file, in LUFS, for the set gain of `prepare`.

Files of at least one 400 ms gating block are measured by ITU-R BS.1770-4 integrated loudness
(pyloudnorm: K-weighting, 400 ms blocks, absolute and relative gates). Shorter files, which
BS.1770 cannot gate, get the same K-weighted mean square over the whole file (one block as
long as the file): the RMS fallback stays on the LUFS scale, so a 50 ms hit and a 3 s note can
share one set gain.
"""

from __future__ import annotations

import math

import numpy as np
import pyloudnorm

GATE_BLOCK_S = 0.4
ABSOLUTE_GATE_LUFS = -70.0
METHOD_BS1770 = "bs1770"
METHOD_SHORT = "k-weighted-rms"


def measure(samples: np.ndarray, sample_rate: int) -> tuple[float, str]:
    """(loudness in LUFS, method) of `(samples,)` mono audio; -inf when everything lies below
    the -70 LUFS absolute gate (silence, or noise no one would hear)."""
    x = np.asarray(samples, dtype=np.float64)
    if len(x) == 0 or not np.any(x):
        return -math.inf, METHOD_BS1770 if len(x) >= GATE_BLOCK_S * sample_rate else METHOD_SHORT
    if len(x) >= GATE_BLOCK_S * sample_rate:
        return float(pyloudnorm.Meter(sample_rate).integrated_loudness(x)), METHOD_BS1770
    block = len(x) / sample_rate
    while block * sample_rate > len(x):  # pyloudnorm refuses a block longer than the audio
        block = math.nextafter(block, 0.0)
    lufs = float(pyloudnorm.Meter(sample_rate, block_size=block).integrated_loudness(x))
    return (lufs if lufs >= ABSOLUTE_GATE_LUFS else -math.inf), METHOD_SHORT
