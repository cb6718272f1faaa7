"""The training job's configuration: YAML file and command-line flags, one dataclass."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..core.config import OSFNConfig
from ..core.errors import ConfigError

OPTIMIZER_NAMES = ("osfn", "adamw", "sgd")
# how OSFN's Ray Train workers are data parallel (osfn_dist.recipes.ray_train_loop.parallelize)
PARALLEL = ("ddp", "fsdp2", "gradient_sync")


def check_parallel(parallel: str | None, shard_basis: bool) -> None:
    """A sharded basis by rows exists under DDP (DDPRows) and on OSFN's own GradientSync path;
    FSDP2 shards V with the parameters already."""
    if shard_basis and parallel not in (None, "ddp", "gradient_sync"):
        raise ConfigError(f"shard_basis needs parallel='ddp' or 'gradient_sync' (this run has {parallel!r}); "
                          "parallel='fsdp2' shards V with the parameters instead")


def default_backend() -> str:
    """Ray Train when ray is installed (the ``ray`` extra), else one process."""
    import importlib.util

    return "ray" if importlib.util.find_spec("ray") is not None else "local"


def _plain(value):
    """YAML-safe: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def resolved_optimizer(spec: dict) -> dict:
    """Every hyperparameter the optimizer ran with, defaults included: OSFN's full config, or
    the torch optimizer's constructor defaults (a run directory reproduces the run)."""
    import inspect

    spec = dict(spec)
    name = spec.pop("name", "osfn")
    if name == "osfn":
        values = OSFNConfig(**{k: (tuple(v) if k == "betas" else v) for k, v in spec.items()}).as_dict()
    else:
        import torch

        cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
        params = inspect.signature(cls.__init__).parameters
        values = {k: p.default for k, p in params.items()
                  if k not in ("self", "params") and p.default is not inspect.Parameter.empty}
        values.update(spec)
    return {"name": name, **{k: _plain(v) for k, v in values.items()}}


def resolved_config(cfg: "TrainConfig", **resolved) -> dict:
    """The config a run actually used (config.yaml): flags, file, workload defaults and every
    optimizer hyperparameter; fed back with --config it reproduces the run."""
    return {**cfg.as_dict(), **resolved, "optimizer": resolved_optimizer(cfg.optimizer)}


@dataclass
class TrainConfig:
    workload: str = "mnist1d_mlp"
    steps: int | None = None  # None: the workload's default
    batch_size: int | None = None  # global batch; None: the workload's default
    seed: int = 0
    log_every: int = 10
    run_dir: str | None = None
    backend: str = field(default_factory=default_backend)  # "ray" (Ray Train) or "local" (one process)
    num_workers: int = 2
    address: str | None = None  # join this Ray cluster; None: RAY_ADDRESS, else start Ray in-process
    use_gpu: bool = False
    checkpoint_every: int = 100
    metrics_port: int | None = None
    # --- Ray runs only ---
    staleness: int = 0  # 1: pipeline the curvature round trip behind the next forward/backward
    shard_basis: bool = False  # each worker keeps the basis rows of its parameter slice (ZeRO-style)
    # how OSFN's workers are data parallel: "ddp" (DDP averages overlapped with backward),
    # "fsdp2" (fully_shard: parameters and V sharded), "gradient_sync" (OSFN's own all-reduce
    # after backward; gathers every worker's projection). shard_basis works with ddp and
    # gradient_sync. None: ddp
    parallel: str | None = None
    # parallel="ddp": every worker's own projection reaches the service (the noise estimate
    # from the spread between workers; costs a DDP hook and one all-gather per step)
    worker_noise: bool = False
    resume_from: str | None = None  # a checkpoint directory, or a run directory (its latest checkpoint)
    storage_path: str | None = None  # checkpoints (shared storage on multi-node clusters); default <run_dir>/ray
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker-group restarts from the last checkpoint (Ray Train FailureConfig)
    actor_timeout_s: float = 120.0  # longest wait for the curvature actor before a clear error
    actor_max_restarts: int = 3
    optimizer: dict = field(default_factory=lambda: {"name": "osfn"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name, valid):
            raise ConfigError(f"invalid train config {name}={getattr(self, name)!r}: must be {valid}")

        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            bad("steps", "an int >= 1")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            bad("batch_size", "an int >= 1")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            bad("log_every", "an int >= 1")
        if self.backend not in ("local", "ray"):
            bad("backend", "'local' or 'ray'")
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            bad("num_workers", "an int >= 1")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            bad("checkpoint_every", "an int >= 1")
        if self.staleness not in (0, 1) or isinstance(self.staleness, bool):
            bad("staleness", "0 (exact) or 1 (pipelined, one step stale)")
        if not isinstance(self.shard_basis, bool):
            bad("shard_basis", "true or false")
        if self.parallel is not None and self.parallel not in PARALLEL:
            bad("parallel", f"one of {PARALLEL} (or unset)")
        check_parallel(self.parallel, self.shard_basis)
        if not isinstance(self.worker_noise, bool):
            bad("worker_noise", "true or false")
        if self.worker_noise and self.parallel_mode() != "ddp":
            raise ConfigError(f"worker_noise is for parallel='ddp' (this run has {self.parallel_mode()!r}): "
                              "gradient_sync gathers every worker's projection anyway, FSDP2 has no such hook")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            bad("keep_checkpoints", "an int >= 1")
        for name in ("max_failures", "actor_max_restarts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < -1:
                bad(name, "an int >= 0 (or -1: unlimited)")
        if not isinstance(self.actor_timeout_s, (int, float)) or not self.actor_timeout_s > 0:
            bad("actor_timeout_s", "a number of seconds > 0")
        if not isinstance(self.optimizer, dict):
            bad("optimizer", "a mapping with 'name' and hyperparameters")
        name = self.optimizer.get("name", "osfn")
        if name not in OPTIMIZER_NAMES:
            raise ConfigError(f"invalid train config optimizer.name={name!r}: must be one of {OPTIMIZER_NAMES}")
        if name == "osfn":
            self.osfn_config()  # raises ConfigError naming the field

    def parallel_mode(self) -> str:
        return self.parallel or "ddp"

    def optimizer_kwargs(self) -> dict:
        return {k: (tuple(v) if k == "betas" else v) for k, v in self.optimizer.items() if k != "name"}

    def osfn_config(self) -> OSFNConfig:
        kwargs = self.optimizer_kwargs()
        unknown = set(kwargs) - set(OSFNConfig.field_names())
        if unknown:
            raise ConfigError(f"unknown optimizer hyperparameter(s) {sorted(unknown)}; valid: {', '.join(OSFNConfig.field_names())}")
        return OSFNConfig(**kwargs)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        import yaml

        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config file {str(p)!r} is not valid YAML ({problem} at{where or ' an unknown place'}); fix it or run without --config") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of train settings")
        return cls.from_dict({**data, **(overrides or {})})

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown train config key(s) {sorted(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**data)
