"""The D-sized half of the subspace: what every worker does with its basis V (D, d).

Only these functions touch D-sized data; they run on the worker's device. The decisions
(how to rotate, which direction to replace) are d-sized and live in ``basis_rule``.
"""
from __future__ import annotations

import torch

from . import native as native_kernels
from . import triton_pass
from .transfer import to_device


def one_pass(native, vt: torch.Tensor | None, *tensors: torch.Tensor | None):
    """The module of one-pass kernels over V for these tensors, or None (the eager torch
    passes then). ``native`` True: the C loops of ``native`` on the CPU (none on a GPU until
    Triton's have been measured there); "triton": ``triton_pass`` (CUDA, or the CPU in
    Triton's interpreter); False: none. Both modules share their signatures."""
    if not native:
        return None
    if native == "triton":
        return triton_pass if triton_pass.usable(vt, *tensors) else None
    return native_kernels if native_kernels.usable(vt, *tensors) else None


def new_basis(rows: int, d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """An empty basis V (rows, d) stored direction-major: the (d, rows) transpose is the
    contiguous tensor. Vᵀx and V c then run as row-wise matrix-vector products, ~1.5–2×
    faster on CPU than with a row-major (rows, d) tensor (bench/step_time.py)."""
    return torch.zeros(d, rows, device=device, dtype=dtype).T


def work_dtype(basis: torch.Tensor) -> torch.dtype:
    """The dtype of the vectors that meet V: V's own, float32 for a bfloat16 V (storage only:
    the native passes widen it as they read it)."""
    return torch.float32 if basis.dtype == torch.bfloat16 else basis.dtype


def _no_bfloat16(basis: torch.Tensor) -> None:
    if basis.dtype == torch.bfloat16:
        raise TypeError("a bfloat16 basis is for the native CPU passes only; this pass needs a float32 V "
                        "(the optimizer widens V for such steps)")


def as_basis_layout(basis: torch.Tensor) -> torch.Tensor:
    """The same values in ``new_basis``'s direction-major layout (copies only if needed)."""
    return basis if basis.T.is_contiguous() else basis.T.contiguous().T


def project(basis: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """Vᵀ v: basis (D, d), vec (D,) → (d,) in float32 or better."""
    _no_bfloat16(basis)
    return basis.T @ vec.to(basis.dtype)


def right_multiply_(basis: torch.Tensor, m: torch.Tensor, rank1: tuple | None = None, native: bool = False) -> torch.Tensor:
    """V ← V m in place, for a direction-major V (D, d) and m (d, d), slice by slice through a
    scratch of at most 1/64 of V. A fresh (d, D) result would cost a second basis in memory
    at the peak and, on CPU, page faults on every call: the in-place form was 2.2× faster at
    1M parameters (bench/step_time.py). ``rank1`` = (c (d,), r (D,)) adds r cᵀ to each slice
    while it is in the scratch, so V m + r cᵀ costs one read and one write of V, not two.
    ``native``: the C loop of ``core.native`` where it applies (float32 on the CPU)."""
    vt = basis.T  # (d, D), contiguous
    passes = one_pass(native, vt, None if rank1 is None else rank1[1]) if vt.numel() else None
    if passes is not None:
        c, r = (None, None) if rank1 is None else (rank1[0].to(torch.float32), rank1[1])
        passes.right_multiply_(vt, m.detach().to("cpu"), c, r)
        return basis
    _no_bfloat16(basis)
    m_t = m.to(device=vt.device, dtype=vt.dtype).T.contiguous()
    add = None
    if rank1 is not None:  # V m + r cᵀ: (d, 1) and (1, D) factors of the transpose's rank-1 term
        c, r = rank1
        add = (c.to(device=vt.device, dtype=vt.dtype).unsqueeze(1), r.to(vt.dtype).reshape(1, -1))
    d, total = vt.shape
    if total == 0 or d == 0:
        return basis
    chunk = min(total, max(1 << 18, -(-total // 64)))
    scratch = torch.empty(d, chunk, dtype=vt.dtype, device=vt.device)
    for start in range(0, total, chunk):
        block = vt[:, start : start + chunk]
        n = block.shape[1]
        torch.mm(m_t, block, out=scratch[:, :n])
        if add is not None:  # + c rᵀ on the slice while it is in cache: no second pass over V
            scratch[:, :n].addmm_(add[0], add[1][:, start : start + n])
        block.copy_(scratch[:, :n])
    return basis


def project_pair(basis: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vᵀa and Vᵀb in one pass over V: ``rows`` (2, D) holds a and b contiguously. One GEMM
    reads V once instead of twice (CPU: 1.4 reads of V in time against 2.0–2.1 for two
    matrix-vector products and 2.4–2.5 for two per cache-sized slice, measured side by side
    at 1.06M parameters, d = 8)."""
    both = basis.T @ rows.to(basis.dtype).T  # (d, 2)
    return both[:, 0], both[:, 1]


def _chunk_columns(d: int, total: int, itemsize: int, budget: int = 1 << 20, device: str = "cpu") -> int:
    """Columns of V's (d, D) transpose per slice. CPU: a slice (d·n floats) stays in a core's
    L2 cache (1 MiB: half of this machine's 2 MiB) while several products use it. Other
    devices: at most 64 slices (a GPU gains nothing from cache-sized slices and pays a few
    kernel launches per slice; 1 MiB slices would be 32,000 of them at 1B parameters)."""
    if device != "cpu":
        return min(total, max(1 << 18, -(-total // 64)))
    return max(1024, min(total, budget // max(d * itemsize, 1)))


def move_and_update_(
    basis: torch.Tensor, coef: torch.Tensor, a: torch.Tensor, u: torch.Tensor, p: torch.Tensor,
    rotation: torch.Tensor | None, c: torch.Tensor | None, native: bool = False, out: torch.Tensor | None = None,
    into: tuple | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The apply hop's D-sized work in one read and one write of V (replicated basis):
    slice by slice, while the slice is in cache,

        q += V_sᵀ p_s;  move_s = V_s coef;  r_s = u_s − V_s a;  dot += r_sᵀ (move_s − p_s)
        V_s ← V_s A + r_s cᵀ                     (only if A or c is given)

    Returns (move = V coef (D,), q = Vᵀp with the V before the update (d,), the sums
    [rᵀ(move − p), ‖p‖², ‖move − p‖²] (3,)); r itself is never stored. The composition this fuses — Vᵀp, then V·coef and
    r = u − V a, then ``apply_basis_update`` — reads V three to five times. ``native``
    (no rotation, float32 on the CPU): one C loop (``core.native``) instead of the slices'
    several BLAS calls each. ``out``: a (D,) tensor to hold the move (else a new one).
    ``into`` = (before, params), native path only (``p`` is then None): p = before − θ is
    measured and the move added into the parameters θ in the same pass; the move returned
    is None (``core.native.move_into_params_``)."""
    vt = basis.T  # (d, D), contiguous
    d, total = vt.shape
    dtype, dev = work_dtype(basis), vt.device
    f32 = lambda x: None if x is None else x.detach().to("cpu", torch.float32)  # noqa: E731
    if into is not None:
        if rotation is not None or not native_kernels.usable(vt, u, into[0]):
            raise ValueError("into= needs the native pass: float32 CPU tensors and no rotation")
        q, sums = native_kernels.move_into_params_(vt, f32(coef), f32(a), u, into[0], into[1], f32(c))
        return None, q.to(dtype), sums.to(dtype)
    passes = one_pass(native, vt, u, p) if rotation is None and d and total else None
    if passes is not None:
        move, q, sums = passes.move_and_update_(vt, f32(coef), f32(a), u, p, f32(c), out=out)
        return move, q.to(dtype), sums.to(dtype)
    _no_bfloat16(basis)
    move = torch.empty(total, dtype=dtype, device=dev) if out is None else out
    q = torch.zeros(d, dtype=dtype, device=dev)
    dot = torch.zeros((), dtype=dtype, device=dev)
    if d == 0 or total == 0:
        move.zero_()
        return move, q, torch.stack([dot, p.to(dtype) @ p.to(dtype), p.to(dtype) @ p.to(dtype)])
    coef, a, c, rotation = to_device(dev, coef, a, c, rotation, dtype=dtype)  # one copy from the host, no wait
    both = torch.stack([coef, a])  # (2, d)
    m_t = None if rotation is None else rotation.T.contiguous()
    c_col = None if c is None else c.unsqueeze(1)
    chunk = _chunk_columns(d, total, vt.element_size(), device=dev.type)
    two = torch.empty(2, chunk, dtype=dtype, device=dev)
    scratch = torch.empty(d, chunk, dtype=dtype, device=dev) if m_t is not None else None
    for start in range(0, total, chunk):
        block = vt[:, start : start + chunk]
        n = block.shape[1]
        p_s, u_s = p[start : start + n].to(dtype), u[start : start + n].to(dtype)
        q.addmv_(block, p_s)
        out = two[:, :n]
        torch.mm(both, block, out=out)
        move[start : start + n].copy_(out[0])
        r_s = out[1].neg_().add_(u_s)
        dot += r_s @ (out[0].sub_(p_s))
        if m_t is not None:
            torch.mm(m_t, block, out=scratch[:, :n])
            if c_col is not None:
                scratch[:, :n].addmm_(c_col, r_s.unsqueeze(0))
            block.copy_(scratch[:, :n])
        elif c_col is not None:
            block.addmm_(c_col, r_s.unsqueeze(0))
    p = p.to(dtype)
    return move, q, torch.stack([dot, p @ p, torch.dist(move, p).square()])


def apply_basis_update(
    basis: torch.Tensor,
    residual: torch.Tensor,
    rotation: torch.Tensor | None,
    residual_coef: torch.Tensor | None,
) -> torch.Tensor:
    """V_new = V A + r cᵀ with r = g − V y, in place where possible.

    basis V (D, d); residual r (D,), the gradient's part outside the subspace, so new
    directions enter orthogonal to the old ones; rotation A (d, d) or None (identity);
    residual_coef c (d,) or None.
    """
    if rotation is not None:
        rank1 = (residual_coef, residual) if residual_coef is not None else None
        return right_multiply_(as_basis_layout(basis), rotation, rank1)  # one pass over V for both
    if residual_coef is not None:
        # rank-1 update as a (d,1)×(1,D) GEMM on the contiguous transpose: CPU BLAS does this
        # ~10× faster than addr_
        basis = as_basis_layout(basis)
        basis.T.addmm_(residual_coef.to(basis.dtype).unsqueeze(1), residual.unsqueeze(0))
    return basis


def cholesky_qr2(basis: torch.Tensor, alive: torch.Tensor | None = None, allreduce=None, qr=None,
                 native: bool = False) -> torch.Tensor:
    """Re-orthonormalise V (D, d) by CholeskyQR, twice for accuracy.

    Tall-skinny ``torch.linalg.qr`` is pathologically slow on GPUs (ENVIRONMENT.md); the
    Gram matrix route costs one D×d² product and a d×d Cholesky (done in float64).
    Columns not ``alive`` (still empty) are left at zero. For a basis whose rows are spread
    over workers, ``allreduce`` sums the Gram matrix across them and ``qr`` is the
    distributed QR fallback (TSQR, see dataflow.shard). ``native``: the multiplications by
    the triangular factor in the C loop of ``core.native`` (float32 on the CPU).
    """
    d = basis.shape[1]
    if d == 0:
        return basis
    cols = torch.arange(d) if alive is None else torch.nonzero(alive.cpu(), as_tuple=False).flatten()
    if cols.numel() == 0:
        return basis
    cols = cols.to(basis.device)
    everything = cols.numel() == d
    sub = as_basis_layout(basis) if everything else basis.index_select(1, cols)
    for _ in range(2):
        passes = one_pass(native, sub.T)
        if passes is not None:  # one read of V; BLAS's (d, D)×(D, d) costs ~4
            gram = passes.gram(sub.T).to(sub.device)
        else:
            gram = (sub.T @ sub).to(torch.float64)
        if allreduce is not None:
            gram = allreduce(gram)
        try:
            chol = torch.linalg.cholesky(gram)
        except RuntimeError:
            # Nearly dependent columns: fall back to the slow but unconditionally stable QR.
            q = qr_keep_orientation(sub.to(torch.float64)) if qr is None else qr(sub.to(torch.float64))
            sub = q.to(basis.dtype)
            break
        eye = torch.eye(len(cols), dtype=torch.float64, device=chol.device)  # on the GPU with V
        inv = torch.linalg.solve_triangular(chol.T, eye, upper=True)
        sub = right_multiply_(as_basis_layout(sub), inv, native=native)
    if everything:
        return as_basis_layout(sub)
    basis.index_copy_(1, cols, sub)
    return basis


# how far from orthogonal the pending R of the lazy path may drift before it is applied to V
# (the stored V is then as well conditioned as R: cond(V) = cond(R) for an orthonormal V R)
LAZY_MAX_COND = 1.01


def orthonormalizing_factor(basis: torch.Tensor, right: torch.Tensor, native: bool = False,
                            allreduce=None) -> torch.Tensor | None:
    """P (d, d) with V P orthonormal, for a basis V R that is nearly so: CholeskyQR2 of V R
    done in d × d from one Gram matrix VᵀV — one read of V, no write (the eager route,
    V ← V R and two CholeskyQR passes, reads V five times and writes it three). The lazy path
    keeps P as its pending rotation. None when VᵀV is not positive definite or P's
    condition number exceeds ``LAZY_MAX_COND`` (then apply R and use ``cholesky_qr2``).
    ``allreduce``: V's rows are spread over workers; the Gram matrix is summed over them."""
    vt = as_basis_layout(basis).T
    passes = one_pass(native, vt)
    gram = passes.gram(vt) if passes is not None else vt @ vt.T
    if allreduce is not None:
        gram = allreduce(gram.double().contiguous())
    gram = gram.to("cpu", torch.float64)  # d × d work on the host: one copy, not a sync per check below
    p = right.to("cpu", torch.float64)
    eye = torch.eye(p.shape[0], dtype=torch.float64)
    for _ in range(2):  # the second pass corrects the first one's rounding, as in CholeskyQR2
        chol, info = torch.linalg.cholesky_ex(p.T @ gram @ p)
        if int(info) != 0:
            return None
        p = p @ torch.linalg.solve_triangular(chol.T, eye, upper=True)
    sv = torch.linalg.svdvals(p)
    if float(sv[0] / sv[-1]) > LAZY_MAX_COND:
        return None
    return p


def qr_keep_orientation(m: torch.Tensor) -> torch.Tensor:
    """Q of m = QR with R's diagonal made non-negative: as CholeskyQR, no column flips its
    sign (Householder QR may), so the curvature service's coordinates keep their meaning."""
    q, r = torch.linalg.qr(m)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs
