"""The gRPC curvature server: parity with the in-process path, auth, TLS, typed rejections,
idempotent retries, state snapshots, 64 concurrent clients."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest
import torch

grpc = pytest.importorskip("grpc")

from osfn_dist import OSFN, OSFNConfig  # noqa: E402
from osfn_dist.core.errors import (  # noqa: E402
    ConfigError, CurvatureServiceUnavailable, DimensionMismatchError, InvalidReportError, VersionMismatchError,
)
from osfn_dist.dataflow.messages import Report  # noqa: E402
from osfn_dist.dataflow.curvature import CurvatureService  # noqa: E402
from osfn_dist.service import torchrun_demo as demo  # noqa: E402
from osfn_dist.service.client import CurvatureClient, GrpcExchange  # noqa: E402
from osfn_dist.service.convert import report_to_proto  # noqa: E402
from osfn_dist.service.errors import (  # noqa: E402
    CurvatureServiceUnauthenticated, MalformedMessageError, ReportOrderError,
)
from osfn_dist.service.health import health_pb2, health_pb2_grpc  # noqa: E402
from osfn_dist.service.server import CurvatureServer  # noqa: E402
from osfn_dist.service.v1 import curvature_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(120)]
TOKEN = "test-token-7f3a"
D = 4


@pytest.fixture
def server():
    srv = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN)
    srv.start()
    yield srv
    srv.stop(grace=0)


def client(srv, **kw) -> GrpcExchange:
    kw.setdefault("token", TOKEN)
    return GrpcExchange(f"127.0.0.1:{srv.port}", **kw)


def report(step: int, version: int, seed: int = 0, d: int = D, **kw) -> Report:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    y = torch.randn(d, generator=g, dtype=torch.float64)
    return Report(step=step, basis_version=version, grad_coords=y, grad_sqnorm=float(y @ y) * 3.0, **kw)


def run_demo(exchange, steps=25):
    model = demo.make_model()
    opt = OSFN(model.parameters(), lr=demo.LR, exchange=exchange, **demo.OPTIMIZER)
    demo.train(model, opt, demo.make_batches(steps))
    return demo.flat_params(model), opt


# ------------------------------------------------------------------ parity
def test_grpc_backend_gives_bitwise_the_in_process_trajectory(server):
    remote, opt_remote = run_demo(client(server, job="parity"))
    local, opt_local = run_demo(None)
    assert torch.equal(remote, local)
    assert (remote - demo.flat_params(demo.make_model())).norm() > 0.1  # it trained
    assert opt_remote.diagnostics["eigenvalues"] == opt_local.diagnostics["eigenvalues"]
    state = client(server).get_state("parity")
    assert state["step"] == 25 and state["exchanges"] == 25
    assert state["eigenvalues"] == opt_local.diagnostics["eigenvalues"]


# -------------------------------------------------------------------- auth
@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated_and_the_server_keeps_serving(server, token, monkeypatch):
    monkeypatch.delenv("OSFN_TOKEN", raising=False)
    bad = GrpcExchange(f"127.0.0.1:{server.port}", token=token)
    with pytest.raises(CurvatureServiceUnauthenticated, match="missing bearer token" if token is None else "wrong"):
        bad.exchange(report(1, 0))
    with pytest.raises(CurvatureServiceUnauthenticated):
        bad.get_state()
    with pytest.raises(CurvatureServiceUnauthenticated):
        next(iter(bad.watch_state()))
    assert server.registry.names() == []  # nothing was created
    assert client(server).exchange(report(1, 0)).step == 1


def test_health_service_needs_no_token(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "osfn.v1.CurvatureService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_token_is_read_from_file_or_environment(server, tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert GrpcExchange(f"127.0.0.1:{server.port}", token_file=str(path)).exchange(report(1, 0)).step == 1
    monkeypatch.setenv("OSFN_TOKEN", TOKEN)
    assert GrpcExchange(f"127.0.0.1:{server.port}").get_state()["step"] == 1


def test_without_a_token_only_loopback_may_be_bound():
    with pytest.raises(ConfigError, match="without a token"):
        CurvatureServer(OSFNConfig(subspace_dim=D), host="0.0.0.0", port=0)
    open_srv = CurvatureServer(OSFNConfig(subspace_dim=D), host="127.0.0.1", port=0)
    open_srv.start()
    try:
        assert GrpcExchange(f"127.0.0.1:{open_srv.port}").exchange(report(1, 0)).step == 1
    finally:
        open_srv.stop(grace=0)
    with_token = CurvatureServer(OSFNConfig(subspace_dim=D), host="0.0.0.0", port=0, token=TOKEN)
    with_token.start()
    with_token.stop(grace=0)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    srv = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, tls_cert=str(cert), tls_key=str(key))
    srv.start()
    try:
        secure = GrpcExchange(f"localhost:{srv.port}", token=TOKEN, tls_ca=str(cert))
        assert secure.exchange(report(1, 0)).step == 1
        plain = GrpcExchange(f"localhost:{srv.port}", token=TOKEN, retries=1, backoff=0.01, timeout=2)
        with pytest.raises(CurvatureServiceUnavailable):
            plain.exchange(report(2, secure.get_state()["basis_version"]))
    finally:
        srv.stop(grace=0)


# ----------------------------------------------------------- rejections
def test_mismatched_messages_raise_typed_errors_and_leave_state_unchanged(server):
    ex = client(server)
    ex.exchange(report(1, 0))
    before = server.registry.get("default").service.state_dict()
    version = before["scalars"]["version"]
    with pytest.raises(DimensionMismatchError, match="subspace has d=4"):
        ex.exchange(report(2, version, d=3))
    with pytest.raises(VersionMismatchError, match="basis version"):
        ex.exchange(report(2, version + 5))
    with pytest.raises(ConfigError, match="forgetting"):
        ex.exchange(report(2, version, hyper={"forgetting": -1.0}))
    with pytest.raises(ConfigError, match="runs subspace_rule='oja' but the trainer is configured with subspace_rule='replace'"):
        ex.exchange(report(2, version, settings={"subspace_rule": "replace"}))
    with pytest.raises(ConfigError, match="unknown settings"):
        ex.exchange(report(2, version, settings={"lr_schedule": "cosine"}))
    with pytest.raises(InvalidReportError, match="unknown hyperparameters in report"):  # its own type over gRPC
        ex.exchange(report(2, version, hyper={"lr_warp": 1.0}))
    with pytest.raises(InvalidReportError, match="non-finite"):
        ex.exchange(Report(step=2, basis_version=version, grad_coords=torch.full((D,), float("inf")), grad_sqnorm=1.0))
    with pytest.raises(InvalidReportError, match="overflow"):  # finite, but overflows the statistics
        ex.exchange(Report(step=2, basis_version=version, grad_coords=torch.full((D,), 1e200, dtype=torch.float64), grad_sqnorm=1e300))
    after = server.registry.get("default").service.state_dict()
    assert_same_state(before, after)
    assert ex.exchange(report(2, version)).step == 2


def test_a_trainer_with_other_fixed_settings_is_refused_before_anything_moves(server):
    """The server's config decides subspace_rule/eigen_method; a trainer configured otherwise
    must hear so on its first step, not silently train with the server's method."""
    model = demo.make_model()
    before = demo.flat_params(model)
    opt = OSFN(model.parameters(), lr=demo.LR, exchange=client(server, job="mismatch"),
               **{**demo.OPTIMIZER, "eigen_method": "eigh"})
    with pytest.raises(ConfigError, match="eigen_method='qr' but the trainer is configured with eigen_method='eigh'"):
        demo.train(model, opt, demo.make_batches(1))
    assert torch.equal(demo.flat_params(model), before)
    assert all(b["state"] == {} for b in opt.state_dict()["bases"])  # the base did not advance either
    run_demo(client(server, job="match"), steps=2)  # the server's own settings are accepted


