"""The ground-truth diagnostics the benchmark trusts: Lanczos against exact Hessians."""
import pytest
import torch

from osfn_dist.bench.ground_truth import lanczos_top, leak, model_hvp, principal_angles_deg


def test_lanczos_finds_the_largest_magnitude_eigenpairs_including_negative_ones():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(120, 120, generator=gen, dtype=torch.float64))
    ev = torch.cat([torch.tensor([50.0, -30.0, 20.0]), torch.linspace(-1, 1, 117, dtype=torch.float64)])
    h = q @ torch.diag(ev) @ q.T
    lam, vecs = lanczos_top(lambda v: h @ v, 120, 3)
    assert torch.allclose(lam, torch.tensor([50.0, -30.0, 20.0], dtype=torch.float64), atol=1e-8)
    assert float(principal_angles_deg(vecs, q[:, :3]).max()) < 1e-3


def test_lanczos_on_a_network_matches_the_exact_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    hvp, dim = model_hvp(model, torch.nn.functional.mse_loss, x, y)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, parts, (x,)), y)

    exact = torch.func.hessian(loss_of)(flat0)
    ev = torch.linalg.eigvalsh(exact)
    top = ev[torch.argsort(ev.abs(), descending=True)[:4]]
    lam, _ = lanczos_top(hvp, dim, 4)
    assert torch.allclose(lam, top, rtol=1e-6, atol=1e-9)


def test_leak_is_zero_when_the_subspace_holds_the_sharp_directions_and_one_when_it_misses_them():
    u = torch.eye(10, dtype=torch.float64)[:, :2]
    step = torch.tensor([1.0, 1.0] + [0.0] * 8, dtype=torch.float64)
    assert leak(step, u, u) == 0.0
    assert leak(step, None, u) == 1.0
    assert abs(leak(torch.ones(10, dtype=torch.float64), None, u) - 0.2) < 1e-12


class _Quadratic(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        self.theta = torch.nn.Parameter(torch.randn(a.shape[0], generator=torch.Generator().manual_seed(0)))

    def forward(self, _x):
        return 0.5 * self.theta @ self.a @ self.theta


def test_model_error_is_zero_for_the_true_hessian_in_v_and_one_for_a_zero_model():
    from osfn_dist import OSFN
    from osfn_dist.bench.ground_truth import subspace_truth

    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen))
    a = q @ torch.diag(torch.linspace(-2.0, 9.0, 12)) @ q.T
    model = _Quadratic(a)
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4)
    x = torch.zeros(1)
    for _ in range(30):
        opt.zero_grad()
        model(x).backward()
        opt.step()
    hvp, dim = model_hvp(model, lambda out, _t: out, x, x)
    service = opt.exchange.service
    assert bool(service.alive.all())
    v = opt.basis.detach().double()
    lam, vecs = torch.linalg.eigh(v.T @ a.double() @ v)
    service.eigenvalues, service.eigvecs = lam, vecs  # the exact model inside V
    row = subspace_truth(opt, hvp, dim, 4)
    assert row["model_error"] < 1e-3  # float32 V and HVPs
    assert sorted(abs(r) for r in row["rayleigh"]) == pytest.approx(sorted(lam.abs().tolist()), rel=1e-3)
    service.eigenvalues = torch.zeros(4, dtype=torch.float64)
    assert subspace_truth(opt, hvp, dim, 4)["model_error"] == pytest.approx(1.0)


def test_the_oracle_bench_replaces_the_fit_by_the_exact_hessian_inside_v_and_restores_it():
    import importlib.util
    from pathlib import Path

    import osfn_dist.dataflow.curvature as curvature
    from osfn_dist import OSFN
    from osfn_dist.bench.ground_truth import subspace_truth
    from osfn_dist.core import regression

    spec = importlib.util.spec_from_file_location("subspace_oracle", Path(__file__).parents[1] / "bench" / "subspace_oracle.py")
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen))
    model = _Quadratic(q @ torch.diag(torch.linspace(-3.0, 8.0, 12)) @ q.T)
    # rate 0: V is only filled, never turned, so the last fit and V agree
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4, subspace_rate=0.0, forgetting=0.5)
    hvp, dim = model_hvp(model, lambda out, _t: out, torch.zeros(1), torch.zeros(1))
    with oracle.ExactHessianInV(opt, hvp):
        assert curvature.solve_symmetric_hessian is not regression.solve_symmetric_hessian
        for _ in range(30):
            opt.zero_grad()
            model(torch.zeros(1)).backward()
            opt.step()
    assert curvature.solve_symmetric_hessian is regression.solve_symmetric_hessian
    assert bool(opt.exchange.service.alive.all())
    assert subspace_truth(opt, hvp, dim, 4)["model_error"] < 1e-3
