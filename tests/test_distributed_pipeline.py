"""One-step-stale pipelining of the curvature exchange, in one process (no Ray)."""
from __future__ import annotations

import pytest
import torch

from osfn_dist import OSFN, OSFNConfig
from osfn_dist.core.errors import VersionMismatchError
from osfn_dist.dataflow.exchange import InProcessExchange
from osfn_dist.dataflow.messages import DirectionUpdate, Report
from osfn_dist.dataflow.pipeline import PipelinedExchange
from osfn_dist.dataflow.curvature import CurvatureService
from osfn_dist.workloads import get_workload

HYPER = dict(lr=3e-3, subspace_dim=4)


def _pipeline() -> PipelinedExchange:
    return PipelinedExchange(InProcessExchange(CurvatureService(OSFNConfig(**HYPER), allow_stale=True)))


def _setup(exchange):
    workload = get_workload("tiny_mlp", seed=0)
    model = workload.build_model()
    return workload, model, OSFN(model.parameters(), exchange=exchange, **HYPER)


def _steps(workload, model, opt, batches):
    diags = []
    for _, x, y in batches:
        opt.zero_grad(set_to_none=True)
        workload.loss_fn(model(x), y).backward()
        opt.step()
        diags.append(opt.diagnostics)
    return diags


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_every_applied_update_says_whether_it_is_stale():
    pipe = _pipeline()
    workload, model, opt = _setup(pipe)
    diags = _steps(workload, model, opt, workload.batches(12, 0))
    assert diags[0]["pipeline_warmup"] and diags[0]["stale_by"] == 0
    assert all(d["stale_by"] == 1 and d["report_step"] == i for i, d in enumerate(diags[1:], start=1))
    assert pipe.stale_updates == 11
    assert all(torch.isfinite(_flat(model)))


def test_checkpoint_drains_the_pipeline_and_resume_continues_the_trajectory():
    workload, model, opt = _setup(_pipeline())
    batches = list(workload.batches(20, 0))
    _steps(workload, model, opt, batches)
    straight = _flat(model)

    pipe = _pipeline()
    workload, model, opt = _setup(pipe)
    _steps(workload, model, opt, batches[:10])
    saved = {"pipe": pipe.state_dict()}  # first: drains the update in flight, so the service ...
    saved.update(model={k: v.clone() for k, v in model.state_dict().items()}, opt=opt.state_dict(),
                 service=pipe.inner.state_dict())  # ... has processed the last report
    assert saved["pipe"]["pending_update"] is not None

    pipe2 = _pipeline()
    workload, model2, opt2 = _setup(pipe2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    pipe2.inner.load_state_dict(saved["service"])
    pipe2.load_state_dict(saved["pipe"])
    _steps(workload, model2, opt2, batches[10:])
    assert torch.equal(_flat(model2), straight)


def test_drain_is_idempotent():
    pipe = _pipeline()
    workload, model, opt = _setup(pipe)
    _steps(workload, model, opt, workload.batches(8, 0))
    first = pipe.drain()
    assert first is not None and pipe.drain() is first


class _WrongVersion:
    def __init__(self):
        self.service = CurvatureService(OSFNConfig(**HYPER))

    def exchange(self, report):
        update = self.service.exchange(report)
        update.base_version += 1
        return update


def test_an_update_for_another_basis_version_is_never_applied():
    workload, model, opt = _setup(_WrongVersion())
    before = _flat(model).clone()
    x, y = next(iter(workload.batches(1, 0)))[1:]
    workload.loss_fn(model(x), y).backward()
    with pytest.raises(VersionMismatchError, match="refusing to apply"):
        opt.step()
    assert torch.equal(_flat(model), before)


def test_residual_coefficients_follow_the_current_residual_norm():
    pipe = PipelinedExchange(_Echo())
    d = 3
    r1 = Report(step=1, basis_version=0, grad_coords=torch.zeros(d, dtype=torch.float64), grad_sqnorm=4.0,
                residual_sqnorm=4.0)
    r2 = Report(step=2, basis_version=0, grad_coords=torch.zeros(d, dtype=torch.float64), grad_sqnorm=1.0,
                residual_sqnorm=1.0)
    assert pipe.exchange(r1).diagnostics["pipeline_warmup"]
    update = pipe.exchange(r2)  # computed for ‖r‖ = 2, applied to a residual of norm 1
    torch.testing.assert_close(update.residual_coef, torch.full((d,), 2.0, dtype=torch.float64))


class _Echo:
    def exchange(self, report):
        d = len(report.grad_coords)
        return DirectionUpdate(step=report.step, base_version=0, new_version=0,
                               step_coef=torch.zeros(d, dtype=torch.float64),
                               residual_coef=torch.ones(d, dtype=torch.float64))


def _own(pipelined: bool):
    workload = get_workload("tiny_mlp", seed=0)
    model = workload.build_model()
    return workload, model, OSFN(model.parameters(), pipelined=pipelined, **HYPER)


def test_pipelined_true_is_the_same_pipeline_as_wrapping_the_service_by_hand():
    """OSFN(..., pipelined=True) builds the pipeline itself: the same trajectory, bit for bit,
    as the hand-built PipelinedExchange (and a different one from the exact exchange)."""
    workload, model, opt = _own(True)
    batches = list(workload.batches(15, 0))
    diags = _steps(workload, model, opt, batches)
    assert diags[0]["pipeline_warmup"] and all(d["stale_by"] == 1 for d in diags[1:])
    by_hand = _setup(_pipeline())
    _steps(by_hand[0], by_hand[1], by_hand[2], batches)
    assert torch.equal(_flat(model), _flat(by_hand[1]))
    exact = _own(False)
    _steps(exact[0], exact[1], exact[2], batches)
    assert not torch.equal(_flat(model), _flat(exact[1]))


def test_pipelined_true_checkpoints_the_service_and_the_update_in_flight_in_the_optimizer():
    """The optimizer's own state_dict carries both the in-process service and the drained
    update, so a resume continues the uninterrupted pipelined run exactly; a non-pipelined
    OSFN refuses such a checkpoint before loading anything."""
    workload, model, opt = _own(True)
    batches = list(workload.batches(20, 0))
    _steps(workload, model, opt, batches)
    straight = _flat(model)

    workload, model, opt = _own(True)
    _steps(workload, model, opt, batches[:10])
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    assert saved["osfn"]["pipeline"]["pending_update"] is not None
    assert saved["osfn"]["service"]["scalars"]["step"] == 10  # the last report was processed

    workload, model2, opt2 = _own(True)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved)
    _steps(workload, model2, opt2, batches[10:])
    assert torch.equal(_flat(model2), straight)

    from osfn_dist.core.errors import ConfigError

    workload, model3, opt3 = _own(False)
    fresh = opt3.state_dict()
    with pytest.raises(ConfigError, match="pipelined=True"):
        opt3.load_state_dict(saved)
    after = opt3.state_dict()
    assert after["osfn"]["steps"] == fresh["osfn"]["steps"] == 0 and after["bases"] == fresh["bases"]


def test_pipelined_true_refuses_an_exchange_of_its_own():
    from osfn_dist.core.errors import ConfigError

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="PipelinedExchange"):
        OSFN(model.parameters(), pipelined=True, exchange=_pipeline(), **HYPER)
