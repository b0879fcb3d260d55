/* Kernels on raw checkpoint words: the fused DARE prune with its statistics, the C twin of the mask stream of
 * lifelong_delta/delta/_kernels.py (same hash, same bits); the mask's select; and, further down, the merge of N
 * models and TIES' magnitude cut with the bits of lifelong_delta/delta/merge.py.
 *
 * merge(kind, base, ft, out, k0, k1, lo0, thresh, scale) -> (nnz before, nnz after, sum d^2 before, after)
 *   kind 0: the three buffers hold float32; kind 1: uint16 words holding bfloat16.
 *   Element i (0-based in this range) gets the hash word w = lb32(lb32((lo0 + i) ^ k0) ^ k1); it is kept iff
 *   w >= thresh: out = base + (ft - base) * scale in fp32 (no fused multiply-add; bf16 rounded to nearest even),
 *   else out = base (the base word itself). Ranges must not cross a 2**32 counter boundary (the caller splits).
 *   The statistics come from the same pass: nnz compares words (+0 and -0 are equal), sums of squares in 32 fp32
 *   lanes per block of 16384 elements, fp64 across blocks. A NaN/inf delta makes the first sum non-finite; the caller then counts with
 *   count_nonfinite(kind, base, ft).
 *
 * select(size, src, dst, values, k0, k1, lo0, thresh) -> count: the same mask over one range of raw words of `size`
 * bytes (1, 2, 4 or 8). With `values` None it gathers: the kept words of `src` go, in order, to the front of `dst`.
 * Otherwise it scatters: dst[i] = kept ? the next word of `values` : src[i]. Either way it returns how many were kept.
 * Packed deltas (lifelong_delta/delta/pack.py, unpack.py) store and restore the kept words with it.
 *
 * The GIL is released while a range is processed, so Python threads can run ranges in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16384
#define LANES 32 /* wide enough for AVX-512 on bf16 words (16 lanes ran 28% slower) */

static inline uint32_t lb32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

static inline float as_f32(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }
static inline uint32_t as_u32(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define CLONES
#endif

typedef struct { uint64_t nnz_before, nnz_after; double sq_before, sq_after; } Stats;

/* Per-lane accumulators: lane j sums every LANES-th element, so the sums do not depend on how the compiler
 * vectorises, and the loops vectorise without reassociation flags. */
typedef struct { float sq_before[LANES], sq_after[LANES]; uint32_t nnz_before[LANES], nnz_after[LANES]; } Lanes;

static inline void add_lanes(const Lanes *l, Stats *s) {
    float before = 0, after = 0;
    for (int j = 0; j < LANES; j++) {
        before += l->sq_before[j];
        after += l->sq_after[j];
        s->nnz_before += l->nnz_before[j];
        s->nnz_after += l->nnz_after[j];
    }
    s->sq_before += before;
    s->sq_after += after;
}

static inline uint32_t keep_mask(uint32_t k0, uint32_t k1, uint32_t counter, uint32_t thresh) {
    return 0u - (uint32_t)(lb32(lb32(counter ^ k0) ^ k1) >= thresh); /* all ones: keep */
}

/* One bf16 element: merge (a blend, not a branch, so the loop vectorises) and its statistics in lane j. The nnz
 * tests compare words, with +0 and -0 equal. */
static inline void step_bf16(const uint16_t *b, const uint16_t *f, uint16_t *o, size_t i, int j, uint32_t keep,
                             float scale, Lanes *l) {
    uint32_t wb = b[i], wf = f[i];
    float bv = as_f32(wb << 16);
    float d = as_f32(wf << 16) - bv;
    float m = d * scale;
    uint32_t u = as_u32(bv + m);
    uint32_t kept = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; /* round to nearest even, as torch casts */
    uint32_t wo = (kept & keep) | (wb & ~keep);
    o[i] = (uint16_t)wo;
    float dm = as_f32(wo << 16) - bv;
    l->sq_before[j] += d * d;
    l->sq_after[j] += dm * dm;
    l->nnz_before[j] += (wf != wb) & (((wf | wb) & 0x7FFFu) != 0);
    l->nnz_after[j] += (wo != wb) & (((wo | wb) & 0x7FFFu) != 0);
}

static inline void step_f32(const float *b, const float *f, float *o, size_t i, int j, uint32_t keep, float scale,
                            Lanes *l) {
    float bv = b[i];
    float d = f[i] - bv;
    float m = d * scale;
    uint32_t kept = as_u32(bv + m), wb = as_u32(bv);
    float out = as_f32((kept & keep) | (wb & ~keep));
    o[i] = out;
    float dm = out - bv;
    l->sq_before[j] += d * d;
    l->sq_after[j] += dm * dm;
    l->nnz_before[j] += d != 0.0f;
    l->nnz_after[j] += dm != 0.0f;
}

CLONES static void merge_bf16(const uint16_t *restrict b, const uint16_t *restrict f, uint16_t *restrict o,
                              size_t n, uint32_t k0, uint32_t k1, uint32_t lo0, uint32_t thresh, float scale,
                              Stats *s) {
    Lanes l;
    memset(&l, 0, sizeof l);
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++)
            step_bf16(b, f, o, i + j, j, keep_mask(k0, k1, lo0 + (uint32_t)(i + j), thresh), scale, &l);
    for (int j = 0; i < n; i++, j++)
        step_bf16(b, f, o, i, j, keep_mask(k0, k1, lo0 + (uint32_t)i, thresh), scale, &l);
    add_lanes(&l, s);
}

