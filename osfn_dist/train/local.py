"""Single-process training: the same run directory as the Ray run, no Ray needed."""
from __future__ import annotations

import time

import torch

from ..core.errors import ConfigError
from ..workloads import get_workload
from .config import TrainConfig, resolved_config
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

    Checkpoints go to ``<run_dir>/checkpoints/step_<N>/`` every ``checkpoint_every`` steps, in
    the Ray run's format (``ray_checkpoint``), so ``resume_from`` takes a checkpoint or a run
    directory of either backend (its latest checkpoint) and continues the same trajectory.
    ``metrics``: optional exporter with ``observe_step(loss, step_seconds, samples, diagnostics)``;
    without one, ``cfg.metrics_port`` starts the Prometheus exporter here.
    """
    from .ray_checkpoint import checkpoint_dir_name, find_checkpoint, load_state, save_leader_state

    workload = get_workload(cfg.workload, seed=cfg.seed)
    steps = cfg.steps or workload.default_steps
    batch = cfg.batch_size or workload.batch_size
    resume = find_checkpoint(cfg.resume_from) if cfg.resume_from else None
    state = load_state(resume, 0, 1, False) if resume is not None else None
    start = int(state["step"]) if state is not None else 0
    if start >= steps:
        raise ConfigError(f"checkpoint {str(resume)!r} is at step {start}; ask for more --steps than that to continue")
    if metrics is None and cfg.metrics_port is not None:
        from ..metrics.exporter import TrainMetrics

        metrics = TrainMetrics(job=workload.name, worker=0)
        try:
            metrics.serve(cfg.metrics_port)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {cfg.metrics_port}: cannot serve metrics there ({exc}); pick a free port") from None
    run = RunDir(cfg.run_dir or default_run_dir(workload.name))
    run.write_config(resolved_config(cfg, backend="local", steps=steps, batch_size=batch, run_dir=str(run.path),
                                     num_workers=1, resume_from=str(resume) if resume else None))
    torch.manual_seed(cfg.seed)
    model = workload.build_model()
    opt = build_optimizer(model.parameters(), cfg.optimizer)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if state.get("actor") is not None and hasattr(opt, "exchange"):  # a Ray run's curvature actor
            opt.exchange.load_state_dict(state["actor"])
    bar = progress(steps, f"{workload.name} [{cfg.optimizer.get('name', 'osfn')}]", show_progress)
    if bar is not None and start:
        bar.update(start)
    t0 = time.perf_counter()
    loss_value = float("nan")
    eval_every = max(steps // 10, 1)
    for step, x, y in workload.batches(steps, cfg.seed, batch):
        if step <= start:
            continue
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
        if step % cfg.checkpoint_every == 0 or step == steps:
            d = run.path / "checkpoints" / checkpoint_dir_name(step)
            d.mkdir(parents=True, exist_ok=True)
            save_leader_state(d, step=step, model=model.state_dict(), optimizer=opt.state_dict(), actor=None,
                              pipeline=None, meta={"workload": workload.name, "world_size": 1, "shard_basis": False,
                                                   "backend": "local"})
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
        "resumed_from_step": start or None,
        "num_workers": 1,
        "backend": "local",
        "wall_seconds": wall,
        "samples_per_second": (steps - start) * batch / wall,
        "actor_bytes_per_step": 0,
        "run_dir": str(run.path),
    }
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": steps}, run.path / "checkpoint.pt")
    return run.finish(summary)
