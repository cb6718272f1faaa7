"""The Ray Train loop that runs on every worker.

Data path per step. The model is made data parallel by the same public helpers a user's own
loop uses (``osfn_dist.recipes.ray_train_loop.parallelize`` / ``osfn_for``)::

    forward/backward on this worker's slice of the global batch
      parallel="ddp" (default): DDP averages the gradients, overlapped with backward
                  (worker_noise: its communication hook also projects each bucket's local
                  gradient, d floats, for the service's noise estimate)
      parallel="fsdp2": fully_shard reduce-scatters them; V keeps this rank's rows
      parallel="gradient_sync": OSFN.step() all-reduces the flat gradient itself (the only
                  mode for shard_basis)
    OSFN.step():  LeaderExchange — rank 0 sends the d-sized report to the curvature actor
                  (ActorExchange, optionally pipelined) and broadcasts the update
                  apply — every worker applies the same update to its own copy (or shard) of V

Checkpoints every ``checkpoint_every`` steps hold the model, the optimizer (V included),
the actor's state and any update in flight (``ray_checkpoint``; under FSDP2 the model and
the optimizer as every rank's DCP shards, plus the whole model in ``state.pt``). On (re)start the loop
restores all of them, including the actor (never left silently empty), and continues the
same trajectory: batches are a deterministic function of (seed, step).
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from ..core.errors import CurvatureServiceUnavailable
from ..workloads import get_workload
from .config import TrainConfig
from .optimizers import build_optimizer
from .rundir import LOGGED_DIAGNOSTICS
from .ray_checkpoint import (
    checkpoint_dir_name,
    load_state,
    save_leader_state,
    save_shard_state,
)



def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _broadcast_parameters(model: torch.nn.Module) -> None:
    """Every worker starts from rank 0's parameters (user factories may not seed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def _actor_call(actor, method: str, *args, timeout_s: float):
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return ray.get(getattr(actor, method).remote(*args), timeout=timeout_s)
    except GetTimeoutError as exc:
        raise CurvatureServiceUnavailable(f"the curvature actor did not answer {method}() within {timeout_s:g} s") from exc
    except RayActorError as exc:
        raise CurvatureServiceUnavailable(
            f"the curvature actor is dead or restarting ({type(exc).__name__}) during {method}(); the run "
            "restarts from the last checkpoint if FailureConfig(max_failures>0)"
        ) from exc


def _build_osfn(model, cfg: TrainConfig, rank: int, actor):
    from ..actor.curvature_actor import ActorExchange
    from ..dataflow.distributed import LeaderExchange
    from ..dataflow.pipeline import PipelinedExchange
    from ..recipes.ray_train_loop import osfn_for

    actor_exchange = pipeline = None
    inner = None
    if rank == 0:
        inner = actor_exchange = ActorExchange(actor, timeout_s=cfg.actor_timeout_s)
        if cfg.staleness:
            inner = pipeline = PipelinedExchange(actor_exchange)
    hyper = cfg.optimizer_kwargs()
    if cfg.shard_basis:
        hyper["shard_basis"] = True
    opt = osfn_for(model, cfg.parallel_mode(), LeaderExchange(inner), worker_noise=cfg.worker_noise, **hyper)
    return opt, actor_exchange, pipeline


