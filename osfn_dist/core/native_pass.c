/* OSFN's D-sized passes over the basis V on CPU, one read (and one write) of V each.
 *
 * Built on first use by osfn_dist/core/native.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes on float32 tensors. Compiled a second time with -DOSFN_VBF16 for a V stored
 * as bfloat16 (every other vector stays float32; the functions' names end in _bf16): V is
 * widened to float32 as it is read, and rounded stochastically as it is written. V is stored direction-major: vt is the contiguous (d, D)
 * transpose, row i = direction i. Columns are processed in blocks of BLOCK, so a block of V
 * (d x BLOCK floats) stays in L1 while every product uses it. Reductions: float within a
 * block, double across blocks, per thread in a fixed slot and summed in thread order, so the
 * result is the same on every call with the same thread count.
 */
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 1024
#define MAX_VEC_DIM 16 /* the vector-register kernels' largest d; beyond it, the generic loops */

/* eight floats (GCC/Clang vector extension: one AVX register, or two SSE ones, or scalars) */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }
static inline float hsum8(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }
#define SMALL_BLOCK 256 /* d x 256 floats (8 KiB at d = 8) stay in L1 while d^2 products use them */

/* The element type of V and its loads and stores. A stored value of V is written with the
 * flat index of its element and a seed: bfloat16 rounds stochastically (the float32's low 16
 * bits plus 16 pseudo-random bits from a hash of both, then truncated: unbiased, and the
 * same on every run and thread count), so that the basis update's small increments are not
 * lost to round-to-nearest. float32 ignores both. */
#ifdef OSFN_VBF16
typedef uint16_t vtype;
#define VFN(name) name##_bf16
typedef uint32_t u8v __attribute__((vector_size(32)));
typedef uint16_t h8v __attribute__((vector_size(16)));
static inline v8 loadv8(const vtype *p) {
    h8v h;
    __builtin_memcpy(&h, p, sizeof h);
    u8v w = __builtin_convertvector(h, u8v) << 16;
    v8 f;
    __builtin_memcpy(&f, &w, sizeof f);
    return f;
}
static inline float loadv(const vtype *p) {
    uint32_t w = (uint32_t)*p << 16;
    float f;
    __builtin_memcpy(&f, &w, sizeof f);
    return f;
}
static inline uint32_t dither(uint32_t seed, uint64_t idx) {
    uint32_t h = (uint32_t)idx ^ (uint32_t)(idx >> 32) * 0x27D4EB2Fu ^ seed;
    h *= 0x9E3779B1u;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    return h & 0xFFFFu;
}
typedef uint16_t h16v __attribute__((vector_size(32)));
/* Eight-wide stores draw their dither from a xorshift generator in a vector register (eight
 * lanes), seeded by the hash of (seed, the first element's index) at the start of each block
 * of columns (blocks are fixed, so the bits do not depend on the thread count) and advanced
 * once per eight columns; direction i takes those 32 bits rotated by 2i. */
static inline u8v rng_seed(uint32_t seed, uint64_t idx) {
    u8v h = (u8v){0, 1, 2, 3, 4, 5, 6, 7} + (uint32_t)idx;
    h ^= (uint32_t)(idx >> 32) * 0x27D4EB2Fu ^ seed;
    h *= 0x9E3779B1u;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    return h | 1u;  /* xorshift needs a nonzero state */
}
static inline u8v rng_next(u8v s) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    return s;
}
static inline u8v rng_row(u8v s, int64_t i) {
    int k = (int)((2 * i) & 31);
    return k ? (s << k) | (s >> (32 - k)) : s;
}
static inline void storev8(vtype *p, v8 x, u8v bits) {
    u8v w;
    __builtin_memcpy(&w, &x, sizeof w);
    w += bits & 0xFFFFu;
    h16v halves;
    __builtin_memcpy(&halves, &w, sizeof halves);  /* the upper halves are the rounded bfloat16s */
    h8v h = __builtin_shufflevector(halves, halves, 1, 3, 5, 7, 9, 11, 13, 15);
    __builtin_memcpy(p, &h, sizeof h);
}
#ifdef __AVX2__
#include <immintrin.h>
/* two groups of eight, rounded with the dithers b0, b1 (16 bits each) and packed to sixteen
 * bfloat16s in one store: vpackusdw never saturates here (each value is below 2^16) */
