"""Prometheus exporters built from the metric table (``table.py``).

Workers (any trainer: single process, torchrun, Ray Train)::

    from osfn_dist.metrics.exporter import TrainMetrics
    metrics = TrainMetrics(job="run-42", worker=rank)      # labels of every series
    metrics.serve(9401 + local_rank, addr="0.0.0.0")          # /metrics over HTTP; returns the port
    exchange = metrics.timed(exchange)                        # times every curvature exchange
    ...
    t0 = time.perf_counter(); loss = train_step(); opt.step()
    metrics.observe_step(loss, time.perf_counter() - t0, batch_size, opt.diagnostics)
    ...
    metrics.set_up(False); metrics.shutdown()

- ``observe_step(loss, step_seconds, samples, diagnostics=None)``: loss, step time, samples and
  steps counters; from ``OSFN.diagnostics`` the eigenvalues (by index), negative-curvature
  count, rotation angle, noise ratio, skipped steps, basis version, step and step norm.
- ``observe_exchange(seconds)``: one curvature round trip (``timed(exchange)`` calls it).
- ``set_up(bool)``: the ``osfn_worker_up`` gauge (1 on construction).

The curvature service (Ray actor, gRPC server)::

    metrics = ServiceMetrics(worker="actor")                  # or "server"
    metrics.serve(9400)
    metrics.observe_request(job, "Exchange", "OK", seconds)   # per request
    metrics.observe_state(job, service.snapshot())            # after each accepted exchange

Each exporter owns a private ``CollectorRegistry`` (``.registry``), so several can live in
one process (tests, an actor beside a worker) without name clashes. Defaults: the gRPC
server's metrics on port 9400, trainers on 9401 (+ local rank).
"""
from __future__ import annotations

import math
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .table import METRICS, SERVICE, WORKER, Metric

DEFAULT_SERVICE_PORT = 9400
DEFAULT_TRAIN_PORT = 9401


def _make(metric: Metric, registry: CollectorRegistry):
    kind = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}[metric.type]
    kwargs = {"buckets": metric.buckets} if metric.type == "histogram" and metric.buckets else {}
    return kind(metric.name, metric.help, list(metric.labels), registry=registry, **kwargs)


def _build(exporter: str, registry: CollectorRegistry) -> dict:
    return {m.name: _make(m, registry) for m in METRICS if exporter in m.exported_by}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Exporter:
    def __init__(self, exporter: str, registry: CollectorRegistry | None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = _build(exporter, self.registry)
        self._http = None
        self._lock = threading.Lock()

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` in a daemon thread; returns the bound port
        (pass 0 for any free port)."""
        if self._http is not None:
            return self._http.server_port
        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)
        return self._http.server_port

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def _set_curvature(self, job: str, worker: str, values: dict) -> None:
        """The curvature gauges shared by workers and the service, from a diagnostics or
        snapshot dict (keys as in ``CurvatureService``)."""
        m = self.metrics
        for i, lam in enumerate(values.get("eigenvalues") or ()):
            if _finite(lam):
                m["osfn_eigenvalue"].labels(job, worker, str(i)).set(lam)
        gauges = (
            ("negative_curvature", "osfn_negative_curvature_directions"),
            ("rotation_angle_deg", "osfn_subspace_rotation_degrees"),
            ("noise_ratio", "osfn_gradient_noise_ratio"),
            ("basis_version", "osfn_basis_version"),
            ("step", "osfn_curvature_step"),
            ("subspace_step_norm", "osfn_subspace_step_norm"),
        )
        for key, name in gauges:
            if _finite(values.get(key)):
                m[name].labels(job, worker).set(values[key])


class TrainMetrics(_Exporter):
    """Metrics of one training worker; every series carries ``job`` and ``worker``."""

    def __init__(self, job: str = "default", worker: str | int = "0", registry: CollectorRegistry | None = None):
        super().__init__(WORKER, registry)
        self.job, self.worker = str(job), str(worker)
        self._skipped_seen = 0
        labels = (self.job, self.worker)
        # Create every plain series now, so dashboards show zeros rather than "no data".
        for name in ("osfn_samples_total", "osfn_steps_total", "osfn_skipped_steps_total"):
            self.metrics[name].labels(*labels)
        for name in ("osfn_step_duration_seconds", "osfn_exchange_duration_seconds"):
            self.metrics[name].labels(*labels)
        self.set_up(True)

    def observe_step(self, loss, step_seconds: float, samples: int, diagnostics: dict | None = None) -> None:
        m, labels = self.metrics, (self.job, self.worker)
        with self._lock:
            if loss is not None:
                value = float(loss)
                if math.isfinite(value):
                    m["osfn_train_loss"].labels(*labels).set(value)
            if _finite(step_seconds) and step_seconds >= 0:
                m["osfn_step_duration_seconds"].labels(*labels).observe(step_seconds)
            if samples:
                m["osfn_samples_total"].labels(*labels).inc(samples)
            m["osfn_steps_total"].labels(*labels).inc()
            if diagnostics:
                self._set_curvature(self.job, self.worker, diagnostics)
                skipped = int(diagnostics.get("skipped_steps", self._skipped_seen))
                if skipped > self._skipped_seen:
                    m["osfn_skipped_steps_total"].labels(*labels).inc(skipped - self._skipped_seen)
                self._skipped_seen = max(skipped, self._skipped_seen)

    def observe_exchange(self, seconds: float) -> None:
        self.metrics["osfn_exchange_duration_seconds"].labels(self.job, self.worker).observe(seconds)

    def set_up(self, up: bool) -> None:
        self.metrics["osfn_worker_up"].labels(self.job, self.worker).set(1 if up else 0)

    def timed(self, exchange) -> "TimedExchange":
        """Wrap an exchange so each call is observed as ``osfn_exchange_duration_seconds``."""
        return TimedExchange(exchange, self)


class TimedExchange:
    """An exchange that times its inner exchange; everything else passes through."""

    def __init__(self, inner, metrics: TrainMetrics):
        self.inner = inner
        self._metrics = metrics

    def exchange(self, report):
        start = time.perf_counter()
        try:
            return self.inner.exchange(report)
        finally:
            self._metrics.observe_exchange(time.perf_counter() - start)

    def __getattr__(self, name):  # state_dict, snapshot, close, ...
        return getattr(self.inner, name)


class ServiceMetrics(_Exporter):
    """Metrics of a curvature service (``worker`` label: "server", "actor", ...), per job."""

    def __init__(self, worker: str = "server", registry: CollectorRegistry | None = None):
        super().__init__(SERVICE, registry)
        self.worker = str(worker)
        self._jobs: set[str] = set()
        self._up = True

    def observe_request(self, job: str, method: str, code: str, seconds: float) -> None:
        labels = (job, self.worker, method, code)
        self.metrics["osfn_service_request_duration_seconds"].labels(*labels).observe(seconds)
        self.metrics["osfn_service_requests_total"].labels(*labels).inc()

    def observe_state(self, job: str, snapshot: dict) -> None:
        with self._lock:
            if job not in self._jobs:
                self._jobs.add(job)
                self.metrics["osfn_worker_up"].labels(job, self.worker).set(1 if self._up else 0)
            self._set_curvature(job, self.worker, snapshot)

    def set_up(self, up: bool) -> None:
        with self._lock:
            self._up = bool(up)
            for job in self._jobs:
                self.metrics["osfn_worker_up"].labels(job, self.worker).set(1 if up else 0)