def assert_same_state(a: dict, b: dict) -> None:
    assert a["scalars"] == b["scalars"]
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    for k, v in a["stats"].items():
        assert torch.equal(v, b["stats"][k]) if isinstance(v, torch.Tensor) else v == b["stats"][k], k


def test_oversized_messages_are_invalid_argument():
    srv = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, max_message_bytes=4096)
    srv.start()
    try:
        big = report(1, 0, worker_grad_coords=torch.zeros(200, D, dtype=torch.float64))  # 6.4 kB
        with pytest.raises(MalformedMessageError, match="exceeds the server's limit"):
            client(srv).exchange(big)
        huge = report(1, 0, worker_grad_coords=torch.zeros(20000, D, dtype=torch.float64))  # past the transport cap
        with pytest.raises(Exception) as err:
            client(srv).exchange(huge)
        assert "RESOURCE_EXHAUSTED" in str(err.value)
        assert client(srv).exchange(report(1, 0)).step == 1
    finally:
        srv.stop(grace=0)


def test_unreachable_server_raises_a_clear_unavailable_error():
    ex = GrpcExchange("127.0.0.1:1", token=TOKEN, retries=2, backoff=0.01, timeout=1)
    start = time.monotonic()
    with pytest.raises(CurvatureServiceUnavailable, match=r"127\.0\.0\.1:1 did not answer Exchange after 3 attempt"):
        ex.exchange(report(1, 0))
    assert time.monotonic() - start < 10


# ------------------------------------------------------------ semantics
def test_a_retried_report_gets_the_cached_update_and_does_not_step_twice(server):
    ex = client(server)
    first = ex.exchange(report(1, 0))
    again = ex.exchange(report(1, 0))
    assert torch.equal(first.step_coef, again.step_coef) and again.new_version == first.new_version
    state = ex.get_state()
    assert state["step"] == 1 and state["exchanges"] == 1
    # same step, different content: not a retry, and not a new step either (exactly once per step)
    with pytest.raises(ReportOrderError, match="already took step 1"):
        ex.exchange(report(1, 0, seed=9))
    assert ex.get_state()["exchanges"] == 1


