"""Native CPU kernels for the passes over V (``native_pass.c``), built on first use.

The collect pass (``collect``: the source and θ copied out of the parameters' buffers, Vᵀg,
Vᵀu and their norms), the apply pass (``move_into_params_`` / ``move_and_update_``: the move
V·coef, r = u − V a, Vᵀp, rᵀ(move − p), the norms and V ← V + r cᵀ), the right
multiplication V ← V m (+ r cᵀ), the Gram matrix and the projection pair each read V once and
write it at most once, in C loops over cache-sized blocks of columns, eight columns at a time
with the directions' accumulators in vector registers. Eager torch needs several BLAS calls
per block for the same work (the products are too skinny for BLAS to reach bandwidth):
measured at 1.06M parameters, d = 8, on this 2-core CPU, OSFN's optimizer-step overhead over
fused AdamW is 4.4 reads of V against 10.6 for the eager passes (``bench/step_time.py``).

The source is compiled once per machine with the system C compiler (``$CC`` or ``cc``,
``-O3 -march=native -fopenmp``) into ``$OSFN_DIST_CACHE`` (default ``~/.cache/osfn-dist``)
and loaded with ctypes — no torch headers, well under a second. Where that fails (no
compiler, another OS), or with ``OSFN_DIST_NATIVE=0``, ``available()`` is False and the
optimizer uses the eager torch path (same results to float32 rounding), logging why once.
Only float32 tensors on the CPU take this path; V itself may also be bfloat16 (the source
compiled a second time with ``-DOSFN_VBF16``: V widened as it is read, written with
stochastic rounding seeded by the pass's own d-sized coefficients, so a resumed run rounds
exactly as the uninterrupted one).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import struct
import tempfile
import zlib
from pathlib import Path

import torch

log = logging.getLogger("osfn_dist.native")

_SOURCE = Path(__file__).with_name("native_pass.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
          "-fno-signed-zeros", "-fPIC", "-shared"]
SMALL_BLOCK = 256  # columns per block of osfn_right_multiply, as in native_pass.c
_lib = None  # {V's dtype: the library for it}
_why_not: str | None = None
BASIS_DTYPES = (torch.float32, torch.bfloat16)


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU may not run on another
    (a cache directory shared over NFS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> dict:
    libs = {torch.float32: _build_one([])}
    try:  # an older compiler may lack a vector builtin of the bfloat16 variant: float32 only, then
        libs[torch.bfloat16] = _build_one(["-DOSFN_VBF16"], "_bf16")
    except Exception as exc:
        log.warning("native passes for a bfloat16 basis unavailable (%s); float32 only", exc)
    return libs


def stores(dtype: torch.dtype) -> bool:
    """Whether the native passes are built for a basis V of this dtype."""
    return available() and dtype in _lib


def _build_one(defines: list[str], suffix: str = "") -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set CC or install gcc)")
    source = _SOURCE.read_bytes()
    flags = _FLAGS + defines
    key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_signature().encode() + cc.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("OSFN_DIST_CACHE", Path.home() / ".cache" / "osfn-dist"))
    target = cache / f"native_pass-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            for omp in (["-fopenmp"], []):  # without OpenMP the loops run on one thread
                proc = subprocess.run([cc, *flags, *omp, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
                if proc.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:500]}")
            os.replace(tmp, target)  # atomic: workers building at once all see a whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    ptr, i64, cint, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32
    signatures = {
        "osfn_move_update": [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, cint, ptr, ptr, i64, ptr, ptr, u32],
        "osfn_right_multiply": [ptr, i64, i64, ptr, ptr, ptr, cint, ptr, u32],
        "osfn_project_pair": [ptr, i64, i64, ptr, ptr, ptr, cint, ptr],
        "osfn_gram": [ptr, i64, i64, ptr, cint, ptr],
        "osfn_collect": [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, cint, ptr],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name + suffix)
        fn.argtypes, fn.restype = args, None
        setattr(lib, name, fn)  # one name for either element type of V
    return lib


def available() -> bool:
    """Whether the native kernels are built and loadable here (builds them on first call)."""
    global _lib, _why_not
    if _lib is not None:
        return True
    if _why_not is not None:
        return False
    if os.environ.get("OSFN_DIST_NATIVE", "1") == "0":
        _why_not = "OSFN_DIST_NATIVE=0"
        return False
    try:
        _lib = _build()
    except Exception as exc:  # correct without it, only slower
        _why_not = str(exc)
        log.warning("native CPU kernels unavailable (%s); using the eager torch path", exc)
        return False
    return True


def why_not() -> str | None:
    """Why ``available()`` is False (None if it is True or was not asked yet)."""
    return _why_not


def usable(vt: torch.Tensor | None, *tensors: torch.Tensor | None) -> bool:
    """The native path takes contiguous CPU tensors: V's transpose ``vt`` in float32 or
    bfloat16, everything else in float32."""
    return (vt is None or (vt.device.type == "cpu" and vt.dtype in BASIS_DTYPES and vt.is_contiguous())) and all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()) for t in tensors
    ) and available()


def _loaded(vt: torch.Tensor) -> ctypes.CDLL:
    if not available():
        raise RuntimeError(f"native CPU kernels unavailable: {_why_not}")
    if vt.dtype not in _lib:
        raise TypeError(f"the native passes store V as {BASIS_DTYPES}, not {vt.dtype}")
    return _lib[vt.dtype]


def _seed(vt: torch.Tensor, *coefficients: torch.Tensor | None) -> int:
    """The stochastic rounding's seed for a pass that writes a bfloat16 V: a hash of the
    pass's own d-sized coefficients (new every step, the same on a resumed run); 0 (unused)
    for a float32 V."""
    if vt.dtype != torch.bfloat16:
        return 0
    h = 0
    for c in coefficients:
        if c is not None:
            words = c.detach().to("cpu", torch.float32).reshape(-1).contiguous().view(torch.int32).tolist()
            h = zlib.crc32(struct.pack(f"<{len(words)}i", *words), h)
    return h


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _threads() -> int:
    return max(1, torch.get_num_threads())


def move_and_update_(vt: torch.Tensor, coef: torch.Tensor, a: torch.Tensor, u: torch.Tensor, p: torch.Tensor,
                     c: torch.Tensor | None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(move = V coef, q = Vᵀp before the update, [rᵀ(move − p), ‖p‖², ‖move − p‖²]) with
    r = u − V a, and V ← V + r cᵀ if ``c`` is given; ``vt`` the contiguous (d, D) transpose of
    V, updated in place. All float32 CPU tensors; q and the sums come back in float64.
    ``out``: a contiguous float32 (D,) tensor for the move (else a new one)."""
    d, total = vt.shape
    nt = _threads()
    coef, a, u, p = (x.contiguous() for x in (coef, a, u, p))
    c = None if c is None else c.contiguous()
    ok = out is not None and out.shape == (total,) and out.dtype == torch.float32 and out.is_contiguous() \
        and out.device.type == "cpu"
    move = out if ok else torch.empty(total, dtype=torch.float32)
    res = torch.empty(d + 3, dtype=torch.float64)
    parts = torch.empty(nt * (d + 3), dtype=torch.float64)
    _loaded(vt).osfn_move_update(_ptr(vt), d, total, _ptr(coef), _ptr(a), _ptr(u), _ptr(p), _ptr(c), _ptr(move),
                                 _ptr(res), _ptr(res[d:]), nt, _ptr(parts), _ptr(parts[nt * d:]), 0, None, None,
                                 _seed(vt, coef, c))
    return move, res[:d], res[d:]


