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


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Check and Watch for a fixed set of service names ("" = the whole server)."""

    def __init__(self, services=("",)):
        self._status = {name: NOT_SERVING for name in services}
        self._changed = threading.Condition()
        self._stopped = False

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

    def Watch(self, request, context):
        last = None
        while context.is_active():
            with self._changed:
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                if status == last and not self._stopped:
                    self._changed.wait(timeout=1.0)
                    continue
                stopped = self._stopped
            last = status
            yield health_pb2.HealthCheckResponse(status=status)
            if stopped:
                return


def add_to_server(servicer: HealthServicer, server: grpc.Server) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
