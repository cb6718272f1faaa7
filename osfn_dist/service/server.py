"""The standalone curvature server: ``CurvatureService`` per job behind gRPC.

    server = CurvatureServer(OSFNConfig(subspace_dim=8), host="127.0.0.1", port=50051, token=...)
    port = server.start()        # the bound port (0 picks a free one)
    ...
    server.stop()                # saves the state file, health NOT_SERVING

Requests are decoded here (not by generated stubs) so that every malformed, oversized or
mismatched message is answered with INVALID_ARGUMENT and a reason, and a trailing metadata
entry ``osfn-error: <error type>`` the client turns back into the same typed error. A
request larger than ``max_message_bytes`` is INVALID_ARGUMENT; one beyond the transport cap
(2 × that + 64 KiB) is cut off by gRPC itself with RESOURCE_EXHAUSTED.

Streams hold a handler thread each (synchronous gRPC server), so they are bounded: WatchState
streams to half of ``max_workers``, the open Health/Watch streams to an eighth (and half of
that per client address); both end as soon as their client cancels. The rest of the threads
always remain for unary calls.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError

from ..core.config import OSFNConfig
from ..core.errors import ConfigError, DimensionMismatchError, InvalidReportError, VersionMismatchError
from . import health
from .auth import BearerTokenInterceptor, check_bind
from .convert import report_from_proto, job_name, state_to_proto
from .errors import MalformedMessageError, ReportOrderError, StateFileError
from .jobs import JobNotFound, JobRegistry, TooManyJobs, digest
from .v1 import curvature_pb2 as pb

log = logging.getLogger("osfn_dist.service")

SERVICE_NAME = "osfn.v1.CurvatureService"
DEFAULT_PORT = 50051
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
_INVALID = (
    MalformedMessageError, DimensionMismatchError, InvalidReportError, VersionMismatchError, ConfigError,
    ReportOrderError,
)
MIN_WORKERS = 4


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str, error_type: str = ""):
        super().__init__(detail)
        self.code, self.detail, self.error_type = code, detail, error_type


class CurvatureServer:
    """gRPC front of one ``JobRegistry``; see the module docstring."""

    def __init__(
        self,
        config: OSFNConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        token: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        state_file: str | None = None,
        save_every: int = 1,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_jobs: int = 256,
        max_workers: int = 64,
        allow_stale: bool = False,
        metrics=None,
    ):
        if token is not None:
            token = token.strip()  # as read_token does on the client side
            if not token:
                raise ConfigError("the bearer token is empty; put the shared secret in --token-file or $OSFN_TOKEN")
        check_bind(host, token)
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        self.config = config or OSFNConfig()
        self.host, self.port = host, port
        self.token = token
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.max_message_bytes = int(max_message_bytes)
        self.max_workers = int(max_workers)
        if self.max_workers < MIN_WORKERS:
            raise ConfigError(f"--max-workers {max_workers} is too small; the server needs at least {MIN_WORKERS}")
        # streams hold a thread each: WatchState may use half of them, Health/Watch an eighth
        self.max_watchers = max(1, self.max_workers // 2)
        self.max_health_watchers = max(1, self.max_workers // 8)
        self.registry = JobRegistry(self.config, allow_stale, max_jobs, state_file, save_every)
        self.metrics = metrics  # a metrics.exporter.ServiceMetrics or None
        self.restored_jobs = self.registry.load()  # checks, locks and loads the state file
        self._health = health.HealthServicer(
            ("", SERVICE_NAME), self.max_health_watchers, max(1, self.max_health_watchers // 2),
        )
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()
        self._watch_slots = health.StreamSlots(self.max_watchers, self.max_watchers)
        self._watch_events: set[threading.Event] = set()
        self._watch_lock = threading.Lock()

    # ---------------------------------------------------------- lifecycle
    def start(self) -> int:
        cap = 2 * self.max_message_bytes + 65536
        options = [
            ("grpc.max_receive_message_length", cap),
            ("grpc.max_send_message_length", cap),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ]
        interceptors = []
        if self.token is not None:
            interceptors.append(BearerTokenInterceptor(self.token, self._denied))
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="osfn-grpc"),
            interceptors=interceptors, options=options,
        )
        server.add_generic_rpc_handlers((self._handlers(),))
        health.add_to_server(self._health, server)
        address = f"[{self.host}]:{self.port}" if ":" in self.host.strip("[]") else f"{self.host}:{self.port}"
        try:
            if self.tls_cert:
                with open(self.tls_key, "rb") as fh:
                    key = fh.read()
                with open(self.tls_cert, "rb") as fh:
                    cert = fh.read()
                bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            self.registry.close()
            raise ConfigError(f"cannot listen on {address}: {exc} (is the port in use?)") from None
        if not bound:
            self.registry.close()
            raise ConfigError(f"cannot listen on {address} (is the port in use?)")
        self.port = bound
        server.start()
        self._server = server
        self._health.set_all(health.SERVING)
        if self.metrics is not None:
            self.metrics.set_up(True)
            for name in self.registry.names():
                self._observe_state(name)
        return bound

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (health NOT_SERVING first), end watch streams, save the state file
        and release its lock."""
        if self._server is None:
            self.registry.close()  # constructed but never started: just release the state file
            return
        self._health.shutdown()
        self._stopping.set()
        with self._watch_lock:
            for event in self._watch_events:
                event.set()
        for name in self.registry.names():
            job = self.registry.get(name)
            with job.changed:
                job.changed.notify_all()
        self._server.stop(grace).wait()
        self._server = None
        try:
            self.registry.save()
        except (OSError, StateFileError) as exc:
            raise StateFileError(f"the state file could not be saved at shutdown: {exc}") from None
        finally:
            self.registry.close()
        if self.metrics is not None:
            self.metrics.set_up(False)

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout) if self._server is not None else True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ----------------------------------------------------------- handlers
    def _handlers(self):
        unary = lambda fn: grpc.unary_unary_rpc_method_handler(fn)  # noqa: E731  raw bytes in, bytes out
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Exchange": unary(self._wrap("Exchange", pb.ExchangeRequest, self._exchange)),
            "GetState": unary(self._wrap("GetState", pb.GetStateRequest, self._get_state)),
            "ListJobs": unary(self._wrap("ListJobs", pb.ListJobsRequest, self._list_jobs)),
            "DeleteJob": unary(self._wrap("DeleteJob", pb.DeleteJobRequest, self._delete_job)),
            "WatchState": grpc.unary_stream_rpc_method_handler(self._watch_state),
        })

    def _parse(self, cls, data: bytes):
        if len(data) > self.max_message_bytes:
            raise MalformedMessageError(
                f"request of {len(data)} bytes exceeds the server's limit of {self.max_message_bytes} "
                "bytes (--max-message-bytes)"
            )
        msg = cls()
        try:
            msg.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise MalformedMessageError(f"cannot decode {cls.DESCRIPTOR.name}: {exc}") from None
        return msg

    def _wrap(self, method: str, cls, handle):
        def handler(data: bytes, context: grpc.ServicerContext) -> bytes:
            start = time.perf_counter()
            job, code = "", "OK"
            try:
                msg = self._parse(cls, data)
                job, reply = handle(msg, context)
                return reply
            except _Abort as exc:
                code, failure = exc.code.name, exc
            except _INVALID as exc:
                code = "INVALID_ARGUMENT"
                failure = _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc), type(exc).__name__)
            except JobNotFound as exc:
                code, failure = "NOT_FOUND", _Abort(grpc.StatusCode.NOT_FOUND, str(exc))
            except TooManyJobs as exc:
                code, failure = "RESOURCE_EXHAUSTED", _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except StateFileError as exc:  # the exchange was rolled back: nothing changed, retry later
                log.error("%s: %s", method, exc)
                code = "UNAVAILABLE"
                failure = _Abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{exc}; the exchange was rolled back (nothing changed): it can be retried",
                )
            except Exception as exc:  # keep serving; the job restored its previous state
                log.exception("%s failed", method)
                code = "INTERNAL"
                failure = _Abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); state kept")
            finally:
                if self.metrics is not None:
                    self.metrics.observe_request(job or "unknown", method, code, time.perf_counter() - start)
            if failure.error_type:
                context.set_trailing_metadata((("osfn-error", failure.error_type),))
            context.abort(failure.code, failure.detail)

        return handler

    def _exchange(self, msg: pb.ExchangeRequest, context) -> tuple[str, bytes]:
        job = job_name(msg.job)
        if not msg.HasField("report"):
            raise MalformedMessageError("ExchangeRequest has no report")
        report = report_from_proto(msg.report)
        request_digest = digest(msg.report.SerializeToString(deterministic=True))
        reply, replay = self.registry.exchange(job, report, request_digest)
        if not replay:
            self._observe_state(job)
        return job, reply

    def _state(self, job_name_: str) -> pb.CurvatureState:
        job = self.registry.get(job_name_)
        return state_to_proto(job_name_, job.service.snapshot(), job.updated_unix_s, job.exchanges)

    def _get_state(self, msg: pb.GetStateRequest, context) -> tuple[str, bytes]:
        job = job_name(msg.job)
        return job, self._state(job).SerializeToString()

    def _list_jobs(self, msg: pb.ListJobsRequest, context) -> tuple[str, bytes]:
        return "", pb.ListJobsResponse(jobs=self.registry.names()).SerializeToString()

    def _delete_job(self, msg: pb.DeleteJobRequest, context) -> tuple[str, bytes]:
        job = job_name(msg.job)
        if not self.registry.delete(job):
            raise JobNotFound(f"no curvature model for job {job!r} on this server")
        log.info("deleted job %r", job)
        return job, pb.DeleteJobResponse(remaining_jobs=len(self.registry.names())).SerializeToString()

    def _watch_state(self, data: bytes, context: grpc.ServicerContext):
        start = time.perf_counter()
        try:
            msg = self._parse(pb.WatchStateRequest, data)
            name = job_name(msg.job)
            job = self.registry.get(name)
            interval = msg.min_interval_s
            if not (interval >= 0 and interval < 86400):
                raise MalformedMessageError(f"min_interval_s={interval!r} must be in [0, 86400)")
        except _INVALID as exc:
            context.set_trailing_metadata((("osfn-error", type(exc).__name__),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except JobNotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        peer = self._watch_slots.take(context, "WatchState", "poll GetState instead")
        done = threading.Event()  # set when the client cancels or the server stops

        def wake():
            done.set()
            with job.changed:
                job.changed.notify_all()

        with self._watch_lock:
            self._watch_events.add(done)
        try:
            context.add_callback(wake)
            if self._stopping.is_set():
                done.set()
            seen = -1
            while not done.is_set():
                with job.changed:  # `done` is set under this lock's notify: no lost wake-up
                    if done.is_set() or not context.is_active():
                        break
                    if job.seq == seen:
                        job.changed.wait(timeout=30.0)
                        continue
                    seen = job.seq
                if job.retired:  # DeleteJob
                    break
                yield self._state(name).SerializeToString()
                if interval:
                    done.wait(interval)
        finally:
            with self._watch_lock:
                self._watch_events.discard(done)
            self._watch_slots.release(peer)
            if self.metrics is not None:
                self.metrics.observe_request(name, "WatchState", "OK", time.perf_counter() - start)

    @property
    def open_watch_streams(self) -> int:
        return self._watch_slots.open

    # ------------------------------------------------------------ metrics
    def _observe_state(self, job: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_state(job, self.registry.get(job).service.snapshot())

    def _denied(self, method: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_request("unknown", method.rsplit("/", 1)[-1], "UNAUTHENTICATED", 0.0)
