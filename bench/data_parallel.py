"""OSFN composed with DDP and FSDP2 against DDP + AdamW: step time and optimizer memory per
worker, 2 gloo ranks on this machine (torch.multiprocessing, no Ray).

    python bench/data_parallel.py                      # ~1M and ~10M parameters, d = 8
    python bench/data_parallel.py --widths 1024 --steps 20

Per configuration and width: the median training step (forward, backward with its gradient
communication, optimizer step) over ``--steps`` steps after warm-up, rank 0's optimizer
state in MB (OSFN: the basis V included; FSDP2: this rank's shards), and the step time
relative to DDP + AdamW. Configurations:

- DDP + AdamW: the reference;
- DDP + OSFN: OSFN on DDP-averaged gradients (rank 0's curvature model, update broadcast);
- DDP + OSFN, watch_ddp: plus the communication hook that gives the service every worker's
  own projection (the noise estimate);
- GradientSync + OSFN: OSFN's own averaging (one flat all-reduce after backward, no DDP);
- GradientSync + OSFN, sharded basis: V split by rows across the ranks;
- FSDP2 + AdamW, FSDP2 + OSFN: fully_shard on every Linear and the root.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

CONFIGS = ("DDP + AdamW", "DDP + OSFN", "DDP + OSFN, watch_ddp", "GradientSync + OSFN", "GradientSync + OSFN, sharded V",
           "FSDP2 + AdamW", "FSDP2 + OSFN")


def _model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, width), torch.nn.ReLU(), torch.nn.Linear(width, 512),
                               torch.nn.ReLU(), torch.nn.Linear(512, 10))


def _state_mb(opt) -> float:
    from osfn_dist.dataflow.shard import local

    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += local(v).numel() * v.element_size()
    basis = getattr(opt, "basis", None)
    if basis is not None:
        total += basis.numel() * basis.element_size()
    return total / 2**20


def _build(name: str, width: int, d: int, rank: int):
    from torch.nn.parallel import DistributedDataParallel

    from osfn_dist import OSFN, OSFNConfig
    from osfn_dist.dataflow.curvature import CurvatureService
    from osfn_dist.dataflow.distributed import GradientSync, LeaderExchange
    from osfn_dist.dataflow.exchange import InProcessExchange

    model = _model(width)
    hyper = dict(lr=1e-3, subspace_dim=d)

    def leader():
        return LeaderExchange(InProcessExchange(CurvatureService(OSFNConfig(**hyper))) if rank == 0 else None)

    if name.startswith("DDP"):
        model = DistributedDataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if "AdamW" in name else \
            OSFN(model.parameters(), exchange=leader(), **hyper)
        if "watch_ddp" in name:
            opt.watch_ddp(model)
    elif name.startswith("GradientSync"):
        opt = OSFN(model.parameters(), exchange=leader(), gradient_sync=GradientSync(),
                   shard_basis="sharded" in name, **hyper)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if "AdamW" in name else OSFN(model.parameters(), **hyper)
    return model, opt


def _worker(rank: int, port: int, args, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch // 2, 512, generator=g), torch.randint(0, 10, (args.batch // 2,), generator=g)
    for width in args.widths:
        for name in CONFIGS:
            model, opt = _build(name, width, args.d, rank)
            times = []
            for i in range(args.warmup + args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            params = sum(p.numel() for p in _model(width).parameters())
            results[(width, name)] = (params, statistics.median(times), _state_mb(opt))
            del model, opt
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 9216], help="hidden width (1024: 1.06M, 9216: 9.5M parameters)")
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128, help="global batch (split over the 2 ranks)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, args, out)) for r in range(2)]
    t0 = time.time()
    for p in procs:
        p.start()
    results = out.get(timeout=3600)
    for p in procs:
        p.join(timeout=60)
    print(f"2 gloo ranks on this machine (1 thread each), global batch {args.batch}, d = {args.d}, "
          f"median of {args.steps} steps after {args.warmup}; {time.time() - t0:.0f} s\n")
    print("| parameters | configuration | step ms | vs DDP + AdamW | optimizer state MB (rank 0) |")
    print("|---|---|---|---|---|")
    for width in args.widths:
        ref = results[(width, "DDP + AdamW")][1]
        for name in CONFIGS:
            params, t, mb = results[(width, name)]
            print(f"| {params:,} | {name} | {t * 1e3:.1f} | {t / ref:.2f}× | {mb:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
