"""The Triton passes over V (core.triton_pass), run on the CPU in Triton's interpreter, in a
pytest of its own that ``tests/test_triton_pass.py`` starts with TRITON_INTERPRET=1 (it must
be set before triton is first imported, which torch.compile elsewhere in the suite does). Each
pass against its float64 formula (float32 and bfloat16 V, a power-of-two d and not), the
bfloat16 stores' stochastic rounding, and OSFN(kernels='triton') end to end against the C
loops of kernels='auto'. The same kernels compile for a GPU (tests/test_gpu.py there)."""
import os

import pytest
import torch

from osfn_dist import OSFN, ConfigError
from osfn_dist.core import triton_pass


if os.environ.get("TRITON_INTERPRET") != "1":  # triton.language's own functions are decorated at import
    raise RuntimeError("run under TRITON_INTERPRET=1 from the start (tests/test_triton_pass.py does)")


def _close_to_storage(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype):
    """float32 V: to float32 sums; bfloat16 V: within one bfloat16 step of the exact value
    (stochastic rounding lands on one of the two neighbours)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)
    else:
        assert ((got.double() - exact).abs() <= exact.abs() * 2.0 ** -7 + 1e-6).all()


@pytest.mark.parametrize("d", [8, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_pass_matches_its_float64_formula(d, dtype):
    gen = torch.Generator().manual_seed(d)
    total = 9_001  # several programs, the last one short
    vt = torch.randn(d, total, generator=gen).to(dtype)
    v64 = vt.double()
    g, u, p = (torch.randn(total, generator=gen) for _ in range(3))
    coef, a, c = torch.randn(d, generator=gen), torch.randn(d, generator=gen), 0.01 * torch.randn(d, generator=gen)
    assert triton_pass.usable(vt, g, u, p)

    both, sq = triton_pass.project_pair(vt, g, u)
    torch.testing.assert_close(both, torch.stack([v64 @ g.double(), v64 @ u.double()]), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(sq, torch.stack([g.double().square().sum(), u.double().square().sum()]), rtol=1e-6, atol=0)
    only_g, sq_g = triton_pass.project_pair(vt, g, None)
    assert (only_g[1] == 0).all() and sq_g[1] == 0
    torch.testing.assert_close(triton_pass.gram(vt), v64 @ v64.T, rtol=1e-5, atol=1e-3)

    w = vt.clone()
    move, q, sums = triton_pass.move_and_update_(w, coef, a, u, p, c)
    exact_move = coef.double() @ v64
    r = u.double() - a.double() @ v64
    torch.testing.assert_close(move.double(), exact_move, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(q, v64 @ p.double(), rtol=1e-5, atol=1e-3)  # V before the update
    diff = exact_move - p.double()
    torch.testing.assert_close(sums, torch.stack([r @ diff, p.double() @ p.double(), diff @ diff]), rtol=1e-5, atol=1e-2)
    _close_to_storage(w, v64 + c.double()[:, None] * r[None, :], dtype)
    unchanged = vt.clone()
    triton_pass.move_and_update_(unchanged, coef, a, u, p, None)
    assert torch.equal(unchanged, vt)  # no c: V is only read

    m = torch.randn(d, d, generator=gen)
    w = vt.clone()
    triton_pass.right_multiply_(w, m, c, u)
    _close_to_storage(w, m.double().T @ v64 + c.double()[:, None] * u.double()[None, :], dtype)
    w = vt.clone()
    triton_pass.right_multiply_(w, m)
    _close_to_storage(w, m.double().T @ v64, dtype)


def test_bfloat16_stores_round_stochastically_and_unbiased():
    """1 + δ with δ a third of bfloat16's step at 1 (2⁻⁷): round-to-nearest would store 1
    everywhere (bias −δ); the stochastic stores reach 1 + 2⁻⁷ on a third of the elements."""
    d, total = 8, 20_000
    vt = torch.ones(d, total, dtype=torch.bfloat16)
    delta = 2.0 ** -7 / 3
    zeros = torch.zeros(d)
    triton_pass.move_and_update_(vt, zeros, zeros, torch.full((total,), delta), torch.zeros(total), torch.ones(d))
    values = set(vt.unique().tolist())
    assert values == {1.0, 1.0 + 2.0 ** -7}
    up = (vt.float() > 1).float().mean().item()
    assert abs(up - 1 / 3) < 0.01, up  # binomial sd 0.0012
    bias = (vt.double() - 1 - delta).mean().item()
    assert abs(bias) < 0.05 * delta, bias
    again = torch.ones(d, total, dtype=torch.bfloat16)  # the seed is the coefficients': a rerun rounds alike
    triton_pass.move_and_update_(again, zeros, zeros, torch.full((total,), delta), torch.zeros(total), torch.ones(d))
    assert torch.equal(again, vt)


def _train(steps=30, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.Tanh(), torch.nn.Linear(48, 4))
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 4, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_osfn_with_triton_kernels_follows_the_c_loops(monkeypatch):
    """kernels='triton' (its passes counted) lands where kernels='auto' (the C loops) does:
    float32 V to float32 rounding; a bfloat16 V near the C loops' bfloat16 run, far closer
    than either is to float32 (the two dither differently)."""
    calls = {}
    for name in ("project_pair", "move_and_update_", "gram"):
        real = getattr(triton_pass, name)
        monkeypatch.setattr(triton_pass, name,
                            lambda *a, _real=real, _name=name, **k: (calls.__setitem__(_name, calls.get(_name, 0) + 1),
                                                                    _real(*a, **k))[1])
    triton32 = _train(kernels="triton")
    assert calls["project_pair"] >= 20 and calls["move_and_update_"] >= 20, calls
    c32 = _train()
    torch.testing.assert_close(triton32, c32, rtol=1e-5, atol=1e-6)
    before = dict(calls)
    triton16 = _train(kernels="triton", basis_dtype="bfloat16")
    assert calls["move_and_update_"] - before["move_and_update_"] >= 20
    c16 = _train(basis_dtype="bfloat16")
    gap = (c16 - c32).abs().max().item()
    assert gap > 1e-3  # bfloat16 storage does change the run
    assert (triton16 - c16).abs().max().item() < 0.2 * gap


def test_triton_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    model = torch.nn.Linear(4, 2)
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=2, kernels="triton")
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ConfigError, match="kernels='triton'.*CUDA"):
        opt.step()