def params_usable(params: list[torch.Tensor]) -> bool:
    """``move_into_params_`` writes straight into these: contiguous float32 CPU tensors."""
    return bool(params) and usable(*params)


def move_into_params_(vt: torch.Tensor, coef: torch.Tensor, a: torch.Tensor, u: torch.Tensor, before: torch.Tensor,
                      params: list[torch.Tensor], c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``move_and_update_`` with the displacement measured and the move applied in the same
    pass: p = before − θ (``before`` the flat θ before the base stepped, θ the parameters
    now), then θ ← θ + V coef in place, parameter by parameter. Returns (q = Vᵀp,
    [rᵀ(move − p), ‖p‖², ‖move − p‖²]); neither p nor the move is ever stored whole."""
    d, total = vt.shape
    nt = _threads()
    coef, a, u, before = (x.contiguous() for x in (coef, a, u, before))
    c = None if c is None else c.contiguous()
    starts = _starts(params, total)
    res = torch.empty(d + 3, dtype=torch.float64)
    parts = torch.empty(nt * (d + 3), dtype=torch.float64)
    _loaded(vt).osfn_move_update(_ptr(vt), d, total, _ptr(coef), _ptr(a), _ptr(u), _ptr(before), _ptr(c), None,
                                 _ptr(res), _ptr(res[d:]), nt, _ptr(parts), _ptr(parts[nt * d:]), len(params),
                                 _pointers(params), starts, _seed(vt, coef, c))
    for p in params:  # written behind autograd's back: bump their versions as add_ would
        torch.autograd.graph.increment_version(p)
    return res[:d], res[d:]


def _starts(params: list[torch.Tensor], total: int):
    """The parameters' flat offsets and then D, as a C int64 array."""
    starts = (ctypes.c_int64 * (len(params) + 1))()
    acc = 0
    for k, p in enumerate(params):
        starts[k] = acc
        acc += p.numel()
    starts[len(params)] = acc
    if acc != total:
        raise ValueError(f"the parameters hold {acc} elements, the basis {total} rows")
    return ctypes.cast(starts, ctypes.c_void_p)


def _pointers(tensors: list[torch.Tensor]):
    return ctypes.cast((ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors]), ctypes.c_void_p)


