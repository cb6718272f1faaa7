"""The Grafana dashboard is generated from the metric table and checked in twice (deploy/
and the Helm chart); these tests keep both copies in sync and the panels well-formed."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from osfn_dist.metrics import grafana
from osfn_dist.metrics.table import BY_NAME, METRICS

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = [ROOT / "deploy/grafana/osfn-dashboard.json", ROOT / "helm/osfn-dist/files/osfn-dashboard.json"]


def promql(expr: str, job: str = ".*", interval: str = "1m") -> str:
    """A panel query with Grafana's variables filled in, as Grafana would send it."""
    return expr.replace("$__rate_interval", interval).replace("$job", job)


@pytest.mark.parametrize("path", CHECKED_IN, ids=["deploy", "helm"])
def test_checked_in_dashboard_is_generated_from_the_table(path):
    assert path.read_text(encoding="utf-8") == grafana.render(), (
        f"{path.relative_to(ROOT)} is out of date: run python -m osfn_dist.metrics.grafana"
    )


def test_check_mode_reports_drift(tmp_path, monkeypatch):
    stale = tmp_path / "dash.json"
    stale.write_text("{}")
    monkeypatch.setattr(grafana, "OUTPUTS", (stale,))
    monkeypatch.setattr(grafana, "ROOT", tmp_path)
    assert grafana.main(["--check"]) == 1
    assert grafana.main([]) == 0 and grafana.main(["--check"]) == 0
    assert stale.read_text() == grafana.render()


def test_one_panel_per_metric_and_only_table_metrics_queried():
    board = json.loads(grafana.render())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) == len(METRICS)
    queried = set()
    for title, expr in grafana.panel_queries(board):
        names = {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"\bosfn_[a-z0-9_]+", expr)}
        assert names and names <= set(BY_NAME), (title, names)
        assert 'job=~"$job"' in expr, f"panel {title!r} ignores the job selector"
        queried |= names
    assert queried == set(BY_NAME)


def test_layout_ids_and_variables():
    board = json.loads(grafana.render())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["multi"] and variables["job"]["allValue"] == ".*"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"] if p["type"] != "row")


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian package prometheus)")
def test_every_panel_query_is_valid_promql(tmp_path):
    rules = {"groups": [{"name": "panels", "rules": [
        {"record": f"osfn:panel_{i}", "expr": promql(expr)} for i, (_, expr) in enumerate(grafana.panel_queries())
    ]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
