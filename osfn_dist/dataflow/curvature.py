"""The curvature service: a plain Python class holding the d-sized curvature model.

It runs in-process (single-process OSFN), inside a Ray actor, or behind the gRPC server,
unchanged. Per report it: (1) tracks the position in subspace coordinates, (2) updates the
regression statistics, (3) solves for the symmetric Hessian estimate, (4) tracks its
eigenbasis with QR steps (eigh fallback), (5) computes the saddle-free Newton step and
(6) decides the basis update (online PCA), re-expressing all statistics in the new basis.
Nothing here is D-sized and nothing here imports ray, grpc or prometheus_client.
"""
from __future__ import annotations

import dataclasses
import math
import threading

import torch

from ..core.basis_rule import ESCAPE_RATIO, capture_direction, choose_basis_update, explore_update
from ..core.config import OSFNConfig
from ..core.eigen import track_eigenbasis
from ..core.errors import ConfigError, DimensionMismatchError, InvalidReportError, VersionMismatchError
from ..core.regression import DTYPE, RegressionStats, solve_symmetric_hessian
from ..core.saddle_free import saddle_free_step
from .messages import FIXED_SETTINGS, LIVE_HYPERPARAMETERS, DirectionUpdate, Report

MIN_SAMPLES = 3  # a direction joins the Hessian estimate after this many samples
# Report magnitudes beyond which the statistics (squares, products, the accumulated position)
# overflow float64: finite but absurd values are refused up front, like non-finite ones.
MAX_COORD = 1e150
MAX_SQNORM = 1e300
STATE_VERSION = 1


