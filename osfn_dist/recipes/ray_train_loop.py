"""OSFN in your own Ray Train loop: ``prepare_model`` (DDP), the driver's curvature actor,
checkpoints through ``ray.train.report`` — nothing of ``osfn-dist train`` involved.

Driver::

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from osfn_dist import OSFNConfig
    from osfn_dist.actor import create_curvature_actor, release_curvature_actor
    from osfn_dist.recipes.ray_train_loop import train_func

    hyper = dict(lr=3e-3, subspace_dim=8)
    actor = create_curvature_actor(OSFNConfig(**hyper), name="my-run")   # d-sized, num_cpus=0
    try:
        TorchTrainer(train_func, scaling_config=ScalingConfig(num_workers=2),
                     train_loop_config={"actor": "my-run", "hyper": hyper, "steps": 600}).fit()
    finally:
        release_curvature_actor(actor)

The actor and the optimizers must agree on the subspace settings (the same ``hyper``); the
actor refuses a trainer with another ``subspace_dim`` or rule. To resume, save the actor's
state next to the model (``ray.get(actor.state_dict.remote())``) and restore both, as
``osfn_dist/train/ray_worker.py`` does.
"""
from __future__ import annotations

import os
import tempfile

import torch


def train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from ..actor import curvature_exchange
    from ..optimizer import OSFN
    from ..workloads import get_workload

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    workload = get_workload(config.get("workload", "tiny_mlp"), seed=config.get("seed", 0))
    torch.manual_seed(config.get("seed", 0))
    model = ray.train.torch.prepare_model(workload.build_model())  # DistributedDataParallel
    opt = OSFN(model.parameters(), exchange=curvature_exchange(config["actor"]), **config.get("hyper", {}))
    every = config.get("checkpoint_every", 10)
    for step, x, y in workload.batches(config.get("steps", 100), config.get("seed", 0), workload.batch_size):
        xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]  # this worker's share
        opt.zero_grad(set_to_none=True)
        loss = workload.loss_fn(model(xs), ys)
        loss.backward()  # DDP averages the gradients, overlapped with backward
        opt.step()  # rank 0 exchanges with the actor; every rank applies the same update
        if step % every == 0:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    torch.save({"step": step, "model": model.module.state_dict(), "optimizer": opt.state_dict()},
                               os.path.join(d, "state.pt"))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report({"step": step, "loss": float(loss.detach())}, checkpoint=checkpoint)