def collect(vt: torch.Tensor, grads: list[torch.Tensor], means: list[torch.Tensor], params: list[torch.Tensor],
            u_out: torch.Tensor, before_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The collect hop from the parameters' own buffers: ``u_out`` ← the flat running means,
    ``before_out`` ← the flat parameters, and (Vᵀg and Vᵀu as (2, d), [‖g‖², ‖u‖²]) in one read
    of V, without forming the flat gradient. All contiguous float32 CPU tensors, one gradient
    and one running mean per parameter, shaped like it."""
    d, total = vt.shape
    nt = _threads()
    for g, m, p in zip(grads, means, params, strict=True):
        if g.numel() != p.numel() or m.numel() != p.numel():
            raise ValueError("every gradient and running mean must have its parameter's size")
    starts = _starts(params, total)
    out = torch.empty(2 * d + 2, dtype=torch.float64)
    parts = torch.empty(nt * (2 * d + 2), dtype=torch.float64)
    _loaded(vt).osfn_collect(_ptr(vt), d, total, len(params), _pointers(grads), _pointers(means), _pointers(params),
                           starts, _ptr(u_out), _ptr(before_out), _ptr(out), nt, _ptr(parts))
    return out[: 2 * d].view(2, d), out[2 * d:]


def project_pair(vt: torch.Tensor, g: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Vᵀg and Vᵀu as a (2, d) float64 tensor, [‖g‖², ‖u‖²]) in one read of V; u None: only g
    (its row and norm are then zero)."""
    d, total = vt.shape
    nt = _threads()
    out = torch.empty(2 * d + 2, dtype=torch.float64)
    parts = torch.empty(nt * (2 * d + 2), dtype=torch.float64)
    _loaded(vt).osfn_project_pair(_ptr(vt), d, total, _ptr(g.contiguous()), _ptr(None if u is None else u.contiguous()),
                                  _ptr(out), nt, _ptr(parts))
    return out[: 2 * d].view(2, d), out[2 * d:]


def gram(vt: torch.Tensor) -> torch.Tensor:
    """VᵀV (d, d) in float64, one read of V (``vt`` the contiguous (d, D) transpose)."""
    d, total = vt.shape
    nt = _threads()
    out = torch.empty(d, d, dtype=torch.float64)
    parts = torch.empty(nt * d * d, dtype=torch.float64)
    _loaded(vt).osfn_gram(_ptr(vt), d, total, _ptr(out), nt, _ptr(parts))
    return out


def right_multiply_(vt: torch.Tensor, m: torch.Tensor, c: torch.Tensor | None = None,
                    r: torch.Tensor | None = None) -> None:
    """V ← V m (+ r cᵀ), in place on the contiguous (d, D) transpose ``vt``; m (d, d)."""
    d, total = vt.shape
    nt = _threads()
    m4 = torch.zeros(d, -(-d // 4) * 4, dtype=torch.float32)  # columns padded to a multiple of 4
    m4[:, :d] = m
    if r is not None:
        c, r = c.to(torch.float32).contiguous(), r.contiguous()
    scratch = torch.empty(nt * d * SMALL_BLOCK, dtype=torch.float32)
    _loaded(vt).osfn_right_multiply(_ptr(vt), d, total, _ptr(m4), _ptr(c if r is not None else None), _ptr(r), nt,
                                    _ptr(scratch), _seed(vt, m4, c if r is not None else None))
