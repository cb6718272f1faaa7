"""OSFN honours the torch.optim contract and rejects bad input clearly."""
import copy
import subprocess
import sys

import pytest
import torch

from osfn_dist import OSFN, ConfigError, NonFiniteGradientError, OSFNConfig


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=g), torch.randn(32, 3, generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


def flat(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


@pytest.mark.parametrize(
    "reference, kwargs",
    [
        # the default base is torch's fused AdamW where it applies (plain CPU/CUDA tensors)
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True), dict(complement="adamw", weight_decay=0.1)),
        (lambda ps: torch.optim.SGD(ps, lr=1e-2, foreach=False), dict(complement="sgd")),
        (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=False), dict(complement="momentum")),
        (
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False),
            dict(complement="nesterov", weight_decay=1e-3),
        ),
    ],
    ids=["adamw", "sgd", "momentum", "nesterov"],
)
def test_subspace_size_zero_is_exactly_the_complement_optimizer(reference, kwargs):
    data = batches(30)
    a, b = make_model(), make_model()
    train(a, reference(a.parameters()), data)
    train(b, OSFN(b.parameters(), lr=1e-2, subspace_dim=0, **kwargs), data)
    assert torch.equal(flat(a), flat(b))


def test_muon_complement_trains_matrices_and_vectors():
    model, data = make_model(), batches(60)
    opt = OSFN(model.parameters(), lr=0.02, complement="muon", aux_lr=3e-3, subspace_dim=4)
    first = float(torch.nn.functional.mse_loss(model(data[0][0]), data[0][1]))
    train(model, opt, data)
    assert float(torch.nn.functional.mse_loss(model(data[0][0]), data[0][1])) < first
    assert "momentum_buffer" in opt.state[model[0].weight] and "exp_avg" in opt.state[model[0].bias]


def test_state_dict_round_trip_continues_bit_identically():
    data = batches(40)
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4)
    train(model, opt, data[:20])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, data[20:])

    clone = make_model(seed=99)
    clone.load_state_dict(saved_model)
    clone_opt = OSFN(clone.parameters(), lr=1e-2, subspace_dim=4)
    clone_opt.load_state_dict(saved_opt)
    train(clone, clone_opt, data[20:])
    assert torch.equal(flat(model), flat(clone))
    assert torch.equal(opt.basis, clone_opt.basis)


@pytest.mark.parametrize("every", [1, 3])
def test_state_dict_round_trip_mid_cycle(every):
    """With curvature_every = 3 the checkpoint falls between exchanges: the accumulated
    complement drift must travel with it."""
    data = batches(31)
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4, curvature_every=every)
    train(model, opt, data[:17])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, data[17:])
    clone = make_model(seed=5)
    clone.load_state_dict(saved[0])
    clone_opt = OSFN(clone.parameters(), lr=1e-2, subspace_dim=4, curvature_every=every)
    clone_opt.load_state_dict(saved[1])
    train(clone, clone_opt, data[17:])
    assert torch.equal(flat(model), flat(clone))


def test_curvature_every_k_exchanges_once_per_k_steps_and_tracks_position():
    """Complement-only steps in between exchanges still move the tracked position: with the
    subspace spanning everything (D = d), position = Vᵀ(θ − origin) for a fixed origin."""
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(4))
    opt = OSFN([theta], lr=0.05, complement="momentum", subspace_dim=4, curvature_every=3)
    svc = opt.exchange.service
    origins = []
    g = torch.Generator().manual_seed(2)
    h = torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2]))
    for step in range(1, 40):
        theta.grad = h @ theta.detach() + 0.05 * torch.randn(4, generator=g)
        opt.step()
        if step % 3 == 1 and step > 10:  # just after an exchange
            v = opt.basis.double()
            pos = svc.position + svc.last_transform @ opt._prev_step_coords.double() + svc.pending_residual * opt._residual_step_dot
            origins.append(theta.detach().double() - v @ pos)
        if step % 3 == 0 and step > 10:  # the step before an exchange: drift pending
            v = opt.basis.double()
            pos = (svc.position + svc.last_transform @ opt._prev_step_coords.double()
                   + svc.pending_residual * opt._residual_step_dot
                   + v.T @ (theta.detach().double() - opt._anchor.double()))
            origins.append(theta.detach().double() - v @ pos)
    assert svc.step == 13  # steps 1, 4, ..., 37
    for o in origins[1:]:
        assert torch.allclose(o, origins[0], atol=1e-4)


