"""Typed errors of the gRPC layer (the core errors live in ``osfn_dist.core.errors``)."""
from __future__ import annotations

from ..core.errors import ConfigError, DimensionMismatchError, InvalidReportError, OSFNError, VersionMismatchError


class MalformedMessageError(OSFNError, ValueError):
    """A message that cannot be decoded or breaks the wire format (wrong byte counts,
    oversized, bad job name). The server answers INVALID_ARGUMENT."""


class CurvatureServiceUnauthenticated(OSFNError, PermissionError):
    """The server refused the call: missing or wrong bearer token (UNAUTHENTICATED)."""


class ReportOrderError(OSFNError, ValueError):
    """A report whose step does not follow the job's last accepted step: exchanges are
    exactly-once per (job, step). Resending the identical last report gets the cached reply;
    a different report for that step, an older step, or a step outside [1, 2**53] is refused
    (INVALID_ARGUMENT) and nothing changes."""


class StateFileError(OSFNError):
    """The server's --state-file cannot be used: missing directory, locked by another
    server, corrupt, or a write that failed (the exchange was then rolled back)."""


class CurvatureServiceRejected(OSFNError, ValueError):
    """The server rejected the request as invalid for a reason without a more specific type."""


# Sent by the server in the trailing metadata ``osfn-error`` so clients re-raise the same type.
ERROR_TYPES: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        MalformedMessageError, DimensionMismatchError, InvalidReportError, VersionMismatchError, ConfigError,
        ReportOrderError,
    )
}
