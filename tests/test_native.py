"""The native CPU passes over V (core.native): each against a float64 torch reference, with
sizes that are not multiples of the C loops' blocks; bit-for-bit repeatable; used by the
optimizer by default; and a missing compiler falls back to torch with a warning."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from osfn_dist.core import native
from osfn_dist.core.subspace import new_basis

HAS_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
needs_native = pytest.mark.skipif(not HAS_CC, reason="no C compiler")
D64 = torch.float64


def _basis(rows, d, seed):
    gen = torch.Generator().manual_seed(seed)
    basis = new_basis(rows, d)
    basis.copy_(torch.randn(rows, d, generator=gen) / rows**0.5)
    return basis, gen


def test_the_kernels_build_wherever_there_is_a_compiler():
    if not HAS_CC:
        pytest.skip("no C compiler")
    assert native.available(), native.why_not()


@needs_native
@pytest.mark.parametrize("rows, d, rank1", [(5_003, 8, True), (2_049, 1, False), (3_001, 13, True), (1_500, 20, True)])
def test_move_and_update_matches_the_float64_formula(rows, d, rank1):
    basis, gen = _basis(rows, d, rows)
    v = basis.double().clone()
    coef, a, c = (torch.randn(d, generator=gen) for _ in range(3))
    u, p = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    move, q, sums = native.move_and_update_(basis.T, coef, a, u, p, c if rank1 else None)
    move_ref = v @ coef.double()
    r = u.double() - v @ a.double()
    torch.testing.assert_close(move.double(), move_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q, v.T @ p.double(), rtol=1e-5, atol=1e-5)
    step = move_ref - p.double()
    torch.testing.assert_close(sums, torch.stack([r @ step, p.double() @ p.double(), step @ step]), rtol=1e-5, atol=1e-4)
    v_new = v + torch.outer(r, c.double()) if rank1 else v
    torch.testing.assert_close(basis.double(), v_new, rtol=1e-5, atol=1e-5)
    assert basis.T.is_contiguous()


@needs_native
@pytest.mark.parametrize("rows, d, rank1", [(4_099, 8, False), (1_029, 5, True), (777, 16, True), (301, 20, True), (11, 300, True)])
def test_right_multiply_matches_the_float64_product(rows, d, rank1):
    basis, gen = _basis(rows, d, rows)
    v = basis.double().clone()
    m = torch.randn(d, d, generator=gen, dtype=D64)
    c, r = torch.randn(d, generator=gen), torch.randn(rows, generator=gen)
    native.right_multiply_(basis.T, m, c if rank1 else None, r if rank1 else None)
    ref = v @ m + (torch.outer(r.double(), c.double()) if rank1 else 0)
    torch.testing.assert_close(basis.double(), ref, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("d", [8, 3, 20])  # 20: beyond the register kernels' 16 directions
def test_project_pair_and_gram_match_torch(d):
    rows = 6_007
    basis, gen = _basis(rows, d, 1)
    v = basis.double()
    g, u = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    both, sq = native.project_pair(basis.T, g, u)
    torch.testing.assert_close(both, torch.stack([v.T @ g.double(), v.T @ u.double()]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq, torch.stack([g.double() @ g.double(), u.double() @ u.double()]), rtol=1e-5, atol=1e-3)
    only_g, sq_g = native.project_pair(basis.T, g, None)
    torch.testing.assert_close(only_g[0], both[0], rtol=1e-5, atol=1e-6)
    assert float(only_g[1].abs().max()) == 0.0 and float(sq_g[1]) == 0.0
    torch.testing.assert_close(native.gram(basis.T), v.T @ v, rtol=1e-5, atol=1e-6)


@needs_native
@needs_native
def test_move_into_params_measures_the_step_and_moves_the_parameters():
    """p = before − θ and θ ← θ + V coef, parameter by parameter, with parameter boundaries
    inside the C loop's blocks (and an empty parameter)."""
    sizes = [7, 1_500, 0, 1, 2_600, 3]
    rows, d = sum(sizes), 6
    basis, gen = _basis(rows, d, 9)
    v = basis.double().clone()
    params = [torch.randn(n, generator=gen) for n in sizes]
    theta = torch.cat(params).double()
    before = (theta + 0.01 * torch.randn(rows, generator=gen, dtype=D64)).float()
    coef, a, c = (torch.randn(d, generator=gen) for _ in range(3))
    u = torch.randn(rows, generator=gen)
    versions = [t._version for t in params]
    q, sums = native.move_into_params_(basis.T, coef, a, u, before, params, c)
    assert all(t._version > v for t, v in zip(params, versions))  # as an in-place add_ would
    p = before.double() - theta
    move = v @ coef.double()
    torch.testing.assert_close(torch.cat(params).double(), theta + move, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q, v.T @ p, rtol=1e-4, atol=1e-6)
    r = u.double() - v @ a.double()
    step = move - p
    torch.testing.assert_close(sums, torch.stack([r @ step, p @ p, step @ step]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(basis.double(), v + torch.outer(r, c.double()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="elements"):
        native.move_into_params_(basis.T, coef, a, u, before, params[:-1], c)


@needs_native
def test_collect_projects_from_the_parameters_own_buffers():
    shapes = [(3, 5), (1_030,), (0,), (40, 60), (1,)]
    params = [torch.randn(*sh) for sh in shapes]
    grads = [torch.randn(*sh) for sh in shapes]
    means = [torch.randn(*sh) for sh in shapes]
    rows, d = sum(p.numel() for p in params), 8
    basis, _ = _basis(rows, d, 11)
    u, before = torch.full((rows,), float("nan")), torch.full((rows,), float("nan"))
    both, sq = native.collect(basis.T, grads, means, params, u, before)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    g, m = flat(grads).double(), flat(means)
    assert torch.equal(u, m) and torch.equal(before, flat(params))
    v = basis.double()
    torch.testing.assert_close(both, torch.stack([v.T @ g, v.T @ m.double()]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq, torch.stack([g @ g, m.double() @ m.double()]), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="size"):
        native.collect(basis.T, grads[:-1] + [torch.zeros(2)], means, params, u, before)


def test_the_move_goes_into_a_given_buffer():
    basis, gen = _basis(3_001, 4, 5)
    coef, a = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    u, p = torch.randn(3_001, generator=gen), torch.randn(3_001, generator=gen)
    buf = torch.full((3_001,), float("nan"))
    move, _, _ = native.move_and_update_(basis.T, coef, a, u, p, None, out=buf)
    assert move.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(move.double(), basis.double() @ coef.double(), rtol=1e-5, atol=1e-5)


def test_the_passes_repeat_bit_for_bit():
    basis, gen = _basis(50_001, 8, 2)
    coef, a = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    u, p = torch.randn(50_001, generator=gen), torch.randn(50_001, generator=gen)
    first = native.move_and_update_(basis.T, coef, a, u, p, None)
    again = native.move_and_update_(basis.T, coef, a, u, p, None)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert torch.equal(native.gram(basis.T), native.gram(basis.T))


def _train(kernels, steps=60):
    from osfn_dist import OSFN

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = OSFN(model.parameters(), lr=0.01, kernels=kernels)
    x = torch.randn(256, 20)
    y = x[:, :1] ** 2
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), opt.diagnostics


@needs_native
def test_the_optimizer_uses_the_native_passes_by_default_and_agrees_with_torch(monkeypatch):
    calls = {"move": 0, "project": 0, "write": 0}
    real_move, real_project, real_write = native.move_into_params_, native.collect, native.right_multiply_

    def move(*args, **kwargs):
        calls["move"] += 1
        return real_move(*args, **kwargs)

    def project(*args, **kwargs):
        calls["project"] += 1
        return real_project(*args, **kwargs)

    def write(*args, **kwargs):
        calls["write"] += 1
        return real_write(*args, **kwargs)

    monkeypatch.setattr(native, "move_into_params_", move)
    monkeypatch.setattr(native, "collect", project)
    monkeypatch.setattr(native, "right_multiply_", write)
    theta_native, diag_native = _train("auto")
    assert calls["move"] > 40 and calls["project"] > 40  # every step once the directions are filled
    # re-orthonormalisation (steps 16, 32, 48) composed in d × d once the directions are
    # full: V itself is rewritten only on the first (V ← V R, then CholeskyQR2's two; 9 writes
    # when every one rewrote V)
    assert calls["write"] <= 3
    before = dict(calls)
    theta_eager, diag_eager = _train("eager")
    assert calls == before  # "eager" never calls them
    torch.testing.assert_close(theta_native, theta_eager, rtol=1e-4, atol=1e-5)
    for key in ("step_norm", "complement_step_norm"):
        assert diag_native[key] == pytest.approx(diag_eager[key], rel=1e-4)


def test_without_a_compiler_the_optimizer_falls_back_to_torch(tmp_path):
    """CC names a compiler that fails and the cache is empty: a warning, then eager torch."""
    code = (
        "import logging, torch; logging.basicConfig()\n"
        "from osfn_dist.core import native\n"
        "from osfn_dist import OSFN\n"
        "m = torch.nn.Linear(30, 30); opt = OSFN(m.parameters(), lr=0.01, subspace_dim=4)\n"
        "for _ in range(30):\n"
        "    opt.zero_grad(); m(torch.randn(8, 30)).square().mean().backward(); opt.step()\n"
        "assert not native.available()\n"
        "print('fell back:', native.why_not())\n"
    )
    env = {**os.environ, "CC": "/bin/false", "OSFN_DIST_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fell back: /bin/false failed" in out.stdout
    assert "native CPU kernels unavailable" in out.stderr and "eager torch path" in out.stderr
    assert not list(tmp_path.glob("*.so"))


# ------------------------------------------------------------------ bfloat16 basis
def _bf16_basis(rows, d, seed):
    basis, gen = _basis(rows, d, seed)
    return basis.to(torch.bfloat16), gen  # direction-major kept


@needs_native
@pytest.mark.parametrize("rows, d", [(5_003, 8), (3_001, 13), (1_500, 20)])
def test_a_bfloat16_basis_is_read_exactly_and_written_within_one_unit_in_the_last_place(rows, d):
    """The bfloat16 passes read V widened to float32: the same results as the float32 passes
    on the same values — the move (no reduction) to the last bit with the vector-register
    kernels (d <= 16), the sums over D to float32 rounding (the two builds may vectorise a
    reduction in another order: on an AVX2 machine Vᵀp differed in its last bit); their writes
    (the rank-1 update, V m) land on one of the two bfloat16 neighbours of the float32 result."""
    same = torch.equal if d <= 16 else lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-5)
    close = lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-5)  # noqa: E731
    vb, gen = _bf16_basis(rows, d, rows)
    vf = vb.float()  # the same values in float32
    g, u, p = (torch.randn(rows, generator=gen) for _ in range(3))
    coef, a, c = torch.randn(d, generator=gen), torch.randn(d, generator=gen), torch.randn(d, generator=gen) * 1e-2
    for x, y in zip(native.project_pair(vf.T, g, u), native.project_pair(vb.T, g, u)):
        assert close(x, y)
    assert close(native.gram(vf.T), native.gram(vb.T))
    wf, wb = vf.clone(), vb.clone()
    (move_f, *sums_f), (move_b, *sums_b) = (native.move_and_update_(wf.T, coef, a, u, p, c),
                                            native.move_and_update_(wb.T, coef, a, u, p, c))
    assert same(move_f, move_b)  # move, Vᵀp and the sums come from V before its update
    assert all(close(x, y) for x, y in zip(sums_f, sums_b))
    m = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    rf, rb = vf.clone(), vb.clone()
    native.right_multiply_(rf.T, m)
    native.right_multiply_(rb.T, m)
    for exact, stored in ((wf, wb), (rf, rb)):
        lo = exact.to(torch.bfloat16)  # round to nearest: within half a unit
        ulp = (exact.abs() * 2.0**-7).clamp_min(1e-30)
        assert ((stored.float() - exact).abs() <= ulp).all()
        assert not torch.equal(stored, lo)  # rounded stochastically, not to nearest


@needs_native
def test_stochastic_rounding_of_the_basis_update_is_unbiased():
    """An increment far below bfloat16's resolution (1e-3 on 1.0, whose neighbours are 1 and
    1.0078) survives on average: round-to-nearest would lose it on every element."""
    n = 8192
    total = torch.zeros(n)
    for k in range(32):
        v = torch.ones(1, n, dtype=torch.bfloat16)
        c = torch.tensor([1e-3 * (1 + 1e-6 * k)])  # a new seed each time (the coefficients hash it)
        native.move_and_update_(v, torch.zeros(1), torch.zeros(1), torch.ones(n), torch.zeros(n), c)
        assert set(v.float().unique().tolist()) <= {1.0, 1.0078125}
        total += v.float()[0]
    assert float(total.mean() / 32) == pytest.approx(1.001, abs=1e-4)


def _train_bf16(basis_dtype, steps=120, resume=None, model=None, opt=None):
    from osfn_dist import OSFN

    if model is None:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        opt = OSFN(model.parameters(), lr=0.01, basis_dtype=basis_dtype)
    if resume is not None:  # a saved {"model": ..., "opt": ...}
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
    x = torch.randn(256, 20, generator=torch.Generator().manual_seed(5))
    y = x[:, :1] ** 2
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return model, opt, losses


@needs_native
def test_a_bfloat16_basis_trains_like_float32_on_the_native_path(monkeypatch):
    """basis_dtype='bfloat16': V is stored in bfloat16 from the first step to the last, the
    steps after the directions fill take the one-pass native path (no float32 copy of V),
    the basis stays orthonormal to bfloat16's resolution, and the loss follows the float32
    run's."""
    from osfn_dist.optimizer import OSFN

    widened = []
    real = OSFN._widened_step
    monkeypatch.setattr(OSFN, "_widened_step", lambda self, *a: widened.append(self._steps) or real(self, *a))
    _, opt32, loss32 = _train_bf16("auto")
    assert widened == []  # float32 never widens
    _, opt16, loss16 = _train_bf16("bfloat16")
    assert opt16._basis.dtype == torch.bfloat16 and opt16.basis.dtype == torch.bfloat16
    assert 0 < len(widened) <= 2 * opt16.subspace_dim and max(widened) < 30  # only while the directions fill
    v = opt16.basis.double()
    assert float((v.T @ v - torch.eye(v.shape[1], dtype=D64)).abs().max()) < 2e-2
    assert loss16[-1] < 0.2 * loss16[0]
    assert loss16[-1] == pytest.approx(loss32[-1], rel=0.25)
    assert opt16.state_dict()["osfn"]["basis"].dtype == torch.bfloat16


@needs_native
def test_a_bfloat16_basis_resumes_bit_for_bit(tmp_path):
    """Stochastic rounding is seeded by each pass's own coefficients: a run saved and resumed
    rounds exactly as the uninterrupted one."""
    model, opt, _ = _train_bf16("bfloat16", steps=30)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    full_model, _, _ = _train_bf16("bfloat16", steps=30, model=model, opt=opt)  # the run goes on
    model2, opt2, _ = _train_bf16("bfloat16", steps=30, resume=torch.load(tmp_path / "ck.pt"))
    assert opt2._basis.dtype == torch.bfloat16
    for a, b in zip(full_model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_bfloat16_basis_refuses_what_would_widen_it_every_step():
    from osfn_dist import OSFN, ConfigError

    model = torch.nn.Linear(4, 4)
    for bad in ({"kernels": "eager"}, {"kernels": "compiled"}, {"coordinates": "preconditioned"}):
        with pytest.raises(ConfigError, match="basis_dtype='bfloat16'"):
            OSFN(model.parameters(), lr=0.01, basis_dtype="bfloat16", **bad)
    with pytest.raises(ConfigError, match="basis_dtype"):
        OSFN(model.parameters(), lr=0.01, basis_dtype="float16")
    opt = OSFN(model.parameters(), lr=0.01, basis_dtype="bfloat16")
    opt.param_groups[0]["basis_dtype"] = "auto"
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ConfigError, match="basis_dtype cannot change"):
        opt.step()


@needs_native
def test_a_bfloat16_basis_steps_a_frozen_parameter_through_the_widened_path():
    """A parameter group at lr 0 takes the measured (torch) path every step: V is widened to
    float32 for the step and stored back in bfloat16; the frozen parameter never moves."""
    from osfn_dist import OSFN

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    frozen = model[2].weight.detach().clone()
    base = torch.optim.AdamW([{"params": [model[0].weight, model[0].bias, model[2].bias]},
                              {"params": [model[2].weight], "lr": 0.0}], lr=0.01)
    opt = OSFN(base=base, basis_dtype="bfloat16")
    x = torch.randn(256, 20)
    y = x[:, :1] ** 2
    first = None
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert opt._basis.dtype == torch.bfloat16
    assert torch.equal(model[2].weight, frozen)
    assert float(loss) < 0.5 * first
    assert opt.diagnostics["alive_directions"] == opt.subspace_dim


def test_a_bfloat16_basis_without_the_native_passes_is_a_config_error(monkeypatch):
    """No compiler (or OSFN_DIST_NATIVE=0): a clear error at the first step, which says why
    and what to use instead — not a silent float32 basis or a slow widened one."""
    from osfn_dist import OSFN, ConfigError

    monkeypatch.setattr(native, "stores", lambda dtype: False)
    monkeypatch.setattr(native, "why_not", lambda: "OSFN_DIST_NATIVE=0")
    model = torch.nn.Linear(4, 4)
    opt = OSFN(model.parameters(), lr=0.01, basis_dtype="bfloat16")
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ConfigError, match=r"OSFN_DIST_NATIVE=0.*basis_dtype='auto'"):
        opt.step()
    assert all(p.grad is not None for p in model.parameters())


def test_a_failed_bfloat16_build_leaves_the_float32_passes(monkeypatch):
    """The bfloat16 variant uses more vector builtins than the float32 one: a compiler that
    cannot build it must not take the float32 passes away."""
    real = native._build_one

    def build(defines, suffix=""):
        if defines:
            raise RuntimeError("simulated compiler failure")
        return real(defines, suffix)

    if not HAS_CC:
        pytest.skip("no C compiler")
    monkeypatch.setattr(native, "_build_one", build)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_why_not", None)
    assert native.available() and native.stores(torch.float32) and not native.stores(torch.bfloat16)
