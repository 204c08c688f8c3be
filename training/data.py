"""Training and validation examples cut from a prepared set.

Every example carries `context` samples of what precedes it in its file (silence before a
file's start): the decoder's first output samples lack the overlap of earlier frames, and the
losses skip exactly that context, so every sample that counts (a drum's onset included) is
decoded as it will be when streaming.

Training: random crops, a file drawn with weight ~ duration ** power, so short hits are
neither drowned by long takes nor repeated to death. A file shorter than a crop is placed at
the start of the crop (its onset kept) and padded with silence: short files are padded, never
dropped. Validation: a fixed, deterministic set of crops from the held-out files, spread so
that every held-out file counts while the whole check stays within a time budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from training.augment import Augmenter


def _segment(x: np.ndarray, start: int, length: int) -> np.ndarray:
    """`x[start:start + length]`, zeros wherever that span lies outside `x` (start may be < 0)."""
    lo, hi = max(start, 0), min(start + length, len(x))
    out = np.zeros(length, dtype=np.float32)
    if hi > lo:
        out[lo - start:hi - start] = x[lo:hi]
    return out


class CropSampler:
    """Random training batches from in-memory audio (mono float32 arrays)."""

    def __init__(self, audio: list[np.ndarray], crop_samples: int, batch_size: int,
                 augmenter: Augmenter, file_weight_power: float = 0.5, context: int = 0) -> None:
        if not audio:
            raise ValueError("no training files: the prepared set has an empty training split")
        self.audio = audio
        self.crop = crop_samples
        self.batch_size = batch_size
        self.augmenter = augmenter
        self.context = context
        weights = np.array([max(len(a), 1) for a in audio], dtype=np.float64) ** file_weight_power
        self.p = weights / weights.sum()

    def _crop(self, index: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """`length` samples of file `index` from a random crop start, with the context before it."""
        audio = self.audio[index]
        start = int(rng.integers(0, len(audio) - self.crop + 1)) if len(audio) > self.crop else 0
        return _segment(audio, start - self.context, length)

    def batch(self, rng: np.random.Generator, p: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
        """(target, encoder input), each `(batch, 1, context + crop_samples)` float32; a function of
        `rng` and `p` alone. `p` `(files,)`: the files' draw probabilities in place of the
        duration weights (a run that replays old files beside new ones sets them)."""
        p = self.p if p is None else p
        length = self.context + self.crop
        source_len = self.augmenter.source_length(length)
        targets, inputs = [], []
        for i in rng.choice(len(self.audio), size=self.batch_size, p=p):
            source = self._crop(i, source_len, rng)
            mix = self.augmenter.cfg.mix
            if mix.enabled and rng.random() < mix.probability:
                other = self._crop(int(rng.choice(len(self.audio), p=p)), source_len, rng)
                source = source + other * np.float32(10 ** (rng.uniform(mix.min_db, mix.max_db) / 20))
            if self.augmenter.active:
                target, noisy = self.augmenter(source, length, rng)
            else:
                target = noisy = source[:length]
            targets.append(target)
            inputs.append(noisy)
        return (torch.from_numpy(np.stack(targets))[:, None].float(),
                torch.from_numpy(np.stack(inputs))[:, None].float())


@dataclass
class ValidationSet:
    """Fixed held-out crops, `crops`: `(count, 1, context + crop_samples)`."""

    crops: Tensor
    files: int

    @classmethod
    def build(cls, audio: list[np.ndarray], crop_samples: int, max_seconds: float,
              sample_rate: int, context: int = 0) -> "ValidationSet":
        """Up to `max_seconds` of crops: at least one per file (files evenly chosen when there are
        more files than crops fit), the rest spread over long files at evenly spaced offsets."""
        if not audio:
            raise ValueError("no validation files: the prepared set has an empty validation split")
        budget = max(1, int(max_seconds * sample_rate // crop_samples))
        if len(audio) > budget:
            keep = np.linspace(0, len(audio) - 1, budget).round().astype(int)
            audio = [audio[i] for i in sorted(set(keep.tolist()))]
        # crops a file could give without overlap, and a share of the budget by that size
        capacity = np.array([max(1, len(a) // crop_samples) for a in audio])
        counts = np.ones(len(audio), dtype=int)
        spare = budget - len(audio)
        while spare > 0 and (counts < capacity).any():
            room = np.where(counts < capacity, capacity - counts, 0)
            i = int(np.argmax(room))
            counts[i] += 1
            spare -= 1
        crops = []
        for a, n in zip(audio, counts):
            starts = np.linspace(0, max(0, len(a) - crop_samples), n).round().astype(int)
            crops.extend(_segment(a, int(s) - context, context + crop_samples) for s in starts)
        return cls(torch.from_numpy(np.stack(crops))[:, None].float(), len(audio))

    def batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """This process's share of the crops, `(b, 1, crop_samples)` at a time."""
        mine = self.crops[rank::world]
        for i in range(0, len(mine), batch_size):
            yield mine[i:i + batch_size]
