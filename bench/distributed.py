"""Distributed benchmark: OSFN on Ray Train (2 workers) against DDP + AdamW.

    python bench/distributed.py                      # D ≈ 1M and ≈ 10M, CPU, 2 workers
    python bench/distributed.py --sizes 1m --steps 60 --out bench-results/distributed.md

For each model size it runs ``osfn-dist train`` on Ray Train (the real path: TorchTrainer,
gloo all-reduce, the curvature actor) with

- ``adamw (DDP)``          DDP + torch AdamW (the baseline),
- ``osfn (DDP)``           OSFN on DDP's averaged gradients (``osfn-dist train``'s default),
- ``osfn (DDP), worker noise`` the same plus the DDP hook that sends every worker's own
                           projection to the service (``--worker-noise``),
- ``osfn (gradient_sync)`` OSFN's own all-reduce after backward (the earlier default),
- ``osfn s=1``             OSFN, one-step-stale pipelining (actor round trip behind the next fwd/bwd),
- ``osfn shard``           OSFN with the basis sharded across the workers (gradient_sync),
- ``osfn (FSDP2)``         ``--parallel fsdp2``: parameters and V sharded,
- ``... (own loop)``       the recipe ``osfn_dist/recipes/ray_train_loop.py`` in a bare TorchTrainer,

and reports the median training-step time per worker (start-up, checkpoints and evaluation
excluded), the throughput ratio to DDP + AdamW, the actor round trip (median, p99), the
bytes per step to and from the actor, and the optimizer state held per worker.

Models: synthetic classification MLPs 64 → h → h → h → 10 (h = 690: D ≈ 1.0M; h = 2200:
D ≈ 9.8M), global batch 64, so the numbers measure the optimizer and the data path, not a
data loader. Run from the repository root (workers import this file as ``bench.distributed``).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/distributed.py` puts bench/ first, not the repo
    sys.path.insert(0, str(ROOT))

from osfn_dist.workloads import Workload  # noqa: E402

WIDTHS = {"1m": 690, "10m": 2200}


def _mlp_workload(width: int, seed: int) -> Workload:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4096, 64, generator=gen)
    teacher = torch.randn(64, 10, generator=gen)
    y = (x @ teacher).argmax(1)

    def build():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

    return Workload(f"mlp_{width}", build, (x[:3584], y[:3584]), (x[3584:], y[3584:]), F.cross_entropy,
                    batch_size=64, default_steps=40, description=f"synthetic MLP 64-{width}x3-10")


def mlp_1m(seed: int = 0) -> Workload:
    return _mlp_workload(WIDTHS["1m"], seed)


def mlp_10m(seed: int = 0) -> Workload:
    return _mlp_workload(WIDTHS["10m"], seed)


VARIANTS = {
    "adamw (DDP)": ({"name": "adamw", "lr": 1e-3}, {}),
    "osfn (DDP)": ({"name": "osfn", "lr": 1e-3}, {}),
    "osfn (DDP), worker noise": ({"name": "osfn", "lr": 1e-3}, {"worker_noise": True}),
    "osfn (gradient_sync)": ({"name": "osfn", "lr": 1e-3}, {"parallel": "gradient_sync"}),
    "osfn s=1": ({"name": "osfn", "lr": 1e-3}, {"staleness": 1}),
    # V's rows sharded over the workers: under DDP (DDPRows, the one-pass native path on each
    # rank's rows) or on OSFN's own gradient all-to-all (torch passes)
    "osfn (DDP), shard_basis": ({"name": "osfn", "lr": 1e-3}, {"shard_basis": True}),
    "osfn shard (gradient_sync)": ({"name": "osfn", "lr": 1e-3}, {"shard_basis": True, "parallel": "gradient_sync"}),
    "osfn (DDP), shard_basis, s=1": ({"name": "osfn", "lr": 1e-3}, {"shard_basis": True, "staleness": 1}),
    "osfn (FSDP2)": ({"name": "osfn", "lr": 1e-3}, {"parallel": "fsdp2"}),
    # your own Ray Train loop (osfn_dist/recipes/ray_train_loop.py): DDP's averaged gradients
    # (overlapped with backward) or FSDP2's sharded ones, the same curvature actor
    "osfn over DDP (own loop)": ({"name": "osfn", "lr": 1e-3}, {"own_loop": "ddp"}),
    "osfn over FSDP2 (own loop)": ({"name": "osfn", "lr": 1e-3}, {"own_loop": "fsdp2"}),
}


def _params(size: str) -> int:
    w = WIDTHS[size]
    return 64 * w + w + 2 * (w * w + w) + 10 * w + 10


def run_own_loop(size: str, variant: str, steps: int, out_dir: Path, workers: int) -> dict:
    """The recipe's train_func on TorchTrainer; rank 0's step time and optimizer state (its
    one report, at the last step), in the shape of train_ray's summary."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from osfn_dist import OSFNConfig
    from osfn_dist.actor import create_curvature_actor, release_curvature_actor
    from osfn_dist.recipes.ray_train_loop import train_func

    opt, extra = VARIANTS[variant]
    hyper = {k: v for k, v in opt.items() if k != "name"}
    name = f"bench-own-{size}-{extra['own_loop']}"
    # a finished run left in storage would be resumed (its last checkpoint is the end) and
    # its old metrics returned: start from nothing
    shutil.rmtree(out_dir / name, ignore_errors=True)
    actor = create_curvature_actor(OSFNConfig(**hyper), name=name)
    try:
        result = TorchTrainer(
            train_func, scaling_config=ScalingConfig(num_workers=workers),
            train_loop_config={"actor": name, "hyper": hyper, "steps": steps, "checkpoint_every": steps,
                               "workload": f"bench.distributed:mlp_{size}", "parallel": extra["own_loop"]},
            run_config=RunConfig(name=name, storage_path=str(out_dir.resolve())),
        ).fit()
    finally:
        release_curvature_actor(actor)
    m = result.metrics
    return {"optimizer": "osfn-own", "worker_throughput": [
        {"step_ms_median": m["step_ms_median"], "optimizer_state_bytes": m["optimizer_state_bytes"]}]}


