"""Your own Ray Train loop (the recipe osfn_dist/recipes/ray_train_loop.py): a ``train_func``
with ``prepare_model`` (DDP) and OSFN whose exchange is the driver's curvature actor
(``osfn_dist.actor.curvature_exchange``), checkpoints through ``ray.train.report`` — no
osfn-dist trainer involved. It must train exactly like one process on the global batch."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 20
HYPER = dict(lr=3e-3, subspace_dim=4, noise_damping=False)


def test_own_train_func_with_ddp_and_the_curvature_actor_matches_one_process(ray_session, tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from osfn_dist import OSFN, OSFNConfig
    from osfn_dist.actor import create_curvature_actor, release_curvature_actor
    from osfn_dist.recipes.ray_train_loop import train_func
    from osfn_dist.workloads import get_workload

    actor = create_curvature_actor(OSFNConfig(**HYPER), name="own-loop-test")
    try:
        result = TorchTrainer(
            train_func, train_loop_config={"actor": "own-loop-test", "hyper": HYPER, "steps": STEPS},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name="own-loop", storage_path=str(tmp_path)),
        ).fit()
        assert ray.get(actor.snapshot.remote(), timeout=60)["step"] == STEPS
    finally:
        release_curvature_actor(actor)
    state = torch.load(f"{result.checkpoint.path}/state.pt", map_location="cpu", weights_only=False)
    assert state["optimizer"]["osfn"]["steps"] == STEPS

    workload = get_workload("tiny_mlp", seed=0)
    torch.manual_seed(0)
    model = workload.build_model()
    opt = OSFN(model.parameters(), **HYPER)
    for _, x, y in workload.batches(STEPS, 0, workload.batch_size):
        opt.zero_grad(set_to_none=True)
        workload.loss_fn(model(x), y).backward()
        opt.step()
    ours = torch.cat([v.reshape(-1) for v in state["model"].values()])
    ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert float((ours - ref).norm() / ref.norm()) < 1e-5