def test_state_dict_through_torch_save(tmp_path):
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4)
    train(model, opt, batches(15))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    other = OSFN(model.parameters(), lr=1e-2, subspace_dim=4)
    other.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=False))
    assert other.exchange.service.step == 15 and torch.equal(other.basis, opt.basis)


def test_lr_scheduler_scales_complement_and_newton_steps():
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4, newton_warmup=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 10 else 0.0)
    data = batches(20)
    for i, (x, y) in enumerate(data):
        before = flat(model)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        moved = float((flat(model) - before).norm())
        if i < 10:
            assert moved > 0
        else:  # lr = 0: neither the complement nor the Newton step may move anything
            assert opt.param_groups[0]["lr"] == 0.0
            assert moved == 0.0


def test_hyperparameters_live_in_param_groups_and_changes_act():
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4)
    for name in OSFNConfig.subspace_field_names():
        assert name in opt.param_groups[0]
    train(model, opt, batches(12))
    opt.param_groups[0]["newton_lr"] = 0.0  # turn the Newton step off mid-run
    train(model, opt, batches(2, seed=5))
    assert opt.diagnostics["subspace_step_norm"] == 0.0
    opt.param_groups[0]["eig_floor"] = -1.0
    with pytest.raises(ConfigError, match="eig_floor"):
        train(model, opt, batches(1))


def test_several_param_groups_and_params_without_grad():
    model = make_model()
    unused = torch.nn.Parameter(torch.ones(5))
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    opt = OSFN(
        [
            {"params": model[0].parameters(), "lr": 0.0},
            {"params": list(model[2].parameters()) + [unused, frozen], "lr": 1e-2},
        ],
        subspace_dim=4,
        newton_lr=0.0,
    )
    first = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(10))
    after = list(model.parameters())
    # group 0 has lr 0 and the Newton step is off: it must not move; group 1 must
    assert torch.equal(first[0], after[0]) and torch.equal(first[1], after[1])
    assert not torch.equal(first[2], after[2])
    assert torch.equal(unused, torch.ones(5)) and torch.equal(frozen, torch.ones(3))


def test_closure_is_called_and_loss_returned():
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=2)
    x, y = batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and loss is not None and loss.item() > 0


def test_bfloat16_params_train_with_float32_statistics():
    model = make_model(dtype=torch.bfloat16)
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4)
    data = batches(30)
    x, y = data[0]
    before = float(torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y))
    for xb, yb in data:
        loss = torch.nn.functional.mse_loss(model(xb.bfloat16()).float(), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.basis.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert float(torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y)) < before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_step_and_touches_nothing(bad):
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4)
    train(model, opt, batches(12))
    params_before = flat(model).clone()
    state_before = copy.deepcopy(opt.state_dict())
    x, y = batches(1, seed=7)[0]
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    model[0].weight.grad[0, 0] = bad
    opt.step()
    assert torch.equal(flat(model), params_before)
    assert opt.diagnostics["skipped_steps"] == 1
    after = opt.state_dict()
    assert after["osfn"]["steps"] == state_before["osfn"]["steps"]
    assert torch.equal(after["osfn"]["basis"], state_before["osfn"]["basis"])
    assert after["osfn"]["service"]["scalars"] == state_before["osfn"]["service"]["scalars"]
    for k, v in state_before["osfn"]["service"]["stats"].items():
        assert torch.equal(after["osfn"]["service"]["stats"][k], v)


