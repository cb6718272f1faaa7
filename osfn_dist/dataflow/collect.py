"""Worker side, first hop: flatten the gradient and project it onto the basis."""
from __future__ import annotations

import torch

from ..core.subspace import one_pass, project, project_pair, work_dtype
from ..core.transfer import to_host
from .messages import Report
from .shard import REPLICATED, local, param_slices


def flat_gradient(params: list[torch.Tensor], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """All gradients as one (D,) vector; a parameter without a gradient contributes zeros.
    ``out``: a (D,) tensor to write into (a row of the optimizer's reusable buffer)."""
    parts = [
        (local(p.grad) if p.grad is not None else torch.zeros_like(local(p))).reshape(-1).to(dtype) for p in params
    ]
    if not parts:
        return torch.zeros(0, dtype=dtype)
    return torch.cat(parts, out=out)


def build_report(
    basis: torch.Tensor,
    grad: torch.Tensor,
    step: int,
    basis_version: int,
    residual_step_dot: float,
    hyper: dict,
    worker_grad_coords: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    prev_step_coords: torch.Tensor | None = None,
    layout=REPLICATED,
    exact_residual: bool = True,
    drift: torch.Tensor | None = None,
    settings: dict | None = None,
    pair: torch.Tensor | None = None,
    coords_map: torch.Tensor | None = None,
    native: bool = False,
    projected: tuple | None = None,
) -> tuple[Report, torch.Tensor, torch.Tensor | None]:
    """Returns the report, y = Vᵀg and the residual r = u − V Vᵀu of the vector u the
    subspace turns toward (``source``; default the gradient). y and r stay on the worker's
    device for the apply hop. ``layout`` (dataflow.shard): where V's rows live; with a sharded
    basis, ``basis`` holds this worker's rows and r only those rows. ``exact_residual=False`` (replicated
    basis only) skips forming r here: r is None and its norm is left to the service, which is
    accurate unless the subspace holds nearly all of u — the optimizer asks for the exact
    norm while directions are still being filled. ``pair``: a (2, D) tensor whose rows are
    ``grad`` and ``source``, so both projections take one pass over V. ``coords_map`` R
    (d, d): the basis is ``basis`` R (a rotation not yet applied to V; replicated basis
    without the exact residual only): every projection is mapped by Rᵀ. ``native``: both
    projections and both squared norms in one C loop over V (``core.native``, float32 CPU).
    ``projected`` = (Vᵀg and Vᵀu as (2, d), [‖g‖², ‖u‖²]) already computed (``core.native.collect``;
    ``grad`` may then be None)."""
    sqnorms = None
    passes = one_pass(native, basis.T, grad, source) if projected is None and not layout.sharded else None
    # (a sharded basis has no passes here: it reaches this branch only with its projections
    # already summed over the ranks, DDPRows' one-pass path)
    if not exact_residual and (projected is not None or passes is not None):
        both, sqnorms = projected if projected is not None else passes.project_pair(basis.T, grad, source)
        both = both.to(work_dtype(basis))
        coords, src_coords, residual = both[0], both[0] if source is None else both[1], None
    elif not layout.sharded and not exact_residual:
        # the residual is formed after the exchange (apply.newton_move) and its norm derived
        # as ‖u‖² − ‖Vᵀu‖². When g and u are the two rows of one (2, D) buffer, both
        # projections take one pass over V.
        if pair is not None and source is not None:
            coords, src_coords = project_pair(basis, pair)
        else:
            coords = project(basis, grad)
            src_coords = coords if source is None else project(basis, source)
        residual = None
    else:
        if coords_map is not None:
            raise ValueError("coords_map is for a replicated basis without the exact residual")
        coords = layout.project(basis, grad)
        src_coords = coords if source is None else layout.project(basis, source)
        src = layout.rows(grad if source is None else source)
        residual = src.to(basis.dtype) - basis @ src_coords
    drift_coords = None if drift is None else layout.project(basis, drift)
    # every d-sized result on the device reaches the host in one copy (one synchronisation):
    # the projections, the norms, and what the previous step's apply pass left there
    h_coords, h_src, h_sq, h_prev, h_dot, h_drift = to_host(
        coords, None if source is None else src_coords, sqnorms, prev_step_coords, residual_step_dot, drift_coords)
    if coords_map is not None:  # the basis is V R: (V R)ᵀx = Rᵀ Vᵀx, in d × d on the host
        wd = work_dtype(basis)  # rounded as the projections themselves are
        h_coords, h_src, h_drift = (None if x is None else _mapped(coords_map, x).to(wd).double()
                                    for x in (h_coords, h_src, h_drift))
        coords = h_coords.to(wd)  # for the lazy apply hop, which works on the host too
    report = Report(
        step=step,
        basis_version=basis_version,
        grad_coords=h_coords,
        grad_sqnorm=layout.sqnorm(grad) if h_sq is None else float(h_sq[0]),
        source_coords=h_src,
        source_sqnorm=None if source is None else layout.sqnorm(source) if h_sq is None else float(h_sq[1]),
        residual_sqnorm=(
            None if residual is None
            else layout.dot(residual, residual)
        ),
        residual_step_dot=float(h_dot),
        prev_step_coords=h_prev,
        drift_coords=h_drift,
        worker_grad_coords=worker_grad_coords,
        hyper=dict(hyper),
        settings=dict(settings or {}),
    )
    return report, coords, residual


def _mapped(r: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Rᵀ x on the host in float64 (R the pending rotation, kept on the host)."""
    return r.detach().to("cpu", torch.float64).T @ coords.to("cpu", torch.float64)


def write_back(params: list[torch.Tensor], grad: torch.Tensor, has_grad: list[bool]) -> None:
    """Copy slices of a flat (averaged) gradient back into each ``p.grad``."""
    for p, (_, rows), ok in zip(params, param_slices(params), has_grad):
        if ok:
            g = local(p.grad)
            g.copy_(grad[rows].view_as(g))
