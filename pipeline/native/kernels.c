/* Compiled kernels for the input gradient of the energy network on the CPU, in float32.
 *
 * The Langevin sampler needs d score / d x of a small stride-2 Swish CNN, thousands of times.
 * The matrix products stay in the BLAS (torch.mm); what is here is the memory reshuffling around
 * them and the Swish, in one pass each, where ATen and oneDNN take several:
 *
 *   swish_fwd        y = x sigmoid(x) and its derivative, with one exponential per value
 *   im2col_1ch_s2    the columns of a one-channel stride-2 convolution, tap by tap
 *   col2im_1ch_s2    the input gradient of that convolution from its tap-major columns
 *   col2im_s2        the input gradient of a stride-2 convolution (NHWC) from its columns, times
 *                    the derivative of the Swish before it
 *
 * Plain C (no intrinsics, no fast-math): the compiler vectorises the inner loops for the target
 * (built with -mavx2 -mfma by pipeline/native/__init__.py). Every function returns 0, or -1 for
 * shapes it does not handle.
 */
#include <stdint.h>
#include <string.h>

#define MAX_CHANNELS 256
#define MAX_PLANE_FLOATS 65536 /* the four phase planes of the first layer's padded image, on the stack */

/* exp(x) for float32 to about 2 ulp on [-87, 88] (clamped outside): Cody-Waite range
 * reduction and the Cephes polynomial, written so that it vectorises. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* y = x sigmoid(x) (Swish, SiLU) and d = dy/dx = s (1 + x (1 - s)), s = sigmoid(x). */
static inline void swish_span(const float *restrict x, float *restrict y, float *restrict d, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float s = 1.0f / (1.0f + exp_f32(-v));
        y[i] = v * s;
        d[i] = s * (1.0f + v * (1.0f - s));
    }
}

int swish_fwd(const float *restrict x, float *restrict y, float *restrict d, int64_t n) {
    swish_span(x, y, d, n);
    return 0;
}

/* The first layer's kernels keep each padded image as its four phase planes, (2, 2, ph, pw): padded pixel
 * (ty, tx) sits at phase_at(ty, tx), and tap (ky, kx) of output pixel (oy, ox) reads the padded pixel
 * (2 oy + ky, 2 ox + kx), that is phase_at(ky, kx) + oy * pw + ox: one contiguous run per output row. */
static inline int64_t phase_at(int64_t ty, int64_t tx, int64_t ph, int64_t pw) {
    return ((ty & 1) * 2 + (tx & 1)) * ph * pw + (ty >> 1) * pw + (tx >> 1);
}

/* Columns of a one-channel stride-2 k x k convolution with zero padding, tap-major:
 * x (n, h, w) -> cols (k, k, n, ho, wo), cols[ky, kx, b, oy, ox] = x[b, 2 oy - pad + ky, 2 ox - pad + kx].
 * Each image is first split into the four phase planes of its padded copy, so that every
 * (tap, output row) is one contiguous run of wo values. */
int im2col_1ch_s2(const float *restrict x, float *restrict cols,
                  int64_t n, int64_t h, int64_t w, int64_t k, int64_t pad, int64_t ho, int64_t wo) {
    const int64_t half = (k - 1) / 2 + 1, ph = ho + half, pw = wo + half;
    if (4 * ph * pw > MAX_PLANE_FLOATS) return -1;
    float planes[4 * ph * pw];
    for (int64_t b = 0; b < n; b++) {
        memset(planes, 0, sizeof(planes));
        for (int64_t iy = 0; iy < h; iy++) {
            const int64_t ty = iy + pad;
            for (int64_t ix = 0; ix < w; ix++) {
                const int64_t tx = ix + pad;
                if ((ty >> 1) < ph && (tx >> 1) < pw) planes[phase_at(ty, tx, ph, pw)] = x[(b * h + iy) * w + ix];
            }
        }
        for (int64_t ky = 0; ky < k; ky++)
            for (int64_t kx = 0; kx < k; kx++) {
                const float *pl = planes + phase_at(ky, kx, ph, pw);
                float *dst = cols + ((ky * k + kx) * n + b) * ho * wo;
                for (int64_t oy = 0; oy < ho; oy++) memcpy(dst + oy * wo, pl + oy * pw, wo * sizeof(float));
            }
    }
    return 0;
}

