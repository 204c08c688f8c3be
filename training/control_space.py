"""The coordinates a model file exposes: controls as an affine change of the VAE's latent space.

`z_vae = offset + basis @ u`, where `u` holds the control values in model units. An exported
file's `decode` takes `u` and its `encode` returns `u`, so the file's latent dimensions are the
controls its metadata describes. `pca_space` orders directions by variance on the data; the
analysis of named controls (training/analyze.py) builds richer spaces of the same type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

_LABEL = re.compile(r"^[a-z0-9_]+$")
SOURCES = ("pca", "attribute", "regularized", "f0", "voicing")


@dataclass
class ControlSpec:
    """One control: its label, useful range and default in model units, and where it came from."""

    label: str
    minimum: float
    maximum: float
    default: float
    source: str = "pca"
    attribute: str | None = None
    quality: dict[str, Any] | None = None
    unit: str | None = None

    def to_metadata(self, index: int) -> dict[str, Any]:
        """The control's entry in the model file's metadata (README schema)."""
        entry = {"index": index, "label": self.label, "min": float(self.minimum), "max": float(self.maximum),
                 "default": float(self.default), "source": self.source, "attribute": self.attribute,
                 "quality": self.quality}
        if self.unit is not None:
            entry["unit"] = self.unit
        return entry


@dataclass
class ControlSpace:
    """z = offset + basis @ u. offset `(L,)`, basis `(L, L)` invertible (column j = control j's
    direction in latent space), controls: L specs in decode's input order."""

    offset: np.ndarray
    basis: np.ndarray
    controls: list[ControlSpec]

    def validate(self) -> None:
        """Raise ValueError naming the problem unless the space can be shipped in a model file."""
        offset = np.asarray(self.offset)
        basis = np.asarray(self.basis)
        size = offset.shape[0] if offset.ndim == 1 else -1
        if offset.ndim != 1 or basis.shape != (size, size):
            raise ValueError(f"control space: offset {offset.shape} and basis {basis.shape} must be (L,) and (L, L)")
        if len(self.controls) != size:
            raise ValueError(f"control space: {len(self.controls)} controls for a latent size of {size}")
        if not (np.all(np.isfinite(offset)) and np.all(np.isfinite(basis))):
            raise ValueError("control space: offset or basis is not finite")
        cond = np.linalg.cond(basis.astype(np.float64))
        if not np.isfinite(cond) or cond > 1e6:
            raise ValueError(f"control space: basis is not (well) invertible (condition number {cond:.3g})")
        seen: set[str] = set()
        for i, c in enumerate(self.controls):
            if not _LABEL.match(c.label):
                raise ValueError(f"control {i}: label {c.label!r} must be lowercase [a-z0-9_]")
            if c.label in seen:
                raise ValueError(f"control {i}: label {c.label!r} is used twice")
            seen.add(c.label)
            if not (np.isfinite([c.minimum, c.maximum, c.default]).all() and c.minimum < c.maximum):
                raise ValueError(f"control {i} ({c.label}): range [{c.minimum}, {c.maximum}] must be finite and increasing")
            if not c.minimum <= c.default <= c.maximum:
                raise ValueError(f"control {i} ({c.label}): default {c.default} outside [{c.minimum}, {c.maximum}]")
            if c.source not in SOURCES:
                raise ValueError(f"control {i} ({c.label}): source {c.source!r} is not one of {SOURCES}")

    def to_latent(self, u: np.ndarray) -> np.ndarray:
        """Control values `(..., L)` -> VAE latents `(..., L)`."""
        return np.asarray(self.offset) + np.asarray(u) @ np.asarray(self.basis).T

    def from_latent(self, z: np.ndarray) -> np.ndarray:
        """VAE latents `(..., L)` -> control values `(..., L)`."""
        inverse = np.linalg.inv(np.asarray(self.basis, dtype=np.float64))
        return (np.asarray(z, dtype=np.float64) - np.asarray(self.offset)) @ inverse.T

    def metadata(self) -> list[dict[str, Any]]:
        return [c.to_metadata(i) for i, c in enumerate(self.controls)]


def pca_space(latent_means: np.ndarray, low: float = 2.0, high: float = 98.0) -> ControlSpace:
    """PCA of latent means `(frames, L)`: controls `timbre_1..L` in order of decreasing variance.

    offset = the mean latent; basis = orthonormal principal directions, each signed so that its
    largest component is positive (deterministic across runs); range = the `low`..`high`
    percentiles of the data's coordinates, default = their median. A direction the data never
    moves along (a collapsed dimension) gets the range default ± 0.5, so it stays playable.
    """
    z = np.asarray(latent_means, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"pca_space needs latent means of shape (frames >= 2, L), got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("pca_space: latent means contain NaN or infinity")
    offset = z.mean(axis=0)
    cov = np.cov(z - offset, rowvar=False).reshape(z.shape[1], z.shape[1])
    variance, vectors = np.linalg.eigh(cov)
    order = np.argsort(variance)[::-1]
    basis = vectors[:, order]
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(basis.shape[1])])
    basis = basis * np.where(signs == 0, 1.0, signs)
    u = (z - offset) @ basis
    lo, mid, hi = np.percentile(u, [low, 50.0, high], axis=0)
    controls = []
    for j in range(z.shape[1]):
        a, m, b = float(lo[j]), float(mid[j]), float(hi[j])
        if b - a < 1e-3:
            a, b = m - 0.5, m + 0.5
        controls.append(ControlSpec(label=f"timbre_{j + 1}", minimum=a, maximum=b, default=m, source="pca"))
    space = ControlSpace(offset=offset.astype(np.float32), basis=basis.astype(np.float32), controls=controls)
    space.validate()
    return space
