"""Layers: several models at once, each with its own engine, patch and control surface, summed.

A `Rack` stands where one engine stands for the live output (`LiveOutput` drives either): it
renders every layer's block on the one render thread, each through its own output stage (its
patch's gain and, for a one-voice layer, its gate), sums them, and keeps a master output stage
of its own (unity gain: DC blocker and limiter on the sum). A layer's clock is the rack's, so
OSC bundles and MIDI dated on it land alike in every layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from synthd.controls import ControlSurface
from synthd.engine import Engine, OutputStage, RenderTimer
from synthd.model import Model


@dataclass
class Layer:
    """One model playing under its own patch; `name` is its OSC namespace
    (`/synthd/layer/<name>/...`)."""

    name: str
    engine: Engine
    surface: ControlSurface

    def summary(self) -> dict[str, Any]:
        """What `/synthd/layers` reports of it."""
        midi = self.surface.patch.midi
        stats = self.engine.stats()
        voices = self.surface.voices
        return {"name": self.name, "model": self.engine.model.name, "patch": self.surface.patch.name,
                "voices": stats["voices"], "voices_sounding": stats["voices_sounding"],
                "voices_stolen": voices.stolen if voices is not None else 0,
                "channel": midi.channel or 0, "key_low": midi.key_low, "key_high": midi.key_high,
                "gain_db": self.surface.gain_db, "nan_blocks": stats["nan_blocks"],
                "decode_errors": stats["decode_errors"]}


class Rack:
    """The sum of several layers, with the engine interface `LiveOutput` drives."""

    def __init__(self, layers: list[Layer]):
        if len(layers) < 2:
            raise ValueError("a rack holds two layers or more (one plays on its own engine)")
        first = layers[0].engine
        for layer in layers[1:]:
            e = layer.engine
            if (e.sample_rate, e.channels, e.block_frames) != (first.sample_rate, first.channels, first.block_frames):
                raise ValueError(f"layer {layer.name!r} renders {e.sample_rate} Hz, {e.channels} channels, "
                                 f"{e.block_frames}-frame blocks; layer {layers[0].name!r} "
                                 f"{first.sample_rate} Hz, {first.channels}, {first.block_frames}")
        self.layers = layers
        self.sample_rate, self.channels, self.block_frames = first.sample_rate, first.channels, first.block_frames
        self.threads = first.threads
        self.stage = OutputStage(self.sample_rate, self.channels, gain=1.0, gate=1.0)
        self.stage_deferred = False
        self.output_stats: Callable[[], dict[str, Any]] | None = None
        self._backlog: Callable[[], int] | None = None
        self.timer = RenderTimer(self.sample_rate)

    @property
    def model(self) -> Model:
        """The layer model with the longest frame (the live output keeps one whole call ahead)."""
        return max((layer.engine.model for layer in self.layers), key=lambda m: m.hop / m.sample_rate)

    @property
    def backlog(self) -> Callable[[], int] | None:
        return self._backlog

    @backlog.setter
    def backlog(self, fn: Callable[[], int] | None) -> None:
        self._backlog = fn
        for layer in self.layers:
            layer.engine.backlog = fn

    @property
    def model_s(self) -> float:
        """Wall time in model calls so far, over the layers (see Engine.model_s)."""
        return sum(layer.engine.model_s for layer in self.layers)

    @property
    def clock(self) -> int:
        return self.layers[0].engine.clock

    def layer(self, name: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    def render(self, frames: int, input: np.ndarray | None = None) -> np.ndarray:
        """The layers' next `frames` samples summed, (frames, channels) float32; each layer through
        its own output stage, the sum through the master stage unless `stage_deferred`. Audio input
        `input` `(frames,)` reaches every layer that takes input."""
        t0 = time.perf_counter()
        out = np.zeros((frames, self.channels))
        for layer in self.layers:
            out += layer.engine.render(frames, input)
        out = out.astype(np.float32) if self.stage_deferred else self.stage.process(out)
        self.timer.add(time.perf_counter() - t0, frames)
        return out

    def stats(self) -> dict[str, Any]:
        """The first layer's figures, with the render, voice and error figures of them all."""
        per_layer = [layer.engine.stats() for layer in self.layers]
        stats = {**per_layer[0], **self.timer.figures(), "layers": len(self.layers)}
        for key in ("voices", "voices_sounding", "nan_blocks", "decode_errors", "skipped_calls", "skipped_rows"):
            stats[key] = sum(s[key] for s in per_layer)
        stats["latency_ms"] = max(s["latency_ms"] for s in per_layer)  # the layers' models alone
        if self.output_stats is not None:
            out = self.output_stats()
            stats["latency_ms"] += out.get("latency_ms", 0.0)
            stats.update({k: v for k, v in out.items() if k != "latency_ms"})
        return stats
