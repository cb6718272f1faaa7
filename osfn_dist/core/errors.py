"""Typed errors. Each message says what went wrong and what to do about it."""


class OSFNError(Exception):
    """Base class of every error osfn-dist raises on purpose."""


class ConfigError(OSFNError, ValueError):
    """An invalid hyperparameter or setting. Subclasses ValueError so callers of a
    torch.optim.Optimizer see the usual exception type."""


class DimensionMismatchError(OSFNError, ValueError):
    """A message or state whose shapes do not match the subspace or the model."""


class InvalidReportError(OSFNError, ValueError):
    """A report with non-finite values or fields this service does not know; it is rejected
    and nothing in the curvature model changes."""


class VersionMismatchError(OSFNError):
    """A direction update computed for another basis version than the worker holds."""


class NonFiniteGradientError(OSFNError, FloatingPointError):
    """A NaN/Inf gradient with ``nonfinite='raise'``."""


class ReplicaDivergenceError(OSFNError):
    """Data-parallel replicas that should be identical are not (a rank changed its
    parameters on its own, or runs another model): raised on every rank at once."""


class CurvatureServiceUnavailable(OSFNError, ConnectionError):
    """The curvature service (Ray actor or gRPC server) could not be reached in time."""
