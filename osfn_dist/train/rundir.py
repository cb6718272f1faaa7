"""The run directory: config.yaml, metrics.jsonl (one line per logged step), summary.json
and loss.png. Written the same way by the single-process and the Ray runs."""
from __future__ import annotations

import json
import time
from pathlib import Path


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
