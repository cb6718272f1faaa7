"""Quality check for the native CPU passes: the same runs with kernels="auto" (the default:
native C passes over V) and kernels="eager" (plain torch), same seeds, final train losses.

    python bench/native_quality.py --workloads mnist1d_mlp deep_linear --seeds 4 --steps 300
"""
from __future__ import annotations

import argparse
import statistics

from osfn_dist.bench.peers import Peer, osfn_over
from osfn_dist.bench.runner import run_one
from osfn_dist.workloads import get_workload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["mnist1d_mlp", "deep_linear"])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2, help="AdamW's tuned rate on both default workloads")
    args = ap.parse_args(argv)
    print("| workload | seed | kernels=auto (native) | kernels=eager | relative difference |")
    print("|---|---|---|---|---|")
    for name in args.workloads:
        finals = {"auto": [], "eager": []}
        for seed in range(args.seeds):
            workload = get_workload(name, seed)
            for kernels in finals:
                peer = Peer(f"osfn_{kernels}", osfn_over("adamw", kernels=kernels), args.lr)
                finals[kernels].append(run_one(workload, peer, args.lr, seed, args.steps)["final_train_loss"])
            a, e = finals["auto"][-1], finals["eager"][-1]
            print(f"| {name} | {seed} | {a:.5f} | {e:.5f} | {abs(a - e) / max(abs(e), 1e-12):.1e} |", flush=True)
        a, e = statistics.fmean(finals["auto"]), statistics.fmean(finals["eager"])
        print(f"| {name} | mean | {a:.5f} | {e:.5f} | {abs(a - e) / max(abs(e), 1e-12):.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
