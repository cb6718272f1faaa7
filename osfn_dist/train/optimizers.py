"""Build the optimizer a train config names (OSFN, or a plain peer for comparison)."""
from __future__ import annotations

import torch

from ..base_optimizer import fused_ok
from ..optimizer import OSFN


def build_optimizer(params, spec: dict, **osfn_extra):
    spec = dict(spec)
    name = spec.pop("name", "osfn")
    if "betas" in spec:
        spec["betas"] = tuple(spec["betas"])
    if name == "osfn":
        return OSFN(params, **spec, **osfn_extra)
    if name == "adamw":  # the fastest AdamW torch has where it applies, as OSFN's default base
        params = list(params)
        return torch.optim.AdamW(params, **{"fused": fused_ok(params) or None, **spec})
    if name == "sgd":
        return torch.optim.SGD(params, **spec)
    raise ValueError(f"unknown optimizer {name!r}")
