"""The first-order optimizer OSFN wraps (its "base"), and what OSFN reads from it.

OSFN never re-derives the base's step: it runs ``base.step()`` and measures the
displacement. This module builds the default base from OSFN's complement fields (torch's
own AdamW — fused where it applies —, SGD, or Muon for 2-D matrices + AdamW for the rest), refuses parameters OSFN
cannot handle, and reads the base's gradient running mean (the subspace source) where the
base keeps one in a layout torch documents.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from .core.config import COMPLEMENT_FIELDS, OSFNConfig
from .core.errors import ConfigError

_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")


def _group_kwargs(group: dict, config: OSFNConfig) -> dict:
    """A user's param group with OSFN's complement fields filled in from ``config``."""
    return {k: group.get(k, getattr(config, k)) for k in COMPLEMENT_FIELDS}


def build_default_bases(groups: list[dict], config: OSFNConfig) -> list[Optimizer]:
    """torch optimizers equivalent to OSFN's ``complement`` setting, one per kind.

    adamw → torch.optim.AdamW; sgd / momentum / nesterov → torch.optim.SGD; muon →
    torch.optim.Muon on 2-D matrices (its only shape) + torch.optim.AdamW at ``aux_lr`` on
    vectors and conv kernels, as torch's Muon documentation prescribes. Group overrides of
    the complement fields (say ``{"params": ..., "lr": 0.0}``) carry over per group."""
    adam_groups, sgd_groups, muon_groups = [], [], []
    for g in groups:
        kw = _group_kwargs(g, config)
        params = list(g["params"])
        extra = {k: v for k, v in g.items() if k not in kw and k != "params"}  # subspace keys
        kind = kw["complement"]
        if kind == "adamw":
            adam_groups.append({"params": params, **{k: kw[k] for k in _ADAM_KEYS}, **extra})
        elif kind in ("sgd", "momentum", "nesterov"):
            sgd_groups.append({
                "params": params, "lr": kw["lr"], "weight_decay": kw["weight_decay"],
                "momentum": 0.0 if kind == "sgd" else kw["momentum"], "nesterov": kind == "nesterov", **extra,
            })
        else:  # muon
            matrices = [p for p in params if p.ndim == 2]
            others = [p for p in params if p.ndim != 2]
            if matrices:
                muon_groups.append({"params": matrices, "lr": kw["lr"], "weight_decay": kw["weight_decay"],
                                    "momentum": kw["momentum"], **extra})
            if others:
                adam_groups.append({"params": others, "lr": kw["aux_lr"], "betas": kw["betas"], "eps": kw["eps"],
                                    "weight_decay": kw["weight_decay"], **extra})
    bases: list[Optimizer] = []
    if muon_groups:
        bases.append(torch.optim.Muon(muon_groups))
    if adam_groups:
        adam_params = [p for g in adam_groups for p in g["params"]]
        bases.append(torch.optim.AdamW(adam_groups, fused=fused_ok(adam_params) or None))
    if sgd_groups:
        bases.append(torch.optim.SGD(sgd_groups, lr=sgd_groups[0]["lr"]))
    return bases


def fused_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (one kernel for the whole step, the fastest AdamW torch has: 0.4×
    the default's optimizer step at 1M parameters on CPU, bench/step_time.py) where it
    applies: plain floating-point tensors on the CPU or a CUDA device. DTensors (FSDP2) keep
    torch's default implementation."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed: no DTensors either
        DTensor = ()  # noqa: N806

    return bool(params) and all(
        not isinstance(p, DTensor) and not isinstance(p.data, DTensor) and p.is_floating_point()
        and p.device.type in ("cpu", "cuda") for p in params
    )


def check_params(bases: list[Optimizer]):
    """Refuse, at construction, parameters the subspace cannot hold; each message names the
    parameter and what to do. Returns the process group of FSDP2 parameters (all DTensors
    sharded over one 1-D device mesh), or None for plain tensors."""
    devices = set()
    seen: set[int] = set()
    meshes = set()
    plain = 0
    for b, base in enumerate(bases):
        for g, group in enumerate(base.param_groups):
            for i, p in enumerate(group["params"]):
                where = f"parameter {i} of param group {g} of base optimizer {b} ({type(base).__name__}, shape {tuple(p.shape)})"
                if id(p) in seen:
                    raise ConfigError(f"{where} appears in two base optimizers; give each parameter to one of them")
                seen.add(id(p))
                if p.is_complex():
                    raise ConfigError(
                        f"{where} is complex; OSFN's subspace is real. Optimize its real view "
                        "(torch.view_as_real) or leave it to a separate optimizer")
                if _is_dtensor(p):
                    mesh = p.device_mesh
                    if mesh.ndim != 1 or any(not pl.is_shard() and not pl.is_replicate() for pl in p.placements):
                        raise ConfigError(
                            f"{where} is a DTensor on a {mesh.ndim}-D mesh with placements {p.placements}; OSFN "
                            "supports FSDP2's 1-D sharding (fully_shard over one mesh dimension) only")
                    meshes.add(mesh)
                else:
                    plain += 1
                if p.is_sparse:
                    raise ConfigError(f"{where} is a sparse tensor; OSFN needs dense parameters")
                devices.add(p.device)
    if len(devices) > 1:
        raise ConfigError(
            f"parameters live on several devices {sorted(map(str, devices))}; OSFN keeps one basis on one "
            "device. Move the model to one device (or use one OSFN per device placement)")
    if meshes and (plain or len(meshes) > 1):
        raise ConfigError(
            f"{plain} plain tensor(s) next to DTensors on {len(meshes)} mesh(es): with FSDP2, fully_shard the "
            "whole model over one mesh (the root module too) so every parameter is a DTensor of that mesh")
    return next(iter(meshes)).get_group() if meshes else None


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return isinstance(p, DTensor)


def reads_running_mean(base: Optimizer) -> bool:
    """Whether ``running_mean`` understands this base's state (torch's Adam/AdamW, SGD, Muon)."""
    return isinstance(base, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Muon))


def running_mean(base: Optimizer, state: dict, group: dict, steps: int) -> tuple[torch.Tensor | None, float]:
    """The base's gradient running mean of one parameter as (buffer, scale), the mean being
    scale·buffer after ``steps`` base steps; (None, 1) where it keeps none (yet).

    Adam/AdamW's exp_avg is bias-corrected by its own step count; Muon's buffer is an EMA
    from zero (mean b/(1 − μᵗ)); SGD's b ← μb + (1 − dampening)g sums with weights 1, μ, μ², ...
    (mean b·(1 − μ)/(1 − μᵗ), dampening ignored). The scale is a 0-d tensor where the step
    count is one on a device (fused/capturable Adam on a GPU): reading it would wait for the
    device, and the momentum source does not even use it."""
    if "exp_avg" in state:
        t = state.get("step", 0)
        beta1 = float(group["betas"][0])
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            tf = t.to(torch.float64)
            return state["exp_avg"], torch.where(tf > 0, 1.0 / (1.0 - beta1**tf), 1.0) if beta1 > 0 else 1.0
        t = float(t)
        return state["exp_avg"], (1.0 / (1.0 - beta1**t) if t > 0 and beta1 > 0 else 1.0)
    buf = state.get("momentum_buffer")
    if buf is None:
        return None, 1.0
    mu, t = float(group["momentum"]), max(steps, 1)
    if not 0 < mu < 1:
        return buf, 1.0
    ema = isinstance(base, torch.optim.Muon)
    return buf, (1.0 if ema else 1.0 - mu) / (1.0 - mu**t)


def reads_second_moments(base: Optimizer) -> bool:
    """Whether ``preconditioner_scale`` understands this base's state (torch's Adam, AdamW)."""
    return isinstance(base, (torch.optim.Adam, torch.optim.AdamW))


def preconditioner_scale(state: dict, group: dict) -> torch.Tensor | None:
    """σ = (√v̂ + ε)^(-½) of one parameter, Adam's second moments bias-corrected by its own
    step count, so that z = θ / σ are the coordinates in which Adam steps like momentum SGD;
    None before its first step. Amsgrad's running maximum is used where present."""
    v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
    t = float(state.get("step", 0))
    if v is None or t <= 0:
        return None
    correction = 1.0 - float(group["betas"][1]) ** t
    return (v / correction).sqrt_().add_(float(group["eps"])).rsqrt_()
