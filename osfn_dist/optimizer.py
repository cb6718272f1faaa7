"""OSFN as a ``torch.optim.Optimizer`` wrapped around the user's own optimizer (its base).

``step()`` reads as the data path: collect → exchange → base step (measured) → Newton move.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.optim import Optimizer

from .base_optimizer import (build_default_bases, check_params, preconditioner_scale, reads_running_mean,
                             reads_second_moments, running_mean)
from .core.config import COMPLEMENT_FIELDS, OSFNConfig
from .core.errors import ConfigError, DimensionMismatchError, NonFiniteGradientError
from .core import native as native_kernels
from .core import triton_pass
from .core.subspace import as_basis_layout, new_basis, one_pass, right_multiply_, work_dtype
from .dataflow.apply import check_version, move_and_update, newton_move, scatter_add, update_basis
from .dataflow.collect import build_report, flat_gradient, write_back
from .dataflow.exchange import Exchange, InProcessExchange
from .dataflow.pipeline import PipelinedExchange
from .dataflow.messages import FIXED_SETTINGS, LIVE_HYPERPARAMETERS
from .dataflow.curvature import CurvatureService
from .dataflow.shard import REPLICATED, DDPRows, LocalShards, ShardedBasis, local, param_slices

WORKER_STATE_VERSION = 2
LOW_PRECISION = (torch.float16, torch.bfloat16)
# phase labels for torch.profiler (bench/step_time.py --profile); ~1 µs each when not profiling
_phase = torch.profiler.record_function


def _flat(params: list[torch.Tensor], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's parameters as one flat vector (the local shards under FSDP2)."""
    return torch.cat([local(p).detach().reshape(-1).to(dtype) for p in params], out=out)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One reduction per tensor instead of an elementwise isfinite: a sum is finite iff every
    element is, unless finite values overflow it — then the exact check decides."""
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _one_pass_covers(native, basis: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether every pass of a lazy step over a bfloat16 V runs in the one-pass kernels: the
    C loops writing into the parameters (CPU), or the Triton passes for float32 parameters."""
    locals_ = [local(p) for p in params]
    if native == "triton":
        return one_pass(native, basis.T, *locals_) is triton_pass and bool(locals_)
    return bool(native) and native_kernels.params_usable(locals_)


