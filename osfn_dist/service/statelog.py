"""The server's state file: an append-only log of checksummed job records, compacted.

Layout (little-endian)::

    b"OSFNLOG\\x01"                                    file magic, 8 bytes
    record*                                           the first one is the header
    record  = b"OSFR" | u32 length | u32 crc32(payload) | u32 crc32(first 12 bytes) | payload
    payload = u32 json length | JSON | binary blob    (tensors and bytes live in the blob)

The header record holds ``{"kind": "header", "format": 2, "subspace_dim": d}``; every other
record is ``{"kind": "job", "job": name, "state": ...}`` (the job's whole d-sized state as of
an accepted exchange) or ``{"kind": "delete", "job": name}``. The last record of a job wins.

- One exchange appends one record of its own job and waits for ``fdatasync`` — never a
  rewrite of the other jobs, so the cost does not grow with the number of jobs; concurrent
  exchanges share one ``fdatasync`` (group commit). A failed write is cut off again
  (``ftruncate``) and raised; a failed ``fdatasync`` leaves the log refusing further writes
  (the caller rolls the step back either way).
- When the file is more than 4× its live records (and 1 MiB), it is compacted: the latest
  record of every job is copied to ``<file>.tmp.<pid>``, which is fsynced and renamed over the
  file. Leftover temporary files (a kill during compaction) are removed at start-up.
- Loading verifies every checksum. A record cut short at the end of the file (a kill
  during an append, never acknowledged) is dropped with a warning; anything else that does
  not verify refuses the start with ``StateFileError`` naming the file, the byte offset and
  what to do.
- ``<file>.lock`` is held (``flock``) while the log is open: a second server on the same
  state file refuses to start.
- Files of the earlier format (one ``torch.save`` zip) are read once and rewritten in this one.
"""
from __future__ import annotations

import ctypes
import fcntl
import glob
import io
import json
import logging
import os
import struct
import threading
import zlib

import torch

from .errors import StateFileError

log = logging.getLogger("osfn_dist.service")

FILE_MAGIC = b"OSFNLOG\x01"
RECORD_MAGIC = b"OSFR"
FORMAT = 2
LEGACY_FORMAT = 1
_HEAD = struct.Struct("<4sIII")
_U32 = struct.Struct("<I")
COMPACT_MIN_BYTES = 1 << 20
COMPACT_FACTOR = 4
MAX_RECORD_BYTES = (1 << 32) - 1
_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float64, torch.float32, torch.int64, torch.int32, torch.bool, torch.uint8)}
_WHAT_TO_DO = (
    "Restore the file from a backup, or move it away to start with no jobs (their trainers then "
    "see a version mismatch and must resume from a checkpoint under a new job name)"
)


