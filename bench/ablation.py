"""OSFN ablation: one knob at a time against the defaults, at a fixed learning rate.

Variants are relative to the defaults of the version that runs them (the first README table
was measured with eig_floor 1.0, complement_in_subspace 0, subspace_source momentum).

    python bench/ablation.py --workloads deep_linear mnist1d_mlp --steps 300 --seeds 2

Prints a markdown table of final full-train loss (mean over seeds) per variant and
workload, with AdamW and Muon at the same budget for reference. The numbers in the README's
"what we tried" section come from this script.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from osfn_dist.bench.peers import PEERS, Peer, _osfn
from osfn_dist.bench.runner import run_one
from osfn_dist.workloads import get_workload

VARIANTS = {
    "defaults": {},
    "newton adds to complement (complement_in_subspace=1)": {"complement_in_subspace": 1.0},
    "subspace from gradient": {"subspace_source": "gradient"},
    "eig_floor 0.1": {"eig_floor": 0.1},
    "eig_floor 10": {"eig_floor": 10.0},
    "newton_lr 1.0": {"newton_lr": 1.0},
    "newton_lr 0.1": {"newton_lr": 0.1},
    "d 16": {"subspace_dim": 16},
    "d 32": {"subspace_dim": 32},
    "forgetting 0.02": {"forgetting": 0.02},
    "forgetting 0.2": {"forgetting": 0.2},
    "no noise damping": {"noise_damping": False},
    "trust_radius 0.1": {"trust_radius": 0.1},
    "oja+replace rule": {"subspace_rule": "oja+replace"},
    "subspace_rate 0.5": {"subspace_rate": 0.5},
    "newton off (newton_lr 0)": {"newton_lr": 0.0},
    "eig_floor 1.0": {"eig_floor": 1.0},
    "complement_in_subspace=0": {"complement_in_subspace": 0.0},
    "subspace from momentum": {"subspace_source": "momentum"},
    "curvature_every 4": {"curvature_every": 4},
    "curvature_every 16": {"curvature_every": 16},
    "eig_floor 0.1 + complement_in_subspace=1": {"eig_floor": 0.1, "complement_in_subspace": 1.0},
    "eig_floor 0.3": {"eig_floor": 0.3},
    "eig_floor 0.1 + d 16": {"eig_floor": 0.1, "subspace_dim": 16},
    "eig_floor 0.1 + newton_lr 1.0": {"eig_floor": 0.1, "newton_lr": 1.0},
    "complement_in_subspace=0.5": {"complement_in_subspace": 0.5},
    "basis_update_every 4": {"basis_update_every": 4},
    "reorth_every 64": {"reorth_every": 64},
    "preconditioned coordinates": {"coordinates": "preconditioned"},
    "preconditioned coordinates, d 4": {"coordinates": "preconditioned", "subspace_dim": 4},
    "pipelined service": {"pipelined": True},
    "bfloat16 basis": {"basis_dtype": "bfloat16"},
    "preconditioned coordinates, pipelined service": {"coordinates": "preconditioned", "pipelined": True},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["deep_linear", "mnist1d_mlp", "digits_autoencoder"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None, help="default: per-workload AdamW-tuned lr below")
    ap.add_argument("--complement", default="adamw")
    ap.add_argument("--variants", nargs="+", help="subset of variant names")
    ap.add_argument("--json", help="write raw results here")
    args = ap.parse_args(argv)
    # learning rates from `osfn-dist bench` tuning of AdamW (the complement's own lr)
    tuned = {"deep_linear": 1e-2, "mnist1d_mlp": 3e-3, "digits_autoencoder": 3e-3, "mnist1d_cnn": 3e-3}
    if args.complement == "muon":
        tuned = {k: 2e-2 for k in tuned}
    names = args.variants or list(VARIANTS)
    results: dict[str, dict[str, float]] = {}
    per_seed: dict[str, dict[str, list[float]]] = {}
    refs = ["adamw", "muon"]
    for w in args.workloads:
        workload = get_workload(w)
        lr = args.lr or tuned.get(w, 3e-3)
        for ref in refs:
            peer = PEERS[ref]
            rlr = lr if ref == "adamw" else 2e-2
            losses = [run_one(workload, peer, rlr, s, args.steps)["final_train_loss"] for s in range(args.seeds)]
            results.setdefault(f"[ref] {ref}", {})[w] = statistics.fmean(losses)
        for name in names:
            t0 = time.perf_counter()
            peer = Peer(name, _osfn(complement=args.complement, **VARIANTS[name]), lr)
            losses = [run_one(workload, peer, lr, s, args.steps)["final_train_loss"] for s in range(args.seeds)]
            results.setdefault(name, {})[w] = statistics.fmean(losses)
            per_seed.setdefault(name, {})[w] = losses
            print(f"{w:20s} {name:55s} {results[name][w]:.4g}  ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    print(f"| variant (complement {args.complement}) | " + " | ".join(args.workloads) + " |")
    print("|---|" + "---|" * len(args.workloads))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[w]:.4g}" for w in args.workloads) + " |")
    if len(names) > 1 and args.seeds > 1:  # paired, seed by seed, against the first variant
        first = names[0]
        print(f"\nseed by seed against '{first}' (ratio of means; seeds where the variant is lower):")
        for name in names[1:]:
            cells = []
            for w in args.workloads:
                a, b = per_seed[first][w], per_seed[name][w]
                cells.append(f"{w} {statistics.fmean(b) / statistics.fmean(a):.3f}× ({sum(y < x for x, y in zip(a, b))}/{len(a)})")
            print(f"- {name}: " + ", ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"means": results, "per_seed": per_seed}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
