"""What the in-process curvature service costs per exchange (the d-sized Python of a step).

    python bench/service_cost.py                  # 1.05M-parameter MLP, d = 8, 150 steps
    python bench/service_cost.py --workload char_lm --batch 32

Runs OSFN with its default in-process service and times every exchange in the run ("in
run": caches cold from the D-sized passes around it), keeping the reports; then replays the
same reports through fresh services ``--passes`` times and takes, per report, the fastest
pass ("warm": the service's own cost, with background load filtered out — this machine's
speed drifts by ±30% over tens of seconds). The replay must reproduce the run's Newton
coefficients exactly; it says by how much it does.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from osfn_dist import OSFN
from osfn_dist.dataflow.curvature import CurvatureService


class _Recording:
    """An exchange that times and keeps what passes through it."""

    def __init__(self, inner):
        self.inner, self.times, self.reports, self.coefs = inner, [], [], []

    def exchange(self, report):
        self.reports.append(copy.deepcopy(report))
        t0 = time.perf_counter()
        update = self.inner.exchange(report)
        self.times.append(time.perf_counter() - t0)
        self.coefs.append(update.step_coef.clone())
        return update

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", help="a built-in workload's model and loss instead of the MLP")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--skip", type=int, default=20, help="leading exchanges left out (basis fill)")
    ap.add_argument("--passes", type=int, default=12)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.workload:
        from osfn_dist.workloads import get_workload

        workload = get_workload(args.workload, 0)
        _, x, y = next(iter(workload.batches(1, 0, batch_size=args.batch)))
        model, loss_fn = workload.build_model(), workload.loss_fn
    else:
        from step_time import build

        model, loss_fn = build(1024, "cpu"), torch.nn.functional.cross_entropy
        x, y = torch.randn(args.batch, 512), torch.randint(0, 10, (args.batch,))
    opt = OSFN(model.parameters(), lr=1e-3, subspace_dim=args.d)
    rec = _Recording(opt.exchange)
    opt.exchange = rec
    for _ in range(args.steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    passes = []
    worst = 0.0
    for _ in range(args.passes):
        service, times = CurvatureService(opt.config), []
        for report, coef in zip(rec.reports, rec.coefs):
            t0 = time.perf_counter()
            update = service.exchange(report)
            times.append(time.perf_counter() - t0)
            worst = max(worst, float((update.step_coef - coef).abs().max()))
        passes.append(times)
    warm = [min(col) for col in zip(*passes)][args.skip:]
    in_run = rec.times[args.skip:]
    what = f"workload {args.workload}" if args.workload else "MLP"
    n = sum(p.numel() for p in model.parameters())
    print(f"{what}, {n:,} parameters, d={args.d}: {len(in_run)} exchanges timed (after {args.skip})")
    print(f"in run: {statistics.fmean(in_run) * 1e3:.3f} ms mean, {statistics.median(in_run) * 1e3:.3f} median")
    print(f"warm (fastest of {args.passes} replays per report): {statistics.fmean(warm) * 1e3:.3f} ms mean")
    print(f"replay reproduces the run's Newton coefficients to {worst:.2g} (max abs difference)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
