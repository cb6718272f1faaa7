"""Per-step cost of OSFN vs AdamW, measured side by side in one process.

    python bench/step_time.py                       # ~1M-parameter MLP, d = 8, CPU
    python bench/step_time.py --width 2048 --d 16   # bigger model / subspace
    python bench/step_time.py --device cuda         # on a GPU (name the card with the numbers;
                                                    # adds the Triton rows, float32 and bfloat16 V)
    python bench/step_time.py --workload char_lm --batch 32   # the built-in transformer LM

Rounds interleave the optimizers (AdamW, OSFN, AdamW, OSFN, ...) so background load hits
both alike; the table reports means and the OSFN/AdamW ratios of the whole training step
(forward + backward + optimizer) and of the optimizer step alone, and OSFN's optimizer-step
overhead over the fastest AdamW (fused) in the unit that bounds it: reads of the basis V.
``--profile`` adds where an OSFN step's time goes, phase by phase.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from osfn_dist import OSFN


def build(width: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(512, width), torch.nn.ReLU(), torch.nn.Linear(width, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    ).to(device)


class OneReadOfV:
    """Times one pass over a direction-major basis V (d·D floats), the unit of the overhead
    column: every OSFN step must read V at least once (to project the gradient). Called
    between the optimizers in every round, so the unit sees the same background load."""

    def __init__(self, n_params: int, d: int, dev: str):
        from osfn_dist.core.subspace import new_basis

        self.basis = new_basis(n_params, d, device=dev)
        self.basis.normal_()
        self.vec = torch.randn(n_params, device=dev)
        self.dev = dev
        self.times: list[float] = []

    def measure(self, reps: int = 8, keep: bool = True) -> None:
        from osfn_dist.core.subspace import project

        for _ in range(reps):
            sync(self.dev)
            t0 = time.perf_counter()
            project(self.basis, self.vec)
            sync(self.dev)
            if keep:
                self.times.append(time.perf_counter() - t0)

    def median(self) -> float:
        return statistics.median(self.times)


def _profile(opt, model, x, y, loss_fn, steps: int, v_read: float, dev: str) -> None:
    """Where an OSFN step's time goes: the optimizer's own phases (torch.profiler labels
    ``osfn.*``), per step, also in reads of V."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(dev)
    rows = [(e.key, e.cpu_time_total / steps / 1e3) for e in prof.key_averages() if e.key.startswith("osfn.")]
    print(f"\n{type(opt).__name__} d={opt.subspace_dim}: time per step by phase ({steps} steps, torch.profiler, CPU wall per label)\n")
    print("| phase | ms per step | reads of V |")
    print("|---|---|---|")
    for key, ms in sorted(rows, key=lambda r: -r[1]):
        print(f"| {key} | {ms:.2f} | {ms / (v_read * 1e3):.1f} |")


