"""Checkpoints of a model and its OSFN through ``torch.distributed.checkpoint`` (DCP).

For FSDP2 (``fully_shard``) models: the model's and the base optimizer's DTensor shards and
V's rows (``OSFN.state_dict`` gives them as DTensors placed like their parameters) are
written by every rank in parallel and resharded on load, so a run can resume on another
number of workers; the curvature model is d-sized and the same on every rank. Works as well
for a plain (unsharded) model in one process::

    from osfn_dist import checkpoint
    checkpoint.save("ckpt/step-1000", model, opt)      # every rank calls it
    ...
    model, opt = build()                                # the same model, sharded the same way
    checkpoint.load("ckpt/step-1000", model, opt)

Save after the first optimizer step: before it, the base optimizer has no state to save.
"""
from __future__ import annotations

import io

import torch

from .core.errors import DimensionMismatchError

# the D-sized parts of OSFN's state (DTensors under FSDP2); the rest is d-sized and the same
# on every rank, and travels as one pickled blob (DCP cannot load a tensor into a template
# that still holds None, as a fresh optimizer's does)
ROW_KEYS = ("basis", "anchor", "prev_displacement")


def _dcp_form(optimizer) -> dict:
    sd = optimizer.state_dict()
    osfn = dict(sd["osfn"])
    rows = {k: osfn.pop(k) for k in ROW_KEYS if isinstance(osfn.get(k), list)}
    buf = io.BytesIO()
    torch.save(osfn, buf)
    return {"bases": sd["bases"], "osfn_rows": rows, "osfn_small": buf.getvalue()}


def _from_dcp_form(state: dict) -> dict:
    osfn = torch.load(io.BytesIO(state["osfn_small"]), weights_only=False)
    osfn.update(state["osfn_rows"])
    return {"bases": state["bases"], "osfn": osfn}


def save(checkpoint_id, model: torch.nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": model.state_dict(), "optim": _dcp_form(optimizer)}, checkpoint_id=checkpoint_id)


def load(checkpoint_id, model: torch.nn.Module, optimizer) -> None:
    """Load in place. DCP loads into a template, so the base optimizers' lazily created state
    is made first (as torch's own DCP helpers do: one step at lr 0 on zero gradients, which
    moves no parameter), then overwritten by the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    materialize_base_state(optimizer)
    state = {"model": model.state_dict(), "optim": _dcp_form(optimizer)}
    try:
        dcp.load(state, checkpoint_id=checkpoint_id)
    except (CheckpointException, RuntimeError, ValueError, KeyError) as exc:  # CheckpointException is a BaseException
        failures = getattr(exc, "failures", None)
        causes = sorted({f"{type(e).__name__}: {e}" for e, _ in failures.values()}) if failures else [f"{type(exc).__name__}: {exc}"]
        raise DimensionMismatchError(
            f"cannot load checkpoint {checkpoint_id!s} into this model and optimizer ({'; '.join(causes)}); it must "
            "come from the same model, base optimizer and OSFN settings (subspace_dim), saved after the first step"
        ) from exc
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(_from_dcp_form(state["optim"]))


def materialize_base_state(optimizer) -> None:
    bases = getattr(optimizer, "base", optimizer)
    for base in bases if isinstance(bases, list) else [bases]:
        if base.state:
            continue
        params = [p for g in base.param_groups for p in g["params"] if p.requires_grad]
        given = [p for p in params if p.grad is None]
        for p in given:
            p.grad = torch.zeros_like(p)
        saved = [g["lr"] for g in base.param_groups]
        for g in base.param_groups:
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        try:
            base.step()
        finally:
            for g, lr in zip(base.param_groups, saved):
                g["lr"] = lr
            for p in given:
                p.grad = None
