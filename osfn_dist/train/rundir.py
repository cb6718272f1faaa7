"""The run directory: config.yaml, metrics.jsonl (one line per logged step), summary.json,
loss.png and (OSFN runs) curvature.png. Written the same way by the single-process and the
Ray runs."""
from __future__ import annotations

import json
import time
from pathlib import Path

# optimizer.diagnostics keys copied into every metrics.jsonl record (when present)
LOGGED_DIAGNOSTICS = (
    "negative_curvature", "rotation_angle_deg", "subspace_step_norm", "complement_step_norm", "skipped_steps",
    "eigenvalues", "basis_version", "noise_ratio", "stale_by",
)


def default_run_dir(workload: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{workload.replace(':', '_').replace('.', '_')}-{stamp}"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)

    def write_config(self, config: dict) -> None:
        import yaml

        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def log(self, record: dict) -> None:
        self._metrics.write(json.dumps(record, default=float) + "\n")

    def finish(self, summary: dict) -> dict:
        self._metrics.close()
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        plot_losses(self.path / "metrics.jsonl", self.path / "loss.png", title=summary.get("optimizer", ""))
        plot_curvature(self.path / "metrics.jsonl", self.path / "curvature.png")
        return summary


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out_path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in records if "loss" in r]
    ax.plot(steps, [r["loss"] for r in records if "loss" in r], label="train loss (batch)")
    tests = [(r["step"], r["test_loss"]) for r in records if r.get("test_loss") is not None]
    if tests:
        ax.plot(*zip(*tests), "o-", label="test loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"osfn-dist: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_curvature(metrics_path: Path, out_path: Path) -> bool:
    """What the curvature model saw: the subspace eigenvalues over training (symmetric log
    scale, so negative curvature shows below zero), the number of negative-curvature
    directions and the subspace (Newton) step against the complement's. Written only when
    the log has eigenvalues (an OSFN run with d > 0); returns whether it was."""
    records = [r for r in read_metrics(metrics_path) if r.get("eigenvalues")]
    if not records:
        return False
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    d = max(len(r["eigenvalues"]) for r in records)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[2, 1])
    for i in range(d):  # sorted ascending per step; 0.0 marks a direction not filled yet
        top.plot(steps, [r["eigenvalues"][i] if i < len(r["eigenvalues"]) else float("nan") for r in records], lw=1)
    top.axhline(0.0, color="black", lw=0.8)
    top.set_yscale("symlog", linthresh=1e-2)
    top.set_ylabel("subspace eigenvalues λ")
    top.set_title("osfn-dist: curvature in the subspace")
    top.grid(alpha=0.3)
    bottom.step(steps, [r.get("negative_curvature", 0) for r in records], where="post", color="tab:red",
                label="negative-curvature directions")
    bottom.set_ylabel("count")
    bottom.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    norms = [(r["step"], r.get("subspace_step_norm", 0.0), r.get("complement_step_norm")) for r in records]
    twin = bottom.twinx()
    twin.plot([n[0] for n in norms], [n[1] for n in norms], color="tab:blue", lw=1, label="‖Newton step‖")
    if any(n[2] is not None for n in norms):
        twin.plot([n[0] for n in norms if n[2] is not None], [n[2] for n in norms if n[2] is not None],
                  color="tab:gray", lw=1, label="‖complement step‖")
    twin.set_ylabel("step norm")
    handles = bottom.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    bottom.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return True
