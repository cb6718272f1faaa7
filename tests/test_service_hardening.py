"""Issue 12: the curvature server under adversarial use. Health streams cannot starve it,
exchanges are exactly-once per (job, step), the state file is checked at start-up, saved per
job, rolled back when a write fails, checksummed, locked and cleaned up; odd job names,
overflowing reports and whitespace around tokens are handled. Real servers on loopback."""
from __future__ import annotations

import os
import resource
import signal
import threading
import time

import pytest
import torch

grpc = pytest.importorskip("grpc")

from osfn_dist import OSFNConfig  # noqa: E402
from osfn_dist.core.errors import CurvatureServiceUnavailable, InvalidReportError  # noqa: E402
from osfn_dist.dataflow.messages import Report  # noqa: E402
from osfn_dist.service.auth import read_token  # noqa: E402
from osfn_dist.service.client import GrpcExchange  # noqa: E402
from osfn_dist.service.convert import job_name  # noqa: E402
from osfn_dist.service.errors import (  # noqa: E402
    CurvatureServiceUnauthenticated, MalformedMessageError, ReportOrderError, StateFileError,
)
from osfn_dist.service.health import health_pb2, health_pb2_grpc  # noqa: E402
from osfn_dist.service.server import CurvatureServer  # noqa: E402
from osfn_dist.service.v1 import curvature_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(120)]
TOKEN = "hardening-token"
D = 4


def make_server(**kw) -> CurvatureServer:
    kw.setdefault("token", TOKEN)
    srv = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, **kw)
    srv.start()
    return srv


@pytest.fixture
def server():
    srv = make_server()
    yield srv
    srv.stop(grace=0)


def client(srv, **kw) -> GrpcExchange:
    kw.setdefault("token", TOKEN)
    return GrpcExchange(f"127.0.0.1:{srv.port}", **kw)


def report(step: int, version: int, seed: int = 0, **kw) -> Report:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    y = torch.randn(D, generator=g, dtype=torch.float64)
    return Report(step=step, basis_version=version, grad_coords=y, grad_sqnorm=float(y @ y) * 3.0, **kw)


def run(ex: GrpcExchange, steps, version: int = 0, seed: int = 0) -> int:
    for step in steps:
        version = ex.exchange(report(step, version, seed)).new_version
    return version


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


def job_state(srv, name="default") -> dict:
    return srv.registry.get(name).state_dict()


# ------------------------------------------------- 1. health cannot starve the service
def test_open_health_watch_streams_cannot_starve_the_service(server):
    """64 unauthenticated Health/Watch streams used to take all 64 handler threads, so
    Exchange, ListJobs and Health/Check hit DEADLINE_EXCEEDED."""
    channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(8)]
    streams = [
        health_pb2_grpc.HealthStub(channels[i % 8]).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        for i in range(64)
    ]
    try:
        accepted, refused = 0, 0
        for s in streams:
            try:
                assert next(s).status == health_pb2.HealthCheckResponse.SERVING
                accepted += 1
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "Health/Check" in exc.details()
                refused += 1
        assert 1 <= accepted <= server.max_health_watchers and accepted + refused == 64
        # every other call is served while the accepted streams stay open
        check = health_pb2_grpc.HealthStub(channels[0]).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        ex = client(server, timeout=5, retries=0)
        assert ex.exchange(report(1, 0)).step == 1
        assert ex.list_jobs() == ["default"]
    finally:
        for s in streams:
            s.cancel()
        for c in channels:
            c.close()


# ------------------------------------------ 2. state file: start-up check and rollback
def test_a_state_file_in_a_missing_directory_is_refused_at_start_up(tmp_path):
    with pytest.raises(StateFileError, match="does not exist"):
        CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=str(tmp_path / "nope" / "s.pt"))


def test_a_failed_state_file_write_rolls_the_exchange_back(tmp_path):
    """A write the kernel refuses (here: the file-size limit, EFBIG) must not leave the model
    stepped: the client hears UNAVAILABLE, nothing changed, and its retry steps once."""
    path = tmp_path / "state.pt"
    srv = make_server(state_file=str(path))
    try:
        ex = client(srv, retries=0)
        version = run(ex, range(1, 4))
        before = job_state(srv)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        size = os.path.getsize(path)
        try:
            # nothing can be written; then only a part of the next record fits (it must be cut off again)
            for limit in (size // 2, size + 16):
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
                with pytest.raises(CurvatureServiceUnavailable, match="rolled back"):
                    ex.exchange(report(4, version))
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
                assert os.path.getsize(path) == size
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)
        assert same(before, job_state(srv))  # bit-identical, including the cached reply
        assert ex.exchange(report(4, version)).step == 4  # the retry steps exactly once
        assert srv.registry.get("default").service.step == 4
        live = job_state(srv)
    finally:
        srv.stop(grace=0)
    revived = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=str(path))
    try:
        assert same(live, job_state(revived))  # the cut-off write left a clean file behind
    finally:
        revived.stop()