# ------------------------------------------------------------------ payload codec
def _encode_tree(obj, blob: bytearray):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1).clone()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise TypeError(f"cannot store a {t.dtype} tensor in the state file")
        data = _raw_bytes(t)
        ref = {"$t": [name, list(obj.shape), len(blob), len(data)]}
        blob += data
        return ref
    if isinstance(obj, (bytes, bytearray)):
        ref = {"$b": [len(blob), len(obj)]}
        blob += obj
        return ref
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str) or k.startswith("$"):
                raise TypeError(f"state dict key {k!r} cannot be stored")
            out[k] = _encode_tree(v, blob)
        return out
    if isinstance(obj, (list, tuple)):
        return [_encode_tree(v, blob) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in the state file")


def _raw_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor (``bytes(storage)`` goes element by element: 100× slower)."""
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def _decode_tree(obj, blob: memoryview):
    if isinstance(obj, dict):
        if "$t" in obj:
            name, shape, off, n = obj["$t"]
            dtype = _DTYPES[name]
            numel = 1
            for s in shape:
                numel *= int(s)
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if off < 0 or n != numel * itemsize or off + n > len(blob):
                raise ValueError("tensor reference out of range")
            if numel == 0:
                return torch.zeros(shape, dtype=dtype)
            return torch.frombuffer(bytearray(blob[off:off + n]), dtype=dtype).reshape(shape)
        if "$b" in obj:
            off, n = obj["$b"]
            if off < 0 or n < 0 or off + n > len(blob):
                raise ValueError("bytes reference out of range")
            return bytes(blob[off:off + n])
        return {k: _decode_tree(v, blob) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_tree(v, blob) for v in obj]
    return obj


def encode_record(meta: dict) -> bytes:
    """A framed record (header + payload) for ``meta`` (a JSON-able dict with tensors/bytes)."""
    blob = bytearray()
    tree = json.dumps(_encode_tree(meta, blob), separators=(",", ":")).encode()
    payload = _U32.pack(len(tree)) + tree + bytes(blob)
    if len(payload) > MAX_RECORD_BYTES:
        raise StateFileError(f"a job record of {len(payload)} bytes is too large for the state file")
    head = RECORD_MAGIC + _U32.pack(len(payload)) + _U32.pack(zlib.crc32(payload))
    return head + _U32.pack(zlib.crc32(head)) + payload


def _split_payload(payload: memoryview) -> tuple[dict, memoryview]:
    (n,) = _U32.unpack_from(payload, 0)
    if 4 + n > len(payload):
        raise ValueError("JSON length out of range")
    meta = json.loads(bytes(payload[4:4 + n]))
    if not isinstance(meta, dict):
        raise ValueError("record is not an object")
    return meta, payload[4 + n:]


def decode_payload(payload) -> dict:
    meta, blob = _split_payload(memoryview(payload))
    return _decode_tree(meta, blob)


def _scan(path: str, data: memoryview):
    """Yields (offset, length, meta-without-blob) of each record; the last item may be
    ("torn", offset). Raises StateFileError on anything that does not verify."""
    pos = len(FILE_MAGIC)
    index = 0
    while pos < len(data):
        if len(data) - pos < _HEAD.size:
            yield "torn", pos
            return
        magic, length, crc, head_crc = _HEAD.unpack_from(data, pos)
        if magic != RECORD_MAGIC or zlib.crc32(data[pos:pos + 12]) != head_crc:
            raise StateFileError(
                f"state file {path} is corrupt: record {index} at byte {pos} has a damaged header "
                f"(bad marker or checksum). {_WHAT_TO_DO}"
            )
        start = pos + _HEAD.size
        if start + length > len(data):
            yield "torn", pos
            return
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            raise StateFileError(
                f"state file {path} is corrupt: record {index} at byte {pos} fails its checksum "
                f"(its data changed on disk). {_WHAT_TO_DO}"
            )
        try:
            meta, _ = _split_payload(payload)
        except (ValueError, struct.error) as exc:
            raise StateFileError(
                f"state file {path}: record {index} at byte {pos} verifies but cannot be read ({exc}); "
                f"it was written by another build? {_WHAT_TO_DO}"
            ) from None
        yield pos, _HEAD.size + length, meta
        pos = start + length
        index += 1


class StateLog:
    """The open state file of one server (see the module docstring)."""

    def __init__(self, path: str, subspace_dim: int):
        self.path = os.path.abspath(path)
        self.subspace_dim = int(subspace_dim)
        self._lock = threading.Lock()  # appends and compaction
        self._sync = threading.Condition()  # group commit
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._size = 0
        self._written = self._synced = 0
        self._syncing = False
        self._broken: str | None = None
        self._index: dict[str, tuple[int, int]] = {}  # job → (offset, length) of its latest record
        self._live = 0
        self._compact_at = COMPACT_MIN_BYTES

    # ------------------------------------------------------------ opening
    def open(self) -> dict[str, dict]:
        """Check the path, take the lock, clean up, load; returns {job: state dict}."""
        directory = os.path.dirname(self.path) or "."
        if os.path.isdir(self.path):
            raise StateFileError(f"--state-file {self.path} is a directory; give a file path inside it")
        if not os.path.isdir(directory):
            raise StateFileError(
                f"--state-file {self.path}: the directory {directory} does not exist; create it (mkdir -p) "
                "or choose another path"
            )
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StateFileError(f"--state-file {self.path}: the directory {directory} is not writable")
        try:
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(self._lock_fd)
            self.close()
            raise StateFileError(
                f"state file {self.path} is in use by another osfn-dist serve{f' (pid {owner})' if owner else ''}; "
                "two servers must not share one state file: stop the other or give each its own --state-file"
            ) from None
        except OSError as exc:
            self.close()
            raise StateFileError(f"cannot lock {self.path}.lock: {exc.strerror}") from None
        try:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)
            self._remove_leftovers()
            jobs = self._load()
        except BaseException:
            self.close()
            raise
        return jobs

    def _remove_leftovers(self) -> None:
        for tmp in glob.glob(glob.escape(self.path) + ".tmp.*"):
            try:
                os.unlink(tmp)
                log.warning("removed %s, left behind by a server killed while saving", tmp)
            except OSError as exc:  # pragma: no cover - e.g. a directory of that name
                log.warning("cannot remove %s: %s", tmp, exc)

    def _load(self) -> dict[str, dict]:
        if not os.path.exists(self.path):
            try:
                self._rewrite({})
            except OSError as exc:
                raise StateFileError(f"cannot create state file {self.path}: {exc.strerror}") from None
            return {}
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise StateFileError(f"cannot read state file {self.path}: {exc.strerror}") from None
        if raw.startswith(b"PK\x03\x04"):
            jobs = self._load_legacy()
            log.warning("state file %s has format %d; rewriting it as format %d", self.path, LEGACY_FORMAT, FORMAT)
            self._rewrite({name: encode_record({"kind": "job", "job": name, "state": sd}) for name, sd in jobs.items()})
            return jobs
        if not raw.startswith(FILE_MAGIC):
            what = "is empty" if not raw else "is not an osfn-dist state file (unknown header)"
            raise StateFileError(f"state file {self.path} {what}. {_WHAT_TO_DO}")
        data = memoryview(raw)
        latest: dict[str, tuple[int, int]] = {}
        header = None
        end = len(data)
        for item in _scan(self.path, data):
            if item[0] == "torn":
                end = item[1]
                log.warning("state file %s: dropped an incomplete last record at byte %d (a kill during a "
                            "save; that exchange was never acknowledged)", self.path, end)
                break
            off, length, meta = item
            kind = meta.get("kind")
            if header is None:
                if kind != "header":
                    raise StateFileError(f"state file {self.path} has no header record. {_WHAT_TO_DO}")
                header = meta
                continue
            if kind == "job":
                latest[str(meta["job"])] = (off, length)
            elif kind == "delete":
                latest.pop(str(meta["job"]), None)
            else:
                raise StateFileError(f"state file {self.path}: record at byte {off} has unknown kind {kind!r}")
        if header is None:
            raise StateFileError(f"state file {self.path} has no header record. {_WHAT_TO_DO}")
        if header.get("format") != FORMAT:
            raise StateFileError(
                f"state file {self.path} has format {header.get('format')!r}, this build reads {FORMAT}; "
                "use the osfn-dist version that wrote it, or move it away to start fresh"
            )
        if header.get("subspace_dim") != self.subspace_dim:
            raise StateFileError(
                f"state file {self.path} holds models with subspace_dim={header.get('subspace_dim')}, the server "
                f"was started with {self.subspace_dim}; pass the same --subspace-dim"
            )
        jobs = {}
        for name, (off, length) in latest.items():
            try:
                jobs[name] = decode_payload(data[off + _HEAD.size:off + length])["state"]
            except (ValueError, KeyError, TypeError, struct.error) as exc:
                raise StateFileError(f"state file {self.path}: job {name!r} cannot be read ({exc}). {_WHAT_TO_DO}") from None
        if end < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self._size = end
        self._index = latest
        self._live = sum(length for _, length in latest.values())
        self._compact_at = max(COMPACT_MIN_BYTES, COMPACT_FACTOR * self._live)
        return jobs

    def _load_legacy(self) -> dict[str, dict]:
        try:
            data = torch.load(self.path, weights_only=True)
            fmt, dim, jobs = data.get("format"), data.get("subspace_dim"), data["jobs"]
        except Exception as exc:  # a damaged zip raises many types
            raise StateFileError(
                f"state file {self.path} (format {LEGACY_FORMAT}) cannot be read: {type(exc).__name__}: {exc}. "
                f"{_WHAT_TO_DO}"
            ) from None
        if fmt != LEGACY_FORMAT:
            raise StateFileError(f"state file {self.path} has format {fmt!r}; move it away to start fresh")
        if dim != self.subspace_dim:
            raise StateFileError(
                f"state file {self.path} holds models with subspace_dim={dim}, the server was started with "
                f"{self.subspace_dim}; pass the same --subspace-dim"
            )
        return dict(jobs)

    # ------------------------------------------------------------ writing
    def _header(self) -> bytes:
        return FILE_MAGIC + encode_record({"kind": "header", "format": FORMAT, "subspace_dim": self.subspace_dim})

    def _rewrite(self, records: dict[str, bytes]) -> None:
        """Write header + records to a temporary file, fsync, rename over the file, reopen."""
        tmp = f"{self.path}.tmp.{os.getpid()}"
        index, pos = {}, 0
        try:
            with open(tmp, "wb") as fh:
                fh.write(self._header())
                pos = fh.tell()
                for name, rec in records.items():
                    fh.write(rec)
                    index[name] = (pos, len(rec))
                    pos += len(rec)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(os.path.dirname(self.path))
        old, self._fd = self._fd, os.open(self.path, os.O_RDWR | os.O_APPEND)
        if old is not None:
            os.close(old)
        self._size, self._index = pos, index
        self._live = sum(len(r) for r in records.values())
        self._compact_at = max(COMPACT_MIN_BYTES, COMPACT_FACTOR * self._live)

    def append(self, job: str, record: bytes | None) -> None:
        """Durably append ``record`` (from ``encode_record``) for ``job``; None = a deletion
        record. Returns once it is on disk; raises StateFileError (nothing appended) if not."""
        if record is None:
            record = encode_record({"kind": "delete", "job": job})
            deleting = True
        else:
            deleting = False
        with self._lock:
            if self._broken:
                raise StateFileError(self._broken)
            if self._fd is None:
                raise StateFileError(f"state file {self.path} is closed")
            off = self._size
            try:
                _write_all(self._fd, record)
            except OSError as exc:
                try:
                    os.ftruncate(self._fd, off)
                except OSError as exc2:
                    self._broken = (f"state file {self.path} could not be written ({exc.strerror}) nor cut back "
                                    f"({exc2.strerror}); restart the server")
                raise StateFileError(f"state file {self.path} could not be written: {exc.strerror}") from None
            self._size += len(record)
            if deleting:
                old = self._index.pop(job, None)
            else:
                old = self._index.get(job)
                self._index[job] = (off, len(record))
                self._live += len(record)
            if old is not None:
                self._live -= old[1]
            self._written += 1
            mine = self._written
        self._sync_to(mine)
        if self._size > self._compact_at:
            self.compact()

    def _sync_to(self, mine: int) -> None:
        with self._sync:
            while self._synced < mine:
                if self._broken:
                    raise StateFileError(self._broken)
                if self._syncing:
                    self._sync.wait()
                    continue
                self._syncing = True  # compaction waits for this flag before it swaps the file
                target, fd = self._written, self._fd  # every record counted in _written is written
                self._sync.release()
                error = None
                try:
                    if fd is None:
                        raise OSError(9, "the state file was closed")
                    os.fdatasync(fd)
                except OSError as exc:
                    error = exc
                finally:
                    self._sync.acquire()
                    self._syncing = False
                    if error is None:
                        self._synced = max(self._synced, target)
                    else:
                        self._broken = (f"state file {self.path}: fdatasync failed ({error.strerror}); what reached "
                                        "the disk is unknown, so the server stops saving: restart it")
                    self._sync.notify_all()

    def compact(self) -> None:
        """Rewrite the file with the latest record of every job (see the module docstring)."""
        with self._lock:
            if self._fd is None or self._broken or self._size <= self._compact_at:
                return
            with self._sync:
                while self._syncing:
                    self._sync.wait()
                self._syncing = True
            try:
                records = {name: os.pread(self._fd, length, off) for name, (off, length) in self._index.items()}
                self._rewrite(records)
                with self._sync:
                    self._synced = self._written
            except OSError as exc:
                self._compact_at = 2 * self._size  # try again much later; appends go on
                log.warning("compacting state file %s failed (%s); it keeps growing", self.path, exc)
            finally:
                with self._sync:
                    self._syncing = False
                    self._sync.notify_all()

    def flush(self) -> None:
        """Compact now (at shutdown)."""
        with self._lock:
            self._compact_at = 0
        self.compact()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    @property
    def size(self) -> int:
        return self._size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _read_pid(fd: int | None) -> str:
    if fd is None:
        return ""
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def legacy_bytes(jobs: dict, subspace_dim: int) -> bytes:
    """A state file in the earlier format (for tests of the upgrade path)."""
    buf = io.BytesIO()
    torch.save({"format": LEGACY_FORMAT, "subspace_dim": subspace_dim, "jobs": jobs}, buf)
    return buf.getvalue()
