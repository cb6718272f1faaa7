"""coordinates='preconditioned': OSFN's subspace in Adam's coordinates z = P^½ θ."""
from __future__ import annotations

import copy

import pytest
import torch

from osfn_dist import OSFN
from osfn_dist.core.errors import ConfigError

D = 6
# a quadratic whose coordinates live on scales 1, 10, 100: Adam's √v̂ undoes most of that,
# so the curvature Adam sees (P^(-½) H P^(-½)) is 4 orders of magnitude below H's
SCALES = torch.tensor([1.0, 1.0, 10.0, 10.0, 100.0, 100.0], dtype=torch.float64)


def _quadratic():
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    inner = q @ torch.diag(torch.linspace(1.0, 3.0, D, dtype=torch.float64)) @ q.T
    return SCALES[:, None] * inner * SCALES[None, :]


def _sigma(base, p) -> torch.Tensor:
    st, group = base.state[p], base.param_groups[0]
    v_hat = st["exp_avg_sq"] / (1 - group["betas"][1] ** float(st["step"]))
    return (v_hat.sqrt() + group["eps"]).rsqrt()


def _noisy_steps(opt, theta, hess, steps, gen):
    for _ in range(steps):
        opt.zero_grad()
        theta.grad = hess @ theta.detach() + 0.3 * SCALES * torch.randn(D, dtype=torch.float64, generator=gen)
        opt.step()


@pytest.mark.parametrize("coordinates", ["parameters", "preconditioned"])
def test_fitted_curvature_is_that_of_the_coordinates(coordinates):
    hess = _quadratic()
    theta = torch.nn.Parameter(torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    base = torch.optim.Adam([theta], lr=1e-2)
    opt = OSFN(base=base, subspace_dim=D, coordinates=coordinates, newton_lr=0.0, noise_damping=False)
    _noisy_steps(opt, theta, hess, 400, torch.Generator().manual_seed(2))
    fitted = max(abs(e) for e in opt.diagnostics["eigenvalues"])
    sigma = _sigma(base, theta)
    in_z = float(torch.linalg.eigvalsh(sigma[:, None] * hess * sigma[None, :]).abs().max())
    in_theta = float(torch.linalg.eigvalsh(hess).abs().max())
    assert in_theta > 100 * in_z  # the two coordinate systems disagree by orders of magnitude
    truth = in_z if coordinates == "preconditioned" else in_theta
    assert truth / 3 < fitted < truth * 3, (coordinates, fitted, in_z, in_theta)


def test_newton_move_is_mapped_back_by_sigma():
    """With π = 1 the move added to Adam's step is σ ⊙ V s: divided by σ it lies in the
    subspace V the step started with; the raw move does not."""
    hess = _quadratic()
    theta = torch.nn.Parameter(torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    opt = OSFN(base=torch.optim.Adam([theta], lr=1e-2), subspace_dim=2, coordinates="preconditioned",
               newton_warmup=2, noise_damping=False)
    gen = torch.Generator().manual_seed(2)
    _noisy_steps(opt, theta, hess, 40, gen)
    grad = hess @ theta.detach() + 0.3 * SCALES * torch.randn(D, dtype=torch.float64, generator=gen)
    alone = copy.deepcopy(opt.base)  # the same Adam state, stepping without OSFN
    alone_theta = alone.param_groups[0]["params"][0]
    sigma = _sigma(opt.base, theta)  # before the step: the σ OSFN maps with
    basis, _ = torch.linalg.qr(opt.basis)  # V is re-orthonormalised on a cadence only
    theta.grad, alone_theta.grad = grad.clone(), grad.clone()
    opt.step()
    alone.step()
    move = theta.detach() - alone_theta.detach()
    assert float(torch.linalg.vector_norm(move)) > 1e-6  # the Newton step is on

    def outside(vec):
        return float(torch.linalg.vector_norm(vec - basis @ (basis.T @ vec)) / torch.linalg.vector_norm(vec))

    assert outside(move / sigma) < 1e-8
    assert outside(move) > 1e-2


def test_first_step_is_the_base_alone():
    """Adam has no second moments before its first step: OSFN lets it step alone."""
    theta = torch.nn.Parameter(torch.ones(D, dtype=torch.float64))
    twin = torch.nn.Parameter(torch.ones(D, dtype=torch.float64))
    opt = OSFN(base=torch.optim.Adam([theta], lr=0.1), coordinates="preconditioned", newton_warmup=0)
    ref = torch.optim.Adam([twin], lr=0.1)
    theta.grad, twin.grad = SCALES.clone(), SCALES.clone()
    opt.step()
    ref.step()
    assert torch.equal(theta.detach(), twin.detach())


def test_bad_setups_are_refused():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ConfigError, match="second moments"):
        OSFN(base=torch.optim.SGD([p], lr=0.1, momentum=0.9), coordinates="preconditioned")
    with pytest.raises(ConfigError, match="coordinates"):
        OSFN([p], coordinates="natural")
    opt = OSFN([p], lr=0.1, coordinates="preconditioned")
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["coordinates"] = "parameters"
    p.grad = torch.ones(3)
    with pytest.raises(ConfigError, match="cannot change"):
        opt.step()


def test_the_adam_preconditioned_preset_configures_a_wrapping_osfn():
    from osfn_dist import ADAM_PRECONDITIONED

    p = torch.nn.Parameter(torch.ones(3))
    opt = OSFN(base=torch.optim.AdamW([p], lr=0.1), **ADAM_PRECONDITIONED)
    assert opt.config.coordinates == "preconditioned"
    with pytest.raises(ConfigError, match="second moments"):  # the preset says what it needs
        OSFN(base=torch.optim.SGD([p], lr=0.1), **ADAM_PRECONDITIONED)