def host_syncs(opt, model, x, y, loss_fn, steps: int = 5) -> float:
    """Synchronising CUDA calls per optimizer step over ``steps`` steady-state steps (forward
    and backward outside the count)."""
    from osfn_dist.bench.syncs import host_syncs as count

    total = 0
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        total += count(opt.step)
    return total / steps


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024, help="hidden width (1024: 1.05M parameters)")
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workload", help="time a built-in workload's model and loss instead of the MLP "
                                       "(e.g. char_lm, the small causal transformer LM; --width is then ignored)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--every", type=int, nargs="*", default=[4, 16], help="also time these curvature_every values")
    ap.add_argument("--profile", action="store_true", help="also print OSFN's per-phase profile")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="time only these optimizers (the two AdamW references always run); e.g. at 1B "
                         "parameters, where every OSFN holds its own 32 GB basis")
    args = ap.parse_args(argv)
    dev = args.device
    if args.workload:  # a built-in workload's model, loss and first minibatch
        from osfn_dist.workloads import get_workload

        workload = get_workload(args.workload, 0)
        _, x, y = next(iter(workload.batches(1, 0, batch_size=args.batch)))
        x, y, loss_fn = x.to(dev), y.to(dev), workload.loss_fn

        def make_model():
            torch.manual_seed(0)
            return workload.build_model().to(dev)
    else:
        x = torch.randn(args.batch, 512, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)
        loss_fn = torch.nn.functional.cross_entropy

        def make_model():
            return build(args.width, dev)
    makers = {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        # defaults: torch's fused AdamW as the base, the native C passes over V on CPU
        f"OSFN d={args.d}": lambda ps: OSFN(ps, lr=1e-3, subspace_dim=args.d),
        f"OSFN d={args.d}, eager torch passes": lambda ps: OSFN(ps, lr=1e-3, subspace_dim=args.d, kernels="eager"),
        f"OSFN d={args.d}, compiled kernels": lambda ps: OSFN(ps, lr=1e-3, subspace_dim=args.d, kernels="compiled"),
    }
    if dev == "cpu":  # V stored in bfloat16 for the native passes: half their traffic over V
        makers[f"OSFN d={args.d}, bfloat16 basis"] = lambda ps: OSFN(ps, lr=1e-3, subspace_dim=args.d,
                                                                    basis_dtype="bfloat16")
    else:  # the one-pass Triton kernels (core.triton_pass), V in float32 and in bfloat16
        makers[f"OSFN d={args.d}, Triton passes"] = lambda ps: OSFN(ps, lr=1e-3, subspace_dim=args.d,
                                                                   kernels="triton")
        makers[f"OSFN d={args.d}, Triton passes, bfloat16 basis"] = lambda ps: OSFN(
            ps, lr=1e-3, subspace_dim=args.d, kernels="triton", basis_dtype="bfloat16")
    # the in-process service one step behind, on a thread
    makers[f"OSFN d={args.d}, pipelined service"] = lambda ps: OSFN(ps, lr=1e-3, subspace_dim=args.d, pipelined=True)
    for k in args.every:
        makers[f"OSFN d={args.d} curvature_every={k}"] = lambda ps, k=k: OSFN(ps, lr=1e-3, subspace_dim=args.d, curvature_every=k)
    if args.only:
        unknown = set(args.only) - set(makers)
        if unknown:
            ap.error(f"unknown --only {sorted(unknown)}; choose from {list(makers)}")
        makers = {k: v for k, v in makers.items() if k in ("AdamW", "AdamW (fused)") or k in args.only}
    models = {k: make_model() for k in makers}
    opts = {k: makers[k](models[k].parameters()) for k in makers}
    n_params = sum(p.numel() for p in next(iter(models.values())).parameters())
    step_t: dict[str, list[float]] = {k: [] for k in makers}
    opt_t: dict[str, list[float]] = {k: [] for k in makers}
    unit = OneReadOfV(n_params, args.d, dev)
    for rnd in range(args.rounds + 1):
        for k in makers:
            unit.measure(keep=rnd > 0)
            m, o = models[k], opts[k]
            for i in range(args.steps):
                sync(dev)
                t0 = time.perf_counter()
                loss = loss_fn(m(x), y)
                o.zero_grad(set_to_none=True)
                loss.backward()
                sync(dev)
                t1 = time.perf_counter()
                o.step()
                sync(dev)
                t2 = time.perf_counter()
                if rnd > 0:  # round 0 warms up (allocations, basis fill)
                    step_t[k].append(t2 - t0)
                    opt_t[k].append(t2 - t1)
    base = "AdamW"
    fastest = "AdamW (fused)"
    v_read = unit.median()
    what = f"workload {args.workload}" if args.workload else "MLP"
    print(f"{what}, {n_params:,} parameters, batch {args.batch}, device {dev}, {args.rounds}×{args.steps} interleaved steps each")
    print(f"one read of V (d={args.d}: a (d, D) × (D,) product) = {v_read * 1e3:.3f} ms (median of "
          f"{len(unit.times)}, timed between the optimizers in every round)\n")
    # means, not medians: with curvature_every = k the median would hide the one step in k
    # that runs the subspace machinery
    print("| optimizer | training step ms (mean) | optimizer step ms (mean) | step ratio vs AdamW | "
          "step ratio vs fused AdamW | optimizer-step overhead over fused AdamW, in reads of V |")
    print("|---|---|---|---|---|---|")
    sb, ob = statistics.fmean(step_t[base]) * 1e3, statistics.fmean(opt_t[base]) * 1e3
    sf, of = statistics.fmean(step_t[fastest]) * 1e3, statistics.fmean(opt_t[fastest]) * 1e3
    for k in makers:
        st, ot = statistics.fmean(step_t[k]) * 1e3, statistics.fmean(opt_t[k]) * 1e3
        reads = (ot - of) / (v_read * 1e3)
        print(f"| {k} | {st:.2f} | {ot:.2f} | {st / sb:.2f}× | {st / sf:.2f}× | {reads:.1f} |")
    if dev.startswith("cuda"):  # the GPU path's target: <= 1 host synchronisation per step in steady state
        print("\n| optimizer | host synchronisations per optimizer step (torch sync debug mode, 5 steps) |")
        print("|---|---|")
        for k in makers:
            print(f"| {k} | {host_syncs(opts[k], models[k], x, y, loss_fn):.1f} |")
    osfn = next((k for k in makers if k.startswith("OSFN")), None)
    if args.profile and osfn is not None:
        _profile(opts[osfn], models[osfn], x, y, loss_fn, args.steps, v_read, dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
