"""OSFN around the user's own optimizer: the base steps as it would alone, OSFN measures what
it did, and the torch.optim contract (schedulers, state_dict, add_param_group, tensor lr)
holds through the wrapper."""
import copy
import subprocess
import sys

import pytest
import torch

from osfn_dist import OSFN, ConfigError, DimensionMismatchError
from test_optimizer_contract import batches, make_model  # the same small model and data


def train(model, opt, data, sched=None):
    for x, y in data:
        loss = torch.nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def flat(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def _soap(params):
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None
    return heavyball.SOAP(params, lr=1e-2)


def _muon_adamw(params):
    params = list(params)
    return [torch.optim.Muon([p for p in params if p.ndim == 2], lr=2e-2),
            torch.optim.AdamW([p for p in params if p.ndim != 2], lr=3e-3, weight_decay=0.1)]


BASES = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "muon+adamw": _muon_adamw,
    "soap": _soap,
}


@pytest.mark.parametrize("name", sorted(BASES))
def test_without_a_subspace_osfn_is_its_base_bit_for_bit(name):
    data = batches(25)
    a, b = make_model(), make_model()
    ref = BASES[name](a.parameters())
    train(a, OptimizerList(ref) if isinstance(ref, list) else ref, data)
    train(b, OSFN(base=BASES[name](b.parameters()), subspace_dim=0), data)
    assert torch.equal(flat(a), flat(b))


class OptimizerList:
    def __init__(self, opts):
        self.opts = opts

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


def test_class_plus_kwargs_builds_the_base():
    model = make_model()
    opt = OSFN(model.parameters(), lr=5e-3, base=torch.optim.AdamW, base_kwargs={"weight_decay": 0.2, "fused": True})
    assert isinstance(opt.base, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 5e-3 and opt.param_groups[0]["weight_decay"] == 0.2
    assert opt.param_groups[0]["fused"] is True
    assert opt.param_groups is not opt.base.param_groups and opt.param_groups[0] is opt.base.param_groups[0]


def test_default_base_is_torch_adamw():
    opt = OSFN(make_model().parameters(), lr=1e-3, weight_decay=0.05)
    assert type(opt.base) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.05


@pytest.mark.parametrize("name", ["adamw_fused", "sgd_nesterov", "muon+adamw", "soap"])
def test_state_dict_round_trip_mid_run_is_bit_identical(name):
    data = batches(30)
    model = make_model()
    opt = OSFN(base=BASES[name](model.parameters()), subspace_dim=4, newton_warmup=3)
    train(model, opt, data[:14])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, data[14:])
    assert opt.diagnostics["subspace_step_norm"] > 0  # the Newton step was on

    clone = make_model(seed=7)
    clone.load_state_dict(saved[0])
    clone_opt = OSFN(base=BASES[name](clone.parameters()), subspace_dim=4, newton_warmup=3)
    clone_opt.load_state_dict(saved[1])
    train(clone, clone_opt, data[14:])
    assert torch.equal(flat(model), flat(clone))
    assert torch.equal(opt.basis, clone_opt.basis)


def test_a_base_osfn_cannot_read_still_feeds_the_subspace_its_displacements():
    """SOAP keeps no running mean OSFN can read: the subspace turns toward SOAP's measured
    step instead (its previous one: none on the first step), and the Newton step acts."""
    model = make_model()
    opt = OSFN(base=_soap(model.parameters()), subspace_dim=4, newton_warmup=3)
    reports = []
    inner = opt.exchange.exchange
    opt.exchange.exchange = lambda r: (reports.append(r), inner(r))[1]
    train(model, opt, batches(12))
    assert reports[0].source_coords is None and all(r.source_coords is not None for r in reports[1:])
    assert opt.diagnostics["alive_directions"] == 4 and opt.diagnostics["subspace_step_norm"] > 0
    with pytest.raises(ConfigError, match="innovation.*SOAP"):
        OSFN(base=_soap(make_model().parameters()), subspace_source="innovation")


