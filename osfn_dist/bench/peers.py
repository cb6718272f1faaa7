"""The optimizers the benchmark compares, each with the centre of its learning-rate grid.

Centres were moved up once after a first quick run put AdamW's, Muon's and both OSFN
variants' best rate at the top edge of their grids; the peer and its OSFN variant always
share a centre.

Every optimizer gets the same number of learning rates (``grid``), spread by the same
factors around its centre; all other hyperparameters stay at the library's defaults, so the
tuning budget is equal.

Each OSFN variant wraps its peer itself (``osfn_over``: the same optimizer object, built by
the peer's own builder at the same lr): with ``subspace_dim=0`` it reproduces the peer's
trajectory bit for bit (tests/test_bench.py), so "OSFN vs its peer" measures the subspace
Newton step and nothing else. (The first benchmark ran the Muon complement at OSFN's own defaults,
momentum 0.9 and no weight decay, against torch's Muon at 0.95 and 0.1; on the MNIST-1D MLP
that difference alone was worth more than the Newton step, which made OSFN look better than
it was.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class OptimizerGroup:
    """Several optimizers stepping disjoint parameter sets as one (Muon + AdamW)."""

    def __init__(self, optimizers):
        self.optimizers = [o for o in optimizers if o is not None]

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in self.optimizers:
            o.step()

    @property
    def state(self):
        merged = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged


def _split_matrices(params):
    params = [p for p in params if p.requires_grad]
    return [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]


def _muon(params, lr):
    matrices, others = _split_matrices(params)
    if any(p.ndim > 2 for p in matrices):
        # torch.optim.Muon takes 2-D matrices only; conv kernels go to AdamW with the vectors
        others = others + [p for p in matrices if p.ndim > 2]
        matrices = [p for p in matrices if p.ndim == 2]
    return OptimizerGroup([
        torch.optim.Muon(matrices, lr=lr) if matrices else None,
        # the vectors' AdamW decays like the matrices (torch's Muon default), as OSFN's aux AdamW
        torch.optim.AdamW(others, lr=3e-3, weight_decay=0.1) if others else None,
    ])


def _heavyball(name):
    def build(params, lr):
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None  # torch.compile warm-up would dominate short runs
        return getattr(heavyball, name)(params, lr=lr)

    return build


def _pytorch_optimizer(name):
    def build(params, lr):
        import pytorch_optimizer

        return getattr(pytorch_optimizer, name)(params, lr=lr)

    return build


# which peer each OSFN variant wraps (and is compared with)
OSFN_PEER_OF = {"osfn": "adamw", "osfn_muon": "muon", "osfn_soap": "soap"}


def _osfn(**extra):
    """OSFN with its default base (torch AdamW unless ``complement`` says otherwise)."""
    def build(params, lr):
        from ..optimizer import OSFN

        return OSFN(params, lr=lr, **extra)

    return build


def osfn_over(peer: str, **settings):
    """OSFN wrapped around the optimizer(s) that peer ``peer``'s builder makes."""
    def build(params, lr):
        from ..optimizer import OSFN

        base = PEERS[peer].build(params, lr)
        return OSFN(base=base.optimizers if isinstance(base, OptimizerGroup) else base, **settings)

    return build


@dataclass(frozen=True)
class Peer:
    name: str
    build: Callable
    lr_center: float
    needs_hessian: bool = False  # backward(create_graph=True) for Hutchinson estimates
    label: str = ""


PEERS: dict[str, Peer] = {
    p.name: p
    for p in [
        Peer("adamw", lambda ps, lr: torch.optim.AdamW(ps, lr=lr), 1e-2, label="AdamW"),
        Peer("sgd_nesterov", lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True), 1e-1,
             label="SGD + Nesterov"),
        Peer("muon", _muon, 5e-2, label="Muon (torch.optim) + AdamW"),
        Peer("soap", _heavyball("SOAP"), 1e-2, label="SOAP (heavyball)"),
        Peer("psgd", _heavyball("PSGDKron"), 1e-3, label="PSGD-Kron (heavyball)"),
        Peer("sophia", _pytorch_optimizer("SophiaH"), 3e-2, needs_hessian=True, label="SophiaH (pytorch-optimizer)"),
        Peer("adahessian", _pytorch_optimizer("AdaHessian"), 1e-1, needs_hessian=True,
             label="AdaHessian (pytorch-optimizer)"),
        Peer("osfn", osfn_over("adamw"), 1e-2, label="OSFN over AdamW"),
        Peer("osfn_muon", osfn_over("muon"), 5e-2, label="OSFN over Muon (torch.optim) + AdamW"),
        Peer("osfn_soap", osfn_over("soap"), 1e-2, label="OSFN over SOAP (heavyball)"),
    ]
}

DEFAULT_PEERS = ("adamw", "sgd_nesterov", "muon", "soap", "psgd", "sophia", "osfn", "osfn_muon", "osfn_soap")


def lr_grid(center: float, size: int) -> list[float]:
    """``size`` learning rates, half-decade apart, centred (rounded down) on ``center``."""
    factors = [10 ** (0.5 * (i - (size - 1) // 2)) for i in range(size)]
    return [center * f for f in factors]
