"""Which piece limits OSFN on networks? Two ground-truth experiments (HVPs: bench only).

1. ``findable``: is the sharp subspace findable from gradients at all? At step ``--at`` of an
   AdamW run (the peer's tuned rate), the top-k |λ| eigenspace of the full-batch Hessian
   (Lanczos) against candidate k-dimensional subspaces: PCA of 128 minibatch gradients at the
   same θ (the gradient noise), PCA of the last 64 training gradients, of their differences,
   of AdamW's last 64 steps, a random subspace — and OSFN's own online V after the same
   number of steps (default rule, and Oja on the raw gradient at rate 0.3). Score: captured
   curvature = mean vᵀHv over an orthonormal basis of the candidate ÷ mean |λ| of the true
   top k (1 = the sharp subspace itself, ≈ 0 for a random one), and the median / max
   principal angle.
2. ``regression``: the regression alone (core math, no optimizer), on a 12-D quadratic with
   eigenvalues −3 … 8 whose position follows plain gradient descent (lr 0.02), the gradient
   in V regressed on the position in V at OSFN's default forgetting: model error against
   VᵀHV for V = the true top-4 eigenvectors (an invariant subspace), a perturbed one, and a
   random one, without and with gradient noise.
3. ``preconditioned``: what caps AdamW's rate? At step ``--at`` of the same AdamW run, the
   sharpness lr·λmax of H and of the preconditioned Hessian P^(-1/2) H P^(-1/2) (P = Adam's
   √v̂ + ε), Adam's stability edge 2(1 + β₁)/(1 − β₁) = 38, the principal angles between
   the two top-k eigenspaces (the preconditioned one mapped back by P^(-1/2)), and the
   preconditioned sharpness left once H's top-k eigenspace is projected out.
5. ``true subspace`` (with the oracle): AdamW plus an exact saddle-free Newton step on the true
   top-k eigenspace — of H, or of P^(-½) H P^(-½) in z = P^½ θ coordinates — recomputed by
   Lanczos every 25 steps, Adam's own step removed there (π = 0), the Newton move capped at
   a trust radius of 0.1 (without one the preconditioned variant diverges on its first
   steps: its raw step was 40× Adam's). Does even the ideal subspace give AdamW headroom?
4. ``oracle``: does a better curvature model inside OSFN's V help? OSFN as it runs, against
   the same OSFN whose fitted Hessian is replaced at every step by the exact one inside its
   own V (VᵀHV by d Hessian-vector products of the full-batch loss), for both subspace rules,
   π = 1 and 0, over a learning-rate grid; AdamW on the same grid.

    python bench/subspace_oracle.py                        # both, ~4 min on 2 cores
    python bench/subspace_oracle.py --skip-oracle --findable-workloads char_lm   # ~6 min
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import osfn_dist.dataflow.curvature as curvature  # noqa: E402
from osfn_dist import OSFN  # noqa: E402
from osfn_dist.bench.ground_truth import lanczos_top, model_hvp, principal_angles_deg  # noqa: E402
from osfn_dist.dataflow.shard import param_slices  # noqa: E402
from osfn_dist.workloads import get_workload  # noqa: E402

K = 8
TUNED_ADAMW_LR = {"deep_linear": 3.16e-2, "mnist1d_mlp": 1e-2, "mnist1d_cnn": 1e-2,
                  "digits_autoencoder": 3.16e-3, "char_lm": 1e-2}
RULES = {"default (Oja on the momentum, rate 0.1)": {},
         "Oja on the gradient, rate 0.3": {"subspace_source": "gradient", "subspace_rate": 0.3}}


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().clone()


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().clone()


def _top_pca(rows: list[torch.Tensor], k: int) -> torch.Tensor:
    _, _, vh = torch.linalg.svd(torch.stack(rows), full_matrices=False)
    return vh[:k].T


def _exact_hvp(model, work, batch=None):
    """HVPs of the full-batch training loss (or of ``batch`` = (inputs, targets))."""
    hvp, dim = model_hvp(model, work.loss_fn, *(work.train if batch is None else batch))

    def math_attention_hvp(vec):  # CPU flash attention has no double backward
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return hvp(vec)

    return math_attention_hvp, dim


def captured(hvp, candidate: torch.Tensor, top_abs_mean: float) -> float:
    q, _ = torch.linalg.qr(candidate.to(torch.float64))
    return sum(float(q[:, i] @ hvp(q[:, i])) for i in range(q.shape[1])) / q.shape[1] / top_abs_mean


def _train(work, make_opt, steps: int, seed: int = 0, keep: int = 0):
    torch.manual_seed(seed)
    model = work.build_model()
    opt = make_opt(model.parameters())
    grads, moves = [], []
    for step, x, y in work.batches(steps, seed=seed):
        opt.zero_grad()
        work.loss_fn(model(x), y).backward()
        before = _flat_params(model) if step > steps - keep else None
        if before is not None:
            grads.append(_flat_grad(model))
        opt.step()
        if before is not None:
            moves.append(_flat_params(model) - before)
    return model, opt, grads, moves


def findable(name: str, at: int) -> list[tuple[str, float, float, float]]:
    work = get_workload(name)
    lr = TUNED_ADAMW_LR[name]
    model, _, grads, moves = _train(work, lambda ps: torch.optim.AdamW(ps, lr=lr), at, keep=64)
    hvp, dim = _exact_hvp(model, work)
    lam, top = lanczos_top(hvp, dim, K)
    scale = float(lam.abs().mean())
    noise = []
    for _, x, y in work.batches(128, seed=1):
        model.zero_grad()
        work.loss_fn(model(x), y).backward()
        noise.append(_flat_grad(model))
    mean = torch.stack(noise).mean(0)
    candidates = {
        "PCA of 128 minibatch gradients at θ (noise)": _top_pca([g - mean for g in noise], K),
        "PCA of the last 64 training gradients": _top_pca(grads, K),
        "PCA of their differences": _top_pca([b - a for a, b in zip(grads, grads[1:])], K),
        "PCA of AdamW's last 64 steps": _top_pca(moves, K),
        "random": torch.randn(dim, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
    }
    rows = []
    for label, v in candidates.items():
        ang = principal_angles_deg(v, top)
        rows.append((label, captured(hvp, v, scale), float(ang.median()), float(ang.max())))
    for label, rule in RULES.items():  # OSFN's own V after as many steps, at the same rate
        osfn_model, opt, _, _ = _train(work, lambda ps: OSFN(ps, lr=lr, **rule), at)
        o_hvp, _ = _exact_hvp(osfn_model, work)
        o_lam, o_top = lanczos_top(o_hvp, dim, K)
        v = opt.basis.detach().double()
        v = v[:, torch.linalg.vector_norm(v, dim=0) > 0.5]
        ang = principal_angles_deg(v, o_top)
        rows.append((f"OSFN's online V, {label}", captured(o_hvp, v, float(o_lam.abs().mean())),
                     float(ang.median()), float(ang.max())))
    return rows, [float(x) for x in lam[:4]]


class ExactHessianInV:
    """Replaces the curvature service's regression by the exact Hessian inside the current V
    (on the directions the service treats as mature), while installed."""

    def __init__(self, opt: OSFN, hvp):
        self.opt, self.hvp, self.saved = opt, hvp, None

    def __call__(self, cov_xx, cov_yx, ridge):
        service = self.opt.exchange.service
        mature = service.alive & (service.stats.count >= curvature.MIN_SAMPLES)
        v = self.opt.basis.detach().double()[:, torch.nonzero(mature).flatten()]
        hv = torch.stack([self.hvp(v[:, i]) for i in range(v.shape[1])], dim=1)
        inside = v.T @ hv
        return 0.5 * (inside + inside.T)

    def __enter__(self):
        self.saved = curvature.solve_symmetric_hessian
        curvature.solve_symmetric_hessian = self
        return self

    def __exit__(self, *exc):
        curvature.solve_symmetric_hessian = self.saved


def final_loss(work, make_opt, steps: int, seed: int, exact_h: bool) -> float:
    torch.manual_seed(seed)
    model = work.build_model()
    opt = make_opt(model.parameters())
    oracle = ExactHessianInV(opt, _exact_hvp(model, work)[0]) if exact_h else None
    with oracle if oracle is not None else contextlib.nullcontext():
        for _, x, y in work.batches(steps, seed=seed):
            opt.zero_grad()
            loss = work.loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if not torch.isfinite(loss):
                return float("inf")
    return work.evaluate(model, "train")


def _pca_eigenpairs(window: list[torch.Tensor], op, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k PCA of the window's vectors, then the exact operator inside it (k products),
    rotated to its eigenbasis: a gradient-derived subspace with ground-truth curvature."""
    q = _top_pca(window, k)
    inside = q.T @ torch.stack([op(q[:, i]) for i in range(q.shape[1])], dim=1)
    lam, u = torch.linalg.eigh(0.5 * (inside + inside.T))
    return lam, q @ u


