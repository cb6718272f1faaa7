"""The Triton kernels of ``core.triton_pass`` (imported only when that module is first used:
importing triton costs time and needs the package). See there for what each pass computes."""
import triton
import triton.language as tl


@triton.jit
def _round_store(ptr, x, idx, seed, BF16: tl.constexpr, mask):
    if BF16:  # stochastic rounding: low 16 bits + hash(index, seed) & 0xFFFF, truncated
        h = (idx.to(tl.uint32) ^ ((idx >> 32).to(tl.uint32) * 0x27D4EB2F)) ^ seed.to(tl.uint32)
        h = (h ^ (h >> 16)) * 0x85EBCA6B
        h = (h ^ (h >> 13)) * 0xC2B2AE35
        h = h ^ (h >> 16)
        bits = x.to(tl.uint32, bitcast=True) + (h & 0xFFFF)
        y = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(ptr, y.to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def _tile(D, d: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK columns of V's (d, D) transpose, the rows padded to DP = 2^k ≥ d,
    and both masks."""
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.arange(0, DP)
    return pid, cols, cols < D, rows, rows < d


@triton.jit
def project_pair_k(vt, g, u, parts, D, d: tl.constexpr, DP: tl.constexpr, HAS_U: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid, cols, cm, rows, rm = _tile(D, d, DP, BLOCK)
    m2 = rm[:, None] & cm[None, :]
    v = tl.load(vt + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    gb = tl.load(g + cols, mask=cm, other=0.0)
    out = parts + pid.to(tl.int64) * (2 * d + 2)
    tl.store(out + rows, tl.sum(v * gb[None, :], axis=1), mask=rm)
    tl.store(out + 2 * d, tl.sum(gb * gb, axis=0))
    if HAS_U:
        ub = tl.load(u + cols, mask=cm, other=0.0)
        tl.store(out + d + rows, tl.sum(v * ub[None, :], axis=1), mask=rm)
        tl.store(out + 2 * d + 1, tl.sum(ub * ub, axis=0))
    else:
        tl.store(out + d + rows, tl.zeros([DP], tl.float32), mask=rm)
        tl.store(out + 2 * d + 1, 0.0)

@triton.jit
def move_update_k(vt, coef, a, u, p, c, move, parts, D, seed, d: tl.constexpr, DP: tl.constexpr,
                  HAS_C: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid, cols, cm, rows, rm = _tile(D, d, DP, BLOCK)
    m2 = rm[:, None] & cm[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    v = tl.load(vt + offs, mask=m2, other=0.0).to(tl.float32)
    k = tl.load(coef + rows, mask=rm, other=0.0)
    av = tl.load(a + rows, mask=rm, other=0.0)
    ub = tl.load(u + cols, mask=cm, other=0.0)
    pb = tl.load(p + cols, mask=cm, other=0.0)
    mv = tl.sum(k[:, None] * v, axis=0)
    r = ub - tl.sum(av[:, None] * v, axis=0)
    diff = mv - pb
    tl.store(move + cols, mv, mask=cm)
    out = parts + pid.to(tl.int64) * (d + 3)
    tl.store(out + rows, tl.sum(v * pb[None, :], axis=1), mask=rm)  # Vᵀp before the update
    tl.store(out + d, tl.sum(r * diff, axis=0))
    tl.store(out + d + 1, tl.sum(pb * pb, axis=0))
    tl.store(out + d + 2, tl.sum(diff * diff, axis=0))
    if HAS_C:
        cv = tl.load(c + rows, mask=rm, other=0.0)
        _round_store(vt + offs, v + cv[:, None] * r[None, :], offs, seed, BF16, m2)

@triton.jit
def right_multiply_k(vt, m, c, r, D, seed, d: tl.constexpr, DP: tl.constexpr, HAS_R: tl.constexpr,
                     BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid, cols, cm, rows, rm = _tile(D, d, DP, BLOCK)
    acc = tl.zeros([DP, BLOCK], tl.float32)
    row = vt + cols  # stepped by D (pointer + int32: no overflow of i·D at 1B rows)
    for i in tl.static_range(d):  # new row j = Σ_i m[i, j] · row i
        vi = tl.load(row, mask=cm, other=0.0).to(tl.float32)
        mi = tl.load(m + i * d + rows, mask=rm, other=0.0)
        acc += mi[:, None] * vi[None, :]
        row += D
    if HAS_R:
        cv = tl.load(c + rows, mask=rm, other=0.0)
        rb = tl.load(r + cols, mask=cm, other=0.0)
        acc += cv[:, None] * rb[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    _round_store(vt + offs, acc, offs, seed, BF16, rm[:, None] & cm[None, :])

@triton.jit
def gram_k(vt, parts, D, d: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
    pid, cols, cm, rows, rm = _tile(D, d, DP, BLOCK)
    v = tl.load(vt + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=rm[:, None] & cm[None, :],
                other=0.0).to(tl.float32)
    out = parts + pid.to(tl.int64) * (d * d)
    row = vt + cols
    for i in tl.static_range(d):
        vi = tl.load(row, mask=cm, other=0.0).to(tl.float32)
        tl.store(out + i * d + rows, tl.sum(v * vi[None, :], axis=1), mask=rm)
        row += D