CLONES static void merge_f32(const float *restrict b, const float *restrict f, float *restrict o, size_t n,
                             uint32_t k0, uint32_t k1, uint32_t lo0, uint32_t thresh, float scale, Stats *s) {
    Lanes l;
    memset(&l, 0, sizeof l);
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++)
            step_f32(b, f, o, i + j, j, keep_mask(k0, k1, lo0 + (uint32_t)(i + j), thresh), scale, &l);
    for (int j = 0; i < n; i++, j++)
        step_f32(b, f, o, i, j, keep_mask(k0, k1, lo0 + (uint32_t)i, thresh), scale, &l);
    add_lanes(&l, s);
}

static int get_buffers(PyObject *const *args, Py_buffer *views, int nviews, int kind, Py_ssize_t *n) {
    Py_ssize_t item = kind == 0 ? 4 : 2;
    for (int k = 0; k < nviews; k++) {
        int flags = k == 2 ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS;
        if (PyObject_GetBuffer(args[k], &views[k], flags) < 0) {
            for (int j = 0; j < k; j++) PyBuffer_Release(&views[j]);
            return -1;
        }
    }
    *n = views[0].len / item;
    for (int k = 0; k < nviews; k++) {
        if (views[k].len != views[0].len || views[k].len % item) {
            for (int j = 0; j < nviews; j++) PyBuffer_Release(&views[j]);
            PyErr_SetString(PyExc_ValueError, "buffers must hold the same whole number of elements");
            return -1;
        }
    }
    return 0;
}

static PyObject *merge(PyObject *Py_UNUSED(self), PyObject *args) {
    int kind;
    PyObject *bufs[3];
    unsigned long k0, k1, lo0, thresh;
    float scale;
    if (!PyArg_ParseTuple(args, "iOOOkkkkf", &kind, &bufs[0], &bufs[1], &bufs[2], &k0, &k1, &lo0, &thresh, &scale))
        return NULL;
    if (kind != 0 && kind != 1) {
        PyErr_SetString(PyExc_ValueError, "kind must be 0 (float32) or 1 (bfloat16)");
        return NULL;
    }
    Py_buffer v[3];
    Py_ssize_t n;
    if (get_buffers(bufs, v, 3, kind, &n) < 0) return NULL;
    Stats s = {0, 0, 0.0, 0.0};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        size_t m = (size_t)(n - start < BLOCK ? n - start : BLOCK);
        uint32_t lo = (uint32_t)lo0 + (uint32_t)start;
        if (kind == 1) {
            const uint16_t *b = (const uint16_t *)v[0].buf + start, *f = (const uint16_t *)v[1].buf + start;
            uint16_t *o = (uint16_t *)v[2].buf + start;
            merge_bf16(b, f, o, m, (uint32_t)k0, (uint32_t)k1, lo, (uint32_t)thresh, scale, &s);
        } else {
            const float *b = (const float *)v[0].buf + start, *f = (const float *)v[1].buf + start;
            float *o = (float *)v[2].buf + start;
            merge_f32(b, f, o, m, (uint32_t)k0, (uint32_t)k1, lo, (uint32_t)thresh, scale, &s);
        }
    }
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 3; k++) PyBuffer_Release(&v[k]);
    return Py_BuildValue("KKdd", (unsigned long long)s.nnz_before, (unsigned long long)s.nnz_after, s.sq_before,
                         s.sq_after);
}

