"""OSFN in your own Ray Train loop: DDP (``prepare_model``) or FSDP2 (``fully_shard``), the
driver's curvature actor, checkpoints through ``ray.train.report`` and resume after a
failure — nothing of ``osfn-dist train`` involved.

Driver::

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from osfn_dist import OSFNConfig
    from osfn_dist.actor import create_curvature_actor, release_curvature_actor
    from osfn_dist.recipes.ray_train_loop import train_func

    hyper = dict(lr=3e-3, subspace_dim=8)
    actor = create_curvature_actor(OSFNConfig(**hyper), name="my-run")   # d-sized, num_cpus=0
    try:
        TorchTrainer(train_func, scaling_config=ScalingConfig(num_workers=2),
                     run_config=RunConfig(failure_config=FailureConfig(max_failures=2)),
                     train_loop_config={"actor": "my-run", "hyper": hyper, "steps": 600,
                                        "parallel": "fsdp2"}).fit()      # or "ddp" (default)
    finally:
        release_curvature_actor(actor)

The actor and the optimizers must agree on the subspace settings (the same ``hyper``); the
actor refuses a trainer with another ``subspace_dim`` or rule. ``"worker_noise": True`` in
the loop config (DDP) sends every worker's own projection to the actor (``osfn_for``).

Checkpoints (every ``checkpoint_every`` steps) hold the model, the optimizer (V included) and
the actor's state: with DDP rank 0 writes one ``state.pt``; with FSDP2 every rank writes
its shards through ``torch.distributed.checkpoint`` (``osfn_dist.checkpoint``) and reports
them, and Ray Train gathers the ranks' files into one checkpoint directory. After a failure
(``FailureConfig(max_failures>0)``) Ray Train restarts the workers, ``train_func`` finds
the latest checkpoint, restores the model, the optimizer *and the actor* (which has moved
on since) and continues with the batches after it: the run ends where an uninterrupted one
does.

``step_hook(step, rank)`` (optional, picklable): called after every optimizer step. Each
report carries the step, the loss, this rank's median training-step time (forward,
backward, communication, optimizer; ms, since the last report) and the optimizer state it
holds (bytes: the base's state and V's rows on this rank).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

META = "meta.pt"  # step and the actor's state (rank 0)
STATE = "state.pt"  # DDP: model and optimizer (rank 0)
SHARD = "optimizer-rank{rank}.pt"  # shard_basis: each rank's optimizer state (its rows of V)


def shard_every_linear(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 over ``mesh``: every ``nn.Linear`` its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def parallelize(model: torch.nn.Module, parallel: str, world: int) -> torch.nn.Module:
    """``model`` made data parallel as ``parallel`` says, inside a Ray Train worker:
    ``"ddp"`` (``ray.train.torch.prepare_model``: gradients averaged overlapped with
    backward), ``"fsdp2"`` (``shard_every_linear`` over all ranks: parameters and V sharded),
    or ``"gradient_sync"`` (unchanged: OSFN's own ``GradientSync`` averages after backward)."""
    from ..core.errors import ConfigError
    from ..train.config import PARALLEL

    if parallel not in PARALLEL:
        raise ConfigError(f"parallel={parallel!r}: must be one of {PARALLEL}")
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        return shard_every_linear(model, init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world,)))
    if parallel == "ddp":
        import ray.train.torch

        return ray.train.torch.prepare_model(model)
    return model


def osfn_for(model: torch.nn.Module, parallel: str, exchange, worker_noise: bool = False, **hyper):
    """OSFN over ``model`` as ``parallelize`` left it; with ``"gradient_sync"`` OSFN averages
    the gradients itself. ``shard_basis=True`` (``"ddp"`` or ``"gradient_sync"``): each rank
    keeps only its slice's rows of V (``dataflow.shard``); its optimizer state is then per rank.

    ``worker_noise`` (DDP, noise damping on): a DDP communication hook also gives the service
    every worker's own projection (``watch_ddp``), so that the per-direction noise estimate
    comes from the spread between workers instead of the spread of the averaged projection
    over time (what one process uses). Off by default: on 2 CPU Ray workers it cost 15–19% of
    the step (a read of V in backward and a collective per step), while the loss without it
    was unchanged on the CNN and deep linear net and 2.3% higher on the MNIST-1D MLP (32
    seeds; README, "Distributed")."""
    from ..dataflow.distributed import GradientSync
    from ..optimizer import OSFN
    from ..train.config import check_parallel

    check_parallel(parallel, bool(hyper.get("shard_basis")))
    if worker_noise and parallel != "ddp":
        from ..core.errors import ConfigError

        raise ConfigError(f"worker_noise=True is a DDP communication hook; parallel={parallel!r} has no DDP "
                          "(under 'gradient_sync' OSFN gathers every worker's projection itself): drop worker_noise")
    if parallel == "gradient_sync":
        hyper["gradient_sync"] = GradientSync()
    opt = OSFN(model.parameters(), exchange=exchange, **hyper)
    if worker_noise and parallel == "ddp" and opt.config.noise_damping and opt.subspace_dim:
        opt.watch_ddp(model)
    return opt


