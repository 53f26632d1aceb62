/* Paged decode attention: each sequence's one query per head over its own keys and values,
 * read in place from the paged KV cache through its slot list (no gather copy, no padding).
 *
 * Built and loaded by sorai/engine/decode_attention.py. Every (sequence, KV head) pair is
 * computed by the same code in the same order whatever else the call holds: a row's numbers
 * depend only on its query, its own keys and values, and its length, so they are the same
 * alone, in any batch and beside any padding. Portable C with GCC/Clang vector extensions
 * (compiled with -march=native, they become AVX2/AVX-512/NEON instructions).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef _Float16 v8h __attribute__((vector_size(16)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef _Float16 half;
typedef uint16_t bf16;

static inline v8 ld_f32(const float* p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void st_f32(float* p, v8 x) { memcpy(p, &x, sizeof x); }
static inline v8 ld_half(const half* p) {
    v8h r;
    memcpy(&r, p, sizeof r);
    return __builtin_convertvector(r, v8);
}
static inline v8 ld_bf16(const bf16* p) {
    v8u16 r;
    memcpy(&r, p, sizeof r);
    return (v8)(__builtin_convertvector(r, v8u) << 16);
}
/* A fixed pairing of the lanes, ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)): the dot
 * product's order never depends on the call. Halves first: a few instructions, not 15. */
static inline float hsum(v8 a) {
    v4 lo, hi;
    memcpy(&lo, &a, sizeof lo);
    memcpy(&hi, (const char*)&a + sizeof lo, sizeof hi);
    v4 b = lo + hi;
    return (b[0] + b[1]) + (b[2] + b[3]);
}

/* e^x for x <= 0 (scores minus their maximum): Cephes' expf polynomial, within 2 ulp, and 0
 * below -44 (e^-44 < 2^-63). A weight that small is below float32's resolution of the sum it
 * joins (which holds the top weight, 1), and its products with values would go denormal,
 * each ~100x slower on x86: real attention rows hold many such weights. */
static inline v8 vexp(v8 x) {
    v8i negligible = x < -44.0f;
    x = (v8)((v8i)x & ~negligible); /* 0 there: keeps the 2^t below in range */
    v8 fx = x * 1.44269504088896341f + 0.5f;
    v8i t = __builtin_convertvector(fx, v8i);
    t += __builtin_convertvector(t, v8) > fx; /* truncation rounded a negative up: floor */
    v8 tf = __builtin_convertvector(t, v8);
    x = x - tf * 0.693359375f;
    x = x + tf * 2.12194440e-4f;
    v8 z = x * x;
    v8 y = x * 1.9875691500E-4f + 1.3981999507E-3f;
    y = y * x + 8.3334519073E-3f;
    y = y * x + 4.1665795894E-2f;
    y = y * x + 1.6666665459E-1f;
    y = y * x + 5.0000001201E-1f;
    y = y * z + x + 1.0f;
    return (v8)((v8i)(y * (v8)((t + 127) << 23)) & ~negligible);
}

/* The next sequence's slot rows, one cache line per call, fetched while this one computes:
 * compute and memory overlap instead of taking turns. */
typedef struct {
    const char *keys, *values;
    const int64_t* slots;
    int64_t n, row_bytes, row, line, in_values;
} stream;

static inline void ahead(stream* s) {
    if (s->row >= s->n) return;
    const char* base = s->in_values ? s->values : s->keys;
    __builtin_prefetch(base + s->slots[s->row] * s->row_bytes + s->line);
    s->line += 64;
    if (s->line >= s->row_bytes) {
        s->line = 0;
        s->row += s->in_values;
        s->in_values ^= 1;
    }
}

/* Q query heads sharing one KV head (Q a constant, so the accumulators stay in registers):
 * scores, softmax (sums in position order) and the weighted sum of values. R key rows at a
 * time share each query chunk's load, and V value vectors per pass over the rows: enough
 * independent sums to keep the FMA units busy, few enough to stay in 16 registers (for 3
 * query heads, 2 and 2 measured best). */
