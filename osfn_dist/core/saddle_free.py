"""Saddle-free Newton step in the subspace (Dauphin et al., arXiv:1406.2572).

Dividing by |λ| instead of λ turns attraction to saddles into repulsion: along a
negative-curvature direction the step goes downhill just like along a positive one.
"""
from __future__ import annotations

import torch


def saddle_free_step(
    grad_coords: torch.Tensor,
    eigenvalues: torch.Tensor,
    newton_lr: float,
    eig_floor: float,
    trust_radius: float,
    noise_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step s (d,) in eigen-coordinates: s_i = −η g_i / max(|λ_i|, floor), optionally damped
    by the per-direction signal-to-noise g_i² / (g_i² + ν_i), then clipped to ‖s‖ ≤ trust_radius.

    grad_coords (d,): the (momentum-averaged) gradient in the eigenbasis; eigenvalues (d,).
    """
    denom = torch.clamp(eigenvalues.abs(), min=eig_floor)
    step = -newton_lr * grad_coords / denom
    if noise_var is not None:
        g2 = grad_coords * grad_coords
        step = step * g2 / (g2 + noise_var.clamp_min(0) + 1e-300)
    norm = torch.linalg.vector_norm(step)
    if norm > trust_radius:
        step = step * (trust_radius / norm)
    return step
