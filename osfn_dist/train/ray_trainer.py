"""``osfn-dist train`` on Ray Train: the driver.

It resolves the config, writes the run directory (config.yaml, metrics.jsonl, summary.json,
loss.png, curvature.png, checkpoint.pt — as the single-process run — plus per-worker throughput and the
actor traffic), connects to Ray (``--address``/``RAY_ADDRESS``, else an in-process local
Ray), starts the curvature actor and a run-log actor (both ``num_cpus=0``, owned by this
driver and killed at the end), runs a ``TorchTrainer`` with ``ray_worker.train_loop_per_worker``
and draws the progress bar from what rank 0 logs.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from ..core.errors import ConfigError
from ..workloads import get_workload
from .config import TrainConfig, resolved_config
from .local import progress
from .rundir import RunDir, default_run_dir

# Ray Train blocks ray.train.report() for about one health-check interval (2 s by default).
RAY_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_USAGE_STATS_ENABLED": "0"}


def _connect(cfg: TrainConfig, verbose: bool = False) -> bool:
    """Connect to Ray; returns True when this call started a local Ray (to shut it down).
    Unless ``verbose``, Ray's own INFO lines (start-up, per-report lines from the workers)
    stay out of the terminal: the progress bar and the summary are what a person reads, and a
    failing worker's traceback still reaches the driver with the error."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ.get(k, v) for k, v in RAY_ENV_DEFAULTS.items()}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # inside `ray job submit` the job's runtime env applies; ray.init() without num_cpus
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.WARNING)
        return False
    for k, v in env.items():  # the local raylet (and so the Train controller) inherits these
        os.environ.setdefault(k, v)
    # The dashboard (when ray[default] is installed; next free port if 8265 is taken) serves
    # the state API that Ray Train's placement-group cleaner polls.
    ray.init(num_cpus=max(cfg.num_workers, 1), log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING)
    return True


def _resolve(cfg: TrainConfig):
    workload = get_workload(cfg.workload, seed=cfg.seed)
    steps = cfg.steps or workload.default_steps
    batch = cfg.batch_size or workload.batch_size
    if batch < cfg.num_workers:
        raise ConfigError(f"batch_size={batch} is smaller than num_workers={cfg.num_workers}; every worker needs samples")
    return workload, steps, batch


