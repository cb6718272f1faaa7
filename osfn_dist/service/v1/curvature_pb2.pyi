from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExchangeRequest(_message.Message):
    __slots__ = ("job", "report")
    JOB_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    job: str
    report: Report
    def __init__(self, job: _Optional[str] = ..., report: _Optional[_Union[Report, _Mapping]] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("step", "basis_version", "grad_coords", "grad_sqnorm", "residual_step_dot", "worker_grad_coords", "num_workers", "hyper", "source_coords", "source_sqnorm", "residual_sqnorm", "prev_step_coords", "drift_coords", "settings")
    class HyperEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    BASIS_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRAD_COORDS_FIELD_NUMBER: _ClassVar[int]
    GRAD_SQNORM_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_STEP_DOT_FIELD_NUMBER: _ClassVar[int]
    WORKER_GRAD_COORDS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    HYPER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_COORDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SQNORM_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_SQNORM_FIELD_NUMBER: _ClassVar[int]
    PREV_STEP_COORDS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_COORDS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    step: int
    basis_version: int
    grad_coords: bytes
    grad_sqnorm: float
    residual_step_dot: float
    worker_grad_coords: bytes
    num_workers: int
    hyper: _containers.ScalarMap[str, float]
    source_coords: bytes
    source_sqnorm: float
    residual_sqnorm: float
    prev_step_coords: bytes
    drift_coords: bytes
    settings: _containers.ScalarMap[str, str]
    def __init__(self, step: _Optional[int] = ..., basis_version: _Optional[int] = ..., grad_coords: _Optional[bytes] = ..., grad_sqnorm: _Optional[float] = ..., residual_step_dot: _Optional[float] = ..., worker_grad_coords: _Optional[bytes] = ..., num_workers: _Optional[int] = ..., hyper: _Optional[_Mapping[str, float]] = ..., source_coords: _Optional[bytes] = ..., source_sqnorm: _Optional[float] = ..., residual_sqnorm: _Optional[float] = ..., prev_step_coords: _Optional[bytes] = ..., drift_coords: _Optional[bytes] = ..., settings: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DirectionUpdate(_message.Message):
    __slots__ = ("step", "base_version", "new_version", "step_coef", "rotation", "residual_coef", "reorthonormalize", "diagnostics", "complement_keep")
    STEP_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_COEF_FIELD_NUMBER: _ClassVar[int]
    ROTATION_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_COEF_FIELD_NUMBER: _ClassVar[int]
    REORTHONORMALIZE_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    COMPLEMENT_KEEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    base_version: int
    new_version: int
    step_coef: bytes
    rotation: bytes
    residual_coef: bytes
    reorthonormalize: bool
    diagnostics: Diagnostics
    complement_keep: float
    def __init__(self, step: _Optional[int] = ..., base_version: _Optional[int] = ..., new_version: _Optional[int] = ..., step_coef: _Optional[bytes] = ..., rotation: _Optional[bytes] = ..., residual_coef: _Optional[bytes] = ..., reorthonormalize: _Optional[bool] = ..., diagnostics: _Optional[_Union[Diagnostics, _Mapping]] = ..., complement_keep: _Optional[float] = ...) -> None: ...

class Diagnostics(_message.Message):
    __slots__ = ("step", "basis_version", "eigenvalues", "negative_curvature", "rotation_angle_deg", "subspace_step_norm", "regression_residual", "noise_ratio", "eigh_fallbacks", "alive_directions", "used_eigh_fallback", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    BASIS_VERSION_FIELD_NUMBER: _ClassVar[int]
    EIGENVALUES_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CURVATURE_FIELD_NUMBER: _ClassVar[int]
    ROTATION_ANGLE_DEG_FIELD_NUMBER: _ClassVar[int]
    SUBSPACE_STEP_NORM_FIELD_NUMBER: _ClassVar[int]
    REGRESSION_RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    NOISE_RATIO_FIELD_NUMBER: _ClassVar[int]
    EIGH_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    USED_EIGH_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    step: int
    basis_version: int
    eigenvalues: bytes
    negative_curvature: int
    rotation_angle_deg: float
    subspace_step_norm: float
    regression_residual: float
    noise_ratio: float
    eigh_fallbacks: int
    alive_directions: int
    used_eigh_fallback: bool
    extra: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., basis_version: _Optional[int] = ..., eigenvalues: _Optional[bytes] = ..., negative_curvature: _Optional[int] = ..., rotation_angle_deg: _Optional[float] = ..., subspace_step_norm: _Optional[float] = ..., regression_residual: _Optional[float] = ..., noise_ratio: _Optional[float] = ..., eigh_fallbacks: _Optional[int] = ..., alive_directions: _Optional[int] = ..., used_eigh_fallback: _Optional[bool] = ..., extra: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class WatchStateRequest(_message.Message):
    __slots__ = ("job", "min_interval_s")
    JOB_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    job: str
    min_interval_s: float
    def __init__(self, job: _Optional[str] = ..., min_interval_s: _Optional[float] = ...) -> None: ...

class CurvatureState(_message.Message):
    __slots__ = ("job", "step", "basis_version", "subspace_dim", "eigenvalues", "negative_curvature", "noise_var", "energy", "alive_directions", "eigh_fallbacks", "rotation_angle_deg", "subspace_step_norm", "regression_residual", "noise_ratio", "updated_unix_s", "exchanges")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BASIS_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUBSPACE_DIM_FIELD_NUMBER: _ClassVar[int]
    EIGENVALUES_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CURVATURE_FIELD_NUMBER: _ClassVar[int]
    NOISE_VAR_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    ALIVE_DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    EIGH_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_ANGLE_DEG_FIELD_NUMBER: _ClassVar[int]
    SUBSPACE_STEP_NORM_FIELD_NUMBER: _ClassVar[int]
    REGRESSION_RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    NOISE_RATIO_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    basis_version: int
    subspace_dim: int
    eigenvalues: _containers.RepeatedScalarFieldContainer[float]
    negative_curvature: int
    noise_var: _containers.RepeatedScalarFieldContainer[float]
    energy: _containers.RepeatedScalarFieldContainer[float]
    alive_directions: int
    eigh_fallbacks: int
    rotation_angle_deg: float
    subspace_step_norm: float
    regression_residual: float
    noise_ratio: float
    updated_unix_s: float
    exchanges: int
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., basis_version: _Optional[int] = ..., subspace_dim: _Optional[int] = ..., eigenvalues: _Optional[_Iterable[float]] = ..., negative_curvature: _Optional[int] = ..., noise_var: _Optional[_Iterable[float]] = ..., energy: _Optional[_Iterable[float]] = ..., alive_directions: _Optional[int] = ..., eigh_fallbacks: _Optional[int] = ..., rotation_angle_deg: _Optional[float] = ..., subspace_step_norm: _Optional[float] = ..., regression_residual: _Optional[float] = ..., noise_ratio: _Optional[float] = ..., updated_unix_s: _Optional[float] = ..., exchanges: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, jobs: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ("remaining_jobs",)
    REMAINING_JOBS_FIELD_NUMBER: _ClassVar[int]
    remaining_jobs: int
    def __init__(self, remaining_jobs: _Optional[int] = ...) -> None: ...
