"""The built-in workloads used by ``osfn-dist train`` and the benchmark."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F

from .base import Workload
from .text import char_lm


@lru_cache(maxsize=2)
def _mnist1d(seed: int = 42):
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - the bench/ray extras install it
        raise ImportError("the MNIST-1D workloads need the 'mnist1d' package: pip install 'osfn-dist[bench]'") from exc
    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)  # generated locally, ~2 s, no download
    x = torch.as_tensor(data["x"], dtype=torch.float32)
    xt = torch.as_tensor(data["x_test"], dtype=torch.float32)
    mean, std = x.mean(), x.std()
    return (
        ((x - mean) / std, torch.as_tensor(data["y"], dtype=torch.long)),
        ((xt - mean) / std, torch.as_tensor(data["y_test"], dtype=torch.long)),
    )


def mnist1d_mlp(seed: int = 0) -> Workload:
    train, test = _mnist1d()

    def build():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    return Workload("mnist1d_mlp", build, train, test, F.cross_entropy, batch_size=128, default_steps=600,
                    description="MNIST-1D (4000 train / 1000 test), MLP 40-256-256-10")


class _Conv1dNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.c1 = nn.Conv1d(1, width, 5, padding=2)
        self.c2 = nn.Conv1d(width, width, 3, padding=1, stride=2)
        self.c3 = nn.Conv1d(width, width, 3, padding=1, stride=2)
        self.head = nn.Linear(width * 10, 10)

    def forward(self, x):
        h = F.relu(self.c1(x.unsqueeze(1)))
        h = F.relu(self.c2(h))
        h = F.relu(self.c3(h))
        return self.head(h.flatten(1))


def mnist1d_cnn(seed: int = 0) -> Workload:
    train, test = _mnist1d()

    def build():
        torch.manual_seed(seed)
        return _Conv1dNet()

    return Workload("mnist1d_cnn", build, train, test, F.cross_entropy, batch_size=128, default_steps=600,
                    description="MNIST-1D, 3-layer 1-D CNN (32 channels)")


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16.0
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.shape[0], generator=gen)
    x = x[perm]
    return x[:1500], x[1500:]


def digits_autoencoder(seed: int = 0) -> Workload:
    try:
        xtr, xte = _digits()
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the autoencoder workload needs scikit-learn: pip install 'osfn-dist[bench]'") from exc

    def build():
        torch.manual_seed(seed)
        dims = [64, 128, 64, 32, 8, 32, 64, 128, 64]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)

    return Workload("digits_autoencoder", build, (xtr, xtr), (xte, xte), F.mse_loss, batch_size=100,
                    default_steps=600, description="8x8 digits (sklearn), deep tanh autoencoder 64-128-64-32-8-...-64")


@lru_cache(maxsize=2)
def _linear_teacher(seed: int):
    gen = torch.Generator().manual_seed(1000 + seed)
    dim, n = 24, 2048
    # teacher with a spread spectrum: slow modes are what a saddle-escaping method must find
    u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    s = torch.logspace(0, -1.5, dim)
    teacher = u @ torch.diag(s) @ v.T * 3
    x = torch.randn(n, dim, generator=gen)
    y = x @ teacher.T + 0.01 * torch.randn(n, dim, generator=gen)
    xt = torch.randn(512, dim, generator=gen)
    return (x, y), (xt, xt @ teacher.T)


def deep_linear(seed: int = 0) -> Workload:
    """Deep linear net from a small initialisation: the origin is a saddle of high order,
    learning proceeds by escaping a sequence of saddles (Saxe et al., arXiv:1312.6120)."""
    train, test = _linear_teacher(0)

    def build():
        torch.manual_seed(seed)
        layers = [nn.Linear(24, 24, bias=False) for _ in range(6)]
        for layer in layers:
            nn.init.normal_(layer.weight, std=0.05)
        return nn.Sequential(*layers)

    return Workload("deep_linear", build, train, test, F.mse_loss, batch_size=64, default_steps=600,
                    description="6-layer deep linear net (24 wide), small init: saddle-rich")


def tiny_mlp(seed: int = 0) -> Workload:
    """A seconds-long synthetic workload for smoke tests and laptops without extras."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1024, 16, generator=gen)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.05 * torch.randn(1024, 1, generator=gen)

    def build():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))

    return Workload("tiny_mlp", build, (x[:768], y[:768]), (x[768:], y[768:]), F.mse_loss, batch_size=64,
                    default_steps=200, description="synthetic regression, MLP 16-64-1")


BUILTIN = {
    "mnist1d_mlp": mnist1d_mlp,
    "mnist1d_cnn": mnist1d_cnn,
    "digits_autoencoder": digits_autoencoder,
    "deep_linear": deep_linear,
    "char_lm": char_lm,
    "tiny_mlp": tiny_mlp,
}