# ------------------------------------------------------ 5. exactly once per (job, step)
def test_each_step_is_taken_exactly_once(server):
    ex = client(server)
    version = run(ex, range(1, 4))
    before = job_state(server)
    cached = server.registry.get("default").last_reply
    # the identical last report: the cached reply, no step
    last = report(3, before["last_key"][1])
    assert pb.DirectionUpdate.FromString(cached).step == 3
    assert ex.exchange(last).step == 3
    # a different report for the same step and version, an older step, absurd steps: refused
    with pytest.raises(ReportOrderError, match="already took step 3"):
        ex.exchange(report(3, before["last_key"][1], seed=7))
    for step in (2, 1, 0, -1, -(2**63), 2**63 - 1, 2**53 + 1):
        with pytest.raises(ReportOrderError):
            ex.exchange(report(step, version))
    assert same(before, job_state(server))
    # a later step (gaps are fine: curvature_every > 1 skips step numbers) is taken once
    assert ex.exchange(report(5, version)).step == 4
    with pytest.raises(ReportOrderError, match="out of order"):
        ex.exchange(report(4, version))  # the late original of a step the job went past
    assert server.registry.get("default").service.step == 4
    # a fresh job is not created by an out-of-range first step
    with pytest.raises(ReportOrderError):
        client(server, job="fresh").exchange(report(-5, 0))
    assert "fresh" not in server.registry.names()


# ---------------------------------------------------- 3. persistence cost per exchange
def _written_bytes() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("wchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
def test_an_exchange_writes_its_own_job_not_every_job(tmp_path):
    """Bytes written for one exchange must not grow with the number of jobs (it used to
    rewrite the whole file: 128 jobs = 128 × the bytes)."""
    srv = make_server(state_file=str(tmp_path / "state.pt"))
    try:
        versions = {}
        solo = client(srv, job="solo")
        versions["solo"] = run(solo, range(1, 3))
        start = _written_bytes()
        versions["solo"] = run(solo, [3], versions["solo"])
        one_job = _written_bytes() - start
        for i in range(127):
            versions[f"j{i}"] = run(client(srv, job=f"j{i}"), range(1, 3), seed=i)
        start = _written_bytes()
        run(solo, [4], versions["solo"])
        many_jobs = _written_bytes() - start
        assert one_job > 0 and many_jobs < 3 * one_job, (one_job, many_jobs)
    finally:
        srv.stop(grace=0)


# ------------------------------------------------------- 4. WatchState and cancellation
def test_a_cancelled_watch_frees_its_slot_at_once():
    srv = make_server(max_workers=4)  # two WatchState slots
    try:
        run(client(srv), range(1, 3))
        watchers = [client(srv).watch_state(min_interval_s=3600) for _ in range(srv.max_watchers)]
        for w in watchers:
            assert next(w)["step"] == 2
        time.sleep(0.2)  # let the server side reach its interval wait (where it used to keep its slot)
        for w in watchers:
            w.close()  # cancels the stream; the server sat in a 3600 s wait before
        deadline = time.monotonic() + 15
        while True:
            fresh = client(srv).watch_state(min_interval_s=3600)
            try:
                assert next(fresh)["step"] == 2
                break
            except Exception as exc:  # RESOURCE_EXHAUSTED while the old streams hold their slots
                assert "too many WatchState streams" in str(exc), exc
                assert time.monotonic() < deadline, "the cancelled watch streams kept their slots"
                time.sleep(0.05)
            finally:
                fresh.close()
        assert client(srv).get_state()["step"] == 2
    finally:
        srv.stop(grace=0)


# --------------------------------------------------------------------- 6. job names
@pytest.mark.parametrize("bad", ["job\n", "a\nb", "x" * 64 + "\n"])
def test_job_names_with_a_newline_are_refused(server, bad):
    with pytest.raises(MalformedMessageError, match="is invalid"):
        job_name(bad)
    with pytest.raises(MalformedMessageError, match="is invalid"):
        client(server, job=bad).exchange(report(1, 0))
    assert server.registry.names() == []


# ------------------------------------------------------- 8. huge but finite reports
@pytest.mark.parametrize("field", ["prev_step_coords", "drift_coords", "grad_sqnorm", "residual_step_dot"])
def test_huge_finite_values_are_an_invalid_report(server, field):
    ex = client(server)
    version = run(ex, range(1, 12))
    before = job_state(server)
    value = torch.full((D,), 1e308, dtype=torch.float64) if field.endswith("coords") else 1e308
    bad = report(12, version)
    setattr(bad, field, value)
    with pytest.raises(InvalidReportError, match="overflow"):
        ex.exchange(bad)
    assert same(before, job_state(server))
    assert ex.exchange(report(12, version)).step == 12


# ---------------------------------------------- 9. leftovers of a kill during a save
def test_leftover_temporary_state_files_are_removed_at_start_up(tmp_path):
    path = tmp_path / "state.pt"
    srv = make_server(state_file=str(path))
    run(client(srv), range(1, 3))
    srv.stop(grace=0)
    leftovers = [tmp_path / "state.pt.tmp.4242", tmp_path / "state.pt.tmp.77"]
    for p in leftovers:
        p.write_bytes(b"half a state file")
    other = tmp_path / "other.pt.tmp.1"
    other.write_bytes(b"not ours")
    revived = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=str(path))
    try:
        assert revived.restored_jobs == 1
        assert not any(p.exists() for p in leftovers) and other.exists()
    finally:
        revived.stop()


