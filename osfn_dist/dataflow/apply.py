"""Worker side, last hop: the Newton move on top of the base optimizer's step, and the basis
update. All D-sized work of an OSFN step happens here and in ``collect``."""
from __future__ import annotations

import torch

from ..core import kernels
from ..core.errors import VersionMismatchError
from ..core.subspace import (apply_basis_update, cholesky_qr2, move_and_update_, orthonormalizing_factor,
                             right_multiply_, work_dtype)
from ..core.transfer import to_device
from .messages import DirectionUpdate
from .shard import REPLICATED, param_slices


def check_version(update: DirectionUpdate, basis_version: int) -> None:
    if update.base_version != basis_version:
        raise VersionMismatchError(
            f"direction update is for basis version {update.base_version}, this worker holds "
            f"{basis_version}; refusing to apply it (restart workers and service from one checkpoint)"
        )


def newton_move(
    basis: torch.Tensor, disp: torch.Tensor, residual: torch.Tensor | None, step_coef: torch.Tensor,
    complement_keep: float, layout=REPLICATED, source: torch.Tensor | None = None,
    source_coords: torch.Tensor | None = None, compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The move OSFN adds after the base optimizer has stepped by −p (measured):
    V (s + (1 − π) Vᵀp), which replaces a share 1 − π of the base's step inside the subspace
    by the Newton step s.

    Returns (the move (D,), VᵀΔθ = s − π Vᵀp for the whole step Δθ = move − p, the residual
    r): the last two let the service follow the position in subspace coordinates as the basis
    turns toward r. ``residual`` None (replicated basis only): r = u − V a is formed here from
    ``source`` u and ``source_coords`` a, with ``compiled`` in one fused pass over V
    (core.kernels). ``layout`` (dataflow.shard): a sharded basis holds this worker's rows of V
    and r."""
    q = layout.project(basis, disp)
    s = step_coef.to(device=basis.device, dtype=basis.dtype)
    coef = s + (1.0 - complement_keep) * q
    if residual is None and compiled:  # replicated: one compiled pass over V (core.kernels)
        move, residual = kernels.expand_residual(basis.T, coef, source_coords.to(basis.dtype), source.to(basis.dtype))
    elif residual is None:  # replicated: V·coef and V·a as one (2, d) × (d, D) GEMM
        both = torch.stack([coef, source_coords.to(basis.dtype)]) @ basis.T
        move, residual = both[0], both[1].neg_().add_(source.to(basis.dtype))
    else:
        move = layout.expand(basis, coef)
    return move, s - complement_keep * q, residual


def move_and_update(
    basis: torch.Tensor, disp: torch.Tensor, step_coef: torch.Tensor, update: DirectionUpdate,
    source: torch.Tensor, source_coords: torch.Tensor, pending: torch.Tensor | None = None, lazy: bool = False,
    native: bool = False, out: torch.Tensor | None = None, into: tuple | None = None, layout=REPLICATED,
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor | None]:
    """``newton_move`` and ``update_basis`` in one read and one write of V, for a replicated
    basis whose residual was left to this hop and π = 1 (the base keeps its whole step, so
    the move V s needs no Vᵀp first).

    ``pending`` R (d, d) or None: the basis is V R, R not yet applied. ``lazy``: compose this
    step's rotation A into R (R ← R A, d × d work) instead of multiplying V by it (a
    D × d² product, the costliest part of the pass on CPU); the rank-1 term is then added to
    the stored V as r ((R A)⁻ᵀ c)ᵀ, so that V R A + r cᵀ is the basis the service expects.
    A re-orthonormalisation step folds into R too (``orthonormalizing_factor``: one read of V)
    while R stays near orthogonal, and applies R first otherwise. ``native``: the passes over V in the C
    loops of ``core.native`` where they apply (float32 on the CPU). ``out``: a (D,) tensor
    for the move. ``into`` = (θ before the base stepped (D,), the parameters), native and
    lazy only, ``disp`` None: the pass measures p = before − θ and adds the move into the
    parameters itself; the move returned is None. ``layout`` ``DDPRows`` (lazy only): ``basis``,
    ``source``, ``before`` and the parameters are this rank's rows; Vᵀp and the sums are
    all-reduced here (d + 3 floats), the Gram matrix of a re-orthonormalisation too (d²).

    Returns (the move V s, VᵀΔθ = s − Vᵀp, rᵀΔθ for the step Δθ = move − p (a 0-d tensor on
    V's device), the updated stored basis, the pending R after the step (on the host),
    [‖p‖², ‖Δθ‖²] as a (2,) tensor on V's device). The lazy path does its d × d algebra on the
    host, where the service's coefficients already are: on a GPU nothing here waits for the
    device (the d-sized results stay there until the next report takes them in one copy)."""
    dev, dtype = basis.device, work_dtype(basis)
    if into is not None and not lazy:
        raise ValueError("into= is for the lazy path (the rotation composed in R, none applied to V)")
    if pending is None and not lazy:
        s = step_coef.to(device=dev, dtype=dtype)
        a = source_coords.to(dev, dtype)
        rotation = update.rotation.to(dev) if update.rotation is not None else None
        coef = update.residual_coef.to(dev) if update.residual_coef is not None else None
        move, q, sums = move_and_update_(basis, s, a, source, disp, rotation, coef, native=native, out=out)
        return move, s - q, sums[0], _reorthonormalize(basis, update, REPLICATED, native), None, sums[1:]
    host = lambda x: None if x is None else x.detach().to("cpu", torch.float64)  # noqa: E731
    s = host(step_coef).to(dtype).double()  # rounded as the device's copies were
    a = host(source_coords).to(dtype).double()
    r = torch.eye(s.numel(), dtype=torch.float64) if pending is None else host(pending)
    ra = r if update.rotation is None else r @ host(update.rotation)
    stored_coef = None if update.residual_coef is None else torch.linalg.solve(ra.T, host(update.residual_coef))
    move, q_stored, sums = move_and_update_(basis, (r @ s).to(dtype), (r @ a).to(dtype),
                                           source, disp, None, stored_coef, native=native, out=out, into=into)
    if layout.sharded:  # this rank's rows' part of Vᵀp and of the sums: add them over the ranks
        d = q_stored.numel()
        total = layout.allreduce(torch.cat([q_stored.double(), sums.double()]))
        q_stored, sums = total[:d].to(q_stored.dtype), total[d:].to(sums.dtype)
    r_t, s_dev = to_device(q_stored.device, r.T.contiguous(), s, dtype=torch.float64)
    step_coords = s_dev.to(dtype) - (r_t @ q_stored.double()).to(dtype)  # s − (V R)ᵀp
    if update.reorthonormalize:  # in d × d from VᵀV while R stays near orthogonal; else apply R first
        factor = orthonormalizing_factor(basis, ra, native=native, allreduce=layout.allreduce)
        if factor is not None:
            return move, step_coords, sums[0], basis, factor, sums[1:]
        right_multiply_(basis, ra, native=native)
        return move, step_coords, sums[0], _reorthonormalize(basis, update, layout, native), None, sums[1:]
    return move, step_coords, sums[0], basis, ra, sums[1:]


def update_basis(basis: torch.Tensor, residual: torch.Tensor, update: DirectionUpdate, layout=REPLICATED) -> torch.Tensor:
    dev = basis.device
    rotation = update.rotation.to(dev) if update.rotation is not None else None
    coef = update.residual_coef.to(dev) if update.residual_coef is not None else None
    return _reorthonormalize(apply_basis_update(basis, residual, rotation, coef), update, layout)


def _reorthonormalize(basis: torch.Tensor, update: DirectionUpdate, layout, native: bool = False) -> torch.Tensor:
    if update.reorthonormalize:
        # rows spread over workers (sharded): column norms and Gram matrix are all-reduced
        basis = cholesky_qr2(basis, layout.column_norms(basis) > 0.5, allreduce=layout.allreduce, qr=layout.tsqr,
                             native=native)
    return basis


def scatter_add(params: list[torch.Tensor], delta: torch.Tensor, moves: list[bool]) -> None:
    """θ_i += Δθ[slice_i] for every parameter that moves this step."""
    for (mine, rows), ok in zip(param_slices(params), moves):
        if ok:
            mine.add_(delta[rows].view_as(mine).to(mine.dtype))
