"""Data-parallel plumbing with plain torch.distributed (gloo on CPU, NCCL on GPUs).

- ``GradientSync``: averages the flat gradient across workers (one all-reduce of D floats)
  and gathers every worker's *local* projection Vᵀg_local (d floats each), from which the
  curvature service estimates gradient noise per direction.
- ``LeaderExchange``: only rank 0 talks to the curvature service; the update is broadcast
  to every rank, so all workers apply the identical update and stay in lock-step.

Nothing here imports ray or grpc: the same code serves Ray Train and torchrun.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .messages import DirectionUpdate, Report


def backend_device(backend: str) -> str:
    """The device a process group's collectives take tensors on: "cuda" for NCCL, also in a
    mixed backend such as "cpu:gloo,cuda:nccl" (the GPU path), else "cpu" (gloo)."""
    backend = str(backend).lower()
    if backend == "nccl" or "cuda:nccl" in backend or ("nccl" in backend and ":" not in backend):
        return "cuda"
    return "cpu"


def _backend_device(group) -> torch.device:
    if backend_device(dist.get_backend(group)) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class GradientSync:
    """Average gradients and gather local subspace coordinates across a process group."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "GradientSync needs an initialised torch.distributed process group "
                "(torchrun, Ray Train, or dist.init_process_group)"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)

    def average(self, grad: torch.Tensor) -> torch.Tensor:
        """All-reduce the flat gradient (D,) in place and divide by the number of workers."""
        dev = _backend_device(self.group)
        buf = grad if grad.device == dev else grad.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        buf.div_(self.world_size)
        if buf is not grad:
            grad.copy_(buf)
        return grad

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of a list of flags across workers (one tiny all-reduce)."""
        buf = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=_backend_device(self.group))
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in buf.tolist()]

    def gather_coords(self, coords: torch.Tensor) -> torch.Tensor:
        """(d,) local projection → (N, d) float64 on the CPU, ordered by rank."""
        dev = _backend_device(self.group)
        local = coords.detach().to(dev, torch.float64).contiguous()
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local, group=self.group)
        return torch.stack([t.cpu() for t in out])


class LeaderExchange:
    """Rank ``leader`` calls the real exchange; the update is broadcast to all ranks."""

    def __init__(self, inner, group=None, leader: int = 0):
        self.inner = inner
        self.group = group
        self.leader = leader
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        if self.rank == leader and inner is None:
            raise ValueError("the leader rank needs a real exchange (in-process, Ray actor or gRPC)")

    def exchange(self, report: Report) -> DirectionUpdate:
        payload = [None]
        if self.rank == self.leader:
            try:
                payload[0] = ("ok", self.inner.exchange(report).to_wire())
            except Exception as exc:  # tell the other ranks instead of leaving them waiting
                payload[0] = ("error", f"{type(exc).__name__}: {exc}")
                dist.broadcast_object_list(payload, src=self.leader, group=self.group)
                raise
        dist.broadcast_object_list(payload, src=self.leader, group=self.group)
        status, body = payload[0]
        if status != "ok":
            from ..core.errors import CurvatureServiceUnavailable

            raise CurvatureServiceUnavailable(f"the leader's curvature exchange failed: {body}")
        return DirectionUpdate.from_wire(body)

    # state of an in-process service travels with the leader's checkpoint
    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None and hasattr(self.inner, "state_dict") else {}

    def load_state_dict(self, sd: dict) -> None:
        if self.inner is not None and hasattr(self.inner, "load_state_dict") and sd:
            self.inner.load_state_dict(sd)
