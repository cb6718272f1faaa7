"""Generated malformed messages (hypothesis): > 1,000 over gRPC and more straight into the
service. Each must be rejected with INVALID_ARGUMENT (a typed error in-process), the server
must keep serving, and no curvature state may change."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

grpc = pytest.importorskip("grpc")

from osfn_dist import OSFNConfig  # noqa: E402
from osfn_dist.core.errors import ConfigError, DimensionMismatchError, InvalidReportError, VersionMismatchError  # noqa: E402
from osfn_dist.dataflow.messages import LIVE_HYPERPARAMETERS, Report  # noqa: E402
from osfn_dist.dataflow.curvature import CurvatureService  # noqa: E402
from osfn_dist.service.client import GrpcExchange  # noqa: E402
from osfn_dist.service.convert import _typed_hyper, report_to_proto, tensor_to_bytes  # noqa: E402
from osfn_dist.service.errors import MalformedMessageError  # noqa: E402
from osfn_dist.service.server import CurvatureServer  # noqa: E402
from osfn_dist.service.v1 import curvature_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(180)]
TOKEN = "fuzz-token"
D = 4
MAX_BYTES = 16 * 1024
SENT = {"random": 0, "structured": 0, "service": 0}
def fuzz(n: int) -> settings:
    return settings(
        max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True,
    )


def _coords(step: int) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(step), dtype=torch.float64)


def _valid_report(step: int, version: int) -> Report:
    y = _coords(step)
    hyper = {k: getattr(OSFNConfig(), k) for k in LIVE_HYPERPARAMETERS if hasattr(OSFNConfig(), k)}
    hyper["step_scale"] = 1.0
    return Report(step=step, basis_version=version, grad_coords=y, grad_sqnorm=float(y @ y) * 2, hyper=hyper)


@pytest.fixture(scope="module")
def served():
    srv = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, max_message_bytes=MAX_BYTES)
    srv.start()
    ex = GrpcExchange(f"127.0.0.1:{srv.port}", token=TOKEN)
    version = 0
    for step in range(1, 16):  # mature statistics, a moved basis
        version = ex.exchange(_valid_report(step, version)).new_version
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=[("grpc.max_send_message_length", 1 << 24)])
    call = channel.unary_unary("/osfn.v1.CurvatureService/Exchange")
    yield srv, call, version
    channel.close()
    srv.stop(grace=0)


def _snapshot(srv) -> dict:
    return {n: srv.registry.get(n).service.state_dict() for n in srv.registry.names()}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _send(call, data: bytes) -> grpc.StatusCode:
    try:
        call(data, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ---------------------------------------------------------------- strategies
BAD_FLOATS = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.floats(max_value=-1e-9, allow_nan=False))


def _invalid_hyper(key: str, value: float) -> bool:
    try:
        typed = _typed_hyper(key, value)
    except MalformedMessageError:
        return True
    if key == "step_scale":
        return not (math.isfinite(typed) and typed >= 0)
    try:
        OSFNConfig(**{key: typed})
    except (ConfigError, TypeError):
        return True
    return False


def _bytes_of(values) -> bytes:
    return tensor_to_bytes(torch.tensor(values, dtype=torch.float64)) if values else b""


@st.composite
def malformed_requests(draw, version: int):
    """A valid request for job 'default' with exactly one thing broken."""
    step = 100
    msg = pb.ExchangeRequest(job="default", report=report_to_proto(_valid_report(step, version)))
    r = msg.report
    kind = draw(st.sampled_from([
        "coords_length", "coords_nonfinite", "version", "sqnorm", "residual_dot", "residual_sqnorm", "source",
        "workers_shape", "workers_count", "workers_nonfinite", "hyper_unknown", "hyper_value", "job", "oversize",
        "no_report", "prev_step", "overflow", "trailing_garbage",
    ]))
    finite = st.floats(-1e6, 1e6, allow_nan=False)
    if kind == "coords_length":
        n = draw(st.integers(0, 40).filter(lambda n: n != D * 8))
        r.grad_coords = draw(st.binary(min_size=n, max_size=n))
    elif kind == "coords_nonfinite":
        vals = draw(st.lists(finite, min_size=D, max_size=D))
        vals[draw(st.integers(0, D - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        r.grad_coords = _bytes_of(vals)
    elif kind == "version":
        r.basis_version = draw(st.integers(-(2**63), 2**63 - 1).filter(lambda v: v != version))
    elif kind == "sqnorm":
        r.grad_sqnorm = draw(BAD_FLOATS)
    elif kind == "residual_dot":
        r.residual_step_dot = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif kind == "residual_sqnorm":
        r.residual_sqnorm = draw(BAD_FLOATS)
    elif kind == "source":
        which = draw(st.sampled_from(["length", "nan", "no_sqnorm", "bad_sqnorm"]))
        r.source_coords = _bytes_of(draw(st.lists(finite, min_size=D, max_size=D)))
        r.source_sqnorm = 1.0
        if which == "length":
            r.source_coords = _bytes_of(draw(st.lists(finite, max_size=9).filter(lambda v: len(v) != D)))
        elif which == "nan":
            r.source_coords = _bytes_of([math.nan] * D)
        elif which == "no_sqnorm":
            r.ClearField("source_sqnorm")
        else:
            r.source_sqnorm = draw(BAD_FLOATS)
    elif kind == "workers_shape":
        n = draw(st.integers(1, 6))
        width = draw(st.integers(1, 8).filter(lambda w: w != D))
        r.num_workers = n
        r.worker_grad_coords = _bytes_of([0.5] * (n * width))
    elif kind == "workers_count":
        r.worker_grad_coords = _bytes_of([0.5] * (2 * D))
        r.num_workers = draw(st.sampled_from([0, 1, 3, 70000]))
    elif kind == "workers_nonfinite":
        r.num_workers = 2
        vals = [0.1] * (2 * D)
        vals[draw(st.integers(0, 2 * D - 1))] = draw(st.sampled_from([math.nan, math.inf]))
        r.worker_grad_coords = _bytes_of(vals)
    elif kind == "hyper_unknown":
        key = draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in LIVE_HYPERPARAMETERS))
        r.hyper[key] = draw(finite)
    elif kind == "hyper_value":
        key = draw(st.sampled_from([k for k in LIVE_HYPERPARAMETERS if k in r.hyper]))
        value = draw(BAD_FLOATS)
        assume(_invalid_hyper(key, value))
        r.hyper[key] = value
    elif kind == "job":
        msg.job = draw(st.one_of(
            st.text(min_size=1, max_size=20).filter(lambda j: not all(c.isascii() and (c.isalnum() or c in "_.-") for c in j)),
            st.text(alphabet="abc", min_size=65, max_size=80),
        ))
    elif kind == "oversize":
        n = draw(st.integers(MAX_BYTES // (8 * D) + 1, MAX_BYTES // (4 * D)))
        r.num_workers = n
        r.worker_grad_coords = b"\x00" * (8 * D * n)
    elif kind == "no_report":
        msg.ClearField("report")
    elif kind == "prev_step":
        vals = draw(st.lists(finite, min_size=0, max_size=9))
        if len(vals) == D:
            vals[0] = math.nan
        r.prev_step_coords = _bytes_of(vals)
    elif kind == "overflow":  # finite values that overflow the statistics
        big = draw(st.floats(1e160, 1e300))
        r.grad_coords = _bytes_of([big] * D)
        r.grad_sqnorm = draw(st.floats(1e300, 1.7e308))
    elif kind == "trailing_garbage":
        return kind, msg.SerializeToString() + draw(st.binary(min_size=1, max_size=8).filter(lambda b: b[0] & 7 > 5 or b[0] < 8))
    return kind, msg.SerializeToString()


# ----------------------------------------------------------------------- tests
def test_random_bytes_are_invalid_argument_and_change_nothing(served):
    srv, call, _ = served
    before, jobs = _snapshot(srv), srv.registry.names()

    @fuzz(400)
    @given(st.binary(max_size=300))
    def check(data):
        SENT["random"] += 1
        assert _send(call, data) == grpc.StatusCode.INVALID_ARGUMENT

    check()
    assert srv.registry.names() == jobs
    assert _same(before, _snapshot(srv))
    assert SENT["random"] >= 400


def test_structured_malformed_reports_are_invalid_argument_and_change_nothing(served):
    srv, call, version = served
    before, jobs = _snapshot(srv), srv.registry.names()
    kinds = set()

    @fuzz(700)
    @given(st.data())
    def check(data):
        kind, body = data.draw(malformed_requests(version))
        SENT["structured"] += 1
        kinds.add(kind)
        code = _send(call, body)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (kind, code)

    check()
    assert srv.registry.names() == jobs
    assert _same(before, _snapshot(srv))
    assert SENT["structured"] >= 600 and len(kinds) >= 15, (SENT, kinds)
    # ... and the server still serves a valid report
    ex = GrpcExchange(f"127.0.0.1:{srv.port}", token=TOKEN)
    state = ex.get_state()
    assert ex.exchange(_valid_report(state["step"] + 1, state["basis_version"])).step == state["step"] + 1
    assert SENT["random"] + SENT["structured"] >= 1000 or SENT["random"] == 0


# Straight into the plain service (no server and no restore net): the service itself must
# validate before it mutates.
@st.composite
def malformed_reports(draw, version: int):
    base = _valid_report(100, version)
    kind = draw(st.sampled_from(["dim", "nan", "sqnorm", "version", "hyper_value", "hyper_unknown", "workers", "source"]))
    if kind == "dim":
        n = draw(st.integers(0, 9).filter(lambda n: n != D))
        base.grad_coords = torch.ones(n, dtype=torch.float64)
    elif kind == "nan":
        base.grad_coords = base.grad_coords.clone()
        base.grad_coords[draw(st.integers(0, D - 1))] = draw(st.sampled_from([math.nan, math.inf]))
    elif kind == "sqnorm":
        base.grad_sqnorm = draw(BAD_FLOATS)
    elif kind == "version":
        base.basis_version = draw(st.integers(-(10**6), 10**6).filter(lambda v: v != version))
    elif kind == "hyper_value":
        key = draw(st.sampled_from(list(base.hyper)))
        value = draw(BAD_FLOATS)
        assume(_invalid_hyper(key, value))
        base.hyper[key] = _typed_hyper_or_raw(key, value)
    elif kind == "hyper_unknown":
        base.hyper[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in LIVE_HYPERPARAMETERS))] = 1.0
    elif kind == "workers":
        base.worker_grad_coords = torch.ones(
            draw(st.integers(1, 4)), draw(st.integers(0, 8).filter(lambda w: w != D)), dtype=torch.float64
        )
    else:
        base.source_coords = torch.ones(D, dtype=torch.float64)
        base.source_sqnorm = draw(st.one_of(st.none(), BAD_FLOATS))
    return base


def _typed_hyper_or_raw(key, value):
    try:
        return _typed_hyper(key, value)
    except MalformedMessageError:
        return value


def test_the_plain_service_rejects_malformed_reports_before_mutating():
    service = CurvatureService(OSFNConfig(subspace_dim=D))
    version = 0
    for step in range(1, 12):
        version = service.exchange(_valid_report(step, version)).new_version
    before = service.state_dict()

    @fuzz(300)
    @given(malformed_reports(version))
    def check(report):
        SENT["service"] += 1
        with pytest.raises((DimensionMismatchError, InvalidReportError, VersionMismatchError, ConfigError)):
            service.exchange(report)

    check()
    assert _same(before, service.state_dict())


def test_live_hyperparameters_are_checked_on_every_change_not_just_once():
    """The service skips re-validating the live hyperparameters when they repeat the last
    accepted ones; a changed, invalid value must still be refused (and a valid change taken)."""
    import dataclasses

    service = CurvatureService(OSFNConfig(subspace_dim=D))
    good = {"forgetting": 0.05, "newton_lr": 0.5, "noise_damping": True, "step_scale": 1.0}
    version = 0
    for step in (1, 2):
        version = service.exchange(dataclasses.replace(_valid_report(step, version), hyper=dict(good))).new_version
    for bad in ({**good, "forgetting": -1.0}, {**good, "noise_damping": 1}, {**good, "step_scale": float("nan")}):
        before = service.state_dict()
        with pytest.raises(ConfigError):
            service.exchange(dataclasses.replace(_valid_report(3, version), hyper=bad))
        assert _same(before, service.state_dict())
    changed = {**good, "newton_lr": 0.25}
    assert service.exchange(dataclasses.replace(_valid_report(3, version), hyper=changed)).step == 3