def test_nonfinite_gradient_can_raise():
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, nonfinite="raise")
    x, y = batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[2].bias.grad[0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="non-finite gradient"):
        opt.step()


INVALID = {
    "lr": -1.0,
    "complement": "adam",
    "momentum": 1.0,
    "betas": (0.9, 1.5),
    "eps": 0.0,
    "weight_decay": -0.1,
    "aux_lr": float("nan"),
    "subspace_dim": -1,
    "forgetting": 0.0,
    "newton_lr": float("inf"),
    "newton_momentum": 1.0,
    "eig_floor": 0.0,
    "trust_radius": -1.0,
    "complement_in_subspace": 1.5,
    "ridge": 0.0,
    "subspace_rule": "pca",
    "subspace_source": "adam",
    "subspace_rate": 2.0,
    "explorers": 0,
    "replace_every": 0,
    "basis_update_every": 0,
    "reorth_every": 0,
    "curvature_every": 0,
    "newton_warmup": -1,
    "eigen_method": "lapack",
    "noise_damping": "yes",
    "nonfinite": "ignore",
    "kernels": "fastest",
    "coordinates": "natural",
    "basis_dtype": "float16",
}


def test_every_field_has_an_invalid_example():
    assert set(INVALID) == set(OSFNConfig.field_names())


@pytest.mark.parametrize("field", sorted(INVALID))
def test_invalid_hyperparameter_names_field_and_range(field):
    with pytest.raises(ConfigError) as err:
        OSFN(make_model().parameters(), **{"lr": 1e-3, field: INVALID[field]})
    assert field in str(err.value) and "must be" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_hyperparameter_is_rejected():
    with pytest.raises(ConfigError, match="unknown OSFN hyperparameter"):
        OSFN(make_model().parameters(), lr=1e-3, learning_rate=1.0)


def test_diagnostics_report_the_curvature_model():
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4)
    train(model, opt, batches(30))
    diag = opt.diagnostics
    for key in ("eigenvalues", "negative_curvature", "rotation_angle_deg", "subspace_step_norm",
                "complement_step_norm", "step_norm", "regression_residual", "skipped_steps", "noise_ratio"):
        assert key in diag
    assert len(diag["eigenvalues"]) == 4
    assert diag["negative_curvature"] == sum(1 for e in diag["eigenvalues"] if e < 0)
    assert diag["subspace_step_norm"] > 0 and diag["step"] == 30


def test_core_and_dataflow_import_no_transport_packages():
    code = (
        "import sys, osfn_dist.core.config, osfn_dist.core.subspace, osfn_dist.dataflow.curvature, "
        "osfn_dist.dataflow.distributed, osfn_dist.optimizer\n"
        "bad = [m for m in ('ray', 'grpc', 'prometheus_client') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("coordinates", ["parameters", "preconditioned"])
def test_a_curvature_step_checks_finiteness_through_its_own_collect_pass(coordinates, monkeypatch):
    """On a replicated basis the finiteness check rides on ‖g‖², which the collect pass
    computes anyway: a finite step never reads the gradients separately, and a non-finite
    one is still skipped before anything moves — also on the first step in preconditioned
    coordinates, where Adam has no second moments yet and only the base would step."""
    import osfn_dist.optimizer as optimizer_module

    calls = []
    real = optimizer_module._all_finite
    monkeypatch.setattr(optimizer_module, "_all_finite", lambda ts: calls.append(1) or real(ts))
    model = make_model()
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4, coordinates=coordinates)
    x, y = batches(1, seed=3)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    before = flat(model).clone()
    opt.step()
    assert torch.equal(flat(model), before) and opt.diagnostics["skipped_steps"] == 1 and opt._steps == 0
    assert calls  # the exact check confirmed the non-finite ‖g‖²
    calls.clear()
    train(model, opt, batches(12))
    # (preconditioned: the exact check once, on the first step, which has no second moments)
    assert len(calls) == (coordinates == "preconditioned")
    assert opt._steps == 12 and opt.diagnostics["skipped_steps"] == 1
