"""One curvature model per training job, with retry-safe exchanges and a state file.

- Idempotency: a job remembers its last accepted report (key (step, basis_version) and a
  digest of its bytes) and the encoded reply; an identical report sent again (a client
  retrying after a lost reply or a server restart) gets that reply again instead of
  stepping the model twice.
- All-or-nothing: the service validates before it mutates; on top of that a job restores
  the previous state when an exchange raises unexpectedly or drives the model to
  non-finite values (e.g. finite but absurdly large projections that overflow), so a bad
  message never leaves a half-updated model behind.
- Persistence (optional): every job's state and its cached reply go to one file
  (``torch.save``; written to a temporary file, then renamed). With ``save_every=1`` the
  file is written before a reply leaves the server, so a server killed at any moment
  restarts exactly where its clients are.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time

import torch

from ..core.config import OSFNConfig
from ..core.errors import ConfigError, DimensionMismatchError
from ..dataflow.messages import Report
from ..dataflow.curvature import CurvatureService
from .convert import update_to_proto

STATE_FILE_FORMAT = 1


class JobNotFound(LookupError):
    pass


class TooManyJobs(RuntimeError):
    pass


class _Retired(Exception):
    """The job was dropped (its first report failed) while this call waited for it."""


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _service_finite(service: CurvatureService, update) -> bool:
    tensors = [service.position, service.momentum, service.energy, service.noise_var, service.eigenvalues]
    tensors += [v for v in service.stats.state_dict().values() if isinstance(v, torch.Tensor)]
    tensors += [t for t in (update.step_coef, update.rotation, update.residual_coef) if t is not None]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class Job:
    def __init__(self, name: str, service: CurvatureService):
        self.name = name
        self.service = service
        self.lock = threading.Lock()
        self.changed = threading.Condition()
        self.seq = 0  # bumped after every accepted exchange (watchers wait on it)
        self.exchanges = 0
        self.updated_unix_s = 0.0
        self.last_key: tuple[int, int] | None = None
        self.last_digest = b""
        self.last_reply = b""
        self.saved: dict | None = None  # the job's state as of its last accepted exchange
        self.retired = False  # dropped from the registry; callers holding it must look again

    def exchange(self, report: Report, request_digest: bytes, persist: bool) -> tuple[bytes, bool]:
        """Returns (encoded DirectionUpdate, whether it is a replay of the cached reply)."""
        key = (int(report.step), int(report.basis_version))
        with self.lock:
            if self.retired:
                raise _Retired()
            if key == self.last_key and request_digest == self.last_digest:
                return self.last_reply, True
            before = self.service.state_dict()
            try:
                update = self.service.exchange(report)
                if not _service_finite(self.service, update):
                    raise DimensionMismatchError(
                        "the report drove the curvature model to non-finite values (overflow); it was "
                        "rejected and the model kept its previous state"
                    )
            except Exception:
                # The service validates before it mutates; restoring also covers overflow and
                # any unexpected failure half-way through an exchange.
                self.service.load_state_dict(before)
                raise
            reply = update_to_proto(update).SerializeToString()
            self.last_key, self.last_digest, self.last_reply = key, request_digest, reply
            self.exchanges += 1
            self.updated_unix_s = time.time()
            if persist:
                self.saved = self._state_dict_locked()
        with self.changed:
            self.seq += 1
            self.changed.notify_all()
        return reply, False

    def _state_dict_locked(self) -> dict:
        return {
            "service": self.service.state_dict(),
            "last_key": self.last_key,
            "last_digest": self.last_digest,
            "last_reply": self.last_reply,
            "exchanges": self.exchanges,
            "updated_unix_s": self.updated_unix_s,
        }

    def state_dict(self) -> dict:
        with self.lock:
            return self._state_dict_locked()

    def load_state_dict(self, sd: dict) -> None:
        with self.lock:
            self.service.load_state_dict(sd["service"])
            self.last_key = tuple(sd["last_key"]) if sd.get("last_key") is not None else None
            self.last_digest = sd.get("last_digest", b"")
            self.last_reply = sd.get("last_reply", b"")
            self.exchanges = int(sd.get("exchanges", 0))
            self.updated_unix_s = float(sd.get("updated_unix_s", 0.0))
            self.saved = self._state_dict_locked()


class JobRegistry:
    """Jobs by name, created on their first valid report; optional state file."""

    def __init__(
        self, config: OSFNConfig, allow_stale: bool = False, max_jobs: int = 256,
        state_file: str | None = None, save_every: int = 1,
    ):
        self.config = config
        self.allow_stale = allow_stale
        self.max_jobs = max_jobs
        self.state_file = state_file
        self.save_every = save_every
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._unsaved = 0

    # ------------------------------------------------------------ jobs
    def get(self, name: str) -> Job:
        with self._lock:
            job = self._jobs.get(name)
        if job is None:
            raise JobNotFound(f"no curvature model for job {name!r} on this server yet")
        return job

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, j in self._jobs.items() if j.exchanges or j.service.step)

    def _get_or_create(self, name: str) -> Job:
        with self._lock:
            job = self._jobs.get(name)
            if job is None:
                if len(self._jobs) >= self.max_jobs:
                    raise TooManyJobs(
                        f"this server already holds {self.max_jobs} jobs (--max-jobs); reuse a job name "
                        "or start the server with a larger --max-jobs"
                    )
                job = self._jobs[name] = Job(name, CurvatureService(self.config, allow_stale=self.allow_stale))
            return job

    def exchange(self, name: str, report: Report, request_digest: bytes) -> tuple[bytes, bool]:
        while True:
            job = self._get_or_create(name)
            try:
                reply, replay = job.exchange(report, request_digest, persist=self.state_file is not None)
                break
            except _Retired:
                continue
            except Exception:
                # a job whose first report failed is dropped (it does not count against max_jobs)
                with job.lock, self._lock:
                    if job.exchanges == 0 and job.service.step == 0 and self._jobs.get(name) is job:
                        del self._jobs[name]
                        job.retired = True
                raise
        if not replay and self.state_file and self.save_every:
            with self._save_lock:
                self._unsaved += 1
                due = self._unsaved >= self.save_every
            if due:
                self.save()  # before the reply leaves: a crash never loses an acknowledged step
        return reply, replay

    # ------------------------------------------------------ persistence
    def save(self) -> None:
        if not self.state_file:
            return
        with self._save_lock:
            with self._lock:
                jobs = {n: j.saved for n, j in self._jobs.items() if j.saved is not None}
            tmp = f"{self.state_file}.tmp.{os.getpid()}"
            with open(tmp, "wb") as fh:
                torch.save({"format": STATE_FILE_FORMAT, "subspace_dim": self.config.subspace_dim, "jobs": jobs}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_file)
            self._unsaved = 0

    def load(self) -> int:
        """Restore every job from the state file if it exists; returns the number of jobs."""
        if not self.state_file or not os.path.exists(self.state_file):
            return 0
        data = torch.load(self.state_file, weights_only=True)
        if data.get("format") != STATE_FILE_FORMAT:
            raise ConfigError(
                f"state file {self.state_file} has format {data.get('format')!r}, this build reads "
                f"{STATE_FILE_FORMAT}; move it away to start fresh"
            )
        if data.get("subspace_dim") != self.config.subspace_dim:
            raise DimensionMismatchError(
                f"state file {self.state_file} holds models with subspace_dim={data.get('subspace_dim')}, "
                f"the server was started with {self.config.subspace_dim}; pass the same --subspace-dim"
            )
        for name, sd in data["jobs"].items():
            job = Job(name, CurvatureService(self.config, allow_stale=self.allow_stale))
            job.load_state_dict(sd)
            with self._lock:
                self._jobs[name] = job
        return len(data["jobs"])
