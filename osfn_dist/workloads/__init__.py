"""Built-in workloads, and the loader for a user's own (``package.module:function``).

A workload is a model factory, train/test tensors, a loss and a batch size. Everything is
generated locally (no downloads): MNIST-1D by the ``mnist1d`` package, digits from
scikit-learn's bundled copy, the rest synthetic.

A user's workload is any importable function returning a :class:`Workload`, e.g.::

    # mypkg/work.py
    from osfn_dist.workloads import Workload
    def regression(seed: int = 0) -> Workload:
        X = torch.randn(1024, 16); Y = X @ torch.randn(16, 1)
        return Workload("regression", lambda: torch.nn.Linear(16, 1), (X, Y), (X, Y),
                        torch.nn.functional.mse_loss, batch_size=64)

    osfn-dist train --workload mypkg.work:regression
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

from .base import Workload
from .builtin import BUILTIN

__all__ = ["Workload", "BUILTIN", "check_workload", "get_workload", "workload_names"]


def workload_names() -> list[str]:
    return sorted(BUILTIN)


def check_workload(name: str) -> None:
    """Fail fast (ValueError) on a name that cannot be resolved, without building data."""
    if ":" in name:
        _resolve(name)
    elif name not in BUILTIN:
        raise ValueError(f"unknown workload {name!r}; built-in: {', '.join(workload_names())}, or 'package.module:function'")


def _resolve(name: str) -> Callable:
    module_name, _, func_name = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot load workload {name!r}: {exc}. Give 'package.module:function' importable "
            "on every worker (pip install your package, or set PYTHONPATH)"
        ) from exc


def get_workload(name: str, seed: int = 0) -> Workload:
    """A built-in workload by name, or ``package.module:function`` (called with ``seed``)."""
    if ":" in name:
        workload = _resolve(name)(seed=seed)
        if not isinstance(workload, Workload):
            raise TypeError(f"workload factory {name!r} returned {type(workload).__name__}, expected osfn_dist.workloads.Workload")
        return workload
    check_workload(name)
    return BUILTIN[name](seed=seed)
