"""The one-pass kernels over V for a GPU, in Triton: the same four passes as the C loops of
``core.native`` (the CPU's), with the same signatures, so ``core.subspace`` picks one module
or the other by device.

* ``project_pair``: Vᵀg, Vᵀu, ‖g‖², ‖u‖² in one read of V;
* ``move_and_update_``: the move V·coef, r = u − V a, Vᵀp, rᵀ(move − p), ‖p‖², ‖move − p‖²
  and V ← V + r cᵀ in one read and one write of V;
* ``right_multiply_``: V ← V m (+ r cᵀ), one read and one write;
* ``gram``: VᵀV, one read.

V's transpose ``vt`` (d, D) is contiguous (direction-major, ``subspace.new_basis``) and may
be stored in bfloat16: widened to float32 as it is read, written with stochastic rounding
(float32 bits plus 16 pseudo-random bits from a hash of the element's index and a seed,
then truncated: unbiased). The seed is a hash of the pass's d-sized coefficients, taken
from their host copies (``native._seed``), so a resumed run rounds as the uninterrupted one.
Each program owns BLOCK columns; per-program partial sums (float32 over BLOCK columns) are
added in float64 by one torch reduction. The d-sized results stay on the device (no host
synchronisation inside a pass); d-sized inputs given on the host go over in one pinned,
non-blocking copy.

Where: ``OSFN(..., kernels="triton")`` with CUDA tensors, when ``triton`` imports (CUDA
builds of torch bring it; ``pip install triton``). Opt-in until measured on a GPU
(``bench/step_time.py --device cuda`` has the rows): ``kernels="auto"`` keeps the eager
torch passes there. Correctness runs on the CPU too, in Triton's interpreter
(``TRITON_INTERPRET=1`` before the first use; slow, for tests: ``tests/test_triton_pass.py``).
"""
from __future__ import annotations

import logging
import os

import torch

from . import native as native_kernels
from .transfer import to_device

log = logging.getLogger("osfn_dist.triton_pass")

BASIS_DTYPES = (torch.float32, torch.bfloat16)
_state: dict = {}  # "kernels": the compiled module namespace, or "why_not": why not


