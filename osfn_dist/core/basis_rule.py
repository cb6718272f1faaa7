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
# "curvature" rule: a residual this many times its running mean means a direction escaped
ESCAPE_RATIO = 4.0


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
        return capture_direction(born, resid_sq, d, grad_coords.dtype)
    if "oja" in rule and rate > 0:
        return None, rate * grad_coords / grad_sqnorm, None
    return None, None, None


def explore_update(
    src_eig: torch.Tensor,
    src_sqnorm: float,
    curvature: torch.Tensor,
    eigvecs: torch.Tensor,
    explorers: int,
    rate: float,
) -> torch.Tensor | None:
    """The ``curvature`` rule once every direction is alive: hold the sharp directions, let
    only the flattest ones explore.

    Gradient PCA turns V toward gradient *energy*; once the Newton step has flattened a sharp
    direction its gradient vanishes and V turns away from it, so the direction falls back
    into the complement and caps its step size again. Here the ``explorers`` eigen-directions
    of least estimated |λ| (``curvature`` (d,), in the eigen-frame ``eigvecs`` Q (d, d)) take
    an Oja step toward the source u (``src_eig`` = Qᵀ Vᵀu, ``src_sqnorm`` ‖u‖²); the rest
    stay where they are however small their gradient is now. With the ``innovation`` source
    (g − m, the gradient minus its running mean) what the explorers follow is the covariance
    of gradient changes, ≈ H·Cov(Δθ)·H plus the gradient noise — weighted by curvature, where
    the gradient itself is weighted by its mean.

    Returns the residual coefficients c (d,) in the current coordinates (V_new = V + r cᵀ),
    or None.
    """
    d = src_eig.shape[0]
    if d == 0 or src_sqnorm <= 0 or rate <= 0:
        return None
    k = min(int(explorers), d)
    order = torch.argsort(curvature.abs(), stable=True)[:k]
    coef_eig = torch.zeros(d, dtype=src_eig.dtype)
    coef_eig[order] = rate * src_eig[order] / src_sqnorm
    return eigvecs @ coef_eig


def capture_direction(
    slot: int, resid_sq: float, d: int, dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A, c, born) that put the normalised residual r/‖r‖ in column ``slot``: V_new = V A + r cᵀ
    with A the identity less that column. Filling an empty direction, the ``replace`` rule
    and the ``curvature`` rule's capture (whose caller aligns V with the eigenbasis in the same
    update, so the eigen-direction given up is a column) all take this step."""
    rotation = torch.eye(d, dtype=dtype)
    rotation[slot, slot] = 0.0
    coef = torch.zeros(d, dtype=dtype)
    coef[slot] = 1.0 / resid_sq**0.5
    return rotation, coef, slot
