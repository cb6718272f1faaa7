"""The metric table and its exporters: naming rules, every table metric exported with the
job/worker labels by the exporters the table names, values from OSFN diagnostics."""
from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from osfn_dist.metrics.exporter import ServiceMetrics, TrainMetrics  # noqa: E402
from osfn_dist.metrics.table import METRICS, SERVICE, WORKER, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UNIT_SUFFIXES = ("_seconds", "_degrees", "_ratio", "_total", "_directions")


def scrape(registry) -> dict[str, list]:
    """{sample name: [(labels, value)]} of the registry's exposition text."""
    text = prometheus_client.generate_latest(registry).decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_table_follows_the_naming_rules():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"osfn_[a-z0-9_]+", m.name), m.name
        assert m.labels[:2] == ("job", "worker"), m.name
        assert m.type in ("gauge", "counter", "histogram")
        assert (m.type == "counter") == m.name.endswith("_total"), m.name
        if m.unit in ("seconds", "degrees", "ratio"):
            assert m.name.endswith("_" + m.unit), m.name
        if m.type == "histogram":
            assert m.name.endswith("_seconds") and m.buckets
        assert m.exported_by and set(m.exported_by) <= {WORKER, SERVICE}
        assert m.name in m.panel.expr, f"the panel of {m.name} does not query it"
    required = {  # what the dashboards and the issue ask for
        "osfn_train_loss", "osfn_step_duration_seconds", "osfn_samples_total", "osfn_exchange_duration_seconds",
        "osfn_service_request_duration_seconds", "osfn_eigenvalue", "osfn_negative_curvature_directions",
        "osfn_subspace_rotation_degrees", "osfn_gradient_noise_ratio", "osfn_skipped_steps_total", "osfn_worker_up",
    }
    assert required <= set(names)


DIAG = {
    "step": 12, "skipped_steps": 2, "basis_version": 9, "eigenvalues": [-0.5, 0.25, 3.0], "negative_curvature": 1,
    "rotation_angle_deg": 4.5, "subspace_step_norm": 0.125, "noise_ratio": 0.75, "regression_residual": float("nan"),
}


def test_train_metrics_export_every_worker_metric_with_job_and_worker_labels():
    m = TrainMetrics(job="j1", worker=3)
    m.observe_step(0.5, 0.02, 64, DIAG)
    m.observe_step(0.4, 0.03, 64, {**DIAG, "skipped_steps": 3})
    with_timing = m.timed(type("E", (), {"exchange": lambda self, r: "update", "extra": 7})())
    assert with_timing.exchange(None) == "update" and with_timing.extra == 7
    samples = scrape(m.registry)
    for metric in METRICS:
        if WORKER in metric.exported_by:
            assert metric.series_name in samples, metric.name
            for labels, _ in samples[metric.series_name]:
                assert labels["job"] == "j1" and labels["worker"] == "3"
        else:
            assert metric.series_name not in samples
    value = lambda name, **kw: next(v for lab, v in samples[name] if all(lab.get(k) == x for k, x in kw.items()))  # noqa: E731
    assert value("osfn_train_loss") == 0.4
    assert value("osfn_samples_total") == 128 and value("osfn_steps_total") == 2
    assert value("osfn_skipped_steps_total") == 3  # cumulative diagnostics → counter increments
    assert value("osfn_eigenvalue", index="0") == -0.5 and value("osfn_eigenvalue", index="2") == 3.0
    assert value("osfn_negative_curvature_directions") == 1
    assert value("osfn_subspace_rotation_degrees") == 4.5 and value("osfn_gradient_noise_ratio") == 0.75
    assert value("osfn_exchange_duration_seconds_count") == 1
    assert value("osfn_step_duration_seconds_count") == 2
    assert value("osfn_worker_up") == 1
    m.set_up(False)
    assert scrape(m.registry)["osfn_worker_up"][0][1] == 0


def test_service_metrics_export_every_service_metric_per_job():
    m = ServiceMetrics(worker="actor")
    m.observe_request("j2", "Exchange", "OK", 0.001)
    m.observe_state("j2", {**DIAG, "eigenvalues": [1.0, 2.0]})
    samples = scrape(m.registry)
    for metric in METRICS:
        if SERVICE in metric.exported_by:
            assert metric.series_name in samples, metric.name
            assert all(lab["job"] == "j2" and lab["worker"] == "actor" for lab, _ in samples[metric.series_name])
    assert {lab["index"] for lab, _ in samples["osfn_eigenvalue"]} == {"0", "1"}
    m.set_up(False)
    assert scrape(m.registry)["osfn_worker_up"][0][1] == 0


def test_exporters_serve_http_on_their_own_registries():
    a, b = TrainMetrics(job="a", worker=0), TrainMetrics(job="b", worker=0)  # no name clash in one process
    port = a.serve(0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'osfn_worker_up{job="a",worker="0"} 1.0' in body and 'job="b"' not in body
    finally:
        a.shutdown()
    b.shutdown()


def test_docs_render_the_metric_table():
    docs = (ROOT / "docs/service.md").read_text(encoding="utf-8")
    assert markdown_table() in docs, "docs/service.md is out of date: paste `python -m osfn_dist.metrics.table`"
