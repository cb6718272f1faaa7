"""Online least-squares regression of gradients on positions, in subspace coordinates.

Model: y ≈ H (x − p) with H symmetric (d×d). Exponentially weighted statistics
(forgetting factor β = weight of the newest sample) keep it online. All tensors here
are float64 and d-sized: this is the curvature service's state, never D-sized.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE = torch.float64


@dataclass
class RegressionStats:
    """EMAs in subspace coordinates. Shapes: x_mean, y_mean (d,); cov_xx, cov_yx (d, d)."""

    x_mean: torch.Tensor
    y_mean: torch.Tensor
    y_var: torch.Tensor  # per-direction EMA variance of y around its mean, (d,)
    cov_xx: torch.Tensor  # Σ = E[(x−x̄)(x−x̄)ᵀ]
    cov_yx: torch.Tensor  # C = E[(y−ȳ)(x−x̄)ᵀ]
    count: torch.Tensor  # per-direction number of samples seen since the direction was (re)born, (d,)

    @classmethod
    def zeros(cls, d: int) -> "RegressionStats":
        z = lambda *s: torch.zeros(*s, dtype=DTYPE)  # noqa: E731
        return cls(z(d), z(d), z(d), z(d, d), z(d, d), z(d))

    def update(self, x: torch.Tensor, y: torch.Tensor, beta: float) -> None:
        """Add one sample (x, y), each (d,). The first samples of a direction get weight
        1/(n+1) (a plain mean) so the zero initial state does not bias the estimate."""
        # Functional (new tensors, nothing written in place): the service's all-or-nothing
        # exchange then backs the statistics up with a shallow copy instead of clones.
        count = self.count + 1
        b = torch.clamp(1.0 / count, min=beta)  # (d,)
        bb = torch.sqrt(torch.outer(b, b))  # pairwise weight for the (i, j) entry
        dx = x - self.x_mean
        x_mean = self.x_mean + b * dx
        dy = y - self.y_mean
        y_mean = self.y_mean + b * dy
        # Welford-style: use the deviation from the old mean times the one from the new mean.
        dx_new = x - x_mean
        dy_new = y - y_mean
        self.count, self.x_mean, self.y_mean = count, x_mean, y_mean
        self.y_var = self.y_var + b * (dy * dy_new - self.y_var)
        self.cov_xx = self.cov_xx + bb * (torch.outer(dx, dx_new) - self.cov_xx)
        self.cov_yx = self.cov_yx + bb * (torch.outer(dy, dx_new) - self.cov_yx)

    def transform(self, t: torch.Tensor) -> None:
        """Re-express the statistics in a new basis with coordinates x' = T x, T (d, d).
        Rows of T that are zero (a replaced direction) restart that direction's statistics."""
        self.x_mean = t @ self.x_mean
        self.y_mean = t @ self.y_mean
        self.cov_xx = t @ self.cov_xx @ t.T
        self.cov_yx = t @ self.cov_yx @ t.T
        # Variances and counts are per-direction: carry them by the squared weights.
        w = t * t
        self.y_var = w @ self.y_var
        born = w.sum(dim=1) < 0.5
        self.count = torch.where(born, torch.zeros_like(self.count), (w @ self.count) / w.sum(dim=1).clamp_min(1e-12))

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.__dict__.items()}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "RegressionStats":
        return cls(**{k: v.clone().to(DTYPE) for k, v in sd.items()})


def solve_symmetric_hessian(cov_xx: torch.Tensor, cov_yx: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares symmetric H from Σ H + H Σ = C + Cᵀ (Lyapunov form).

    Σ (d, d) is regularised by a ridge relative to its mean eigenvalue (no identity prior:
    an absolute prior swamps neural-network statistics, see ALGORITHM.md). Returns H (d, d).
    """
    d = cov_xx.shape[0]
    if d == 0:
        return cov_xx.clone()
    sym = 0.5 * (cov_xx + cov_xx.T)
    scale = torch.clamp(torch.trace(sym) / d, min=1e-300)
    evals, basis = torch.linalg.eigh(sym)
    evals = evals.clamp_min(0) + ridge * scale + 1e-300
    rhs = basis.T @ (cov_yx + cov_yx.T) @ basis
    h_rot = rhs / (evals[:, None] + evals[None, :])
    h = basis @ h_rot @ basis.T
    return 0.5 * (h + h.T)
