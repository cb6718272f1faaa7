"""One-step-stale pipelining of the exchange, so a remote round trip overlaps compute.

Without pipelining a worker waits for the curvature service every step::

    fwd/bwd_t ─ report_t ──► service ──► update_t ─ apply_t ─ fwd/bwd_t+1 ...

With :class:`PipelinedExchange` the report of step t is sent and the update of step t−1 is
applied at once; the service works on report_t while the worker runs step t+1's
forward/backward::

    fwd/bwd_t ─ send report_t, apply update_t−1 ─ fwd/bwd_t+1 ─ send report_t+1, apply update_t ...

Versions stay exact. The service answers report_t−1 after it produced update_t−2, so
update_t−1 is expressed in the basis the worker holds once it applied update_t−2: the
basis it holds now (``check_version`` in the apply hop still refuses anything else).
What is stale is the *report*: report_t was projected onto a basis one version behind the
service, which a ``CurvatureService(config, allow_stale=True)`` re-expresses through its
last basis transform. The approximation: the step and the basis update of step t come
from the gradient of step t−1 (the basis update still moves toward the current residual),
and the service's position estimate runs one step ahead of the worker.

Every applied update says so in ``diagnostics``: ``stale_by`` (0 or 1) and
``report_step``; the first warm-up step applies an empty update (``pipeline_warmup``).
For checkpoints, :meth:`state_dict` drains the pipeline: it waits for the update in
flight and returns it, so a resumed run applies exactly the update the interrupted one
would have applied.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from .messages import DirectionUpdate, Report

log = logging.getLogger(__name__)


class PipelinedExchange:
    """Wrap an exchange: send this step's report, return the previous step's update.

    ``inner`` either offers ``submit(report) -> handle`` and ``result(handle) ->
    DirectionUpdate`` (the Ray actor exchange: a non-blocking remote call), or only
    ``exchange(report)``, which then runs on one background thread (order preserved).
    The service behind it must accept one-version-stale reports (``allow_stale=True``).
    """

    def __init__(self, inner, timeout_s: float | None = None):
        self.inner = inner
        self.timeout_s = timeout_s
        self._pool = None
        if not (hasattr(inner, "submit") and hasattr(inner, "result")):
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="osfn-pipeline")
        self._in_flight = None  # (handle, report step, its residual_sqnorm)
        self._ready: tuple | None = None  # (drained update, residual_sqnorm): applied next step
        self.stale_updates = 0
        self._announced = False

    # ------------------------------------------------------------ transport
    def _submit(self, report: Report):
        if self._pool is None:
            return self.inner.submit(report)
        return self._pool.submit(self.inner.exchange, report)

    def _result(self, handle) -> DirectionUpdate:
        if self._pool is None:
            return self.inner.result(handle)
        return handle.result(timeout=self.timeout_s)

    # -------------------------------------------------------------- exchange
    def exchange(self, report: Report) -> DirectionUpdate:
        ready, flight = self._ready, self._in_flight
        self._ready = None
        # Send first: the service processes reports in order, so this one queues behind the
        # previous report while we wait for (or already hold) the previous update.
        self._in_flight = (self._submit(report), report.step, _residual_sqnorm(report))
        if ready is not None:
            previous, previous_sq = ready
        elif flight is not None:
            previous, previous_sq = self._result(flight[0]), flight[2]
        else:
            return self._warmup(report)
        _rescale_residual(previous, previous_sq, _residual_sqnorm(report))
        self.stale_updates += 1
        if not self._announced:
            log.info(
                "pipelined curvature exchange: step %d applies the update computed from step %d's "
                "report (staleness 1) to basis version %d",
                report.step, previous.step, previous.base_version,
            )
            self._announced = True
        previous.diagnostics = {**previous.diagnostics, "stale_by": 1, "report_step": previous.step}
        return previous

    @staticmethod
    def _warmup(report: Report) -> DirectionUpdate:
        d = int(torch.as_tensor(report.grad_coords).numel())
        return DirectionUpdate(
            step=report.step,
            base_version=report.basis_version,
            new_version=report.basis_version,
            step_coef=torch.zeros(d, dtype=torch.float64),
            diagnostics={"pipeline_warmup": True, "stale_by": 0},
        )

    # ----------------------------------------------------------- checkpoint
    def drain(self) -> DirectionUpdate | None:
        """Wait for the update in flight; it is kept and applied at the next step."""
        if self._in_flight is not None:
            handle, _, residual_sq = self._in_flight
            self._in_flight = None
            self._ready = (self._result(handle), residual_sq)
        return None if self._ready is None else self._ready[0]

    def state_dict(self) -> dict:
        pending = self.drain()
        return {
            "pending_update": None if pending is None else pending.to_wire(),
            "pending_residual_sqnorm": None if pending is None else self._ready[1],
            "stale_updates": self.stale_updates,
        }

    def load_state_dict(self, sd: dict) -> None:
        if self._in_flight is not None:
            raise RuntimeError("cannot load pipeline state while an exchange is in flight; drain() first")
        wire = sd.get("pending_update")
        self._ready = None if wire is None else (DirectionUpdate.from_wire(wire), sd.get("pending_residual_sqnorm"))
        self.stale_updates = int(sd.get("stale_updates", 0))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __getattr__(self, name):  # stats(), snapshot(), ... of the inner exchange
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _rescale_residual(update: DirectionUpdate, used_sq: float | None, current_sq: float | None) -> None:
    """The service sized the residual coefficients c for the residual r of the report it
    answered (‖r_t−1‖); the worker applies them to the residual of the current step r_t,
    which is orthogonal to the basis it holds now. Rescale c by ‖r_t−1‖/‖r_t‖ so the basis
    turns toward the current residual by the intended amount (a momentum source, still
    warming up, changes its norm several-fold between steps)."""
    if update.residual_coef is None or used_sq is None or current_sq is None:
        return
    if current_sq <= 1e-300 or used_sq <= 0:
        return
    update.residual_coef = update.residual_coef * (used_sq / current_sq) ** 0.5


def _residual_sqnorm(report: Report) -> float | None:
    """‖u − V Vᵀu‖² of the report's subspace source u: sent, or derived as the service does."""
    if report.residual_sqnorm is not None:
        return float(report.residual_sqnorm)
    coords, sq = (report.source_coords, report.source_sqnorm) if report.source_coords is not None else (
        report.grad_coords, report.grad_sqnorm)
    if sq is None:
        return None
    c = torch.as_tensor(coords, dtype=torch.float64)
    return max(float(sq) - float(c @ c), 0.0)