#define GROUP(KT, LD, Q, R, V)                                                              \
    static void group_##KT##_##Q(const float* q, int64_t q_head, const KT* keys,            \
                                 const KT* values, const int64_t* slots, int64_t n,         \
                                 int64_t stride, int64_t d, float scale, float* scores,     \
                                 int64_t padded, float* out, int64_t out_head,              \
                                 stream* next) {                                            \
        int64_t l = 0;                                                                      \
        for (; l + R <= n; l += R) {                                                        \
            const KT* k[R];                                                                 \
            for (int r = 0; r < R; r++) k[r] = keys + slots[l + r] * stride;                \
            for (int i = 0; i < 4 * R; i++) ahead(next);                                    \
            v8 a[Q][R];                                                                     \
            for (int t = 0; t < Q; t++)                                                     \
                for (int r = 0; r < R; r++) a[t][r] = (v8){0};                              \
            for (int64_t c = 0; c < d; c += 8) {                                            \
                v8 x[R];                                                                    \
                for (int r = 0; r < R; r++) x[r] = LD(k[r] + c);                            \
                for (int t = 0; t < Q; t++) {                                               \
                    v8 qt = ld_f32(q + t * q_head + c);                                     \
                    for (int r = 0; r < R; r++) a[t][r] += qt * x[r];                       \
                }                                                                           \
            }                                                                               \
            for (int t = 0; t < Q; t++)                                                     \
                for (int r = 0; r < R; r++) scores[t * padded + l + r] = hsum(a[t][r]) * scale; \
        }                                                                                   \
        for (; l < n; l++) {                                                                \
            const KT* k = keys + slots[l] * stride;                                         \
            v8 a[Q] = {0};                                                                  \
            for (int64_t c = 0; c < d; c += 8) {                                            \
                v8 kv = LD(k + c);                                                          \
                for (int t = 0; t < Q; t++) a[t] += ld_f32(q + t * q_head + c) * kv;        \
            }                                                                               \
            for (int t = 0; t < Q; t++) scores[t * padded + l] = hsum(a[t]) * scale;        \
        }                                                                                   \
        float inv[Q];                                                                       \
        for (int t = 0; t < Q; t++) {                                                       \
            float* row = scores + t * padded;                                               \
            float m = row[0];                                                               \
            for (int64_t l = 1; l < n; l++) m = row[l] > m ? row[l] : m;                    \
            for (int64_t l = n; l < padded; l++) row[l] = m;                                \
            for (int64_t l = 0; l < padded; l += 8) st_f32(row + l, vexp(ld_f32(row + l) - m)); \
            float sum = 0.0f;                                                               \
            for (int64_t l = 0; l < n; l++) sum += row[l];                                  \
            inv[t] = 1.0f / sum;                                                            \
        }                                                                                   \
        int64_t c = 0;                                                                      \
        for (; c + 8 * V <= d; c += 8 * V) {                                                \
            v8 a[Q][V];                                                                     \
            for (int t = 0; t < Q; t++)                                                     \
                for (int u = 0; u < V; u++) a[t][u] = (v8){0};                              \
            for (int64_t l = 0; l < n; l++) {                                               \
                const KT* v = values + slots[l] * stride + c;                               \
                ahead(next);                                                                \
                for (int t = 0; t < Q; t++) {                                               \
                    float p = scores[t * padded + l];                                       \
                    for (int u = 0; u < V; u++) a[t][u] += p * LD(v + 8 * u);               \
                }                                                                           \
            }                                                                               \
            for (int t = 0; t < Q; t++)                                                     \
                for (int u = 0; u < V; u++)                                                 \
                    st_f32(out + t * out_head + c + 8 * u, a[t][u] * inv[t]);               \
        }                                                                                   \
        for (; c < d; c += 16) {                                                            \
            v8 a0[Q] = {0}, a1[Q] = {0};                                                    \
            for (int64_t l = 0; l < n; l++) {                                               \
                const KT* v = values + slots[l] * stride + c;                               \
                v8 v0 = LD(v), v1 = LD(v + 8);                                              \
                for (int t = 0; t < Q; t++) {                                               \
                    float p = scores[t * padded + l];                                       \
                    a0[t] += p * v0;                                                        \
                    a1[t] += p * v1;                                                        \
                }                                                                           \
            }                                                                               \
            for (int t = 0; t < Q; t++) {                                                   \
                st_f32(out + t * out_head + c, a0[t] * inv[t]);                             \
                st_f32(out + t * out_head + c + 8, a1[t] * inv[t]);                         \
            }                                                                               \
        }                                                                                   \
    }

