"""OSFN as a ``torch.optim.Optimizer``; ``step()`` reads as the data path:
collect → exchange → apply."""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from .core import complement as comp
from .core.config import OSFNConfig
from .core.errors import ConfigError, DimensionMismatchError, NonFiniteGradientError
from .core.subspace import as_basis_layout, new_basis
from .dataflow.apply import check_version, combine_steps, scatter_add, update_basis
from .dataflow.collect import build_report, flat_gradient, write_back
from .dataflow.exchange import Exchange, InProcessExchange
from .dataflow.messages import FIXED_SETTINGS, LIVE_HYPERPARAMETERS
from .dataflow.service import CurvatureService
from .dataflow.shard import REPLICATED, ShardedBasis

WORKER_STATE_VERSION = 1


def _flat(params: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(dtype) for p in params])


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One reduction per tensor instead of an elementwise isfinite: a sum is finite iff every
    element is, unless finite values overflow it — then the exact check decides."""
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _running_mean(state: dict, group: dict, steps: int) -> tuple[torch.Tensor | None, float]:
    """The complement's gradient running mean of one parameter as (buffer, scale): the mean
    is scale·buffer, after ``steps`` complement steps. AdamW's exp_avg is bias-corrected by
    its own step count; Muon's buffer is an EMA from zero (mean b/(1 − μᵗ)); SGD's
    b ← μb + g sums with weights 1, μ, μ², ... (mean b·(1 − μ)/(1 − μᵗ))."""
    if "exp_avg" in state:
        t = float(state.get("step", 0))
        beta1 = group["betas"][0]
        return state["exp_avg"], (1.0 / (1.0 - beta1**t) if t > 0 and beta1 > 0 else 1.0)
    buf = state.get("momentum_buffer")
    if buf is None:
        return None, 1.0
    mu, t = group["momentum"], max(steps, 1)
    if not 0 < mu < 1:
        return buf, 1.0
    ema = group["complement"] == "muon"
    return buf, (1.0 if ema else 1.0 - mu) / (1.0 - mu**t)


class OSFN(Optimizer):
    r"""Online saddle-free Newton (OSFN).

    Curvature is estimated by online least-squares regression of noisy gradients on
    positions inside a small subspace found by online PCA of recent gradients, kept
    diagonal by QR steps; a saddle-free Newton step (dividing by |λ|) is taken there and a
    first-order method (AdamW, SGD, momentum, Nesterov or Muon) runs on the complement.

    One step, with V (D, d) orthonormal, θ the flattened parameters and g the gradient::

        y = Vᵀg                                   # collect (worker, D-sized)
        stats ← EMA of (x, y);  Σ H + H Σ = C + Cᵀ  # curvature service (d-sized)
        H = Q diag(λ) Qᵀ by QR steps (eigh fallback)
        s = −η Q diag(1/max(|λ|, floor)) Qᵀ m̂,  ‖s‖ ≤ trust radius
        p = complement displacement from g          # apply (worker, D-sized)
        θ ← θ − p + V (Vᵀp + s)                     # Newton owns the subspace
        V ← V A + (g − V y) cᵀ                      # online PCA / eigen-alignment

    References: J. Duda, "Improving SGD convergence by online linear regression of gradients
    in multiple statistically relevant directions", arXiv:1901.11457; Y. Dauphin et al.,
    "Identifying and attacking the saddle point problem in high-dimensional non-convex
    optimization", arXiv:1406.2572.

    Every hyperparameter of :class:`OSFNConfig` is a ``param_group`` key. Complement
    hyperparameters act per group; subspace hyperparameters are read from group 0. The
    Newton step and trust radius scale with ``lr / initial_lr`` of group 0, so an LR
    scheduler schedules the whole step.

    ``exchange``: where the curvature service lives (default: in this process). Pass a Ray
    actor or gRPC exchange for distributed training. ``nonfinite='skip'`` skips steps whose
    gradient holds NaN/Inf (parameters and statistics untouched, counted in
    ``diagnostics['skipped_steps']``); ``'raise'`` raises :class:`NonFiniteGradientError`.
    """

    def __init__(
        self, params, lr: float = 1e-3, *, exchange: Exchange | None = None, gradient_sync=None,
        shard_basis: bool = False, **hyper
    ):
        unknown = set(hyper) - set(OSFNConfig.field_names())
        if unknown:
            raise ConfigError(
                f"unknown OSFN hyperparameter(s) {sorted(unknown)}; valid names: {', '.join(OSFNConfig.field_names())}"
            )
        config = OSFNConfig(lr=lr, **hyper)
        super().__init__(params, config.as_dict())
        for group in self.param_groups:
            OSFNConfig.from_group(group)  # validate per-group overrides now, not at step 1
        self.config = config
        self._owns_service = exchange is None
        self.exchange = exchange if exchange is not None else InProcessExchange(CurvatureService(config))
        # Data parallel without DDP: a dataflow.distributed.GradientSync averages gradients
        # itself and gathers each worker's local projection (for noise estimates).
        self.gradient_sync = gradient_sync
        # shard_basis: each worker keeps only the rows of V for its parameter slice (dataflow.shard)
        if shard_basis and gradient_sync is None:
            raise ConfigError("shard_basis=True needs gradient_sync (a torch.distributed process group)")
        self._layout = ShardedBasis(gradient_sync.group) if shard_basis else REPLICATED
        self._basis: torch.Tensor | None = None
        self._basis_version = 0
        self._residual_step_dot = 0.0
        self._prev_step_coords: torch.Tensor | None = None
        # θ (flat) right after the last exchange, taken by the first complement-only step
        # after it (curvature_every > 1): the drift since then is θ − anchor
        self._anchor: torch.Tensor | None = None
        self._pair: torch.Tensor | None = None  # see _pair_buffer
        self._steps = 0
        self._skipped = 0
        self._last: dict = {}

    # ----------------------------------------------------------- helpers
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _group_of(self) -> list[dict]:
        return [g for g in self.param_groups for p in g["params"] if p.requires_grad]

    @property
    def _shard_layout(self):
        """The sharded layout, or None for a replicated basis (the dataflow hops' convention)."""
        return self._layout if self._layout.sharded else None

    @property
    def subspace_dim(self) -> int:
        return self.config.subspace_dim

    def _basis_dtype(self, params) -> torch.dtype:
        return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    def _ensure_basis(self, params) -> torch.Tensor:
        total = sum(p.numel() for p in params)
        rows = self._layout.bind(total)
        if self._basis is None:
            device = params[0].device if params else torch.device("cpu")
            self._basis = new_basis(rows, self.subspace_dim, device=device, dtype=self._basis_dtype(params))
        elif self._basis.shape[0] != rows:
            raise DimensionMismatchError(
                f"the optimizer's basis covers {self._basis.shape[0]} parameters but the model now "
                f"has {total}; create a new OSFN after changing the model"
            )
        return self._basis

    def _live_hyper(self) -> dict:
        g0 = self.param_groups[0]
        cfg = OSFNConfig.from_group(g0)
        if cfg.subspace_dim != self.subspace_dim:
            raise ConfigError(
                f"subspace_dim cannot change during training (was {self.subspace_dim}, "
                f"param_groups[0] now says {cfg.subspace_dim}); create a new optimizer"
            )
        hyper = {k: getattr(cfg, k) for k in LIVE_HYPERPARAMETERS if hasattr(cfg, k)}
        initial = g0.get("initial_lr")
        hyper["step_scale"] = float(g0["lr"] / initial) if initial else 1.0
        return hyper

    def _pair_buffer(self, basis: torch.Tensor | None) -> torch.Tensor | None:
        """A reusable (2, D) buffer for the flat gradient and the flat subspace source, so both
        are projected in one pass over V (replicated basis only; not part of the state). It
        keeps 2·D floats between steps that used to be allocated and freed within each step
        (a caching GPU allocator keeps them reserved either way)."""
        if basis is None or self._layout.sharded:
            return None
        shape = (2, basis.shape[0])
        buf = self._pair
        if buf is None or buf.shape != shape or buf.dtype != basis.dtype or buf.device != basis.device:
            buf = self._pair = torch.empty(shape, dtype=basis.dtype, device=basis.device)
        return buf

    def _subspace_source(self, params, groups, has_grad, dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The vector the subspace turns toward, as one flat vector (None: the gradient).

        ``momentum``: the complement's momentum (AdamW exp_avg or the momentum buffer), a
        noise-averaged gradient at no extra memory. ``innovation``: the gradient minus that
        running mean (read before the complement steps, so it is m_{t−1}, bias-corrected):
        ≈ H (θ − θ̄) plus noise, a curvature-weighted signal that gradient PCA lacks
        (core.basis_rule.explore_update). None on the first step, for plain SGD, or with
        subspace_source='gradient'."""
        kind = self.param_groups[0]["subspace_source"]
        if kind == "gradient":
            return None
        parts = []
        for p, group, ok in zip(params, groups, has_grad):
            st = self.state.get(p, {})
            buf, scale = _running_mean(st, group, self._steps - 1)
            if buf is None:
                if ok:
                    return None
                buf, scale = torch.zeros_like(p), 1.0
            flat = buf.reshape(-1).to(dtype)
            if kind == "innovation":
                grad = p.grad if ok else torch.zeros_like(p)
                flat = grad.reshape(-1).to(dtype) - scale * flat
            parts.append(flat)
        return torch.cat(parts, out=out)

    def _complement_displacement(self, params, groups, has_grad, basis) -> torch.Tensor:
        """Advance the complement optimizer; its displacement p (θ_new = θ − p) as one flat vector."""
        parts = []
        for p, group, ok in zip(params, groups, has_grad):
            if ok:
                step = comp.direction(p, p.grad, self.state[p], group)
                parts.append(comp.displacement(p, *step).reshape(-1).to(basis.dtype))
            else:
                parts.append(torch.zeros(p.numel(), device=basis.device, dtype=basis.dtype))
        return torch.cat(parts)

    # ------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups[1:]:
            OSFNConfig.from_group(group)
        hyper = self._live_hyper()
        params = self._params()
        groups = self._group_of()
        has_grad = [p.grad is not None for p in params]
        if not any(has_grad):
            return loss
        worker_coords = None
        # curvature_every = k: the subspace machinery runs on steps 1, k+1, 2k+1, ...; in
        # between only the complement steps, in place; the drift θ − anchor reaches the service
        # with the next report
        every = int(self.param_groups[0]["curvature_every"])
        curvature_step = self.subspace_dim > 0 and (every == 1 or self._steps % every == 0)
        if self.gradient_sync is not None:
            # Average before the finiteness check so every rank takes the same decision.
            basis = self._ensure_basis(params) if self.subspace_dim else None
            pair = self._pair_buffer(basis)
            grad = flat_gradient(
                params, basis.dtype if basis is not None else torch.float32, out=None if pair is None else pair[0]
            )
            if basis is not None and self._layout.sharded:
                worker_coords = self._layout.sync_gradient(grad, basis)  # also averages grad
            else:
                if basis is not None and curvature_step:
                    worker_coords = self.gradient_sync.gather_coords(basis.T @ grad)
                self.gradient_sync.average(grad)
            write_back(params, grad, has_grad)  # the complement acts on the averaged gradient
        grads = [p.grad for p, ok in zip(params, has_grad) if ok]
        if not _all_finite(grads):
            self._skipped += 1
            self._last = {**self._last, "skipped_steps": self._skipped}
            if self.param_groups[0]["nonfinite"] == "raise":
                raise NonFiniteGradientError(
                    f"non-finite gradient at step {self._steps + 1}; parameters and statistics are "
                    "untouched. Lower the learning rate or use nonfinite='skip'"
                )
            return loss
        self._steps += 1

        if self.subspace_dim == 0:  # no subspace: exactly the complement optimizer
            for p, group, ok in zip(params, groups, has_grad):
                if ok:
                    comp.apply_in_place(p, *comp.direction(p, p.grad, self.state[p], group))
            self._last = {"skipped_steps": self._skipped, "step": self._steps}
            return loss

        basis = self._ensure_basis(params)
        frozen = [ok and group["lr"] > 0 for ok, group in zip(has_grad, groups)]
        if not curvature_step:  # the complement alone, in place, exactly as torch.optim would
            if self._anchor is None:
                self._anchor = _flat(params, basis.dtype)
            for group in self.param_groups:
                mine = [p for p in group["params"] if p.requires_grad and p.grad is not None]
                if group["complement"] == "adamw" and mine and not any(p.dtype in (torch.float16, torch.bfloat16) for p in mine):
                    comp.adamw_foreach(mine, [self.state[p] for p in mine], group)
                    continue
                for p in mine:
                    comp.apply_in_place(p, *comp.direction(p, p.grad, self.state[p], group))
            self._last = {**self._last, "step": self._steps, "subspace_step_norm": 0.0, "skipped_steps": self._skipped}
            return loss

        # collect
        pair = self._pair_buffer(basis)
        if self.gradient_sync is None:
            grad = flat_gradient(params, basis.dtype, out=None if pair is None else pair[0])
        source = self._subspace_source(params, groups, has_grad, basis.dtype, out=None if pair is None else pair[1])
        # exact residual norms matter only while directions are being filled
        exact = self._last.get("alive_directions", 0) < self.subspace_dim
        report, coords, residual = build_report(
            basis, grad, self._steps, self._basis_version, self._residual_step_dot, hyper, worker_coords,
            source=source, prev_step_coords=self._prev_step_coords,
            drift=None if self._anchor is None else _flat(params, basis.dtype).sub_(self._anchor),
            layout=self._shard_layout, exact_residual=exact,
            settings={k: getattr(self.config, k) for k in FIXED_SETTINGS},
            pair=pair,
        )
        # exchange
        update = self.exchange.exchange(report)
        check_version(update, self._basis_version)
        self._anchor = None
        # apply
        disp = self._complement_displacement(params, groups, has_grad, basis)
        delta, self._prev_step_coords, self._residual_step_dot, residual = combine_steps(
            basis, disp, residual, update.step_coef, update.complement_keep,
            layout=self._shard_layout,
            source=grad if source is None else source,
            source_coords=coords if report.source_coords is None else report.source_coords.to(basis.device, basis.dtype),
        )
        # a group with lr = 0 is frozen: neither its complement nor the shared subspace moves it
        scatter_add(params, delta, frozen)
        self._basis = update_basis(basis, residual, update, self._shard_layout)
        self._basis_version = update.new_version
        self._last = {
            **update.diagnostics,
            "complement_step_norm": float(torch.linalg.vector_norm(disp)),
            "step_norm": float(torch.linalg.vector_norm(delta)),
            "skipped_steps": self._skipped,
        }
        return loss

    # -------------------------------------------------------- inspection
    @property
    def diagnostics(self) -> dict:
        """Eigenvalues, negative-curvature count, subspace rotation angle (degrees), step
        norms, regression residual, noise ratio and skipped steps of the last step."""
        out = {
            "step": self._steps,
            "skipped_steps": self._skipped,
            "basis_version": self._basis_version,
            "eigenvalues": [],
            "negative_curvature": 0,
            "rotation_angle_deg": 0.0,
            "subspace_step_norm": 0.0,
            "complement_step_norm": 0.0,
            "step_norm": 0.0,
            "regression_residual": float("nan"),
            "noise_ratio": 0.0,
        }
        out.update(self._last)
        return out

    @property
    def basis(self) -> torch.Tensor | None:
        return self._basis

    # ------------------------------------------------------- persistence
    def state_dict(self):
        sd = super().state_dict()
        worker = {
            "version": WORKER_STATE_VERSION,
            "basis": None if self._basis is None else self._basis.clone(),
            "basis_version": self._basis_version,
            "residual_step_dot": self._residual_step_dot,
            "prev_step_coords": self._prev_step_coords,
            "anchor": None if self._anchor is None else self._anchor.clone(),
            "steps": self._steps,
            "skipped": self._skipped,
            "subspace_dim": self.subspace_dim,
            "basis_layout": self._layout.describe(),
            # decides exact residual norms on the next step (see step()); a resume must agree
            "alive_directions": self._last.get("alive_directions", 0),
        }
        if self._owns_service:
            worker["service"] = self.exchange.state_dict()
        sd["osfn"] = worker
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        worker = state_dict.pop("osfn", None)
        super().load_state_dict(state_dict)
        if worker is None:
            return
        if worker["subspace_dim"] != self.subspace_dim:
            raise DimensionMismatchError(
                f"checkpoint has subspace_dim={worker['subspace_dim']}, this optimizer {self.subspace_dim}"
            )
        basis = worker["basis"]
        saved_layout = worker.get("basis_layout", {"kind": "replicated"})
        if basis is not None:
            self._layout.bind(sum(p.numel() for p in self._params()))
            if saved_layout != self._layout.describe():
                raise DimensionMismatchError(
                    f"checkpoint basis layout {saved_layout} does not match this optimizer's "
                    f"{self._layout.describe()}; resume with the same number of workers and shard_basis setting"
                )
        if basis is not None:
            device = self._params()[0].device
            basis = as_basis_layout(basis.clone().to(device))
            self._basis = None
            self._ensure_basis(self._params())  # shape check against the current model
        self._basis = basis
        self._basis_version = worker["basis_version"]
        self._residual_step_dot = worker["residual_step_dot"]
        prev = worker.get("prev_step_coords")
        self._prev_step_coords = None if prev is None else prev.clone().to(basis.device if basis is not None else "cpu")
        anchor = worker.get("anchor")
        self._anchor = None if anchor is None else anchor.clone().to(basis.device if basis is not None else "cpu")
        self._steps = worker["steps"]
        self._skipped = worker["skipped"]
        if "alive_directions" in worker:
            self._last = {**self._last, "alive_directions": worker["alive_directions"]}
        if self._owns_service and "service" in worker:
            self.exchange.load_state_dict(worker["service"])