static PyObject *count_nonfinite(PyObject *Py_UNUSED(self), PyObject *args) {
    int kind;
    PyObject *bufs[2];
    if (!PyArg_ParseTuple(args, "iOO", &kind, &bufs[0], &bufs[1])) return NULL;
    Py_buffer v[2];
    Py_ssize_t n;
    if (get_buffers(bufs, v, 2, kind, &n) < 0) return NULL;
    unsigned long long bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        float d = kind == 1 ? as_f32((uint32_t)((const uint16_t *)v[1].buf)[i] << 16)
                                  - as_f32((uint32_t)((const uint16_t *)v[0].buf)[i] << 16)
                            : ((const float *)v[1].buf)[i] - ((const float *)v[0].buf)[i];
        bad += !isfinite(d);
    }
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 2; k++) PyBuffer_Release(&v[k]);
    return PyLong_FromUnsignedLongLong(bad);
}

#define SELECT_LOOP(T)                                                                                       \
    {                                                                                                        \
        const T *src = (const T *)sv; T *dst = (T *)dv; const T *val = (const T *)vv;                        \
        if (val == NULL) {                                                                                   \
            for (size_t i = 0; i < n; i++) {                                                                 \
                dst[c] = src[i];                                                                             \
                c += lb32(lb32((lo0 + (uint32_t)i) ^ k0) ^ k1) >= thresh;                                    \
            }                                                                                                \
        } else {                                                                                             \
            for (size_t i = 0; i < n; i++) {                                                                 \
                int keep = lb32(lb32((lo0 + (uint32_t)i) ^ k0) ^ k1) >= thresh;                              \
                dst[i] = keep && c < nv ? val[c] : src[i];                                                   \
                c += keep;                                                                                   \
            }                                                                                                \
        }                                                                                                    \
    }

CLONES static size_t select_words(int size, const void *sv, void *dv, const void *vv, size_t nv, size_t n,
                                  uint32_t k0, uint32_t k1, uint32_t lo0, uint32_t thresh) {
    size_t c = 0;
    switch (size) {
    case 1: SELECT_LOOP(uint8_t) break;
    case 2: SELECT_LOOP(uint16_t) break;
    case 4: SELECT_LOOP(uint32_t) break;
    default: SELECT_LOOP(uint64_t) break;
    }
    return c;
}

static PyObject *select_kept(PyObject *Py_UNUSED(self), PyObject *args) {
    int size;
    PyObject *src, *dst, *values;
    unsigned long k0, k1, lo0, thresh;
    if (!PyArg_ParseTuple(args, "iOOOkkkk", &size, &src, &dst, &values, &k0, &k1, &lo0, &thresh)) return NULL;
    if (size != 1 && size != 2 && size != 4 && size != 8) {
        PyErr_SetString(PyExc_ValueError, "size must be 1, 2, 4 or 8 bytes");
        return NULL;
    }
    Py_buffer v[3];
    int nviews = values == Py_None ? 2 : 3;
    if (PyObject_GetBuffer(src, &v[0], PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(dst, &v[1], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&v[0]);
        return NULL;
    }
    if (nviews == 3 && PyObject_GetBuffer(values, &v[2], PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&v[0]);
        PyBuffer_Release(&v[1]);
        return NULL;
    }
    size_t n = (size_t)v[0].len / size, nv = nviews == 3 ? (size_t)v[2].len / size : 0;
    if (v[0].len % size || (size_t)v[1].len < v[0].len || (nviews == 3 && v[2].len % size)) {
        for (int k = 0; k < nviews; k++) PyBuffer_Release(&v[k]);
        PyErr_SetString(PyExc_ValueError, "src must hold whole words and dst at least as many bytes");
        return NULL;
    }
    size_t c;
    Py_BEGIN_ALLOW_THREADS
    c = select_words(size, v[0].buf, v[1].buf, nviews == 3 ? v[2].buf : NULL, nv, n, (uint32_t)k0, (uint32_t)k1,
                     (uint32_t)lo0, (uint32_t)thresh);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < nviews; k++) PyBuffer_Release(&v[k]);
    return PyLong_FromSize_t(c);
}

