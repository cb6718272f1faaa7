"""`osfn-dist serve` as a real process: killed mid-run (SIGKILL) and restarted from its
--state-file, the client reconnects with backoff and the run ends exactly where an
uninterrupted in-process run ends. Also `osfn-dist status`, SIGTERM and the bind rule."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("grpc")

from osfn_dist import OSFN  # noqa: E402
from osfn_dist.cli import main as cli_main  # noqa: E402
from osfn_dist.service import torchrun_demo as demo  # noqa: E402
from osfn_dist.service.client import GrpcExchange  # noqa: E402

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "restart-token"
STEPS, KILL_AFTER = 30, 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`python -m osfn_dist.cli serve ...` in a subprocess; waits for its ready line."""

    def __init__(self, port: int, token_file: Path, state_file: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("OSFN_TOKEN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "osfn_dist.cli", "serve", "--port", str(port), "--token-file", str(token_file),
             "--state-file", str(state_file), "--metrics-port", "-1", "--subspace-dim",
             str(demo.OPTIMIZER["subspace_dim"])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on" in line:
                self._ready.set()

    def wait_ready(self, timeout=60) -> str:
        assert self._ready.wait(timeout), "".join(self.lines)
        return next(line for line in self.lines if "listening on" in line)

    def stop(self, sig=signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)


def test_server_killed_and_restarted_mid_run_the_run_continues_unchanged(tmp_path, capsys):
    token_file, state_file = tmp_path / "token", tmp_path / "state.pt"
    token_file.write_text(TOKEN)
    port = free_port()
    first = Serve(port, token_file, state_file)
    first.wait_ready()
    restarted: list[Serve] = []

    exchange = GrpcExchange(f"127.0.0.1:{port}", token=TOKEN, job="restart", retries=40, backoff=0.05, max_backoff=0.5)
    model = demo.make_model()
    opt = OSFN(model.parameters(), lr=demo.LR, exchange=exchange, **demo.OPTIMIZER)
    batches = demo.make_batches(STEPS)
    demo.train(model, opt, batches[:KILL_AFTER])
    first.stop(signal.SIGKILL)  # no chance to save anything at shutdown
    restart_at = time.monotonic()
    restarted.append(Serve(port, token_file, state_file))
    try:
        demo.train(model, opt, batches[KILL_AFTER:])  # the next exchange waits for the new server
        outage = time.monotonic() - restart_at
        ready_line = restarted[0].wait_ready()
        assert "restored jobs=1" in ready_line

        reference_model = demo.make_model()
        reference = OSFN(reference_model.parameters(), lr=demo.LR, **demo.OPTIMIZER)
        demo.train(reference_model, reference, batches)
        assert torch.equal(demo.flat_params(model), demo.flat_params(reference_model)), (
            "the run restarted from the state file diverged from the uninterrupted run"
        )
        assert outage > 0.5  # the restart really happened while the run waited

        # osfn-dist status against the restarted server
        capsys.readouterr()
        assert cli_main(["status", "--address", f"127.0.0.1:{port}", "--token-file", str(token_file)]) == 0
        text = capsys.readouterr().out
        assert f"job restart: step {STEPS}" in text and "eigenvalues" in text and "negative curvature" in text
        assert cli_main(["status", "--address", f"127.0.0.1:{port}", "--token-file", str(token_file),
                         "--job", "restart", "--json"]) == 0
        state = json.loads(capsys.readouterr().out)
        assert state["eigenvalues"] == pytest.approx(reference.diagnostics["eigenvalues"])
        assert state["basis_version"] == reference.diagnostics["basis_version"]
        assert cli_main(["status", "--address", f"127.0.0.1:{port}"]) == 1  # no token
        assert "missing bearer token" in capsys.readouterr().err

        # SIGTERM: graceful stop, state saved
        assert restarted[0].stop(signal.SIGTERM) == 0
        assert any("state saved" in line for line in restarted[0].lines), restarted[0].lines
    finally:
        for s in [first, *restarted]:
            s.stop()


def test_serve_refuses_a_public_address_without_a_token(capsys, monkeypatch):
    monkeypatch.delenv("OSFN_TOKEN", raising=False)
    assert cli_main(["serve", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "-1"]) == 2
    assert "without a token" in capsys.readouterr().err
