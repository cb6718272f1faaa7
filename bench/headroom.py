"""Does the subspace buy the complement a larger learning rate, and a lower loss?

For each workload and each OSFN configuration: a learning-rate grid (factors of √10 around the
peer's tuned rate) with the complement at its peer's exact settings; the best final train loss
(mean over seeds), the rate that reached it, and the largest usable rate (mean loss within 2× the row's best:
AdamW rarely overflows, it just gets worse). The
subspace-off row (``subspace_dim=0``) *is* the peer, bit for bit (tests/test_bench.py). A best
rate on the edge of the grid is marked with ``*``: widen the grid before trusting that row.

    python bench/headroom.py                               # 4 workloads x 4 configs x 5 rates x 4 seeds, ~3 min
    python bench/headroom.py --workloads deep_linear --seeds 8 --steps 600
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import time

CONFIGS = {
    "off (d=0) = peer": {"subspace_dim": 0},
    "oja (first rule)": {"subspace_rule": "oja", "subspace_source": "momentum"},
    "curvature, π=1": {"subspace_rule": "curvature", "subspace_source": "innovation"},
    "curvature, π=0": {"subspace_rule": "curvature", "subspace_source": "innovation", "complement_in_subspace": 0.0},
    "preconditioned coordinates": {"coordinates": "preconditioned"},
    "preconditioned coordinates, d=4": {"coordinates": "preconditioned", "subspace_dim": 4},
    "preconditioned coordinates, d=32": {"coordinates": "preconditioned", "subspace_dim": 32},
    "preconditioned coordinates, newton_warmup=30": {"coordinates": "preconditioned", "newton_warmup": 30},
}


def _run(job):
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from osfn_dist.bench.peers import OSFN_PEER_OF, Peer, osfn_over
    from osfn_dist.bench.runner import run_one
    from osfn_dist.workloads import get_workload

    variant, workload, name, lr, seed, steps = job
    peer = Peer(variant, osfn_over(OSFN_PEER_OF[variant], **CONFIGS[name]), lr)
    loss = run_one(get_workload(workload), peer, lr, seed, steps)["final_train_loss"]
    return job, loss if math.isfinite(loss) else float("inf")


def main(argv=None) -> int:
    from contribution import PEER_LR

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="osfn", choices=list(PEER_LR))
    ap.add_argument("--workloads", nargs="+", default=list(PEER_LR["osfn"]))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--grid", type=int, default=5, help="rates: centre × √10^k, k = -(grid//2)..grid//2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args(argv)
    half = args.grid // 2
    rates = {w: [PEER_LR[args.variant][w] * 10 ** (k / 2) for k in range(-half, half + 1)] for w in args.workloads}
    jobs = [
        (args.variant, w, c, lr, s, args.steps)
        for w in args.workloads for c in args.configs for lr in rates[w] for s in range(args.seeds)
    ]
    t0 = time.time()
    results = {}
    with mp.get_context("spawn").Pool(args.procs) as pool:
        for i, (job, loss) in enumerate(pool.imap_unordered(_run, jobs), 1):
            results[job[1:5]] = loss
            if i % 20 == 0 or i == len(jobs):
                print(f"{i}/{len(jobs)} runs, {time.time() - t0:.0f} s", flush=True)
    print(f"\n{args.variant}: final train loss after {args.steps} steps, mean of {args.seeds} seeds; "
          f"rates {', '.join(f'{10 ** (k / 2):.3g}' for k in range(-half, half + 1))} × the peer's\n")
    print("| workload | config | best loss | vs peer | best lr | largest usable lr |")
    print("|---|---|---|---|---|---|")
    for w in args.workloads:
        peer_best = None
        for c in args.configs:
            means = [statistics.mean(results[(w, c, lr, s)] for s in range(args.seeds)) for lr in rates[w]]
            best = min(range(len(means)), key=lambda i: means[i])
            usable = [lr for lr, m in zip(rates[w], means) if m <= 2 * means[best]]
            edge = "*" if best in (0, len(means) - 1) else ""
            if peer_best is None:
                peer_best = means[best]
            change = f"{100 * (means[best] / peer_best - 1):+.0f}%"
            print(f"| {w} | {c} | {means[best]:.4g} | {change} | {rates[w][best]:.3g}{edge} | "
                  f"{max(usable):.3g} |")
    print(f"\n{len(jobs)} runs in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