/* ------------------------------------------------------------------------------ merges of N models (merge.py)
 * merge_models(out_kind, out, base_kind, base, models, consensus, normalize, lam, scale_out) -> (bad base,
 * (bad fine-tuned ...), (bad delta ...)): lifelong_delta/delta/merge.py's merge_tensor on one range of raw words.
 * Kinds are 0 (float32) and 1 (bfloat16 as uint16 words), one per buffer. `models` holds one tuple per model,
 * (kind, words, weight, sparsify, cut, limit, k0, k1, lo0, thresh, scale); sparsify 0 keeps the delta, 1 is TIES'
 * trim (|d| bits > cut, or == cut at a position below `limit`, positions counted from the range's first element),
 * 2 DARE's mask (the hash word of counter lo0 + i keyed by k0, k1 at least thresh; kept deltas times scale).
 * Per element, in fp32 and in merge.py's order: d_i = f_i - b; s_i = kept ? d_i (* scale) : +0; u_i = w_i * s_i;
 * t = u_0 + u_1 + ...; linear: t /= (w_0 + w_1 + ...) with normalize (if that sum is at least 1e-8 in magnitude);
 * consensus: model i agrees where u_i > 0 if t >= 0, u_i < 0 otherwise, t = the sum of the agreeing u_i (from +0,
 * non-agreeing models adding +0), divided with normalize by the sum of their weights (1 where none agrees); then
 * t *= lam if scale_out; out = b + t, bf16 rounded to nearest even (NaN as 0xFFFF, as torch casts). The counts are
 * the NaN/inf words of each input and the NaN/inf deltas of each model; when one is not 0 `out` is meaningless.
 *
 * magnitude_cut(base_kind, base, ft_kind, ft, k) -> (NaN/inf deltas, value bits, limit): TIES' cut keeping the k
 * largest |ft - base| of a whole tensor (merge.py's MagnitudeCut): a radix select over the bits of |d| (finite
 * non-negative floats order as integers), 15 high bits then 16 low bits, and
 * the last kept entry of magnitude `value` in flat order. k = 0 gives (inf bits, 0); a NaN/inf
 * delta stops after the first pass.
 *
 * count_nonfinite_words(kind, words) -> NaN/inf values; convert(in_kind, src, out_kind, dst) casts words as torch
 * does (bf16 rounded to nearest even, NaN as 0xFFFF). */

#define MB 2048 /* elements per block of the N-model merge: every model's fp32 values of a block stay in L2 */
#define EXP32 0x7F800000u

static inline uint32_t bad32(uint32_t u) { return (u & EXP32) == EXP32; }

static inline uint16_t to_bf16(uint32_t u) {
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFFu) > EXP32 ? 0xFFFFu : r);
}

/* n words of `kind` from element `at` of src as fp32 into dst; returns the NaN/inf count. */
CLONES static uint64_t load_words(int kind, const void *src, size_t at, size_t n, float *restrict dst) {
    uint32_t bad = 0;
    if (kind == 1) {
        const uint16_t *s = (const uint16_t *)src + at;
        for (size_t j = 0; j < n; j++) {
            uint32_t w = s[j];
            dst[j] = as_f32(w << 16);
            bad += (w & 0x7F80u) == 0x7F80u;
        }
    } else {
        const uint32_t *s = (const uint32_t *)src + at;
        for (size_t j = 0; j < n; j++) {
            dst[j] = as_f32(s[j]);
            bad += bad32(s[j]);
        }
    }
    return bad;
}

CLONES static void store_words(int kind, void *dst, size_t at, size_t n, const float *restrict src) {
    if (kind == 1) {
        uint16_t *o = (uint16_t *)dst + at;
        for (size_t j = 0; j < n; j++) o[j] = to_bf16(as_u32(src[j]));
    } else {
        memcpy((float *)dst + at, src, n * sizeof(float));
    }
}

typedef struct {
    int kind, sparsify;
    Py_buffer view;
    float weight, scale;
    uint32_t cut, k0, k1, lo0, thresh;
    size_t limit;
    uint64_t bad_words, bad_deltas;
} Model;

/* u = w * sparsified (f - b) of one model over a block whose first element is `at`; returns NaN/inf deltas. */
CLONES static uint64_t weigh(const Model *m, size_t at, size_t n, const float *restrict b, const float *restrict f,
                             float *restrict u) {
    uint32_t bad = 0;
    float w = m->weight, scale = m->scale;
    if (m->sparsify == 0) {
        for (size_t j = 0; j < n; j++) {
            float d = f[j] - b[j];
            bad += bad32(as_u32(d));
            u[j] = w * d;
        }
    } else if (m->sparsify == 1) {
        uint32_t cut = m->cut;
        size_t lim = m->limit > at ? m->limit - at : 0;
        for (size_t j = 0; j < n; j++) {
            float d = f[j] - b[j];
            uint32_t a = as_u32(d) & 0x7FFFFFFFu;
            uint32_t keep = 0u - (uint32_t)((a > cut) | ((a == cut) & (j < lim)));
            bad += bad32(a);
            u[j] = w * as_f32(as_u32(d) & keep);
        }
    } else {
        uint32_t lo = m->lo0 + (uint32_t)at, k0 = m->k0, k1 = m->k1, thresh = m->thresh;
        for (size_t j = 0; j < n; j++) {
            float d = f[j] - b[j];
            bad += bad32(as_u32(d));
            u[j] = w * as_f32(as_u32(d * scale) & keep_mask(k0, k1, lo + (uint32_t)j, thresh));
        }
    }
    return bad;
}

