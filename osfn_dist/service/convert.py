"""Dataclass messages ↔ protobuf messages.

Float arrays travel as little-endian float64 ``bytes``. Decoding checks the wire format
only (byte counts, shapes, types of hyperparameters); the curvature service itself checks
dimensions, versions, finiteness and hyperparameter ranges, so both layers reject a bad
message before any state changes.
"""
from __future__ import annotations

import ctypes
import math
import re
from dataclasses import MISSING, fields

import sys

import torch

from ..core.config import OSFNConfig
from ..dataflow.messages import DirectionUpdate, Report
from .errors import MalformedMessageError
from .v1 import curvature_pb2 as pb

_BIG_ENDIAN = sys.byteorder == "big"
JOB_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # used with fullmatch: "$" would let a trailing "\n" in
DEFAULT_JOB = "default"
MAX_SUBSPACE_DIM = 256  # OSFNConfig's own limit
MAX_WORKERS = 65536

# Live hyperparameters travel as doubles; restore the config field's own type.
_FIELD_TYPES = {f.name: type(getattr(OSFNConfig(), f.name)) for f in fields(OSFNConfig)}


def job_name(name: str) -> str:
    name = name or DEFAULT_JOB
    if not isinstance(name, str) or not JOB_NAME.fullmatch(name):
        raise MalformedMessageError(
            f"job name {name[:80]!r} is invalid: use 1-64 characters from [A-Za-z0-9_.-]"
        )
    return name