def true_subspace_loss(work, lr: float, preconditioned: bool, seed: int, steps: int,
                       every: int = 25, radius: float = 0.1, k: int = K, subspace: str = "top",
                       window: int = 64, iters: int | None = None, hvp_batch: int = 1024) -> float:
    """``subspace``: "top" = the true top-k |λ| eigenspace (Lanczos on the full-batch loss);
    "minibatch" = Lanczos (``iters`` steps, default 3k + 20) on the current minibatch's loss
    only, its eigenvalues used as they are (a practical, HVP-based version); "subset" = the
    same on a random ``hvp_batch`` examples of the training set; "gradients" /
    "momentum" = PCA of the last ``window`` gradients / Adam first moments in the same
    coordinates (z = P^½ θ when preconditioned), with the exact curvature inside it."""
    torch.manual_seed(seed)
    model = work.build_model()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    hvp, dim = _exact_hvp(model, work)
    q = lam = scale = None
    recent: list[torch.Tensor] = []
    for step, x, y in work.batches(steps, seed=seed):
        opt.zero_grad()
        loss = work.loss_fn(model(x), y)
        loss.backward()
        if not torch.isfinite(loss):
            return float("inf")
        grad = _flat_grad(model)
        if step > 10 and (step - 11) % every == 0:  # after Adam's second moments have settled a little
            if preconditioned:
                beta2 = opt.param_groups[0]["betas"][1]
                t = float(opt.state[params[0]]["step"])
                scale = torch.cat([(opt.state[p]["exp_avg_sq"] / (1 - beta2**t)).sqrt().reshape(-1)
                                   + opt.param_groups[0]["eps"] for p in params]).double().rsqrt()
            else:
                scale = torch.ones(dim, dtype=torch.float64)
            op = lambda v: scale * hvp(scale * v)  # noqa: E731
            if subspace in ("minibatch", "subset"):
                if subspace == "subset":  # a fresh random subset of the training set per refresh
                    pick = torch.randperm(work.train[0].shape[0], generator=torch.Generator().manual_seed(step))[:hvp_batch]
                    batch = (work.train[0][pick], work.train[1][pick])
                else:
                    batch = (x, y)
                mb_hvp = _exact_hvp(model, work, batch)[0]
                lam, q = lanczos_top(lambda v: scale * mb_hvp(scale * v), dim, k, iters=iters)
            elif subspace == "top":
                lam, q = lanczos_top(op, dim, k)
            else:
                lam, q = _pca_eigenpairs([scale * v for v in recent], op, k)
        before = _flat_params(model)
        opt.step()
        if subspace in ("gradients", "momentum"):  # the window (raw; mapped to z by the scale of each refresh)
            vec = grad if subspace == "gradients" else torch.cat(
                [opt.state[p]["exp_avg"].reshape(-1) for p in params]).double()
            recent = (recent + [vec])[-window:]
        if q is not None:
            dz = (_flat_params(model) - before) / scale  # Adam's step in z coordinates
            dz = dz - q @ (q.T @ dz)  # removed inside the subspace
            newton = scale * (q @ (-(q.T @ (scale * grad)) / lam.abs().clamp_min(1e-3)))
            norm = float(torch.linalg.vector_norm(newton))
            if norm > radius:
                newton = newton * (radius / norm)
            flat = before + scale * dz + newton
            with torch.no_grad():
                for p, rows in param_slices(params):
                    p.copy_(flat[rows].view_as(p))
    return work.evaluate(model, "train")


