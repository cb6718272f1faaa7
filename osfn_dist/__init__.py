"""osfn-dist: online saddle-free Newton (OSFN) for PyTorch, from a laptop to a Ray cluster."""
from .core.config import ADAM_PRECONDITIONED, LOW_DIMENSIONAL, OSFNConfig
from .core.errors import (
    ConfigError,
    CurvatureServiceUnavailable,
    DimensionMismatchError,
    InvalidReportError,
    NonFiniteGradientError,
    OSFNError,
    ReplicaDivergenceError,
    VersionMismatchError,
)
from .dataflow.curvature import CurvatureService
from .optimizer import OSFN
from . import checkpoint

__all__ = [
    "OSFN",
    "OSFNConfig",
    "ADAM_PRECONDITIONED",
    "LOW_DIMENSIONAL",
    "CurvatureService",
    "OSFNError",
    "ConfigError",
    "DimensionMismatchError",
    "InvalidReportError",
    "VersionMismatchError",
    "NonFiniteGradientError",
    "ReplicaDivergenceError",
    "CurvatureServiceUnavailable",
]
__version__ = "0.1.0"
