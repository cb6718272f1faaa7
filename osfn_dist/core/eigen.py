"""Online eigendecomposition of the small symmetric Hessian estimate.

The basis is kept (nearly) diagonal by one shifted QR step per update (the QR method run
online, as in Duda's paper); when a step fails or the off-diagonal part drifts above a
tolerance, a float64 ``eigh`` takes over. Everything here is d×d.
"""
from __future__ import annotations

import math

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


def _wilkinson_shift(block: torch.Tensor) -> float:
    """The eigenvalue of the symmetric 2×2 ``block`` closer to its last diagonal entry.

    In Python floats (the same IEEE double arithmetic as float64 tensors): one host read
    instead of a dozen scalar tensor ops."""
    (p, q), (_, r) = block.tolist()
    delta = (p - r) / 2
    denom = abs(delta) + math.sqrt(delta * delta + q * q)
    if denom == 0:
        return r
    sign = 1.0 if delta >= 0 else -1.0
    return r - sign * q * q / denom


def qr_step(a: torch.Tensor, active: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Wilkinson-shifted QR step on the leading ``active`` block of symmetric A (d, d).

    Returns (A' = QᵀAQ, Q). Rows past ``active`` are taken as converged (deflated).
    """
    d = a.shape[0]
    m = d if active is None else active
    if m <= 1:
        return a.clone(), torch.eye(d, dtype=a.dtype)
    shift = _wilkinson_shift(a[m - 2 : m, m - 2 : m])
    qm, _ = torch.linalg.qr(a[:m, :m] - shift * torch.eye(m, dtype=a.dtype))
    if m == d:
        q = qm
    else:
        q = torch.eye(d, dtype=a.dtype)
        q[:m, :m] = qm
    new = q.T @ a @ q
    return 0.5 * (new + new.T), q


def qr_sweep(a: torch.Tensor, steps: int, tol: float = 1e-13) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` shifted QR steps with deflation: once the last row of the active block is
    (numerically) diagonal its eigenvalue is done and the block shrinks. Returns (A', Q)."""
    d = a.shape[0]
    q_total = None
    if d <= 1 or steps <= 0:
        return a, torch.eye(d, dtype=a.dtype)
    # the scale and the first deflation test in one host read
    scale, last_row = torch.stack([torch.linalg.matrix_norm(a), torch.linalg.vector_norm(a[d - 1, : d - 1])]).tolist()
    scale = scale or 1.0
    m = d
    for i in range(steps):
        if i > 0:
            last_row = float(torch.linalg.vector_norm(a[m - 1, : m - 1]))
        while m > 1 and last_row <= tol * scale:
            m -= 1
            if m > 1:
                last_row = float(torch.linalg.vector_norm(a[m - 1, : m - 1]))
        if m <= 1:
            break
        a, q = qr_step(a, m)
        q_total = q if q_total is None else q_total @ q
    return a, torch.eye(d, dtype=a.dtype) if q_total is None else q_total


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
            a, step_q = qr_sweep(a, qr_steps)
            q = q @ step_q
        except RuntimeError:
            ok = False
        if ok:
            # ‖A‖ and ‖offdiag(A)‖ in one host read; a non-finite A has a non-finite ‖A‖
            total, off = torch.linalg.matrix_norm(torch.stack([a, a - torch.diag(torch.diagonal(a))])).tolist()
            if math.isfinite(total) and (total == 0 or off / total <= tol):
                return torch.diagonal(a).clone(), q, False
    evals, q = torch.linalg.eigh(h.to(torch.float64))
    return evals, q, method == "qr"
