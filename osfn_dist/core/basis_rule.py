"""How the subspace moves: d-sized decisions about the basis (online PCA of gradients).

A basis update is the pair (A, c): V_new = V A + (g − V y) cᵀ (see ``subspace``). With V
orthonormal, old coordinates map to new ones by T = V_newᵀ V = Aᵀ, so the curvature
statistics can follow the basis exactly.

Rules:
- fill: while a direction is still empty, it becomes the normalised residual g⊥/‖g⊥‖.
- oja: every direction turns toward the gradient, V += γ g⊥ (yᵀ/‖g‖²) (Oja's rule with the
  projection removed, so orthonormality holds to first order).
- replace: every k steps, the direction with the least gradient energy is replaced by the
  normalised residual when the residual carries a large share of the gradient.
"""
from __future__ import annotations

import torch

MIN_RESIDUAL_SHARE = 1e-6


def choose_basis_update(
    grad_coords: torch.Tensor,
    grad_sqnorm: float,
    resid_sq: float,
    alive: torch.Tensor,
    energy: torch.Tensor,
    rule: str,
    rate: float,
    replace_due: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, int | None]:
    """Decide (A, c, born) for one step, all in the current (eigen-aligned) coordinates.

    grad_coords y (d,); grad_sqnorm ‖g‖²; resid_sq ‖g − V y‖²; alive (d,) bool; energy (d,) per-direction gradient
    energy (mean y² over recent steps). Returns rotation A (d, d) or None, residual
    coefficients c (d,) or None, and the index of a newly born direction or None.
    """
    d = grad_coords.shape[0]
    if d == 0 or grad_sqnorm <= 0:
        return None, None, None
    share = resid_sq / grad_sqnorm
    born = None
    if not bool(alive.all()):
        born = int(torch.nonzero(~alive)[0])
    elif "replace" in rule and replace_due and share > 0.5:
        born = int(torch.argmin(torch.where(alive, energy, torch.full_like(energy, -1.0))))
    if born is not None and share > MIN_RESIDUAL_SHARE:
        rotation = torch.eye(d, dtype=grad_coords.dtype)
        rotation[born, born] = 0.0
        coef = torch.zeros(d, dtype=grad_coords.dtype)
        coef[born] = 1.0 / resid_sq**0.5
        return rotation, coef, born
    if "oja" in rule and rate > 0:
        return None, rate * grad_coords / grad_sqnorm, None
    return None, None, None
