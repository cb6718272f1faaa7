"""Typed errors of the gRPC layer (the core errors live in ``osfn_dist.core.errors``)."""
from __future__ import annotations

from ..core.errors import ConfigError, DimensionMismatchError, InvalidReportError, OSFNError, VersionMismatchError


class MalformedMessageError(OSFNError, ValueError):
    """A message that cannot be decoded or breaks the wire format (wrong byte counts,
    oversized, bad job name). The server answers INVALID_ARGUMENT."""


class CurvatureServiceUnauthenticated(OSFNError, PermissionError):
    """The server refused the call: missing or wrong bearer token (UNAUTHENTICATED)."""


class CurvatureServiceRejected(OSFNError, ValueError):
    """The server rejected the request as invalid for a reason without a more specific type."""


# Sent by the server in the trailing metadata ``osfn-error`` so clients re-raise the same type.
ERROR_TYPES: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (MalformedMessageError, DimensionMismatchError, InvalidReportError, VersionMismatchError, ConfigError)
}
