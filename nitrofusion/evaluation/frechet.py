"""Frechet distance between Gaussians fitted to feature sets (the maths behind FID).

d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1 S2)^(1/2) )

Everything is accumulated in float64. tr((S1 S2)^(1/2)) is computed from the eigenvalues
of sqrt(S1) S2 sqrt(S1), which is symmetric positive semi-definite, so no complex matrix
square root (and no scipy.linalg.sqrtm fallback) is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set, with the sample count they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> GaussianStats:
        f = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need a [N>=2, D] feature array, got shape {f.shape}")
        return cls(mu=f.mean(0), sigma=np.cov(f, rowvar=False), n=f.shape[0])

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}mu": torch.from_numpy(self.mu),
            f"{prefix}sigma": torch.from_numpy(self.sigma),
            f"{prefix}n": torch.tensor(self.n),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> GaussianStats:
        return cls(
            mu=tensors[f"{prefix}mu"].double().numpy(),
            sigma=tensors[f"{prefix}sigma"].double().numpy(),
            n=int(tensors[f"{prefix}n"]),
        )


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2."""
    s1 = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    inner = s1 @ np.asarray(sigma2, dtype=np.float64) @ s1
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    diff = a.mu - b.mu
    d = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt_product(a.sigma, b.sigma)
    return float(max(d, 0.0))
