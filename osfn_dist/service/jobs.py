"""One curvature model per training job, with exactly-once exchanges and a state file.

- Exactly once per (job, step): a job remembers its last accepted report (its step, a digest
  of its bytes) and the encoded reply. The identical report sent again (a client retrying
  after a lost reply or a server restart) gets that reply again; a *different* report for
  that step, a report for an earlier step, or a step outside [1, 2**53] is refused with
  ``ReportOrderError`` and nothing changes. Steps must increase, not necessarily by one
  (``curvature_every > 1`` and skipped non-finite steps leave gaps).
- All-or-nothing: the service validates before it mutates; on top of that a job restores
  the previous state when an exchange raises unexpectedly, drives the model to non-finite
  values (e.g. finite but absurdly large projections that overflow) or cannot be saved, so
  a bad message or a full disk never leaves a half-updated or unsaved-but-acknowledged model.
- Persistence (optional, ``statelog.StateLog``): each accepted exchange appends its own job's
  record to an append-only, checksummed log and waits for it to reach the disk before the
  reply leaves (``save_every=1``), so a server killed at any moment restarts exactly where
  its clients are. The cost per exchange does not depend on the number of jobs, and no
  global lock is held while writing.
"""
from __future__ import annotations

import hashlib
import threading
import time

import torch

from ..core.config import OSFNConfig
from ..core.errors import InvalidReportError
from ..dataflow.messages import Report
from ..dataflow.curvature import CurvatureService
from .convert import update_to_proto
from .errors import ReportOrderError, StateFileError
from .statelog import StateLog, encode_record

MAX_STEP = 2**53  # steps are counted in doubles elsewhere; anything above is a corrupt report


class JobNotFound(LookupError):
    pass


class TooManyJobs(RuntimeError):
    pass


class _Retired(Exception):
    """The job was dropped (its first report failed, or DeleteJob) while this call waited for it."""


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
        self.unsaved = 0  # accepted exchanges not in the state file yet
        self.retired = False  # dropped from the registry; callers holding it must look again

    def _check_order(self, step: int, request_digest: bytes) -> bool:
        """True: the identical last report again (answer from the cache). Raises
        ReportOrderError for anything else that is not a new, later step."""
        if not 1 <= step <= MAX_STEP:
            raise ReportOrderError(
                f"job {self.name!r}: report step {step} is outside [1, 2**53]; steps count from 1"
            )
        if self.last_key is None:
            return False
        last = self.last_key[0]
        if step == last:
            if request_digest == self.last_digest:
                return True
            raise ReportOrderError(
                f"job {self.name!r} already took step {step} with a different report: a retry must resend "
                f"the identical report, a new step needs a step number above {last}. Two trainers on one "
                "job name? Give each its own job"
            )
        if step < last:
            raise ReportOrderError(
                f"job {self.name!r} is at step {last}; a report for step {step} is out of order (a late "
                "duplicate, or a trainer resumed from an older checkpoint: resume it under a new job name "
                "or delete the job first)"
            )
        return False

    def exchange(self, report: Report, request_digest: bytes, persist=None) -> tuple[bytes, bool]:
        """Returns (encoded DirectionUpdate, whether it is a replay of the cached reply).
        ``persist(job, record)``, if given, must write the job's record durably or raise; the
        exchange is rolled back when it raises."""
        step = int(report.step)
        with self.lock:
            if self.retired:
                raise _Retired()
            if self._check_order(step, request_digest):
                return self.last_reply, True
            before = self.service.state_dict()
            before_meta = (self.last_key, self.last_digest, self.last_reply, self.exchanges, self.updated_unix_s)
            try:
                update = self.service.exchange(report)
                if not _service_finite(self.service, update):
                    raise InvalidReportError(
                        "the report drove the curvature model to non-finite values (overflow); it was "
                        "rejected and the model kept its previous state"
                    )
            except torch.linalg.LinAlgError as exc:
                self.service.load_state_dict(before)
                raise InvalidReportError(
                    f"the report made the curvature solve fail ({exc}); it was rejected and the model kept "
                    "its previous state. Check the gradient and step scale"
                ) from None
            except Exception:
                # The service validates before it mutates; restoring also covers overflow and
                # any unexpected failure half-way through an exchange.
                self.service.load_state_dict(before)
                raise
            reply = update_to_proto(update).SerializeToString()
            self.last_key, self.last_digest, self.last_reply = (step, int(report.basis_version)), request_digest, reply
            self.exchanges += 1
            self.updated_unix_s = time.time()
            self.unsaved += 1
            if persist is not None and persist(self):
                try:
                    persist_record = self._record_locked()
                    persist(self, persist_record)
                except BaseException:
                    self.service.load_state_dict(before)
                    (self.last_key, self.last_digest, self.last_reply, self.exchanges, self.updated_unix_s) = before_meta
                    self.unsaved -= 1
                    raise
                self.unsaved = 0
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

    def _record_locked(self) -> bytes:
        return encode_record({"kind": "job", "job": self.name, "state": self._state_dict_locked()})

    def state_dict(self) -> dict:
        with self.lock:
            return self._state_dict_locked()

    def load_state_dict(self, sd: dict) -> None:
        with self.lock:
            self.service.load_state_dict(sd["service"])
            self.last_key = tuple(int(v) for v in sd["last_key"]) if sd.get("last_key") is not None else None
            self.last_digest = bytes(sd.get("last_digest", b""))
            self.last_reply = bytes(sd.get("last_reply", b""))
            self.exchanges = int(sd.get("exchanges", 0))
            self.updated_unix_s = float(sd.get("updated_unix_s", 0.0))
            self.unsaved = 0