# ------------------------------------------------------------- 10. token whitespace
def test_a_token_with_surrounding_whitespace_in_the_environment_matches(monkeypatch):
    monkeypatch.setenv("OSFN_TOKEN", f"  {TOKEN}\n")
    srv = make_server(token=read_token())  # what `osfn-dist serve` does without --token-file
    try:
        assert client(srv, token=TOKEN).exchange(report(1, 0)).step == 1
        assert GrpcExchange(f"127.0.0.1:{srv.port}").get_state()["step"] == 1  # the client reads $OSFN_TOKEN
        with pytest.raises(CurvatureServiceUnauthenticated):
            client(srv, token="other").get_state()
    finally:
        srv.stop(grace=0)


# ----------------------------------------------------------- 7. corrupt state files
def _saved_file(tmp_path) -> tuple[bytes, dict]:
    path = tmp_path / "state.pt"
    srv = make_server(state_file=str(path))
    for i, name in enumerate(("a", "b", "c")):
        run(client(srv, job=name), range(1, 4), seed=i)
    states = {n: job_state(srv, n) for n in ("a", "b", "c")}
    srv.stop(grace=0)
    return path.read_bytes(), states


def test_every_bit_flip_in_the_state_file_is_refused_with_a_clear_error(tmp_path):
    data, _ = _saved_file(tmp_path)
    target = tmp_path / "flipped.pt"
    offsets = sorted(set(range(0, 64)) | set(range(0, len(data), 29)) | {len(data) - 1})
    for off in offsets:
        flipped = bytearray(data)
        flipped[off] ^= 1 << (off % 8)
        target.write_bytes(bytes(flipped))
        with pytest.raises(StateFileError, match=r"flipped\.pt.*(corrupt|not an osfn-dist state file)") as err:
            CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=str(target)).stop()
        assert "move it away" in str(err.value), off


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"PK\x03\x04broken zip"])
def test_an_unreadable_state_file_is_a_typed_refusal(tmp_path, content):
    target = tmp_path / "state.pt"
    target.write_bytes(content)
    with pytest.raises(StateFileError, match="state.pt"):
        CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=str(target))


def test_a_record_cut_short_by_a_kill_is_dropped_and_the_rest_restored(tmp_path):
    data, states = _saved_file(tmp_path)
    srv = make_server(state_file=str(tmp_path / "state.pt"))
    try:
        size = os.path.getsize(tmp_path / "state.pt")
        version = pb.DirectionUpdate.FromString(states["a"]["last_reply"]).new_version
        run(client(srv, job="a"), [4], version, seed=0)  # appends one record
        grown = (tmp_path / "state.pt").read_bytes()
    finally:
        srv._server.stop(0).wait()  # like a kill: no save at shutdown
        srv._server = None
        srv.registry.close()
    assert len(grown) > size
    (tmp_path / "state.pt").write_bytes(grown[: size + (len(grown) - size) // 2])  # the append cut in half
    revived = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=str(tmp_path / "state.pt"))
    try:
        for name in ("a", "b", "c"):
            assert same(states[name], job_state(revived, name)), name
    finally:
        revived.stop()


# ------------------------------------------------------------------------ also
def test_two_servers_cannot_share_one_state_file(tmp_path):
    path = str(tmp_path / "state.pt")
    first = make_server(state_file=path)
    try:
        with pytest.raises(StateFileError, match="in use by another osfn-dist serve"):
            CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=path)
    finally:
        first.stop(grace=0)
    CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=path).stop()  # free again


