"""Online eigendecomposition of the small symmetric Hessian estimate.

The basis is kept (nearly) diagonal by one shifted QR step per update (the QR method run
online, as in Duda's paper); when a step fails or the off-diagonal part drifts above a
tolerance, a float64 ``eigh`` takes over. Everything here is d×d.
"""
from __future__ import annotations

import torch


def offdiag_ratio(a: torch.Tensor) -> float:
    """‖offdiag(A)‖_F / ‖A‖_F, 0 for empty or zero matrices."""
    if a.numel() == 0:
        return 0.0
    total = torch.linalg.matrix_norm(a)
    if total == 0:
        return 0.0
    off = a - torch.diag(torch.diagonal(a))
    return float(torch.linalg.matrix_norm(off) / total)


def qr_step(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Wilkinson-shifted QR step on symmetric A (d, d): returns (A' = QᵀAQ, Q)."""
    d = a.shape[0]
    if d <= 1:
        return a.clone(), torch.eye(d, dtype=a.dtype)
    # Wilkinson shift from the trailing 2×2 block: the eigenvalue closer to a[-1, -1].
    p, q, r = a[-2, -2], a[-2, -1], a[-1, -1]
    delta = (p - r) / 2
    sign = 1.0 if delta >= 0 else -1.0
    denom = abs(delta) + torch.sqrt(delta * delta + q * q)
    shift = r - sign * q * q / denom if denom > 0 else r
    eye = torch.eye(d, dtype=a.dtype)
    qm, rm = torch.linalg.qr(a - shift * eye)
    new = rm @ qm + shift * eye
    return 0.5 * (new + new.T), qm


def track_eigenbasis(
    h: torch.Tensor, q_prev: torch.Tensor, method: str = "qr", tol: float = 0.05, qr_steps: int = 2
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Update the eigenbasis estimate of symmetric H (d, d), warm-started from q_prev.

    Returns (eigenvalues (d,), Q (d, d) with H ≈ Q diag(λ) Qᵀ, used_fallback).
    """
    d = h.shape[0]
    if d == 0:
        return h.new_zeros(0), h.new_zeros(0, 0), False
    if method == "qr":
        a = q_prev.T @ h @ q_prev
        q = q_prev
        ok = True
        try:
            for _ in range(qr_steps):
                a, step_q = qr_step(a)
                q = q @ step_q
        except RuntimeError:
            ok = False
        if ok and torch.isfinite(a).all() and offdiag_ratio(a) <= tol:
            return torch.diagonal(a).clone(), q, False
    evals, q = torch.linalg.eigh(h.to(torch.float64))
    return evals, q, method == "qr"