TRUE_ROWS = {  # --true-rows: (preconditioned, subspace) per row of part 5
    "H": (False, "top"), "P": (True, "top"), "P-gradients": (True, "gradients"), "P-momentum": (True, "momentum"),
    "P-minibatch": (True, "minibatch"), "P-minibatch-short": (True, "minibatch"), "P-subset": (True, "subset")}


def true_subspace_table(name: str, lrs: list[float], seeds: int, steps: int, k: int = K,
                        rows: tuple[str, ...] = ("H", "P"), every: int = 25, hvp_batch: int = 1024) -> None:
    work = get_workload(name)
    print(f"\n{name}: AdamW + exact Newton on a {k}-dimensional subspace (π = 0), final train loss after "
          f"{steps} steps, mean of {seeds} seeds (per-seed values in brackets)\n")
    print("| optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
    print("|---|" + "---|" * len(lrs))
    labels = {"H": f"+ top-{k} of H", "P": f"+ top-{k} of P^(-½) H P^(-½)",
              "P-gradients": f"+ PCA of the last 64 P^(-½) g, exact P^(-½) H P^(-½) in it",
              "P-momentum": f"+ PCA of the last 64 P^(-½) m, exact P^(-½) H P^(-½) in it",
              "P-minibatch": f"+ top-{k} of the minibatch's P^(-½) H P^(-½) ({3 * k + 20} HVPs / {every} steps)",
              "P-minibatch-short": f"+ the same by {k + 8} Lanczos steps ({k + 8} HVPs / {every} steps)",
              "P-subset": f"+ top-{k} of P^(-½) H P^(-½) on {hvp_batch} random training examples ({3 * k + 20} HVPs / {every} steps)"}
    for row in ("AdamW", *rows):
        cells = []
        for lr in lrs:
            if row == "AdamW":
                make = lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr)  # noqa: E731
                vals = [final_loss(work, make, steps, s, False) for s in range(seeds)]
            else:
                pre, subspace = TRUE_ROWS[row]
                vals = []
                for s in range(seeds):
                    t0 = time.perf_counter()
                    vals.append(true_subspace_loss(work, lr, pre, s, steps, k=k, subspace=subspace, every=every,
                                                   iters=k + 8 if row == "P-minibatch-short" else None,
                                                   hvp_batch=hvp_batch))
                    # progress on stderr (a run with Lanczos refreshes takes minutes); the table stays on stdout
                    print(f"  [{name}] {row} lr {lr:g} seed {s}: {vals[-1]:.4g} in {time.perf_counter() - t0:.0f} s",
                          file=sys.stderr, flush=True)
            cells.append(f"{statistics.mean(vals):.4g}" + (f" [{', '.join(f'{v:.3g}' for v in vals)}]" if seeds > 1 else ""))
        print(f"| {labels.get(row, row)} | " + " | ".join(cells) + " |", flush=True)


