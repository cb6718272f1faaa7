"""Single-process training: the same run directory as the Ray run, no Ray needed."""
from __future__ import annotations

import time

import torch

from ..workloads import get_workload
from .config import TrainConfig
from .optimizers import build_optimizer
from .rundir import LOGGED_DIAGNOSTICS, RunDir, default_run_dir


def progress(total: int, desc: str, enabled: bool = True):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the train extra
        return None
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def train_local(cfg: TrainConfig, show_progress: bool = True, metrics=None) -> dict:
    """Train ``cfg.workload`` in this process; returns the summary (also in summary.json).

    ``metrics``: optional exporter with ``observe_step(loss, step_seconds, samples, diagnostics)``.
    """
    workload = get_workload(cfg.workload, seed=cfg.seed)
    steps = cfg.steps or workload.default_steps
    batch = cfg.batch_size or workload.batch_size
    run = RunDir(cfg.run_dir or default_run_dir(workload.name))
    run.write_config({**cfg.as_dict(), "steps": steps, "batch_size": batch, "run_dir": str(run.path)})
    torch.manual_seed(cfg.seed)
    model = workload.build_model()
    opt = build_optimizer(model.parameters(), cfg.optimizer)
    bar = progress(steps, f"{workload.name} [{cfg.optimizer.get('name', 'osfn')}]", show_progress)
    t0 = time.perf_counter()
    loss_value = float("nan")
    eval_every = max(steps // 10, 1)
    for step, x, y in workload.batches(steps, cfg.seed, batch):
        ts = time.perf_counter()
        loss = workload.loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - ts
        loss_value = float(loss.detach())
        diag = getattr(opt, "diagnostics", {})
        if metrics is not None:
            metrics.observe_step(loss_value, dt, x.shape[0], diag)
        if step % cfg.log_every == 0 or step == steps:
            record = {"step": step, "loss": loss_value, "step_seconds": dt, "samples_per_second": x.shape[0] / dt}
            if step % eval_every == 0 or step == steps:
                record["test_loss"] = workload.evaluate(model)
            for key in LOGGED_DIAGNOSTICS:
                if key in diag:
                    record[key] = diag[key]
            run.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    summary = {
        "workload": workload.name,
        "optimizer": cfg.optimizer.get("name", "osfn"),
        "final_loss": workload.evaluate(model, "train"),
        "final_batch_loss": loss_value,
        "test_loss": workload.evaluate(model, "test"),
        "steps": steps,
        "num_workers": 1,
        "backend": "local",
        "wall_seconds": wall,
        "samples_per_second": steps * batch / wall,
        "actor_bytes_per_step": 0,
        "run_dir": str(run.path),
    }
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": steps}, run.path / "checkpoint.pt")
    return run.finish(summary)
