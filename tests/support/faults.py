"""Faults injected through the production loops' per-step hooks.

``KillOnce`` is a ``train_ray(step_hook=...)`` hook (and one for the own-loop recipe's
``step_hook``, which passes no actor): at step ``step`` on rank ``rank`` it
kills this worker process (``kind="worker"``) or the curvature actor (``kind="actor"``,
which Ray restarts empty: the loop must restore it from the checkpoint). A marker file
makes it fire only on the first attempt. ``delay_s`` waits first: Ray Train's controller
collects reported checkpoints on its health-check poll, so a kill right after a report can
lose that checkpoint (the run then restarts from the one before).

Ray workers unpickle the hook without importing this module: ``ship_by_value`` registers
it with Ray's cloudpickle so it travels by value.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KillOnce:
    kind: str  # "worker" | "actor"
    rank: int
    step: int
    marker: str
    delay_s: float = 0.0

    def __call__(self, step: int, rank: int, actor=None) -> None:
        if rank != self.rank or step != self.step or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"{self.kind} killed at step {step}\n")
        time.sleep(self.delay_s)
        if self.kind == "worker":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "actor":
            import ray

            ray.kill(actor, no_restart=False)  # Ray restarts it empty; it must be restored


def ship_by_value() -> None:
    from ray import cloudpickle  # Ray's own copy pickles the train loop's config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def nan_gradient_at(step_index: int, sleep_s: float = 0.0):
    """A ``torchrun_demo.train(before_step=...)`` hook: NaN gradients at one step (the
    skipped-step path), and a pause every step (so a scraper sees the run progress)."""
    def hook(i: int, model) -> None:
        if i == step_index:
            next(model.parameters()).grad.fill_(float("nan"))
        if sleep_s:
            time.sleep(sleep_s)

    return hook
