"""What each control does, measured, and named only when it means what it says.

`synthd-train analyze RUN_DIR` (also run by export): encode the prepared set with the trained
VAE (posterior means), compute the per-frame descriptors of the same audio
(`training.descriptors`), and for each descriptor fit the linear latent direction that
predicts it (ridge regression in the whitened latent space, fitted on training files, scored by
Spearman rho on validation files). A descriptor predicted well on held-out files becomes a
candidate control that moves along its direction; the direction is the least-norm (whitened)
one that changes its descriptor by one unit while holding every other predictable descriptor
still, to first order. A candidate is named only when a sweep of it through the decoder (0 to
1, other controls at their defaults) moves its own descriptor with rho >= 0.9 and every other
descriptor by |rho| <= 0.3. The rest of the latent space, the directions that leave the named
descriptors unchanged, is offered as `timbre_1..k` in PCA order of the residual. Every control's
range is the 2nd-98th percentile of its coordinate over the data's sounding frames, its default
the median.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.stats import spearmanr

from training.control_space import ControlSpace, ControlSpec
from training.descriptors import DESCRIPTOR_NAMES, DescriptorConfig, analysis_values, compute

# Decodes control coordinates `(points, latent, frames)` to audio `(points, samples)`.
ControlDecoder = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class AnalysisConfig:
    """Thresholds of the analysis. The sweep rule's figures are the product's promise."""

    heldout_rho: float = 0.7      # held-out Spearman rho a descriptor's fit needs to become a candidate
    constrain_rho: float = 0.3    # descriptors predicted at least this well are held still by the others
    own_rho: float = 0.9          # sweep rule: a named control moves its descriptor at least this much
    other_rho: float = 0.3        # ... and no other descriptor by more than this
    sweep_points: int = 11
    sweep_frames: int = 96        # latent frames decoded per sweep point
    # frames left out at the start of each decode: a decoder starting from zero state needs its
    # receptive field (tens of frames for causal dilated stacks) to forget the zeros
    settle_frames: int = 64
    ridge: float = 1e-2
    refine_iterations: int = 3    # secant corrections of the directions, measured on the decoder
    min_response_r2: float = 0.5  # share of a descriptor's decoded change a linear response must explain
    # descriptors of note onsets: a held control value shows them only as the decoder's start from
    # silence, so no direction steers or holds them. Sweeps report them, but the rule does not
    # count them as crosstalk: a played note's onset is the gate's envelope on a running decoder
    # (synthd never restarts the decoder for a note), and the start from silence of a held decode
    # is no note: its rise time jumps with wherever the held sound's envelope happens to peak.
    onset_descriptors: tuple[str, ...] = ("attack",)
    # just-noticeable change of each descriptor on its analysis scale (dB, octaves, log10): a
    # descriptor whose whole change along a sweep stays below it has not moved, whatever its rho
    # (a monotone drift of 0.01 cent has rho 1 and is inaudible); a named control must move its
    # own descriptor by at least twice it
    noticeable: dict[str, float] = field(default_factory=lambda: {
        "loudness": 1.0, "brightness": 0.05, "pitch": 5.0 / 1200.0, "noisiness": 0.1, "attack": 0.1})
    low_percentile: float = 2.0
    high_percentile: float = 98.0
    # A named control whose sweep over the data's whole spread fails the rule may keep the
    # longest part of that spread where it passes, if that part is at least this share of it: a
    # decoder's response bends toward the ends of the data (a brightness direction that also gets
    # louder past some point), and a knob that means what it says over most of the range is
    # worth more than none. The narrowed range is swept again in full before it is accepted.
    min_range_share: float = 0.5
    min_frames: int = 20          # fewer valid frames than this in a split: the fit is not scored
    max_fit_frames: int = 50000   # frames kept (evenly spaced) for fitting, to bound memory


@dataclass
class FrameTable:
    """The encoded data set, one row per sounding frame."""

    latents: np.ndarray             # (frames, latent) posterior means
    values: dict[str, np.ndarray]   # descriptor -> (frames,) analysis values, NaN where undefined
    train: np.ndarray               # (frames,) True for frames of training files


@dataclass
class Fit:
    """Linear prediction of one descriptor: value ~ gradient . (z - mean) + intercept."""

    attribute: str
    gradient: np.ndarray            # (latent,)
    intercept: float
    train_rho: float | None
    heldout_rho: float | None
    heldout_r2: float | None
    train_frames: int
    heldout_frames: int


@dataclass
class Sweep:
    """A control swept over its range: the descriptors' medians and their Spearman rho."""

    control: str
    positions: list[float]                       # wire values 0..1
    medians: dict[str, list[float | None]]       # descriptor -> per position (None: undefined there)
    rho: dict[str, float | None]                 # descriptor -> rho (None: too few defined points)
    span: dict[str, float | None]                # descriptor -> max - min of the medians (analysis units)


