from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Workload:
    """Model factory + data + loss. ``train``/``test`` are (inputs, targets) tensors."""

    name: str
    build_model: Callable[[], torch.nn.Module]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_size: int = 128
    default_steps: int = 500
    description: str = ""
    # OSFN hyperparameters that suit this workload (merged under the user's).
    optimizer_defaults: dict = field(default_factory=dict)

    def batches(self, steps: int, seed: int, batch_size: int | None = None):
        """Deterministic minibatch indices: (step, x, y) for step in 1..steps."""
        bs = batch_size or self.batch_size
        x, y = self.train
        n = x.shape[0]
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=gen)
        pos = 0
        for step in range(1, steps + 1):
            if pos + bs > n:
                perm = torch.randperm(n, generator=gen)
                pos = 0
            idx = perm[pos : pos + bs]
            pos += bs
            yield step, x[idx], y[idx]

    def evaluate(self, model: torch.nn.Module, split: str = "test") -> float:
        x, y = self.test if split == "test" else self.train
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = float(self.loss_fn(model(x), y))
        model.train(was_training)
        return loss