def _subtract_params_(buf: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """buf ← buf − flat(θ), slice by slice (no D-sized temporary)."""
    for mine, rows in param_slices(params):
        buf[rows].sub_(mine.detach().reshape(-1).to(buf.dtype))
    return buf


def _zero_frozen_(vec: torch.Tensor, params: list[torch.Tensor], moves: list[bool]) -> None:
    for (_, rows), ok in zip(param_slices(params), moves):
        if not ok:
            vec[rows].zero_()


class _MergedState(Mapping):
    """``state`` of several base optimizers over disjoint parameters, as one mapping."""

    def __init__(self, bases):
        self._bases = bases

    def __getitem__(self, p):
        for b in self._bases:
            if p in b.state:
                return b.state[p]
        for b in self._bases:
            if any(p is q for g in b.param_groups for q in g["params"]):
                return b.state[p]
        raise KeyError(p)

    def __iter__(self):
        for b in self._bases:
            yield from b.state

    def __len__(self):
        return sum(len(b.state) for b in self._bases)


class OSFN(Optimizer):
    r"""Online saddle-free Newton (OSFN) on top of a first-order optimizer.

    Curvature is estimated by online least-squares regression of noisy gradients on
    positions inside a small subspace V (D, d), kept diagonal by QR steps; a saddle-free
    Newton step (dividing by |λ|) is taken there. Everywhere else the *base* optimizer —
    yours (fused AdamW, torch Muon, heavyball SOAP, ...) or, by default, torch's AdamW —
    takes its own step, unchanged::

        OSFN(model.parameters(), lr=1e-3)                                 # torch AdamW inside
        OSFN(base=torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))
        OSFN(model.parameters(), lr=3e-3, base=heavyball.SOAP)            # class (+ base_kwargs)
        OSFN(base=[torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=3e-3)])

    One step, with θ the flattened parameters and g the gradient::

        y = Vᵀg                                        # collect (worker, D-sized)
        stats ← EMA of (x, y);  Σ H + H Σ = C + Cᵀ      # curvature service (d-sized)
        s = −η Q diag(1/max(|λ|, floor)) Qᵀ m̂,  ‖s‖ ≤ trust radius
        p = θ − θ'  after base.step()                  # measured, never re-derived
        θ ← θ' + V (s + (1 − π) Vᵀp)                   # Newton move (π = complement_in_subspace)
        V ← V A + (u − V Vᵀu) cᵀ                       # subspace rule, u the subspace source

    With π < 1 the base sees the complement gradient g − (1 − π) V Vᵀg (written into
    ``p.grad``) while the Newton step is active, and (1 − π) of its displacement's part inside
    V is removed; with π = 1 (default) it sees the full gradient. The exchange with the
    curvature service comes before anything moves: a refused update leaves θ and the base's
    state untouched.

    References: J. Duda, "Improving SGD convergence by online linear regression of gradients
    in multiple statistically relevant directions", arXiv:1901.11457; Y. Dauphin et al.,
    "Identifying and attacking the saddle point problem in high-dimensional non-convex
    optimization", arXiv:1406.2572.

    ``param_groups`` are the base optimizers' own groups (one list), so LR schedulers act on
    the base. Every subspace hyperparameter of :class:`OSFNConfig` is also a key of each group,
    read from group 0. The Newton step and trust radius follow group 0's lr relative to its lr
    at construction, capped at 1: a schedule shrinks the Newton step with the base's, never
    enlarges it beyond its configured size (OneCycleLR's peak included).

    ``exchange``: where the curvature service lives (default: in this process). Pass a Ray
    actor or gRPC exchange for distributed training. ``pipelined=True`` runs the in-process
    service one step behind on a background thread (``dataflow.pipeline``: step t applies the
    update computed from step t−1's report) — measured in the README's step-time section,
    not the default. ``nonfinite='skip'`` skips steps whose
    gradient holds NaN/Inf (parameters and statistics untouched, counted in
    ``diagnostics['skipped_steps']``); ``'raise'`` raises :class:`NonFiniteGradientError`.
    """

    def __init__(
        self, params=None, lr: float | None = None, *, base=None, base_kwargs: dict | None = None,
        exchange: Exchange | None = None, gradient_sync=None, shard_basis: bool = False, pipelined: bool = False,
        **hyper
    ):
        unknown = set(hyper) - set(OSFNConfig.field_names())
        if unknown:
            raise ConfigError(
                f"unknown OSFN hyperparameter(s) {sorted(unknown)}; valid names: {', '.join(OSFNConfig.field_names())}"
            )
        complement_given = sorted(set(hyper) & set(COMPLEMENT_FIELDS))
        config = OSFNConfig(lr=1e-3 if lr is None else lr, **hyper)
        bases = self._make_bases(params, lr, base, base_kwargs, complement_given, config)
        self._fsdp = check_params(bases)  # the process group of FSDP2 shards, or None
        self._bases: list[Optimizer] = []
        super().__init__([{"params": g["params"]} for b in bases for g in b.param_groups], {})
        self._bases = bases
        # whether OSFN can read every base's gradient running mean (else the subspace source
        # "momentum" is the base's measured displacement); the bases' types never change
        self._reads_mean = all(map(reads_running_mean, bases))
        subspace = {k: getattr(config, k) for k in OSFNConfig.subspace_field_names()}
        # the base's defaults too: schedulers look for lr, momentum or betas here (OneCycleLR)
        self.defaults = {**bases[0].defaults, **subspace}
        for group in self.param_groups:
            for k, v in subspace.items():
                group.setdefault(k, v)
            OSFNConfig.from_group(group)  # validate per-group overrides now, not at step 1
        self.config = OSFNConfig.from_group(self.param_groups[0])
        self._check_source()
        self._preconditioned = self.config.coordinates == "preconditioned"
        if self._preconditioned and not all(map(reads_second_moments, bases)):
            names = sorted({type(b).__name__ for b in bases if not reads_second_moments(b)})
            raise ConfigError(
                f"coordinates='preconditioned' reads Adam's second moments, which {names} do not keep; "
                "wrap torch.optim.Adam/AdamW or use coordinates='parameters'")
        if self._preconditioned and shard_basis:
            raise ConfigError("coordinates='preconditioned' needs the whole basis on each worker: drop shard_basis")
        self._check_basis_dtype(gradient_sync, shard_basis)
        # the Newton step follows group 0's lr relative to this (see the class docstring)
        self._reference_lr = float(self.param_groups[0]["lr"])
        self._owns_service = exchange is None
        if pipelined and exchange is not None:
            raise ConfigError("pipelined=True pipelines OSFN's own in-process service; for a Ray actor or gRPC "
                              "exchange wrap it in dataflow.pipeline.PipelinedExchange (Ray: --staleness 1)")
        if exchange is not None:
            self.exchange = exchange
        elif pipelined:
            self.exchange = PipelinedExchange(InProcessExchange(CurvatureService(self.config, allow_stale=True)))
        else:
            self.exchange = InProcessExchange(CurvatureService(self.config))
        self._pipelined = pipelined
        # Data parallel without DDP: a dataflow.distributed.GradientSync averages gradients
        # itself and gathers each worker's local projection (for noise estimates).
        self.gradient_sync = gradient_sync
        # shard_basis: each worker keeps only the rows of V for its parameter slice
        # (dataflow.shard): with gradient_sync, OSFN averages the gradients itself; without
        # it, DDP has (DDPRows), on the default process group
        self._replicas = None
        if shard_basis and gradient_sync is None and not self._fsdp:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ConfigError(
                    "shard_basis=True shards V over the ranks of a torch.distributed process group: initialise "
                    "one (torchrun, Ray Train, dist.init_process_group) and wrap the model in DDP, or pass "
                    "gradient_sync=GradientSync()")
        if self._fsdp:  # FSDP2: V keeps the rows of this rank's shards (dataflow.shard.LocalShards)
            if shard_basis or gradient_sync is not None:
                raise ConfigError(
                    "FSDP2 (DTensor) parameters arrive with averaged gradients and sharded already: "
                    "drop shard_basis and gradient_sync")
            self._layout = LocalShards(self._fsdp)
        else:
            if shard_basis and gradient_sync is None:  # under DDP (ZeRO-1 for V)
                from .dataflow.distributed import GradientSync

                self._layout = DDPRows()
                # a replica check now and then (step 1, every 100): the ranks move only their
                # own rows and share them, so replicas that drifted apart must stop the run
                self._replicas = GradientSync()
            else:
                self._layout = ShardedBasis(gradient_sync.group) if shard_basis else REPLICATED
        self._basis: torch.Tensor | None = None
        # a rotation R (d, d) not yet applied to the stored basis: the basis is V R (see _fold)
        self._pending: torch.Tensor | None = None
        self._basis_version = 0
        self._residual_step_dot = 0.0
        self._prev_step_coords: torch.Tensor | None = None
        # the base's last measured displacement: the subspace source for a base whose
        # running mean OSFN cannot read (subspace_source='momentum')
        self._prev_disp: torch.Tensor | None = None
        # θ (flat) right after the last exchange, taken by the first complement-only step
        # after it (curvature_every > 1): the drift since then is θ − anchor
        self._anchor: torch.Tensor | None = None
        self._pair: torch.Tensor | None = None  # see _pair_buffer
        self._scratch: dict[str, torch.Tensor] = {}  # see _buffer
        self._presynced = None  # sync_gradients() ran for this step (see there)
        self._ddp_projections = None  # watch_ddp()
        self._steps = 0
        self._skipped = 0
        self._last: dict = {}

    @staticmethod
    def _make_bases(params, lr, base, base_kwargs, complement_given, config) -> list[Optimizer]:
        if base is None:
            if params is None:
                raise ConfigError("OSFN needs params (or base=<your optimizer>)")
            if base_kwargs:
                raise ConfigError("base_kwargs needs base=<an optimizer class>")
            groups = list(params)
            if not groups:
                raise ValueError("optimizer got an empty parameter list")
            if not isinstance(groups[0], dict):
                groups = [{"params": groups}]
            return build_default_bases(groups, config)
        if complement_given:
            raise ConfigError(
                f"{complement_given} configure OSFN's default base optimizer; with base=... set them on "
                "your optimizer instead (OSFN only adds the subspace)")
        if isinstance(base, type):
            if not issubclass(base, Optimizer):
                raise ConfigError(f"base={base.__name__} is not a torch.optim.Optimizer class")
            if params is None:
                raise ConfigError(f"base={base.__name__} is a class: pass params to build it with")
            kwargs = dict(base_kwargs or {})
            if lr is not None:
                kwargs["lr"] = lr
            return [base(params, **kwargs)]
        if params is not None or lr is not None or base_kwargs:
            raise ConfigError(
                "base is an optimizer instance: it already has its params and lr; pass only base=... "
                "and OSFN's subspace settings")
        bases = list(base) if isinstance(base, (list, tuple)) else [base]
        for b in bases:
            if not isinstance(b, Optimizer):
                raise ConfigError(f"base must be torch.optim.Optimizer instance(s), got {type(b).__name__}")
            if isinstance(b, OSFN):
                raise ConfigError("base is already an OSFN; wrap the first-order optimizer only once")
        if not bases:
            raise ConfigError("base=[] holds no optimizer")
        return bases

    # -------------------------------------------- the wrapped optimizer(s)
    @property
    def base(self) -> Optimizer | list[Optimizer]:
        """The wrapped optimizer (a list when there are several)."""
        return self._bases[0] if len(self._bases) == 1 else list(self._bases)

    @property
    def param_groups(self) -> list[dict]:
        bases = self.__dict__.get("_bases")
        if bases:  # the bases' own group dicts: schedulers and users write where the base reads
            return [g for b in bases for g in b.param_groups]
        return self.__dict__.setdefault("_construction_groups", [])

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.__dict__["_construction_groups"] = value

    @property
    def state(self):
        bases = self.__dict__.get("_bases")
        if not bases:
            return self.__dict__.setdefault("_construction_state", {})
        return bases[0].state if len(bases) == 1 else _MergedState(bases)

    @state.setter
    def state(self, value) -> None:
        self.__dict__["_construction_state"] = value

    def add_param_group(self, param_group: dict) -> None:
        if not self.__dict__.get("_bases"):  # Optimizer.__init__ building its bookkeeping
            return super().add_param_group(param_group)
        base = self._bases[0]
        if len(self._bases) > 1:
            raise ConfigError(
                "OSFN wraps several optimizers: call add_param_group on the one that should own the "
                "parameters (opt.base[i].add_param_group(...)), then create a new OSFN")
        if self._basis is not None:
            raise DimensionMismatchError(
                "add_param_group after the first step would change the model the basis covers; "
                "add the parameters before training starts or create a new OSFN")
        base.add_param_group(param_group)
        new = base.param_groups[-1]
        for k in OSFNConfig.subspace_field_names():
            new.setdefault(k, self.defaults[k])
        OSFNConfig.from_group(new)
        check_params(self._bases)

    def _base_step(self) -> None:
        for b in self._bases:
            b.step()

    def _check_source(self) -> None:
        if self.param_groups[0]["subspace_source"] == "innovation" and not self._reads_mean:
            names = [type(b).__name__ for b in self._bases if not reads_running_mean(b)]
            raise ConfigError(
                f"subspace_source='innovation' needs the base's gradient running mean, which OSFN cannot read "
                f"from {names} (it reads torch's Adam, AdamW, SGD and Muon); use subspace_source='momentum' "
                "(the base's measured displacements) or 'gradient'")

    # ----------------------------------------------------------- helpers
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _owners(self) -> list[tuple[Optimizer, dict]]:
        """(base, group) of each parameter of ``_params``, in order."""
        return [(b, g) for b in self._bases for g in b.param_groups for p in g["params"] if p.requires_grad]

    @property
    def subspace_dim(self) -> int:
        return self.config.subspace_dim

    def _basis_dtype(self, params) -> torch.dtype:
        device = local(params[0]).device if params else torch.device("cpu")
        if self.config.kernels == "triton" and not (triton_pass.available() and (
                device.type == "cuda" or (device.type == "cpu" and triton_pass.interpreting()))):
            why = triton_pass.why_not() or f"the parameters are on {device}"
            raise ConfigError(f"kernels='triton' runs the Triton passes on a CUDA device (or in Triton's interpreter, "
                              f"TRITON_INTERPRET=1, for tests), not here ({why}); use kernels='auto'")
        if self.config.basis_dtype == "bfloat16":
            if self.config.kernels == "triton":
                return torch.bfloat16
            if device.type != "cpu" or not native_kernels.stores(torch.bfloat16):
                why = (f"the parameters are on {device}: use kernels='triton' there" if device.type != "cpu"
                       else native_kernels.why_not() or "the bfloat16 variant did not build; see the log")
                raise ConfigError(f"basis_dtype='bfloat16' stores V for the one-pass kernels (C on the CPU, Triton "
                                  f"on a GPU), which cannot run here ({why}); or use basis_dtype='auto'")
            return torch.bfloat16
        return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    def _check_basis_dtype(self, gradient_sync, shard_basis) -> None:
        """basis_dtype='bfloat16' is for the one-pass native steps (a replicated basis or its rows
        sharded under DDP, parameter coordinates, the native kernels): refuse what would widen V
        on every step instead (shard_basis with gradient_sync is refused as gradient_sync)."""
        if self.config.basis_dtype != "bfloat16":
            return
        clash = [name for name, on in (
            ("kernels=" + repr(self.config.kernels), self.config.kernels not in ("auto", "triton")),
            ("coordinates='preconditioned'", self._preconditioned),
            ("gradient_sync", gradient_sync is not None),
            ("FSDP2 parameters", bool(self._fsdp))) if on]
        if clash:
            raise ConfigError(f"basis_dtype='bfloat16' is for a basis in parameter coordinates (replicated, or its rows "
                              f"sharded under DDP) with the "
                              f"one-pass kernels (kernels='auto' or 'triton'); not with {', '.join(clash)}. Use "
                              "basis_dtype='auto' (float32)")

    def _one_pass_kind(self):
        """``native`` of the passes over V: True (kernels='auto': the C loops on the CPU),
        "triton" (kernels='triton'), False (eager or compiled)."""
        return {"auto": True, "triton": "triton"}.get(self.param_groups[0]["kernels"], False)

    def _fold(self) -> None:
        """Apply the pending rotation to the stored basis (V ← V R, one pass over V). Until
        then, every-step rotations are composed in d × d (``lazy`` in ``_curvature_step``)."""
        if self._pending is not None:
            if self._basis is not None:
                right_multiply_(self._basis, self._pending, native=self._one_pass_kind())
            self._pending = None

    def _ensure_basis(self, params) -> torch.Tensor:
        total = sum(local(p).numel() for p in params)
        rows = self._layout.bind(total)
        if self._basis is None:
            device = local(params[0]).device if params else torch.device("cpu")
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
        for name in ("coordinates", "basis_dtype"):
            if getattr(cfg, name) != getattr(self.config, name):
                raise ConfigError(
                    f"{name} cannot change during training (was {getattr(self.config, name)!r}, "
                    f"param_groups[0] now says {getattr(cfg, name)!r}); create a new optimizer")
        hyper = {k: getattr(cfg, k) for k in LIVE_HYPERPARAMETERS if hasattr(cfg, k)}
        ref = self._reference_lr
        hyper["step_scale"] = min(1.0, float(g0["lr"]) / ref) if ref > 0 else 1.0
        return hyper

    def _pair_buffer(self, basis: torch.Tensor | None, rows: bool = False) -> torch.Tensor | None:
        """A reusable (2, D) buffer for the flat gradient and the flat subspace source, so both
        are projected in one pass over V (replicated basis only; not part of the state). It
        keeps 2·D floats between steps that used to be allocated and freed within each step
        (a caching GPU allocator keeps them reserved either way). ``rows`` (DDPRows' one-pass
        path): (2, this rank's rows) for the running means of those rows."""
        if basis is None or (self._layout.sharded and not (rows and self._layout.gradients_averaged)):
            return None
        shape = (2, basis.shape[0])
        buf = self._pair
        if buf is None or buf.shape != shape or buf.dtype != work_dtype(basis) or buf.device != basis.device:
            buf = self._pair = torch.empty(shape, dtype=work_dtype(basis), device=basis.device)
        return buf

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A reusable (D,) scratch vector shaped like ``like`` (not part of the state). A fresh
        D-sized tensor every step costs page faults on the CPU: at 10.5M parameters a fresh
        flat copy of θ took 12.9 ms against 3.7 ms into a kept buffer (bench/step_time.py)."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._scratch[name] = torch.empty_like(like)
        return buf

    def _collect_buffers(self, params, owners, has_grad, basis):
        """(θ, gradients, running means), one tensor per parameter, for the native collect
        pass; None where it does not apply: the momentum source only, every parameter with a
        gradient and a running mean, all contiguous float32 CPU tensors shaped like their
        parameters. The same answer on every rank (DDPRows' one-pass path rests on it)."""
        if self.param_groups[0]["subspace_source"] != "momentum" or not all(has_grad):
            return None
        local_params = [local(p) for p in params]
        grads = [local(p.grad) for p in params]
        means = []
        for p, (base, group) in zip(params, owners):
            buf, _ = running_mean(base, base.state.get(p, {}), group, self._steps - 1)
            if buf is None:
                return None
            means.append(local(buf))
        ok = (native_kernels.usable(basis.T, *local_params, *grads, *means) and native_kernels.params_usable(local_params)
              and all(g.shape == p.shape and m.shape == p.shape for g, m, p in zip(grads, means, local_params)))
        return (local_params, grads, means) if ok else None

    def _native_collect(self, params, owners, has_grad, basis, pair, buffers=None):
        """The collect hop in one native pass from the parameters' own gradients, running
        means and values (``core.native.collect``): the source into pair[1], θ into the
        "before" buffer; returns (the projections with their norms, that buffer). None where
        it does not apply (``_collect_buffers``, or ``buffers`` as it returned them): the
        caller then flattens and projects."""
        if buffers is None and pair is not None:
            buffers = self._collect_buffers(params, owners, has_grad, basis)
        if buffers is None or not native_kernels.usable(basis.T, pair):
            return None
        local_params, grads, means = buffers
        before = self._buffer("before", pair[1])
        layout = self._layout
        if not layout.gradients_averaged:
            return native_kernels.collect(basis.T, grads, means, local_params, pair[1], before), before
        # DDPRows: this rank's rows of each, then the partial sums added over the ranks
        both, sq = native_kernels.collect(basis.T, layout.row_views(grads), layout.row_views(means),
                                          layout.row_views(local_params), pair[1], before)
        d = both.shape[1]
        total = layout.allreduce(torch.cat([both.reshape(-1), sq]))
        return (total[: 2 * d].view(2, d), total[2 * d:]), before

    def _running_mean_source(self, params, owners, has_grad, dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The subspace source read from the base's state before it steps (m_{t−1}).

        ``momentum``: the base's gradient running mean (AdamW exp_avg, the momentum buffer),
        a noise-averaged gradient at no extra memory. ``innovation``: the gradient minus that
        running mean: ≈ H (θ − θ̄) plus noise, a curvature-weighted signal that gradient PCA
        lacks (core.basis_rule.explore_update). None where the base keeps no running mean
        (yet): then the gradient, or for a base OSFN cannot read, its measured displacement."""
        kind = self.param_groups[0]["subspace_source"]
        if kind == "gradient" or not self._reads_mean:
            return None
        parts = []
        for p, (base, group), ok in zip(params, owners, has_grad):
            buf, scale = running_mean(base, base.state.get(p, {}), group, self._steps - 1)
            if buf is None:
                if ok:
                    return None
                buf, scale = torch.zeros_like(local(p)), 1.0
            flat = local(buf).reshape(-1).to(dtype)
            if kind == "innovation":
                grad = local(p.grad) if ok else torch.zeros_like(local(p))
                flat = grad.reshape(-1).to(dtype) - scale * flat
            parts.append(flat)
        return torch.cat(parts, out=out)

    def _preconditioner(self, params, owners, dtype) -> torch.Tensor | None:
        """σ (D,) with z = θ / σ the base's preconditioned coordinates (coordinates=
        'preconditioned'), from its second moments before it steps; None until every moving
        parameter has them (the first step), and for coordinates='parameters'."""
        if not self._preconditioned:
            return None
        parts = []
        for p, (base, group) in zip(params, owners):
            scale = preconditioner_scale(base.state.get(p, {}), group)
            if scale is None:
                return None
            parts.append(local(scale).reshape(-1).to(dtype))
        return torch.cat(parts)

    def _displacement_is_source(self) -> bool:
        return self.param_groups[0]["subspace_source"] != "gradient" and not self._reads_mean

    # ------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups[1:]:
            OSFNConfig.from_group(group)
        self._check_source()
        hyper = self._live_hyper()
        params = self._params()
        presynced, self._presynced = self._presynced, None
        synced = self._sync(params) if presynced is None else presynced[0]
        has_grad, curvature_step, grad, worker_coords = synced
        if not any(has_grad):
            return loss
        if presynced is not None and grad is not None:
            # sync_gradients() ran before unscale/clip: the base steps on p.grad as it is now
            # (a uniform rescaling of what was averaged); take the flat gradient and the
            # workers' projections along with it
            synced_norm = presynced[1]
            grad = flat_gradient(params, grad.dtype, out=grad)
            if worker_coords is not None and synced_norm > 0:
                worker_coords = worker_coords * (float(torch.linalg.vector_norm(grad)) / synced_norm)
        # a curvature step on a replicated basis checks ‖g‖², which its collect pass computes
        # anyway, before anything moves (no separate read of the gradients)
        deferred = curvature_step and self._layout is REPLICATED
        if not deferred and not self._gradients_finite(params, has_grad):
            self._reject_nonfinite()
            return loss
        self._steps += 1
        if self.subspace_dim == 0:
            self._base_only_step()
        elif not curvature_step:
            self._complement_only_step(params)
        else:
            self._curvature_step(params, has_grad, hyper, grad, worker_coords, check_finite=deferred)
        return loss

    def _gradients_finite(self, params, has_grad) -> bool:
        return self._layout.all_true(_all_finite([local(p.grad) for p, ok in zip(params, has_grad) if ok]))

    def _skipped_late(self, params, has_grad, grad_sqnorm: float) -> bool:
        """The deferred finiteness check of a curvature step, before anything has moved: a
        finite ‖g‖² passes (NaN: not known yet), else the per-tensor check decides (finite
        values may overflow the norm). A step found non-finite is taken back and skipped."""
        if math.isfinite(grad_sqnorm) or self._gradients_finite(params, has_grad):
            return False
        self._steps -= 1
        self._reject_nonfinite()
        return True

    def _reject_nonfinite(self) -> None:
        """Count a step skipped for non-finite gradients (nothing has moved), or raise."""
        self._skipped += 1
        self._last = {**self._last, "skipped_steps": self._skipped}
        if self.param_groups[0]["nonfinite"] == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient at step {self._steps + 1}; parameters and statistics are "
                "untouched. Lower the learning rate or use nonfinite='skip'"
            )

    def sync_gradients(self) -> None:
        """Average the gradients across workers now (``gradient_sync`` only; a no-op
        otherwise), so that what runs between backward and ``step()`` sees the same gradients
        on every rank. The order for AMP and clipping::

            scaler.scale(loss).backward()
            opt.sync_gradients()              # all-reduce: every rank holds the same ḡ
            scaler.unscale_(opt)              # found_inf is now the same on every rank
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # the global norm
            scaler.step(opt); scaler.update()

        ``step()`` then skips its own all-reduce. Without this call ``step()`` averages
        itself, which is right when nothing inspects or rescales the gradients before it; with
        GradScaler it is not (an overflow on one rank would make only that rank skip)."""
        if self.gradient_sync is None:
            return
        synced = self._sync(self._params())
        grad = synced[2]
        # (has_grad, curvature_step, grad, worker_coords) and ‖ḡ‖ as averaged, for step()
        self._presynced = (synced, None if grad is None else float(torch.linalg.vector_norm(grad)))

    def watch_ddp(self, ddp_model) -> "OSFN":
        """Give the curvature service every worker's own projection under DDP (the
        per-direction gradient-noise estimate that ``noise_damping`` uses), through a DDP
        communication hook that projects each bucket's local gradient before its all-reduce
        (``dataflow.distributed.DDPProjections``; replaces DDP's default hook). Returns self."""
        from .dataflow.distributed import DDPProjections

        if self.gradient_sync is not None or self._layout.sharded:
            raise ConfigError("watch_ddp is for DDP; OSFN's own gradient_sync already gathers the projections")
        if self.config.basis_dtype == "bfloat16":
            raise ConfigError("watch_ddp projects in a torch hook, which needs basis_dtype='auto' (float32)")
        params = self._params()
        rows = {id(p): r for p, (_, r) in zip(params, param_slices(params))}
        # the stored V (not opt.basis, which would apply a pending rotation R in backward):
        # _sync maps what the hook projected by R, as build_report maps the step's own projections
        self._ddp_projections = DDPProjections(ddp_model, lambda p: rows[id(p)], lambda: self._basis, self.subspace_dim)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._presynced = None
        super().zero_grad(set_to_none=set_to_none)

    def _sync(self, params):
        """(has_grad, curvature_step, flat averaged gradient or None, workers' projections or None)."""
        has_grad = [p.grad is not None for p in params]
        # gradient_sync, or DDPRows' replica checker (the ranks move only their own rows)
        replicas = self.gradient_sync if self.gradient_sync is not None else self._replicas
        if replicas is not None:
            replicas.check_replicas(params, self._steps + 1)
            # every decision below must be common to all ranks: a parameter with a gradient on
            # some rank has one (zeros) everywhere, so replicas move alike and none returns
            # early while the others wait in a collective
            has_grad = replicas.any_rank(has_grad)
            for p, ok in zip(params, has_grad):
                if ok and p.grad is None:
                    p.grad = torch.zeros_like(p)
        for i, (p, ok) in enumerate(zip(params, has_grad)):
            if ok and p.grad.is_sparse:
                raise ConfigError(
                    f"parameter {i} (shape {tuple(p.shape)}) has a sparse gradient; OSFN needs dense "
                    "gradients (nn.Embedding(sparse=False)) or leave that parameter to a separate optimizer")
        # curvature_every = k: the subspace machinery runs on steps 1, k+1, 2k+1, ...; in
        # between only the base steps; the drift θ − anchor reaches the service with the next report
        every = int(self.param_groups[0]["curvature_every"])
        curvature_step = self.subspace_dim > 0 and (every == 1 or self._steps % every == 0)
        if not any(has_grad):
            return has_grad, curvature_step, None, None
        grad, worker_coords = self._sync_gradients(params, has_grad, curvature_step)
        if self._ddp_projections is not None:  # gathered every step, so the hook's sums never mix steps
            worker_coords = self._ddp_projections.gather()
            if worker_coords is not None and self._pending is not None:  # rows (V R)ᵀ g_r = Rᵀ Vᵀ g_r
                worker_coords = worker_coords @ self._pending.detach().to("cpu", torch.float64)
            if not curvature_step:
                worker_coords = None
        return has_grad, curvature_step, grad, worker_coords

    def _sync_gradients(self, params, has_grad, curvature_step):
        """Data parallel without DDP: average the gradients across workers (before the
        finiteness check, so every rank decides alike). Returns the flat averaged gradient
        (None when not synced here) and every worker's own projection (or None)."""
        if self.gradient_sync is None:
            return None, None
        basis = self._ensure_basis(params) if self.subspace_dim else None
        pair = self._pair_buffer(basis)
        grad = flat_gradient(params, work_dtype(basis) if basis is not None else torch.float32,
                             out=None if pair is None else pair[0])
        worker_coords = None
        if basis is not None and self._layout.sharded:
            worker_coords = self._layout.sync_gradient(grad, basis)  # also averages grad
        else:
            if basis is not None and curvature_step:
                worker_coords = self.gradient_sync.gather_coords(basis.T @ grad)
            self.gradient_sync.average(grad)
        write_back(params, grad, has_grad)  # the base acts on the averaged gradient
        return grad, worker_coords

    def _base_only_step(self) -> None:
        """No subspace: exactly the base optimizer."""
        self._base_step()
        self._last = {"skipped_steps": self._skipped, "step": self._steps}

    def _complement_only_step(self, params) -> None:
        """Between exchanges (curvature_every > 1): the base alone; its drift is reported next time."""
        basis = self._ensure_basis(params)
        if self._anchor is None:
            self._anchor = _flat(params, work_dtype(basis))
        self._base_step()
        self._last = {**self._last, "step": self._steps, "subspace_step_norm": 0.0, "skipped_steps": self._skipped}

    def _curvature_step(self, params, has_grad, hyper, grad, worker_coords, check_finite: bool = False) -> None:
        basis = self._ensure_basis(params)
        layout = self._layout
        # a parameter without a gradient, or in a group with lr = 0, is frozen: neither the
        # base nor the shared subspace moves it, and the reported position knows it
        owners = self._owners()
        moves = [ok and float(group["lr"]) > 0 for ok, (_, group) in zip(has_grad, owners)]
        measure = not all(moves) or any(p.dtype in LOW_PRECISION for p in params)
        # exact residual norms matter only while directions are being filled
        exact = self._last.get("alive_directions", 0) < self.subspace_dim
        # lazy: this step's rotation is composed into the pending d × d R instead of V (the
        # basis is V R); only on the one-pass path (replicated, π = 1, full directions) and
        # where nothing else reads V between steps (no gradient_sync; the DDP hook's
        # projections are mapped by R in _sync)
        compiled = self.param_groups[0]["kernels"] == "compiled"
        native = self._one_pass_kind()
        lazy = (not exact and not measure and not compiled and self.gradient_sync is None
                and float(hyper["complement_in_subspace"]) == 1.0)
        buffers = None  # DDPRows: the native one-pass path on this rank's rows, or the torch path
        if layout.gradients_averaged:
            if lazy and native is True and self._anchor is None:
                buffers = self._collect_buffers(params, owners, has_grad, basis)
            lazy = buffers is not None
        elif layout.sharded:
            lazy = False
        if basis.dtype == torch.bfloat16 and not (lazy and _one_pass_covers(native, basis, params)):
            return self._widened_step(params, has_grad, hyper, grad, worker_coords, check_finite)
        if not lazy:
            self._fold()
        # coordinates='preconditioned': everything the subspace sees is in z = θ / σ
        # (gradients and sources × σ, positions and displacements ÷ σ, the move × σ)
        sigma = self._preconditioner(params, owners, work_dtype(basis))
        if self._preconditioned and sigma is None:  # Adam has no second moments yet
            if not (check_finite and self._skipped_late(params, has_grad, float("nan"))):
                self._complement_only_step(params)
            return
        with _phase("osfn.collect"):  # flatten, project g and the source in one pass over V
            pair = self._pair_buffer(basis, rows=lazy)
            from_displacement = self._displacement_is_source()
            projected = None  # one native pass from the parameters' own buffers, where it applies
            if grad is None and lazy and native is True and sigma is None and not from_displacement:
                projected = self._native_collect(params, owners, has_grad, basis, pair, buffers)
            if projected is not None:  # the source went to pair[1], θ to the "before" buffer
                projected, before = projected
                source, in_pair = pair[1], False
            else:
                if grad is None:
                    grad = flat_gradient(params, work_dtype(basis), out=None if pair is None else pair[0])
                if from_displacement:
                    source, in_pair = self._prev_disp, False  # the base's last measured step (None at first)
                else:
                    source = self._running_mean_source(params, owners, has_grad, work_dtype(basis),
                                                       out=None if pair is None else pair[1])
                    in_pair = source is not None and pair is not None
                if sigma is not None:
                    grad.mul_(sigma)  # both are this step's own flat copies
                    if source is not None:
                        source.mul_(sigma)
                # θ before the base steps; kept past this step only as the displacement source
                before = _flat(params, work_dtype(basis), out=None if from_displacement else self._buffer("before", grad))
            drift = None if self._anchor is None else before - self._anchor
            if drift is not None and sigma is not None:
                drift.div_(sigma)
            report, coords, residual = build_report(
                basis, grad, self._steps, self._basis_version, self._residual_step_dot, hyper, worker_coords,
                source=source, prev_step_coords=self._prev_step_coords,
                drift=drift, layout=layout, exact_residual=exact,
                settings={k: getattr(self.config, k) for k in FIXED_SETTINGS}, pair=pair if in_pair else None,
                coords_map=self._pending, native=native, projected=projected,
            )
        # ‖g‖² is finite iff every gradient is, unless finite values overflowed it (then the
        # exact check decides); skipped here, nothing of the state has changed yet
        if check_finite and self._skipped_late(params, has_grad, report.grad_sqnorm):
            return
        # exchange (before anything moves: a refused or lost update leaves θ and the base untouched)
        with _phase("osfn.exchange"):
            update = self.exchange.exchange(report)
            check_version(update, self._basis_version)
        self._anchor = None
        keep = float(update.complement_keep)
        with _phase("osfn.base_step"):  # the base's own step, measured: p = θ_before − θ_after
            if keep < 1.0:  # the Newton step owns (1 − π) of the subspace: the base sees the rest
                rest = grad - layout.expand(basis, (1.0 - keep) * coords)
                write_back(params, rest if sigma is None else rest.div_(sigma), has_grad)
            self._base_step()
            # the native pass can measure p = θ_before − θ and add the move into the parameters
            # itself (no flat displacement, move or scatter): the lazy path in θ coordinates
            local_params = [local(p) for p in params]
            if layout.gradients_averaged and lazy:  # DDPRows: this rank moves its rows of θ
                local_params = layout.row_views(local_params)
            into = (lazy and keep == 1.0 and sigma is None and not from_displacement and native is True
                    and native_kernels.params_usable(local_params) and native_kernels.usable(basis.T, before, source))
            if into:
                disp = disp_z = None
            else:
                disp = _subtract_params_(before.clone() if measure else before, params)
                disp_z = disp if sigma is None else disp / sigma
        with _phase("osfn.newton_move"):
            source = grad if source is None else source
            # a = Vᵀu as reported (on the host): the fused hop moves it where it is needed
            source_coords = coords if report.source_coords is None else report.source_coords
            fused = residual is None and keep == 1.0 and not measure and not compiled
            if not fused:
                source_coords = source_coords.to(basis.device, work_dtype(basis))
            if into:  # p, the move into θ, Vᵀp, rᵀΔθ and V ← V + r cᵀ: one read and one write of V and θ
                _, step_coords, self._residual_step_dot, self._basis, self._pending, sq_norms = move_and_update(
                    basis, None, update.step_coef, update, source, source_coords, pending=self._pending, lazy=lazy,
                    native=True, into=(before, local_params), layout=layout)
                self._prev_step_coords = step_coords
                if layout.gradients_averaged:
                    layout.share_rows_(params)
            elif fused:  # the move, Vᵀp, rᵀΔθ and V ← V A + r cᵀ in one read and one write of V
                move, step_coords, self._residual_step_dot, self._basis, self._pending, sq_norms = move_and_update(
                    basis, disp_z, update.step_coef, update, source, source_coords, pending=self._pending, lazy=lazy,
                    native=native, out=self._buffer("move", disp_z))
            else:  # Vᵀp, then V·coef and the residual in one pass
                sq_norms = None
                self._fold()  # (a no-op: only the fused path leaves a rotation pending)
                move, step_coords, residual = newton_move(
                    basis, disp_z, residual, update.step_coef, keep, layout,
                    source=source, source_coords=source_coords, compiled=compiled)
            applied = None if into else self._apply_move(params, basis, moves, move, disp, disp_z, before, sigma,
                                                         measure, fused, from_displacement, step_coords, residual)
        if not fused:
            with _phase("osfn.basis_update"):  # V ← V A + r cᵀ, re-orthonormalised on a cadence
                self._basis = update_basis(basis, residual, update, layout)
        self._basis_version = update.new_version
        if sq_norms is not None and sigma is None:  # ‖p‖² and ‖Δθ‖², summed in the one pass over V
            norms = sq_norms.clamp_min(0).sqrt()  # stays on the device until ``diagnostics`` asks
        else:
            norms = torch.stack([torch.linalg.vector_norm(disp), torch.linalg.vector_norm(applied)])
        self._last = {
            **update.diagnostics,
            "_step_norms": norms,
            "skipped_steps": self._skipped,
        }

    def _widened_step(self, params, has_grad, hyper, grad, worker_coords, check_finite) -> None:
        """A step of a bfloat16 basis that the one-pass native path does not cover (the
        directions still filling, frozen or low-precision parameters, π < 1): V widened to
        float32 for the step, then rounded back (to nearest). Costs a float32 copy of V for the step."""
        self._fold()
        stored = self._basis
        self._basis = stored.float()  # direction-major kept (preserve_format)
        try:
            self._curvature_step(params, has_grad, hyper, grad, worker_coords, check_finite)
            self._fold()
            self._basis = self._basis.to(torch.bfloat16)
        except BaseException:
            self._basis, self._pending = stored, None  # V as stored (folded above), no rotation pending
            raise

    def _apply_move(self, params, basis, moves, move, disp, disp_z, before, sigma, measure, fused,
                    from_displacement, step_coords, residual) -> torch.Tensor:
        """θ ← θ + move for the paths that form the move as a flat vector, and what the next
        report needs of the whole step Δθ (its coordinates, rᵀΔθ). Returns Δθ."""
        layout = self._layout
        if from_displacement:
            self._prev_disp = disp if not measure else disp.clone()
        # the z-space move for rᵀΔθ below (two-pass path; measured steps re-derive it)
        move_z = move.clone() if sigma is not None and not fused and not measure else None
        if sigma is not None:
            move.mul_(sigma)
        if measure:
            _zero_frozen_(move, params, moves)
        scatter_add(params, move, moves)
        if measure:  # what actually happened: frozen rows and low-precision rounding included
            applied = _subtract_params_(before, params).neg_()
            step_coords = layout.project(basis, applied if sigma is None else applied / sigma)
        else:
            applied = move.sub_(disp)
        self._prev_step_coords = step_coords
        if not fused:
            if sigma is not None:  # the step in z, which the residual's dot product needs
                applied_z = applied / sigma if measure else move_z.sub_(disp_z)
            self._residual_step_dot = layout.dot(residual, layout.rows(applied if sigma is None else applied_z))
        return applied

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
        norms = out.pop("_step_norms", None)
        if norms is not None:  # [‖p‖, ‖Δθ‖] of the last curvature step, read here (one host copy)
            out["complement_step_norm"], out["step_norm"] = norms.tolist()
        return out

    @property
    def basis(self) -> torch.Tensor | None:
        """The basis V R (D, d): the stored V itself, or a new tensor when a rotation R is
        pending. Reading it changes nothing: a fold on one rank only (metrics, a checkpoint
        written by rank 0) would round that replica's V differently from the others'."""
        if self._basis is None or self._pending is None:
            return self._basis
        folded = self._basis.clone()  # direction-major kept
        right_multiply_(folded, self._pending, native=self._one_pass_kind())
        return folded

    @property
    def basis_bytes(self) -> int:
        """Memory of the stored basis V (what OSFN adds over its base, with its d-sized state)."""
        return 0 if self._basis is None else self._basis.numel() * self._basis.element_size()

    # ------------------------------------------------------- persistence
    def state_dict(self):
        """``{"bases": [each base's own state_dict], "osfn": the subspace's state}``. The
        basis is saved as stored, V and the d × d rotation R still pending on it (the basis is
        V R; ``basis_rotation`` None: R = I), so that saving changes nothing and a resumed run
        repeats the uninterrupted one bit for bit."""
        sd = {"bases": [b.state_dict() for b in self._bases]}
        worker = {
            "version": WORKER_STATE_VERSION,
            "basis": None if self._basis is None else self._basis.clone(),
            "basis_rotation": None if self._pending is None else self._pending.clone(),
            "basis_version": self._basis_version,
            "residual_step_dot": float(self._residual_step_dot),
            "prev_step_coords": self._prev_step_coords,
            "anchor": None if self._anchor is None else self._anchor.clone(),
            "steps": self._steps,
            "skipped": self._skipped,
            "prev_displacement": None if self._prev_disp is None else self._prev_disp.clone(),
            "reference_lr": self._reference_lr,
            "subspace_dim": self.subspace_dim,
            "basis_layout": self._layout.describe(),
            # decides exact residual norms on the next step (see step()); a resume must agree
            "alive_directions": self._last.get("alive_directions", 0),
        }
        if isinstance(self._layout, LocalShards):
            worker.update(self._fsdp_rows())
        if self._owns_service and self._pipelined:
            # drain first: the update in flight is kept (applied first after a resume) and the
            # service is read only once nothing is computing on it
            worker["pipeline"] = self.exchange.state_dict()
            worker["service"] = self.exchange.inner.state_dict()
        elif self._owns_service:
            worker["service"] = self.exchange.state_dict()
        sd["osfn"] = worker
        return sd

    def _fsdp_rows(self) -> dict:
        """Under FSDP2 the D-sized parts (V, the anchor, the last displacement) as DTensors
        shaped and placed like their parameters, always present (zeros and a flag where
        unset) so a fresh optimizer's state_dict is a template torch.distributed.checkpoint
        can load into — across world sizes, since DCP reshards DTensors."""
        params = self._params()
        basis = self._ensure_basis(params)
        rows = {"basis": self._layout.to_global(basis, params, (self.subspace_dim,)),
                "basis_layout": {"kind": "fsdp"}}
        for key, value in (("anchor", self._anchor), ("prev_displacement", self._prev_disp)):
            flat = value if value is not None else basis.new_zeros(basis.shape[0])
            rows[key] = self._layout.to_global(flat, params)
            rows[f"has_{key}"] = value is not None
        return rows

    def _load_fsdp_rows(self, worker: dict, saved_layout: dict) -> dict:
        if not isinstance(self._layout, LocalShards) or saved_layout.get("kind") != "fsdp":
            raise DimensionMismatchError(
                f"checkpoint basis layout {saved_layout} does not match this optimizer's "
                f"{self._layout.describe()}: an FSDP2 checkpoint loads into an FSDP2-sharded model, and only there")
        params = self._params()
        self._layout.bind(sum(local(p).numel() for p in params))
        worker = dict(worker)
        worker["basis"] = self._layout.from_global(worker["basis"], params, (self.subspace_dim,))
        for key in ("anchor", "prev_displacement"):
            worker[key] = self._layout.from_global(worker[key], params) if worker[f"has_{key}"] else None
        return worker

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        worker = state_dict.pop("osfn", None)
        bases = state_dict.get("bases")
        if bases is None or worker is None or worker.get("version") != WORKER_STATE_VERSION:
            raise DimensionMismatchError(
                f"not an OSFN state_dict of version {WORKER_STATE_VERSION} (keys {sorted(state_dict)}, version "
                f"{None if worker is None else worker.get('version')}); version 1 checkpoints held OSFN's own "
                "complement state and cannot be loaded into the wrapping OSFN: restart from the model weights")
        if len(bases) != len(self._bases):
            raise DimensionMismatchError(
                f"checkpoint holds {len(bases)} base optimizer state(s), this OSFN wraps {len(self._bases)}")
        if self._owns_service and not self._pipelined and (worker.get("pipeline") or {}).get("pending_update"):
            # (checked before anything is loaded: a refused checkpoint changes nothing)
            raise ConfigError(
                "this checkpoint was written by OSFN(..., pipelined=True) with an update in flight; "
                "load it into an OSFN built with pipelined=True")
        for base, sd in zip(self._bases, bases):
            base.load_state_dict(sd)
        if worker["subspace_dim"] != self.subspace_dim:
            raise DimensionMismatchError(
                f"checkpoint has subspace_dim={worker['subspace_dim']}, this optimizer {self.subspace_dim}"
            )
        basis = worker["basis"]
        saved_layout = worker.get("basis_layout", {"kind": "replicated"})
        if saved_layout.get("kind") == "fsdp" or isinstance(self._layout, LocalShards):
            # rows come per parameter (any world size through DCP), checked by shape there
            worker = self._load_fsdp_rows(worker, saved_layout)
            basis = worker["basis"]
        elif basis is not None:
            self._layout.bind(sum(local(p).numel() for p in self._params()))
            if saved_layout != self._layout.describe():
                raise DimensionMismatchError(
                    f"checkpoint basis layout {saved_layout} does not match this optimizer's "
                    f"{self._layout.describe()}; resume with the same number of workers and shard_basis setting"
                )
        if basis is not None:
            device = self._params()[0].device
            self._basis = None
            # shape check against the current model; V is stored as this optimizer's
            # basis_dtype says (a bfloat16 checkpoint widens to float32, and back to nearest)
            dtype = self._ensure_basis(self._params()).dtype
            basis = as_basis_layout(basis.clone().to(device=device, dtype=dtype))
        rotation = worker.get("basis_rotation")  # (absent in checkpoints written before it)
        self._basis = basis
        self._pending = None if rotation is None or basis is None else rotation.clone().to("cpu")  # R lives on the host
        self._basis_version = worker["basis_version"]
        self._residual_step_dot = worker["residual_step_dot"]
        prev = worker.get("prev_step_coords")
        self._prev_step_coords = None if prev is None else prev.clone().to(basis.device if basis is not None else "cpu")
        anchor = worker.get("anchor")
        self._anchor = None if anchor is None else anchor.clone().to(basis.device if basis is not None else "cpu")
        self._steps = worker["steps"]
        self._skipped = worker["skipped"]
        prev_disp = worker["prev_displacement"]
        self._prev_disp = None if prev_disp is None else prev_disp.clone().to(self._params()[0].device)
        self._reference_lr = float(worker["reference_lr"])
        if "alive_directions" in worker:
            self._last = {**self._last, "alive_directions": worker["alive_directions"]}
        if self._owns_service and self._pipelined:
            self.exchange.drain()  # nothing may be computing on the service while it is replaced
            if "service" in worker:
                self.exchange.inner.load_state_dict(worker["service"])
            self.exchange.load_state_dict(worker.get("pipeline", {}))
        elif self._owns_service and "service" in worker:
            self.exchange.load_state_dict(worker["service"])