@dataclass
class Analysis:
    space: ControlSpace
    fits: dict[str, Fit]
    sweeps: dict[str, Sweep]                     # by candidate attribute
    named: list[str]
    rejected: dict[str, str] = field(default_factory=dict)   # attribute -> why it is not named

    def summary(self) -> dict:
        """A JSON-ready account of the analysis."""
        return {
            "named": self.named,
            "rejected": self.rejected,
            "fits": {k: {"train_rho": f.train_rho, "heldout_rho": f.heldout_rho, "heldout_r2": f.heldout_r2,
                         "train_frames": f.train_frames, "heldout_frames": f.heldout_frames}
                     for k, f in self.fits.items()},
            "sweeps": {k: asdict(s) for k, s in self.sweeps.items()},
            "controls": [asdict(c) for c in self.space.controls],
        }


def _spearman(a: np.ndarray, b: np.ndarray, min_points: int) -> float | None:
    """Spearman rho over the points where both are finite; 0 when one side is constant, None
    when fewer than `min_points` remain."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < min_points:
        return None
    if np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return 0.0
    # rho of ranks is a ratio of integers: rounding drops the float noise that would otherwise
    # decide the rule's limits (an exact 0.3 computes as 0.30000000000000004 > 0.3)
    return round(float(spearmanr(a[ok], b[ok]).statistic), 12)


def _hop(model: torch.nn.Module) -> int:
    return int(model.cfg.hop)


def encode_set(model: torch.nn.Module, dataset, desc_cfg: DescriptorConfig, show_progress: bool = True,
               body_db: float = 30.0) -> FrameTable:
    """Posterior means and descriptors of the sounding frames of the prepared set: those above
    the silence gate and within `body_db` of their file's loudest frame."""
    from training.progress import Progress

    files = list(dataset.files)
    if not files:
        raise ValueError(f"{dataset.root}: the prepared set has no files")
    hop = _hop(model)
    latents, train, values = [], [], {name: [] for name in DESCRIPTOR_NAMES}
    progress = Progress(len(files), "analyse: encoding") if show_progress else None
    for f in files:
        audio = np.asarray(dataset.load(f), dtype=np.float32)
        if len(audio) < hop:
            audio = np.pad(audio, (0, hop - len(audio)))
        audio = audio[:len(audio) // hop * hop]
        x = torch.from_numpy(audio)[None, None]
        with torch.no_grad():
            mean = model.encode(x)[0][0].T.numpy()            # (frames, latent)
        vals = analysis_values(compute(x, desc_cfg), desc_cfg)
        frames = min(mean.shape[0], vals["loudness"].shape[-1])
        level = vals["loudness"][0, :frames].numpy()
        # the body of each sound, not its long quiet tail: tails would outnumber everything
        # else and put the defaults (medians) on a near-silent noise floor
        sounding = (level >= desc_cfg.silence_db) & (level >= level.max(initial=-np.inf) - body_db)
        latents.append(mean[:frames][sounding])
        for name in DESCRIPTOR_NAMES:
            values[name].append(vals[name][0, :frames].numpy()[sounding])
        train.append(np.full(int(sounding.sum()), f.split == "train"))
        if progress:
            progress.update(1)
    if progress:
        progress.close()
    table = FrameTable(latents=np.concatenate(latents).astype(np.float64),
                       values={k: np.concatenate(v).astype(np.float64) for k, v in values.items()},
                       train=np.concatenate(train))
    if len(table.latents) == 0:
        raise ValueError(f"{dataset.root}: no sounding frame in the prepared set")
    return table


@dataclass
class _Whitening:
    mean: np.ndarray        # (latent,)
    axes: np.ndarray        # (latent, active) principal axes with non-negligible variance
    scale: np.ndarray       # (active,) standard deviation along each axis

    def apply(self, z: np.ndarray) -> np.ndarray:
        return (z - self.mean) @ self.axes / self.scale


def _whitening(z: np.ndarray) -> _Whitening:
    mean = z.mean(0)
    var, axes = np.linalg.eigh(np.cov(z - mean, rowvar=False))
    # dimensions the encoder never moves (collapsed) carry no information to fit on
    active = var > max(var.max(), 1e-12) * 1e-6
    return _Whitening(mean=mean, axes=axes[:, active], scale=np.sqrt(var[active]))


def _even(index: np.ndarray, limit: int) -> np.ndarray:
    return index if len(index) <= limit else index[np.linspace(0, len(index) - 1, limit).astype(int)]


def fit_descriptors(table: FrameTable, cfg: AnalysisConfig = AnalysisConfig()) -> tuple[dict[str, Fit], _Whitening]:
    """Ridge fit of each descriptor on training frames, scored on validation frames."""
    white = _whitening(table.latents[table.train] if table.train.sum() > 1 else table.latents)
    fits: dict[str, Fit] = {}
    if white.axes.shape[1] == 0:
        return fits, white  # the encoder maps everything to one point: nothing to fit
    for name in DESCRIPTOR_NAMES:
        v = table.values[name]
        tr = _even(np.flatnonzero(table.train & np.isfinite(v)), cfg.max_fit_frames)
        va = np.flatnonzero(~table.train & np.isfinite(v))
        if len(tr) < cfg.min_frames:
            continue
        y = white.apply(table.latents[tr])
        target = v[tr] - v[tr].mean()
        beta = np.linalg.solve(y.T @ y + cfg.ridge * len(tr) * np.eye(y.shape[1]), y.T @ target)
        gradient = white.axes @ (beta / white.scale)
        intercept = float(v[tr].mean() + (white.mean - table.latents[tr].mean(0)) @ gradient)

        def predict(rows: np.ndarray) -> np.ndarray:
            return (table.latents[rows] - white.mean) @ gradient + intercept

        heldout_rho = heldout_r2 = None
        if len(va) >= cfg.min_frames:
            pred = predict(va)
            heldout_rho = _spearman(pred, v[va], cfg.min_frames)
            residual = ((v[va] - pred) ** 2).sum()
            total = ((v[va] - v[va].mean()) ** 2).sum()
            heldout_r2 = float(1.0 - residual / total) if total > 0 else None
        fits[name] = Fit(attribute=name, gradient=gradient, intercept=intercept,
                         train_rho=_spearman(predict(tr), v[tr], cfg.min_frames), heldout_rho=heldout_rho,
                         heldout_r2=heldout_r2, train_frames=len(tr), heldout_frames=len(va))
    return fits, white


def disentangled_directions(gradients: dict[str, np.ndarray], white: _Whitening, targets: list[str],
                            constrained: list[str]) -> dict[str, np.ndarray]:
    """For each target descriptor, the latent direction of least whitened norm along which the
    target rises by one unit and every other `constrained` descriptor stays put, to first order
    under `gradients` (descriptor -> d value / d z, `(latent,)`)."""
    names = list(dict.fromkeys(list(targets) + list(constrained)))
    if not names:
        return {}
    # gradients seen from whitened coordinates: d value / d y = axes^T gradient * scale
    g = np.stack([(white.axes.T @ gradients[n]) * white.scale for n in names], axis=1)   # (active, n)
    # descriptors in different units: solve on unit-norm gradients. Nearly dependent constraints
    # (brightness of a harmonic tone follows its pitch) are merged by truncating small singular
    # values: the min-norm least-squares solution then favours no measurement noise.
    norms = np.linalg.norm(g, axis=0)
    norms[norms == 0] = 1.0
    solution = np.linalg.pinv((g / norms).T, rcond=0.05) / norms     # columns: whitened directions
    directions = {}
    for name in targets:
        vy = solution[:, names.index(name)]
        directions[name] = white.axes @ (vy * white.scale)
    return directions


def build_space(table: FrameTable, gradients: dict[str, np.ndarray], white: _Whitening, named: list[str],
                directions: dict[str, np.ndarray], qualities: dict[str, dict], regularized: set[str],
                cfg: AnalysisConfig = AnalysisConfig(),
                parts: dict[str, tuple[float, float]] | None = None) -> ControlSpace:
    """Named controls first (in `named` order), then `timbre_1..k`: the PCA of what the named
    directions leave, within the directions that keep every named prediction unchanged. Each
    range is the data's spread; `parts` narrows a named control's to (first, last), fractions of
    that spread, with its default (the data's median) kept inside."""
    parts = parts or {}
    latent = table.latents.shape[1]
    offset = white.mean
    centred = table.latents - offset
    columns = [directions[n] for n in named]
    if named:
        w = np.stack([gradients[n] for n in named], axis=1)                  # (latent, named)
        _, _, vh = np.linalg.svd(w.T)
        null = vh[len(named):].T                                             # (latent, latent - named)
        residual = centred - (centred @ w) @ np.stack(columns, axis=1).T
    else:
        null = np.eye(latent)
        residual = centred
    coords = residual @ null
    var, rot = np.linalg.eigh(np.cov(coords, rowvar=False).reshape(null.shape[1], null.shape[1]))
    timbre = null @ rot[:, np.argsort(var)[::-1]]
    # sign each timbre direction so its largest component is positive: the same run always
    # exports the same controls
    signs = np.sign(timbre[np.abs(timbre).argmax(axis=0), np.arange(timbre.shape[1])])
    timbre = timbre * np.where(signs == 0, 1.0, signs)
    basis = np.concatenate([np.stack(columns, axis=1), timbre], axis=1) if columns else timbre
    u = np.linalg.solve(basis, centred.T).T                                  # (frames, latent)
    lo = np.percentile(u, cfg.low_percentile, axis=0)
    hi = np.percentile(u, cfg.high_percentile, axis=0)
    mid = np.median(u, axis=0)
    controls = []
    for j in range(latent):
        a, b = float(lo[j]), float(hi[j])
        if b - a < 1e-3:
            # a direction the data never moves along (collapsed) stays playable around its median
            a, b = float(mid[j]) - 0.5, float(mid[j]) + 0.5
        if j < len(named):
            name = named[j]
            first, last = parts.get(name, (0.0, 1.0))
            a, b = a + first * (b - a), a + last * (b - a)
            controls.append(ControlSpec(label=name, minimum=a, maximum=b, default=float(np.clip(mid[j], a, b)),
                                        source="regularized" if name in regularized else "attribute",
                                        attribute=name, quality=qualities.get(name)))
        else:
            controls.append(ControlSpec(label=f"timbre_{j - len(named) + 1}", minimum=a, maximum=b,
                                        default=float(mid[j]), source="pca", attribute=None, quality=None))
    space = ControlSpace(offset=offset.astype(np.float32), basis=basis.astype(np.float32), controls=controls)
    space.validate()
    return space


def settled_for(config: AnalysisConfig, receptive_frames: int | None) -> AnalysisConfig:
    """`config` with each held decode just long enough for a decoder of that receptive field
    (frames) to forget its zero start, plus 32 frames to measure; unchanged when unknown."""
    if not receptive_frames:
        return config
    settle = int(receptive_frames) + 4
    return replace(config, settle_frames=settle, sweep_frames=settle + 32)


def _descriptor_medians(audio: np.ndarray, cfg: AnalysisConfig, desc_cfg: DescriptorConfig) -> dict[str, np.ndarray]:
    """Per decoded clip `(points, samples)`, the median of each descriptor over its frames after
    `settle_frames`; NaN where the descriptor is defined on fewer than half of them."""
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    vals = analysis_values(compute(x, desc_cfg), desc_cfg)
    out = {}
    for name in DESCRIPTOR_NAMES:
        v = vals[name][:, cfg.settle_frames:].numpy().astype(np.float64)
        defined = np.isfinite(v).mean(axis=1) >= 0.5
        out[name] = np.array([np.nanmedian(row) if ok else np.nan for row, ok in zip(v, defined)])
    return out


def decoder_gradients(decode: Callable[[np.ndarray], np.ndarray], white: _Whitening, centre: np.ndarray,
                      cfg: AnalysisConfig = AnalysisConfig(),
                      desc_cfg: DescriptorConfig = DescriptorConfig()) -> dict[str, np.ndarray]:
    """d descriptor / d z at latent point `centre`, `(latent,)` each, measured through `decode`
    (latents `(points, latent, frames)` -> audio `(points, samples)`): along every principal axis
    of the data, five held decodes from -1 to +1 standard deviation and the least-squares slope
    of the descriptor's medians (over the points where it is defined, at least three including the
    centre). Descriptors undefined at the centre, or whose linear response explains less than
    `min_response_r2` of their change, are left out: they can neither be steered nor held still
    from here."""
    if white.axes.shape[1] == 0:
        return {}
    steps = np.linspace(-1.0, 1.0, 5)
    moves = (white.axes * white.scale).T                                    # (active, latent)
    points = centre[None, None] + steps[:, None, None] * moves[None]       # (steps, active, latent)
    z = np.repeat(points.reshape(-1, len(centre))[:, :, None], cfg.sweep_frames, axis=2).astype(np.float32)
    medians = _descriptor_medians(decode(z), cfg, desc_cfg)
    gradients = {}
    for name, m in medians.items():
        if name in cfg.onset_descriptors:
            continue
        m = m.reshape(len(steps), -1)
        slopes = [_slope(steps, m[:, a]) for a in range(m.shape[1])]
        if any(sl is None for sl in slopes):
            continue
        slope = np.array(slopes)
        explained = (slope ** 2).sum() * (steps ** 2).sum()
        total = np.nansum((m - np.nanmean(m, axis=0)) ** 2)
        # a descriptor that barely follows a straight line along the axes (measurement noise,
        # e.g. attack on held sounds) can neither be steered nor held still by a direction
        if explained > 0 and explained >= cfg.min_response_r2 * total:
            gradients[name] = white.axes @ (slope / white.scale)
    return gradients


def _slope(t: np.ndarray, m: np.ndarray) -> float | None:
    """Least-squares slope of `m` against `t` over the finite points; None unless at least three,
    the middle one among them, are finite."""
    ok = np.isfinite(m)
    if ok.sum() < 3 or not ok[len(t) // 2]:
        return None
    t0, m0 = t[ok] - t[ok].mean(), m[ok] - m[ok].mean()
    return float((t0 * m0).sum() / (t0 ** 2).sum())


def _line_effects(decode: Callable[[np.ndarray], np.ndarray], white: _Whitening, centre: np.ndarray,
                  directions: dict[str, np.ndarray], frames: np.ndarray, cfg: AnalysisConfig,
                  desc_cfg: DescriptorConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """How every descriptor in `directions` changes along every direction: `(effect, reach)`, where
    `effect[i, j]` is the least-squares slope of descriptor i per unit of direction j over five
    held decodes through `centre` spanning the data's range along direction j (the
    `low_percentile`..`high_percentile` of the whitened projections of `frames`, `(n, latent)`),
    `reach[j]` that span's length. The range a control will sweep, not one around the centre: a
    curved response is then straightened where it will be heard. None when a descriptor is
    undefined along its own line."""
    names = list(directions)
    unit = np.linspace(0.0, 1.0, 5)
    y = white.apply(frames) - white.apply(centre[None])
    lines, reach = [], []
    for n in names:
        w = white.axes.T @ directions[n] / white.scale               # the direction, whitened
        t = y @ w / max(float(w @ w), 1e-24)                          # data coordinates along it
        lo, hi = np.percentile(t, [cfg.low_percentile, cfg.high_percentile])
        lines.append(lo + unit * (hi - lo))
        reach.append(hi - lo)
    reach = np.array(reach)
    z = np.concatenate([centre[None] + t[:, None] * directions[n][None] for n, t in zip(names, lines)])
    z = np.repeat(z[:, :, None], cfg.sweep_frames, axis=2).astype(np.float32)
    medians = _descriptor_medians(decode(z), cfg, desc_cfg)
    effect = np.zeros((len(names), len(names)))
    for j, t in enumerate(lines):
        for i, name in enumerate(names):
            slope = _slope(t, medians[name][j * len(unit):(j + 1) * len(unit)])
            if slope is None and i == j:
                return None
            # a descriptor undefined along another's line cannot be corrected there: leave it
            effect[i, j] = 0.0 if slope is None else slope
    return effect, reach


def refine_directions(decode: Callable[[np.ndarray], np.ndarray], white: _Whitening, centre: np.ndarray,
                      directions: dict[str, np.ndarray], frames: np.ndarray, cfg: AnalysisConfig = AnalysisConfig(),
                      desc_cfg: DescriptorConfig = DescriptorConfig()) -> dict[str, np.ndarray]:
    """Secant (Newton) corrections of `directions` (descriptor -> latent direction meant to move
    it by one unit and the others not at all): measure through `decode` how every descriptor
    actually changes along every direction over the data's range along it (`frames`, latents
    `(n, latent)`), and undo the
    measured crosstalk (V' = V M^-1), up to `refine_iterations` times. Gradients measured along
    principal axes miss curvature and interactions, and each correction moves the lines, so
    their crosstalk is measured again along the corrected ones. Returns the directions whose
    measured crosstalk (the largest change of another descriptor along a line, in noticeable
    steps) is smallest, `directions` themselves when the effects cannot be measured or inverted."""
    names = list(directions)
    if not names:
        return directions
    noticeable = np.array([cfg.noticeable[n] for n in names])
    best = dict(directions)
    best_crosstalk = np.full(len(names), math.inf)
    current = directions
    for _ in range(cfg.refine_iterations + 1):
        measured = _line_effects(decode, white, centre, current, frames, cfg, desc_cfg)
        if measured is None:
            break
        effect, reach = measured
        # the change of each other descriptor over each whole line, in noticeable steps
        change = np.abs(effect * reach[None, :]) / noticeable[:, None]
        np.fill_diagonal(change, 0.0)
        # each line's crosstalk is measured along that line alone, so each direction keeps its own
        # best: a correction that helps the others cannot spoil one that was already clean
        for j, n in enumerate(names):
            crosstalk = float(change[:, j].max())
            if effect[j, j] > 0 and crosstalk < best_crosstalk[j]:
                best[n], best_crosstalk[j] = current[n], crosstalk
        if np.linalg.cond(effect) > 1e3:
            break
        corrected = np.stack([current[n] for n in names], axis=1) @ np.linalg.inv(effect)
        current = {n: corrected[:, j] for j, n in enumerate(names)}
    return best


def sweep(decode: ControlDecoder, controls: list[ControlSpec], index: int, cfg: AnalysisConfig = AnalysisConfig(),
          desc_cfg: DescriptorConfig = DescriptorConfig()) -> Sweep:
    """Sweep control `index` from 0 to 1 on the wire (others at their defaults), each position
    held for `sweep_frames` frames; per position the median of each descriptor over the frames
    after `settle_frames`, and the Spearman rho of each descriptor against the position."""
    positions = np.linspace(0.0, 1.0, cfg.sweep_points)
    defaults = np.array([c.default for c in controls], dtype=np.float64)
    spec = controls[index]
    u = np.repeat(defaults[None], len(positions), axis=0)
    u[:, index] = spec.minimum + positions * (spec.maximum - spec.minimum)
    z = np.repeat(u[:, :, None], cfg.sweep_frames, axis=2).astype(np.float32)
    return _sweep_of(spec.label, positions, _descriptor_medians(decode(z), cfg, desc_cfg))


def _sweep_of(control: str, positions: np.ndarray, medians: dict[str, np.ndarray]) -> Sweep:
    """A sweep's record from its positions and each descriptor's medians there (NaN: undefined)."""
    rho = {name: _spearman(positions, med, max(5, len(positions) // 2)) for name, med in medians.items()}
    span = {name: float(np.nanmax(med) - np.nanmin(med)) if np.isfinite(med).any() else None
            for name, med in medians.items()}
    return Sweep(control=control, positions=[float(p) for p in positions],
                 medians={k: [float(m) if np.isfinite(m) else None for m in v] for k, v in medians.items()},
                 rho=rho, span=span)


def _part(s: Sweep, first: int, last: int) -> Sweep:
    """The sweep's points `first..last` alone, with their rho and span."""
    return _sweep_of(s.control, np.array(s.positions[first:last + 1]),
                     {k: np.array([np.nan if m is None else m for m in v[first:last + 1]])
                      for k, v in s.medians.items()})


def passing_part(s: Sweep, attribute: str, cfg: AnalysisConfig = AnalysisConfig()) -> tuple[float, float] | None:
    """The longest run of the sweep's points, covering at least `min_range_share` of its range,
    over which the rule holds for `attribute` (the widest own change among equally long ones), as
    (first, last) wire positions; None when there is none."""
    count = len(s.positions)
    shortest = int(math.ceil(cfg.min_range_share * (count - 1))) + 1
    for length in range(count, shortest - 1, -1):
        passing = [_part(s, i, i + length - 1) for i in range(count - length + 1)]
        passing = [q for q in passing if sweep_verdict(q, attribute, cfg) is None]
        if passing:
            best = max(passing, key=lambda q: q.span.get(attribute) or 0.0)
            return best.positions[0], best.positions[-1]
    return None


def sweep_verdict(s: Sweep, attribute: str, cfg: AnalysisConfig = AnalysisConfig()) -> str | None:
    """None when the sweep passes the rule for `attribute`, else why not: its own descriptor moves
    with rho >= own_rho (and by at least twice its noticeable change), every other descriptor that
    changes noticeably with |rho| <= other_rho (onset descriptors aside: see `onset_descriptors`)."""
    own = s.rho.get(attribute)
    if own is None or own < cfg.own_rho:
        return f"sweep moves {attribute} with rho {own if own is None else round(own, 3)} < {cfg.own_rho}"
    if (s.span.get(attribute) or 0.0) < 2 * cfg.noticeable[attribute]:
        return f"sweep moves {attribute} by only {s.span.get(attribute) or 0.0:.3g} (too little to hear)"
    moved = [(abs(r), other, r) for other, r in counted_crosstalk(s, attribute, cfg).items() if abs(r) > cfg.other_rho]
    if moved:
        _, other, r = max(moved)  # the worst one: what the control is really tied to
        return f"sweep also moves {other} (rho {r:.3f}, limit {cfg.other_rho})"
    return None


def counted_crosstalk(s: Sweep, attribute: str, cfg: AnalysisConfig = AnalysisConfig()) -> dict[str, float]:
    """The other descriptors the sweep rule counts along `attribute`'s sweep, with their rho: those
    that change by at least their noticeable step, note onsets aside (see `onset_descriptors`)."""
    return {other: r for other, r in s.rho.items()
            if other != attribute and other not in cfg.onset_descriptors and r is not None
            and (s.span.get(other) or 0.0) >= cfg.noticeable[other]}


def vae_latent_decoder(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """VAE latents `(points, latent, frames)` -> audio `(points, samples)`, zero initial state."""
    def decode(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.decode(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)))[:, 0].numpy()

    return decode


def _independent(names: list[str], gradients: dict[str, np.ndarray], directions: dict[str, np.ndarray],
                 fits: dict[str, Fit], rejected: dict[str, str]) -> list[str]:
    """`names` less the worst-fitted ones until their directions move their own descriptors
    independently (the controls must form part of an invertible basis)."""
    names = list(names)
    while names:
        w = np.stack([gradients[n] for n in names], axis=1)
        v = np.stack([directions[n] for n in names], axis=1)
        if np.linalg.cond(w.T @ v) < 1e3 and np.linalg.matrix_rank(v) == len(names):
            return names
        worst = min(names, key=lambda n: fits[n].heldout_rho or 0.0)
        rejected[worst] = "no latent direction left that moves it independently of the other named controls"
        names.remove(worst)
    return names


def control_decoder(decode_latents: Callable[[np.ndarray], np.ndarray], space: ControlSpace) -> ControlDecoder:
    """Decodes control coordinates as the exported file does: z = offset + basis @ u."""
    offset = np.asarray(space.offset, dtype=np.float64)
    basis = np.asarray(space.basis, dtype=np.float64)

    def decode(u: np.ndarray) -> np.ndarray:
        return decode_latents(offset[None, :, None] + np.einsum("lk,bkt->blt", basis, u))

    return decode


def analyze(model: torch.nn.Module, dataset, *, regularized: list[str] | tuple[str, ...] = (),
            config: AnalysisConfig = AnalysisConfig(), show_progress: bool = True) -> Analysis:
    """The full analysis of a trained VAE on its prepared set (see the module docstring)."""
    model.eval()
    config = settled_for(config, getattr(model.decoder, "receptive_frames", None))
    desc_cfg = DescriptorConfig(sample_rate=int(dataset.preprocessing.get("sample_rate", 48000)), hop=_hop(model))
    table = encode_set(model, dataset, desc_cfg, show_progress)
    # a decoder with a pitch input is played at a pitch; no latent is asked to stand in for it,
    # and the latents are swept with the pitch held (vae_latent_decoder decodes at the held one)
    given = {"pitch": "the model's pitch input (named by construction)"} if model.cfg.conditioning else {}
    return analyze_table(table, vae_latent_decoder(model), regularized=regularized, config=config,
                         desc_cfg=desc_cfg, show_progress=show_progress, given=given)


def analyze_table(table: FrameTable, decode_latents: Callable[[np.ndarray], np.ndarray], *,
                  regularized: list[str] | tuple[str, ...] = (), config: AnalysisConfig = AnalysisConfig(),
                  desc_cfg: DescriptorConfig = DescriptorConfig(), show_progress: bool = False,
                  given: dict[str, str] | None = None) -> Analysis:
    """The analysis of an encoded set, `decode_latents` mapping latents `(points, latent, frames)`
    to audio `(points, samples)` from a zero initial state. `given` names descriptors the model
    takes as inputs, with the reason: no latent control is made for them (they are still held
    still while the others are swept)."""
    fits, white = fit_descriptors(table, config)
    rejected = dict(given or {})
    for name in DESCRIPTOR_NAMES:
        fit = fits.get(name)
        if name in rejected:
            continue
        if fit is None:
            rejected[name] = ("the encoder gives every frame the same latents" if white.axes.shape[1] == 0
                              else "too few frames where it is defined")
        elif fit.heldout_rho is None:
            rejected[name] = f"too few validation frames ({fit.heldout_frames}) to score the fit"
        elif fit.heldout_rho < config.heldout_rho:
            rejected[name] = f"held-out fit rho {fit.heldout_rho:.3f} < {config.heldout_rho}"
    # directions come from the decoder's own response at the data's centre: a direction fitted on
    # the encoder's view alone leaves first-order crosstalk that a sweep shows as monotone drift
    centre = white.mean + white.axes @ (np.median(white.apply(table.latents), axis=0) * white.scale)
    gradients = decoder_gradients(decode_latents, white, centre, config, desc_cfg)
    for name in DESCRIPTOR_NAMES:
        if name not in rejected and name not in gradients:
            rejected[name] = ("a property of note onsets, which a held control cannot steer"
                              if name in config.onset_descriptors else
                              "undefined on the decoded sound around the defaults")
    candidates = [n for n in DESCRIPTOR_NAMES if n not in rejected]
    # directions for every measurable descriptor (the ones to hold still too), then corrected
    # up to three times along the lines themselves (see refine_directions)
    directions = disentangled_directions(gradients, white, list(gradients), list(gradients))
    # the least-squares compromise may not move a descriptor at all when the others pin it down
    movable = [n for n in gradients if 0.5 < float(gradients[n] @ directions[n]) < 2.0]
    for name in candidates:
        if name not in movable:
            rejected[name] = "no latent direction moves it while holding the other descriptors still"
    candidates = [n for n in candidates if n not in rejected]
    directions.update(refine_directions(decode_latents, white, centre, {n: directions[n] for n in movable},
                                        _even(table.latents, 2000), config, desc_cfg))
    regularized = set(regularized)

    def measure(names: list[str]) -> None:
        space = build_space(table, gradients, white, names, directions, {}, regularized, config, parts)
        decode = control_decoder(decode_latents, space)
        progress = None
        if show_progress and names:
            from training.progress import Progress
            progress = Progress(len(names), "analyse: sweeping")
        for i, name in enumerate(names):
            sweeps[name] = sweep(decode, space.controls, i, config, desc_cfg)
            why = sweep_verdict(sweeps[name], name, config)
            part = passing_part(sweeps[name], name, config) if why else None
            if part is not None:
                # narrow the range to where the rule held, and sweep that range again in full
                first, last = parts.get(name, (0.0, 1.0))
                parts[name] = (first + part[0] * (last - first), first + part[1] * (last - first))
                narrowed = build_space(table, gradients, white, names, directions, {}, regularized, config, parts)
                retry = sweep(control_decoder(decode_latents, narrowed), narrowed.controls, i, config, desc_cfg)
                if sweep_verdict(retry, name, config) is None:
                    sweeps[name], why = retry, None
                else:
                    del parts[name]
            if why:
                rejected[name] = why
            if progress:
                progress.update(1, control=name)
        if progress:
            progress.close()

    def quality(name: str) -> dict:
        first, last = parts.get(name, (0.0, 1.0))
        return {"spearman": sweeps[name].rho[name],
                "crosstalk": {k: v for k, v in sweeps[name].rho.items() if k != name},
                "heldout_fit_spearman": fits[name].heldout_rho, "heldout_fit_r2": fits[name].heldout_r2,
                # the share of the data's spread the range covers (below 1: narrowed to where the rule holds)
                "range_share": round(last - first, 3)}

    # sweep each candidate alone, then the survivors together as shipped (the other controls'
    # defaults move with the set of named ones) until every named one passes
    sweeps: dict[str, Sweep] = {}
    parts: dict[str, tuple[float, float]] = {}
    for name in candidates:
        measure([name])
    named = _independent([n for n in candidates if n not in rejected], gradients, directions, fits, rejected)
    tried: list[str] | None = None
    while named != tried:
        tried = named
        measure(named)
        named = [n for n in named if n not in rejected]
    space = build_space(table, gradients, white, named, directions, {n: quality(n) for n in named}, regularized,
                        config, parts)
    return Analysis(space=space, fits=fits, sweeps=sweeps, named=named, rejected=rejected)


def control_space(model: torch.nn.Module, dataset, *, regularized: list[str] | tuple[str, ...] = (),
                  config: AnalysisConfig = AnalysisConfig(), show_progress: bool = True) -> ControlSpace:
    """The control space export ships: named controls that pass the sweep rule, then timbre_1..k."""
    return analyze(model, dataset, regularized=regularized, config=config, show_progress=show_progress).space


def regularized_attributes(ckpt: dict) -> list[str]:
    """The attributes a run was trained to regularise (empty when it was not)."""
    reg = ckpt.get("config", {}).get("regularize") or {}
    if isinstance(reg, dict):
        reg = reg.get("attributes", [])
    return [str(a) for a in reg]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder")
    parser.add_argument("--data", metavar="DATASET_DIR", help="prepared set (default: the run's own)")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint to analyse")
    parser.add_argument("--out", metavar="FILE", help="where to write the JSON account (default RUN_DIR/analysis.json)")


def run(args: argparse.Namespace) -> int:
    from training.checkpoint import atomic_write_bytes, load_run
    from training.dataset import PreparedSet

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    ckpt, model = load_run(args.run_dir, args.which)
    data_dir = args.data or ckpt.get("dataset_dir")
    if not data_dir:
        print(f"{args.run_dir}: the run does not name its prepared set; pass --data", file=sys.stderr)
        return 2
    dataset = PreparedSet.open(data_dir)
    result = analyze(model, dataset, regularized=regularized_attributes(ckpt))
    out = Path(args.out) if args.out else Path(args.run_dir) / "analysis.json"
    atomic_write_bytes(out, json.dumps(result.summary(), indent=2, default=_json_default).encode())
    print(format_table(result))
    print(f"written {out}")
    return 0


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def format_table(result: Analysis) -> str:
    """A console table: each descriptor, its held-out fit, its sweep and the verdict."""
    def fmt(x: float | None) -> str:
        return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.3f}"

    lines = [f"{'descriptor':<11} {'fit rho':>7} {'sweep rho':>9} {'max other':>9}  verdict"]
    for name in DESCRIPTOR_NAMES:
        fit = result.fits.get(name)
        s = result.sweeps.get(name)
        own = s.rho.get(name) if s else None
        others = [abs(v) for v in counted_crosstalk(s, name).values()] if s else []
        verdict = "named" if name in result.named else f"not named: {result.rejected.get(name, '')}"
        lines.append(f"{name:<11} {fmt(fit.heldout_rho if fit else None):>7} {fmt(own):>9} "
                     f"{fmt(max(others) if others else None):>9}  {verdict}")
    return "\n".join(lines)