def run_one(size: str, variant: str, steps: int, out_dir: Path, workers: int) -> dict:
    from osfn_dist.train.config import TrainConfig
    from osfn_dist.train.ray_trainer import train_ray

    opt, extra = VARIANTS[variant]
    if "own_loop" in extra:
        return run_own_loop(size, variant, steps, out_dir, workers)
    run_dir = out_dir / f"{size}-{variant.replace(' ', '_').replace('(', '').replace(')', '').replace('=', '').replace(',', '')}"
    cfg = TrainConfig(workload=f"bench.distributed:mlp_{size}", steps=steps, run_dir=str(run_dir), backend="ray",
                      num_workers=workers, checkpoint_every=10**9, keep_checkpoints=1, log_every=10,
                      optimizer=dict(opt), **extra)
    t0 = time.perf_counter()
    summary = train_ray(cfg, show_progress=False)
    summary["bench_wall_s"] = time.perf_counter() - t0
    return summary


def optimizer_step_ms(size: str, name: str, repeats: int = 10, warmup: int = 20) -> tuple[float, float]:
    """(opt.step() alone, the whole training step) in one process on one thread, on one
    worker's share of the batch (32): the optimizer's own D-sized cost and what a worker
    would spend without any communication, in the steady state (after ``warmup`` steps: the
    subspace fills one direction per step with an exact residual and a
    re-orthonormalisation each time, which costs several times a steady step and made an
    8-step median swing by 2× between runs)."""
    import statistics

    from osfn_dist.train.optimizers import build_optimizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workload = mlp_1m() if size == "1m" else mlp_10m()
        model = workload.build_model()
        opt = build_optimizer(model.parameters(), dict(VARIANTS["osfn (DDP)" if name == "osfn" else "adamw (DDP)"][0]))
        x, y = workload.train
        times, whole = [], []
        for i in range(repeats + warmup):
            t_start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            workload.loss_fn(model(x[:32]), y[:32]).backward()
            t0 = time.perf_counter()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                whole.append(time.perf_counter() - t_start)
        return 1e3 * statistics.median(times), 1e3 * statistics.median(whole)
    finally:
        torch.set_num_threads(threads)


