"""The benchmark protocol: equal learning-rate grids, the best rate re-run on more seeds,
then one table per workload and loss curves.

For every workload and optimizer: train with each of ``grid`` learning rates on seed 0,
keep the rate with the lowest final full-train loss, re-run it on seeds 1..n−1. Reported:
final train/test loss (mean ± std over seeds), steps and seconds to reach AdamW's best
train loss (on the seed-mean curve), median step time relative to AdamW (measured in the
same process, interleaved), and optimizer state memory.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..workloads import get_workload
from .peers import DEFAULT_PEERS, PEERS, lr_grid
from .runner import run_one

FULL_WORKLOADS = ("mnist1d_mlp", "mnist1d_cnn", "digits_autoencoder", "deep_linear", "char_lm")
QUICK_WORKLOADS = ("mnist1d_mlp", "deep_linear")


@dataclass
class SuiteConfig:
    workloads: tuple[str, ...] = FULL_WORKLOADS
    optimizers: tuple[str, ...] = DEFAULT_PEERS
    steps: int | None = None  # None: each workload's default
    grid: int = 4
    seeds: int = 3
    eval_points: int = 20
    out_dir: str = "runs/bench/full"
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **kw) -> "SuiteConfig":
        base = dict(workloads=QUICK_WORKLOADS, steps=150, grid=3, seeds=3, eval_points=10, out_dir="runs/bench/quick")
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)


def plan(cfg: SuiteConfig) -> list[tuple[str, str, float | None, int]]:
    """(workload, optimizer, lr or None = best from tuning, seed), in execution order."""
    jobs = []
    for w in cfg.workloads:
        for o in cfg.optimizers:
            jobs += [(w, o, lr, 0) for lr in lr_grid(PEERS[o].lr_center, cfg.grid)]
            jobs += [(w, o, None, s) for s in range(1, cfg.seeds)]
    return jobs


def run_suite(cfg: SuiteConfig, progress=None) -> list[dict]:
    for name in cfg.optimizers:
        if name not in PEERS:
            raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(PEERS)}")
    runs: list[dict] = []
    best_lr: dict[tuple[str, str], float] = {}
    workloads = {w: get_workload(w) for w in cfg.workloads}
    for w, o, lr, seed in plan(cfg):
        workload = workloads[w]
        steps = cfg.steps or workload.default_steps
        if lr is None:
            tuned = [r for r in runs if r["workload"] == w and r["optimizer"] == o and r["seed"] == 0]
            best = min(tuned, key=lambda r: (r["final_train_loss"], r["lr"]))
            best_lr[(w, o)] = best["lr"]
            lr = best["lr"]
        result = run_one(workload, PEERS[o], lr, seed, steps, cfg.eval_points)
        result["tuning"] = seed == 0
        runs.append(result)
        if progress is not None:
            progress(result)
    return runs


def _mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    steps = [s for s, _ in runs[0]["curve"]]
    out = []
    for i, s in enumerate(steps):
        vals = [r["curve"][i][1] for r in runs if i < len(r["curve"])]
        if len(vals) == len(runs):
            out.append((s, statistics.fmean(vals)))
    return out


def _std(values: list[float]) -> float:
    """Population std; nan when a run diverged (its loss is inf)."""
    if not all(math.isfinite(v) for v in values):
        return float("nan")
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> dict:
    """Per workload and optimizer: the best-lr runs over seeds, aggregated."""
    table: dict[str, dict[str, dict]] = {}
    for w in dict.fromkeys(r["workload"] for r in runs):
        rows = {}
        for o in dict.fromkeys(r["optimizer"] for r in runs if r["workload"] == w):
            mine = [r for r in runs if r["workload"] == w and r["optimizer"] == o]
            tuned = [r for r in mine if r["seed"] == 0]
            best = min(tuned, key=lambda r: (r["final_train_loss"], r["lr"]))
            chosen = [r for r in mine if r["lr"] == best["lr"]]
            finals = [r["final_train_loss"] for r in chosen]
            tests = [r["test_loss"] for r in chosen]
            rows[o] = {
                "lr": best["lr"],
                "seeds": len(chosen),
                "final_train_mean": statistics.fmean(finals),
                "final_train_std": _std(finals),
                "test_mean": statistics.fmean(tests),
                "test_std": _std(tests),
                "step_seconds": statistics.median(r["step_seconds"] for r in mine),
                "state_bytes": max(r["state_bytes"] for r in chosen),
                "peak_rss_bytes": max(
                    (r["peak_rss_bytes"] for r in chosen if r.get("peak_rss_bytes") is not None), default=None
                ),
                "params": chosen[0]["params"],
                "curve": _mean_curve(chosen) if all(math.isfinite(f) for f in finals) else [],
                "diverged_runs": sum(r["diverged"] for r in mine),
            }
        if "adamw" in rows and rows["adamw"]["curve"]:
            target = min(v for _, v in rows["adamw"]["curve"])
            for row in rows.values():
                hit = next((s for s, v in row["curve"] if v <= target), None)
                row["target_loss"] = target
                row["steps_to_adamw_best"] = hit
                row["seconds_to_adamw_best"] = None if hit is None else hit * row["step_seconds"]
            for row in rows.values():
                row["step_time_vs_adamw"] = row["step_seconds"] / rows["adamw"]["step_seconds"]
        table[w] = rows
    return table


def markdown(table: dict, labels: dict[str, str] | None = None) -> str:
    labels = labels or {k: v.label or k for k, v in PEERS.items()}
    lines = []
    for w, rows in table.items():
        params = next(iter(rows.values()))["params"]
        target = next(iter(rows.values())).get("target_loss")
        lines.append(f"#### {w} ({params:,} parameters; AdamW's best train loss {target:.4g})" if target else f"#### {w}")
        lines.append("")
        lines.append(
            "| optimizer | lr | final train loss | test loss | steps to AdamW's best | s to AdamW's best "
            "| step time vs AdamW | state MB | peak MB |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        order = sorted(rows, key=lambda o: rows[o]["final_train_mean"])
        for o in order:
            r = rows[o]
            steps = r.get("steps_to_adamw_best")
            secs = r.get("seconds_to_adamw_best")
            diverged = f" ({r['diverged_runs']} runs diverged)" if r["diverged_runs"] else ""
            peak = r.get("peak_rss_bytes")
            peak_cell = "—" if peak is None else f"{peak / 2**20:.1f}"
            lines.append(
                f"| {labels.get(o, o)}{diverged} | {r['lr']:.3g} | {r['final_train_mean']:.4g} ± {r['final_train_std']:.2g} "
                f"| {r['test_mean']:.4g} ± {r['test_std']:.2g} | {steps if steps is not None else '—'} "
                f"| {f'{secs:.2f}' if secs is not None else '—'} | {r.get('step_time_vs_adamw', float('nan')):.2f}× "
                f"| {r['state_bytes'] / 2**20:.2f} | {peak_cell} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(table)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(PEERS)}  # same colour in every panel
    for ax, (w, rows) in zip(axes[0], table.items()):
        for o, r in sorted(rows.items()):
            if r["curve"]:
                style = "-" if o.startswith("osfn") else "--"
                width = 2.2 if o.startswith("osfn") else 1.2
                ax.plot(*zip(*r["curve"]), style, lw=width, color=colors.get(o),
                        label=f"{PEERS[o].label or o} (lr {r['lr']:.2g})")
        target = next(iter(rows.values())).get("target_loss")
        if target:
            ax.axhline(target, color="gray", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(w)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (full set, mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(cfg: SuiteConfig, runs: list[dict], save_runs: bool = True) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if save_runs:  # first, so a report can always be regenerated (osfn-dist bench --report-only)
        (out / "runs.json").write_text(json.dumps(runs, default=float) + "\n")
    table = summarize(runs)
    (out / "summary.json").write_text(json.dumps(table, indent=1, default=float) + "\n")
    md = markdown(table)
    (out / "table.md").write_text(md + "\n")
    plot(table, out / "curves.png")
    return table
