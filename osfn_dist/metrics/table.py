"""The one table of osfn-dist metric names.

Every exporter (``exporter.TrainMetrics`` in workers, ``exporter.ServiceMetrics`` in the
curvature actor and the gRPC server) creates its metrics from this table, the Grafana
dashboard is generated from it (``grafana.py``) and docs/service.md renders it
(``python -m osfn_dist.metrics.table``). Add a metric here, nowhere else.

Conventions: prefix ``osfn_``; the unit is the last part of the name (``_seconds``,
``_degrees``, ``_ratio``; counters end in ``_total``); every metric carries the labels
``job`` (training job) and ``worker`` (worker rank, or ``server`` / ``actor`` for the
curvature service). ``exported_by`` lists which exporters set it.

Each row also holds its dashboard panel: a PromQL expression with the Grafana variables
``$job`` (multi-value regex) and ``$__rate_interval``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

WORKER, SERVICE = "worker", "service"  # exporters: TrainMetrics / ServiceMetrics
BASE_LABELS = ("job", "worker")
RATE = "$__rate_interval"
JOB = 'job=~"$job"'


@dataclass(frozen=True)
class Panel:
    title: str
    expr: str
    legend: str
    unit: str = "short"  # Grafana unit id
    kind: str = "timeseries"  # or "stat"
    row: str = "Curvature"  # dashboard row: Training | Curvature | Curvature service


@dataclass(frozen=True)
class Metric:
    name: str
    type: str  # gauge | counter | histogram
    help: str
    unit: str  # "" when dimensionless
    exported_by: tuple[str, ...]
    panel: Panel
    extra_labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # histograms

    @property
    def labels(self) -> tuple[str, ...]:
        return BASE_LABELS + self.extra_labels

    @property
    def series_name(self) -> str:
        """A series every scrape of this metric holds (histograms: the _count series)."""
        return self.name + "_count" if self.type == "histogram" else self.name


_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _p99(name: str, by: str = "job") -> str:
    return f"histogram_quantile(0.99, sum by (le, {by}) (rate({name}_bucket{{{JOB}}}[{RATE}])))"


METRICS: tuple[Metric, ...] = (
    Metric(
        "osfn_train_loss", "gauge", "Training loss of the worker's last step.", "", (WORKER,),
        Panel("Training loss", f"avg by (job) (osfn_train_loss{{{JOB}}})", "{{job}}", row="Training"),
    ),
    Metric(
        "osfn_step_duration_seconds", "histogram", "Wall time of one training step (forward, backward, optimizer).",
        "seconds", (WORKER,),
        Panel("Step time p99", _p99("osfn_step_duration_seconds"), "{{job}} p99", "s", row="Training"),
        buckets=_STEP_BUCKETS,
    ),
    Metric(
        "osfn_samples_total", "counter", "Training samples processed by the worker.", "samples", (WORKER,),
        Panel("Throughput", f"sum by (job) (rate(osfn_samples_total{{{JOB}}}[{RATE}]))", "{{job}}", "samples/s", row="Training"),
    ),
    Metric(
        "osfn_steps_total", "counter", "Optimizer steps taken by the worker (skipped steps included).", "steps",
        (WORKER,),
        Panel("Steps per second", f"max by (job) (rate(osfn_steps_total{{{JOB}}}[{RATE}]))", "{{job}}", "ops", row="Training"),
    ),
    Metric(
        "osfn_exchange_duration_seconds", "histogram",
        "Round trip of one curvature exchange seen by the worker (in-process call, Ray actor call or gRPC RPC).",
        "seconds", (WORKER,),
        Panel("Exchange latency p99 (worker side)", _p99("osfn_exchange_duration_seconds"), "{{job}} p99", "s",
              row="Curvature service"),
        buckets=_LATENCY_BUCKETS,
    ),
    Metric(
        "osfn_service_request_duration_seconds", "histogram",
        "Time the curvature service (Ray actor or gRPC server) spent on one request.", "seconds", (SERVICE,),
        Panel(
            "Curvature service latency p99",
            _p99("osfn_service_request_duration_seconds", "job, method"), "{{job}} {{method}}", "s",
            row="Curvature service",
        ),
        extra_labels=("method", "code"), buckets=_LATENCY_BUCKETS,
    ),
    Metric(
        "osfn_service_requests_total", "counter",
        "Requests the curvature service answered, by method and status code.", "requests", (SERVICE,),
        Panel(
            "Curvature service requests",
            f"sum by (job, method, code) (rate(osfn_service_requests_total{{{JOB}}}[{RATE}]))",
            "{{job}} {{method}} {{code}}", "reqps", row="Curvature service",
        ),
        extra_labels=("method", "code"),
    ),
    Metric(
        "osfn_eigenvalue", "gauge",
        "Eigenvalue of the fitted subspace Hessian, by index in the working basis (0 = not yet fitted).", "",
        (WORKER, SERVICE),
        Panel("Subspace eigenvalues", f"max by (job, index) (osfn_eigenvalue{{{JOB}}})", "{{job}} λ{{index}}"),
        extra_labels=("index",),
    ),
    Metric(
        "osfn_negative_curvature_directions", "gauge",
        "Number of fitted eigenvalues below zero (directions the saddle-free step repels from).", "directions",
        (WORKER, SERVICE),
        Panel(
            "Negative-curvature directions",
            f"max by (job) (osfn_negative_curvature_directions{{{JOB}}})", "{{job}}", "short", "stat",
        ),
    ),
    Metric(
        "osfn_subspace_rotation_degrees", "gauge", "Angle by which the subspace turned in the last step.", "degrees",
        (WORKER, SERVICE),
        Panel("Subspace rotation", f"max by (job) (osfn_subspace_rotation_degrees{{{JOB}}})", "{{job}}", "degree"),
    ),
    Metric(
        "osfn_gradient_noise_ratio", "gauge",
        "Gradient noise variance over gradient energy, summed over the subspace directions.", "ratio",
        (WORKER, SERVICE),
        Panel("Gradient noise ratio", f"max by (job) (osfn_gradient_noise_ratio{{{JOB}}})", "{{job}}"),
    ),
    Metric(
        "osfn_skipped_steps_total", "counter", "Steps skipped because the gradient held NaN/Inf.", "steps",
        (WORKER,),
        Panel("Skipped steps", f"max by (job) (osfn_skipped_steps_total{{{JOB}}})", "{{job}}", "short", "stat",
              row="Training"),
    ),
    Metric(
        "osfn_worker_up", "gauge", "1 while the worker (or curvature service) is running, 0 once it stopped.", "",
        (WORKER, SERVICE),
        Panel("Workers up", f"sum by (job) (osfn_worker_up{{{JOB}}})", "{{job}}", "short", "stat", row="Training"),
    ),
    Metric(
        "osfn_basis_version", "gauge", "Version of the subspace basis V (bumped by every basis update).", "",
        (WORKER, SERVICE),
        Panel("Basis version", f"max by (job) (osfn_basis_version{{{JOB}}})", "{{job}}"),
    ),
    Metric(
        "osfn_curvature_step", "gauge", "Step of the curvature model (exchanges it has processed).", "steps",
        (WORKER, SERVICE),
        Panel("Curvature step", f"max by (job) (osfn_curvature_step{{{JOB}}})", "{{job}}"),
    ),
    Metric(
        "osfn_subspace_step_norm", "gauge", "Norm of the last saddle-free Newton step in the subspace.", "",
        (WORKER, SERVICE),
        Panel("Subspace Newton step norm", f"max by (job) (osfn_subspace_step_norm{{{JOB}}})", "{{job}}"),
    ),
)

BY_NAME = {m.name: m for m in METRICS}


def markdown_table() -> str:
    """The table as markdown (for docs/service.md)."""
    rows = [
        "| metric | type | unit | labels | exported by | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        rows.append(
            f"| `{m.name}` | {m.type} | {m.unit or '—'} | {', '.join(m.labels)} | "
            f"{', '.join(m.exported_by)} | {m.help} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
