"""``osfn-dist train`` on Ray Train, end to end (2 CPU workers, gloo, the curvature actor).

- 2 Ray workers on a global batch == the single-process run, 1e-5 relative after 50 steps;
- resuming from the step-25 checkpoint continues the same trajectory;
- a worker SIGKILLed mid-run: Ray Train restarts the group from the last checkpoint and the
  run finishes on the same trajectory;
- the curvature actor killed mid-run: Ray restarts it, the workers restore it from the last
  checkpoint (its step and basis version are the checkpoint's, not zero) and the run
  finishes on the same trajectory;
- pipelined (staleness 1) with a sharded basis: runs, says its updates are stale, and
  holds less optimizer state per worker;
- the data-parallel modes agree: the default (OSFN on DDP's averaged gradients), OSFN's own
  GradientSync and FSDP2 (V sharded with the parameters) end within 1e-5 of each other, and
  an FSDP2 run resumed from its step-25 DCP checkpoint ends bit for bit where it did.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from osfn_dist.train.config import TrainConfig
from osfn_dist.train.ray_checkpoint import find_checkpoint
from support.faults import KillOnce, ship_by_value

ship_by_value()  # Ray workers unpickle the hooks without importing tests/support

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 50
# noise damping uses per-worker noise estimates, which one process does not have
OPTIMIZER = {"name": "osfn", "lr": 3e-3, "subspace_dim": 4, "noise_damping": False}


def _cfg(run_dir: Path, **kw) -> TrainConfig:
    base = dict(workload="tiny_mlp", steps=STEPS, run_dir=str(run_dir), backend="ray", num_workers=2,
                checkpoint_every=25, log_every=10, optimizer=dict(OPTIMIZER))
    return TrainConfig(**{**base, **kw})


def _params(run_dir: Path) -> torch.Tensor:
    state = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)
    return torch.cat([v.reshape(-1).double() for v in state["model"].values()])


def _rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module")
def base_run(ray_session, tmp_path_factory):
    from osfn_dist.train.ray_trainer import train_ray

    run_dir = tmp_path_factory.mktemp("ray-base")
    return run_dir, train_ray(_cfg(run_dir), show_progress=False)


def test_two_ray_workers_match_the_single_process_run(base_run, tmp_path):
    from osfn_dist.train.local import train_local

    run_dir, summary = base_run
    local_dir = tmp_path / "local"
    train_local(_cfg(local_dir, backend="local"), show_progress=False)
    assert _rel(_params(run_dir), _params(local_dir)) < 1e-5

    assert summary["num_workers"] == 2 and summary["steps"] == STEPS and summary["backend"] == "ray"
    assert [w["rank"] for w in summary["worker_throughput"]] == [0, 1]
    assert all(w["samples_per_second"] > 0 and w["steps"] == STEPS for w in summary["worker_throughput"])
    assert 0 < summary["actor_bytes_per_step"] < 8192
    assert summary["actor"]["step"] == STEPS and summary["restarts"] == []
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "curvature.png", "checkpoint.pt"):
        assert (run_dir / name).exists(), name
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["parallel"] == "ddp"  # resolved, not null
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["num_workers"] == 2 and "actor_bytes_per_step" in on_disk
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30, 40, 50]


def test_resume_continues_the_same_trajectory(base_run, tmp_path, monkeypatch):
    """--resume-from as docs/distributed.md writes it: a path relative to the driver's working
    directory (the workers run elsewhere and must get it resolved)."""
    import os

    from osfn_dist.train.ray_trainer import train_ray

    run_dir, _ = base_run
    ckpt = [p for p in (run_dir / "ray").rglob("step_00000025")][0]
    assert find_checkpoint(run_dir) != ckpt  # the run directory resolves to its latest (step 50)
    monkeypatch.chdir(run_dir.parent)
    relative = os.path.relpath(ckpt, run_dir.parent)
    assert not os.path.isabs(relative)
    summary = train_ray(_cfg(tmp_path / "resumed", resume_from=relative), show_progress=False)
    assert summary["restarts"][0]["checkpoint_step"] == 25
    assert summary["restarts"][0]["actor_step"] == 25
    assert summary["worker_throughput"][0]["steps"] == STEPS - 25
    assert torch.equal(_params(tmp_path / "resumed"), _params(run_dir))  # bit for bit


def test_killed_worker_recovers_from_the_last_checkpoint(base_run, tmp_path):
    from osfn_dist.train.ray_trainer import train_ray

    fault = KillOnce("worker", rank=1, step=35, marker=str(tmp_path / "killed"), delay_s=2.5)
    summary = train_ray(_cfg(tmp_path / "run", max_failures=1), show_progress=False, step_hook=fault)
    assert (tmp_path / "killed").exists()
    assert summary["attempts"] == 2
    assert [e["checkpoint_step"] for e in summary["restarts"]] == [25]
    assert summary["actor"]["step"] == STEPS
    assert torch.equal(_params(tmp_path / "run"), _params(base_run[0]))


def test_killed_actor_is_restored_from_the_checkpoint_not_reset(base_run, tmp_path):
    from osfn_dist.train.ray_trainer import train_ray

    fault = KillOnce("actor", rank=0, step=35, marker=str(tmp_path / "killed"), delay_s=2.5)
    summary = train_ray(_cfg(tmp_path / "run", max_failures=1), show_progress=False, step_hook=fault)
    assert (tmp_path / "killed").exists()
    (restored,) = summary["restarts"]
    assert restored["actor_was_restarted"]  # Ray brought it back empty ...
    assert restored["actor_step"] == restored["checkpoint_step"] == 25  # ... and we restored it
    assert restored["actor_basis_version"] == restored["optimizer_basis_version"] > 0
    assert summary["actor"]["restarted"] and summary["actor"]["step"] == STEPS
    assert torch.equal(_params(tmp_path / "run"), _params(base_run[0]))


def test_pipelined_run_with_sharded_basis(base_run, tmp_path):
    from osfn_dist.train.ray_trainer import train_ray

    summary = train_ray(_cfg(tmp_path / "run", staleness=1, shard_basis=True, steps=30), show_progress=False)
    assert summary["stale_updates"] == 29  # every step but the warm-up applied a stale update
    assert summary["diagnostics"]["stale_by"] == 1
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    replicated = base_run[1]["worker_throughput"][0]["optimizer_state_bytes"]
    assert all(w["optimizer_state_bytes"] < replicated for w in summary["worker_throughput"])
    ckpt = find_checkpoint(tmp_path / "run")
    assert {p.name for p in ckpt.iterdir()} >= {"state.pt", "meta.json", "optimizer-rank0.pt", "optimizer-rank1.pt"}


def test_gradient_sync_and_fsdp2_match_the_ddp_default(base_run, tmp_path):
    from osfn_dist.train.ray_trainer import train_ray

    run_dir, ddp = base_run
    sync = train_ray(_cfg(tmp_path / "sync", parallel="gradient_sync"), show_progress=False)
    fsdp2 = train_ray(_cfg(tmp_path / "fsdp2", parallel="fsdp2"), show_progress=False)
    assert _rel(_params(tmp_path / "sync"), _params(run_dir)) < 1e-5
    assert _rel(_params(tmp_path / "fsdp2"), _params(run_dir)) < 1e-5  # state.pt holds the whole model
    assert abs(fsdp2["final_loss"] - ddp["final_loss"]) < 1e-4 * ddp["final_loss"]
    # under FSDP2 each worker holds its shards' rows of V and of the base's moments
    full = ddp["worker_throughput"][0]["optimizer_state_bytes"]
    assert all(w["optimizer_state_bytes"] < 0.75 * full for w in fsdp2["worker_throughput"])
    ckpt = [p for p in (tmp_path / "fsdp2" / "ray").rglob("step_00000025")][0]
    assert (ckpt / ".metadata").exists() and json.loads((ckpt / "meta.json").read_text())["parallel"] == "fsdp2"

    resumed = train_ray(_cfg(tmp_path / "resumed", parallel="fsdp2", resume_from=str(ckpt)), show_progress=False)
    assert resumed["restarts"][0]["checkpoint_step"] == 25
    assert torch.equal(_params(tmp_path / "resumed"), _params(tmp_path / "fsdp2"))
