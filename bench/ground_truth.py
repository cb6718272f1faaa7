"""Ground truth for the subspace: is V the sharp subspace, and does that buy headroom?

Two parts, both against the real Hessian (osfn_dist.bench.ground_truth):

1. Stiff quadratics (noisy gradients, rotated, a few eigenvalues 10–100× the rest): steps to
   1e-4·f₀ and the largest stable rate on one learning-rate grid, SGD-Nesterov against OSFN
   (Nesterov complement with SGD's settings, π = 0 so Newton owns the subspace) with the first
   subspace rule (Oja on the momentum) and the curvature rule; the principal angle between V
   and the true top-k eigenvectors at the end. Every optimizer gets the same linear warmup.
2. A network (default: the deep linear net): every ``--every`` steps, Lanczos on Hessian-vector
   products of the full-batch loss gives the top-d |λ| eigenspace; logged: principal angles
   between V and it, the complement's leak into it, the fitted eigenvalues next to the true
   curvature vᵀHv of the optimizer's own eigen-directions. Drawn to ``--png``.

    python bench/ground_truth.py                          # ~2 min on 2 cores
    python bench/ground_truth.py --skip-quadratic --workload mnist1d_mlp --every 50
    python bench/ground_truth.py --skip-quadratic --observe --png runs/bench/observe.png   # newton_lr = 0
    python bench/ground_truth.py --skip-network --trace-lr 0.5 --trace-set '{"subspace_rate": 0.02}'   # where the steps go
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from osfn_dist import OSFN  # noqa: E402
from osfn_dist.bench.ground_truth import (  # noqa: E402
    model_hvp, principal_angles_deg, stiff_quadratic, subspace_truth,
)

FIRST_RULE = {"subspace_rule": "oja", "subspace_source": "momentum"}
CURVATURE_RULE = {"subspace_rule": "curvature", "subspace_source": "innovation"}
# the quadratic preset: its scale (‖θ₀‖ ≈ 14, |λ| up to 100) needs a larger trust radius than a
# network; with little gradient noise a full Newton step on a short momentum and fast
# forgetting converge faster (measured: 146 → 67 steps on the D = 200 instance)
QUADRATIC_NEWTON = {"complement_in_subspace": 0.0, "trust_radius": 100.0, "newton_warmup": 0,
                    "newton_lr": 1.0, "newton_momentum": 0.5, "forgetting": 0.3}


def quadratic_run(make_opt, hess, x0, steps, noise, warmup, seed=1, f0=None):
    """Steps to 1e-4·f₀ (f₀ = f(x0) unless given), whether it stayed finite, the optimizer."""
    theta = torch.nn.Parameter(x0.clone().float())
    opt = make_opt([theta])
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    h32 = hess.float()
    f0 = 0.5 * float(x0 @ hess @ x0) if f0 is None else f0
    for t in range(steps):
        for g, lr in zip(opt.param_groups, base):  # warmup without initial_lr: Newton unscaled
            g["lr"] = lr * min(1.0, (t + 1) / warmup) if warmup else lr
        theta.grad = h32 @ theta.detach() + noise * torch.randn(x0.shape[0], generator=gen)
        opt.step()
        th = theta.detach().double()
        f = 0.5 * float(th @ hess @ th) / f0
        if not math.isfinite(f) or f > 1e6:
            return None, False, opt
        if f <= 1e-4:
            return t + 1, True, opt
    return None, True, opt


def quadratic_table(args) -> None:
    rates = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    makers = {
        "SGD-Nesterov": lambda lr: lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
        "OSFN, first rule": lambda lr: lambda p: OSFN(p, lr=lr, complement="nesterov", **FIRST_RULE, **QUADRATIC_NEWTON),
        "OSFN, curvature rule": lambda lr: lambda p: OSFN(p, lr=lr, complement="nesterov", **CURVATURE_RULE, **QUADRATIC_NEWTON),
    }
    print(f"\nStiff quadratics: steps to 1e-4·f0 (best over rates {rates}), {args.qsteps} steps max, "
          f"gradient noise {args.noise}, linear warmup {args.warmup} steps for every optimizer\n")
    print("| instance | optimizer | steps to 1e-4 | at lr | largest stable lr | max angle V vs top-k (°) |")
    print("|---|---|---|---|---|---|")
    for name, (dim, k, seed) in {"D=200, 8 sharp": (200, 8, 0), "D=500, 4 sharp": (500, 4, 1)}.items():
        hess, top, x0 = stiff_quadratic(dim, k, seed)
        ideal_row(name, hess, top, x0, rates, args)
        for label, make in makers.items():
            best = (None, None)
            stable = []
            angle = float("nan")
            for lr in rates:
                steps, ok, opt = quadratic_run(make(lr), hess, x0, args.qsteps, args.noise, args.warmup)
                if ok:
                    stable.append(lr)
                if steps is not None and (best[0] is None or steps < best[0]):
                    best = (steps, lr)
                    basis = getattr(opt, "basis", None)
                    if basis is not None:
                        angle = float(principal_angles_deg(basis, top).max())
            edge = "*" if best[1] in (rates[0], rates[-1]) else ""
            print(f"| {name} | {label} | {best[0] if best[0] else '—'} | "
                  f"{best[1] if best[1] else '—'}{edge} | {max(stable) if stable else '—'} | "
                  f"{'' if label.startswith('SGD') else f'{angle:.0f}'} |", flush=True)


def ideal_row(name, hess, top, x0, rates, args) -> None:
    """The bound for any 'Newton owns the sharp subspace, Nesterov the rest' method: the sharp
    eigenspace removed exactly from the start (H and θ₀ projected onto the rest, f still
    relative to the full f₀), SGD-Nesterov on what is left with the same warmup and noise."""
    rest = torch.eye(hess.shape[0], dtype=hess.dtype) - top @ top.T
    f0 = 0.5 * float(x0 @ hess @ x0)
    best, stable = (None, None), []
    for lr in rates:
        steps, ok, _ = quadratic_run(lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
                                     rest @ hess @ rest, rest @ x0, args.qsteps, args.noise, args.warmup, f0=f0)
        if ok:
            stable.append(lr)
        if steps is not None and (best[0] is None or steps < best[0]):
            best = (steps, lr)
    edge = "*" if best[1] in (rates[0], rates[-1]) else ""
    print(f"| {name} | bound: sharp eigenspace removed exactly, SGD-Nesterov on the rest | "
          f"{best[0] if best[0] else '—'} | {best[1] if best[1] else '—'}{edge} | {max(stable) if stable else '—'} | |",
          flush=True)


def quadratic_trace(args) -> None:
    """Where the steps go on the D = 500 instance, first rule at one rate: f split into its
    part in the true top-k eigenspace and the rest, V's largest angle to that eigenspace, the
    largest fitted eigenvalues against the true ones."""
    dim, k, seed = 500, 4, 1
    hess, top, x0 = stiff_quadratic(dim, k, seed)
    true = torch.linalg.eigvalsh(hess).flip(0)[:k]
    lr = args.trace_lr
    theta = torch.nn.Parameter(x0.clone().float())
    opt = OSFN([theta], lr=lr, complement="nesterov", **FIRST_RULE, **{**QUADRATIC_NEWTON, **args.trace_set})
    gen = torch.Generator().manual_seed(1)
    f0 = 0.5 * float(x0 @ hess @ x0)
    print(f"\nD=500, 4 sharp, first rule, lr {lr:g} {args.trace_set or ''} (true top |λ| "
          f"{', '.join(f'{float(e):.1f}' for e in true)})\n")
    print("| step | f in the top-4 eigenspace / f₀ | f elsewhere / f₀ | max angle V vs top-4 | largest fitted |λ| |")
    print("|---|---|---|---|---|")
    for t in range(args.qsteps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (t + 1) / args.warmup) if args.warmup else lr
        theta.grad = hess.float() @ theta.detach() + args.noise * torch.randn(dim, generator=gen)
        opt.step()
        th = theta.detach().double()
        sharp = top @ (top.T @ th)
        rest = th - sharp
        f_sharp, f_rest = (0.5 * float(v @ hess @ v) / f0 for v in (sharp, rest))
        done = f_sharp + f_rest <= 1e-4 or not math.isfinite(f_sharp + f_rest) or f_sharp + f_rest > 1e6
        if t % 3 == 0 or done:
            basis = opt.basis.detach().double()
            live = basis[:, torch.linalg.vector_norm(basis, dim=0) > 0.5]
            angle = f"{float(principal_angles_deg(live, top).max()):.1f}°" if live.shape[1] >= k else "(filling)"
            fitted = sorted((abs(e) for e in opt.diagnostics["eigenvalues"]), reverse=True)[:k]
            print(f"| {t + 1} | {f_sharp:.2e} | {f_rest:.2e} | {angle} | {', '.join(f'{e:.3g}' for e in fitted)} |")
        if done:
            break


def network_trace(args):
    from osfn_dist.workloads import get_workload

    work = get_workload(args.workload)
    traces = {}
    for label, rule in {"first rule": FIRST_RULE, "curvature rule": CURVATURE_RULE}.items():
        model = work.build_model()
        opt = OSFN(model.parameters(), lr=args.lr, weight_decay=0.01, **{**rule,
                                                      "complement_in_subspace": args.pi,
                                                      **({"newton_lr": 0.0} if args.observe else {})})
        hvp, dim = model_hvp(model, work.loss_fn, *work.train)
        rows = []
        t0 = time.time()
        for step, x, y in work.batches(args.steps, seed=0):
            before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
            opt.zero_grad()
            work.loss_fn(model(x), y).backward()
            opt.step()
            if step % args.every == 0:
                after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                row = subspace_truth(opt, hvp, dim, opt.subspace_dim, step=after - before)
                with torch.no_grad():
                    row["loss"] = float(work.loss_fn(model(work.train[0]), work.train[1]))
                row["step"] = step
                rows.append(row)
                print(f"{label:15s} step {step:4d}  loss {row['loss']:.4f}  angles max/median "
                      f"{row['max_angle']:.0f}/{row['median_angle']:.0f}°  leak {row['leak']:.3f}  "
                      f"top |λ| {abs(row['true_top'][0]):.3g}  largest fitted |λ| "
                      f"{max((abs(v) for v in row['fitted']), default=float('nan')):.3g}  model error {row['model_error']:.2f}  "
                      f"fitted {_fmt(row['fitted'][:3])}  "
                      f"vᵀHv {_fmt(row['rayleigh'][:3])}  ({time.time() - t0:.0f} s)", flush=True)
        traces[label] = rows
    return traces


def _fmt(xs):
    return "[" + ", ".join(f"{x:.3g}" for x in xs) + "]"


def plot(traces, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(21, 3.8))
    for (label, rows), color in zip(traces.items(), ("tab:gray", "tab:blue")):
        s = [r["step"] for r in rows]
        axes[0].plot(s, [r["loss"] for r in rows], color=color, label=label)
        axes[1].plot(s, [r["max_angle"] for r in rows], color=color, label=f"{label}: max")
        axes[1].plot(s, [r["median_angle"] for r in rows], color=color, ls="--", label=f"{label}: median")
        axes[2].plot(s, [r["leak"] for r in rows], color=color, label=label)
        axes[3].plot(s, [abs(r["fitted"][0]) if r["fitted"] else float("nan") for r in rows], color=color,
                     ls="--", label=f"{label}: fitted |λ| (top)")
        axes[3].plot(s, [abs(r["rayleigh"][0]) if r["rayleigh"] else float("nan") for r in rows], color=color,
                     label=f"{label}: true vᵀHv (same direction)")
        axes[4].plot(s, [r["model_error"] for r in rows], color=color, label=label)
    axes[3].plot(s, [abs(r["true_top"][0]) for r in rows], color="k", lw=0.8, label="true top |λ|")
    axes[0].set_yscale("log")
    axes[3].set_yscale("log")
    for ax, t in zip(axes, ("train loss", "principal angles V vs top-d |λ| eigenspace (°)",
                            "leak: complement step share in top-d eigenspace", "curvature",
                            "model error ‖fit − VᵀHV‖/‖VᵀHV‖")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-quadratic", action="store_true")
    ap.add_argument("--skip-network", action="store_true")
    ap.add_argument("--qsteps", type=int, default=300)
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--trace-lr", type=float, help="also trace one quadratic run at this rate (D = 500 instance)")
    ap.add_argument("--trace-set", type=__import__("json").loads, default={},
                    help='OSFN settings for --trace-lr as JSON, e.g. \'{"subspace_rate": 0.02}\'')
    ap.add_argument("--workload", default="deep_linear")
    ap.add_argument("--lr", type=float, default=0.0316, help="the peer's tuned rate (bench/contribution.py)")
    ap.add_argument("--pi", type=float, default=1.0, help="complement_in_subspace")
    ap.add_argument("--observe", action="store_true",
                    help="newton_lr = 0: the curvature model is fitted and exported, parameters move as the base's")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--png", default="bench-results/ground_truth.png")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if not args.skip_quadratic:
        quadratic_table(args)
    if args.trace_lr is not None:
        quadratic_trace(args)
    if not args.skip_network:
        traces = network_trace(args)
        plot(traces, args.png, f"{args.workload}, AdamW complement (peer settings), lr {args.lr:g}, "
                               f"π = {args.pi:g}{', observe-only' if args.observe else ''}: ground truth by Lanczos every {args.every} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
