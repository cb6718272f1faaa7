"""Where the basis V (D, d) lives: replicated on every worker, or sharded by rows (ZeRO-style).

V is the optimizer's dominant memory (d·D floats; AdamW's state is 2·D). With
``ShardedBasis`` each of N workers keeps only the rows of V for its contiguous slice of the
flattened parameters, so V costs d·D/N per worker. Every D-sized product with V becomes a
local product plus a d-sized all-reduce, and the one D-sized result that every worker needs
(the step V c) is all-gathered::

    Vᵀv      = Σ_r V_rᵀ v_r                  local (D/N)·d, all-reduce d floats
    V c      = concat_r (V_r c)               local, all-gather D floats (the step Δθ)
    rᵀa      = Σ_r r_rᵀ a_r                   all-reduce 1 float
    VᵀV      = Σ_r V_rᵀ V_r                   all-reduce d² floats (re-orthonormalisation)
    V A + r cᵀ                                row-local, no communication

Gradients: instead of one all-reduce, an all-to-all gives each worker every worker's slice
of its local gradient (the same bytes as a reduce-scatter), from which it forms both the
averaged slice and every worker's exact local projection Vᵀg_r (for the per-direction noise
estimate); an all-gather completes the averaged gradient for the complement optimizer.
Together these move as many bytes as the replicated path's all-reduce.

``ReplicatedBasis`` implements the same operations with no communication; with it the
optimizer computes exactly what it computed before layouts existed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..core.errors import DimensionMismatchError
from ..core.subspace import project, qr_keep_orientation
from .distributed import _backend_device, agree


class ReplicatedBasis:
    """Every worker holds all D rows of V (the default)."""

    sharded = False
    gradients_averaged = False  # (DDPRows: sharded rows, gradients averaged by DDP)

    def bind(self, total: int) -> int:
        """Rows of V this worker holds for a model with ``total`` parameters."""
        return total

    def rows(self, vec: torch.Tensor) -> torch.Tensor:
        return vec

    def project(self, basis: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return project(basis, vec)

    def expand(self, basis: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return basis @ coef

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        # float64 accumulation without two D-sized float64 copies
        return float(torch.sum(a * b, dtype=torch.float64))

    def sqnorm(self, vec: torch.Tensor) -> float:
        """‖v‖² of a vector this worker holds whole."""
        return float(torch.dot(vec.reshape(-1), vec.reshape(-1))) if vec.numel() else 0.0

    def all_true(self, flag: bool) -> bool:
        return flag

    def column_norms(self, basis: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(basis, dim=0)

    allreduce = None  # cholesky_qr2 works on the whole basis
    tsqr = None

    def describe(self) -> dict:
        return {"kind": "replicated"}


REPLICATED = ReplicatedBasis()


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of a tensor: the local shard of a DTensor (FSDP2), else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def param_slices(params):
    """(this rank's part of p, its slice of the optimizer's flat vectors) for each parameter,
    in order: the one place the flat layout (parameters back to back) is spelled out."""
    offset = 0
    for p in params:
        mine = local(p)
        n = mine.numel()
        yield mine, slice(offset, offset + n)
        offset += n


class ShardedBasis:
    """This rank holds rows [lo, hi) of V; D is split into nearly equal contiguous slices."""

    sharded = True
    gradients_averaged = False  # OSFN's GradientSync averages them (sync_gradient)

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("a sharded basis needs an initialised torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.total: int | None = None
        self.sizes: list[int] = []
        self.lo = self.hi = 0

    # ------------------------------------------------------------- layout
    def bind(self, total: int) -> int:
        if self.total is not None and total != self.total:
            raise DimensionMismatchError(
                f"the sharded basis covers {self.total} parameters but the model now has {total}; "
                "create a new OSFN after changing the model"
            )
        base, extra = divmod(total, self.world)
        self.sizes = [base + (1 if r < extra else 0) for r in range(self.world)]
        self.lo = sum(self.sizes[: self.rank])
        self.hi = self.lo + self.sizes[self.rank]
        self.total = total
        return self.sizes[self.rank]

    def describe(self) -> dict:
        return {"kind": "sharded", "rank": self.rank, "world": self.world, "lo": self.lo, "hi": self.hi,
                "total": self.total}

    def rows(self, vec: torch.Tensor) -> torch.Tensor:
        return vec[self.lo : self.hi]

    # -------------------------------------------------------- collectives
    def _on_backend(self, t: torch.Tensor) -> torch.Tensor:
        dev = _backend_device(self.group)
        return t if t.device == dev else t.to(dev)

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over workers (returns a tensor on ``t``'s device)."""
        buf = self._on_backend(t.contiguous())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf if buf.device == t.device else buf.to(t.device)

    def project(self, basis: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """Vᵀv (d,) from this worker's rows and the full vector ``vec`` (D,)."""
        return self.allreduce(project(basis, self.rows(vec)))

    def dot(self, a_rows: torch.Tensor, b_rows: torch.Tensor) -> float:
        return float(self.allreduce((a_rows.double() @ b_rows.double()).reshape(1)))

    def sqnorm(self, vec: torch.Tensor) -> float:
        """‖v‖² of a full (D,) vector, which every worker holds (the averaged gradient)."""
        return REPLICATED.sqnorm(vec)

    def all_true(self, flag: bool) -> bool:
        return flag  # decided on the averaged gradient, which every rank holds alike

    def column_norms(self, basis: torch.Tensor) -> torch.Tensor:
        return self.allreduce((basis * basis).sum(0)).sqrt()

    def _all_gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every worker's slice (uneven sizes padded for the collective)."""
        width = max(self.sizes)
        buf = self._on_backend(local)
        if buf.shape[0] < width:
            buf = torch.cat([buf, buf.new_zeros(width - buf.shape[0])])
        out = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(out, buf.contiguous(), group=self.group)
        full = torch.cat([o[:n] for o, n in zip(out, self.sizes)])
        return full if full.device == local.device else full.to(local.device)

    def tsqr(self, sub: torch.Tensor) -> torch.Tensor:
        """Rows of Q for this worker, from a QR of the row-sharded matrix ``sub`` (rows, k):
        local QR, all-gather the k×k R factors, QR of their stack (TSQR). R's diagonal is made
        non-negative, so columns keep their orientation as in CholeskyQR. The fallback of
        ``cholesky_qr2`` for nearly dependent columns (communication: k² floats per worker)."""
        rows, k = sub.shape
        q_local, r_local = torch.linalg.qr(sub)  # reduced: (rows, m), (m, k), m = min(rows, k)
        if r_local.shape[0] < k:  # fewer rows than columns on this worker
            r_local = torch.cat([r_local, r_local.new_zeros(k - r_local.shape[0], k)])
            q_local = torch.cat([q_local, q_local.new_zeros(rows, k - q_local.shape[1])], dim=1)
        buf = self._on_backend(r_local.contiguous())
        gathered = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(gathered, buf, group=self.group)
        q_stack = qr_keep_orientation(torch.cat(gathered).to(sub.device))
        return q_local @ q_stack[self.rank * k : (self.rank + 1) * k]

    def expand(self, basis: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """V c (D,) on every worker."""
        return self._all_gather_rows(basis @ coef.to(basis.dtype))

    def sync_gradient(self, grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Average the flat local gradient (D,) in place across workers and return every
        worker's local projection Vᵀg_r as (N, d) float64 on the CPU, ordered by rank."""
        mine = self.sizes[self.rank]
        send = self._on_backend(grad.contiguous())
        recv = send.new_empty(self.world * mine)
        dist.all_to_all_single(recv, send, output_split_sizes=[mine] * self.world,
                               input_split_sizes=self.sizes, group=self.group)
        slices = recv.view(self.world, mine)  # row r: worker r's gradient on my slice
        local_basis = self._on_backend(basis)
        coords = self.allreduce(slices.to(basis.dtype) @ local_basis)  # (N, d)
        mean = slices.sum(0).div_(self.world)
        grad.copy_(self._all_gather_rows(mean.to(grad.device)))
        return coords.detach().to("cpu", torch.float64)


class DDPRows(ShardedBasis):
    """V's rows sharded under DDP (ZeRO-1 for the basis): DDP has averaged the gradients and
    every rank holds all of θ and runs the base optimizer on all of it, as without OSFN; V
    keeps only rows [lo, hi) of this rank's contiguous slice, so it costs d·D/N per rank and
    every pass over V reads 1/N of it. The one-pass native path then works on this rank's
    rows of the parameters, gradients and running means (``row_views``) and all-reduces its
    d-sized sums (2d + 2 floats after the collect, d + 3 after the move, d² on a
    re-orthonormalisation); each rank moves only its own rows of θ, and ``share_rows_``
    all-gathers them (D floats) so the replicas stay identical. No gradient all-to-all:
    the per-worker projections (noise damping's spread between workers) are not gathered,
    as with plain DDP."""

    gradients_averaged = True

    def row_views(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's rows of one tensor per parameter (shaped like it, in the flat order):
        a flat view of each part that overlaps [lo, hi), empty parts left out."""
        out, offset = [], 0
        for t in tensors:
            n = t.numel()
            a, b = max(self.lo, offset), min(self.hi, offset + n)
            if a < b:
                out.append(t.reshape(-1)[a - offset : b - offset])
            offset += n
        return out

    def share_rows_(self, params: list[torch.Tensor]) -> None:
        """Every rank's rows of θ (each rank moved only its own) to every rank: one all-gather
        of D floats, written back into the parameters outside this rank's rows."""
        params = [local(p) for p in params]
        if not params:
            return
        mine = torch.cat([v.reshape(-1) for v in self.row_views([p.detach() for p in params])]) \
            if self.hi > self.lo else params[0].new_zeros(0)
        full = self._all_gather_rows(mine.to(params[0].dtype))
        with torch.no_grad():
            offset = 0
            for p in params:
                n = p.numel()
                a, b = max(self.lo, offset), min(self.hi, offset + n)
                flat = p.view(-1)
                if a >= b:  # none of p is mine
                    flat.copy_(full[offset : offset + n])
                else:  # the parts before and after my rows
                    flat[: a - offset].copy_(full[offset:a])
                    flat[b - offset :].copy_(full[b : offset + n])
                offset += n


class LocalShards(ShardedBasis):
    """FSDP2 (``fully_shard``): every parameter is a DTensor and this rank holds only its
    local shards. V keeps the rows of those shards — whatever FSDP gave this rank, not a
    contiguous slice of a flat vector — so nothing D-sized ever crosses ranks: Vᵀv and the
    squared norms are local products + d-sized all-reduces, the Newton move V c is local
    (each rank moves only its own shard), and re-orthonormalisation all-reduces d² floats
    (TSQR fallback as for ``ShardedBasis``). Gradients arrive averaged (FSDP's
    reduce-scatter), so every rank's report, and so every rank's curvature model, is the same."""

    def bind(self, total: int) -> int:
        if self.total is not None and total != self.total:
            raise DimensionMismatchError(
                f"the basis covers {self.total} local parameters but this rank now holds {total}; "
                "create a new OSFN after changing the model or its sharding"
            )
        self.total = total
        self.sizes = [total]
        self.lo, self.hi = 0, total
        return total

    def describe(self) -> dict:
        return {"kind": "fsdp", "rank": self.rank, "world": self.world, "local": self.total}

    def rows(self, vec: torch.Tensor) -> torch.Tensor:
        return vec  # the optimizer's flat vectors already hold only the local shards

    def sqnorm(self, vec: torch.Tensor) -> float:
        return self.dot(vec, vec)

    def expand(self, basis: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return basis @ coef.to(basis.dtype)  # this rank's rows of V c: all it moves

    def all_true(self, flag: bool) -> bool:
        """A decision every rank must share (a local NaN stops the step everywhere)."""
        return agree([flag], self.group, every=True)[0]

    # -- checkpoints: the flat local vectors as DTensors sharded like their parameters, so
    # torch.distributed.checkpoint saves every rank's rows (a plain tensor under one key is
    # taken as replicated: only rank 0's copy would be kept) and reshards them on load
    def to_global(self, flat: torch.Tensor, params, trailing: tuple[int, ...] = ()) -> list:
        """``flat`` (local total, *trailing) → one DTensor of shape (*p.shape, *trailing) per
        parameter, placed like p."""
        from torch.distributed.tensor import DTensor

        out = []
        for p, (mine, rows) in zip(params, param_slices(params)):
            chunk = flat[rows].clone().view(*mine.shape, *trailing)  # its own storage (a view does not deepcopy)
            shape = (*p.shape, *trailing)
            out.append(DTensor.from_local(chunk, p.device_mesh, p.placements, run_check=False,
                                          shape=torch.Size(shape), stride=_contiguous_stride(shape)))
        return out

    def from_global(self, tensors: list, params, trailing: tuple[int, ...] = ()) -> torch.Tensor:
        """The inverse of ``to_global``: this rank's rows, back to back (local total, *trailing)."""
        if len(tensors) != len(params):
            raise DimensionMismatchError(
                f"checkpoint holds basis rows for {len(tensors)} parameters, this model has {len(params)}")
        parts = []
        for i, (t, (mine, _)) in enumerate(zip(tensors, param_slices(params))):
            part = local(t)
            if tuple(part.shape) != (*mine.shape, *trailing):
                raise DimensionMismatchError(
                    f"checkpoint rows for parameter {i} have local shape {tuple(part.shape)}, this rank holds "
                    f"{tuple(mine.shape)} (+{trailing}): load it with torch.distributed.checkpoint (which "
                    "reshards), or with the same model and world size")
            parts.append(part.reshape(mine.numel(), *trailing))
        return torch.cat(parts) if parts else torch.zeros(0, *trailing)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))
