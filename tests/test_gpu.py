"""CUDA correctness (runs where a GPU is present; skipped on CPU-only machines and in CI)."""
import pytest
import torch

from osfn_dist import OSFN

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _train(device, dtype=torch.float32, steps=40, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(device, dtype)
    opt = OSFN(model.parameters(), lr=1e-2, subspace_dim=4, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g).to(device, dtype)
        y = torch.randn(32, 4, generator=g).to(device)
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().float().cpu().reshape(-1) for p in model.parameters()]), opt


def test_cuda_matches_cpu():
    cpu, _ = _train("cpu")
    gpu, opt = _train("cuda")
    assert opt.basis.is_cuda
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)


def test_cuda_bfloat16_params_with_float32_basis():
    params, opt = _train("cuda", torch.bfloat16)
    assert opt.basis.dtype == torch.float32 and torch.isfinite(params).all()


def test_cuda_refuses_a_bfloat16_basis_without_the_triton_kernels():
    """basis_dtype='bfloat16' on a GPU is stored by the Triton passes: with kernels='auto' a
    ConfigError naming the device and the setting that works."""
    from osfn_dist import ConfigError

    with pytest.raises(ConfigError, match="cuda.*kernels='triton'"):
        _train("cuda", steps=1, basis_dtype="bfloat16")


def test_cuda_triton_passes_match_float64():
    """The compiled Triton kernels (core.triton_pass) on the GPU against their float64
    formulas, float32 and bfloat16 V, at a size with thousands of programs."""
    from osfn_dist.core import triton_pass

    gen = torch.Generator().manual_seed(0)
    d, total = 8, 3_000_017
    for dtype in (torch.float32, torch.bfloat16):
        vt = torch.randn(d, total, generator=gen).to(dtype)
        v64 = vt.double()
        g, u, p = (torch.randn(total, generator=gen) for _ in range(3))
        coef, a, c = torch.randn(d, generator=gen), torch.randn(d, generator=gen), 0.01 * torch.randn(d, generator=gen)
        cu = [t.cuda() for t in (vt, g, u, p)]
        assert triton_pass.usable(*cu)
        both, sq = triton_pass.project_pair(cu[0], cu[1], cu[2])
        torch.testing.assert_close(both.cpu(), torch.stack([v64 @ g.double(), v64 @ u.double()]), rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(triton_pass.gram(cu[0]).cpu(), v64 @ v64.T, rtol=1e-4, atol=1e-1)
        move, q, sums = triton_pass.move_and_update_(cu[0], coef, a, cu[2], cu[3], c)
        exact = v64 + c.double()[:, None] * (u.double() - a.double() @ v64)[None, :]
        torch.testing.assert_close(move.cpu().double(), coef.double() @ v64, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(q.cpu(), v64 @ p.double(), rtol=1e-4, atol=1e-2)
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7
        assert ((cu[0].cpu().double() - exact).abs() <= exact.abs() * tol + 1e-5).all()


def test_cuda_osfn_with_triton_kernels_matches_eager():
    """OSFN(kernels='triton') on the GPU follows the eager GPU run (float32 V) and trains with
    a bfloat16 V."""
    eager, _ = _train("cuda")
    fused, opt = _train("cuda", kernels="triton")
    torch.testing.assert_close(fused, eager, rtol=1e-3, atol=1e-4)
    half, opt = _train("cuda", kernels="triton", basis_dtype="bfloat16")
    assert opt.basis.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half - eager).abs().max() < 0.1


def test_cuda_state_dict_round_trip():
    _, opt = _train("cuda", steps=12)
    sd = opt.state_dict()
    assert sd["osfn"]["basis"].is_cuda


def test_cuda_in_place_basis_products_match_cpu():
    """The slice-by-slice V ← V m (several slices, the last one short) and the paired
    projection on the GPU, against the same products on the CPU."""
    from osfn_dist.core.subspace import new_basis, project_pair, right_multiply_

    gen = torch.Generator().manual_seed(0)
    rows, d = 600_001, 8
    cpu = new_basis(rows, d)
    cpu.copy_(torch.randn(rows, d, generator=gen))
    m, pair = torch.randn(d, d, generator=gen), torch.randn(2, rows, generator=gen)
    gpu = new_basis(rows, d, device="cuda")
    gpu.copy_(cpu)
    expected = cpu.double() @ m.double()
    out = right_multiply_(gpu, m.cuda())
    assert out.data_ptr() == gpu.data_ptr()
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-4, atol=1e-4)
    a, b = project_pair(gpu, pair.cuda())
    exact = expected.T @ pair.double().T  # projections onto the rotated basis
    torch.testing.assert_close(torch.stack([a, b], 1).cpu().double(), exact, rtol=1e-3, atol=1e-2)


def test_cuda_osfn_over_fused_adamw_matches_cpu_default():
    """The wrapper on the GPU: OSFN around torch's fused AdamW (CUDA kernel) follows the CPU
    run around the default AdamW."""
    cpu, _ = _train("cpu", weight_decay=0.01)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to("cuda")
    opt = OSFN(base=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, fused=True), subspace_dim=4)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randn(32, 16, generator=g).cuda()
        y = torch.randn(32, 4, generator=g).cuda()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gpu = torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)


def test_cuda_compiled_kernels_match_eager():
    """kernels='compiled' on the GPU (Inductor → Triton) against the eager ops."""
    from osfn_dist.core import kernels

    vt = torch.randn(8, 100_003, device="cuda")
    coef, a, u = torch.randn(8, device="cuda"), torch.randn(8, device="cuda"), torch.randn(100_003, device="cuda")
    move, resid = kernels.expand_residual(vt, coef, a, u)
    assert not kernels._broken
    torch.testing.assert_close(move, coef @ vt, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(resid, u - a @ vt, rtol=1e-4, atol=1e-4)
    eager, _ = _train("cuda")
    fused, _ = _train("cuda", kernels="compiled")
    torch.testing.assert_close(fused, eager, rtol=1e-3, atol=1e-4)


def test_cuda_steady_state_step_waits_for_the_device_about_once():
    """kernels='triton', steady state (directions filled, lazy rotations): one host
    synchronisation per step for the report (every d-sized result in one copy), one more on
    re-orthonormalisation steps (VᵀV to the host), as torch's sync debug mode counts them."""
    from osfn_dist.bench.syncs import host_syncs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).cuda()
    opt = OSFN(base=torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), subspace_dim=4, kernels="triton")
    x, y = torch.randn(32, 16, device="cuda"), torch.randn(32, 4, device="cuda")
    counts = []
    for step in range(80):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        synced = host_syncs(opt.step)
        if step >= 48:
            counts.append(synced)
    assert opt.diagnostics["alive_directions"] == 4
    assert sum(counts) <= len(counts) + len(counts) // 16 + 1, counts