def test_state_list_and_watch(server):
    ex = client(server, job="watched")
    version = 0
    for step in range(1, 4):
        version = ex.exchange(report(step, version)).new_version
    assert client(server).list_jobs() == ["watched"]
    with pytest.raises(LookupError, match="no curvature model"):
        client(server).get_state("absent")
    watcher = client(server, job="watched")
    seen = []

    def watch():
        for state in watcher.watch_state():
            seen.append(state["step"])
            if state["step"] >= 5:
                break

    t = threading.Thread(target=watch)
    t.start()
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    for step in range(4, 6):
        version = ex.exchange(report(step, version)).new_version
    t.join(10)
    assert not t.is_alive()
    assert seen[0] == 3 and seen[-1] == 5 and seen == sorted(seen)


def test_state_file_restores_jobs_and_their_cached_reply(tmp_path):
    path = str(tmp_path / "state.pt")
    srv = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=path)
    srv.start()
    ex = client(srv, job="persisted")
    version = 0
    for step in range(1, 6):
        last = ex.exchange(report(step, version))
        version = last.new_version
    sd = srv.registry.get("persisted").service.state_dict()
    srv.stop(grace=0)
    revived = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=path)
    assert revived.restored_jobs == 1
    revived.start()
    try:
        assert_same_state(sd, revived.registry.get("persisted").service.state_dict())
        ex = client(revived, job="persisted")
        replay = ex.exchange(report(5, last.base_version))  # the reply lost in the restart
        assert torch.equal(replay.step_coef, last.step_coef)
        assert ex.exchange(report(6, version)).step == 6
    finally:
        revived.stop(grace=0)


def test_a_restart_without_state_file_is_reported_as_a_version_mismatch():
    srv = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN)
    port = srv.start()
    ex = client(srv)
    version = 0
    for step in range(1, 4):
        version = ex.exchange(report(step, version)).new_version
    srv.stop(grace=0)
    fresh = CurvatureServer(OSFNConfig(subspace_dim=D), port=port, token=TOKEN)
    fresh.start()
    try:
        assert version > 0
        with pytest.raises(VersionMismatchError, match="out of sync"):
            ex.exchange(report(4, version))
    finally:
        fresh.stop(grace=0)


# ----------------------------------------------------------- concurrency
def test_64_concurrent_clients_are_each_served_correctly(server):
    """64 clients, each its own channel and job, exchange concurrently; every reply equals
    what a private in-process service computes for the same reports."""
    n_clients, steps = 64, 5
    results: dict[int, list] = {}
    errors = []
    barrier = threading.Barrier(n_clients)

    def worker(i: int):
        try:
            ex = client(server, job=f"c{i}")
            barrier.wait(timeout=30)
            version, out = 0, []
            for step in range(1, steps + 1):
                upd = ex.exchange(report(step, version, seed=i))
                version = upd.new_version
                out.append(upd)
            results[i] = out
            ex.close()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(results) == n_clients
    for i in (0, 17, 63):  # spot-check against private in-process services
        ref, version = CurvatureService(OSFNConfig(subspace_dim=D)), 0
        for step, got in enumerate(results[i], 1):
            want = ref.exchange(report(step, version, seed=i))
            version = want.new_version
            assert torch.equal(got.step_coef, want.step_coef) and got.new_version == want.new_version
    assert len(server.registry.names()) == n_clients
    assert all(server.registry.get(f"c{i}").service.step == steps for i in range(n_clients))


def test_raw_request_bytes_are_accepted_like_stub_requests(server):
    """The server decodes requests itself; a request built by hand with the generated
    message classes is served like one from GrpcExchange."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary("/osfn.v1.CurvatureService/Exchange")
        req = pb.ExchangeRequest(job="raw", report=report_to_proto(report(1, 0)))
        reply = pb.DirectionUpdate.FromString(
            call(req.SerializeToString(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
        )
    assert reply.step == 1


def test_torchrun_demo_against_a_server_of_another_subspace_dim_is_one_sentence(tmp_path, capsys):
    """docs/service.md's example against a server started without --subspace-dim 4: the demo
    says what to do instead of a DimensionMismatchError traceback."""
    srv = CurvatureServer(OSFNConfig(subspace_dim=8), port=0, token=TOKEN)
    srv.start()
    try:
        token = tmp_path / "token.txt"
        token.write_text(TOKEN)
        rc = demo.main(["--address", f"127.0.0.1:{srv.port}", "--token-file", str(token), "--steps", "3"])
    finally:
        srv.stop(grace=0)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "DimensionMismatchError" in err and "--subspace-dim 4" in err