static inline void store16_dithered(vtype *p, v8 x0, v8 x1, u8v b0, u8v b1) {
    __m256i w0, w1, u0, u1;
    __builtin_memcpy(&w0, &x0, sizeof w0);
    __builtin_memcpy(&w1, &x1, sizeof w1);
    __builtin_memcpy(&u0, &b0, sizeof u0);
    __builtin_memcpy(&u1, &b1, sizeof u1);
    w0 = _mm256_srli_epi32(_mm256_add_epi32(w0, u0), 16);
    w1 = _mm256_srli_epi32(_mm256_add_epi32(w1, u1), 16);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(w0, w1), 0xD8);
    _mm256_storeu_si256((__m256i *)p, packed);
}
#endif
static inline void storev(vtype *p, float x, uint32_t seed, uint64_t idx) {
    uint32_t w;
    __builtin_memcpy(&w, &x, sizeof w);
    *p = (uint16_t)((w + dither(seed, idx)) >> 16);
}
#else
typedef float vtype;
#define VFN(name) name
typedef uint32_t u8v __attribute__((vector_size(32)));
static inline u8v rng_seed(uint32_t seed, uint64_t idx) { (void)seed; (void)idx; return (u8v){0}; }
static inline u8v rng_next(u8v s) { return s; }
static inline u8v rng_row(u8v s, int64_t i) { (void)i; return s; }
static inline v8 loadv8(const vtype *p) { return load8(p); }
static inline float loadv(const vtype *p) { return *p; }
static inline void storev8(vtype *p, v8 x, u8v bits) { (void)bits; store8(p, x); }
static inline void storev(vtype *p, float x, uint32_t seed, uint64_t idx) { (void)seed; (void)idx; *p = x; }
#endif

/* out[k] = sum over threads t of parts[t * width + k], in thread order (deterministic) */
static void pair_dispatch(int64_t d, const vtype *vb, int64_t D, int64_t n, const float *gb, const float *ub,
                          double *loc);

