"""Fused passes over the basis V, compiled by torch.compile (Inductor: C++/OpenMP on CPU,
Triton on GPU), with the eager formula as reference and fallback.

``expand_residual`` computes V·coef (the Newton move) and r = u − V·a (the residual the basis
turns toward) in one loop over D that reads V once. Eager torch needs two matrix-vector
products, or one (2, d)×(d, D) GEMM that CPU BLAS runs no faster than the two (measured at
1.06M parameters, d = 8, this 2-core CPU: eager 2.4–5.9 ms, compiled 0.71 ms).

Tried and not used, because Inductor's code was not faster than eager BLAS here: Vᵀg and
Vᵀu together (compiled 1.42–1.55 ms vs the eager pair GEMM 1.45–1.57 ms), and the rotation
V m + r cᵀ (compiled in place 16–18 ms vs the eager slice-by-slice GEMM 4.2–4.4 ms).

``OSFN(..., kernels="compiled")`` turns it on (the first call compiles for a few seconds per
model size). The default, ``"auto"``, uses the one-pass C loops of ``core.native`` on the CPU
instead (faster than this kernel there) and plain torch elsewhere.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("osfn_dist.kernels")


def expand_residual_ref(vt: torch.Tensor, coef: torch.Tensor, a: torch.Tensor, u: torch.Tensor):
    """(V·coef, u − V·a) for the contiguous (d, D) transpose ``vt`` of V."""
    move = (coef.unsqueeze(1) * vt).sum(0)
    resid = u - (a.unsqueeze(1) * vt).sum(0)
    return move, resid


@functools.cache
def _compiled():
    return torch.compile(expand_residual_ref, dynamic=False, fullgraph=True)


_broken = False


def expand_residual(vt: torch.Tensor, coef: torch.Tensor, a: torch.Tensor, u: torch.Tensor):
    """The compiled kernel; the eager formula where compilation fails (logged once)."""
    global _broken
    if not _broken:
        try:
            return _compiled()(vt, coef, a, u)
        except Exception as exc:  # no compiler, unsupported device, ...: correct, just slower
            _broken = True
            log.warning("torch.compile of the expand_residual kernel failed (%s); using the eager formula", exc)
    return expand_residual_ref(vt, coef, a, u)
