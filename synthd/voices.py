"""Voice allocation: which of N voices plays a new note, and which one is stolen when all sound.

Pure bookkeeping on the audio clock (samples), so live playing and offline rendering allocate
alike. A voice is free once its note is released and its release has died away (the caller
says how long a release lasts). A new note takes, in this order:

1. the voice already playing the same key (a repeated key retriggers, never doubles);
2. the next free voice after the last one given (round robin);
3. the voice released longest ago that still sounds (its tail is cut with a short fade);
4. the voice held longest (the oldest note gives way: the newest note is never dropped).

The sustain pedal keeps released notes held until it goes up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable


@dataclass
class Voice:
    """One voice as the allocator sees it; `key` is what plays it (None: never used)."""

    key: Hashable | None = None
    held: bool = False  # key down (or the gate's drone)
    sustained: bool = False  # key up while the pedal is down: still held
    started: int = 0  # allocation order, for "oldest held"
    released: int = 0  # release order, for "oldest released"
    free_at: int = 0  # clock sample from which its release has died away
    extra: dict = field(default_factory=dict)  # what the caller keeps with the note (channel, note)


class VoiceAllocator:
    """N voices; `allocate`, `release`, `pedal`. Counts steals."""

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"a voice allocator needs at least one voice, not {count}")
        self.voices = [Voice() for _ in range(count)]
        self.stolen = 0
        self._order = 0
        self._next = 0  # round robin: where the search for a free voice starts
        self.pedal_down = False

    def _tick(self) -> int:
        self._order += 1
        return self._order

    def find(self, key: Hashable) -> int | None:
        """The voice holding `key` (held or sustained), None when none does."""
        for i, v in enumerate(self.voices):
            if v.key == key and v.held:
                return i
        return None

    def sounding(self, index: int, now: int) -> bool:
        v = self.voices[index]
        return v.key is not None and (v.held or now < v.free_at)

    def allocate(self, key: Hashable, now: int) -> tuple[int, bool]:
        """The voice for a new note `key` at clock `now`, and whether it is taken from a note
        that still sounds (then the engine fades it out first)."""
        same = next((i for i, v in enumerate(self.voices) if v.key == key and self.sounding(i, now)), None)
        if same is not None:
            index = same
        else:
            n = len(self.voices)
            free = [i for i in (self._next + k for k in range(n)) if not self.sounding(i % n, now)]
            if free:
                index = free[0] % n
                self._next = (index + 1) % n
            else:
                released = [i for i, v in enumerate(self.voices) if not v.held]
                pool = released if released else range(n)
                rank = (lambda i: self.voices[i].released) if released else (lambda i: self.voices[i].started)
                index = min(pool, key=rank)
        steal = self.sounding(index, now)
        if steal and self.voices[index].key != key:
            self.stolen += 1
        self.voices[index] = Voice(key=key, held=True, started=self._tick())
        return index, steal

    def release(self, key: Hashable, now: int, release_samples: int) -> int | None:
        """Key `key` went up: the voice it held, released (None when the pedal holds it, or
        when no voice holds it: a stolen note's key-up is nothing to do)."""
        index = self.find(key)
        if index is None:
            return None
        v = self.voices[index]
        if self.pedal_down:
            v.sustained = True
            return None
        self._let_go(v, now, release_samples)
        return index

    def pedal(self, down: bool, now: int, release_samples: int) -> list[int]:
        """The sustain pedal went down or up; up releases every sustained voice (returned)."""
        self.pedal_down = down
        if down:
            return []
        out = []
        for i, v in enumerate(self.voices):
            if v.held and v.sustained:
                self._let_go(v, now, release_samples)
                out.append(i)
        return out

    def _let_go(self, v: Voice, now: int, release_samples: int) -> None:
        v.held, v.sustained = False, False
        v.released = self._tick()
        v.free_at = now + release_samples

    def held(self) -> list[int]:
        """The voices whose key (or pedal) holds them."""
        return [i for i, v in enumerate(self.voices) if v.held]