def interpreting() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1`` before the first use): the kernels
    then take CPU tensors (slowly; for correctness tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Whether triton imports here (imported on first call; never on a CPU-only run that does not ask)."""
    if "kernels" in _state:
        return True
    if "why_not" in _state:
        return False
    try:
        _state["kernels"] = _define()
    except Exception as exc:  # no triton: the eager torch passes, correct and slower
        _state["why_not"] = f"{type(exc).__name__}: {exc}"
        log.warning("Triton kernels unavailable (%s)", _state["why_not"])
        return False
    return True


def why_not() -> str | None:
    return _state.get("why_not")


def usable(vt: torch.Tensor | None, *tensors: torch.Tensor | None) -> bool:
    """These kernels take ``vt`` (float32 or bfloat16, contiguous) and float32 contiguous
    vectors, all on one CUDA device (or on the CPU while ``interpreting()``)."""
    if vt is None or vt.dim() != 2 or not vt.is_contiguous() or vt.dtype not in BASIS_DTYPES:
        return False
    dev = vt.device
    if not (dev.type == "cuda" or (dev.type == "cpu" and interpreting())):
        return False
    ok = all(t is None or (t.device == dev and t.dtype == torch.float32 and t.is_contiguous()) for t in tensors)
    return ok and available()


def _define():
    import triton

    from . import triton_kernels as tk

    return {"project_pair": tk.project_pair_k, "move_update": tk.move_update_k, "right_multiply": tk.right_multiply_k,
            "gram": tk.gram_k, "cdiv": triton.cdiv, "pow2": triton.next_power_of_2}


def _k(name):
    if not available():
        raise RuntimeError(f"Triton kernels unavailable: {why_not()}")
    return _state["kernels"][name]


def _block(d: int) -> int:
    """Columns per program: about 8K elements of V in registers (fewer for a wide basis)."""
    return max(128, min(2048, 8192 // max(_k("pow2")(d), 1)))


def _seed(vt: torch.Tensor, *coefficients: torch.Tensor | None) -> int:
    """``native._seed`` of the host copies, folded into [2, 2³¹) (a positive int32 argument:
    Triton would specialise 1 as a constant and pass ≥ 2³¹ as int64)."""
    host = [c for c in coefficients if c is not None and c.device.type == "cpu"]
    return (native_kernels._seed(vt, *host) & 0x7FFFFFFF) | 2


def _grid(total: int, block: int) -> tuple[int]:
    return (max(1, _k("cdiv")(total, block)),)


def project_pair(vt: torch.Tensor, g: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Vᵀg and Vᵀu as (2, d) float64, [‖g‖², ‖u‖²] float64), on V's device; u None: its row
    and norm are zero."""
    d, total = vt.shape
    block = _block(d)
    grid = _grid(total, block)
    parts = torch.empty(grid[0], 2 * d + 2, dtype=torch.float32, device=vt.device)
    _k("project_pair")[grid](vt, g.contiguous(), g if u is None else u.contiguous(), parts, total, d=d,
                            DP=_k("pow2")(d), HAS_U=u is not None, BLOCK=block)
    out = parts.to(torch.float64).sum(0)
    return out[: 2 * d].view(2, d), out[2 * d:]


def move_and_update_(vt: torch.Tensor, coef: torch.Tensor, a: torch.Tensor, u: torch.Tensor, p: torch.Tensor,
                     c: torch.Tensor | None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``native.move_and_update_``: (move, q = Vᵀp before the update (float64, d),
    [rᵀ(move − p), ‖p‖², ‖move − p‖²] (float64, 3)), V ← V + r cᵀ if ``c`` is given."""
    d, total = vt.shape
    seed = _seed(vt, coef, c)
    coef, a, c = to_device(vt.device, coef, a, c)
    ok = out is not None and out.shape == (total,) and out.dtype == torch.float32 and out.is_contiguous() \
        and out.device == vt.device
    move = out if ok else torch.empty(total, dtype=torch.float32, device=vt.device)
    block = _block(d)
    grid = _grid(total, block)
    parts = torch.empty(grid[0], d + 3, dtype=torch.float32, device=vt.device)
    _k("move_update")[grid](vt, coef, a, u.contiguous(), p.contiguous(), coef if c is None else c, move, parts,
                           total, seed, d=d, DP=_k("pow2")(d), HAS_C=c is not None,
                           BF16=vt.dtype == torch.bfloat16, BLOCK=block)
    res = parts.to(torch.float64).sum(0)
    return move, res[:d], res[d:]


def right_multiply_(vt: torch.Tensor, m: torch.Tensor, c: torch.Tensor | None = None,
                    r: torch.Tensor | None = None) -> None:
    """V ← V m (+ r cᵀ), in place on ``vt`` (d, D); m (d, d)."""
    d, total = vt.shape
    seed = _seed(vt, m, c)
    m, c = to_device(vt.device, m, c if r is not None else None)
    block = max(128, _block(d) // 2)
    _k("right_multiply")[_grid(total, block)](vt, m, m if c is None else c, vt if r is None else r.contiguous(),
                                              total, seed, d=d, DP=_k("pow2")(d), HAS_R=r is not None,
                                              BF16=vt.dtype == torch.bfloat16, BLOCK=block)


def gram(vt: torch.Tensor) -> torch.Tensor:
    """VᵀV (d, d) float64 on V's device, one read of V."""
    d, total = vt.shape
    block = _block(d)
    grid = _grid(total, block)
    parts = torch.empty(grid[0], d * d, dtype=torch.float32, device=vt.device)
    _k("gram")[grid](vt, parts, total, d=d, DP=_k("pow2")(d), BLOCK=block)
    return parts.to(torch.float64).sum(0).view(d, d)