def oracle_table(name: str, lrs: list[float], seeds: int, steps: int) -> None:
    work = get_workload(name)
    print(f"\n{name}: final train loss after {steps} steps, mean of {seeds} seeds\n")
    print("| optimizer | π | Hessian in V | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
    print("|---|---|---|" + "---|" * len(lrs))

    def row(label, pi, h, make, exact):
        cells = [statistics.mean(final_loss(work, make(lr), steps, s, exact) for s in range(seeds)) for lr in lrs]
        best = min(cells)
        print(f"| {label} | {pi} | {h} | " + " | ".join(f"**{c:.4g}**" if c == best else f"{c:.4g}" for c in cells)
              + " |", flush=True)

    row("AdamW", "", "", lambda lr: lambda ps: torch.optim.AdamW(ps, lr=lr), False)
    for label, rule in RULES.items():
        for pi in (1.0, 0.0):
            for exact in (False, True):
                row(f"OSFN, {label}", f"{pi:g}", "exact VᵀHV" if exact else "fitted (OSFN)",
                    lambda lr, rule=rule, pi=pi: lambda ps: OSFN(ps, lr=lr, complement_in_subspace=pi, **rule), exact)


def preconditioned_row(name: str, at: int) -> str:
    work = get_workload(name)
    lr = TUNED_ADAMW_LR[name]
    model, opt, _, _ = _train(work, lambda ps: torch.optim.AdamW(ps, lr=lr), at)
    beta1, beta2 = opt.param_groups[0]["betas"]
    eps = opt.param_groups[0]["eps"]
    params = list(model.parameters())
    t = float(opt.state[params[0]]["step"])
    precond = torch.cat([(opt.state[p]["exp_avg_sq"] / (1 - beta2**t)).sqrt().reshape(-1) + eps for p in params]).double()
    scale = precond.rsqrt()
    hvp, dim = _exact_hvp(model, work)
    lam, top = lanczos_top(hvp, dim, K)
    plam, ptop = lanczos_top(lambda v: scale * hvp(scale * v), dim, K)
    ang = principal_angles_deg(scale[:, None] * ptop, top)
    q, _ = torch.linalg.qr(top)

    def without_top(v):
        return v - q @ (q.T @ v)

    rest, _ = lanczos_top(lambda v: scale * without_top(hvp(without_top(scale * v))), dim, 2)
    edge = 2 * (1 + beta1) / (1 - beta1)
    return (f"| {name} | {lr:g} | {lr * float(lam[0]):.3g} | {lr * float(plam[0]):.3g} (edge {edge:.0f}) | "
            f"{float(ang.median()):.0f}° / {float(ang.max()):.0f}° | {lr * float(rest[0]):.3g} |")


def regression_table(steps: int = 200, beta: float = 0.05, ridge: float = 1e-3) -> None:
    from osfn_dist.core.regression import RegressionStats, solve_symmetric_hessian

    gen = torch.Generator().manual_seed(0)
    dim, d = 12, 4
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))
    ev = torch.linspace(-3.0, 8.0, dim, dtype=torch.float64)
    hess = q @ torch.diag(ev) @ q.T
    top = q[:, torch.argsort(ev.abs(), descending=True)[:d]]
    bases = {"true top-4 eigenvectors": top,
             "top-4 + 0.3 × random, re-orthonormalised": torch.linalg.qr(top + 0.3 * torch.randn(dim, d, dtype=torch.float64, generator=gen))[0],
             "random": torch.linalg.qr(torch.randn(dim, d, dtype=torch.float64, generator=gen))[0]}
    print(f"\nThe regression alone: model error ‖fit − VᵀHV‖/‖VᵀHV‖ on a {dim}-D quadratic under gradient descent "
          f"(forgetting {beta}, ridge {ridge})\n")
    print("| V | gradient noise | step 50 | step 100 | step 200 |")
    print("|---|---|---|---|---|")
    for noise in (0.0, 0.1):
        for label, v in bases.items():
            theta = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            noise_gen = torch.Generator().manual_seed(2)
            stats, errors = RegressionStats.zeros(d), []
            truth = v.T @ hess @ v
            for _ in range(steps):
                g = hess @ theta + noise * torch.randn(dim, dtype=torch.float64, generator=noise_gen)
                stats.update(v.T @ theta, v.T @ g, beta)
                theta = theta - 0.02 * g
                fit = solve_symmetric_hessian(stats.cov_xx, stats.cov_yx, ridge)
                errors.append(float(torch.linalg.matrix_norm(fit - truth) / torch.linalg.matrix_norm(truth)))
            print(f"| {label} | {noise:g} | {errors[49]:.2f} | {errors[99]:.2f} | {errors[-1]:.2f} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--findable-workloads", nargs="+", default=["deep_linear", "mnist1d_mlp", "mnist1d_cnn",
                                                                "digits_autoencoder"])
    ap.add_argument("--at", type=int, default=200, help="step of the run at which the subspaces are compared")
    ap.add_argument("--oracle-workload", default="deep_linear")
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.0316, 0.1])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--true-subspace-workloads", nargs="*", default=[],
                    help="also run part 5 (one seed) on these, e.g. mnist1d_mlp (~4 min)")
    ap.add_argument("--true-k", type=int, default=K, help="subspace size for --true-subspace-workloads")
    ap.add_argument("--true-seeds", type=int, default=1, help="seeds for --true-subspace-workloads")
    ap.add_argument("--true-rows", nargs="+", choices=sorted(TRUE_ROWS), default=["H", "P"],
                    help="subspaces for --true-subspace-workloads (P-gradients / P-momentum: gradient-derived, "
                         "in preconditioned coordinates)")
    ap.add_argument("--true-every", type=int, default=25, help="steps between subspace refreshes in part 5")
    ap.add_argument("--hvp-batch", type=int, default=1024, help="examples per refresh for --true-rows P-subset")
    ap.add_argument("--skip-findable", action="store_true")
    ap.add_argument("--skip-oracle", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    t0 = time.time()
    if not args.skip_findable:
        print(f"Captured curvature of k = {K} dimensional subspaces at step {args.at} "
              f"(1 = the true top-{K} |λ| eigenspace, 0 = none of its curvature)\n")
        print("| workload (true top |λ|) | subspace | captured curvature | principal angles median / max |")
        print("|---|---|---|---|")
        for name in args.findable_workloads:
            rows, top = findable(name, args.at)
            for label, cap, med, mx in rows:
                print(f"| {name} ({', '.join(f'{x:.3g}' for x in top)}, …) | {label} | {cap:.2f} | "
                      f"{med:.0f}° / {mx:.0f}° |", flush=True)
    regression_table()
    if not args.skip_findable:
        print(f"\nWhat caps AdamW's rate: sharpness at step {args.at} of AdamW at its tuned rate\n")
        print(f"| workload | lr | lr·λmax(H) | lr·λmax(P⁻¹H) | angles top-{K} of H vs of P⁻¹H, median / max | "
              f"lr·λmax(P⁻¹H) with H's top-{K} projected out |")
        print("|---|---|---|---|---|---|")
        for name in args.findable_workloads:
            print(preconditioned_row(name, args.at), flush=True)
    if not args.skip_oracle:
        oracle_table(args.oracle_workload, args.lrs, args.seeds, args.steps)
        true_subspace_table(args.oracle_workload, args.lrs, args.seeds, args.steps)
    for name in args.true_subspace_workloads:
        true_subspace_table(name, args.lrs, args.true_seeds, args.steps, k=args.true_k, rows=tuple(args.true_rows),
                            every=args.true_every, hvp_batch=args.hvp_batch)
    print(f"\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
