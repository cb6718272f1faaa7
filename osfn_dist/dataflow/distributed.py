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


def agree(flags: list[bool], group=None, *, every: bool) -> list[bool]:
    """Flags every rank shares, element-wise: AND across ranks (``every``) or OR — one tiny
    all-reduce, so decisions that must be common are taken on the same facts everywhere."""
    buf = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=_backend_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.MIN if every else dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in buf.tolist()]


def _backend_device(group) -> torch.device:
    if backend_device(dist.get_backend(group)) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class GradientSync:
    """Average gradients and gather local subspace coordinates across a process group."""

    def __init__(self, group=None, check_every: int = 100):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "GradientSync needs an initialised torch.distributed process group "
                "(torchrun, Ray Train, or dist.init_process_group)"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        # every check_every-th step (and the first) the replicas compare their parameter count
        # and a fingerprint of their parameters (3 floats per rank)
        self.check_every = int(check_every)

    def check_replicas(self, params, step: int) -> None:
        """Raise on every rank if the ranks hold models of different sizes (before a
        mismatched all-reduce could hang or mix them) or replicas that have drifted apart."""
        if self.check_every <= 0 or (step != 1 and step % self.check_every):
            return
        from ..core.errors import DimensionMismatchError, ReplicaDivergenceError

        with torch.no_grad():
            total = sum(p.numel() for p in params)
            s1 = sum(float(p.detach().double().sum()) for p in params)
            s2 = sum(float(p.detach().double().square().sum()) for p in params)
        mine = torch.tensor([float(total), s1, s2], dtype=torch.float64, device=_backend_device(self.group))
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.group)
        rows = [t.cpu().tolist() for t in out]
        sizes = [int(r[0]) for r in rows]
        if len(set(sizes)) > 1:
            raise DimensionMismatchError(
                f"the ranks hold models of different sizes {sizes} (parameters per rank) at step {step}; "
                "every rank must build the same model")
        bad = [r for r, row in enumerate(rows) if row[1:] != rows[0][1:]]
        if bad:
            raise ReplicaDivergenceError(
                f"rank(s) {bad} hold parameters that differ from rank 0's at step {step} (sum, sum of squares "
                f"{[tuple(round(v, 9) for v in row[1:]) for row in rows]}); something changed them on one rank "
                "only. Restart every rank from one checkpoint")

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
        return agree(flags, self.group, every=False)

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


class DDPProjections:
    """Every worker's own projection Vᵀg_r under DDP, for the per-direction noise estimate,
    without a second pass over the gradients: a DDP communication hook projects each bucket's
    *local* gradient onto its rows of V just before the bucket's all-reduce (overlapped with
    backward like the all-reduce itself), accumulating d floats; the optimizer all-gathers
    those d floats per worker at its step. Costs one read of V per step (spread over the
    buckets) and one all-gather of (d + 1)·N floats.

    ``rows_of(p)`` gives the slice of V's rows that belongs to parameter ``p`` (its place in
    the optimizer's flat order), ``basis()`` the current V (None before the first step),
    ``dim`` its number of directions d."""

    def __init__(self, ddp_model, rows_of, basis, dim: int, group=None):
        self.rows_of, self.basis, self.dim, self.group = rows_of, basis, int(dim), group
        self.world = dist.get_world_size(group)
        self.acc: torch.Tensor | None = None
        ddp_model.register_comm_hook(self, DDPProjections._hook)

    @staticmethod
    def _hook(state: "DDPProjections", bucket):
        basis = state.basis()
        buf = bucket.buffer()
        if basis is not None:
            if state.acc is None:
                state.acc = torch.zeros(basis.shape[1], dtype=torch.float64, device=basis.device)
            offset = 0
            for p in bucket.parameters():
                n = p.numel()
                part = basis[state.rows_of(p)].T @ buf[offset : offset + n].to(basis.dtype)
                state.acc += part.to(torch.float64)
                offset += n
        # then DDP's own averaging
        fut = dist.all_reduce(buf.div_(state.world), group=state.group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    def gather(self) -> torch.Tensor | None:
        """(N, d) float64 on the CPU, ordered by rank, and reset for the next step; None when
        no bucket was projected (the first step, before the basis exists)."""
        # one collective: [has a projection, the projection] from every rank, so all ranks
        # agree on None when any rank projected nothing
        local = torch.zeros(self.dim + 1, dtype=torch.float64, device=_backend_device(self.group))
        if self.acc is not None:
            local[0], local[1:] = 1.0, self.acc
        self.acc = None
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local, group=self.group)
        rows = torch.stack([t.cpu() for t in out])
        return rows[:, 1:].contiguous() if bool((rows[:, 0] > 0).all()) else None