/* The combination of one block: u holds the models' weighted deltas, blocks of MB each; t receives the merged delta,
 * m and agreeing are scratch. Loops run over the block's elements model by model, so they vectorise. */
CLONES static void combine_block(const Model *ms, int nm, size_t n, const float *restrict u, float *restrict t,
                                 float *restrict m, float *restrict agreeing, int consensus, int normalize,
                                 float divisor, int divide, float lam, int scale_out) {
    memcpy(t, u, n * sizeof(float));
    for (int i = 1; i < nm; i++)
        for (size_t j = 0; j < n; j++) t[j] += u[(size_t)i * MB + j];
    if (!consensus) {
        if (divide)
            for (size_t j = 0; j < n; j++) t[j] /= divisor;
    } else {
        for (int i = 0; i < nm; i++) {
            const float *ui = u + (size_t)i * MB;
            uint32_t w = as_u32(ms[i].weight);
            for (size_t j = 0; j < n; j++) { /* blends of bits, without branches, so that the loops vectorise */
                uint32_t up = t[j] >= 0.0f;
                uint32_t agree = 0u - ((up & (ui[j] > 0.0f)) | ((up ^ 1u) & (ui[j] < 0.0f)));
                float x = as_f32(as_u32(ui[j]) & agree), y = as_f32(w & agree);
                if (i == 0) {
                    m[j] = x;
                    agreeing[j] = y;
                } else {
                    m[j] += x;
                    agreeing[j] += y;
                }
            }
        }
        if (normalize)
            for (size_t j = 0; j < n; j++) {
                uint32_t none = 0u - (uint32_t)(agreeing[j] == 0.0f);
                m[j] /= as_f32((as_u32(1.0f) & none) | (as_u32(agreeing[j]) & ~none));
            }
        memcpy(t, m, n * sizeof(float));
    }
    if (scale_out)
        for (size_t j = 0; j < n; j++) t[j] *= lam;
}

static void merge_models_range(Model *ms, int nm, int out_kind, void *out, int base_kind, const void *base, size_t n,
                               float *scratch, int consensus, int normalize, float lam, int scale_out,
                               uint64_t *bad_base) {
    float *b = scratch, *f = b + MB, *t = f + MB, *m = t + MB, *agreeing = m + MB, *u = agreeing + MB;
    float divisor = ms[0].weight;
    for (int i = 1; i < nm; i++) divisor += ms[i].weight;
    int divide = normalize && fabs((double)divisor) >= 1e-8;
    for (size_t at = 0; at < n; at += MB) {
        size_t len = n - at < MB ? n - at : MB;
        *bad_base += load_words(base_kind, base, at, len, b);
        for (int i = 0; i < nm; i++) {
            ms[i].bad_words += load_words(ms[i].kind, ms[i].view.buf, at, len, f);
            ms[i].bad_deltas += weigh(&ms[i], at, len, b, f, u + (size_t)i * MB);
        }
        combine_block(ms, nm, len, u, t, m, agreeing, consensus, normalize, divisor, divide, lam, scale_out);
        for (size_t j = 0; j < len; j++) t[j] = b[j] + t[j];
        store_words(out_kind, out, at, len, t);
    }
}

static int word_view(PyObject *obj, int kind, int writable, Py_buffer *view, Py_ssize_t *n) {
    if (kind != 0 && kind != 1) {
        PyErr_SetString(PyExc_ValueError, "kind must be 0 (float32) or 1 (bfloat16)");
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    Py_ssize_t item = kind == 0 ? 4 : 2;
    if (view->len % item || (*n >= 0 && view->len / item != *n)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "buffers must hold the same whole number of elements");
        return -1;
    }
    *n = view->len / item;
    return 0;
}