def _sharded_rows(opt) -> bool:
    """shard_basis: this rank's optimizer state holds only its rows of V."""
    from ..dataflow.shard import LocalShards

    layout = getattr(opt, "_layout", None)
    return bool(layout is not None and layout.sharded and not isinstance(layout, LocalShards))


def _save(directory: str, model, opt, parallel: str, rank: int, step: int, actor) -> None:
    import ray

    from .. import checkpoint

    sharded = _sharded_rows(opt)
    if parallel == "fsdp2":
        checkpoint.save(directory, model, opt)  # every rank writes its own shards
    elif rank == 0:
        torch.save({"model": model.module.state_dict(), "optimizer": None if sharded else opt.state_dict()},
                   os.path.join(directory, STATE))
    if sharded:  # shard_basis: every rank's rows of V in its own file
        torch.save(opt.state_dict(), os.path.join(directory, SHARD.format(rank=rank)))
    if rank == 0:
        torch.save({"step": step, "actor": ray.get(actor.state_dict.remote(), timeout=60)}, os.path.join(directory, META))


def _restore(directory: str, model, opt, parallel: str, rank: int, actor) -> int:
    """Load the checkpoint in ``directory``; rank 0 also puts the actor back. Returns its step."""
    import ray

    from .. import checkpoint

    if parallel == "fsdp2":
        checkpoint.load(directory, model, opt)
    else:
        state = torch.load(os.path.join(directory, STATE), map_location="cpu", weights_only=False)
        model.module.load_state_dict(state["model"])
        if _sharded_rows(opt):
            mine = os.path.join(directory, SHARD.format(rank=rank))
            if not os.path.exists(mine):
                from ..core.errors import DimensionMismatchError

                raise DimensionMismatchError(
                    f"checkpoint {directory!r} has no basis rows for rank {rank} ({os.path.basename(mine)}): it was "
                    "written without shard_basis or by fewer workers; resume with the same setting and world size")
            opt.load_state_dict(torch.load(mine, map_location="cpu", weights_only=False))
        else:
            if state["optimizer"] is None:
                from ..core.errors import DimensionMismatchError

                raise DimensionMismatchError(f"checkpoint {directory!r} holds a sharded basis (per-rank files): "
                                             "resume with shard_basis=True and the same world size")
            opt.load_state_dict(state["optimizer"])
    meta = torch.load(os.path.join(directory, META), weights_only=False)
    if rank == 0:
        ray.get(actor.load_state_dict.remote(meta["actor"]), timeout=60)
    return int(meta["step"])


def train_func(config: dict) -> None:
    import ray.train

    from ..actor import curvature_exchange, get_curvature_actor
    from ..core.errors import ConfigError
    from ..train.ray_worker import optimizer_state_bytes
    from ..workloads import get_workload

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    parallel = config.get("parallel", "ddp")
    if parallel not in ("ddp", "fsdp2"):
        raise ConfigError(f"parallel={parallel!r}: must be 'ddp' or 'fsdp2'")
    seed = config.get("seed", 0)
    workload = get_workload(config.get("workload", "tiny_mlp"), seed=seed)
    torch.manual_seed(seed)
    model = workload.build_model()
    # DDP averages the gradients overlapped with backward; FSDP2 reduce-scatters them
    model = parallelize(model, parallel, world)
    opt = osfn_for(model, parallel, curvature_exchange(config["actor"]), worker_noise=bool(config.get("worker_noise")),
                   **config.get("hyper", {}))
    actor = get_curvature_actor(config["actor"]) if isinstance(config["actor"], str) else config["actor"]
    start = 0
    latest = ray.train.get_checkpoint()  # after a failure: where to pick up
    if latest is not None:
        with latest.as_directory() as d:
            start = _restore(d, model, opt, parallel, rank, actor)
    every, hook = config.get("checkpoint_every", 10), config.get("step_hook")
    step_ms: list[float] = []
    for step, x, y in workload.batches(config.get("steps", 100), seed, workload.batch_size):
        if step <= start:
            continue
        xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]  # this worker's share
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = workload.loss_fn(model(xs), ys)
        loss.backward()
        opt.step()  # rank 0 exchanges with the actor; every rank applies the same update
        step_ms.append(1e3 * (time.perf_counter() - t0))
        if hook is not None:
            hook(step, rank)
        if step % every == 0:
            with tempfile.TemporaryDirectory() as d:
                _save(d, model, opt, parallel, rank, step, actor)
                # FSDP2: every rank reports its shard files; DDP: rank 0 holds the whole state
                has_files = parallel == "fsdp2" or rank == 0 or _sharded_rows(opt)
                checkpoint = ray.train.Checkpoint.from_directory(d) if has_files else None
                ray.train.report({"step": step, "loss": float(loss.detach()), "step_ms_median": statistics.median(step_ms),
                                  "optimizer_state_bytes": optimizer_state_bytes(opt)}, checkpoint=checkpoint)
            step_ms = []
