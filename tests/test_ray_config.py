"""``osfn-dist train`` flags and config for Ray runs (no Ray started here)."""
from __future__ import annotations

import argparse

import pytest
import torch

from osfn_dist.core.errors import ConfigError
from osfn_dist.train import command
from osfn_dist.train.config import TrainConfig
from osfn_dist.train.ray_checkpoint import find_checkpoint, save_leader_state


def _args(*argv: str):
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def test_no_flags_means_ray_with_two_cpu_workers():
    cfg = command.config_from_args(_args())
    assert cfg.backend == "ray" and cfg.num_workers == 2 and not cfg.use_gpu and cfg.address is None
    assert cfg.staleness == 0 and not cfg.shard_basis
    assert cfg.parallel_mode() == "ddp"  # OSFN on DDP's averaged gradients, like a user's own loop


def test_parallel_mode_follows_the_flags():
    assert command.config_from_args(_args("--parallel", "fsdp2")).parallel_mode() == "fsdp2"
    assert command.config_from_args(_args("--shard-basis")).parallel_mode() == "ddp"  # V's rows sharded under DDP
    assert command.config_from_args(_args("--shard-basis", "--parallel", "gradient_sync")).parallel_mode() == "gradient_sync"
    with pytest.raises(ConfigError, match="shard_basis needs parallel='ddp' or 'gradient_sync'"):
        command.config_from_args(_args("--shard-basis", "--parallel", "fsdp2"))
    assert command.config_from_args(_args("--worker-noise")).worker_noise
    assert not command.config_from_args(_args()).worker_noise  # the DDP hook is opt-in
    with pytest.raises(ConfigError, match="worker_noise is for parallel='ddp'"):
        command.config_from_args(_args("--worker-noise", "--parallel", "fsdp2"))
    from osfn_dist.recipes.ray_train_loop import osfn_for  # the own-loop recipe refuses it alike

    for parallel in ("fsdp2", "gradient_sync"):
        with pytest.raises(ConfigError, match=f"worker_noise=True is a DDP communication hook; parallel='{parallel}'"):
            osfn_for(torch.nn.Linear(3, 2), parallel, None, worker_noise=True, subspace_dim=2)
    local = _args("--parallel", "fsdp2", "--backend", "local")
    with pytest.raises(ConfigError, match="--parallel needs Ray Train workers"):
        command._refuse_for_local(local, command.config_from_args(local))


def test_a_checkpoint_resumes_only_in_its_own_parallel_mode(tmp_path):
    from osfn_dist.core.errors import DimensionMismatchError
    from osfn_dist.train.ray_checkpoint import load_state

    for mode in ("fsdp2", "ddp"):
        (tmp_path / mode).mkdir()
        save_leader_state(tmp_path / mode, step=5, model={}, optimizer=None, actor=None, pipeline=None,
                          meta={"parallel": mode})
    assert load_state(tmp_path / "fsdp2", 0, 2, False, fsdp2=True)["step"] == 5
    assert load_state(tmp_path / "ddp", 0, 2, False, fsdp2=False)["step"] == 5
    with pytest.raises(DimensionMismatchError, match="resume with --parallel fsdp2"):
        load_state(tmp_path / "fsdp2", 0, 2, False, fsdp2=False)
    with pytest.raises(DimensionMismatchError, match="an FSDP2 run cannot resume"):
        load_state(tmp_path / "ddp", 0, 2, False, fsdp2=True)


def test_backend_local_stays_single_process():
    assert command.config_from_args(_args("--backend", "local")).backend == "local"


def test_ray_flags_reach_the_config(tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("workload: tiny_mlp\nsteps: 40\ncheckpoint_every: 7\noptimizer: {name: osfn, subspace_dim: 6}\n")
    cfg = command.config_from_args(_args(
        "--config", str(cfg_file), "--num-workers", "4", "--staleness", "1", "--shard-basis",
        "--resume-from", "runs/x", "--max-failures", "2", "--actor-timeout", "9", "--storage-path", "/mnt/ckpt",
        "--lr", "0.01",
    ))
    assert (cfg.workload, cfg.steps, cfg.checkpoint_every, cfg.num_workers) == ("tiny_mlp", 40, 7, 4)
    assert cfg.staleness == 1 and cfg.shard_basis and cfg.max_failures == 2 and cfg.actor_timeout_s == 9
    assert cfg.resume_from == "runs/x" and cfg.storage_path == "/mnt/ckpt"
    assert cfg.optimizer == {"name": "osfn", "subspace_dim": 6, "lr": 0.01}


@pytest.mark.parametrize("bad", [{"staleness": 2}, {"keep_checkpoints": 0}, {"actor_timeout_s": 0},
                                 {"max_failures": -2}, {"shard_basis": "yes"}, {"worker_noise": 1},
                                 {"parallel": "zero3"}])
def test_invalid_ray_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_find_checkpoint_picks_the_latest_step(tmp_path):
    for step in (25, 100, 50):
        d = tmp_path / "ray" / "run" / f"step_{step:08d}"
        d.mkdir(parents=True)
        save_leader_state(d, step=step, model={}, optimizer=None, actor=None, pipeline=None, meta={})
    assert find_checkpoint(tmp_path).name == "step_00000100"
    assert find_checkpoint(tmp_path / "ray" / "run" / "step_00000025").name == "step_00000025"
    with pytest.raises(ConfigError, match="no osfn-dist checkpoint"):
        find_checkpoint(tmp_path / "ray" / "run" / "missing")