static PyObject *merge_models(PyObject *Py_UNUSED(self), PyObject *args) {
    int out_kind, base_kind, consensus, normalize, scale_out;
    PyObject *out_obj, *base_obj, *models;
    float lam;
    if (!PyArg_ParseTuple(args, "iOiOO!ppfp", &out_kind, &out_obj, &base_kind, &base_obj, &PyTuple_Type, &models,
                          &consensus, &normalize, &lam, &scale_out))
        return NULL;
    Py_ssize_t nm = PyTuple_GET_SIZE(models), n = -1;
    if (nm < 1) {
        PyErr_SetString(PyExc_ValueError, "a merge needs at least one model");
        return NULL;
    }
    Py_buffer vo, vb;
    if (word_view(out_obj, out_kind, 1, &vo, &n) < 0) return NULL;
    if (word_view(base_obj, base_kind, 0, &vb, &n) < 0) {
        PyBuffer_Release(&vo);
        return NULL;
    }
    Model *ms = calloc((size_t)nm, sizeof(Model));
    float *scratch = malloc(((size_t)nm + 5) * MB * sizeof(float));
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    if (ms == NULL || scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < nm; got++) {
        Model *m = &ms[got];
        PyObject *words;
        unsigned long cut, limit, k0, k1, lo0, thresh;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(models, got), "iOfikkkkkkf", &m->kind, &words, &m->weight,
                              &m->sparsify, &cut, &limit, &k0, &k1, &lo0, &thresh, &m->scale))
            goto done;
        if (word_view(words, m->kind, 0, &m->view, &n) < 0) goto done;
        m->cut = (uint32_t)cut, m->limit = (size_t)limit, m->k0 = (uint32_t)k0, m->k1 = (uint32_t)k1;
        m->lo0 = (uint32_t)lo0, m->thresh = (uint32_t)thresh;
    }
    uint64_t bad_base = 0;
    Py_BEGIN_ALLOW_THREADS
    merge_models_range(ms, (int)nm, out_kind, vo.buf, base_kind, vb.buf, (size_t)n, scratch, consensus, normalize,
                       lam, scale_out, &bad_base);
    Py_END_ALLOW_THREADS
    PyObject *words = PyTuple_New(nm), *deltas = PyTuple_New(nm);
    if (words != NULL && deltas != NULL) {
        for (Py_ssize_t i = 0; i < nm; i++) {
            PyTuple_SET_ITEM(words, i, PyLong_FromUnsignedLongLong(ms[i].bad_words));
            PyTuple_SET_ITEM(deltas, i, PyLong_FromUnsignedLongLong(ms[i].bad_deltas));
        }
        result = Py_BuildValue("KOO", (unsigned long long)bad_base, words, deltas);
    }
    Py_XDECREF(words);
    Py_XDECREF(deltas);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&ms[i].view);
    PyBuffer_Release(&vo);
    PyBuffer_Release(&vb);
    free(ms);
    free(scratch);
    return result;
}

#define SUPER ((size_t)1 << 30) /* elements counted in uint32 sub-histograms before they are added up */

/* |f - b|'s bits of elements at .. at + m - 1 (m <= MB) into a; returns the NaN/inf count. */
CLONES static uint32_t abs_deltas(int bk, const void *b, int fk, const void *f, size_t at, size_t m, float *scratch,
                                  uint32_t *restrict a) {
    float *fb = scratch, *ff = fb + MB;
    load_words(bk, b, at, m, fb);
    load_words(fk, f, at, m, ff);
    uint32_t bad = 0;
    for (size_t j = 0; j < m; j++) {
        a[j] = as_u32(ff[j] - fb[j]) & 0x7FFFFFFFu;
        bad += a[j] >= EXP32;
    }
    return bad;
}

/* The cut of merge.py's magnitude_cut on n elements (`sub` holds 4 << 15 counters; `hist`, `first` and `last`
 * 1 << 16; `scratch` 3 * MB floats); returns the NaN/inf deltas (then value and limit are unset). Each pass
 * recomputes |d| a block at a time (fresh memory for all of them costs more in page faults than the recomputation).
 * The first counts the high 15 bits in four sub-histograms that take turns (runs of one bin do not wait on one
 * counter); the second the low 16 bits of the entries in the bin of the cut, with the first and last position of
 * each; when only some entries of the cut's magnitude are kept, a third pass finds the last kept one. */
