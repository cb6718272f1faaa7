"""The standard gRPC health service (grpc.health.v1.Health), without extra packages.

Uses grpcio-health-checking's modules when that package is installed (two copies of the
same proto symbols cannot live in one process), else the ones generated from the vendored
``proto/grpc/health/v1/health.proto``.
"""
from __future__ import annotations

import threading

import grpc

try:  # pragma: no cover - depends on an optional package
    from grpc_health.v1 import health_pb2, health_pb2_grpc
except ImportError:
    from .v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


def peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` → the address without the port."""
    kind, _, rest = (peer or "").partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0]
    return peer or "unknown"


class StreamSlots:
    """Bounds concurrent streams in total and per peer address: on the synchronous gRPC
    server each open stream holds one handler thread, so unbounded streams starve every
    other call (Health.Watch needs no token, so anyone could do that)."""

    def __init__(self, total: int, per_peer: int):
        self.total, self.per_peer = max(1, int(total)), max(1, int(per_peer))
        self._lock = threading.Lock()
        self._open = 0
        self._by_peer: dict[str, int] = {}

    def acquire(self, peer: str) -> str | None:
        """None when a slot was taken, else the reason it was refused."""
        host = peer_host(peer)
        with self._lock:
            if self._open >= self.total:
                return f"{self._open} streams are open, the server allows {self.total}"
            if self._by_peer.get(host, 0) >= self.per_peer:
                return f"{host} already has {self.per_peer} streams open"
            self._open += 1
            self._by_peer[host] = self._by_peer.get(host, 0) + 1
        return None

    def release(self, peer: str) -> None:
        host = peer_host(peer)
        with self._lock:
            self._open -= 1
            left = self._by_peer.get(host, 1) - 1
            if left:
                self._by_peer[host] = left
            else:
                self._by_peer.pop(host, None)

    def take(self, context, stream: str, instead: str) -> str:
        """A slot for this call's peer, or abort it with RESOURCE_EXHAUSTED saying what to use
        instead; returns the peer (to ``release`` when the stream ends)."""
        peer = context.peer()
        refused = self.acquire(peer)
        if refused is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many {stream} streams ({refused}); {instead}")
        return peer

    @property
    def open(self) -> int:
        with self._lock:
            return self._open


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Check and Watch for a fixed set of service names ("" = the whole server). Watch
    streams are bounded (``max_watchers`` in total, ``max_watchers_per_peer`` per client
    address; beyond that RESOURCE_EXHAUSTED) and end as soon as the client cancels."""

    def __init__(self, services=("",), max_watchers: int = 8, max_watchers_per_peer: int = 4):
        self._status = {name: NOT_SERVING for name in services}
        self._changed = threading.Condition()
        self._stopped = False
        self.watch_slots = StreamSlots(max_watchers, max_watchers_per_peer)

    def set(self, service: str, status) -> None:
        with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    def set_all(self, status) -> None:
        with self._changed:
            for name in self._status:
                self._status[name] = status
            self._changed.notify_all()

    def shutdown(self) -> None:
        with self._changed:
            self._stopped = True
            for name in self._status:
                self._status[name] = NOT_SERVING
            self._changed.notify_all()

    def Check(self, request, context):
        with self._changed:
            status = self._status.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def Watch(self, request, context):
        peer = self.watch_slots.take(context, "Health/Watch", "poll Health/Check instead")
        try:
            context.add_callback(self._wake)  # a cancelled stream frees its thread at once
            last = None
            while True:
                with self._changed:  # checked under the lock the cancel callback takes: no lost wake-up
                    if not context.is_active():
                        return
                    status = self._status.get(request.service, SERVICE_UNKNOWN)
                    if status == last and not self._stopped:
                        self._changed.wait(timeout=30.0)
                        continue
                    stopped = self._stopped
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
                if stopped:
                    return
        finally:
            self.watch_slots.release(peer)


def add_to_server(servicer: HealthServicer, server: grpc.Server) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
