"""A data-parallel trainer outside Ray (plain torch.distributed, started by torchrun) that
uses the curvature server as its OSFN backend.

    osfn-dist serve --port 50051 --token-file token.txt &
    torchrun --nproc-per-node 2 -m osfn_dist.service.torchrun_demo \\
        --address 127.0.0.1:50051 --token-file token.txt --steps 40 --out params.pt

Each rank trains a tiny float64 MLP on its share of fixed batches. ``GradientSync`` averages
gradients (gloo) and gathers every rank's projection; only rank 0 talks to the server
(``LeaderExchange``), which broadcasts the update so all ranks stay identical. Without
``--address`` the same script uses the in-process curvature service (the reference path).
``--metrics-port P`` serves Prometheus metrics on P + local rank.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from ..dataflow.distributed import GradientSync, LeaderExchange
from ..core.errors import DimensionMismatchError, OSFNError
from ..optimizer import OSFN

OPTIMIZER = dict(subspace_dim=4, newton_warmup=5, noise_damping=False)  # noise damping off: see below
LR = 1e-2


def make_model(seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return model


def make_batches(steps: int, batch: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 1, generator=gen, dtype=torch.float64)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, 6, generator=gen, dtype=torch.float64)
        out.append((x, torch.sin(x @ w) + 0.1 * torch.randn(batch, 1, generator=gen, dtype=torch.float64)))
    return out


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(model, opt, batches, rank: int = 0, world: int = 1, metrics=None, before_step=None) -> list[float]:
    """Rank r takes rows [r·B/W, (r+1)·B/W) of every batch: the average of the per-rank mean
    gradients equals the full-batch mean gradient, so any world size follows one trajectory
    (up to rounding). The gradient-noise estimate does differ (per-rank projections vs the
    regression's own), which is why OPTIMIZER turns noise damping off for the comparison.
    ``before_step(i, model)``: called between backward and ``opt.step()`` (tests poison a
    gradient there)."""
    losses = []
    for i, (x, y) in enumerate(batches):
        start = time.perf_counter()
        share = x.shape[0] // world
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xs), ys)
        loss.backward()
        if before_step is not None:
            before_step(i, model)
        opt.step()
        losses.append(float(loss.detach()))
        if metrics is not None:
            metrics.observe_step(float(loss.detach()), time.perf_counter() - start, xs.shape[0], opt.diagnostics)
    return losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", help="HOST:PORT of osfn-dist serve (default: in-process service)")
    ap.add_argument("--token-file")
    ap.add_argument("--job", default="torchrun-demo")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", help="rank 0 writes the final flat parameters here (torch.save), rank r to OUT.rank<r>")
    ap.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port + local rank")
    args = ap.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    metrics = None
    if args.metrics_port is not None:
        from ..metrics.exporter import TrainMetrics

        metrics = TrainMetrics(job=args.job, worker=rank)
        metrics.serve(args.metrics_port + int(os.environ.get("LOCAL_RANK", rank)))

    inner = None
    if args.address and rank == 0:
        from .client import GrpcExchange

        inner = GrpcExchange(args.address, token_file=args.token_file, job=args.job)
        if metrics is not None:
            inner = metrics.timed(inner)
    if distributed:
        exchange = LeaderExchange(inner) if args.address else None
        sync = GradientSync()
    else:
        exchange, sync = inner, None
    model = make_model()
    opt = OSFN(model.parameters(), lr=LR, exchange=exchange, gradient_sync=sync, **OPTIMIZER)
    try:
        losses = train(model, opt, make_batches(args.steps), rank, world, metrics)
    except OSFNError as exc:  # a server with other settings, an unreachable one: one sentence, not a traceback
        hint = ""
        if isinstance(exc, DimensionMismatchError):
            hint = (f" This demo runs subspace_dim={OPTIMIZER['subspace_dim']}: start the server with "
                    f"`osfn-dist serve --subspace-dim {OPTIMIZER['subspace_dim']}`.")
        print(f"torchrun_demo rank {rank}: {type(exc).__name__}: {exc}{hint}", file=sys.stderr, flush=True)
        if distributed:
            dist.destroy_process_group()
        return 2
    if rank == 0:
        print(f"rank 0: loss {losses[0]:.5f} -> {losses[-1]:.5f} after {len(losses)} steps; "
              f"eigenvalues {[round(v, 4) for v in opt.diagnostics['eigenvalues']]}", flush=True)
    if args.out:  # rank 0 writes OUT, rank r > 0 writes OUT.rank<r> (all ranks must agree)
        path = args.out if rank == 0 else f"{args.out}.rank{rank}"
        torch.save({"params": flat_params(model), "losses": losses, "diagnostics": opt.diagnostics}, path)
    if metrics is not None:
        metrics.set_up(False)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
