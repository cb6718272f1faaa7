"""A real Prometheus (Debian's package, on loopback) scrapes a real short training run: a
trainer whose curvature backend is the gRPC server, both exporting metrics. Prometheus
must hold every series of the metric table, and every panel of the checked-in Grafana
dashboard must return data."""
from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from osfn_dist import OSFN, OSFNConfig  # noqa: E402
from osfn_dist.metrics import grafana  # noqa: E402
from osfn_dist.metrics.exporter import ServiceMetrics, TrainMetrics  # noqa: E402
from osfn_dist.metrics.table import METRICS  # noqa: E402
from osfn_dist.service import torchrun_demo as demo  # noqa: E402
from osfn_dist.service.client import GrpcExchange  # noqa: E402
from osfn_dist.service.server import CurvatureServer  # noqa: E402
from support.faults import nan_gradient_at  # noqa: E402

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.grpc,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Prometheus: apt-get install -y prometheus"),
]
ROOT = Path(__file__).resolve().parents[1]
JOB, TOKEN, STEPS, NAN_STEP = "promtest", "prom-token", 60, 7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str]):
        self.port = free_port()
        config = workdir / "prometheus.yml"
        # honor_labels: our series carry their own `job` label (the training job); without it
        # Prometheus would rename it to exported_job.
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "osfn", "honor_labels": True, "static_configs": [{"targets": targets}],
            }],
        }))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (Path(self.log.name).read_text())[-2000:]
            try:
                if urllib.request.urlopen(self.url + "/-/ready", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("Prometheus did not become ready")

    def query(self, expr: str) -> list[dict]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.load(urllib.request.urlopen(url, timeout=10))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    d = demo.OPTIMIZER["subspace_dim"]
    service_metrics = ServiceMetrics(worker="server")
    server = CurvatureServer(OSFNConfig(subspace_dim=d), port=0, token=TOKEN, metrics=service_metrics)
    server.start()
    service_port = service_metrics.serve(0)
    train_metrics = TrainMetrics(job=JOB, worker=0)
    train_port = train_metrics.serve(0)
    prom = Prometheus(workdir, [f"127.0.0.1:{service_port}", f"127.0.0.1:{train_port}"])
    try:
        # the training run: a real OSFN trainer whose curvature backend is the gRPC server
        model = demo.make_model()
        exchange = train_metrics.timed(GrpcExchange(f"127.0.0.1:{server.port}", token=TOKEN, job=JOB))
        opt = OSFN(model.parameters(), lr=demo.LR, exchange=exchange, **demo.OPTIMIZER)
        run = threading.Thread(target=demo.train, args=(model, opt, demo.make_batches(STEPS)),
                               kwargs=dict(metrics=train_metrics, before_step=nan_gradient_at(NAN_STEP, sleep_s=0.08)))
        prom.wait_ready()
        deadline = time.monotonic() + 30
        while len(prom.query("up == 1")) < 2:  # both targets scraped before the run starts,
            assert time.monotonic() < deadline, prom.query("up")  # so rates see it progress
            time.sleep(0.2)
        run.start()
        run.join(120)
        assert not run.is_alive()
        # wait until Prometheus has scraped the final values of both targets a few times
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            final = prom.query(f'osfn_steps_total{{job="{JOB}"}}')
            server_step = prom.query(f'osfn_curvature_step{{job="{JOB}",worker="server"}}')
            counts = prom.query(f'count_over_time(osfn_curvature_step{{job="{JOB}",worker="server"}}[1m])')
            # both targets' last scrapes must postdate the run's end (the server's may lag the trainer's)
            if (final and float(final[0]["value"][1]) == STEPS and server_step
                    and float(server_step[0]["value"][1]) == STEPS - 1 and counts and float(counts[0]["value"][1]) >= 4):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"Prometheus did not scrape the run: {prom.query('up')}")
        yield prom, opt
    finally:
        prom.stop()
        server.stop(grace=0)
        service_metrics.shutdown()
        train_metrics.shutdown()


def test_prometheus_holds_every_series_of_the_metric_table(scraped):
    prom, _ = scraped
    names = {r["metric"]["__name__"] for r in prom.query(f'{{__name__=~"osfn_.+",job="{JOB}"}}')}
    missing = [m.name for m in METRICS if m.series_name not in names]
    assert not missing, f"not scraped: {missing}"
    for r in prom.query(f'{{__name__=~"osfn_.+",job="{JOB}"}}'):
        assert r["metric"]["worker"] in ("0", "server"), r["metric"]
    assert {r["metric"]["instance"] for r in prom.query("up == 1")} and len(prom.query("up == 1")) == 2


def test_scraped_values_describe_the_run(scraped):
    prom, opt = scraped
    one = lambda expr: float(prom.query(expr)[0]["value"][1])  # noqa: E731
    assert one(f'osfn_skipped_steps_total{{job="{JOB}"}}') == 1  # the injected NaN gradient
    assert one(f'osfn_curvature_step{{job="{JOB}",worker="server"}}') == STEPS - 1
    eig = prom.query(f'osfn_eigenvalue{{job="{JOB}",worker="server"}}')
    by_index = {int(r["metric"]["index"]): float(r["value"][1]) for r in eig}
    assert by_index == pytest.approx(dict(enumerate(opt.diagnostics["eigenvalues"])))
    assert one(f'osfn_service_requests_total{{job="{JOB}",method="Exchange",code="OK"}}') == STEPS - 1
    assert one(f'osfn_worker_up{{job="{JOB}",worker="0"}}') == 1


def test_every_dashboard_panel_returns_data(scraped):
    prom, _ = scraped
    board = json.loads((ROOT / "deploy/grafana/osfn-dashboard.json").read_text())
    queries = grafana.panel_queries(board)
    assert len(queries) >= len(METRICS)
    empty = []
    for title, expr in queries:
        result = prom.query(expr.replace("$__rate_interval", "1m").replace("$job", JOB))
        values = [float(r["value"][1]) for r in result]
        if not values or not any(math.isfinite(v) for v in values):
            empty.append((title, expr, values))
    assert not empty, f"panels without data: {empty}"
