/* RMSNorm of float32 rows, out = x / sqrt(mean(x^2) + eps) * w, for inference.
 *
 * Built and loaded by sorai/model/rms_norm.py (through sorai/native.py). Each row is summed in
 * one fixed order, so a row's result does not depend on how many rows a call holds: the same
 * alone as in any batch.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float* p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float* p, v8 x) { memcpy(p, &x, sizeof x); }

/* x [rows, d] with row stride x_stride (elements), w [d], out [rows, d] contiguous. The sum of
 * squares is taken in double, in index order: as near the exact mean as float32 inputs allow
 * (a float32 sum's rounding, in whatever order, moved the default model's logits by 2e-4 from
 * the reference's), and a few hundred cycles a row. */
void rms_norm_f32(const float* x, int64_t x_stride, const float* w, float* out, int64_t rows,
                  int64_t d, float eps) {
    int64_t body = d / 8 * 8;
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * x_stride;
        float* o = out + r * d;
        double sum = 0.0;
        for (int64_t c = 0; c < d; c++) sum += (double)xr[c] * (double)xr[c];
        float inv = (float)(1.0 / sqrt(sum / (double)d + (double)eps));
        for (int64_t c = 0; c < body; c += 8) store8(o + c, load8(xr + c) * inv * load8(w + c));
        for (int64_t c = body; c < d; c++) o[c] = xr[c] * inv * w[c];
    }
}