static void sum_parts(const double *parts, int nthreads, int64_t width, double *out) {
    for (int64_t k = 0; k < width; k++) {
        double acc = 0.0;
        for (int t = 0; t < nthreads; t++) acc += parts[(int64_t)t * width + k];
        out[k] = acc;
    }
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Calls f(piece start, piece end, pointer to the parameter element at piece start) for the
 * pieces of the flat range [s, e) that lie in one parameter each; seg_start has nseg + 1
 * entries (the flat offsets of the parameters, then D). */
#define FOR_PIECES(s, e, nseg, seg, seg_start, ...)                                    \
    do {                                                                                 \
        int64_t lo_ = 0, hi_ = (nseg);                                                   \
        while (hi_ - lo_ > 1) {                                                          \
            int64_t mid_ = (lo_ + hi_) / 2;                                              \
            if ((seg_start)[mid_] <= (s)) lo_ = mid_; else hi_ = mid_;                   \
        }                                                                                \
        for (int64_t k_ = lo_, j0 = (s); j0 < (e); k_++) {                               \
            int64_t j1 = (seg_start)[k_ + 1] < (e) ? (seg_start)[k_ + 1] : (e);          \
            if (j1 <= j0) continue;                                                      \
            float *th = (seg)[k_] + (j0 - (seg_start)[k_]);                              \
            __VA_ARGS__;                                                                 \
            j0 = j1;                                                                     \
        }                                                                                \
    } while (0)

/* One block of n columns of the apply pass (vb = vt + s, rows D apart; column s0 = s of V,
 * for the stores' indices): m <- V coef,
 * r = u - V a, q_loc += V^T p, sums3 += (r^T (m - p), |p|^2, |m - p|^2), then V += r c^T.
 * Eight columns at a time with every direction's accumulator in a register: per element of
 * V one load, three multiply-adds, and (with c) one more load and a store while in L1. */
static inline __attribute__((always_inline)) void move_block(
        int64_t d, vtype *vb, int64_t D, int64_t n, const float *coef, const float *a, const float *us,
        const float *ps, const float *c, float *m, double *q_loc, float *sums3, int64_t s0, uint32_t seed) {
    v8 qv[MAX_VEC_DIM], dacc = {0}, pacc = {0}, sacc = {0};
#ifdef OSFN_VBF16
    float rs[BLOCK]; /* r, for the update of V in a second sweep over the block (still in L1):
                        the dithered stores in the first would spill its accumulators */
#endif
    for (int64_t i = 0; i < d; i++) qv[i] = (v8){0};
    int64_t nv = n / 8 * 8;
    for (int64_t j = 0; j < nv; j += 8) {
        v8 p = load8(ps + j), mm = {0}, ll = {0};
        for (int64_t i = 0; i < d; i++) {
            v8 v = loadv8(vb + i * D + j);
            mm += v * coef[i];
            ll += v * a[i];
            qv[i] += v * p;
        }
        v8 r = load8(us + j) - ll, st = mm - p;
        dacc += r * st;
        pacc += p * p;
        sacc += st * st;
        store8(m + j, mm);
#ifdef OSFN_VBF16
        store8(rs + j, r);
#else
        if (c)
            for (int64_t i = 0; i < d; i++) store8(vb + i * D + j, load8(vb + i * D + j) + r * c[i]);
#endif
    }
#ifdef OSFN_VBF16
    if (c) {  /* two directions at a time: one 32-bit draw dithers both (16 bits each) */
        for (int64_t i = 0; i < d; i += 2) {
            u8v rng = rng_seed(seed, (uint64_t)(i * D + s0));
            v8 ci = (v8){0} + c[i], ck = (v8){0} + c[i + 1 < d ? i + 1 : i];
            vtype *row = vb + i * D, *next = vb + (i + 1) * D;
            int64_t j = 0;
#ifdef __AVX2__
            for (; j + 16 <= nv; j += 16) {  /* sixteen columns: one pack of two dithered halves */
                u8v r0 = rng = rng * 1664525u + 1013904223u;  /* LCG: upper bits for row i */
                u8v r1 = rng = rng * 1664525u + 1013904223u;
                v8 rj0 = load8(rs + j), rj1 = load8(rs + j + 8);
                if (i + 1 < d) {
                    store16_dithered(next + j, loadv8(next + j) + rj0 * ck, loadv8(next + j + 8) + rj1 * ck,
                                     r0 & 0xFFFFu, r1 & 0xFFFFu);
                }
                store16_dithered(row + j, loadv8(row + j) + rj0 * ci, loadv8(row + j + 8) + rj1 * ci, r0 >> 16,
                                 r1 >> 16);
            }
#endif
            for (; j < nv; j += 8) {
                rng = rng * 1664525u + 1013904223u;
                v8 rj = load8(rs + j);
                if (i + 1 < d) storev8(next + j, loadv8(next + j) + rj * ck, rng);
                storev8(row + j, loadv8(row + j) + rj * ci, rng >> 16);
            }
        }
    }
#endif
    float q_tail[MAX_VEC_DIM] = {0}, dt = 0.f, pt = 0.f, stt = 0.f;
    for (int64_t j = nv; j < n; j++) {  /* the last n mod 8 columns */
        float mm = 0.f, ll = 0.f, p = ps[j];
        for (int64_t i = 0; i < d; i++) {
            float v = loadv(vb + i * D + j);
            mm += v * coef[i];
            ll += v * a[i];
            q_tail[i] += v * p;
        }
        float r = us[j] - ll, st = mm - p;
        dt += r * st;
        pt += p * p;
        stt += st * st;
        m[j] = mm;
        if (c)
            for (int64_t i = 0; i < d; i++)
                storev(vb + i * D + j, loadv(vb + i * D + j) + r * c[i], seed, (uint64_t)(i * D + s0 + j));
    }
    for (int64_t i = 0; i < d; i++) q_loc[i] += (double)(hsum8(qv[i]) + q_tail[i]);
    sums3[0] += hsum8(dacc) + dt;
    sums3[1] += hsum8(pacc) + pt;
    sums3[2] += hsum8(sacc) + stt;
}

/* move_block for any d: row by row through the block, m and l (then r) in memory. */
static void move_block_generic(int64_t d, vtype *vb, int64_t D, int64_t n, const float *coef, const float *a,
                               const float *us, const float *ps, const float *c, float *m, float *l,
                               double *q_loc, float *sums3, int64_t s0, uint32_t seed) {
    for (int64_t j = 0; j < n; j++) { m[j] = 0.f; l[j] = 0.f; }
    for (int64_t i = 0; i < d; i++) {
        const vtype *row = vb + i * D;
        float ci = coef[i], ai = a[i], acc = 0.f;
        for (int64_t j = 0; j < n; j++) {
            float v = loadv(row + j);
            m[j] += ci * v;
            l[j] += ai * v;
            acc += v * ps[j];
        }
        q_loc[i] += acc;
    }
    for (int64_t j = 0; j < n; j++) {
        float r = us[j] - l[j], step = m[j] - ps[j];
        l[j] = r;
        sums3[0] += r * step;
        sums3[1] += ps[j] * ps[j];
        sums3[2] += step * step;
    }
    if (c) {
        for (int64_t i = 0; i < d; i++) {
            vtype *row = vb + i * D;
            for (int64_t j = 0; j < n; j++) storev(row + j, loadv(row + j) + c[i] * l[j], seed, (uint64_t)(i * D + s0 + j));
        }
    }
}

/* move = V coef;  r = u - V a;  q = V^T p;  then, if c is given, V <- V + r c^T (r is never
 * stored).  dots_out[0..2] = r^T (move - p), |p|^2, |move - p|^2.
 * With parameter segments (seg != NULL; nseg parameters, seg[k] the k-th one's float32 data,
 * seg_start its flat offset): p is not given but measured, p = before - theta (``p`` then
 * holds theta before the base stepped), and the move is added into the parameters,
 * theta += move, instead of being stored (``move`` may be NULL): no flat displacement, move
 * or scatter pass.
 * q_parts: nthreads * d doubles of scratch; dot_parts: nthreads * 3. seed: of V's stores. */
void VFN(osfn_move_update)(vtype *vt, int64_t d, int64_t D, const float *coef, const float *a,
                           const float *u, const float *p, const float *c, float *move,
                           double *q_out, double *dots_out, int nthreads, double *q_parts,
                           double *dot_parts, int64_t nseg, float **seg, const int64_t *seg_start, uint32_t seed) {
    for (int64_t t = 0; t < (int64_t)nthreads * d; t++) q_parts[t] = 0.0;
    for (int t = 0; t < 3 * nthreads; t++) dot_parts[t] = 0.0;
#pragma omp parallel num_threads(nthreads)
    {
        int tid = thread_id();
        double *q_loc = q_parts + (int64_t)tid * d;
        double dot_loc = 0.0, pp_loc = 0.0, ss_loc = 0.0;
        float m[BLOCK], l[BLOCK], pb[BLOCK];
#pragma omp for schedule(static)
        for (int64_t s = 0; s < D; s += BLOCK) {
            int64_t n = D - s < BLOCK ? D - s : BLOCK;
            const float *ps = p + s, *us = u + s;
            if (seg) {  /* p = before - theta, piece by piece */
                FOR_PIECES(s, s + n, nseg, seg, seg_start,
                           for (int64_t j = j0; j < j1; j++) pb[j - s] = p[j] - th[j - j0]);
                ps = pb;
            }
            float sums3[3] = {0.f, 0.f, 0.f};
            switch (d) {  /* a constant d: the loops over directions unroll into registers */
#define MOVE_CASE(K) case K: move_block(K, vt + s, D, n, coef, a, us, ps, c, m, q_loc, sums3, s, seed); break;
                MOVE_CASE(1) MOVE_CASE(2) MOVE_CASE(3) MOVE_CASE(4) MOVE_CASE(5) MOVE_CASE(6)
                MOVE_CASE(7) MOVE_CASE(8) MOVE_CASE(9) MOVE_CASE(10) MOVE_CASE(11) MOVE_CASE(12)
                MOVE_CASE(13) MOVE_CASE(14) MOVE_CASE(15) MOVE_CASE(16)
#undef MOVE_CASE
                default: move_block_generic(d, vt + s, D, n, coef, a, us, ps, c, m, l, q_loc, sums3, s, seed);
            }
            if (seg) {
                FOR_PIECES(s, s + n, nseg, seg, seg_start,
                           for (int64_t j = j0; j < j1; j++) th[j - j0] += m[j - s]);
            } else {
                for (int64_t j = 0; j < n; j++) move[s + j] = m[j];
            }
            dot_loc += sums3[0];
            pp_loc += sums3[1];
            ss_loc += sums3[2];
        }
        dot_parts[3 * tid] = dot_loc;
        dot_parts[3 * tid + 1] = pp_loc;
        dot_parts[3 * tid + 2] = ss_loc;
    }
    sum_parts(q_parts, nthreads, d, q_out);
    sum_parts(dot_parts, nthreads, 3, dots_out);
}

/* q_g = V^T g, q_u = V^T u (u may be NULL) and |g|^2, |u|^2, in one read of V.
 * out: 2d + 2 doubles (q_g, q_u, |g|^2, |u|^2). parts: nthreads * (2d + 2) doubles. */
void VFN(osfn_project_pair)(const vtype *vt, int64_t d, int64_t D, const float *g, const float *u,
                            double *out, int nthreads, double *parts) {
    int64_t w = 2 * d + 2;
    for (int64_t t = 0; t < (int64_t)nthreads * w; t++) parts[t] = 0.0;
#pragma omp parallel num_threads(nthreads)
    {
        double *loc = parts + (int64_t)thread_id() * w;
#pragma omp for schedule(static)
        for (int64_t s = 0; s < D; s += BLOCK) {
            int64_t n = D - s < BLOCK ? D - s : BLOCK;
            pair_dispatch(d, vt + s, D, n, g + s, u ? u + s : g + s, loc);  /* no u: its row is g's */
        }
    }
    sum_parts(parts, nthreads, w, out);
    if (!u) {
        for (int64_t i = 0; i < d; i++) out[d + i] = 0.0;
        out[2 * d + 1] = 0.0;
    }
}

/* One block of n columns of V^T g, V^T u and |g|^2, |u|^2 (vb = vt + s, rows D apart), added
 * to loc = (q_g, q_u, |g|^2, |u|^2); eight columns at a time, accumulators in registers. */
static inline __attribute__((always_inline)) void pair_block(int64_t d, const vtype *vb, int64_t D, int64_t n,
                                                             const float *gb, const float *ub, double *loc) {
    v8 qg[MAX_VEC_DIM], qu[MAX_VEC_DIM], sg = {0}, su = {0};
    for (int64_t i = 0; i < d; i++) qg[i] = qu[i] = (v8){0};
    int64_t nv = n / 8 * 8;
    for (int64_t j = 0; j < nv; j += 8) {
        v8 g = load8(gb + j), u = load8(ub + j);
        for (int64_t i = 0; i < d; i++) {
            v8 v = loadv8(vb + i * D + j);
            qg[i] += v * g;
            qu[i] += v * u;
        }
        sg += g * g;
        su += u * u;
    }
    float tg[MAX_VEC_DIM] = {0}, tu[MAX_VEC_DIM] = {0}, tsg = 0.f, tsu = 0.f;
    for (int64_t j = nv; j < n; j++) {
        for (int64_t i = 0; i < d; i++) {
            tg[i] += loadv(vb + i * D + j) * gb[j];
            tu[i] += loadv(vb + i * D + j) * ub[j];
        }
        tsg += gb[j] * gb[j];
        tsu += ub[j] * ub[j];
    }
    for (int64_t i = 0; i < d; i++) {
        loc[i] += (double)(hsum8(qg[i]) + tg[i]);
        loc[d + i] += (double)(hsum8(qu[i]) + tu[i]);
    }
    loc[2 * d] += (double)(hsum8(sg) + tsg);
    loc[2 * d + 1] += (double)(hsum8(su) + tsu);
}

static void pair_block_generic(int64_t d, const vtype *vb, int64_t D, int64_t n, const float *gb,
                               const float *ub, double *loc) {
    for (int64_t i = 0; i < d; i++) {
        const vtype *row = vb + i * D;
        float ag = 0.f, au = 0.f;
        for (int64_t j = 0; j < n; j++) { ag += loadv(row + j) * gb[j]; au += loadv(row + j) * ub[j]; }
        loc[i] += ag;
        loc[d + i] += au;
    }
    float sg = 0.f, su = 0.f;
    for (int64_t j = 0; j < n; j++) { sg += gb[j] * gb[j]; su += ub[j] * ub[j]; }
    loc[2 * d] += sg;
    loc[2 * d + 1] += su;
}

static void pair_dispatch(int64_t d, const vtype *vb, int64_t D, int64_t n, const float *gb, const float *ub,
                          double *loc) {
    switch (d) {  /* a constant d: the loops over directions unroll into registers */
#define PAIR_CASE(K) case K: pair_block(K, vb, D, n, gb, ub, loc); break;
        PAIR_CASE(1) PAIR_CASE(2) PAIR_CASE(3) PAIR_CASE(4) PAIR_CASE(5) PAIR_CASE(6)
        PAIR_CASE(7) PAIR_CASE(8) PAIR_CASE(9) PAIR_CASE(10) PAIR_CASE(11) PAIR_CASE(12)
        PAIR_CASE(13) PAIR_CASE(14) PAIR_CASE(15) PAIR_CASE(16)
#undef PAIR_CASE
        default: pair_block_generic(d, vb, D, n, gb, ub, loc);
    }
}

/* The collect hop straight from the parameters' own buffers: for nseg parameters with
 * gradient g[k], running mean m[k] and value theta[k] (float32; flat offsets seg_start):
 * u_out <- flat m (the source, kept for the apply hop: the base overwrites m), before_out <-
 * flat theta, and out = (V^T g, V^T u, |g|^2, |u|^2) in one read of V; the flat gradient is
 * never formed. parts: nthreads * (2d + 2) doubles. */
void VFN(osfn_collect)(const vtype *vt, int64_t d, int64_t D, int64_t nseg, float **g, float **m,
                       float **theta, const int64_t *seg_start, float *u_out, float *before_out,
                       double *out, int nthreads, double *parts) {
    int64_t w = 2 * d + 2;
    for (int64_t t = 0; t < (int64_t)nthreads * w; t++) parts[t] = 0.0;
#pragma omp parallel num_threads(nthreads)
    {
        double *loc = parts + (int64_t)thread_id() * w;
        float gb[BLOCK];
#pragma omp for schedule(static)
        for (int64_t s = 0; s < D; s += BLOCK) {
            int64_t n = D - s < BLOCK ? D - s : BLOCK;
            float *us = u_out + s;
            {
                FOR_PIECES(s, s + n, nseg, theta, seg_start, {
                    const float *gk = g[k_] + (j0 - seg_start[k_]), *mk = m[k_] + (j0 - seg_start[k_]);
                    for (int64_t j = j0; j < j1; j++) {
                        gb[j - s] = gk[j - j0];
                        us[j - s] = mk[j - j0];
                        before_out[j] = th[j - j0];
                    }
                });
            }
            pair_dispatch(d, vt + s, D, n, gb, us, loc);
        }
    }
    sum_parts(parts, nthreads, w, out);
}

/* One block of n columns of V^T V's upper triangle (vb = vt + s), added to loc (d x d):
 * eight columns at a time, the d loaded rows reused for all d(d+1)/2 products. */
static inline __attribute__((always_inline)) void gram_block(int64_t d, const vtype *vb, int64_t D, int64_t n,
                                                             double *loc) {
    v8 acc[MAX_VEC_DIM * (MAX_VEC_DIM + 1) / 2];
    int64_t pairs = d * (d + 1) / 2;
    for (int64_t t = 0; t < pairs; t++) acc[t] = (v8){0};
    int64_t nv = n / 8 * 8;
    for (int64_t j = 0; j < nv; j += 8) {
        v8 x[MAX_VEC_DIM];
        for (int64_t i = 0; i < d; i++) x[i] = loadv8(vb + i * D + j);
        int64_t t = 0;
        for (int64_t i = 0; i < d; i++)
            for (int64_t k = i; k < d; k++) acc[t++] += x[i] * x[k];
    }
    int64_t t = 0;
    for (int64_t i = 0; i < d; i++) {
        for (int64_t k = i; k < d; k++, t++) {
            float tail = 0.f;
            for (int64_t j = nv; j < n; j++) tail += loadv(vb + i * D + j) * loadv(vb + k * D + j);
            loc[i * d + k] += (double)(hsum8(acc[t]) + tail);
        }
    }
}

/* G = V^T V (d x d, row-major, doubles), one read of V. parts: nthreads * d * d doubles. */
void VFN(osfn_gram)(const vtype *vt, int64_t d, int64_t D, double *gram, int nthreads, double *parts) {
    for (int64_t t = 0; t < (int64_t)nthreads * d * d; t++) parts[t] = 0.0;
#pragma omp parallel num_threads(nthreads)
    {
        double *loc = parts + (int64_t)thread_id() * d * d;
#pragma omp for schedule(static)
        for (int64_t s = 0; s < D; s += SMALL_BLOCK) {
            int64_t n = D - s < SMALL_BLOCK ? D - s : SMALL_BLOCK;
            switch (d) {
#define GRAM_CASE(K) case K: gram_block(K, vt + s, D, n, loc); break;
                GRAM_CASE(1) GRAM_CASE(2) GRAM_CASE(3) GRAM_CASE(4) GRAM_CASE(5) GRAM_CASE(6)
                GRAM_CASE(7) GRAM_CASE(8) GRAM_CASE(9) GRAM_CASE(10) GRAM_CASE(11) GRAM_CASE(12)
                GRAM_CASE(13) GRAM_CASE(14) GRAM_CASE(15) GRAM_CASE(16)
#undef GRAM_CASE
                default:
                    for (int64_t i = 0; i < d; i++) {
                        const vtype *ri = vt + i * D + s;
                        for (int64_t k = i; k < d; k++) {
                            const vtype *rk = vt + k * D + s;
                            float acc = 0.f;
                            for (int64_t j = 0; j < n; j++) acc += loadv(ri + j) * loadv(rk + j);
                            loc[i * d + k] += acc;
                        }
                    }
            }
        }
    }
    sum_parts(parts, nthreads, d * d, gram);
    for (int64_t i = 0; i < d; i++)
        for (int64_t k = 0; k < i; k++) gram[i * d + k] = gram[k * d + i];
}

/* V <- V m (+ r c^T if r is given), in place: new row i of vt = sum_k m[k][i] row k (+ c_i r).
 * m is (d, d4) row-major, its columns padded with zeros to d4 = a multiple of 4.
 * scratch: nthreads * d * SMALL_BLOCK floats. Eight columns at a time
 * in vector registers (GCC/Clang vector extension; plain scalar code where there is no SIMD):
 * d loads, d^2 multiply-adds and d stores per eight columns. */
/* Columns [full, D) of V <- V m (+ r c^T), one at a time (m padded to d4 columns); col:
 * scratch for one column (d floats). */
static void right_multiply_tail(vtype *vt, int64_t d, int64_t D, int64_t full, const float *m, const float *c,
                                const float *r, float *col, uint32_t seed) {
    int64_t d4 = (d + 3) / 4 * 4;
    for (int64_t j = full; j < D; j++) {
        for (int64_t k = 0; k < d; k++) col[k] = loadv(vt + k * D + j);
        for (int64_t i = 0; i < d; i++) {
            float acc = r ? c[i] * r[j] : 0.f;
            for (int64_t k = 0; k < d; k++) acc += col[k] * m[k * d4 + i];
            storev(vt + i * D + j, acc, seed, (uint64_t)(i * D + j));
        }
    }
}

/* Eight columns of V <- V m (+ r c^T) with every output direction's accumulator in a
 * register: each element of V loaded once, d multiply-adds, stored once; no scratch. */
static inline __attribute__((always_inline)) void rotate_columns(int64_t d, int64_t d4, vtype *vb, int64_t D,
                                                                 const float *m, const float *c, const float *rb,
                                                                 int64_t j0, uint32_t seed) {
    v8 acc[MAX_VEC_DIM];
    v8 rv = {0};
    u8v rng = rng_seed(seed, (uint64_t)j0);
    if (rb) rv = load8(rb);
    for (int64_t i = 0; i < d; i++) acc[i] = rb ? rv * c[i] : (v8){0};
    for (int64_t k = 0; k < d; k++) {
        v8 xk = loadv8(vb + k * D);
        for (int64_t i = 0; i < d; i++) acc[i] += xk * m[k * d4 + i];
    }
    rng = rng_next(rng);
    for (int64_t i = 0; i < d; i++) storev8(vb + i * D, acc[i], rng_row(rng, i));
}

void VFN(osfn_right_multiply)(vtype *vt, int64_t d, int64_t D, const float *m, const float *c,
                              const float *r, int nthreads, float *scratch, uint32_t seed) {
    if (d <= MAX_VEC_DIM) {
        int64_t full = D / 8 * 8, d4 = (d + 3) / 4 * 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t j = 0; j < full; j += 8) {
            vtype *vb = vt + j;
            const float *rb = r ? r + j : NULL;
            switch (d) {
#define ROT_CASE(K) case K: rotate_columns(K, d4, vb, D, m, c, rb, j, seed); break;
                ROT_CASE(1) ROT_CASE(2) ROT_CASE(3) ROT_CASE(4) ROT_CASE(5) ROT_CASE(6)
                ROT_CASE(7) ROT_CASE(8) ROT_CASE(9) ROT_CASE(10) ROT_CASE(11) ROT_CASE(12)
                ROT_CASE(13) ROT_CASE(14) ROT_CASE(15) ROT_CASE(16)
#undef ROT_CASE
            }
        }
        right_multiply_tail(vt, d, D, full, m, c, r, scratch, seed);
        return;
    }
    int64_t full = D / 8 * 8, d4 = (d + 3) / 4 * 4;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = scratch + (int64_t)thread_id() * d * SMALL_BLOCK;
#pragma omp for schedule(static)
        for (int64_t s = 0; s < full; s += SMALL_BLOCK) {
            int64_t n = full - s < SMALL_BLOCK ? full - s : SMALL_BLOCK;
            for (int64_t k = 0; k < d; k++)
                for (int64_t j = 0; j < n; j++) buf[k * SMALL_BLOCK + j] = loadv(vt + k * D + s + j);
            for (int64_t j = 0; j < n; j += 8) {
                v8 rv = {0};
                u8v rng = rng_seed(seed, (uint64_t)(s + j));
                if (r) __builtin_memcpy(&rv, r + s + j, sizeof(v8));
                /* four output rows at once: four independent multiply-add chains */
                for (int64_t i = 0; i < d; i += 4) {
                    v8 acc[4];
                    for (int t = 0; t < 4; t++) acc[t] = r && i + t < d ? rv * c[i + t] : (v8){0};
                    for (int64_t k = 0; k < d; k++) {
                        v8 xk;
                        __builtin_memcpy(&xk, buf + k * SMALL_BLOCK + j, sizeof(v8));
                        const float *mk = m + k * d4 + i;  /* m padded to d4 columns */
                        acc[0] += xk * mk[0];
                        acc[1] += xk * mk[1];
                        acc[2] += xk * mk[2];
                        acc[3] += xk * mk[3];
                    }
                    for (int t = 0; t < 4 && i + t < d; t++)
                        storev8(vt + (i + t) * D + s + j, acc[t], rng_row(rng, i + t));
                }
            }
        }
    }
    right_multiply_tail(vt, d, D, full, m, c, r, scratch, seed);
}
