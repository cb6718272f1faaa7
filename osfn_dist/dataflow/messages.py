"""The two messages of the data path. Both are d-sized: their size never depends on D.

    worker ──Report──► curvature service ──DirectionUpdate──► every worker

Tensors are float64 on the CPU. ``to_wire``/``from_wire`` give plain Python containers
(lists, floats, ints) for transports that do not pickle tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

# Hyperparameters a worker may change while training (schedulers, users); they travel in
# every report so a remote service always acts on the trainer's current values.
LIVE_HYPERPARAMETERS = (
    "forgetting",
    "newton_lr",
    "newton_momentum",
    "eig_floor",
    "trust_radius",
    "ridge",
    "subspace_rate",
    "explorers",
    "replace_every",
    "basis_update_every",
    "reorth_every",
    "newton_warmup",
    "noise_damping",
    "complement_in_subspace",
    "step_scale",
)

# Settings the curvature service reads from its own config, fixed for a run. Reports carry
# them so a service started with other settings (an `osfn-dist serve` with a different
# --config) refuses the trainer loudly instead of silently running another method.
FIXED_SETTINGS = ("subspace_rule", "eigen_method")


@dataclass
class Report:
    """What a worker sends after its backward pass.

    step: the optimizer step this report belongs to; basis_version: the version of V the
    projections were taken with; grad_coords y = Vᵀḡ (d,) of the averaged gradient;
    grad_sqnorm ‖ḡ‖²; source_coords Vᵀu and source_sqnorm ‖u‖² of the vector u the subspace
    turns toward (the gradient, or its momentum average; None: the gradient itself);
    residual_sqnorm ‖u − V Vᵀu‖² (computed directly: ‖u‖² − ‖Vᵀu‖² cancels badly once the
    subspace holds most of u); prev_step_coords V_prevᵀΔθ_prev (d,), the previous step's
    displacement in the coordinates of the basis it was taken in (None: zeros);
    drift_coords VᵀΔθ_drift (d,), the complement-only steps taken since the last exchange
    (``curvature_every`` > 1), in the current basis (None: zeros);
    residual_step_dot rᵀΔθ of the previous step, r that residual (0 on the first);
    worker_grad_coords (N, d): each worker's own Vᵀg_local, for noise estimates (or None);
    hyper: the live hyperparameters; settings: the worker's FIXED_SETTINGS (empty: not checked).
    """

    step: int
    basis_version: int
    grad_coords: torch.Tensor
    grad_sqnorm: float
    source_coords: torch.Tensor | None = None
    source_sqnorm: float | None = None
    residual_sqnorm: float | None = None
    prev_step_coords: torch.Tensor | None = None
    drift_coords: torch.Tensor | None = None
    residual_step_dot: float = 0.0
    worker_grad_coords: torch.Tensor | None = None
    hyper: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        return _to_wire(self)

    @classmethod
    def from_wire(cls, data: dict) -> "Report":
        return _from_wire(cls, data)


@dataclass
class DirectionUpdate:
    """What the curvature service sends back; every worker applies the same update.

    base_version: the basis version the update is for; new_version: the version after it.
    step_coef s (d,): the saddle-free Newton step θ += V s in base coordinates.
    rotation A (d, d) or None and residual_coef c (d,) or None: V ← V A + (g − V y) cᵀ.
    complement_keep π: share of the complement's own step kept inside the subspace,
    θ += V (s + (1 − π) Vᵀp) − p: 0 = the Newton step owns the subspace, 1 = it adds to the
    complement (always 1 before the curvature model is ready).
    reorthonormalize: re-orthonormalise V after the update (CholeskyQR).
    diagnostics: small floats for logs and dashboards.
    """

    step: int
    base_version: int
    new_version: int
    step_coef: torch.Tensor
    rotation: torch.Tensor | None = None
    residual_coef: torch.Tensor | None = None
    complement_keep: float = 0.0
    reorthonormalize: bool = False
    diagnostics: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        return _to_wire(self)

    @classmethod
    def from_wire(cls, data: dict) -> "DirectionUpdate":
        return _from_wire(cls, data)


def _to_wire(msg) -> dict:
    out = {}
    for f in fields(msg):
        v = getattr(msg, f.name)
        out[f.name] = v.tolist() if isinstance(v, torch.Tensor) else v
    return out


_TENSOR_FIELDS = {"grad_coords", "source_coords", "prev_step_coords", "drift_coords", "worker_grad_coords", "step_coef", "rotation", "residual_coef"}


def _from_wire(cls, data: dict):
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        if f.name in _TENSOR_FIELDS and v is not None:
            v = torch.as_tensor(v, dtype=torch.float64)
        kwargs[f.name] = v
    return cls(**kwargs)