def test_a_wrong_token_is_refused_before_the_request_is_read():
    """An oversized request with a wrong token used to be read in full (and cut off with
    RESOURCE_EXHAUSTED); now the token is checked first."""
    srv = make_server(max_message_bytes=4096)  # transport cap ≈ 72 KiB
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=[("grpc.max_send_message_length", 1 << 26)]) as ch:
            call = ch.unary_unary("/osfn.v1.CurvatureService/Exchange")
            for token in ("wrong", None):
                metadata = (("authorization", f"Bearer {token}"),) if token else ()
                with pytest.raises(grpc.RpcError) as err:
                    call(b"\x00" * (4 << 20), metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert client(srv).exchange(report(1, 0)).step == 1
    finally:
        srv.stop(grace=0)


def test_delete_job_forgets_a_job_also_across_a_restart(tmp_path):
    path = str(tmp_path / "state.pt")
    srv = make_server(state_file=path)
    try:
        run(client(srv, job="done"), range(1, 4))
        run(client(srv, job="live"), range(1, 4), seed=1)
        with pytest.raises(CurvatureServiceUnauthenticated):
            client(srv, token="wrong").delete_job("done")
        assert client(srv).delete_job("done") == 1
        assert client(srv).list_jobs() == ["live"]
        with pytest.raises(LookupError):
            client(srv).get_state("done")
        with pytest.raises(LookupError):
            client(srv).delete_job("done")
        live = job_state(srv, "live")
    finally:
        srv.stop(grace=0)
    revived = make_server(state_file=path)
    try:
        assert revived.restored_jobs == 1 and client(revived).list_jobs() == ["live"]
        assert same(live, job_state(revived, "live"))
        assert client(revived, job="done").exchange(report(1, 0)).step == 1  # the name starts afresh
    finally:
        revived.stop(grace=0)



def test_a_state_file_of_the_earlier_format_is_read_and_rewritten(tmp_path):
    from osfn_dist.service.statelog import FILE_MAGIC, legacy_bytes

    srv = make_server()
    run(client(srv, job="old"), range(1, 4))
    state = job_state(srv, "old")
    srv.stop(grace=0)
    path = tmp_path / "state.pt"
    path.write_bytes(legacy_bytes({"old": state}, D))
    revived = make_server(state_file=str(path))
    try:
        assert revived.restored_jobs == 1 and same(state, job_state(revived, "old"))
        assert path.read_bytes().startswith(FILE_MAGIC)
        version = pb.DirectionUpdate.FromString(state["last_reply"]).new_version
        assert client(revived, job="old").exchange(report(4, version)).step == 4
    finally:
        revived.stop(grace=0)


def test_save_every_zero_saves_at_shutdown_only(tmp_path):
    path = tmp_path / "state.pt"
    srv = make_server(state_file=str(path), save_every=0)
    try:
        size = os.path.getsize(path)
        run(client(srv), range(1, 4))
        assert os.path.getsize(path) == size
        state = job_state(srv)
    finally:
        srv.stop(grace=0)
    revived = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=str(path))
    try:
        assert same(state, job_state(revived))
    finally:
        revived.stop()


def test_concurrent_exchanges_and_compactions_lose_nothing(tmp_path, monkeypatch):
    """Many clients appending at once (one shared fdatasync) while the log compacts itself
    over and over; then the server dies without its shutdown save and a new one restores
    every job exactly."""
    from osfn_dist.service import statelog

    monkeypatch.setattr(statelog, "COMPACT_MIN_BYTES", 16 * 1024)
    path = tmp_path / "state.pt"
    srv = make_server(state_file=str(path))
    errors = []

    def worker(i):
        try:
            run(client(srv, job=f"w{i}"), range(1, 13), seed=i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        live = {f"w{i}": job_state(srv, f"w{i}") for i in range(16)}
        assert os.path.getsize(path) < 250_000  # ~450 KB appended in all: it was compacted on the way
    finally:
        srv._server.stop(0).wait()  # like a kill: no save at shutdown
        srv._server = None
        srv.registry.close()
    revived = CurvatureServer(OSFNConfig(subspace_dim=D), port=0, token=TOKEN, state_file=str(path))
    try:
        assert revived.restored_jobs == 16
        for name, state in live.items():
            assert same(state, job_state(revived, name)), name
    finally:
        revived.stop()
