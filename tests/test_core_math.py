"""The curvature model's pieces, each against a known answer."""
import pytest
import torch

from osfn_dist import OSFN, InvalidReportError
from osfn_dist.core.eigen import offdiag_ratio, qr_step, qr_sweep, track_eigenbasis
from osfn_dist.core.regression import solve_symmetric_hessian
from osfn_dist.core.saddle_free import saddle_free_step
from osfn_dist.core.subspace import cholesky_qr2, new_basis, project_pair, right_multiply_

D64 = torch.float64


def random_symmetric(d, seed, eigenvalues=None):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    lam = eigenvalues if eigenvalues is not None else torch.randn(d, generator=g, dtype=D64) * 3
    return q @ torch.diag(lam) @ q.T, lam


def test_qr_steps_converge_to_eigh():
    h, lam = random_symmetric(8, 0, torch.tensor([5.0, -3.0, 2.0, 1.0, -0.5, 0.25, 4.0, -7.0], dtype=D64))
    q = torch.eye(8, dtype=D64)
    for _ in range(60):  # the online method: a couple of QR steps per call, warm-started
        ev, q, fallback = track_eigenbasis(h, q, method="qr", tol=1.0)
        assert not fallback
    ref = torch.linalg.eigvalsh(h)
    assert torch.allclose(torch.sort(ev).values, ref, atol=1e-8)
    assert torch.allclose(q @ torch.diag(ev) @ q.T, h, atol=1e-8)
    assert torch.allclose(q.T @ q, torch.eye(8, dtype=D64), atol=1e-10)


def test_qr_step_is_a_similarity_transform_that_diagonalises():
    h, _ = random_symmetric(6, 1)
    a, q = qr_step(h)
    assert torch.allclose(q.T @ h @ q, a, atol=1e-10)
    a, q = qr_sweep(h, 40)
    assert torch.allclose(q.T @ h @ q, a, atol=1e-10)
    assert offdiag_ratio(a) < 1e-10


def test_eigh_fallback_when_qr_has_not_converged():
    h, _ = random_symmetric(6, 2)
    ev, q, fallback = track_eigenbasis(h, torch.eye(6, dtype=D64), method="qr", tol=1e-12, qr_steps=1)
    assert fallback
    assert torch.allclose(torch.sort(ev).values, torch.linalg.eigvalsh(h), atol=1e-10)


def test_lyapunov_solve_recovers_symmetric_hessian():
    h, _ = random_symmetric(5, 3)
    a = torch.randn(5, 5, generator=torch.Generator().manual_seed(4), dtype=D64)
    sigma = a @ a.T + 0.1 * torch.eye(5, dtype=D64)
    c = h @ sigma  # exact regression: Cov(y, x) = H Σ
    est = solve_symmetric_hessian(sigma, c, ridge=1e-12)
    assert torch.allclose(est, h, atol=1e-6)


def test_saddle_free_step_descends_along_negative_curvature_and_respects_caps():
    g = torch.tensor([1.0, 1.0, 1.0], dtype=D64)
    lam = torch.tensor([2.0, -2.0, 1e-6], dtype=D64)
    s = saddle_free_step(g, lam, newton_lr=1.0, eig_floor=0.5, trust_radius=100.0)
    # |λ|: both curvature signs give a descent step −g/|λ|; the floor caps the flat direction
    assert torch.allclose(s, torch.tensor([-0.5, -0.5, -2.0], dtype=D64))
    s = saddle_free_step(g, lam, newton_lr=1.0, eig_floor=0.5, trust_radius=0.1)
    assert torch.linalg.vector_norm(s) == pytest.approx(0.1)


def test_cholesky_qr2_orthonormalises_and_keeps_the_span():
    v = torch.randn(1000, 6, generator=torch.Generator().manual_seed(5)) * torch.tensor([1, 10, 0.1, 1, 3, 1.0])
    q = cholesky_qr2(v.clone())
    assert torch.allclose(q.T @ q, torch.eye(6), atol=1e-5)
    # same span: projecting v onto q reproduces v
    assert torch.allclose(q @ (q.T @ v), v, atol=1e-3)