/* The input gradient of that convolution: cols (k, k, n, ho, wo) -> out (n, h, w), the sum over
 * taps of the columns put back where they were read. Each tap adds a whole plane into one phase
 * plane of the padded image (contiguous inner loop), then the planes are interleaved and cropped. */
int col2im_1ch_s2(const float *restrict cols, float *restrict out,
                  int64_t n, int64_t h, int64_t w, int64_t k, int64_t pad, int64_t ho, int64_t wo) {
    const int64_t half = (k - 1) / 2 + 1, ph = ho + half, pw = wo + half;
    if (4 * ph * pw > MAX_PLANE_FLOATS) return -1;
    float planes[4 * ph * pw];
    for (int64_t b = 0; b < n; b++) {
        memset(planes, 0, sizeof(planes));
        for (int64_t ky = 0; ky < k; ky++)
            for (int64_t kx = 0; kx < k; kx++) {
                const float *src = cols + ((ky * k + kx) * n + b) * ho * wo;
                float *pl = planes + phase_at(ky, kx, ph, pw);
                for (int64_t oy = 0; oy < ho; oy++)
                    for (int64_t ox = 0; ox < wo; ox++) pl[oy * pw + ox] += src[oy * wo + ox];
            }
        for (int64_t iy = 0; iy < h; iy++) {
            const int64_t ty = iy + pad;
            for (int64_t ix = 0; ix < w; ix++) {
                const int64_t tx = ix + pad;
                out[(b * h + iy) * w + ix] = (ty >> 1) < ph && (tx >> 1) < pw ? planes[phase_at(ty, tx, ph, pw)] : 0.0f;
            }
        }
    }
    return 0;
}

static inline __attribute__((always_inline)) void col2im_s2_c(const float *restrict cols, const float *restrict d, float *restrict out,
                               int64_t n, int64_t h, int64_t w, const int64_t c, int64_t k, int64_t pad,
                               int64_t ho, int64_t wo) {
    for (int64_t b = 0; b < n; b++) {
        const float *cb = cols + b * ho * wo * k * k * c;
        for (int64_t iy = 0; iy < h; iy++)
            for (int64_t ix = 0; ix < w; ix++) {
                float acc[MAX_CHANNELS];
                for (int64_t j = 0; j < c; j++) acc[j] = 0.0f;
                for (int64_t ky = (iy + pad) & 1; ky < k; ky += 2) {
                    const int64_t ty = iy + pad - ky, oy = ty >> 1;
                    if (ty < 0 || oy >= ho) continue;
                    for (int64_t kx = (ix + pad) & 1; kx < k; kx += 2) {
                        const int64_t tx = ix + pad - kx, ox = tx >> 1;
                        if (tx < 0 || ox >= wo) continue;
                        const float *src = cb + ((oy * wo + ox) * k * k + ky * k + kx) * c;
                        for (int64_t j = 0; j < c; j++) acc[j] += src[j];
                    }
                }
                const int64_t at = ((b * h + iy) * w + ix) * c;
                if (d)
                    for (int64_t j = 0; j < c; j++) out[at + j] = acc[j] * d[at + j];
                else
                    for (int64_t j = 0; j < c; j++) out[at + j] = acc[j];
            }
    }
}

/* The input gradient of a stride-2 k x k convolution, NHWC, from its columns:
 * cols (n, ho, wo, k, k, c) -> out (n, h, w, c), each input pixel the sum of the columns that read
 * it, times d (n, h, w, c) when d is not NULL (the derivative of the Swish that made the input). */
int col2im_s2(const float *cols, const float *d, float *out,
              int64_t n, int64_t h, int64_t w, int64_t c, int64_t k, int64_t pad, int64_t ho, int64_t wo) {
    switch (c) { /* the common widths, specialised so that the channel loops unroll */
    case 8: col2im_s2_c(cols, d, out, n, h, w, 8, k, pad, ho, wo); return 0;
    case 16: col2im_s2_c(cols, d, out, n, h, w, 16, k, pad, ho, wo); return 0;
    case 32: col2im_s2_c(cols, d, out, n, h, w, 32, k, pad, ho, wo); return 0;
    case 64: col2im_s2_c(cols, d, out, n, h, w, 64, k, pad, ho, wo); return 0;
    default:
        if (c < 1 || c > MAX_CHANNELS) return -1;
        col2im_s2_c(cols, d, out, n, h, w, c, k, pad, ho, wo);
        return 0;
    }
}