# ----------------------------------------------------------------- arrays
def _swap(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).reshape(-1, 8).flip(1).reshape(-1).view(torch.float64)


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Any tensor → little-endian float64 bytes, row-major (no numpy needed)."""
    flat = t.detach().to("cpu", torch.float64).reshape(-1).clone()  # own contiguous storage, exactly numel
    if _BIG_ENDIAN:  # pragma: no cover
        flat = _swap(flat).clone()
    # ctypes copies the buffer at once; bytes(untyped_storage()) goes byte by byte (~200 µs a tensor)
    return ctypes.string_at(flat.data_ptr(), flat.numel() * 8) if flat.numel() else b""


def bytes_to_tensor(data: bytes, what: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if len(data) % 8:
        raise MalformedMessageError(f"{what} has {len(data)} bytes, not a whole number of float64 values")
    n = len(data) // 8
    if shape is not None and n != math.prod(shape):
        raise MalformedMessageError(f"{what} holds {n} float64 values, expected shape {shape}")
    t = torch.frombuffer(bytearray(data), dtype=torch.float64) if n else torch.zeros(0, dtype=torch.float64)
    if _BIG_ENDIAN:  # pragma: no cover
        t = _swap(t)
    return t.reshape(shape) if shape is not None else t


# ----------------------------------------------------------------- Report
# Dataclass fields carried by the protobuf messages; tests/test_service_proto.py fails when
# messages.py gains a field that is missing here (extend the .proto and this module).
REPORT_FIELDS = (
    "step", "basis_version", "grad_coords", "grad_sqnorm", "source_coords", "source_sqnorm",
    "residual_sqnorm", "prev_step_coords", "drift_coords", "residual_step_dot", "worker_grad_coords", "hyper",
    "settings",
)
UPDATE_FIELDS = (
    "step", "base_version", "new_version", "step_coef", "rotation", "residual_coef", "complement_keep",
    "reorthonormalize", "diagnostics",
)


def _check_fields(msg, known: tuple[str, ...]) -> None:
    """Fail loudly (instead of silently dropping data) when messages.py gained a field that
    the protobuf mapping does not carry yet."""
    for f in fields(msg):
        if f.name not in known:
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            value = getattr(msg, f.name)
            if value is not default and not (value is None and default is None) and value != default:
                raise NotImplementedError(
                    f"{type(msg).__name__}.{f.name} is not carried over gRPC yet: add it to "
                    "proto/osfn/v1/curvature.proto and osfn_dist/service/convert.py, then run scripts/gen-proto.sh"
                )


def report_to_proto(report: Report) -> pb.Report:
    _check_fields(report, REPORT_FIELDS)
    msg = pb.Report(
        step=int(report.step),
        basis_version=int(report.basis_version),
        grad_coords=tensor_to_bytes(torch.as_tensor(report.grad_coords)),
        grad_sqnorm=float(report.grad_sqnorm),
        residual_step_dot=float(report.residual_step_dot),
    )
    if report.source_coords is not None:
        msg.source_coords = tensor_to_bytes(torch.as_tensor(report.source_coords))
    if report.source_sqnorm is not None:
        msg.source_sqnorm = float(report.source_sqnorm)
    if report.residual_sqnorm is not None:
        msg.residual_sqnorm = float(report.residual_sqnorm)
    if report.prev_step_coords is not None:
        msg.prev_step_coords = tensor_to_bytes(torch.as_tensor(report.prev_step_coords))
    if report.drift_coords is not None:
        msg.drift_coords = tensor_to_bytes(torch.as_tensor(report.drift_coords))
    if report.worker_grad_coords is not None:
        w = torch.as_tensor(report.worker_grad_coords, dtype=torch.float64)
        msg.num_workers = int(w.shape[0]) if w.ndim else 0
        msg.worker_grad_coords = tensor_to_bytes(w)
    for k, v in report.hyper.items():
        msg.hyper[k] = float(v)
    for k, v in report.settings.items():
        msg.settings[k] = str(v)
    return msg


def report_from_proto(msg: pb.Report) -> Report:
    d = len(msg.grad_coords) // 8
    if d > MAX_SUBSPACE_DIM:
        raise MalformedMessageError(f"grad_coords holds {d} values; subspace_dim is at most {MAX_SUBSPACE_DIM}")
    y = bytes_to_tensor(msg.grad_coords, "grad_coords")
    workers = None
    if msg.num_workers or msg.worker_grad_coords:
        if msg.num_workers == 0 or msg.num_workers > MAX_WORKERS:
            raise MalformedMessageError(
                f"num_workers={msg.num_workers} does not describe worker_grad_coords "
                f"({len(msg.worker_grad_coords)} bytes); send both or neither"
            )
        workers = bytes_to_tensor(msg.worker_grad_coords, "worker_grad_coords", (msg.num_workers, d))
    return Report(
        step=int(msg.step),
        basis_version=int(msg.basis_version),
        grad_coords=y,
        grad_sqnorm=float(msg.grad_sqnorm),
        residual_step_dot=float(msg.residual_step_dot),
        source_coords=bytes_to_tensor(msg.source_coords, "source_coords") if msg.HasField("source_coords") else None,
        source_sqnorm=float(msg.source_sqnorm) if msg.HasField("source_sqnorm") else None,
        residual_sqnorm=float(msg.residual_sqnorm) if msg.HasField("residual_sqnorm") else None,
        prev_step_coords=(
            bytes_to_tensor(msg.prev_step_coords, "prev_step_coords") if msg.HasField("prev_step_coords") else None
        ),
        drift_coords=bytes_to_tensor(msg.drift_coords, "drift_coords") if msg.HasField("drift_coords") else None,
        worker_grad_coords=workers,
        hyper={k: _typed_hyper(k, v) for k, v in msg.hyper.items()},
        settings=dict(msg.settings),
    )


def _typed_hyper(name: str, value: float):
    kind = _FIELD_TYPES.get(name, float)
    if kind is bool:
        if value not in (0.0, 1.0):
            raise MalformedMessageError(f"hyperparameter {name}={value!r} must be 0 or 1 (a boolean)")
        return bool(value)
    if kind is int:
        if not math.isfinite(value) or value != int(value) or abs(value) > 2**62:
            raise MalformedMessageError(f"hyperparameter {name}={value!r} must be an integer")
        return int(value)
    return float(value)


# -------------------------------------------------------- DirectionUpdate
_DIAG_FIELDS = {
    "step": int, "basis_version": int, "negative_curvature": int, "rotation_angle_deg": float,
    "subspace_step_norm": float, "regression_residual": float, "noise_ratio": float,
    "eigh_fallbacks": int, "alive_directions": int, "used_eigh_fallback": bool,
}


def update_to_proto(update: DirectionUpdate) -> pb.DirectionUpdate:
    _check_fields(update, UPDATE_FIELDS)
    msg = pb.DirectionUpdate(
        step=int(update.step),
        base_version=int(update.base_version),
        new_version=int(update.new_version),
        step_coef=tensor_to_bytes(update.step_coef),
        complement_keep=float(update.complement_keep),
        reorthonormalize=bool(update.reorthonormalize),
    )
    if update.rotation is not None:
        msg.rotation = tensor_to_bytes(update.rotation)
    if update.residual_coef is not None:
        msg.residual_coef = tensor_to_bytes(update.residual_coef)
    diag = update.diagnostics or {}
    dm = msg.diagnostics
    for k, v in diag.items():
        if k == "eigenvalues":
            dm.eigenvalues = tensor_to_bytes(torch.as_tensor(v, dtype=torch.float64))
        elif k in _DIAG_FIELDS:
            setattr(dm, k, _DIAG_FIELDS[k](v))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            dm.extra[k] = float(v)
    return msg


def update_from_proto(msg: pb.DirectionUpdate) -> DirectionUpdate:
    step_coef = bytes_to_tensor(msg.step_coef, "step_coef")
    d = step_coef.shape[0]
    rotation = bytes_to_tensor(msg.rotation, "rotation", (d, d)) if msg.HasField("rotation") else None
    residual = bytes_to_tensor(msg.residual_coef, "residual_coef", (d,)) if msg.HasField("residual_coef") else None
    dm = msg.diagnostics
    diag: dict = {k: kind(getattr(dm, k)) for k, kind in _DIAG_FIELDS.items()}
    diag["eigenvalues"] = bytes_to_tensor(dm.eigenvalues, "eigenvalues").tolist()
    diag.update({k: float(v) for k, v in dm.extra.items()})
    return DirectionUpdate(
        step=int(msg.step),
        base_version=int(msg.base_version),
        new_version=int(msg.new_version),
        step_coef=step_coef,
        rotation=rotation,
        residual_coef=residual,
        complement_keep=float(msg.complement_keep),
        reorthonormalize=bool(msg.reorthonormalize),
        diagnostics=diag,
    )


# -------------------------------------------------------------- snapshot
_STATE_SCALARS = (
    "step", "basis_version", "subspace_dim", "negative_curvature", "alive_directions", "eigh_fallbacks",
    "rotation_angle_deg", "subspace_step_norm", "regression_residual", "noise_ratio",
)


def state_to_proto(job: str, snapshot: dict, updated_unix_s: float = 0.0, exchanges: int = 0) -> pb.CurvatureState:
    msg = pb.CurvatureState(job=job, updated_unix_s=float(updated_unix_s), exchanges=int(exchanges))
    for k in _STATE_SCALARS:
        if k in snapshot:
            setattr(msg, k, snapshot[k])
    for k in ("eigenvalues", "noise_var", "energy"):
        getattr(msg, k).extend(float(v) for v in snapshot.get(k, ()))
    return msg


def state_from_proto(msg: pb.CurvatureState) -> dict:
    out = {"job": msg.job}
    out.update({k: getattr(msg, k) for k in _STATE_SCALARS})
    for k in ("eigenvalues", "noise_var", "energy"):
        out[k] = list(getattr(msg, k))
    out["updated_unix_s"] = msg.updated_unix_s
    out["exchanges"] = msg.exchanges
    return out