def _metrics_exporter(cfg: TrainConfig, run_name: str, rank: int, local_rank: int):
    if cfg.metrics_port is None:
        return None
    try:
        from ..metrics.exporter import TrainMetrics
    except ImportError:
        return None
    try:
        m = TrainMetrics(job=run_name, worker=rank)
        m.serve(cfg.metrics_port + local_rank, addr="0.0.0.0")
        return m
    except Exception:  # a metrics port clash must not stop training
        return None


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig.from_dict(config["train"])
    steps, batch, run_name = config["steps"], config["batch_size"], config["run_name"]
    runlog, actor = config["runlog"], config.get("actor")
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    is_osfn = cfg.optimizer.get("name", "osfn") == "osfn"
    step_hook = config.get("step_hook")  # hook(step, rank, actor) after every step (train_ray)

    workload = get_workload(cfg.workload, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = workload.build_model().to(device)
    _broadcast_parameters(model)
    actor_exchange = pipeline = None
    fsdp2 = is_osfn and cfg.parallel_mode() == "fsdp2"
    if is_osfn:
        from ..recipes.ray_train_loop import parallelize

        model = parallelize(model, cfg.parallel_mode(), world)
        opt, actor_exchange, pipeline = _build_osfn(model, cfg, rank, actor)
    else:  # the first-order peers: plain DDP + torch optimizer, for comparison
        model = ray.train.torch.prepare_model(model)
        opt = build_optimizer(model.parameters(), cfg.optimizer)
    metrics = _metrics_exporter(cfg, run_name, rank, local_rank)

    start = 0
    ckpt = ray.train.get_checkpoint()  # the latest of this run (after a failure) ...
    if ckpt is None and config.get("resume_from"):  # ... else the one to resume from
        ckpt = Checkpoint.from_directory(config["resume_from"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d, rank, world, cfg.shard_basis, fsdp2)
            if fsdp2:  # every rank reads its shards of the model and the optimizer
                from .. import checkpoint

                checkpoint.load(d, model, opt)
        if not fsdp2:
            _unwrap(model).load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if rank == 0 and is_osfn:
            if pipeline is not None:
                pipeline.load_state_dict(state["pipeline"] or {})
            snap = _actor_call(actor, "load_state_dict", state["actor"], timeout_s=cfg.actor_timeout_s)
            runlog.event.remote({
                "event": "restored", "step": start, "checkpoint_step": start,
                "actor_step": snap["step"], "actor_basis_version": snap["basis_version"],
                "actor_was_restarted": snap["restarted"], "optimizer_basis_version": opt.diagnostics["basis_version"],
            })
    elif rank == 0 and is_osfn:
        _actor_call(actor, "reset", timeout_s=cfg.actor_timeout_s)
    if rank == 0:
        runlog.event.remote({"event": "started", "step": start, "from_checkpoint": ckpt is not None})

    train_seconds, local_samples, steps_done = 0.0, 0, 0
    step_times: list[float] = []
    eval_every = max(steps // 10, 1)
    records: list[dict] = []
    last_loss = float("nan")
    seen_exchanges = 0
    for step, x, y in workload.batches(steps, cfg.seed, batch):
        if step <= start:
            continue
        ts = time.perf_counter()
        xs, ys = x.tensor_split(world)[rank].to(device), y.tensor_split(world)[rank].to(device)
        loss = workload.loss_fn(model(xs), ys)
        weight = xs.shape[0] * world / x.shape[0]  # exact global-batch mean for uneven splits
        opt.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        opt.step()
        dt = time.perf_counter() - ts
        train_seconds += dt
        step_times.append(dt)
        local_samples += xs.shape[0]
        steps_done += 1
        last_loss = float(loss.detach())
        if step_hook is not None:
            step_hook(step, rank, actor)
        diag = getattr(opt, "diagnostics", {})
        if metrics is not None:
            metrics.observe_step(last_loss, dt, xs.shape[0], diag)
            if actor_exchange is not None and actor_exchange.count > seen_exchanges:
                seen_exchanges = actor_exchange.count
                metrics.observe_exchange(actor_exchange.latencies[-1])

        if step % cfg.log_every == 0 or step == steps:
            # under FSDP2 a forward pass is collective: every rank evaluates
            test_loss = (workload.evaluate(_unwrap(model)) if (rank == 0 or fsdp2)
                         and (step % eval_every == 0 or step == steps) else None)
            global_loss = (loss.detach() * weight).reshape(1).to(torch.float64)
            if world > 1:
                dist.all_reduce(global_loss)
                global_loss /= world
            if rank == 0:
                record = {
                    "step": step, "loss": float(global_loss), "step_seconds": dt,
                    "samples_per_second": x.shape[0] / dt,
                }
                if test_loss is not None:
                    record["test_loss"] = test_loss
                for key in LOGGED_DIAGNOSTICS:
                    if key in diag:
                        record[key] = diag[key]
                if actor_exchange is not None and actor_exchange.latencies:
                    record["actor_round_trip_ms"] = 1e3 * actor_exchange.latencies[-1]
                records.append(record)
                runlog.log.remote(records)
                records = []

        if step % cfg.checkpoint_every == 0 or step == steps:
            _checkpoint(step, cfg, rank, world, model, opt, actor, pipeline, last_loss, run_name, Checkpoint, fsdp2)

    stats = {
        "rank": rank,
        "steps": steps_done,
        "samples": local_samples,
        "train_seconds": train_seconds,
        "samples_per_second": local_samples / train_seconds if train_seconds else float("nan"),
        "step_ms_mean": 1e3 * train_seconds / steps_done if steps_done else float("nan"),
        "step_ms_median": 1e3 * statistics.median(step_times) if step_times else float("nan"),
        "optimizer_state_bytes": optimizer_state_bytes(opt),
    }
    ray.get(runlog.worker_done.remote(rank, stats), timeout=60)
    if rank == 0 or fsdp2:
        losses = {split: workload.evaluate(_unwrap(model), split) for split in ("train", "test")}
    if rank == 0:
        final = {
            "final_loss": losses["train"],
            "test_loss": losses["test"],
            "final_batch_loss": last_loss,
            "diagnostics": {k: v for k, v in getattr(opt, "diagnostics", {}).items() if k in LOGGED_DIAGNOSTICS},
        }
        if actor_exchange is not None:
            final["actor"] = actor_exchange.stats()
            final["actor_round_trips_s"] = list(actor_exchange.latencies)
        if pipeline is not None:
            final["stale_updates"] = pipeline.stale_updates
        ray.get(runlog.set_final.remote(final), timeout=60)
    if metrics is not None:
        metrics.set_up(False)


def _checkpoint(step, cfg, rank, world, model, opt, actor, pipeline, last_loss, run_name, Checkpoint,
                fsdp2=False) -> None:
    import ray.train

    is_osfn = cfg.optimizer.get("name", "osfn") == "osfn"
    with tempfile.TemporaryDirectory(prefix="osfn-ckpt-") as tmp:
        wrote = False
        model_state = None
        if fsdp2:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            from .. import checkpoint

            checkpoint.save(tmp, model, opt)  # every rank writes its shards (what a resume reads)
            # and the whole model for state.pt / the run directory's checkpoint.pt (collective)
            model_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            wrote = True
        if rank == 0:
            pipeline_state = pipeline.state_dict() if pipeline is not None else None  # drains the pipeline
            actor_state = _actor_call(actor, "state_dict", timeout_s=cfg.actor_timeout_s) if is_osfn else None
            save_leader_state(
                tmp, step=step, model=model_state if fsdp2 else _unwrap(model).state_dict(),
                optimizer=None if cfg.shard_basis or fsdp2 else opt.state_dict(),
                actor=actor_state, pipeline=pipeline_state,
                meta={"run": run_name, "workload": cfg.workload, "world_size": world,
                      "shard_basis": cfg.shard_basis, "staleness": cfg.staleness,
                      "parallel": cfg.parallel_mode() if is_osfn else "ddp",
                      "optimizer": cfg.optimizer.get("name", "osfn")},
            )
            wrote = True
        if cfg.shard_basis:
            save_shard_state(tmp, rank, opt.state_dict())
            wrote = True
        ray.train.report(
            {"step": step, "loss": last_loss},
            checkpoint=Checkpoint.from_directory(tmp) if wrote else None,
            checkpoint_dir_name=checkpoint_dir_name(step),
        )


def optimizer_state_bytes(opt) -> int:
    """Bytes of optimizer state held by this worker: V (or its shard) and per-parameter state
    (for FSDP2's DTensors, this rank's local shards)."""
    from ..dataflow.shard import local

    total = 0
    total += int(getattr(opt, "basis_bytes", 0))
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += local(v).numel() * v.element_size()
    return total
