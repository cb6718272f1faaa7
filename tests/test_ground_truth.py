"""The ground-truth diagnostics the benchmark trusts: Lanczos against exact Hessians."""
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