/* q [D, H, d] (any strides with d contiguous), keys/values [slots, KV, d] contiguous, slots
 * [D, >= lengths[s]] with row stride slot_stride, out [D, H, d] contiguous; d % 16 == 0.
 * Returns 0, or -1 when out of memory. */
#define DEFINE(KT, LD)                                                                      \
    GROUP(KT, LD, 1, 4, 4) GROUP(KT, LD, 2, 4, 2) GROUP(KT, LD, 3, 2, 2) GROUP(KT, LD, 4, 2, 2)                     \
    int paged_decode_##KT(const float* q, int64_t q_seq, int64_t q_head, const KT* keys,    \
                          const KT* values, const int64_t* slots, int64_t slot_stride,      \
                          const int64_t* lengths, float* out, int64_t D, int64_t H,         \
                          int64_t KV, int64_t d, float scale) {                             \
        int64_t g = H / KV, longest = 1;                                                    \
        for (int64_t s = 0; s < D; s++) longest = lengths[s] > longest ? lengths[s] : longest; \
        int64_t padded = (longest + 7) / 8 * 8;                                             \
        float* scores = malloc(sizeof(float) * 4 * padded);                                 \
        if (!scores) return -1;                                                             \
        for (int64_t s = 0; s < D; s++) {                                                   \
            const int64_t* sl = slots + s * slot_stride;                                    \
            int64_t nn = s + 1 < D ? lengths[s + 1] : 0;                                    \
            if (s == 0) { /* nothing computes before the first: fetch it at once */         \
                stream first = {(const char*)keys, (const char*)values, sl, lengths[0],      \
                                KV * d * (int64_t)sizeof(KT), 0, 0, 0};                     \
                while (first.row < first.n) ahead(&first);                                  \
            }                                                                               \
            stream next = {(const char*)keys, (const char*)values, sl + slot_stride, nn,     \
                           KV * d * (int64_t)sizeof(KT), 0, 0, 0};                          \
            for (int64_t h = 0; h < KV; h++) {                                              \
                const KT* k = keys + h * d;                                                 \
                const KT* v = values + h * d;                                               \
                for (int64_t j = 0; j < g; j += 4) {                                        \
                    int64_t head = h * g + j, rest = g - j, n = lengths[s];                 \
                    const float* qh = q + s * q_seq + head * q_head;                        \
                    float* o = out + (s * H + head) * d;                                    \
                    if (rest >= 4)                                                          \
                        group_##KT##_4(qh, q_head, k, v, sl, n, KV * d, d, scale, scores,   \
                                       padded, o, d, &next);                                       \
                    else if (rest == 3)                                                     \
                        group_##KT##_3(qh, q_head, k, v, sl, n, KV * d, d, scale, scores,   \
                                       padded, o, d, &next);                                       \
                    else if (rest == 2)                                                     \
                        group_##KT##_2(qh, q_head, k, v, sl, n, KV * d, d, scale, scores,   \
                                       padded, o, d, &next);                                       \
                    else                                                                    \
                        group_##KT##_1(qh, q_head, k, v, sl, n, KV * d, d, scale, scores,   \
                                       padded, o, d, &next);                                       \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        free(scores);                                                                       \
        return 0;                                                                           \
    }

DEFINE(float, ld_f32)
DEFINE(half, ld_half)
DEFINE(bf16, ld_bf16)
