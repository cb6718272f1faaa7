"""Worker side, last hop: apply the subspace Newton step, the complement step and the
basis update. All D-sized work of an OSFN step happens here and in ``collect``."""
from __future__ import annotations

import torch

from ..core.errors import VersionMismatchError
from ..core.subspace import apply_basis_update, cholesky_qr2, project
from .messages import DirectionUpdate


def check_version(update: DirectionUpdate, basis_version: int) -> None:
    if update.base_version != basis_version:
        raise VersionMismatchError(
            f"direction update is for basis version {update.base_version}, this worker holds "
            f"{basis_version}; refusing to apply it (restart workers and service from one checkpoint)"
        )


def combine_steps(
    basis: torch.Tensor, complement_disp: torch.Tensor, residual: torch.Tensor | None, step_coef: torch.Tensor,
    complement_keep: float = 0.0, layout=None, source: torch.Tensor | None = None,
    source_coords: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """Δθ = V (s + (1 − π) Vᵀp) − p: the complement displacement p with (a share 1 − π of)
    its subspace part replaced by the Newton step s.

    Returns (Δθ (D,), VᵀΔθ = s − π Vᵀp (d,), rᵀΔθ): the last two let the service follow the
    position in subspace coordinates as the basis turns toward the residual r — and r itself.
    ``residual`` None: r = u − V a is formed here from ``source`` u and ``source_coords`` a in
    the same pass over V as the step. ``layout``: a sharded basis holds this worker's rows
    of V and r (dataflow.shard)."""
    if layout is not None:
        q = layout.project(basis, complement_disp)
        s = step_coef.to(device=basis.device, dtype=basis.dtype)
        delta = layout.expand(basis, s + (1.0 - complement_keep) * q) - complement_disp
        return delta, s - complement_keep * q, layout.dot(residual, layout.rows(delta)), residual
    q = project(basis, complement_disp)
    s = step_coef.to(device=basis.device, dtype=basis.dtype)
    coef = s + (1.0 - complement_keep) * q
    delta = basis @ coef - complement_disp
    if residual is None:
        residual = source.to(basis.dtype) - basis @ source_coords.to(basis.dtype)
    return delta, s - complement_keep * q, float(torch.dot(residual, delta)), residual


def update_basis(basis: torch.Tensor, residual: torch.Tensor, update: DirectionUpdate, layout=None) -> torch.Tensor:
    dev = basis.device
    rotation = update.rotation.to(dev) if update.rotation is not None else None
    coef = update.residual_coef.to(dev) if update.residual_coef is not None else None
    basis = apply_basis_update(basis, residual, rotation, coef)
    if update.reorthonormalize:
        if layout is None:
            alive = torch.linalg.vector_norm(basis, dim=0) > 0.5
            basis = cholesky_qr2(basis, alive)
        else:  # rows spread over workers: column norms and Gram matrix are all-reduced
            basis = cholesky_qr2(basis, layout.column_norms(basis) > 0.5, allreduce=layout.allreduce, qr=layout.tsqr)
    return basis


def scatter_add(params: list[torch.Tensor], delta: torch.Tensor, has_grad: list[bool]) -> None:
    """θ_i += Δθ[slice_i] for every parameter that had a gradient this step."""
    offset = 0
    for p, ok in zip(params, has_grad):
        n = p.numel()
        if ok:
            p.add_(delta[offset : offset + n].view_as(p).to(p.dtype))
        offset += n