static uint64_t cut_range(int bk, const void *b, int fk, const void *f, size_t n, size_t k, uint32_t *restrict sub,
                          size_t *restrict hist, size_t *restrict first, size_t *restrict last, float *scratch,
                          uint32_t *value, size_t *limit) {
    const size_t bins = (size_t)1 << 15;
    uint32_t *a = (uint32_t *)(scratch + 2 * MB);
    uint64_t bad = 0;
    memset(hist, 0, bins * sizeof(size_t));
    for (size_t s = 0; s < n; s += SUPER) {
        size_t e = n - s < SUPER ? n : s + SUPER;
        memset(sub, 0, 4 * bins * sizeof(uint32_t));
        for (size_t at = s; at < e; at += MB) {
            size_t m = e - at < MB ? e - at : MB;
            bad += abs_deltas(bk, b, fk, f, at, m, scratch, a);
            for (size_t j = 0; j < m; j++) sub[(j & 3) * bins + (a[j] >> 16)]++;
        }
        for (size_t i = 0; i < bins; i++)
            hist[i] += (size_t)sub[i] + sub[bins + i] + sub[2 * bins + i] + sub[3 * bins + i];
    }
    *value = EXP32, *limit = 0;
    if (bad || k == 0) return bad;
    size_t above = 0;
    uint32_t hi = 0x7FFFu;
    while (above + hist[hi] < k) above += hist[hi--];
    memset(hist, 0, ((size_t)1 << 16) * sizeof(size_t));
    for (size_t at = 0; at < n; at += MB) {
        size_t m = n - at < MB ? n - at : MB;
        abs_deltas(bk, b, fk, f, at, m, scratch, a);
        for (size_t j = 0; j < m; j++)
            if (a[j] >> 16 == hi) {
                uint32_t x = a[j] & 0xFFFFu;
                if (hist[x]++ == 0) first[x] = at + j;
                last[x] = at + j;
            }
    }
    uint32_t lo = 0xFFFFu;
    while (above + hist[lo] < k) above += hist[lo--];
    uint32_t v = hi << 16 | lo;
    size_t equal_kept = k - above, seen = 0;
    *value = v;
    if (equal_kept == hist[lo]) { /* every entry of magnitude v is kept */
        *limit = last[lo] + 1;
        return 0;
    }
    for (size_t at = first[lo] / MB * MB; at < n; at += MB) {
        size_t m = n - at < MB ? n - at : MB;
        abs_deltas(bk, b, fk, f, at, m, scratch, a);
        uint32_t c = 0;
        for (size_t j = 0; j < m; j++) c += a[j] == v;
        if (seen + c < equal_kept) {
            seen += c;
            continue;
        }
        for (size_t j = 0;; j++)
            if (a[j] == v && ++seen == equal_kept) {
                *limit = at + j + 1;
                return 0;
            }
    }
    return 0; /* not reached: the histograms counted equal_kept entries of magnitude v */
}

static PyObject *magnitude_cut(PyObject *Py_UNUSED(self), PyObject *args) {
    int bk, fk;
    PyObject *bo, *fo;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "iOiOn", &bk, &bo, &fk, &fo, &k)) return NULL;
    Py_buffer vb, vf;
    Py_ssize_t n = -1;
    if (word_view(bo, bk, 0, &vb, &n) < 0) return NULL;
    if (word_view(fo, fk, 0, &vf, &n) < 0) {
        PyBuffer_Release(&vb);
        return NULL;
    }
    PyObject *result = NULL;
    /* The histograms (2.3 MB) are kept for the thread's next cut: fresh pages each time cost more than small cuts. */
    static _Thread_local size_t *hist, *first, *last;
    static _Thread_local uint32_t *sub;
    static _Thread_local float *scratch;
    if (hist == NULL) hist = malloc(((size_t)1 << 16) * sizeof(size_t));
    if (first == NULL) first = malloc(((size_t)1 << 16) * sizeof(size_t));
    if (last == NULL) last = malloc(((size_t)1 << 16) * sizeof(size_t));
    if (sub == NULL) sub = malloc(((size_t)4 << 15) * sizeof(uint32_t));
    if (scratch == NULL) scratch = malloc(3 * MB * sizeof(float));
    if (k < 0 || k > n) {
        PyErr_SetString(PyExc_ValueError, "k must be in [0, number of elements]");
    } else if (hist == NULL || first == NULL || last == NULL || sub == NULL || scratch == NULL) {
        PyErr_NoMemory();
    } else {
        uint32_t value;
        size_t limit;
        uint64_t bad;
        Py_BEGIN_ALLOW_THREADS
        bad = cut_range(bk, vb.buf, fk, vf.buf, (size_t)n, (size_t)k, sub, hist, first, last, scratch, &value,
                        &limit);
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("KkK", (unsigned long long)bad, (unsigned long)value, (unsigned long long)limit);
    }
    PyBuffer_Release(&vb);
    PyBuffer_Release(&vf);
    return result;
}

static PyObject *count_nonfinite_words(PyObject *Py_UNUSED(self), PyObject *args) {
    int kind;
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "iO", &kind, &obj)) return NULL;
    Py_buffer v;
    Py_ssize_t n = -1;
    if (word_view(obj, kind, 0, &v, &n) < 0) return NULL;
    uint64_t bad = 0;
    float block[MB];
    Py_BEGIN_ALLOW_THREADS
    for (size_t at = 0; at < (size_t)n; at += MB)
        bad += load_words(kind, v.buf, at, (size_t)n - at < MB ? (size_t)n - at : MB, block);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(bad);
}