def train_ray(cfg: TrainConfig, show_progress: bool = True, *, step_hook=None, verbose: bool = False) -> dict:
    """Train ``cfg.workload`` with ``cfg.num_workers`` Ray Train workers; returns the summary
    (also written to ``summary.json``). ``step_hook``: a picklable callable run on every
    worker after each optimizer step as ``step_hook(step, rank, actor)`` (probes, drills;
    the tests kill workers and the actor through it)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..actor.curvature_actor import DEFAULT_NAMESPACE, create_curvature_actor, release_curvature_actor
    from .ray_checkpoint import find_checkpoint
    from .ray_runlog import Poller, start_run_log
    from .ray_worker import train_loop_per_worker

    workload, steps, batch = _resolve(cfg)
    is_osfn = cfg.optimizer.get("name", "osfn") == "osfn"
    resume = find_checkpoint(cfg.resume_from) if cfg.resume_from else None
    run = RunDir(cfg.run_dir or default_run_dir(workload.name))
    run_name = f"{run.path.name}-{uuid.uuid4().hex[:6]}"
    storage = cfg.storage_path or str((run.path / "ray").resolve())
    run.write_config(resolved_config(cfg, backend="ray", parallel=cfg.parallel_mode(), steps=steps, batch_size=batch, run_dir=str(run.path),
                                     storage_path=storage, resume_from=str(resume) if resume else None))

    started = _connect(cfg, verbose)
    actor = runlog = None
    bar = poller = None
    try:
        runlog = start_run_log()
        if is_osfn:
            actor = create_curvature_actor(
                cfg.osfn_config(), name=f"osfn-curvature-{run_name}", namespace=DEFAULT_NAMESPACE,
                allow_stale=cfg.staleness > 0, max_restarts=cfg.actor_max_restarts,
            )
        failure = FailureConfig(max_failures=cfg.max_failures, **({"controller_failure_limit": 0} if started else {}))
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "train": {**cfg.as_dict(), "backend": "ray"},
                "steps": steps, "batch_size": batch, "run_name": run_name,
                "runlog": runlog, "actor": actor, "step_hook": step_hook,
                # Ray Train 2 dropped resume_from_checkpoint: a run's first attempt starts from
                # this directory (it must be readable by the workers: same node or shared storage)
                "resume_from": str(resume) if resume else None,
            },
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
            run_config=RunConfig(
                name=run_name, storage_path=storage, failure_config=failure,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                # Train's per-report INFO lines would tear through the progress bar
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        bar = progress(steps, f"{workload.name} [{cfg.optimizer.get('name', 'osfn')} x{cfg.num_workers}]", show_progress)
        poller = Poller(runlog, run, bar).start()
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception:
            _hint_resume(storage)
            raise
        finally:
            poller.stop()
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t0
        info = ray.get(runlog.summary.remote(), timeout=60)
        actor_snapshot = ray.get(actor.snapshot.remote(), timeout=60) if actor is not None else None
    finally:
        if actor is not None:
            release_curvature_actor(actor)
        if runlog is not None:
            try:
                ray.kill(runlog)
            except Exception:
                pass
        if started:
            ray.shutdown()
    return run.finish(_summary(cfg, workload, steps, batch, run, run_name, wall, info, actor_snapshot, result))


def _summary(cfg, workload, steps, batch, run, run_name, wall, info, actor_snapshot, result) -> dict:
    final = info["final"]
    workers = info["workers"]
    actor = final.get("actor", {})
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt_path and os.path.isdir(ckpt_path):
        shutil.copyfile(os.path.join(ckpt_path, "state.pt"), run.path / "checkpoint.pt")
    _write_round_trips(run.path, final.get("actor_round_trips_s"))
    summary = {
        "workload": workload.name,
        "optimizer": cfg.optimizer.get("name", "osfn"),
        "final_loss": final.get("final_loss"),
        "final_batch_loss": final.get("final_batch_loss"),
        "test_loss": final.get("test_loss"),
        "steps": steps,
        "batch_size": batch,
        "num_workers": cfg.num_workers,
        "backend": "ray",
        "use_gpu": cfg.use_gpu,
        "staleness": cfg.staleness,
        "shard_basis": cfg.shard_basis,
        "wall_seconds": wall,
        # training steps only (start-up, checkpoints and evaluation excluded), all workers
        "samples_per_second": sum(w["samples_per_second"] for w in workers) if workers else None,
        "worker_throughput": workers,
        "actor_bytes_per_step": actor.get("bytes_per_step", 0),
        "actor_bytes_sent_per_step": actor.get("bytes_sent_per_step", 0),
        "actor_bytes_received_per_step": actor.get("bytes_received_per_step", 0),
        "actor_round_trip_ms_median": actor.get("round_trip_ms_median"),
        "actor_round_trip_ms_p99": actor.get("round_trip_ms_p99"),
        "actor_wait_ms_median": actor.get("wait_ms_median"),
        "actor": actor_snapshot,
        "stale_updates": final.get("stale_updates", 0),
        "attempts": sum(1 for e in info["events"] if e.get("event") == "started"),
        "restarts": [e for e in info["events"] if e.get("event") == "restored"],
        "diagnostics": final.get("diagnostics", {}),
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "ray_run_name": run_name,
        "run_dir": str(run.path),
    }
    return summary


def _write_round_trips(path: Path, round_trips) -> None:
    if round_trips:
        (path / "actor_round_trips.txt").write_text("".join(f"{1e3 * t:.4f}\n" for t in round_trips))


def _hint_resume(storage: str) -> None:
    import sys

    from .ray_checkpoint import find_checkpoint

    try:
        latest = find_checkpoint(storage)
    except Exception:
        return
    print(
        f"osfn-dist train: the run failed; its latest checkpoint is {latest}. Resume with\n"
        f"  osfn-dist train ... --resume-from {latest}\n"
        "or let Ray Train restart it automatically with --max-failures N.",
        file=sys.stderr,
    )
