"""``osfn-dist bench``: OSFN against peer optimizers; a markdown table and PNG curves."""
from __future__ import annotations

import argparse
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark OSFN against AdamW, Muon, SOAP, PSGD, Sophia ... (--quick: a few minutes)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="2 workloads, 150 steps, 3-point grid, 3 seeds")
    p.add_argument("--workloads", nargs="+", help="workloads to run (default: all five, or two with --quick)")
    p.add_argument("--optimizers", nargs="+", help="optimizers to compare (see osfn_dist/bench/peers.py)")
    p.add_argument("--steps", type=int, help="steps per run (default: each workload's)")
    p.add_argument("--grid", type=int, help="learning rates per optimizer (same for all)")
    p.add_argument("--seeds", type=int, help="seeds for the tuned learning rate")
    p.add_argument("--out", help="output directory")
    p.add_argument("--report-only", action="store_true", help="rebuild table.md/curves.png from <out>/runs.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from .suite import SuiteConfig, plan, run_suite, write_outputs

    overrides = {
        "workloads": tuple(args.workloads) if args.workloads else None,
        "optimizers": tuple(args.optimizers) if args.optimizers else None,
        "steps": args.steps,
        "grid": args.grid,
        "seeds": args.seeds,
        "out_dir": args.out,
    }
    if args.quick:
        cfg = SuiteConfig.quick(**overrides)
    else:
        cfg = SuiteConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.report_only:
        import json
        from pathlib import Path

        from .suite import markdown

        runs = json.loads((Path(cfg.out_dir) / "runs.json").read_text())
        print(markdown(write_outputs(cfg, runs, save_runs=False)))
        return 0
    jobs = plan(cfg)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="bench", unit="run", dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None

    def progress(result):
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{result['workload']}/{result['optimizer']} lr={result['lr']:.2g} loss={result['final_train_loss']:.4g}")

    t0 = time.perf_counter()
    runs = run_suite(cfg, progress)
    if bar is not None:
        bar.close()
    table = write_outputs(cfg, runs)
    from .suite import markdown

    print(markdown(table))
    print(f"{len(runs)} runs in {time.perf_counter() - t0:.0f} s; results in {cfg.out_dir}/ (table.md, curves.png, runs.json)")
    return 0
