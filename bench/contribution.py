"""What the subspace Newton step adds to each base optimizer, like for like.

For each OSFN variant and workload: OSFN around the peer's own optimizer with the subspace
switched off (``subspace_dim=0``, which *is* the peer, bit for bit: tests/test_bench.py)
against the full method at a few eigenvalue floors, all at one learning rate (the peer's
tuned rate from the standard benchmark). Final full-train
loss after ``--steps``, mean over seeds; a negative change means the Newton step helped.

    python bench/contribution.py                 # 5 workloads x 3 bases x 8 seeds
    python bench/contribution.py --floors 0.1 1 --workloads deep_linear
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

# the peer's best rate in bench-results/standard.md (char_lm: bench-results/char_lm.md) (the OSFN variant's grid shares its centre)
PEER_LR = {
    "osfn": {"mnist1d_mlp": 1e-2, "mnist1d_cnn": 1e-2, "digits_autoencoder": 3.16e-3, "deep_linear": 3.16e-2,
             "char_lm": 1e-2},
    "osfn_muon": {"mnist1d_mlp": 1.58e-2, "mnist1d_cnn": 1.58e-1, "digits_autoencoder": 1.58e-2, "deep_linear": 1.58e-2,
                  "char_lm": 5e-2},
    "osfn_soap": {"mnist1d_mlp": 1e-2, "mnist1d_cnn": 1e-2, "digits_autoencoder": 1e-2, "deep_linear": 3.16e-3,
                  "char_lm": 3.16e-2},
}
BASE_LABEL = {"osfn": "torch AdamW", "osfn_muon": "torch Muon + AdamW", "osfn_soap": "heavyball SOAP"}


def _run(job):
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # two single-threaded runs at once beat one two-threaded on 2 cores
    from osfn_dist.bench.peers import OSFN_PEER_OF, Peer, osfn_over
    from osfn_dist.bench.runner import run_one
    from osfn_dist.workloads import get_workload

    variant, workload, extra, seed, steps = job
    lr = PEER_LR[variant][workload]
    peer = Peer(variant, osfn_over(OSFN_PEER_OF[variant], **extra), lr)
    out = run_one(get_workload(workload), peer, lr, seed, steps)
    return job, (out["final_train_loss"], out["step_seconds"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(PEER_LR), choices=list(PEER_LR))
    ap.add_argument("--workloads", nargs="+", default=list(PEER_LR["osfn"]))
    ap.add_argument("--floors", nargs="+", type=float, default=[0.1, 1.0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=8, help="3 seeds left ±15%% swings on the deep linear net")
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args(argv)
    configs = [("off (d=0) = peer", {"subspace_dim": 0})] + [(f"eig_floor {f:g}", {"eig_floor": f}) for f in args.floors]
    jobs = [
        (v, w, extra, s, args.steps)
        for v in args.variants for w in args.workloads for _, extra in configs for s in range(args.seeds)
    ]
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.procs) as pool:
        results = {}
        for i, (job, loss) in enumerate(pool.imap_unordered(_run, jobs), 1):  # loss: (final loss, step s)
            v, w, extra, s, _ = job
            results[(v, w, tuple(sorted(extra.items())), s)] = loss
            if i % 16 == 0 or i == len(jobs):
                print(f"{i}/{len(jobs)} runs, {time.time() - t0:.0f} s", flush=True)
    for v in args.variants:
        print(f"\n{v}: OSFN over {BASE_LABEL[v]} (the peer's own optimizer object), final train loss, "
              f"mean of {args.seeds} seeds, {args.steps} steps; step time relative to the base alone\n")
        print("| workload (lr) | " + " | ".join(name for name, _ in configs) + " | step time |")
        print("|---|" + "---|" * (len(configs) + 1))
        for w in args.workloads:
            cell = [[results[(v, w, tuple(sorted(extra.items())), s)] for s in range(args.seeds)] for _, extra in configs]
            means = [statistics.mean(loss for loss, _ in runs) for runs in cell]
            times = [statistics.median(t for _, t in runs) for runs in cell]
            # paired by seed: on how many seeds the Newton step lowered the loss
            wins = [sum(a < b for (a, _), (b, _) in zip(runs, cell[0])) for runs in cell[1:]]
            cells = [f"{means[0]:.4g}"] + [
                f"{m:.4g} ({100 * (m / means[0] - 1):+.0f}%, {w}/{args.seeds} seeds better)" for m, w in zip(means[1:], wins)
            ]
            ratio = " / ".join(f"{t / times[0]:.2f}×" for t in times[1:])
            print(f"| {w} ({PEER_LR[v][w]:g}) | " + " | ".join(cells) + f" | {ratio} |")
    print(f"\n{len(jobs)} runs in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
