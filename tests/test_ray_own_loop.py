"""Your own Ray Train loop (the recipe osfn_dist/recipes/ray_train_loop.py): a ``train_func``
with ``prepare_model`` (DDP) and OSFN whose exchange is the driver's curvature actor
(``osfn_dist.actor.curvature_exchange``), checkpoints through ``ray.train.report`` — no
osfn-dist trainer involved. It must train exactly like one process on the global batch, and
under FSDP2 survive a killed worker: resume from the last checkpoint (model, optimizer shards
and the actor) and end bit for bit where an uninterrupted run ends."""
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


def _recipe_run(tmp_path, name: str, parallel: str, hook=None, shard: bool = False):
    """The recipe with DDP or FSDP2 on 2 workers and its own curvature actor; returns the
    final checkpoint's parameters (FSDP2: full tensors read from the ranks' DCP files in one
    process) and the actor's snapshot."""
    import ray
    import torch.distributed.checkpoint as dcp
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from osfn_dist import OSFNConfig
    from osfn_dist.actor import create_curvature_actor, release_curvature_actor
    from osfn_dist.recipes.ray_train_loop import train_func
    from osfn_dist.workloads import get_workload

    actor = create_curvature_actor(OSFNConfig(**HYPER), name=name)
    hyper = {**HYPER, "shard_basis": True} if shard else HYPER
    config = {"actor": name, "hyper": hyper, "steps": STEPS, "parallel": parallel, "checkpoint_every": 10}
    if hook is not None:
        config["step_hook"] = hook
    try:
        result = TorchTrainer(
            train_func, train_loop_config=config, scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name=name, storage_path=str(tmp_path), failure_config=FailureConfig(max_failures=1)),
        ).fit()
        snap = ray.get(actor.snapshot.remote(), timeout=60)
    finally:
        release_curvature_actor(actor)
    if parallel == "fsdp2":
        model = get_workload("tiny_mlp", seed=0).build_model()
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=result.checkpoint.path)  # the ranks' shards, gathered by Ray Train
        values = state["model"].values()
    else:
        state = torch.load(f"{result.checkpoint.path}/state.pt", map_location="cpu", weights_only=False)
        values = state["model"].values()
        if shard:  # every rank's rows of V in its own file, none in state.pt
            assert state["optimizer"] is None
            rows = [torch.load(f"{result.checkpoint.path}/optimizer-rank{r}.pt", weights_only=False)["osfn"]
                    for r in range(2)]
            assert [r["basis_layout"]["rank"] for r in rows] == [0, 1]
    return torch.cat([v.reshape(-1) for v in values]), snap


@pytest.mark.parametrize("parallel", ["fsdp2", "ddp", "ddp+shard_basis"])
def test_own_loop_resumes_bit_for_bit_after_a_worker_is_killed(ray_session, tmp_path, parallel):
    """DDP or FSDP2 + the curvature actor in your own loop: rank 1 SIGKILLed at step 15, Ray
    Train restarts the group, train_func restores model, optimizer (V, or its shards) and the
    actor from the step-10 checkpoint, and the run ends bit for bit where an uninterrupted
    one does. ``ddp+shard_basis``: V's rows sharded under DDP, each rank's in its own file."""
    from support.faults import KillOnce, ship_by_value

    ship_by_value()
    shard = parallel.endswith("+shard_basis")
    mode, tag = parallel.split("+")[0], parallel.replace("+", "-").replace("_", "-")
    straight, straight_actor = _recipe_run(tmp_path / "straight", f"own-{tag}-straight", mode, shard=shard)
    marker = tmp_path / "killed"
    killed, killed_actor = _recipe_run(tmp_path / "killed-run", f"own-{tag}-killed", mode,
                                       KillOnce("worker", rank=1, step=15, marker=str(marker), delay_s=2.5), shard=shard)
    assert marker.exists()
    assert straight_actor["step"] == killed_actor["step"] == STEPS
    assert straight_actor["restored_from_step"] is None  # never restored ...
    assert killed_actor["restored_from_step"] == 10  # ... restored from the step-10 checkpoint
    assert torch.equal(killed, straight)