def side_by_side_step_ms(size: str, name: str, workers: int) -> float:
    """The one-process training step run by ``workers`` processes at once (each one thread,
    its own share of the batch, no communication): what the workers' compute costs when they
    share this machine's cores as the Ray workers do. Against it the distributed overhead is
    communication, the actor and the framework, not core contention. The slowest process's
    median."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return max(whole for _, whole in pool.starmap(optimizer_step_ms, [(size, name)] * workers))


def _mib(x) -> str:
    return f"{x / 2**20:.1f}"


def table(results: dict, steps: int, workers: int, alone: dict) -> str:
    lines = [
        f"Ray Train, {workers} CPU workers (gloo), global batch 64, {steps} steps per run. Step = median "
        "per-worker training step (forward, backward, gradient all-reduce, optimizer, actor exchange); "
        "One-process step = forward, backward and optimizer on one worker's share of the batch (32) in one "
        "process on one thread, no communication (`opt.step()` alone in brackets); the overhead column is "
        "the distributed step against it; `side by side` = that step run by as many processes at once as "
        "there are workers (the same core contention, no communication), and the overhead against it. "
        "Actor RTT = submit to reply; actor wait = time a worker is blocked on it (pipelining hides the "
        "round trip behind the next forward/backward). Bytes = pickled Report + DirectionUpdate per step. "
        "`own loop` rows: the recipe `osfn_dist/recipes/ray_train_loop.py` (OSFN on DDP's or FSDP2's "
        "gradients, the same actor); their step time and state are rank 0's.",
        "",
        "| D | optimizer | step ms | throughput vs DDP+AdamW | one-process step ms (opt.step() alone) "
        "| distributed overhead vs one process | side by side ms (overhead) | actor RTT median / p99 ms "
        "| actor wait median ms | actor bytes/step (to + from) | optimizer state per worker MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, runs in results.items():
        base = runs.get("adamw (DDP)")
        base_ms = max(w["step_ms_median"] for w in base["worker_throughput"]) if base else None
        for variant, s in runs.items():
            ms = max(w["step_ms_median"] for w in s["worker_throughput"])
            ratio = f"{base_ms / ms:.2f}x" if base_ms else "-"
            if s["optimizer"] == "osfn-own":  # the recipe does not time its exchanges
                rtt, wait, traffic = "n/m", "n/m", "as osfn"
            elif s["optimizer"] == "osfn":
                rtt = f"{s['actor_round_trip_ms_median']:.2f} / {s['actor_round_trip_ms_p99']:.2f}"
                wait = f"{s['actor_wait_ms_median']:.2f}"
                traffic = (f"{s['actor_bytes_per_step']:.0f} ({s['actor_bytes_sent_per_step']:.0f} + "
                           f"{s['actor_bytes_received_per_step']:.0f})")
            else:
                rtt, wait, traffic = "-", "-", "0 (no actor)"
            mem = " / ".join(_mib(w["optimizer_state_bytes"]) for w in s["worker_throughput"])
            ref = alone.get((size, "osfn" if s["optimizer"] == "osfn-own" else s["optimizer"]))
            one = f"{ref[1]:.1f} ({ref[0]:.1f})" if ref is not None else "-"
            overhead = f"{100 * (ms / ref[1] - 1):+.0f}%" if ref is not None else "-"
            both = f"{ref[2]:.1f} ({100 * (ms / ref[2] - 1):+.0f}%)" if ref is not None else "-"
            lines.append(f"| {_params(size) / 1e6:.2f}M | {variant} | {ms:.1f} | {ratio} | {one} | {overhead} | {both} | {rtt} "
                         f"| {wait} | {traffic} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["1m", "10m"], choices=sorted(WIDTHS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench-results" / "distributed.md"))
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "bench" / "distributed"))
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.chdir(ROOT)  # Ray puts the driver's directory on the workers' path: bench.distributed imports

    import ray

    ray.init(num_cpus=args.workers, log_to_driver=False)
    results: dict = {}
    try:
        for size in args.sizes:
            results[size] = {}
            for variant in args.variants:
                print(f"[bench] D={size} {variant} ...", flush=True)
                results[size][variant] = run_one(size, variant, args.steps, Path(args.run_dir), args.workers)
    finally:
        ray.shutdown()
    alone = {(size, name): (*optimizer_step_ms(size, name), side_by_side_step_ms(size, name, args.workers))
             for size in args.sizes for name in ("osfn", "adamw")}
    body = table(results, args.steps, args.workers, alone)
    header = (
        "# Distributed benchmark: OSFN on Ray Train vs DDP + AdamW\n\n"
        f"Command: `python bench/distributed.py --steps {args.steps} --sizes {' '.join(args.sizes)}`  \n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
        f"ray {ray.__version__}, {time.strftime('%Y-%m-%d')}.\n\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + body + "\n")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
