"""The seed paper's own kind of test: noisy two-dimensional functions, 50 steps, a grid of starts.

Duda (arXiv:1901.11457) shows OSFN on low-dimensional test functions with noisy gradients.
Here: Beale (minimum 0 at (3, 0.5)), Rosenbrock (0 at (1, 1)) and a double well with a strict
saddle at the origin (f = x² + (y² − 1)², minima 0 at (0, ±1)), each from a 5 × 5 grid of
starts, ``--seeds`` noise draws per start, Gaussian gradient noise of std ``--noise`` on each
coordinate, 50 gradient evaluations per run. Score: the geometric mean of the final values
over all starts and seeds (a diverged run counts as 1e10).

Equal tuning budget: every optimizer gets ``len(GRID)`` = 9 settings of its one step-size
knob, half a decade apart, and reports its best: AdamW, SGD with momentum 0.9 and L-BFGS
(torch.optim.LBFGS, one noisy gradient per step, history 10, no line search — the
quasi-Newton baseline) over their learning rate; OSFN over its eigenvalue floor (the
largest Newton step per unit gradient is newton_lr / eig_floor), everything else at
``osfn_dist.LOW_DIMENSIONAL`` — the same OSFN code as for networks, with the seed's kind of
settings. A best setting on the edge of its grid is marked with ``*``.

    python bench/seed_toys.py                 # ~3 min on 2 cores
    python bench/seed_toys.py --noise 0.3 --seeds 8
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osfn_dist import LOW_DIMENSIONAL, OSFN  # noqa: E402
from osfn_dist.core.errors import InvalidReportError  # noqa: E402

STEPS = 50
GRID = [10 ** (0.5 * i) for i in range(-4, 5)]  # 0.01 … 100: factors around each centre


def beale(p):
    x, y = p[0], p[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def rosenbrock(p):
    x, y = p[0], p[1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def double_well(p):
    x, y = p[0], p[1]
    return x**2 + (y**2 - 1) ** 2


def _grid(xs, ys):
    return [(float(x), float(y)) for x in torch.linspace(*xs, 5) for y in torch.linspace(*ys, 5)]


# start grids: Beale and Rosenbrock as in the usual plots; the double well from near the
# saddle's stable manifold (y ≈ 0), where a plain Newton step would be attracted to it
FUNCTIONS = {
    "beale": (beale, _grid((-2, 2), (-2, 2))),
    "rosenbrock": (rosenbrock, _grid((-2, 2), (-1, 3))),
    "double_well": (double_well, _grid((-2, 2), (-0.05, 0.05))),
}

# optimizer → (builder(params, knob), centre of its knob's grid, knob name)
OPTIMIZERS = {
    "AdamW": (lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), 0.1, "lr"),
    "SGD-momentum": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), 3.16e-3, "lr"),
    "L-BFGS": (lambda p, lr: torch.optim.LBFGS(p, lr=lr, max_iter=1, history_size=10), 0.1, "lr"),
    "OSFN": (lambda p, floor: OSFN(p, lr=1e-3, **{**LOW_DIMENSIONAL, "eig_floor": floor}), 1.0, "eig_floor"),
}


def final_value(func, start, make_opt, noise: float, seed: int) -> float:
    theta = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = make_opt([theta])
    gen = torch.Generator().manual_seed(seed)

    def closure():
        opt.zero_grad()
        value = func(theta)
        value.backward()
        theta.grad.add_(noise * torch.randn(2, generator=gen, dtype=torch.float64))
        return value

    try:
        for _ in range(STEPS):
            if isinstance(opt, torch.optim.LBFGS):
                opt.step(closure)
            else:
                closure()
                opt.step()
            if not torch.isfinite(theta).all():
                return 1e10
    except InvalidReportError:  # OSFN refuses a report once θ has overflowed: diverged
        return 1e10
    value = float(func(theta.detach()))
    return min(value, 1e10) if math.isfinite(value) else 1e10


def score(func, starts, make_opt, noise: float, seeds: int) -> float:
    """Geometric mean of the final values over starts × noise seeds (floored at 1e-16)."""
    logs = [math.log(max(final_value(func, s, make_opt, noise, 1000 * k + i), 1e-16))
            for k in range(seeds) for i, s in enumerate(starts)]
    return math.exp(sum(logs) / len(logs))


def _job(job):
    name, label, knob_value, noise, seeds = job
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    func, starts = FUNCTIONS[name]
    build = OPTIMIZERS[label][0]
    return job, score(func, starts, lambda p: build(p, knob_value), noise, seeds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise", type=float, default=0.1, help="std of the gradient noise per coordinate")
    ap.add_argument("--seeds", type=int, default=4, help="noise draws per start")
    ap.add_argument("--functions", nargs="+", default=list(FUNCTIONS), choices=list(FUNCTIONS))
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.time()
    jobs = [(name, label, centre * f, args.noise, args.seeds)
            for name in args.functions for label, (_, centre, _) in OPTIMIZERS.items() for f in GRID]
    with mp.get_context("spawn").Pool(args.procs) as pool:
        scores = {job[:3]: value for job, value in pool.imap_unordered(_job, jobs)}
    print(f"geometric mean of the final value, {STEPS} steps, 25 starts × {args.seeds} noise seeds, "
          f"gradient noise σ = {args.noise}; best of {len(GRID)} settings per optimizer\n")
    print("| function | " + " | ".join(OPTIMIZERS) + " | OSFN vs AdamW | OSFN vs best other |")
    print("|---|" + "---|" * (len(OPTIMIZERS) + 2))
    for name in args.functions:
        best = {}
        for label, (_, centre, knob) in OPTIMIZERS.items():
            results = [(scores[(name, label, centre * f)], centre * f) for f in GRID]
            value, at = min(results)
            edge = "*" if at in (centre * GRID[0], centre * GRID[-1]) else ""
            best[label] = (value, f"{value:.3g} ({knob} {at:.3g}{edge})")
        others = min(v for k, (v, _) in best.items() if k != "OSFN")
        ratio = others / best["OSFN"][0]
        vs_adamw = best["AdamW"][0] / best["OSFN"][0]
        print(f"| {name} | " + " | ".join(cell for _, cell in best.values())
              + f" | {vs_adamw:.3g}× lower | {ratio:.3g}× lower |", flush=True)
    print(f"\n{len(jobs)} configurations in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
