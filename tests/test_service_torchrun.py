"""A trainer outside Ray: 2 gloo processes started by torchrun use the gRPC server as their
curvature backend and end where single-process OSFN (in-process service) ends."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("grpc")

from osfn_dist import OSFN, OSFNConfig  # noqa: E402
from osfn_dist.service import torchrun_demo as demo  # noqa: E402
from osfn_dist.service.server import CurvatureServer  # noqa: E402

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
TOKEN = "torchrun-token"


def torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_two_gloo_processes_with_the_grpc_server_match_single_process_osfn(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    server = CurvatureServer(OSFNConfig(subspace_dim=demo.OPTIMIZER["subspace_dim"]), port=0, token=TOKEN)
    server.start()
    out = tmp_path / "params.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OSFN_TOKEN", None)
    try:
        proc = subprocess.run(
            torchrun() + [
                "--standalone", "--nproc-per-node", "2", "-m", "osfn_dist.service.torchrun_demo",
                "--address", f"127.0.0.1:{server.port}", "--token-file", str(token_file), "--job", "ddp",
                "--steps", str(STEPS), "--out", str(out),
            ],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        state = server.registry.get("ddp").service.snapshot()
    finally:
        server.stop(grace=0)
    rank0 = torch.load(out, weights_only=True)
    rank1 = torch.load(f"{out}.rank1", weights_only=True)
    assert torch.equal(rank0["params"], rank1["params"]), "the ranks diverged"
    assert state["step"] == STEPS  # one exchange per step, from the leader only

    model = demo.make_model()
    opt = OSFN(model.parameters(), lr=demo.LR, **demo.OPTIMIZER)  # default: in-process service
    demo.train(model, opt, demo.make_batches(STEPS))
    reference = demo.flat_params(model)
    moved = (reference - demo.flat_params(demo.make_model())).norm() / reference.norm()
    assert moved > 0.05, "the run barely trained: the comparison would prove nothing"
    assert any(abs(v) > 0 for v in opt.diagnostics["eigenvalues"]), "no curvature was fitted"
    rel = float((rank0["params"] - reference).norm() / reference.norm())
    assert rel < 1e-5, f"relative difference {rel:.3g} between the torchrun/gRPC run and single-process OSFN"
    assert rank0["diagnostics"]["eigenvalues"] == pytest.approx(opt.diagnostics["eigenvalues"], rel=1e-6, abs=1e-9)