class JobRegistry:
    """Jobs by name, created on their first valid report; optional state file."""

    def __init__(
        self, config: OSFNConfig, allow_stale: bool = False, max_jobs: int = 256,
        state_file: str | None = None, save_every: int = 1,
    ):
        if int(save_every) < 0:
            raise StateFileError(f"--save-every {save_every} must be >= 0 (0: only at shutdown)")
        self.config = config
        self.allow_stale = allow_stale
        self.max_jobs = max_jobs
        self.state_file = state_file
        self.save_every = int(save_every)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._log: StateLog | None = None
        self.deleted = 0

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
                        f"this server already holds {self.max_jobs} jobs (--max-jobs); reuse a job name, "
                        "delete finished jobs (DeleteJob) or start the server with a larger --max-jobs"
                    )
                job = self._jobs[name] = Job(name, CurvatureService(self.config, allow_stale=self.allow_stale))
            return job

    def _persist(self, job: Job, record: bytes | None = None):
        """Called twice under the job's lock: without a record it answers whether this
        exchange must be saved now; with one it appends it (raising leaves the log unchanged)."""
        if record is None:
            return self._log is not None and self.save_every > 0 and job.unsaved >= self.save_every
        self._log.append(job.name, record)
        return True

    def exchange(self, name: str, report: Report, request_digest: bytes) -> tuple[bytes, bool]:
        while True:
            job = self._get_or_create(name)
            try:
                return job.exchange(report, request_digest, persist=self._persist if self._log else None)
            except _Retired:
                continue
            except Exception:
                # a job whose first report failed is dropped (it does not count against max_jobs)
                with job.lock, self._lock:
                    if job.exchanges == 0 and job.service.step == 0 and self._jobs.get(name) is job:
                        del self._jobs[name]
                        job.retired = True
                raise

    def delete(self, name: str) -> bool:
        """Forget a job (and record that in the state file); False if there was none."""
        with self._lock:
            job = self._jobs.get(name)
        if job is None:
            return False
        with job.lock:
            if job.retired:
                return False
            if self._log is not None:
                self._log.append(name, None)  # raises (and nothing changes) if it cannot be saved
            with self._lock:
                if self._jobs.get(name) is job:
                    del self._jobs[name]
            job.retired = True
            self.deleted += 1
        with job.changed:
            job.seq += 1
            job.changed.notify_all()
        return True

    # ------------------------------------------------------ persistence
    def save(self) -> None:
        """Write every job's unsaved exchanges and compact the state file (at shutdown)."""
        if self._log is None:
            return
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            with job.lock:
                if job.unsaved and not job.retired and (job.exchanges or job.service.step):
                    self._log.append(job.name, job._record_locked())
                    job.unsaved = 0
        self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def load(self) -> int:
        """Open the state file (check its directory, lock it, remove leftovers of a killed
        save) and restore every job in it; returns the number of jobs."""
        if not self.state_file:
            return 0
        log_ = StateLog(self.state_file, self.config.subspace_dim)
        states = log_.open()
        try:
            for name, sd in states.items():
                job = Job(name, CurvatureService(self.config, allow_stale=self.allow_stale))
                job.load_state_dict(sd)
                with self._lock:
                    self._jobs[name] = job
        except Exception as exc:
            log_.close()
            raise StateFileError(
                f"state file {self.state_file} holds a job that cannot be restored ({type(exc).__name__}: {exc}); "
                "move the file away to start fresh"
            ) from None
        self._log = log_
        return len(states)
