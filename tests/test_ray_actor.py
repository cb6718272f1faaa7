"""The curvature actor: same math as in-process, d-sized messages, and faults that are loud.

- updates through the actor equal the in-process service's (exactly), also pipelined;
- bytes per step to and from the actor do not depend on the model size;
- a crashed actor is restarted by Ray but refuses reports until restored from a checkpoint
  (never silently empty), and comes back at the checkpoint's step and basis version;
- a dead, silent or unknown actor, or a version mismatch, gives a clear typed error fast.
"""
from __future__ import annotations

import time

import pytest
import torch

from osfn_dist import OSFN, OSFNConfig
from osfn_dist.actor import ActorExchange, create_curvature_actor, get_curvature_actor
from osfn_dist.core.errors import CurvatureServiceUnavailable, VersionMismatchError
from osfn_dist.dataflow.exchange import InProcessExchange
from osfn_dist.dataflow.messages import Report
from osfn_dist.dataflow.pipeline import PipelinedExchange
from osfn_dist.dataflow.curvature import CurvatureService

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

HYPER = dict(lr=3e-3, subspace_dim=4)


def _train(exchange, width: int = 16, steps: int = 15) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=gen), torch.randn(64, 1, generator=gen)
    opt = OSFN(model.parameters(), exchange=exchange, **HYPER)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _report(step=1, version=0, d=4) -> Report:
    return Report(step=step, basis_version=version, grad_coords=torch.zeros(d, dtype=torch.float64), grad_sqnorm=1.0)


def test_actor_updates_equal_the_in_process_service(ray_session):
    actor = create_curvature_actor(OSFNConfig(**HYPER))
    try:
        through_actor = _train(ActorExchange(actor, timeout_s=30))
        in_process = _train(None)
        assert torch.equal(through_actor, in_process)
        snap = ray_session.get(actor.snapshot.remote())
        assert snap["step"] == 15 and snap["exchanges"] == 15 and not snap["restarted"]
    finally:
        ray_session.kill(actor)


def test_pipelined_actor_exchange_equals_pipelined_in_process(ray_session):
    actor = create_curvature_actor(OSFNConfig(**HYPER), allow_stale=True)
    try:
        pipelined = PipelinedExchange(ActorExchange(actor, timeout_s=30))
        through_actor = _train(pipelined)
        local = PipelinedExchange(InProcessExchange(CurvatureService(OSFNConfig(**HYPER), allow_stale=True)))
        assert torch.equal(through_actor, _train(local))
        assert pipelined.stale_updates == 14  # every step but the warm-up says it is stale
    finally:
        ray_session.kill(actor)


def test_bytes_per_step_do_not_depend_on_model_size(ray_session):
    sizes = {}
    for width in (16, 4096):  # D ≈ 0.2k and ≈ 41k parameters
        actor = create_curvature_actor(OSFNConfig(**HYPER))
        try:
            exchange = ActorExchange(actor, timeout_s=30)
            _train(exchange, width=width, steps=12)
            sizes[width] = exchange.stats()
        finally:
            ray_session.kill(actor)
    small, large = sizes[16], sizes[4096]
    assert small["exchanges"] == large["exchanges"] == 12
    assert abs(small["bytes_per_step"] - large["bytes_per_step"]) <= 8  # only int encodings may differ
    assert small["bytes_per_step"] < 4096
    assert small["round_trip_ms_median"] > 0


def test_crashed_actor_refuses_reports_until_restored(ray_session):
    actor = create_curvature_actor(OSFNConfig(**HYPER), max_restarts=1)
    exchange = ActorExchange(actor, timeout_s=30)
    try:
        _train(exchange, steps=12)
        saved = ray_session.get(actor.state_dict.remote())
        before = ray_session.get(actor.snapshot.remote())
        ray_session.kill(actor, no_restart=False)
        deadline = time.time() + 60
        snap = None
        while time.time() < deadline:  # ray.kill is asynchronous: wait for the restarted actor
            try:
                snap = ray_session.get(actor.snapshot.remote(), timeout=10)
                if snap["restarted"]:
                    break
            except Exception:
                pass  # dying or restarting
            time.sleep(0.2)
        assert snap is not None and snap["restarted"] and snap["needs_restore"]
        assert snap["step"] == 0  # Ray restarted it empty ...
        with pytest.raises(CurvatureServiceUnavailable, match="restored from the last checkpoint"):
            exchange.exchange(_report(step=13, version=before["basis_version"]))  # ... so it refuses
        restored = ray_session.get(actor.load_state_dict.remote(saved))
        assert restored["step"] == before["step"] == 12
        assert restored["basis_version"] == before["basis_version"] > 0
        assert not restored["needs_restore"] and restored["restored_from_step"] == 12
    finally:
        ray_session.kill(actor)


def test_dead_actor_gives_a_clear_error_quickly(ray_session):
    actor = create_curvature_actor(OSFNConfig(**HYPER), max_restarts=0)
    exchange = ActorExchange(actor, timeout_s=30)
    update = exchange.exchange(_report())
    ray_session.kill(actor, no_restart=True)
    _wait_until_dead(ray_session, actor)  # ray.kill is asynchronous (a CI run once raced it)
    t0 = time.time()
    with pytest.raises(CurvatureServiceUnavailable, match="died or is restarting"):
        exchange.exchange(_report(step=2, version=update.new_version))  # valid if it were alive
    assert time.time() - t0 < 20


def _wait_until_dead(ray_session, actor, within_s: float = 60.0) -> None:
    from ray.exceptions import RayActorError

    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            ray_session.get(actor.snapshot.remote(), timeout=10)
        except RayActorError:
            return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the actor did not die within {within_s:g} s of ray.kill")


def test_silent_actor_times_out_instead_of_hanging(ray_session):
    @ray_session.remote(num_cpus=0)
    class Silent:
        def exchange(self, wire):
            time.sleep(30)

    actor = Silent.remote()
    try:
        t0 = time.time()
        with pytest.raises(CurvatureServiceUnavailable, match="did not answer"):
            ActorExchange(actor, timeout_s=0.5).exchange(_report())
        assert time.time() - t0 < 10
    finally:
        ray_session.kill(actor)


def test_unknown_actor_name_is_a_clear_error(ray_session):
    with pytest.raises(CurvatureServiceUnavailable, match="no curvature actor named"):
        get_curvature_actor("osfn-curvature-does-not-exist")


def test_version_mismatch_keeps_its_type_through_the_actor(ray_session):
    actor = create_curvature_actor(OSFNConfig(**HYPER))
    try:
        with pytest.raises(VersionMismatchError, match="basis version 5"):
            ActorExchange(actor, timeout_s=30).exchange(_report(version=5))
    finally:
        ray_session.kill(actor)