def test_noisy_quadratic_eigenvalues_converge():
    """Whole space = subspace (D = d = 4): positions are known exactly, so the online
    regression must recover the Hessian's spectrum from noisy gradients alone."""
    torch.manual_seed(0)
    lam = torch.tensor([4.0, 1.5, 0.8, 0.3])
    h, _ = random_symmetric(4, 6, lam.double())
    h = h.float()
    theta = torch.nn.Parameter(torch.randn(4))
    opt = OSFN([theta], lr=0.05, complement="sgd", subspace_dim=4, forgetting=0.002, newton_lr=0.3, eig_floor=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(6000):
        theta.grad = h @ theta.detach() + 0.1 * torch.randn(4, generator=g)
        opt.step()
    est = torch.tensor(sorted(opt.diagnostics["eigenvalues"]), dtype=torch.float64)
    assert torch.allclose(est, torch.sort(lam).values.double(), rtol=0.2), est


def test_online_pca_finds_the_curved_subspace():
    """D = 40, curvature only inside a hidden 4-dim subspace: the basis must find it and
    the fitted spectrum must be the true one (noise-free gradients)."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 4))
    lam = torch.tensor([4.0, 1.5, 0.8, 0.3])
    h = u @ torch.diag(lam) @ u.T
    theta = torch.nn.Parameter(torch.randn(40))
    opt = OSFN([theta], lr=0.05, complement="sgd", subspace_dim=4, forgetting=0.02, newton_lr=0.3, eig_floor=0.05)
    for _ in range(200):
        theta.grad = h @ theta.detach()
        opt.step()
    cosines = torch.linalg.svdvals(u.T @ opt.basis)
    assert cosines.min() > 0.999, cosines
    # the loss fell by orders of magnitude inside the subspace
    assert float((u.T @ theta.detach()).norm()) < 0.05


def _saddle_grad(t):
    # f(a, b) = a²/2 − b²/2 + b⁴/4: strict saddle at 0, minima at (0, ±1)
    a, b = t
    return torch.stack([a, -b + b**3])


def test_osfn_escapes_a_strict_saddle_that_attracts_exact_newton():
    start = torch.tensor([1.0, 1e-2])
    # exact Newton: the negative curvature attracts it into the saddle
    x = start.clone()
    for _ in range(20):
        h = torch.diag(torch.stack([torch.tensor(1.0), -1 + 3 * x[1] ** 2]))
        x = x - torch.linalg.solve(h, _saddle_grad(x))
    assert float(x.norm()) < 1e-6

    theta = torch.nn.Parameter(start.clone())
    opt = OSFN([theta], lr=0.05, complement="sgd", subspace_dim=2, newton_warmup=5, forgetting=0.2,
               newton_lr=1.0, eig_floor=0.1, trust_radius=0.5, noise_damping=False)
    saw_negative = 0
    for _ in range(150):
        theta.grad = _saddle_grad(theta.detach())
        opt.step()
        saw_negative = max(saw_negative, opt.diagnostics["negative_curvature"])
    assert saw_negative >= 1  # the fitted model saw the negative-curvature direction
    assert abs(float(theta[1])) > 0.99 and abs(float(theta[0])) < 0.01  # and left along it to a minimum


def test_service_rejects_overflowing_report_and_keeps_its_state():
    from osfn_dist import CurvatureService, OSFNConfig
    from osfn_dist.dataflow.messages import Report

    svc = CurvatureService(OSFNConfig(subspace_dim=2))
    for step in range(1, 6):
        upd = svc.exchange(Report(step=step, basis_version=svc.version, grad_coords=torch.tensor([0.1, -0.2], dtype=D64),
                                  grad_sqnorm=1.0, residual_sqnorm=0.9))
    before = svc.state_dict()
    with pytest.raises(InvalidReportError, match="overflow"):
        svc.exchange(Report(step=6, basis_version=upd.new_version, grad_coords=torch.tensor([1e200, 1e200], dtype=D64),
                            grad_sqnorm=1e300, residual_sqnorm=1e300))
    after = svc.state_dict()
    assert after["scalars"] == before["scalars"]
    for k, v in before["stats"].items():
        assert torch.equal(after["stats"][k], v)
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v)


@pytest.mark.parametrize("where", ["regression", "carry"])
def test_an_exchange_that_fails_midway_leaves_the_service_exactly_as_it_was(monkeypatch, where):
    """The service backs its state up by a shallow copy, which is complete only while every
    update rebinds its tensors: a failure after the statistics, energies and position moved
    (in the Hessian solve) or after the basis transform and a newborn direction (in _carry)
    must leave every tensor as it was, bit for bit."""
    from osfn_dist import CurvatureService, OSFNConfig
    from osfn_dist.dataflow import curvature
    from osfn_dist.dataflow.messages import Report

    gen = torch.Generator().manual_seed(0)
    svc = CurvatureService(OSFNConfig(subspace_dim=4))

    def report(step):
        y = torch.randn(4, generator=gen, dtype=D64)
        return Report(step=step, basis_version=svc.version, grad_coords=y, grad_sqnorm=float(y @ y) + 1.0,
                      residual_sqnorm=1.0, prev_step_coords=0.01 * torch.randn(4, generator=gen, dtype=D64))

    for step in range(1, 3 if where == "carry" else 9):  # "carry": while directions are still being born
        svc.exchange(report(step))
    before = svc.state_dict()

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    if where == "regression":
        monkeypatch.setattr(curvature, "solve_symmetric_hessian", boom)
    else:
        real = CurvatureService._carry

        def carry_then_fail(self, transform):
            real(self, transform)
            assert bool(self.alive.sum() > 2)  # a direction was born in this exchange
            boom()

        monkeypatch.setattr(CurvatureService, "_carry", carry_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        svc.exchange(report(9))
    after = svc.state_dict()
    assert after["scalars"] == before["scalars"]
    for part in ("stats", "tensors"):
        for k, v in before[part].items():
            assert torch.equal(after[part][k], v), (part, k)


def test_in_place_basis_products_match_plain_ones_across_slices():
    """V ← V m runs slice by slice (slices of 2^18 rows at this size): three slices, the last
    one short, must give exactly what one product gives; the paired projection must equal
    two separate ones."""
    gen = torch.Generator().manual_seed(0)
    rows, d = 600_001, 8
    basis = new_basis(rows, d)
    basis.copy_(torch.randn(rows, d, generator=gen))
    m = torch.randn(d, d, generator=gen)
    expected = basis @ m
    out = right_multiply_(basis, m)
    assert out.data_ptr() == basis.data_ptr() and out.T.is_contiguous()  # in place, direction-major
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    pair = torch.randn(2, rows, generator=gen)
    a, b = project_pair(basis, pair)
    exact = basis.double().T @ pair.double().T  # float32 sums of 600k terms: compare relative
    torch.testing.assert_close(a.double(), exact[:, 0], rtol=1e-4, atol=0)
    torch.testing.assert_close(b.double(), exact[:, 1], rtol=1e-4, atol=0)


def _random_update(gen, d, step, rotate, rank1, reorth):
    from osfn_dist.dataflow.messages import DirectionUpdate

    rotation = torch.eye(d, dtype=D64) + 0.1 * torch.randn(d, d, generator=gen, dtype=D64) if rotate else None
    return DirectionUpdate(step=step, base_version=step - 1, new_version=step,
                           step_coef=torch.randn(d, generator=gen, dtype=D64) * 1e-2, rotation=rotation,
                           residual_coef=torch.randn(d, generator=gen, dtype=D64) * 1e-3 if rank1 else None,
                           complement_keep=1.0, reorthonormalize=reorth)


@pytest.mark.parametrize("rotate,rank1,reorth", [(True, True, False), (False, True, False), (False, False, False),
                                                 (True, True, True)])
@pytest.mark.parametrize("lazy,max_cond", [(False, None), (True, float("inf")), (True, 1.0)])
def test_fused_move_and_update_equals_the_composition(rotate, rank1, reorth, lazy, max_cond, monkeypatch):
    """The one-pass apply hop (slices of V in cache; several slices and a short last one at
    this size) gives what Vᵀp, newton_move and update_basis give in turn — over four steps,
    also when the rotations are only composed in d × d (lazy) and V R is the basis: the
    moves, the subspace coordinates of the step, rᵀΔθ and V R all agree. Lazy, the
    re-orthonormalisation is composed into R too, without a write of V (these random
    rotations are far from orthogonal: ``max_cond`` ∞ lets R drift; at 1 R must be applied
    and V re-orthonormalised instead)."""
    import osfn_dist.core.subspace as subspace
    import osfn_dist.dataflow.apply as apply
    from osfn_dist.dataflow.apply import move_and_update, newton_move, update_basis

    if max_cond is not None:
        monkeypatch.setattr(subspace, "LAZY_MAX_COND", max_cond)
    writes = []
    monkeypatch.setattr(apply, "right_multiply_", lambda *a, **k: writes.append(1) or subspace.right_multiply_(*a, **k))

    gen = torch.Generator().manual_seed(3)
    rows, d = 100_003, 8
    basis = new_basis(rows, d, dtype=D64)
    basis.copy_(torch.linalg.qr(torch.randn(rows, d, generator=gen, dtype=D64))[0])
    ref_basis, pending = basis.clone(), None
    for step in range(1, 5):
        u, p = torch.randn(rows, generator=gen, dtype=D64), torch.randn(rows, generator=gen, dtype=D64) * 1e-2
        update = _random_update(gen, d, step, rotate, rank1, reorth and step == 3)
        a = ref_basis.T @ u  # what the report carries: projections on the current basis V R
        move_ref, coords_ref, residual = newton_move(ref_basis, p, None, update.step_coef, 1.0, source=u, source_coords=a)
        dot_ref = float(residual @ (move_ref - p))
        ref_basis = update_basis(ref_basis, residual, update)
        move, coords, dot, basis, pending, _ = move_and_update(basis, p, update.step_coef, update, u, a,
                                                            pending=pending, lazy=lazy)
        torch.testing.assert_close(move, move_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(coords, coords_ref, rtol=1e-9, atol=1e-12)
        assert dot == pytest.approx(dot_ref, rel=1e-8)
        current = basis if pending is None else basis @ pending
        torch.testing.assert_close(current, ref_basis, rtol=1e-9, atol=1e-11)
        assert basis.T.is_contiguous()
        folded = reorth and step == 3 and (not lazy or max_cond == 1.0)
        assert (pending is not None) == (lazy and not folded)
        assert len(writes) == (lazy and folded)  # R applied to V only where it must be
        writes.clear()


def test_slices_of_v_fit_a_cpu_cache_and_stay_few_on_a_gpu():
    from osfn_dist.core.subspace import _chunk_columns

    d, total = 8, 1_000_000_000  # 1B parameters
    cpu = _chunk_columns(d, total, 4)
    assert cpu * d * 4 <= 1 << 20  # a slice fits half of an L2 cache
    gpu = _chunk_columns(d, total, 4, device="cuda")
    assert -(-total // gpu) <= 64  # kernel launches per pass stay bounded
