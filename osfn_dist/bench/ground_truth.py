"""Ground truth for the curvature model — for benchmarks and tests only, never the step.

What the optimizer estimates from gradients alone, measured against the real Hessian:
the top-k |λ| eigenpairs (Lanczos on Hessian-vector products, double backward; or the exact
Hessian on small problems), the principal angles between the basis V and that eigenspace,
the share of the complement's step that lands in it ("leak"), and the true curvature
vᵀHv along the optimizer's own eigen-directions next to its fitted eigenvalues.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def stiff_quadratic(dim: int, k: int, seed: int, sharp=(10.0, 100.0), bulk=(0.3, 1.0)):
    """A rotated quadratic with k eigenvalues log-spaced over ``sharp`` and the rest over
    ``bulk``. Returns (H (dim, dim), its top-k eigenvectors (dim, k), a start θ₀ (dim,))."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    ev = torch.cat([
        torch.logspace(math.log10(sharp[1]), math.log10(sharp[0]), k, dtype=torch.float64),
        torch.logspace(math.log10(bulk[1]), math.log10(bulk[0]), dim - k, dtype=torch.float64),
    ])
    return q @ torch.diag(ev) @ q.T, q[:, :k], torch.randn(dim, generator=gen, dtype=torch.float64)


def lanczos_top(hvp: Callable[[torch.Tensor], torch.Tensor], dim: int, k: int, iters: int | None = None,
                seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The k eigenpairs of largest |λ| of the symmetric operator ``hvp`` on R^dim.

    Lanczos with full re-orthogonalisation (the vectors are kept: dim × iters floats), then
    Ritz pairs sorted by |θ|. Returns (eigenvalues (k,), eigenvectors (dim, k))."""
    m = min(dim, iters or max(3 * k + 20, 40))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=dtype)
    q /= torch.linalg.vector_norm(q)
    basis = torch.zeros(m, dim, dtype=dtype)
    alpha = torch.zeros(m, dtype=dtype)
    beta = torch.zeros(m, dtype=dtype)
    used = m
    for j in range(m):
        basis[j] = q
        w = hvp(q).to(dtype)
        alpha[j] = w @ q
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)  # twice is enough (Kahan–Parlett)
        b = torch.linalg.vector_norm(w)
        if j + 1 < m:
            if b < 1e-10 * max(1.0, float(alpha[: j + 1].abs().max())):
                used = j + 1  # an invariant subspace: the Ritz values are exact
                break
            beta[j] = b
            q = w / b
    t = torch.diag(alpha[:used]) + torch.diag(beta[: used - 1], 1) + torch.diag(beta[: used - 1], -1)
    theta, s = torch.linalg.eigh(t)
    order = torch.argsort(theta.abs(), descending=True)[:k]
    return theta[order], basis[:used].T @ s[:, order]


def principal_angles_deg(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between span(v) (D, a) and span(u) (D, b)."""
    if v.shape[1] == 0 or u.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    qv, _ = torch.linalg.qr(v.to(torch.float64))
    qu, _ = torch.linalg.qr(u.to(torch.float64))
    cos = torch.linalg.svdvals(qv.T @ qu).clamp(0.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).sort().values


def leak(step: torch.Tensor, v: torch.Tensor | None, u: torch.Tensor) -> float:
    """Share of the complement's part of ``step`` (D,) — what lies outside span(v) — that
    falls in the orthonormal top eigenspace u (D, k): 0 means the sharp directions are
    held by the subspace; for a random direction it is ≈ k/D."""
    s = step.to(torch.float64)
    if v is not None and v.shape[1]:
        qv, _ = torch.linalg.qr(v.to(torch.float64))
        s = s - qv @ (qv.T @ s)
    total = float(s @ s)
    if total == 0.0:
        return 0.0
    inside = u.to(torch.float64).T @ s
    return float(inside @ inside) / total


def model_hvp(model: torch.nn.Module, loss_fn, inputs, targets) -> tuple[Callable, int]:
    """Hessian-vector products of the full-batch loss at the model's current parameters, on
    flat vectors (D,), by double backward. Returns (hvp, D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)

    def hvp(vec: torch.Tensor) -> torch.Tensor:
        # callable from anywhere, the curvature service's inference mode included (the bench
        # oracle runs it there); a clone outside inference mode can be saved for backward
        with torch.inference_mode(False), torch.enable_grad():
            vec = vec.clone()
            loss = loss_fn(model(inputs), targets)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            dot = flat @ vec.to(flat.dtype)
            out = torch.autograd.grad(dot, params)
        return torch.cat([o.reshape(-1) for o in out]).detach().to(torch.float64)

    return hvp, dim


def subspace_truth(optimizer, hvp: Callable, dim: int, k: int, step: torch.Tensor | None = None) -> dict:
    """One row of ground truth for an OSFN optimizer with an in-process curvature service.

    ``step``: the last full displacement θ_after − θ_before (D,), for the leak. Returns
    max/median principal angle between V (its live directions) and the top-k |λ| eigenspace,
    the leak, the true top-k eigenvalues, and the optimizer's fitted eigenvalues next to the
    Rayleigh quotients vᵀHv of its own eigen-directions (V Q), and ``model_error``: how far the
    fitted d × d model is from the true Hessian inside V (relative Frobenius norm; 0 is exact,
    1 is as wrong as predicting zero curvature)."""
    evals, evecs = lanczos_top(hvp, dim, k)
    row = {"true_top": evals.tolist(), "max_angle": float("nan"), "median_angle": float("nan"),
           "leak": float("nan"), "fitted": [], "rayleigh": [], "model_error": float("nan")}
    basis = optimizer.basis
    if basis is None:
        return row
    v = basis.detach().to(torch.float64).cpu()
    live = torch.linalg.vector_norm(v, dim=0) > 0.5
    v = v[:, live]
    ang = principal_angles_deg(v, evecs)
    if ang.numel():
        row["max_angle"], row["median_angle"] = float(ang.max()), float(ang.median())
    if step is not None:
        row["leak"] = leak(step.detach().cpu(), v, evecs)
    service = getattr(getattr(optimizer, "exchange", None), "service", None)
    if service is not None and live.any():
        q = service.eigvecs[live][:, live]
        lam = service.eigenvalues[live]
        dirs = v @ q
        dirs = dirs / torch.linalg.vector_norm(dirs, dim=0).clamp_min(1e-300)
        hdirs = torch.stack([hvp(dirs[:, i]) for i in range(dirs.shape[1])], dim=1)
        truth = dirs.T @ hdirs  # the true Hessian inside V, in the optimizer's eigen-frame
        truth = 0.5 * (truth + truth.T)
        rq = torch.diagonal(truth)
        order = torch.argsort(rq.abs(), descending=True)
        row["fitted"], row["rayleigh"] = lam[order].tolist(), rq[order].tolist()
        # the regression's error as a whole: ‖diag(λ) − (VQ)ᵀH(VQ)‖_F / ‖(VQ)ᵀH(VQ)‖_F
        row["model_error"] = float(torch.linalg.matrix_norm(torch.diag(lam) - truth)
                                   / torch.linalg.matrix_norm(truth).clamp_min(1e-300))
    return row