static PyObject *convert(PyObject *Py_UNUSED(self), PyObject *args) {
    int ik, ok;
    PyObject *src, *dst;
    if (!PyArg_ParseTuple(args, "iOiO", &ik, &src, &ok, &dst)) return NULL;
    Py_buffer vs, vd;
    Py_ssize_t n = -1;
    if (word_view(src, ik, 0, &vs, &n) < 0) return NULL;
    if (word_view(dst, ok, 1, &vd, &n) < 0) {
        PyBuffer_Release(&vs);
        return NULL;
    }
    float block[MB];
    Py_BEGIN_ALLOW_THREADS
    for (size_t at = 0; at < (size_t)n; at += MB) {
        size_t m = (size_t)n - at < MB ? (size_t)n - at : MB;
        load_words(ik, vs.buf, at, m, block);
        store_words(ok, vd.buf, at, m, block);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&vs);
    PyBuffer_Release(&vd);
    Py_RETURN_NONE;
}

/* DeltaBank's switch: store values[i] at the byte address addresses[i], or (gather) load it from there, for
 * width-byte words. The addresses point into live tensors of one model (the bank builds them from the tensors'
 * data_ptr and checks before every call that no tensor moved), so one call replaces a scatter per tensor. */
#define STORE_AT(T)                                                                                          \
    do {                                                                                                     \
        T *val = (T *)v.buf;                                                                                 \
        if (gather)                                                                                          \
            for (Py_ssize_t i = 0; i < n; i++) val[i] = *(const T *)(intptr_t)at[i];                         \
        else                                                                                                 \
            for (Py_ssize_t i = 0; i < n; i++) *(T *)(intptr_t)at[i] = val[i];                               \
    } while (0)

static PyObject *store_at(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *ao, *vo;
    int width, gather;
    if (!PyArg_ParseTuple(args, "OOip", &ao, &vo, &width, &gather)) return NULL;
    Py_buffer a, v;
    if (PyObject_GetBuffer(ao, &a, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(vo, &v, gather ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&a);
        return NULL;
    }
    Py_ssize_t n = a.len / 8;
    if (a.len % 8 || (width != 2 && width != 4 && width != 8) || v.len != n * width) {
        PyBuffer_Release(&a);
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "store_at needs int64 addresses and as many 2-, 4- or 8-byte values");
        return NULL;
    }
    const int64_t *at = (const int64_t *)a.buf;
    Py_BEGIN_ALLOW_THREADS
    if (width == 2)
        STORE_AT(uint16_t);
    else if (width == 4)
        STORE_AT(uint32_t);
    else
        STORE_AT(uint64_t);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"store_at", store_at, METH_VARARGS, "store_at(addresses, values, width, gather): values[i] to (or, gather, "
     "from) the byte address addresses[i], width-byte words; DeltaBank's one-call switch."},
    {"select", select_kept, METH_VARARGS, "select(size, src, dst, values, k0, k1, lo0, thresh) -> kept count: "
     "gather (values None) or scatter the kept words of one range (see the module source)."},
    {"merge", merge, METH_VARARGS, "merge(kind, base, ft, out, k0, k1, lo0, thresh, scale) -> (nnz_before, "
     "nnz_after, sq_before, sq_after): the fused DARE merge of one range of raw words (see the module source)."},
    {"count_nonfinite", count_nonfinite, METH_VARARGS,
     "count_nonfinite(kind, base, ft) -> number of NaN/inf deltas ft - base."},
    {"merge_models", merge_models, METH_VARARGS, "merge_models(out_kind, out, base_kind, base, models, consensus, "
     "normalize, lam, scale_out) -> (bad base, bad fine-tuned, bad deltas): merge.py's merge of N models on one "
     "range of raw words (see the module source)."},
    {"magnitude_cut", magnitude_cut, METH_VARARGS, "magnitude_cut(base_kind, base, ft_kind, ft, k) -> (bad deltas, "
     "value bits, limit): TIES' cut keeping the k largest |ft - base| of a whole tensor."},
    {"count_nonfinite_words", count_nonfinite_words, METH_VARARGS,
     "count_nonfinite_words(kind, words) -> number of NaN/inf values."},
    {"convert", convert, METH_VARARGS, "convert(in_kind, src, out_kind, dst): cast raw words as torch does."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_words", NULL, -1, methods};

PyMODINIT_FUNC PyInit__words(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0) { /* the block the statistics are summed by */
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