class CurvatureService:
    """Thread-safe: one lock serialises exchanges (the gRPC server is multi-threaded)."""

    def __init__(self, config: OSFNConfig | None = None, allow_stale: bool = False):
        self.config = config or OSFNConfig()
        self.dim = self.config.subspace_dim
        self.allow_stale = allow_stale
        self._lock = threading.Lock()
        self._valid_hyper = None  # the last accepted live hyperparameters (see _validate_hyper)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        d = self.dim
        self._eye = torch.eye(d, dtype=DTYPE)  # shared, never written in place
        self.stats = RegressionStats.zeros(d)
        self.eigvecs = torch.eye(d, dtype=DTYPE)
        self.eigenvalues = torch.zeros(d, dtype=DTYPE)
        self.momentum = torch.zeros(d, dtype=DTYPE)
        self.momentum_weight = 0.0  # 1 − μ^n, for bias correction
        self.energy = torch.zeros(d, dtype=DTYPE)  # EMA of y², which direction matters
        self.noise_var = torch.zeros(d, dtype=DTYPE)  # variance of the averaged gradient per direction
        self.position = torch.zeros(d, dtype=DTYPE)
        self.alive = torch.zeros(d, dtype=torch.bool)
        self.pending_residual = torch.zeros(d, dtype=DTYPE)
        self.last_transform = self._eye
        self.step = 0
        self.version = 0
        self.updates = 0
        self.eigh_fallbacks = 0
        self.resid_mean = 0.0  # running mean of ‖u − VVᵀu‖² (the "curvature" rule's capture test)
        self.captures = 0
        self.last_diagnostics: dict = {}

    def state_dict(self) -> dict:
        with self._lock:
            tensors = {
                k: getattr(self, k).clone()
                for k in (
                    "eigvecs eigenvalues momentum energy noise_var position alive "
                    "pending_residual last_transform"
                ).split()
            }
            return {
                "state_version": STATE_VERSION,
                "config": self.config.as_dict(),
                "stats": self.stats.state_dict(),
                "tensors": tensors,
                "scalars": {
                    "momentum_weight": self.momentum_weight,
                    "step": self.step,
                    "version": self.version,
                    "updates": self.updates,
                    "eigh_fallbacks": self.eigh_fallbacks,
                    "resid_mean": self.resid_mean,
                    "captures": self.captures,
                },
                "last_diagnostics": dict(self.last_diagnostics),
            }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("state_version") != STATE_VERSION:
            raise VersionMismatchError(
                f"curvature state has state_version={sd.get('state_version')!r}, this build reads "
                f"{STATE_VERSION}; resume with the osfn-dist version that wrote the checkpoint"
            )
        cfg = OSFNConfig(**{**sd["config"], "betas": tuple(sd["config"]["betas"])})
        if cfg.subspace_dim != self.dim:
            raise DimensionMismatchError(
                f"checkpoint has subspace_dim={cfg.subspace_dim}, this service has {self.dim}"
            )
        with self._lock:
            self.config = cfg
            self.stats = RegressionStats.from_state_dict(sd["stats"])
            for k, v in sd["tensors"].items():
                setattr(self, k, v.clone())
            for k, v in sd["scalars"].items():
                setattr(self, k, v)
            self.last_diagnostics = dict(sd.get("last_diagnostics", {}))

    # -------------------------------------------------------------- exchange
    def exchange(self, report: Report) -> DirectionUpdate:
        """One step of the curvature model: a worker's report in, the direction update out.

        All or nothing: a report that fails validation, or whose finite but huge values
        overflow the statistics, raises and leaves the model exactly as it was."""
        with self._lock:
            # Every update rebinds the model's tensors (nothing is written in place), so a
            # shallow copy of the attributes is a complete backup
            backup = dict(self.__dict__)
            backup["stats"] = dataclasses.replace(self.stats)
            try:
                # d-sized work in hundreds of tiny ops: inference mode skips autograd's
                # dispatch (~20% per op); nothing here is ever differentiated
                with torch.inference_mode():
                    update = self._exchange(report)
                    finite = self._finite(update)
                if not finite:
                    raise InvalidReportError(
                        "report overflowed the curvature statistics (non-finite result); it was "
                        "rejected and the model left unchanged. Check the gradient scale"
                    )
                return update
            except Exception:
                self.__dict__.update(backup)
                raise

    def _finite(self, update: DirectionUpdate) -> bool:
        tensors = [update.step_coef, self.eigenvalues, self.position, self.momentum, self.noise_var,
                   *self.stats.__dict__.values()]
        tensors += [t for t in (update.rotation, update.residual_coef) if t is not None]
        # one check over all of them (d-sized: a copy costs less than a dozen separate syncs)
        flat = [t.reshape(-1) if t.dtype == DTYPE else t.reshape(-1).to(DTYPE) for t in tensors]
        return bool(torch.isfinite(torch.cat(flat)).all())

    def _validate(self, report: Report) -> torch.Tensor:
        d = self.dim
        y = torch.as_tensor(report.grad_coords, dtype=DTYPE).flatten()
        if y.shape[0] != d:
            raise DimensionMismatchError(
                f"report has {y.shape[0]} gradient coordinates, the subspace has d={d}; "
                "the worker and the curvature service must use the same subspace_dim"
            )
        arrays = {"grad_coords": y}
        for name in ("source_coords", "drift_coords", "prev_step_coords"):
            value = getattr(report, name)
            if value is not None:
                arrays[name] = coords = torch.as_tensor(value, dtype=DTYPE).flatten()
                if coords.shape[0] != d:
                    raise DimensionMismatchError(f"report.{name} must be {d} floats, got {coords.shape[0]}")
        if report.worker_grad_coords is not None:
            w = torch.as_tensor(report.worker_grad_coords, dtype=DTYPE)
            if w.ndim != 2 or w.shape[1] != d:
                raise DimensionMismatchError(f"worker_grad_coords must have shape (workers, {d}), got {tuple(w.shape)}")
            arrays["worker_grad_coords"] = w
        if report.source_coords is not None and report.source_sqnorm is None:
            raise InvalidReportError("report.source_coords must be finite with a finite source_sqnorm >= 0")
        # One host read for every array: the largest magnitude (NaN if any is NaN). Only a
        # report that fails it is examined field by field, for an error that names the field.
        flat = [t.reshape(-1) for t in arrays.values()]
        biggest = 0.0 if d == 0 else float((torch.cat(flat) if len(flat) > 1 else y).abs().max())
        scalars = [report.grad_sqnorm, report.residual_step_dot, report.source_sqnorm, report.residual_sqnorm]
        if not biggest <= MAX_COORD or not all(v is None or math.isfinite(v) for v in scalars):
            self._check_values(report, arrays)
        self._check_magnitudes(report)
        unknown = set(report.hyper) - set(LIVE_HYPERPARAMETERS)
        if unknown:
            raise InvalidReportError(
                f"unknown hyperparameters in report: {sorted(unknown)} (a trainer of another osfn-dist version?); "
                f"known: {', '.join(LIVE_HYPERPARAMETERS)}")
        self._check_settings(report.settings)
        self._validate_hyper(report.hyper)
        if report.basis_version != self.version:
            if self.allow_stale and report.basis_version == self.version - 1:
                y = self.last_transform @ y  # re-express a one-step-stale report in the current basis
            else:
                raise VersionMismatchError(
                    f"report for basis version {report.basis_version}, the service is at "
                    f"{self.version}; the worker's basis is out of sync (restore both from the "
                    "same checkpoint)"
                )
        return y

    @staticmethod
    def _check_values(report: Report, arrays: dict) -> None:
        """Field-by-field finiteness and magnitude checks, each error naming its field."""
        if not torch.isfinite(arrays["grad_coords"]).all() or not math.isfinite(report.grad_sqnorm) or report.grad_sqnorm < 0:
            raise InvalidReportError("report holds non-finite or negative values; it was rejected")
        if report.residual_sqnorm is not None and (
            not math.isfinite(report.residual_sqnorm) or report.residual_sqnorm < 0
        ):
            raise InvalidReportError("report.residual_sqnorm must be finite and >= 0; it was rejected")
        if not math.isfinite(report.residual_step_dot):
            raise InvalidReportError("report.residual_step_dot is not finite; it was rejected")
        if "source_coords" in arrays:
            sq = report.source_sqnorm
            if not torch.isfinite(arrays["source_coords"]).all() or not math.isfinite(sq) or sq < 0:
                raise InvalidReportError("report.source_coords must be finite with a finite source_sqnorm >= 0")
        for name in ("drift_coords", "prev_step_coords", "worker_grad_coords"):
            if name in arrays and not torch.isfinite(arrays[name]).all():
                what = f"report.{name}" if name != "worker_grad_coords" else name
                raise InvalidReportError(f"{what} holds non-finite values; it was rejected")
        for name, t in arrays.items():
            biggest = float(t.abs().max()) if t.numel() else 0.0
            if biggest > MAX_COORD:
                raise InvalidReportError(
                    f"report.{name} holds values up to {biggest:.3g} in magnitude; beyond {MAX_COORD:g} their "
                    "squares overflow the curvature statistics. It was rejected; check the gradient scale"
                )

    @staticmethod
    def _check_magnitudes(report: Report) -> None:
        """Finite scalars so large (or negative) that the statistics would overflow or lie."""
        if report.grad_sqnorm < 0:
            raise InvalidReportError("report holds non-finite or negative values; it was rejected")
        if report.residual_sqnorm is not None and report.residual_sqnorm < 0:
            raise InvalidReportError("report.residual_sqnorm must be finite and >= 0; it was rejected")
        if report.source_sqnorm is not None and report.source_sqnorm < 0:
            raise InvalidReportError("report.source_coords must be finite with a finite source_sqnorm >= 0")
        if abs(report.residual_step_dot) > MAX_COORD:
            raise InvalidReportError(
                f"report.residual_step_dot={report.residual_step_dot:.3g} is beyond {MAX_COORD:g} and would "
                "overflow the curvature statistics; it was rejected"
            )
        for name in ("grad_sqnorm", "source_sqnorm", "residual_sqnorm"):
            value = getattr(report, name)
            if value is not None and value > MAX_SQNORM:
                raise InvalidReportError(
                    f"report.{name}={value:.3g} is beyond {MAX_SQNORM:g} (overflow territory: a squared norm of "
                    "values above 1e150); it was rejected. Check the gradient scale"
                )

    def _check_settings(self, settings: dict) -> None:
        unknown = set(settings) - set(FIXED_SETTINGS)
        if unknown:
            raise ConfigError(f"report carries unknown settings {sorted(unknown)}; known: {', '.join(FIXED_SETTINGS)}")
        for name, theirs in settings.items():
            mine = getattr(self.config, name)
            if str(theirs) != str(mine):
                raise ConfigError(
                    f"the curvature service runs {name}={mine!r} but the trainer is configured with "
                    f"{name}={theirs!r}; give both the same setting (osfn-dist serve --config FILE takes "
                    "the trainer's 'optimizer:' section)"
                )

    def _validate_hyper(self, hyper: dict) -> None:
        """Reject invalid live hyperparameter values before anything is mutated: a bad value
        used to raise half-way through an exchange (e.g. basis_update_every=0 after the step
        counter moved) or silently poison the statistics (forgetting=NaN)."""
        if not hyper:
            return
        try:
            key = tuple(sorted((k, type(v).__name__, v) for k, v in hyper.items()))
        except TypeError:  # unhashable or unorderable values: validate (and reject) below
            key = None
        if key is not None and key == self._valid_hyper:
            return  # the same values as the last accepted report (every step, usually)
        scale = hyper.get("step_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ConfigError(f"report carries step_scale={scale!r}; it must be a finite float >= 0")
        try:
            OSFNConfig(**{**self.config.as_dict(), **{k: v for k, v in hyper.items() if k != "step_scale"}})
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"report carries an invalid live hyperparameter: {exc}") from None
        self._valid_hyper = key

    def _exchange(self, report: Report) -> DirectionUpdate:
        y = self._validate(report)
        if report.basis_version != self.version:  # an accepted one-step-stale report (allow_stale)
            report = _carry_stale_report(report, self.last_transform)
        h = {**{k: getattr(self.config, k) for k in LIVE_HYPERPARAMETERS if hasattr(self.config, k)}, "step_scale": 1.0}
        h.update(report.hyper)
        d = self.dim
        base_version = self.version
        self.step += 1

        # (1) position in subspace coordinates: the previous position (already carried into
        # this basis) plus the previous step's displacement, V_newᵀΔθ = T (V_oldᵀΔθ) + c (rᵀΔθ).
        if report.prev_step_coords is not None:
            self.position = self.position + self.last_transform @ torch.as_tensor(report.prev_step_coords, dtype=DTYPE)
        self.position = self.position + self.pending_residual * report.residual_step_dot
        if report.drift_coords is not None:  # complement-only steps since the last exchange
            self.position = self.position + torch.as_tensor(report.drift_coords, dtype=DTYPE)

        # (2) regression statistics and per-direction gradient energy / noise.
        self.stats.update(self.position, y, float(h["forgetting"]))
        mu = float(h["newton_momentum"])
        self.momentum = mu * self.momentum + (1 - mu) * y
        self.momentum_weight = mu * self.momentum_weight + (1 - mu)
        beta = float(h["forgetting"])
        self.energy = self.energy + beta * (y * y - self.energy)
        if report.worker_grad_coords is not None and len(report.worker_grad_coords) >= 2:
            w = torch.as_tensor(report.worker_grad_coords, dtype=DTYPE)
            sample_noise = w.var(dim=0, unbiased=True) / w.shape[0]
        else:
            sample_noise = self.stats.y_var
        self.noise_var = self.noise_var + (beta * (sample_noise - self.noise_var) if self.step > 1 else sample_noise - self.noise_var)

        # (3)+(4) Hessian estimate on mature directions and its eigenbasis.
        mature = self.alive & (self.stats.count >= MIN_SAMPLES)
        idx = torch.nonzero(mature).flatten()
        eigvecs, eigenvalues = self._eye, torch.zeros(d, dtype=DTYPE)
        fallback = False
        residual = float("nan")
        if idx.numel() == d:  # steady state: every direction is mature
            sub = lambda m: m  # noqa: E731
        else:
            sub = lambda m: m.index_select(0, idx).index_select(1, idx)  # noqa: E731
        if idx.numel() > 0:
            hess = solve_symmetric_hessian(sub(self.stats.cov_xx), sub(self.stats.cov_yx), float(h["ridge"]))
            q_prev = sub(self.eigvecs)
            q_prev, _ = torch.linalg.qr(q_prev) if q_prev.numel() else (q_prev, None)
            lam, q, fallback = track_eigenbasis(hess, q_prev, self.config.eigen_method)
            self.eigh_fallbacks += int(fallback)
            if idx.numel() == d:
                eigvecs, eigenvalues = q, lam
            else:
                eigvecs = eigvecs.clone()
                eigvecs[idx.unsqueeze(1), idx.unsqueeze(0)] = q
                eigenvalues[idx] = lam
            # relative residual of the symmetric fit C ≈ H Σ (one host read for both norms)
            c_sub = sub(self.stats.cov_yx)
            norms = torch.linalg.matrix_norm(torch.stack([c_sub, c_sub - hess @ sub(self.stats.cov_xx)]))
            denom, misfit = norms.tolist()
            residual = misfit / (denom or 1.0)
        self.eigvecs, self.eigenvalues = eigvecs, eigenvalues

        # (5) saddle-free Newton step on the bias-corrected subspace momentum.
        step_coef = torch.zeros(d, dtype=DTYPE)
        newton_active = idx.numel() > 0 and self.step > int(h["newton_warmup"])
        if newton_active:
            m_hat = self.momentum / max(self.momentum_weight, 1e-12)
            m_eig = eigvecs.T @ torch.where(mature, m_hat, torch.zeros_like(m_hat))
            noise = None
            if h["noise_damping"]:
                # noise of the momentum average ≈ per-step noise × (1−μ)/(1+μ)
                noise = (eigvecs * eigvecs).T @ self.noise_var * ((1 - mu) / (1 + mu))
            s_eig = saddle_free_step(
                m_eig, eigenvalues, float(h["newton_lr"]) * float(h["step_scale"]), float(h["eig_floor"]),
                float(h["trust_radius"]) * float(h["step_scale"]), noise,
            )
            s_eig = torch.where(eigenvalues != 0, s_eig, torch.zeros_like(s_eig))
            step_coef = eigvecs @ s_eig

        # the vector the subspace turns toward: the gradient, or its momentum average
        if report.source_coords is not None:
            src = torch.as_tensor(report.source_coords, dtype=DTYPE).flatten()
            src_sq = float(report.source_sqnorm)
        else:
            src, src_sq = y, float(report.grad_sqnorm)
        resid_sq = (
            float(report.residual_sqnorm) if report.residual_sqnorm is not None
            else max(src_sq - float(src @ src), 0.0)
        )
        # (6) basis update: align with the Hessian eigenbasis, then move toward the gradient.
        rotation = residual_coef = None
        born = None
        reorth = False
        if d > 0 and self.step % int(h["basis_update_every"]) == 0:
            # Turning V into the Hessian eigenbasis costs the workers a D×d² product, so it
            # happens every reorth_every steps; in between the service steps with Q itself.
            align = self.step % int(h["reorth_every"]) == 0 and not (
                eigvecs is self._eye or torch.equal(eigvecs, self._eye))
            rule = self.config.subspace_rule
            exploring = rule == "curvature" and bool(self.alive.all())  # filled: hold, explore, capture
            capture = None
            if exploring:
                capture = self._escaped_direction(resid_sq, src_sq, eigenvalues)
                align = align or capture is not None  # the replaced eigen-direction must be a column
            frame = eigvecs if align else self._eye
            src_f = frame.T @ src if align else src
            energy_f = (frame * frame).T @ self.energy if align else self.energy
            replace_due = self.step % int(h["replace_every"]) == 0
            if capture is not None:
                rule_rot, residual_coef, born = capture_direction(capture, resid_sq, d)
            elif exploring:
                rule_rot, born = None, None
                # the explorers are eigen-directions; c is wanted in the frame's coordinates
                residual_coef = explore_update(
                    eigvecs.T @ src, src_sq, eigenvalues, frame.T @ eigvecs, int(h["explorers"]),
                    float(h["subspace_rate"]),
                )
            else:  # filling empty directions is the same for every rule
                rule_rot, residual_coef, born = choose_basis_update(
                    src_f, src_sq, resid_sq, self.alive, energy_f, rule, float(h["subspace_rate"]), replace_due,
                )
            if align or rule_rot is not None:
                rotation = frame if rule_rot is None else frame @ rule_rot
        transform = rotation.T if rotation is not None else self._eye
        changed = rotation is not None or residual_coef is not None
        if changed:
            self.version += 1
            self.updates += 1
            # a newborn direction comes from a residual that may be tiny, hence imprecise:
            # re-orthonormalise at once, while the statistics are young, not 16 steps later
            reorth = self.version % int(h["reorth_every"]) == 0 or born is not None
        if born is not None:
            self.alive = self.alive.clone()
            self.alive[born] = True
        self._carry(transform)
        # rotation angle of the subspace this step: how much of the old span left it.
        angle = 0.0
        alive_count = int(self.alive.sum())
        if residual_coef is not None:
            resid_norm = resid_sq**0.5
            coef_eff = residual_coef.clone()
            if born is not None:
                coef_eff[born] = 0.0
            angle = math.degrees(math.atan(float(torch.linalg.vector_norm(coef_eff)) * resid_norm))
            if born is not None and base_version > 0 and alive_count == d:
                angle = max(angle, 90.0 / max(d, 1))
        self.pending_residual = residual_coef.clone() if residual_coef is not None else torch.zeros(d, dtype=DTYPE)
        lams = eigenvalues.tolist()
        # one host read for the scalar diagnostics
        step_norm, noise_sum, energy_sum = torch.stack(
            [torch.linalg.vector_norm(step_coef), self.noise_var.sum(), self.energy.sum()]).tolist()
        self.last_diagnostics = {
            "step": self.step,
            "basis_version": self.version,
            "eigenvalues": lams,
            "negative_curvature": sum(lam < 0 for lam in lams),
            "rotation_angle_deg": angle,
            "subspace_step_norm": step_norm,
            "regression_residual": residual,
            "noise_ratio": noise_sum / max(energy_sum, 1e-300) if d else 0.0,
            "eigh_fallbacks": self.eigh_fallbacks,
            "alive_directions": alive_count,
            "used_eigh_fallback": fallback,
            "captures": self.captures,
        }
        return DirectionUpdate(
            step=self.step,
            base_version=base_version,
            new_version=self.version,
            step_coef=step_coef,
            rotation=rotation,
            residual_coef=residual_coef,
            complement_keep=float(h["complement_in_subspace"]) if newton_active else 1.0,
            reorthonormalize=reorth,
            diagnostics=dict(self.last_diagnostics),
        )

    def _escaped_direction(self, resid_sq: float, src_sq: float, eigenvalues: torch.Tensor) -> int | None:
        """The eigen-direction to give up when the source's part outside V jumps (a sharp
        direction left in the complement grows there at the complement's step size), or None.

        A jump is ‖u − VVᵀu‖² above ESCAPE_RATIO × its running mean (the typical level, noise
        included, so steady noise does not trigger it) and more than half of ‖u‖². The
        direction given up is the mature one with the least |λ|; directions still gathering
        their first samples (λ = 0) are kept."""
        typical = self.resid_mean
        self.resid_mean = resid_sq if typical <= 0 else typical + 0.1 * (resid_sq - typical)
        if typical <= 0 or resid_sq <= ESCAPE_RATIO * typical or resid_sq <= 0.5 * src_sq:
            return None
        mature = eigenvalues != 0
        if not bool(mature.any()):
            return None
        weakest = torch.where(mature, eigenvalues.abs(), torch.full_like(eigenvalues, float("inf")))
        self.captures += 1
        return int(torch.argmin(weakest))

    def _carry(self, transform: torch.Tensor) -> None:
        """Re-express every d-sized quantity in the new basis coordinates x' = T x."""
        self.last_transform = transform
        if transform is self._eye or torch.equal(transform, self._eye):
            return
        self.stats.transform(transform)
        self.position = transform @ self.position
        self.momentum = transform @ self.momentum
        w = transform * transform
        self.energy = w @ self.energy
        self.noise_var = w @ self.noise_var
        self.eigvecs = transform @ self.eigvecs

    # -------------------------------------------------------------- inspect
    def snapshot(self) -> dict:
        """A JSON-friendly view for GetState / status / metrics."""
        with self._lock:
            diag = dict(self.last_diagnostics)
            return {
                "step": self.step,
                "basis_version": self.version,
                "subspace_dim": self.dim,
                "eigenvalues": self.eigenvalues.tolist(),
                "negative_curvature": int((self.eigenvalues < 0).sum()),
                "noise_var": self.noise_var.tolist(),
                "energy": self.energy.tolist(),
                "alive_directions": int(self.alive.sum()),
                "eigh_fallbacks": self.eigh_fallbacks,
                "rotation_angle_deg": diag.get("rotation_angle_deg", 0.0),
                "subspace_step_norm": diag.get("subspace_step_norm", 0.0),
                "regression_residual": diag.get("regression_residual", float("nan")),
                "noise_ratio": diag.get("noise_ratio", 0.0),
            }


def _carry_stale_report(report: Report, transform: torch.Tensor) -> Report:
    """Re-express the other subspace coordinates of a one-step-stale report in the current
    basis, as ``_validate`` does for grad_coords (x' = T x; per-worker rows likewise)."""
    changes = {}
    if report.source_coords is not None:
        changes["source_coords"] = transform @ torch.as_tensor(report.source_coords, dtype=DTYPE).flatten()
    if report.worker_grad_coords is not None:
        changes["worker_grad_coords"] = torch.as_tensor(report.worker_grad_coords, dtype=DTYPE) @ transform.T
    return dataclasses.replace(report, **changes) if changes else report
