"""What a Ray Train checkpoint of an OSFN run holds, and how to find one to resume from.

One checkpoint directory per saved step (``step_00000100``), written by the workers and
merged by Ray Train:

- ``state.pt`` (rank 0): the step, the model, the optimizer state (worker side: the
  subspace basis V and its version, the complement's moments), the curvature actor's
  state (regression statistics, eigenbasis, momentum, version) and, with pipelining, the
  direction update that was in flight, so a resumed run applies exactly what the
  interrupted one would have applied next.
- ``optimizer-rank<r>.pt`` (every rank, only with a sharded basis): that rank's optimizer
  state with its rows of V.
- FSDP2 (``parallel="fsdp2"``): every rank's DCP shards of the model and the optimizer
  (``osfn_dist.checkpoint``; they load on another world size), and the whole model, gathered,
  in ``state.pt``.
- ``meta.json``: step, workload, world size, sharding, parallel mode, for humans and for checks.

Worker state and actor state are saved at the same step, so they always agree on the basis
version; restoring one without the other is refused by the version checks.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import ConfigError, DimensionMismatchError

STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def shard_file(rank: int) -> str:
    return f"optimizer-rank{rank}.pt"


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_leader_state(directory: str | Path, *, step: int, model: dict, optimizer: dict | None,
                      actor: dict | None, pipeline: dict | None, meta: dict) -> None:
    d = Path(directory)
    torch.save(
        {"format": FORMAT_VERSION, "step": step, "model": model, "optimizer": optimizer,
         "actor": actor, "pipeline": pipeline},
        d / STATE_FILE,
    )
    (d / META_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "step": step, **meta}, indent=2, default=str))


def save_shard_state(directory: str | Path, rank: int, optimizer: dict) -> None:
    torch.save(optimizer, Path(directory) / shard_file(rank))


def load_state(directory: str | Path, rank: int, world_size: int, shard_basis: bool, fsdp2: bool = False) -> dict:
    """Everything rank ``rank`` needs to resume (model, its optimizer state, actor state).
    Under FSDP2 the model and the optimizer are the directory's DCP shards
    (``osfn_dist.checkpoint.load``; any world size), not these entries."""
    d = Path(directory)
    if not (d / STATE_FILE).exists():
        raise ConfigError(f"{str(d)!r} is not an osfn-dist checkpoint (no {STATE_FILE})")
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint {str(d)!r} has format {state.get('format')!r}; this build reads {FORMAT_VERSION}")
    meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).exists() else {}
    saved_sharded = bool(meta.get("shard_basis"))
    if saved_sharded != shard_basis:
        raise DimensionMismatchError(
            f"checkpoint {str(d)!r} was written with shard_basis={saved_sharded}; resume with the same setting"
        )
    saved_fsdp2 = meta.get("parallel") == "fsdp2"
    if saved_fsdp2 != fsdp2:
        raise DimensionMismatchError(
            f"checkpoint {str(d)!r} was written with parallel={meta.get('parallel', 'gradient_sync')!r}; "
            f"{'resume with --parallel fsdp2' if saved_fsdp2 else 'an FSDP2 run cannot resume from it'} "
            "(FSDP2 checkpoints are DCP shards)"
        )
    if shard_basis:
        if meta.get("world_size") != world_size:
            raise DimensionMismatchError(
                f"checkpoint {str(d)!r} holds a basis sharded over {meta.get('world_size')} workers; resume "
                f"with --num-workers {meta.get('world_size')} (this run has {world_size})"
            )
        state["optimizer"] = torch.load(d / shard_file(rank), map_location="cpu", weights_only=False)
    return state


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the latest one (highest step) below a run
    directory or storage path; always an absolute path."""
    p = Path(path).resolve()  # workers run elsewhere (their own working directory, other nodes)
    if p.is_file() and p.name in (STATE_FILE, "checkpoint.pt"):
        raise ConfigError(f"{str(path)!r} is a file; pass its checkpoint directory or the run directory")
    if (p / STATE_FILE).exists():
        return p
    found = []
    for state in p.rglob(STATE_FILE):
        meta = state.parent / META_FILE
        step = json.loads(meta.read_text()).get("step", -1) if meta.exists() else -1
        found.append((step, str(state.parent)))
    if not found:
        raise ConfigError(f"no osfn-dist checkpoint ({STATE_FILE}) under {str(p)!r}")
    return Path(max(found)[1])
