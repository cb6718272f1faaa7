"""The curvature-seeking subspace rule: sharp directions are held, only flat ones explore,
and a direction that escapes into the complement is captured at once."""
import torch

from osfn_dist import OSFN
from osfn_dist.core.basis_rule import explore_update
from osfn_dist.core.config import OSFNConfig
from osfn_dist.bench.ground_truth import principal_angles_deg, stiff_quadratic
from osfn_dist.dataflow.curvature import CurvatureService


def test_only_the_flattest_eigen_directions_turn_whatever_their_gradient():
    eig = torch.tensor([50.0, -20.0, 0.3, 0.01], dtype=torch.float64)
    src = torch.tensor([5.0, 5.0, 0.1, 0.2], dtype=torch.float64)  # the sharp ones carry the gradient
    coef = explore_update(src, float(src @ src) + 1.0, eig, torch.eye(4, dtype=torch.float64), 2, 0.5)
    assert coef[0] == 0 and coef[1] == 0  # held: Oja on the gradient would turn these most
    assert coef[2] != 0 and coef[3] != 0


def test_explorers_are_chosen_in_the_eigenbasis_and_mapped_back():
    rot = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # eigen-direction 0 is coordinate 1
    coef = explore_update(torch.tensor([1.0, 1.0], dtype=torch.float64), 4.0,
                          torch.tensor([0.1, 10.0], dtype=torch.float64), rot, 1, 1.0)
    assert coef.tolist() == [0.0, 0.25]


def test_a_jump_of_the_source_outside_the_subspace_replaces_the_weakest_mature_direction():
    svc = CurvatureService(OSFNConfig(subspace_dim=2, subspace_rule="curvature", subspace_source="innovation"))
    # hand the service a full, mature subspace with one sharp and one flat direction
    svc.alive[:] = True
    svc.stats.count[:] = 10
    svc.eigenvalues = torch.tensor([40.0, 0.5], dtype=torch.float64)
    svc.resid_mean = 1.0
    assert svc._escaped_direction(1.5, 10.0, svc.eigenvalues) is None  # typical noise level: no capture
    assert svc._escaped_direction(100.0, 120.0, svc.eigenvalues) == 1  # the flat one makes room
    assert svc.captures == 1
    # a direction still gathering its first samples (λ = 0) is not given up
    svc.resid_mean = 1.0
    assert svc._escaped_direction(100.0, 120.0, torch.tensor([40.0, 0.0], dtype=torch.float64)) == 0


def _run(opt_factory, hess, x0, lr, steps=150, warmup=20):
    theta = torch.nn.Parameter(x0.clone().float())
    opt = opt_factory([theta], lr)
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        opt.param_groups[0]["lr"] = lr * min(1.0, (t + 1) / warmup)
        theta.grad = hess.float() @ theta.detach() + 0.01 * torch.randn(x0.shape[0], generator=gen)
        opt.step()
    th = theta.detach().double()
    return float(0.5 * th @ hess @ th / (0.5 * x0 @ hess @ x0)), opt


def test_holding_the_sharp_directions_lets_the_complement_run_where_sgd_diverges():
    hess, top, x0 = stiff_quadratic(60, 3, 0)
    lr = 0.05  # 5x past SGD-Nesterov's stability limit on this quadratic (λ_max = 100)
    sgd, _ = _run(lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True), hess, x0, lr)
    assert not sgd < 1.0
    loss, opt = _run(lambda p, lr: OSFN(
        p, lr=lr, complement="nesterov", subspace_dim=4, subspace_rule="curvature", subspace_source="innovation",
        complement_in_subspace=0.0, trust_radius=100.0, newton_warmup=0), hess, x0, lr)
    assert loss < 1e-2
    assert float(principal_angles_deg(opt.basis, top).max()) < 45.0
