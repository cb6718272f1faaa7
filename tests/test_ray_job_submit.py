"""``ray job submit -- osfn-dist train ...`` against a real ``ray start --head`` cluster.

The cluster is started with ``ray start --head --block`` as a child process and stopped by
terminating that process (``--block`` makes it take down exactly the processes it started).
``ray stop`` is *not* used: it kills every Ray process on the machine by name, including
other sessions' clusters. All fixed default ports are replaced by free ones, and
``RAY_AUTH_MODE=disabled`` is set for both the cluster and the client (Ray 2.60 enables
token auth by default, and ``ray job submit`` would then need the token).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(420)]

BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_for_dashboard(url: str, head: subprocess.Popen, deadline_s: float = 120) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up in {deadline_s} s")


@pytest.fixture
def head_cluster():
    tmp = tempfile.mkdtemp(prefix="osfn-head-")
    gcs, dash, client, agent = _free_ports(4)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--temp-dir", tmp, "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(url, head)
        yield url, env
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops the processes this head started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # our own process group only
            head.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_runs_osfn_dist_train(head_cluster, tmp_path):
    url, env = head_cluster
    run_dir = tmp_path / "job-run"
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", url, "--",
        "osfn-dist", "train", "--workload", "tiny_mlp", "--steps", "20", "--checkpoint-every", "10",
        "--run-dir", str(run_dir), "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=360)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    # a quiet terminal: no per-report lines from Ray Train, no JSON dump; where the results are
    assert "Reporting training result" not in log and '"worker_throughput"' not in log, log[-4000:]
    assert f"results in {run_dir}" in log and len(log.splitlines()) <= 40, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["num_workers"] == 2 and summary["steps"] == 20
    assert summary["actor_bytes_per_step"] > 0
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoint.pt").exists()