def _one_run(halve_at, steps=16, sched_kind="step"):
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4, newton_warmup=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 if s >= halve_at else 1.0)
    rows = []
    for x, y in batches(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        rows.append((opt.diagnostics["complement_step_norm"], opt.diagnostics["subspace_step_norm"]))
    return rows


def test_scheduler_halves_the_base_step_and_the_newton_step():
    full, half = _one_run(halve_at=100), _one_run(halve_at=10)
    assert full[:10] == half[:10]
    base_full, newton_full = full[10]
    base_half, newton_half = half[10]
    assert newton_full > 0
    assert base_half == pytest.approx(0.5 * base_full, rel=1e-5)
    assert newton_half == pytest.approx(0.5 * newton_full, rel=1e-5)


def test_one_cycle_lr_keeps_the_newton_step_within_its_trust_radius():
    """OneCycleLR writes initial_lr = max_lr / 25: scaling the Newton step by lr/initial_lr
    would let it grow 25× past trust_radius at the peak."""
    model = make_model()
    radius = 1e-4
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4, newton_warmup=2, trust_radius=radius)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=30)
    norms = []
    for x, y in batches(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        norms.append(opt.diagnostics["subspace_step_norm"])
    assert max(norms) > 0.5 * radius  # the radius binds
    assert max(norms) <= radius * (1 + 1e-9)


def _origin(opt, theta):
    """θ − V·(the service's tracked position), just after an exchange; constant iff the
    reported displacements are the ones that happened (D = d, so V is square)."""
    svc = opt.exchange.service
    pos = svc.position + svc.last_transform @ opt._prev_step_coords.double() + svc.pending_residual * opt._residual_step_dot
    return theta.double() - opt.basis.double() @ pos


@pytest.mark.parametrize("case", ["lr0_group", "grad_every_other_step", "bfloat16"])
def test_tracked_position_is_the_applied_displacement(case):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    a = torch.nn.Parameter(torch.randn(3).to(dtype))
    b = torch.nn.Parameter(torch.randn(3).to(dtype))
    groups = [{"params": [a], "lr": 0.0 if case == "lr0_group" else 0.05}, {"params": [b], "lr": 0.05}]
    opt = OSFN(groups, complement="momentum", subspace_dim=6, newton_warmup=2, newton_lr=0.5)
    h = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.3, 0.2]))
    g = torch.Generator().manual_seed(3)
    a0 = a.detach().clone()
    origins = []
    for step in range(40):
        theta = torch.cat([a.detach(), b.detach()]).float()
        grad = h @ theta + 0.05 * torch.randn(6, generator=g)
        a.grad = grad[:3].to(dtype)
        b.grad = grad[3:].to(dtype)
        if case == "grad_every_other_step" and step % 2:
            a.grad = None
        opt.step()
        if opt.diagnostics["alive_directions"] == 6:  # the basis spans everything from here on
            origins.append(_origin(opt, torch.cat([a.detach(), b.detach()])))
    assert len(origins) > 20
    assert opt.diagnostics["subspace_step_norm"] > 0
    if case == "lr0_group":
        assert torch.equal(a.detach(), a0)  # neither the base nor the Newton move touched it
    drift = max(float((o - origins[0]).abs().max()) for o in origins)
    assert drift < 1e-4, drift


def test_refusals_name_the_parameter_and_what_to_do():
    model = make_model()
    with pytest.raises(ConfigError, match="complex"):
        OSFN([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    with pytest.raises(ConfigError, match="several devices"):
        OSFN([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))])
    with pytest.raises(ConfigError, match="instance"):
        OSFN(model.parameters(), base=torch.optim.AdamW(model.parameters()))
    with pytest.raises(ConfigError, match="weight_decay.*your optimizer"):
        OSFN(base=torch.optim.AdamW(model.parameters()), weight_decay=0.1)
    with pytest.raises(ConfigError, match="two base optimizers"):
        OSFN(base=[torch.optim.AdamW(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1)])
    with pytest.raises(ConfigError, match="not a torch.optim.Optimizer"):
        OSFN(model.parameters(), base=dict)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = OSFN(emb.parameters(), lr=1e-2, subspace_dim=2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ConfigError, match="sparse gradient"):
        opt.step()


