"""First-order descent on the complement of the subspace.

Each method turns a parameter's gradient into ``(direction u, scale α)``; the optimizer
either applies it in place exactly as torch.optim does (``apply_in_place``: used when the
subspace is empty, so OSFN with d = 0 *is* the complement optimizer) or turns it into the
displacement p = lr·wd·θ + α·u and removes p's part inside the subspace, where the Newton
step is in charge.

State per parameter lives in the optimizer's ``state[p]`` dict, with torch's key names
(``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``step``) so the layout is familiar.
"""
from __future__ import annotations

import math

import torch

try:  # torch >= 2.9 ships Muon; reuse its Newton–Schulz orthogonalisation.
    from torch.optim._muon import _zeropower_via_newtonschulz
except ImportError:  # pragma: no cover - older torch
    _zeropower_via_newtonschulz = None

MUON_NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
MUON_NS_STEPS = 5
MUON_EPS = 1e-7


def uses_muon(param: torch.Tensor, group: dict) -> bool:
    """Muon for 2-D matrices, and for conv kernels (flattened) unless ``muon_conv`` is off."""
    if group["complement"] != "muon" or param.ndim < 2:
        return False
    return param.ndim == 2 or group.get("muon_conv", True)


def direction(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> tuple:
    """Advance the complement state of one parameter by its gradient.

    Returns (u, α, decay, denom) so that the complement step is θ ← θ·(1 − decay) − α·u/denom
    (denom None means 1; AdamW keeps it separate to round exactly like torch's addcdiv_).
    """
    kind = group["complement"]
    lr = group["lr"]
    if kind in ("sgd", "momentum", "nesterov"):
        decay = 0.0
        if group["weight_decay"] != 0:
            grad = grad.add(param, alpha=group["weight_decay"])
        if kind == "sgd" or group["momentum"] == 0:
            return grad, lr, decay, None
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.clone(grad).detach()
        else:
            buf.mul_(group["momentum"]).add_(grad)
        u = grad.add(buf, alpha=group["momentum"]) if kind == "nesterov" else buf
        return u, lr, decay, None
    if uses_muon(param, group):
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(grad)
        mom = group["momentum"]
        buf.lerp_(grad, 1 - mom)
        update = grad.lerp(buf, mom)  # Nesterov form, as torch.optim.Muon's default
        matrix = update.reshape(update.shape[0], -1)
        ortho = _zeropower_via_newtonschulz(matrix, MUON_NS_COEFFICIENTS, MUON_NS_STEPS, MUON_EPS)
        a, b = matrix.shape
        scale = lr * math.sqrt(max(1.0, a / b))
        return ortho.reshape(param.shape), scale, lr * group["weight_decay"], None
    # adamw (also the non-matrix parameters under muon, at aux_lr)
    if kind == "muon":
        lr = group["aux_lr"]
    beta1, beta2 = group["betas"]
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["step"] += 1
    step = float(state["step"])
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
    return exp_avg, step_size, lr * group["weight_decay"], denom


def apply_in_place(param: torch.Tensor, u: torch.Tensor, alpha: float, decay: float, denom=None) -> None:
    """θ ← θ·(1 − decay) − α·u/denom, with the same operations as torch.optim."""
    if decay != 0:
        param.mul_(1 - decay)
    if denom is None:
        param.add_(u, alpha=-alpha)
    else:
        param.addcdiv_(u, denom, value=-alpha)


def displacement(param: torch.Tensor, u: torch.Tensor, alpha: float, decay: float, denom=None) -> torch.Tensor:
    """p with θ_new = θ − p (float32 or better)."""
    work = torch.float32 if u.dtype in (torch.float16, torch.bfloat16) else u.dtype
    p = u.to(work) * alpha if denom is None else torch.div(u.to(work), denom.to(work)).mul_(alpha)
    if decay != 0:
        p.add_(param.to(p.dtype), alpha=decay)
    return p


def adamw_foreach(params: list[torch.Tensor], states: list[dict], group: dict) -> None:
    """A whole group's AdamW step in place with torch's multi-tensor kernels (the complement-
    only steps of ``curvature_every`` > 1). Same state keys and update as ``direction``; the
    rounding may differ from the single-tensor path in the last bit."""
    from torch.optim.adam import adam

    for p, st in zip(params, states):
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    beta1, beta2 = group["betas"]
    adam(
        params, [p.grad for p in params], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [],
        [st["step"] for st in states], foreach=True, decoupled_weight_decay=True, amsgrad=False,
        beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
    )
