"""Clients of the curvature server.

``GrpcExchange`` is an OSFN exchange (``exchange(report) -> DirectionUpdate``)::

    exchange = GrpcExchange("10.0.0.5:50051", token_file="/etc/osfn/token", job="run-42")
    opt = OSFN(model.parameters(), lr=1e-3, exchange=exchange)

    # data parallel with torch.distributed: only rank 0 talks to the server
    opt = OSFN(model.parameters(), lr=1e-3, gradient_sync=GradientSync(),
               exchange=LeaderExchange(GrpcExchange(addr, token) if rank == 0 else None))

Failures: UNAVAILABLE / DEADLINE_EXCEEDED are retried with exponential backoff and jitter
(the server restarting, a network blip, a state-file write that failed and was rolled
back); after ``retries`` retries the exchange raises ``CurvatureServiceUnavailable``.
Retrying is safe: exchanges are exactly-once per (job, step), and the server answers an
identical report with its cached update instead of stepping twice. INVALID_ARGUMENT raises
the server's typed error (``DimensionMismatchError``, ``InvalidReportError``,
``VersionMismatchError``, ``ConfigError``, ``MalformedMessageError``, ``ReportOrderError``
for a different report for a step already taken or an earlier step); UNAUTHENTICATED
raises ``CurvatureServiceUnauthenticated``. Neither is retried.
"""
from __future__ import annotations

import random
import time

import grpc

from ..core.errors import CurvatureServiceUnavailable
from ..dataflow.messages import DirectionUpdate, Report
from .auth import read_token
from .convert import report_to_proto, state_from_proto, update_from_proto
from .errors import ERROR_TYPES, CurvatureServiceRejected, CurvatureServiceUnauthenticated
from .v1 import curvature_pb2 as pb
from .v1 import curvature_pb2_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class CurvatureClient:
    """A channel to the server with auth, TLS, typed errors and retries."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        token_file: str | None = None,
        tls_ca: str | None = None,
        tls: bool = False,
        tls_server_name: str | None = None,
        job: str = "default",
        timeout: float = 10.0,
        retries: int = 10,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
    ):
        self.address = address
        self.token = read_token(token, token_file)
        self.tls_ca, self.tls, self.tls_server_name = tls_ca, tls or bool(tls_ca), tls_server_name
        self.job = job
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self._channel: grpc.Channel | None = None
        self._stub = None

    # -------------------------------------------------------- connection
    def _connect(self):
        if self._stub is not None:
            return self._stub
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # reconnect quickly after a server restart (gRPC's default backoff grows to 120 s)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(self.max_backoff * 1000)),
        ]
        if self.tls:
            root = None
            if self.tls_ca:
                with open(self.tls_ca, "rb") as fh:
                    root = fh.read()
            if self.tls_server_name:
                options.append(("grpc.ssl_target_name_override", self.tls_server_name))
            channel = grpc.secure_channel(self.address, grpc.ssl_channel_credentials(root), options)
        else:
            channel = grpc.insecure_channel(self.address, options)
        self._channel = channel
        self._stub = curvature_pb2_grpc.CurvatureServiceStub(channel)
        return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # picklable (e.g. shipped to a Ray worker): the channel is reopened
        state = dict(self.__dict__)
        state["_channel"] = state["_stub"] = None
        return state

    @property
    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    # ------------------------------------------------------------- calls
    def call(self, method: str, request, *, retry: bool = True, timeout: float | None = None):
        """One unary call with retries on UNAVAILABLE / DEADLINE_EXCEEDED and typed errors."""
        attempts = self.retries + 1 if retry else 1
        started = time.monotonic()
        last: grpc.RpcError | None = None
        for attempt in range(attempts):
            stub = self._connect()
            try:
                return getattr(stub, method)(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                last = exc
                if exc.code() not in RETRYABLE:
                    raise self._typed(exc) from None
            if attempt + 1 < attempts:
                delay = min(self.max_backoff, self.backoff * 2**attempt)
                time.sleep(delay * (0.5 + random.random() / 2))
        raise CurvatureServiceUnavailable(
            f"the curvature service at {self.address} did not answer {method} after {attempts} attempt(s) "
            f"over {time.monotonic() - started:.1f} s (last error: {last.code().name}: {last.details()}). "
            "Is `osfn-dist serve` running and reachable at that address, with matching TLS settings? "
            "For longer outages raise retries/max_backoff."
        ) from None

    def _typed(self, exc: grpc.RpcError) -> Exception:
        code, detail = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return CurvatureServiceUnauthenticated(f"the curvature service at {self.address} refused the call: {detail}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            kind = dict(exc.trailing_metadata() or ()).get("osfn-error", "")
            return ERROR_TYPES.get(kind, CurvatureServiceRejected)(f"the curvature service rejected the request: {detail}")
        if code == grpc.StatusCode.NOT_FOUND:
            return LookupError(detail)
        return CurvatureServiceRejected(f"the curvature service answered {code.name}: {detail}")

    def get_state(self, job: str | None = None) -> dict:
        return state_from_proto(self.call("GetState", pb.GetStateRequest(job=job or self.job)))

    def list_jobs(self) -> list[str]:
        return list(self.call("ListJobs", pb.ListJobsRequest()).jobs)

    def delete_job(self, job: str | None = None) -> int:
        """Forget a job's curvature model on the server (and in its state file); returns the
        number of jobs left. LookupError if the server has no such job."""
        return int(self.call("DeleteJob", pb.DeleteJobRequest(job=job or self.job)).remaining_jobs)

    def watch_state(self, job: str | None = None, min_interval_s: float = 0.0):
        """Yields state dicts: now, then after each exchange. Not retried; stop by closing."""
        stream = self._connect().WatchState(
            pb.WatchStateRequest(job=job or self.job, min_interval_s=min_interval_s), metadata=self.metadata
        )
        try:
            for msg in stream:
                yield state_from_proto(msg)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            if exc.code() in RETRYABLE:
                raise CurvatureServiceUnavailable(
                    f"watch stream from {self.address} ended: {exc.code().name}: {exc.details()}"
                ) from None
            raise self._typed(exc) from None
        finally:
            stream.cancel()


class GrpcExchange(CurvatureClient):
    """An OSFN exchange backed by the curvature server (see the module docstring)."""

    def exchange(self, report: Report) -> DirectionUpdate:
        request = pb.ExchangeRequest(job=self.job, report=report_to_proto(report))
        return update_from_proto(self.call("Exchange", request))

    def snapshot(self) -> dict:
        return self.get_state()
