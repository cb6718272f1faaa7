"""Shared fixtures.

``ray_session``: ONE local Ray for the whole test session (starting Ray costs seconds and
~1 GB; starting it per test does not fit on 2 cores). Tests that use it are marked ``ray``.
Environment, set before Ray starts so the raylet and every worker inherit it:

- ``RAY_AUTH_MODE=disabled``: Ray 2.60 turns on token auth by default;
- ``RAY_TMPDIR`` under a short temp dir (Unix socket paths are length-limited);
- ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1``: ``ray.train.report()`` blocks about one interval;
- ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=30``: a starved worker group fails, not hangs;
- ``RAY_USAGE_STATS_ENABLED=0``.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

RAY_TEST_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
}


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="osfn-ray-")
    saved = {k: os.environ.get(k) for k in (*RAY_TEST_ENV, "RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ.update(RAY_TEST_ENV)
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.pop("RAY_ADDRESS", None)
    if not ray.is_initialized():
        # 3 logical CPUs: two Train workers plus room while a failed group is replaced
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