def test_dtensor_parameters_outside_fsdp2s_shape_are_refused():
    """FSDP2 (every parameter a DTensor on one 1-D mesh) is supported (tested with 2 ranks in
    test_distributed_equivalence); a plain tensor next to DTensors, or a 2-D mesh, is refused."""
    code = (
        "import os, torch, torch.distributed as dist\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "from torch.distributed.tensor import distribute_tensor, Shard\n"
        "from osfn_dist import OSFN, ConfigError\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29555')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "mesh = init_device_mesh('cpu', (1,))\n"
        "p = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh, [Shard(0)]))\n"
        "try:\n    OSFN([p, torch.nn.Parameter(torch.zeros(3))])\nexcept ConfigError as e:\n"
        "    assert 'plain tensor' in str(e); print('mixed refused')\n"
        "mesh2 = init_device_mesh('cpu', (1, 1))\n"
        "q = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh2, [Shard(0), Shard(1)]))\n"
        "try:\n    OSFN([q])\nexcept ConfigError as e:\n    assert '2-D mesh' in str(e); print('2-D refused')\n"
        "OSFN([p]); print('fsdp accepted')\n"
        "dist.destroy_process_group()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "mixed refused" in out.stdout and "2-D refused" in out.stdout and "fsdp accepted" in out.stdout, out.stderr


def test_add_param_group_tensor_lr_and_zero_grad_go_through_to_the_base():
    model = make_model()
    opt = OSFN(base=torch.optim.AdamW(model[0].parameters(), lr=torch.tensor(1e-2), foreach=False), subspace_dim=4)
    opt.add_param_group({"params": model[2].parameters(), "lr": torch.tensor(1e-2)})
    assert len(opt.base.param_groups) == 2 and opt.param_groups[1]["subspace_dim"] == 4
    before = flat(model)
    train(model, opt, batches(12))
    moved = flat(model) - before
    assert bool((moved[: 8 * 16 + 16] != 0).any()) and bool((moved[8 * 16 + 16 :] != 0).any())
    assert opt.diagnostics["subspace_step_norm"] > 0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(DimensionMismatchError, match="add_param_group after the first step"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_old_checkpoints_are_refused_with_what_to_do():
    opt = OSFN(make_model().parameters(), lr=1e-2)
    with pytest.raises(DimensionMismatchError, match="version 1"):
        opt.load_state_dict({"state": {}, "param_groups": [], "osfn": {"version": 1}})


def test_complement_in_subspace_zero_feeds_the_base_the_complement_gradient():
    """π = 0: once the Newton step is active the base sees g − V Vᵀg (its moments never
    see the sharp directions), and what it moves inside V is taken back."""
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(6))
    opt = OSFN([theta], lr=0.05, complement="momentum", subspace_dim=2, newton_warmup=2, complement_in_subspace=0.0)
    h = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5, 0.3, 0.2]))
    for _ in range(12):
        full = theta.grad = h @ theta.detach()
        full = full.clone()
        v = None if opt.basis is None else opt.basis.clone()
        opt.step()
    assert v is not None and opt.diagnostics["subspace_step_norm"] > 0
    # after step(): p.grad holds what the base saw, which has (almost) no part inside the old basis
    assert float((v.T @ theta.grad).norm()) < 0.01 * float((v.T @ full).norm())
    assert float(theta.grad.norm()) > 1e-3


def test_compiled_kernels_follow_the_eager_trajectory():
    """kernels='compiled' fuses V·coef and the residual into one torch.compile'd pass over V
    (core.kernels); it must compute what the eager ops compute (to float rounding), and the
    fused kernel itself must equal its formula."""
    from osfn_dist.core import kernels

    vt = torch.randn(4, 300, dtype=torch.float32)
    coef, a, u = torch.randn(4), torch.randn(4), torch.randn(300)
    move, resid = kernels.expand_residual(vt, coef, a, u)
    assert not kernels._broken  # it really compiled here (a C++ compiler is part of the dev setup)
    torch.testing.assert_close(move, coef @ vt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resid, u - a @ vt, rtol=1e-5, atol=1e-5)

    data = batches(20)
    a_model, b_model = make_model(), make_model()
    eager = OSFN(a_model.parameters(), lr=1e-2, subspace_dim=4, newton_warmup=3)
    fused = OSFN(b_model.parameters(), lr=1e-2, subspace_dim=4, newton_warmup=3, kernels="compiled")
    train(a_model, eager, data)
    train(b_model, fused, data)
    assert fused.diagnostics["subspace_step_norm"] > 0
    torch.testing.assert_close(flat(b_model), flat(a_model), rtol=1e-4, atol=1e-5)


def test_newton_lr_zero_observes_only_the_base_moves_bit_for_bit_and_the_curvature_is_fitted():
    from osfn_dist.workloads import get_workload

    work = get_workload("tiny_mlp")
    torch.manual_seed(0)
    watched, alone = work.build_model(), work.build_model()
    alone.load_state_dict(watched.state_dict())
    opt = OSFN(base=torch.optim.AdamW(watched.parameters(), lr=3e-3), newton_lr=0.0)
    ref = torch.optim.AdamW(alone.parameters(), lr=3e-3)
    for _, x, y in work.batches(30, 0):
        for model, o in ((watched, opt), (alone, ref)):
            o.zero_grad()
            work.loss_fn(model(x), y).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(watched.parameters(), alone.parameters()))
    eigenvalues = opt.diagnostics["eigenvalues"]
    assert len(eigenvalues) == 8 and max(abs(v) for v in eigenvalues) > 0  # fitted and exported all the same
