"""One benchmark run: a workload, an optimizer, a learning rate, a seed."""
from __future__ import annotations

import math
import statistics
import time

import torch

from ..workloads import Workload
from .peers import Peer


def state_bytes(optimizer) -> int:
    """Bytes of tensors the optimizer keeps (its state, plus OSFN's basis)."""
    seen: set[int] = set()

    def walk(obj) -> int:
        if isinstance(obj, torch.Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    total = walk(dict(optimizer.state))
    total += int(getattr(optimizer, "basis_bytes", 0))
    return total


def reset_peak_rss() -> int | None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``) and reset the kernel's
    peak-RSS mark (Linux ≥ 4.0: ``5`` into /proc/self/clear_refs). Returns the resident set
    size in bytes now, or None where that is not supported."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def peak_rss() -> int | None:
    """The process's peak resident set size (bytes) since the last ``reset_peak_rss``."""
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return None


def _status_bytes(key: str) -> int | None:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def run_one(workload: Workload, peer: Peer, lr: float, seed: int, steps: int, eval_points: int = 20) -> dict:
    """Train and return the full-train-set loss curve, the test loss and costs (incl. the
    peak resident memory the run added: model, batches, activations, optimizer state and
    its temporaries; Linux only, None elsewhere)."""
    rss_before = reset_peak_rss()
    torch.manual_seed(seed)
    model = workload.build_model()
    opt = peer.build(model.parameters(), lr)
    eval_every = max(steps // eval_points, 1)
    curve = [(0, workload.evaluate(model, "train"))]
    step_times = []
    diverged = False
    for step, x, y in workload.batches(steps, seed):
        t0 = time.perf_counter()
        loss = workload.loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward(create_graph=peer.needs_hessian)
        opt.step()
        step_times.append(time.perf_counter() - t0)
        if not math.isfinite(float(loss.detach())):
            diverged = True
            break
        if step % eval_every == 0 or step == steps:
            curve.append((step, workload.evaluate(model, "train")))
    if peer.needs_hessian:  # drop the graph references kept on .grad
        opt.zero_grad(set_to_none=True)
    peak = peak_rss()
    final_train = curve[-1][1] if not diverged else float("inf")
    test = workload.evaluate(model, "test") if not diverged else float("inf")
    if not math.isfinite(final_train):
        diverged = True
    return {
        "workload": workload.name,
        "optimizer": peer.name,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "curve": curve,
        "final_train_loss": final_train if not diverged else float("inf"),
        "best_train_loss": min(v for _, v in curve) if not diverged else float("inf"),
        "test_loss": test,
        "step_seconds": statistics.median(step_times[len(step_times) // 5 :] or step_times),
        "state_bytes": state_bytes(opt),
        "peak_rss_bytes": None if rss_before is None or peak is None else max(peak - rss_before, 0),
        "params": sum(p.numel() for p in model.parameters()),
        "diverged": diverged,
    }
