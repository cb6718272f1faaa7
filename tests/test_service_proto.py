"""The wire format: generated code in sync with proto/, every message field carried,
float arrays as little-endian float64 bytes, and the import boundaries."""
from __future__ import annotations

import math
import struct
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

pytest.importorskip("grpc")

from osfn_dist.dataflow.messages import DirectionUpdate, Report  # noqa: E402
from osfn_dist.service import convert  # noqa: E402
from osfn_dist.service.errors import MalformedMessageError  # noqa: E402
from osfn_dist.service.v1 import curvature_pb2 as pb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "osfn_dist/service/v1"


def test_generated_code_matches_the_proto_files(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run(
        ["bash", str(ROOT / "scripts/gen-proto.sh"), str(tmp_path)], check=True, capture_output=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    fresh = sorted(p.name for p in tmp_path.iterdir())
    checked_in = sorted(p.name for p in GENERATED.iterdir() if p.is_file() and not p.name.endswith(".pyc"))
    assert fresh == checked_in, "generated file set differs: run scripts/gen-proto.sh"
    stale = [n for n in fresh if (tmp_path / n).read_bytes() != (GENERATED / n).read_bytes()]
    assert not stale, f"{stale} are out of date with proto/: run scripts/gen-proto.sh"


def test_generated_code_imports_relative_to_the_package():
    for name in ("curvature_pb2_grpc.py", "health_pb2_grpc.py"):
        text = (GENERATED / name).read_text()
        assert "from osfn.v1" not in text and "from grpc.health.v1" not in text


def test_every_message_field_is_carried_over_grpc():
    """A field added to messages.py must be added to the proto and convert.py too."""
    assert {f.name for f in fields(Report)} == set(convert.REPORT_FIELDS)
    assert {f.name for f in fields(DirectionUpdate)} == set(convert.UPDATE_FIELDS)
    proto_report = {f.name for f in pb.Report.DESCRIPTOR.fields} | {"hyper"}
    proto_update = {f.name for f in pb.DirectionUpdate.DESCRIPTOR.fields}
    assert set(convert.REPORT_FIELDS) <= proto_report
    assert set(convert.UPDATE_FIELDS) <= proto_update


def test_float_arrays_are_little_endian_float64_bytes():
    msg = convert.report_to_proto(Report(step=1, basis_version=0, grad_coords=torch.tensor([1.5, -2.0]), grad_sqnorm=9.0))
    assert msg.grad_coords == struct.pack("<2d", 1.5, -2.0)
    assert pb.Report.DESCRIPTOR.fields_by_name["grad_coords"].type == pb.Report.DESCRIPTOR.fields_by_name["grad_coords"].TYPE_BYTES


def _full_report(d=3, n=2) -> Report:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return Report(
        step=7, basis_version=5, grad_coords=rnd(d), grad_sqnorm=4.25, source_coords=rnd(d), source_sqnorm=3.5,
        residual_sqnorm=0.75, prev_step_coords=rnd(d), residual_step_dot=-0.125, worker_grad_coords=rnd(n, d),
        hyper={"forgetting": 0.05, "replace_every": 10, "noise_damping": True, "step_scale": 0.5},
    )


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b and type(a) is type(b)


def test_report_round_trip_keeps_every_field_and_type():
    for report in (_full_report(), Report(step=1, basis_version=0, grad_coords=torch.zeros(4), grad_sqnorm=0.0)):
        back = convert.report_from_proto(pb.Report.FromString(convert.report_to_proto(report).SerializeToString()))
        for f in fields(Report):
            a, b = getattr(report, f.name), getattr(back, f.name)
            if isinstance(a, torch.Tensor):
                a = a.to(torch.float64)
            if f.name == "hyper":
                assert a == b and all(type(a[k]) is type(b[k]) for k in a), (a, b)
            else:
                assert _equal(a, b), (f.name, a, b)


def test_update_round_trip_keeps_every_field_and_diagnostics():
    d = 3
    update = DirectionUpdate(
        step=4, base_version=2, new_version=3, step_coef=torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64),
        rotation=torch.eye(d, dtype=torch.float64).flip(0), residual_coef=torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64),
        complement_keep=0.25, reorthonormalize=True,
        diagnostics={
            "step": 4, "basis_version": 3, "eigenvalues": [-1.0, 0.5, 2.0], "negative_curvature": 1,
            "rotation_angle_deg": 1.5, "subspace_step_norm": 0.3, "regression_residual": float("nan"),
            "noise_ratio": 0.2, "eigh_fallbacks": 2, "alive_directions": 3, "used_eigh_fallback": True,
            "something_new": 4.5,
        },
    )
    back = convert.update_from_proto(pb.DirectionUpdate.FromString(convert.update_to_proto(update).SerializeToString()))
    for f in fields(DirectionUpdate):
        if f.name != "diagnostics":
            assert _equal(getattr(update, f.name), getattr(back, f.name)), f.name
    assert set(back.diagnostics) == set(update.diagnostics)
    for k, v in update.diagnostics.items():
        assert _equal(v, back.diagnostics[k]), k
    bare = DirectionUpdate(step=1, base_version=0, new_version=0, step_coef=torch.zeros(2, dtype=torch.float64))
    back = convert.update_from_proto(convert.update_to_proto(bare))
    assert back.rotation is None and back.residual_coef is None


def test_wire_format_errors_are_typed():
    bad = pb.Report(grad_coords=b"\x00" * 12)
    with pytest.raises(MalformedMessageError, match="whole number"):
        convert.report_from_proto(bad)
    bad = pb.Report(grad_coords=b"\x00" * 16, worker_grad_coords=b"\x00" * 24, num_workers=2)
    with pytest.raises(MalformedMessageError, match="shape"):
        convert.report_from_proto(bad)
    bad = pb.Report(grad_coords=b"\x00" * 16, worker_grad_coords=b"\x00" * 16)
    with pytest.raises(MalformedMessageError, match="num_workers"):
        convert.report_from_proto(bad)
    bad = pb.Report(grad_coords=b"\x00" * 16)
    bad.hyper["replace_every"] = 2.5
    with pytest.raises(MalformedMessageError, match="integer"):
        convert.report_from_proto(bad)
    with pytest.raises(MalformedMessageError, match="job name"):
        convert.job_name("../etc")


def test_core_and_dataflow_stay_free_of_transport_packages():
    code = (
        "import sys, osfn_dist, osfn_dist.dataflow.distributed, osfn_dist.dataflow.exchange, "
        "osfn_dist.metrics.table, osfn_dist.metrics.grafana, osfn_dist.service;"
        "bad = [m for m in ('grpc', 'ray', 'prometheus_client', 'google.protobuf') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
