/*
 * pagellm's CPU kernels (fp32, OpenMP), written once over the vector layer of simd.h and
 * compiled per instruction set (AVX-512 or AVX2 + FMA) by pagellm/layers/native.py.
 *
 * Called through ctypes; every function has a portable torch twin in
 * pagellm/layers/ops.py that tests compare against. The OpenMP runtime is the one torch
 * already loaded (same soname), so the kernels share torch's thread team instead of
 * fighting it for the cores.
 *
 * Layouts (row-major, strides in elements):
 *   linear:     x[M, K] (row stride ldx), W[N, K], y[M, N]  ->  y = x W^T (+ b)
 *   KV cache:   cache[num_blocks, block_size, num_kv_heads, head_dim]
 *   attention:  q[T, Hq, D] (row stride ldq), out[T, Hq, D] contiguous
 *               token t of sequence s sits at position
 *                   seq_lens[s] - (qsl[s+1] - qsl[s]) + (t - qsl[s])
 *               and attends to positions 0..that position through block_tables[s].
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* The instruction set this library was built for (checked by the loader). */
const char* pagellm_isa(void) {
#if defined(PAGELLM_AVX512)
    return "avx512";
#else
    return "avx2";
#endif
}

/* Sum of n floats read with wide vector loads by every thread (the roofline's bandwidth
 * probe: the result only keeps the reads from being optimised away). */
float pagellm_read_sum(const float* x, int64_t n, int nthreads) {
    float total = 0.0f;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t per = (n / nt) & ~(int64_t)(4 * VW - 1);
        int64_t lo = per * id, hi = id == nt - 1 ? n : lo + per;
        vf a0 = vf_zero(), a1 = a0, a2 = a0, a3 = a0;
        int64_t i = lo;
        for (; i + 4 * VW <= hi; i += 4 * VW) {
            a0 = vf_add(a0, vf_load(x + i));
            a1 = vf_add(a1, vf_load(x + i + VW));
            a2 = vf_add(a2, vf_load(x + i + 2 * VW));
            a3 = vf_add(a3, vf_load(x + i + 3 * VW));
        }
        float s = vf_hsum(vf_add(vf_add(a0, a1), vf_add(a2, a3)));
        for (; i < hi; i++) s += x[i];
        total += s;
    }
    return total;
}

/* Every linear path below computes output (m, n) in the same order, so a row's result
 * never depends on how many other rows share the batch (batch invariance: a request's
 * greedy output is the same alone or under load, chunked or not):
 *   lane l of a VW-wide accumulator sums x[m, k] * W[n, k] for k = l, l + VW, ... with FMA;
 *   the lanes are added in the fixed order of vf_hsum4; then the K % VW tail in
 *   increasing k; then the bias. */

static inline void store_out(float* y, __m128 v, const float* x, const float* const* w,
                             int64_t KV, int64_t K, const float* bias, int64_t n0, int nvalid) {
    float r[4];
    _mm_storeu_ps(r, v);
    for (int i = 0; i < nvalid; i++) {
        for (int64_t k = KV; k < K; k++) r[i] += x[k] * w[i][k];
        y[n0 + i] = r[i] + (bias ? bias[n0 + i] : 0.0f);
    }
}

/* Rows n0..n0+3 of W (clamped at N - 1) against one or two input rows: the decode path,
 * memory-bound, so every weight byte is loaded once and used for both rows. */
static void linear_rows4(const float* x, int64_t ldx, const float* W, const float* bias,
                         float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int nvalid) {
    const float* w[4];
    for (int i = 0; i < 4; i++) w[i] = W + (n0 + (i < nvalid ? i : nvalid - 1)) * K;
    int64_t KV = K & ~(int64_t)(VW - 1);
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
        const float* xa = x + m * ldx;
        const float* xb = xa + ldx;
        vf a0 = vf_zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t k = 0; k < KV; k += VW) {
            vf va = vf_load(xa + k), vb = vf_load(xb + k);
            vf v0 = vf_load(w[0] + k), v1 = vf_load(w[1] + k);
            a0 = vf_fma(va, v0, a0);
            b0 = vf_fma(vb, v0, b0);
            a1 = vf_fma(va, v1, a1);
            b1 = vf_fma(vb, v1, b1);
            vf v2 = vf_load(w[2] + k), v3 = vf_load(w[3] + k);
            a2 = vf_fma(va, v2, a2);
            b2 = vf_fma(vb, v2, b2);
            a3 = vf_fma(va, v3, a3);
            b3 = vf_fma(vb, v3, b3);
        }
        store_out(y + m * N, vf_hsum4(a0, a1, a2, a3), xa, w, KV, K, bias, n0, nvalid);
        store_out(y + (m + 1) * N, vf_hsum4(b0, b1, b2, b3), xb, w, KV, K, bias, n0, nvalid);
    }
    for (; m < M; m++) {
        const float* xa = x + m * ldx;
        vf a0 = vf_zero(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < KV; k += VW) {
            vf va = vf_load(xa + k);
            a0 = vf_fma(va, vf_load(w[0] + k), a0);
            a1 = vf_fma(va, vf_load(w[1] + k), a1);
            a2 = vf_fma(va, vf_load(w[2] + k), a2);
            a3 = vf_fma(va, vf_load(w[3] + k), a3);
        }
        store_out(y + m * N, vf_hsum4(a0, a1, a2, a3), xa, w, KV, K, bias, n0, nvalid);
    }
}

/* Up to three input rows against rows n0..n0+3 of W: 12 accumulators, every loaded weight
 * vector feeds three FMAs. Compute-bound; on a 2-core machine it matches or beats MKL's
 * GEMM on these skinny shapes (MKL loses time packing them). */
static void linear_tile3x4(const float* x, int64_t ldx, const float* W, const float* bias,
                           float* y, int64_t N, int64_t K, int64_t n0, int nvalid, int mr) {
    const float* w[4];
    for (int i = 0; i < 4; i++) w[i] = W + (n0 + (i < nvalid ? i : nvalid - 1)) * K;
    const float* x0 = x;
    const float* x1 = mr > 1 ? x + ldx : x;
    const float* x2 = mr > 2 ? x + 2 * ldx : x;
    int64_t KV = K & ~(int64_t)(VW - 1);
    vf a00 = vf_zero(), a01 = a00, a02 = a00, a03 = a00;
    vf a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    vf a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int64_t k = 0; k < KV; k += VW) {
        vf v0 = vf_load(w[0] + k), v1 = vf_load(w[1] + k);
        vf v2 = vf_load(w[2] + k), v3 = vf_load(w[3] + k);
        vf xa = vf_load(x0 + k);
        a00 = vf_fma(xa, v0, a00);
        a01 = vf_fma(xa, v1, a01);
        a02 = vf_fma(xa, v2, a02);
        a03 = vf_fma(xa, v3, a03);
        xa = vf_load(x1 + k);
        a10 = vf_fma(xa, v0, a10);
        a11 = vf_fma(xa, v1, a11);
        a12 = vf_fma(xa, v2, a12);
        a13 = vf_fma(xa, v3, a13);
        xa = vf_load(x2 + k);
        a20 = vf_fma(xa, v0, a20);
        a21 = vf_fma(xa, v1, a21);
        a22 = vf_fma(xa, v2, a22);
        a23 = vf_fma(xa, v3, a23);
    }
    store_out(y, vf_hsum4(a00, a01, a02, a03), x0, w, KV, K, bias, n0, nvalid);
    if (mr > 1) store_out(y + N, vf_hsum4(a10, a11, a12, a13), x1, w, KV, K, bias, n0, nvalid);
    if (mr > 2) store_out(y + 2 * N, vf_hsum4(a20, a21, a22, a23), x2, w, KV, K, bias, n0, nvalid);
}

#if VW == 16
/* R (4 to 6) input rows against rows n0..n0+3 of W (AVX-512: up to 24 accumulators + 4
 * weight vectors + 1 input vector of the 32 registers): each weight vector feeds R FMAs,
 * 0.42 loads per FMA at R = 6 instead of tile3x4's 0.58. The same order per output as
 * every path here. */
#define DEFINE_TILE(R)                                                                        \
    static void linear_tile##R##x4(const float* x, int64_t ldx, const float* W,               \
                                   const float* bias, float* y, int64_t N, int64_t K,         \
                                   int64_t n0, int nvalid) {                                  \
        const float* w[4];                                                                    \
        for (int i = 0; i < 4; i++) w[i] = W + (n0 + (i < nvalid ? i : nvalid - 1)) * K;     \
        int64_t KV = K & ~(int64_t)(VW - 1);                                                  \
        vf acc[R][4];                                                                         \
        for (int r = 0; r < R; r++)                                                           \
            for (int j = 0; j < 4; j++) acc[r][j] = vf_zero();                                \
        for (int64_t k = 0; k < KV; k += VW) {                                                \
            vf v0 = vf_load(w[0] + k), v1 = vf_load(w[1] + k);                                \
            vf v2 = vf_load(w[2] + k), v3 = vf_load(w[3] + k);                                \
            _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {                             \
                vf xa = vf_load(x + r * ldx + k);                                             \
                acc[r][0] = vf_fma(xa, v0, acc[r][0]);                                        \
                acc[r][1] = vf_fma(xa, v1, acc[r][1]);                                        \
                acc[r][2] = vf_fma(xa, v2, acc[r][2]);                                        \
                acc[r][3] = vf_fma(xa, v3, acc[r][3]);                                        \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < R; r++)                                                           \
            store_out(y + r * N, vf_hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]),        \
                      x + r * ldx, w, KV, K, bias, n0, nvalid);                               \
    }
DEFINE_TILE(4)
DEFINE_TILE(5)
DEFINE_TILE(6)
#endif

/* Rows n0..n0+3 of W (nvalid of them) against all M input rows. */
static void linear_block(const float* x, int64_t ldx, const float* W, const float* bias, float* y,
                         int64_t M, int64_t N, int64_t K, int64_t n0, int nvalid) {
    if (M <= 2) {
        linear_rows4(x, ldx, W, bias, y, M, N, K, n0, nvalid);
        return;
    }
    int64_t m = 0;
#if VW == 16
    for (; m + 6 <= M; m += 6)
        linear_tile6x4(x + m * ldx, ldx, W, bias, y + m * N, N, K, n0, nvalid);
    if (M - m == 5) {
        linear_tile5x4(x + m * ldx, ldx, W, bias, y + m * N, N, K, n0, nvalid);
        m += 5;
    } else if (M - m == 4) {
        linear_tile4x4(x + m * ldx, ldx, W, bias, y + m * N, N, K, n0, nvalid);
        m += 4;
    }
#endif
    for (; m < M; m += 3)
        linear_tile3x4(x + m * ldx, ldx, W, bias, y + m * N, N, K, n0, nvalid,
                       M - m < 3 ? (int)(M - m) : 3);
}

/* y[M, N] = x W^T + bias. Each thread streams its own contiguous share of W's rows once
 * and applies it to every input row. */
void pagellm_linear_f32(const float* x, int64_t ldx, const float* W, const float* bias, float* y,
                        int64_t M, int64_t N, int64_t K, int nthreads) {
    int64_t nblocks = (N + 3) / 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t n0 = b * 4;
        linear_block(x, ldx, W, bias, y, M, N, K, n0, N - n0 < 4 ? (int)(N - n0) : 4);
    }
}

static inline uint16_t f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7FFF + ((u >> 16) & 1); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* VW half-precision weights widened to floats: bfloat16 (wtype 1) or IEEE fp16 (2). */
static inline vf vf_load_half(const uint16_t* p, int wtype) {
    if (wtype == 1) return vf_load_bf16(p);
#if VW == 16
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#else
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#endif
}

static inline float half_to_float(uint16_t h, int wtype) {
    if (wtype == 1) {
        union { uint32_t u; float f; } v = {(uint32_t)h << 16};
        return v.f;
    }
    return fp16_to_float(h);
}

#if defined(__AVX512BF16__) && VW == 16
/* bfloat16 weights on AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs per instruction
 * (twice the float32 FMA rate) into float32 lanes. The input rows are rounded to bf16
 * once per call (xb, rows of ldb elements zero-padded to a multiple of 32); lane l of an
 * accumulator sums k = 2l, 2l + 1 (mod 32), then the lanes add in vf_hsum4's order, for
 * every batch size (batch invariant). R (1 to 6) input rows x 4 weight rows per tile. */
#define DEFINE_BTILE(R)                                                                        \
    static void bf16_tile##R(const uint16_t* xb, int64_t ldb, const uint16_t* W,               \
                             const float* bias, float* y, int64_t N, int64_t K, int64_t n0,    \
                             int nvalid) {                                                     \
        const uint16_t* w[4];                                                                  \
        for (int i = 0; i < 4; i++) w[i] = W + (n0 + (i < nvalid ? i : nvalid - 1)) * K;      \
        __m512 acc[R][4];                                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();                       \
        int64_t k = 0;                                                                         \
        for (; k + 32 <= K; k += 32) {                                                         \
            __m512bh v0 = (__m512bh)_mm512_loadu_si512(w[0] + k);                              \
            __m512bh v1 = (__m512bh)_mm512_loadu_si512(w[1] + k);                              \
            __m512bh v2 = (__m512bh)_mm512_loadu_si512(w[2] + k);                              \
            __m512bh v3 = (__m512bh)_mm512_loadu_si512(w[3] + k);                              \
            _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {                              \
                __m512bh xa = (__m512bh)_mm512_loadu_si512(xb + r * ldb + k);                  \
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xa, v0);                               \
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xa, v1);                               \
                acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xa, v2);                               \
                acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xa, v3);                               \
            }                                                                                  \
        }                                                                                      \
        if (k < K) { /* the tail: weights masked, the input is zero-padded */                 \
            __mmask32 tail = (__mmask32)((1ull << (K - k)) - 1);                               \
            __m512bh v[4];                                                                     \
            for (int j = 0; j < 4; j++) v[j] = (__m512bh)_mm512_maskz_loadu_epi16(tail, w[j] + k); \
            for (int r = 0; r < R; r++) {                                                      \
                __m512bh xa = (__m512bh)_mm512_loadu_si512(xb + r * ldb + k);                  \
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xa, v[j]); \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < R; r++) {                                                          \
            float o[4];                                                                        \
            _mm_storeu_ps(o, vf_hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));            \
            for (int i = 0; i < nvalid; i++)                                                   \
                y[r * N + n0 + i] = o[i] + (bias ? bias[n0 + i] : 0.0f);                       \
        }                                                                                      \
    }
DEFINE_BTILE(1)
DEFINE_BTILE(2)
DEFINE_BTILE(3)
DEFINE_BTILE(4)
DEFINE_BTILE(5)
DEFINE_BTILE(6)

static void linear_bf16_dot(const float* x, int64_t ldx, const uint16_t* W, const float* bias,
                            float* y, int64_t M, int64_t N, int64_t K, int nthreads) {
    int64_t ldb = (K + 31) & ~(int64_t)31, nblocks = (N + 3) / 4;
    uint16_t* xb = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)(M * ldb));
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const float* src = x + m * ldx;
            uint16_t* dst = xb + m * ldb;
            int64_t k = 0;
            for (; k + 16 <= K; k += 16)
                _mm256_storeu_si256((__m256i*)(dst + k),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
            for (; k < K; k++) dst[k] = f32_to_bf16(src[k]);
            for (; k < ldb; k++) dst[k] = 0;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            int64_t n0 = b * 4;
            int nvalid = N - n0 < 4 ? (int)(N - n0) : 4;
            for (int64_t m = 0; m < M; m += 6) {
                const uint16_t* xr = xb + m * ldb;
                float* yr = y + m * N;
                switch (M - m < 6 ? M - m : 6) {
                    case 1: bf16_tile1(xr, ldb, W, bias, yr, N, K, n0, nvalid); break;
                    case 2: bf16_tile2(xr, ldb, W, bias, yr, N, K, n0, nvalid); break;
                    case 3: bf16_tile3(xr, ldb, W, bias, yr, N, K, n0, nvalid); break;
                    case 4: bf16_tile4(xr, ldb, W, bias, yr, N, K, n0, nvalid); break;
                    case 5: bf16_tile5(xr, ldb, W, bias, yr, N, K, n0, nvalid); break;
                    default: bf16_tile6(xr, ldb, W, bias, yr, N, K, n0, nvalid); break;
                }
            }
        }
    }
    free(xb);
}
#endif

/* Whether bf16 weights take vdpbf16ps (set once per process by native.py: on where the
 * instruction outruns float32 FMAs on this CPU, which is not so on every AVX512-BF16 part). */
static int bf16_dot_on = 1;

/* 1 when bf16 weights run on vdpbf16ps in this process (inputs rounded to bf16), else 0. */
int pagellm_has_bf16_dot(void) {
#if defined(__AVX512BF16__) && VW == 16
    return bf16_dot_on;
#else
    return 0;
#endif
}

/* Turn the vdpbf16ps path on or off (off: bf16 weights are widened to float32, as fp16
 * ones are); returns whether it is on now (never on a build without AVX512-BF16). */
int pagellm_set_bf16_dot(int on) {
    bf16_dot_on = on != 0;
    return pagellm_has_bf16_dot();
}

/* linear_rows4 for 16-bit weights widened in registers (one or two input rows: decode,
 * where a scratch copy would cost more than the weight reads it saves), for K a multiple
 * of VW. Widening is exact, so the results are linear_rows4's on the widened weights,
 * bit for bit. */
static void linear_rows4_half(const float* x, int64_t ldx, const uint16_t* W, int wtype,
                              const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                              int64_t n0, int nvalid) {
    const uint16_t* w[4];
    for (int i = 0; i < 4; i++) w[i] = W + (n0 + (i < nvalid ? i : nvalid - 1)) * K;
    int64_t KV = K & ~(int64_t)(VW - 1);
    for (int64_t m = 0; m < M; m++) {
        const float* xa = x + m * ldx;
        vf a0 = vf_zero(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < KV; k += VW) {
            vf va = vf_load(xa + k);
            a0 = vf_fma(va, vf_load_half(w[0] + k, wtype), a0);
            a1 = vf_fma(va, vf_load_half(w[1] + k, wtype), a1);
            a2 = vf_fma(va, vf_load_half(w[2] + k, wtype), a2);
            a3 = vf_fma(va, vf_load_half(w[3] + k, wtype), a3);
        }
        float r[4];
        _mm_storeu_ps(r, vf_hsum4(a0, a1, a2, a3));
        for (int i = 0; i < nvalid; i++) y[m * N + n0 + i] = r[i] + (bias ? bias[n0 + i] : 0.0f);
    }
}

/* y[M, N] = x W^T + bias with W[N, K] stored in 16 bits (a bf16/fp16 run on the CPU: the
 * weights keep their dtype, the arithmetic is float32). Each block of 4 weight rows is
 * widened once into the thread's scratch (it stays in L1/L2) and then runs the float32
 * kernels on every input row: half the weight bytes of float32 per step, the float32
 * reduction order (batch invariant), the float32 FMA rate. bf16 weights on a build with
 * AVX512-BF16 take linear_bf16_dot instead. */
void pagellm_linear_half(const float* x, int64_t ldx, const uint16_t* W, int wtype,
                         const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                         int nthreads) {
#if defined(__AVX512BF16__) && VW == 16
    if (wtype == 1 && bf16_dot_on) {
        linear_bf16_dot(x, ldx, W, bias, y, M, N, K, nthreads);
        return;
    }
#endif
    int64_t nblocks = (N + 3) / 4;
    int64_t KV = K & ~(int64_t)(VW - 1);
    if (M <= 2 && KV == K) { /* (a K % VW tail would round apart from store_out's) */
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            int64_t n0 = b * 4;
            linear_rows4_half(x, ldx, W, wtype, bias, y, M, N, K, n0, N - n0 < 4 ? (int)(N - n0) : 4);
        }
        return;
    }
#pragma omp parallel num_threads(nthreads)
    {
        float* wbuf = (float*)malloc(sizeof(float) * (size_t)(4 * K));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            int64_t n0 = b * 4;
            int nvalid = N - n0 < 4 ? (int)(N - n0) : 4;
            for (int i = 0; i < nvalid; i++) {
                const uint16_t* src = W + (n0 + i) * K;
                float* dst = wbuf + i * K;
                int64_t k = 0;
                for (; k < KV; k += VW) vf_store(dst + k, vf_load_half(src + k, wtype));
                for (; k < K; k++) dst[k] = half_to_float(src[k], wtype);
            }
            linear_block(x, ldx, wbuf, bias ? bias + n0 : NULL, y + n0, M, N, K, 0, nvalid);
        }
        free(wbuf);
    }
}

/* out = rmsnorm(x (+ residual)) * weight; with a residual, residual <- x + residual first. */
void pagellm_rms_norm_f32(const float* x, float* residual, const float* weight, float* out,
                          int64_t M, int64_t N, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * N;
        float* o = out + m * N;
        const float* src = xr;
        if (residual) {
            float* r = residual + m * N;
            int64_t k = 0;
            for (; k + VW <= N; k += VW) vf_store(r + k, vf_add(vf_load(xr + k), vf_load(r + k)));
            for (; k < N; k++) r[k] = xr[k] + r[k];
            src = r;
        }
        vf acc = vf_zero();
        int64_t k = 0;
        for (; k + VW <= N; k += VW) {
            vf v = vf_load(src + k);
            acc = vf_fma(v, v, acc);
        }
        float ss = vf_hsum(acc);
        for (; k < N; k++) ss += src[k] * src[k];
        float inv = 1.0f / sqrtf(ss / (float)N + eps);
        vf vi = vf_set1(inv);
        k = 0;
        for (; k + VW <= N; k += VW)
            vf_store(o + k, vf_mul(vf_load(weight + k), vf_mul(vf_load(src + k), vi)));
        for (; k < N; k++) o[k] = weight[k] * (src[k] * inv);
    }
}

/* Rotary embedding in place, NeoX layout (first half / second half of each head).
 * x[T, H, D] with row stride ldx; cos_sin[max_pos, rot_dim]: cos in the first half. */
void pagellm_rope_f32(const int64_t* positions, float* x, int64_t ldx, const float* cos_sin,
                      int64_t T, int64_t H, int64_t D, int64_t rot_dim, int nthreads) {
    int64_t half = rot_dim / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T > 8)
    for (int64_t t = 0; t < T; t++) {
        const float* cs = cos_sin + positions[t] * rot_dim;
        const float* sn = cs + half;
        for (int64_t h = 0; h < H; h++) {
            float* a = x + t * ldx + h * D;
            float* b = a + half;
            int64_t k = 0;
            for (; k + VW <= half; k += VW) {
                vf va = vf_load(a + k), vb = vf_load(b + k);
                vf c = vf_load(cs + k), s = vf_load(sn + k);
                vf_store(a + k, vf_fms(va, c, vf_mul(vb, s)));
                vf_store(b + k, vf_fma(vb, c, vf_mul(va, s)));
            }
            for (; k < half; k++) {
                float va = a[k], vb = b[k];
                a[k] = va * cs[k] - vb * sn[k];
                b[k] = vb * cs[k] + va * sn[k];
            }
        }
    }
}

/* out[M, N] = silu(x[:, :N]) * x[:, N:] for x[M, 2N]. */
void pagellm_silu_and_mul_f32(const float* x, float* out, int64_t M, int64_t N, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 4)
    for (int64_t m = 0; m < M; m++) {
        const float* g = x + m * 2 * N;
        const float* u = g + N;
        float* o = out + m * N;
        int64_t k = 0;
        const vf one = vf_set1(1.0f);
        for (; k + VW <= N; k += VW) {
            vf vg = vf_load(g + k);
            vf e = vf_exp(vf_sub(vf_zero(), vg));
            vf s = vf_div(vg, vf_add(one, e));
            vf_store(o + k, vf_mul(s, vf_load(u + k)));
        }
        for (; k < N; k++) o[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
    }
}

/* ---- the paged KV cache: element types ------------------------------------------
 * KV_F32 / KV_BF16 / KV_FP8 (e4m3fn) hold values; KV_I8 holds codes with a float scale per
 * (token, KV head): value = scale * code. */
enum { KV_F32 = 0, KV_BF16 = 1, KV_FP8 = 2, KV_I8 = 3 };

static inline int64_t kv_elem_size(int kvt) { return kvt == KV_F32 ? 4 : kvt == KV_BF16 ? 2 : 1; }

static inline vf kv_load(const void* base, int64_t idx, int kvt) {
    switch (kvt) {
        case KV_BF16: return vf_load_bf16((const uint16_t*)base + idx);
        case KV_FP8: return vf_load_fp8((const uint8_t*)base + idx);
        case KV_I8: return vf_load_i8((const int8_t*)base + idx);
        default: return vf_load((const float*)base + idx);
    }
}

/* float -> fp8 e4m3fn, round to nearest even, saturating at +-448 (e4m3fn has no inf). */
static inline uint8_t f32_to_fp8(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    float a = fabsf(x);
    if (!(a < 448.0f)) return sign | 0x7E; /* also NaN -> the largest value */
    if (a < 0x1p-6f) {
        /* subnormal: m * 2^-9, m in 0..8 (8 becomes the smallest normal, same bits) */
        float m = nearbyintf(a * 0x1p9f);
        return sign | (uint8_t)m;
    }
    memcpy(&u, &a, 4);
    u += (1u << 19) - 1 + ((u >> 20) & 1); /* keep 3 mantissa bits, nearest even */
    uint32_t e = (u >> 23) - 127 + 7, m = (u >> 20) & 7;
    uint32_t bits = (e << 3) | m;
    return sign | (uint8_t)(bits > 0x7E ? 0x7E : bits);
}

/* Write this step's K/V rows into the paged cache: cache row slot = block * bs + offset. */
void pagellm_write_kv(const float* k, int64_t ldk, const float* v, int64_t ldv, void* k_cache,
                      void* v_cache, float* k_scale, float* v_scale, const int64_t* slot_mapping,
                      int64_t T, int64_t Hkv, int64_t D, int kvt) {
    int64_t row = Hkv * D, esz = kv_elem_size(kvt);
    for (int64_t t = 0; t < T; t++) {
        int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        for (int which = 0; which < 2; which++) {
            const float* src = which ? v + t * ldv : k + t * ldk;
            char* dst = (char*)(which ? v_cache : k_cache) + slot * row * esz;
            float* scales = which ? v_scale : k_scale;
            if (kvt == KV_F32) {
                memcpy(dst, src, row * sizeof(float));
            } else if (kvt == KV_BF16) {
                for (int64_t i = 0; i < row; i++) ((uint16_t*)dst)[i] = f32_to_bf16(src[i]);
            } else if (kvt == KV_FP8) {
                for (int64_t i = 0; i < row; i++) ((uint8_t*)dst)[i] = f32_to_fp8(src[i]);
            } else {
                for (int64_t h = 0; h < Hkv; h++) {
                    const float* x = src + h * D;
                    float amax = 0.0f;
                    for (int64_t i = 0; i < D; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
                    float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
                    for (int64_t i = 0; i < D; i++)
                        ((int8_t*)dst)[h * D + i] = (int8_t)nearbyintf(x[i] * inv);
                    scales[slot * Hkv + h] = scale;
                }
            }
        }
    }
}

/* scores[g][j] = scale * q_g . K[j] for the G query heads of one KV head, j < ctx.
 * Walks the block table (no division per key) four keys at a time, so one horizontal
 * reduction serves four dot products. */
static inline __attribute__((always_inline)) void attn_scores(
    const float* qs, int64_t G, int64_t D, const void* k_cache, const float* k_scale,
    const int32_t* bt, int64_t block_size, int64_t row, int64_t Hkv, int64_t kh, int64_t ctx,
    float scale, float* scores, int kvt) {
    const __m128 vscale = _mm_set1_ps(scale);
    for (int64_t b = 0, j0 = 0; j0 < ctx; b++, j0 += block_size) {
        int64_t tok0 = (int64_t)bt[b] * block_size;
        int64_t n = ctx - j0 < block_size ? ctx - j0 : block_size;
        for (int64_t r0 = 0; r0 < n; r0 += 4) {
            int64_t nk = n - r0 < 4 ? n - r0 : 4;
            int64_t k0 = (tok0 + r0) * row + kh * D;
            int64_t k1 = nk > 1 ? k0 + row : k0;
            int64_t k2 = nk > 2 ? k0 + 2 * row : k0;
            int64_t k3 = nk > 3 ? k0 + 3 * row : k0;
            __m128 ks = vscale;
            if (kvt == KV_I8) {
                const float* sc = k_scale + (tok0 + r0) * Hkv + kh;
                ks = _mm_mul_ps(vscale, _mm_setr_ps(sc[0], nk > 1 ? sc[Hkv] : 0.0f,
                                                    nk > 2 ? sc[2 * Hkv] : 0.0f,
                                                    nk > 3 ? sc[3 * Hkv] : 0.0f));
            }
            for (int64_t g = 0; g < G; g++) {
                const float* qg = qs + g * D;
                vf a0 = vf_zero(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t d = 0; d < D; d += VW) {
                    vf qv = vf_load(qg + d);
                    a0 = vf_fma(qv, kv_load(k_cache, k0 + d, kvt), a0);
                    a1 = vf_fma(qv, kv_load(k_cache, k1 + d, kvt), a1);
                    a2 = vf_fma(qv, kv_load(k_cache, k2 + d, kvt), a2);
                    a3 = vf_fma(qv, kv_load(k_cache, k3 + d, kvt), a3);
                }
                float* dst = scores + g * ctx + j0 + r0;
                if (nk == 4) {
                    _mm_storeu_ps(dst, _mm_mul_ps(vf_hsum4(a0, a1, a2, a3), ks));
                } else {
                    float tmp[4];
                    _mm_storeu_ps(tmp, _mm_mul_ps(vf_hsum4(a0, a1, a2, a3), ks));
                    for (int64_t r = 0; r < nk; r++) dst[r] = tmp[r];
                }
            }
        }
    }
}

/* In place: scores[g] <- softmax(scores[g]) over ctx entries, for each g < G. */
static void softmax_rows(float* scores, int64_t G, int64_t ctx) {
    for (int64_t g = 0; g < G; g++) {
        float* sc = scores + g * ctx;
        vf vm = vf_set1(-INFINITY);
        int64_t j = 0;
        for (; j + VW <= ctx; j += VW) vm = vf_max(vm, vf_load(sc + j));
        float mx = vf_hmax(vm);
        for (; j < ctx; j++) mx = sc[j] > mx ? sc[j] : mx;
        vf vmx = vf_set1(mx), vs = vf_zero();
        j = 0;
        for (; j + VW <= ctx; j += VW) {
            vf e = vf_exp(vf_sub(vf_load(sc + j), vmx));
            vf_store(sc + j, e);
            vs = vf_add(vs, e);
        }
        float sum = vf_hsum(vs);
        for (; j < ctx; j++) {
            sc[j] = expf(sc[j] - mx);
            sum += sc[j];
        }
        vf inv = vf_set1(1.0f / sum);
        j = 0;
        for (; j + VW <= ctx; j += VW) vf_store(sc + j, vf_mul(vf_load(sc + j), inv));
        for (; j < ctx; j++) sc[j] *= 1.0f / sum;
    }
}

/* out[g][d0:d0+32] = sum_j p[g][j] V[j][d0:d0+32] for gc (1..3) heads at once: each
 * 32-value slice of a V row is loaded once and feeds gc x (32 / VW) register
 * accumulators. int8 V: p[g][j] already carries V's scale of key j. */
#define SV (32 / VW)
static inline __attribute__((always_inline)) void pv_slice(
    const float* probs, int64_t ctx, const void* v_cache, const int32_t* bt, int64_t block_size,
    int64_t row, int64_t off, float* out, int64_t D, int gc, int kvt) {
    vf acc[3][SV];
    for (int g = 0; g < gc; g++)
        for (int i = 0; i < SV; i++) acc[g][i] = vf_zero();
    for (int64_t b = 0, j0 = 0; j0 < ctx; b++, j0 += block_size) {
        int64_t vr = (int64_t)bt[b] * block_size * row + off;
        int64_t n = ctx - j0 < block_size ? ctx - j0 : block_size;
        for (int64_t r = 0; r < n; r++, vr += row) {
            vf v[SV];
            for (int i = 0; i < SV; i++) v[i] = kv_load(v_cache, vr + i * VW, kvt);
            for (int g = 0; g < gc; g++) {
                vf p = vf_broadcast(probs + g * ctx + j0 + r);
                for (int i = 0; i < SV; i++) acc[g][i] = vf_fma(p, v[i], acc[g][i]);
            }
        }
    }
    for (int g = 0; g < gc; g++)
        for (int i = 0; i < SV; i++) vf_store(out + g * D + i * VW, acc[g][i]);
}

/* One work item: token t, KV head kh, and query heads g0 .. g0 + G - 1 of its group (the
 * whole group, or a single head when there are too few tokens to keep every thread busy:
 * each head's arithmetic is the same either way). */
static inline __attribute__((always_inline)) void attention_item(
    const float* q, int64_t ldq, const void* k_cache, const void* v_cache, const float* k_scale,
    const float* v_scale, const int32_t* block_tables, int64_t max_blocks, const int32_t* seq_lens,
    const int32_t* query_start_loc, const int32_t* token_to_seq, float* out, int64_t t,
    int64_t kh, int64_t g_first, int64_t G, int64_t Hq, int64_t Hkv, int64_t D,
    int64_t block_size, float scale, float* scores, int kvt, int64_t window, float softcap) {
    const int64_t group = Hq / Hkv;
    const int64_t row = Hkv * D; /* elements per cache row (one token) */
    int64_t s = token_to_seq[t];
    int64_t qlen = query_start_loc[s + 1] - query_start_loc[s];
    int64_t pos = seq_lens[s] - qlen + (t - query_start_loc[s]);
    /* Visible keys: [lo, pos] (lo = pos + 1 - window with a sliding window). Blocks wholly
     * before lo are never read (the scheduler may have freed them); the keys of lo's own
     * block before lo are computed and masked. */
    int64_t lo = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
    int64_t first = lo / block_size, base = first * block_size;
    int64_t ctx = pos + 1 - base;
    const int32_t* bt = block_tables + s * max_blocks + first;
    const float* qs = q + t * ldq + (kh * group + g_first) * D;
    attn_scores(qs, G, D, k_cache, k_scale, bt, block_size, row, Hkv, kh, ctx, scale, scores, kvt);
    if (softcap > 0.0f)
        for (int64_t j = 0; j < G * ctx; j++) scores[j] = softcap * tanhf(scores[j] / softcap);
    for (int64_t g = 0; g < G; g++)
        for (int64_t j = 0; j < lo - base; j++) scores[g * ctx + j] = -INFINITY;
    softmax_rows(scores, G, ctx);
    if (kvt == KV_I8) {
        for (int64_t b = 0, j0 = 0; j0 < ctx; b++, j0 += block_size) {
            int64_t n = ctx - j0 < block_size ? ctx - j0 : block_size;
            const float* vs = v_scale + (int64_t)bt[b] * block_size * Hkv + kh;
            for (int64_t r = 0; r < n; r++)
                for (int64_t g = 0; g < G; g++) scores[g * ctx + j0 + r] *= vs[r * Hkv];
        }
    }
    float* o = out + (t * Hq + kh * group + g_first) * D;
    for (int64_t g0 = 0; g0 < G; g0 += 3) {
        int gc = G - g0 < 3 ? (int)(G - g0) : 3;
        for (int64_t d0 = 0; d0 < D; d0 += 32)
            pv_slice(scores + g0 * ctx, ctx, v_cache, bt, block_size, row, kh * D + d0,
                     o + g0 * D + d0, D, gc, kvt);
    }
}

/* Paged attention for a flattened batch of prefill chunks and decode tokens.
 * window > 0: each token sees its last `window` positions (itself included); softcap > 0:
 * scores become softcap * tanh(score / softcap) before the softmax.
 * One work item is (token, kv head): the G = Hq / Hkv query heads of the group read each
 * K and V row once (per 32-channel slice). Exact two-pass softmax over the token's whole
 * visible context. Requires head_dim % 32 == 0 (checked by the caller). */
void pagellm_paged_attention(const float* q, int64_t ldq, const void* k_cache,
                             const void* v_cache, const float* k_scale, const float* v_scale,
                             const int32_t* block_tables, int64_t max_blocks,
                             const int32_t* seq_lens, const int32_t* query_start_loc,
                             const int32_t* token_to_seq, float* out, int64_t T, int64_t Hq,
                             int64_t Hkv, int64_t D, int64_t block_size, int64_t max_seq_len,
                             float scale, int kvt, int64_t window, float softcap, int nthreads) {
    const int64_t group = Hq / Hkv;
    /* Whole GQA groups share each K/V row; split them only when a decode batch has fewer
     * (token, KV head) items than twice the threads. */
    const int64_t G = T * Hkv >= 2 * nthreads ? group : 1;
    const int64_t per_head = group / G;
#pragma omp parallel num_threads(nthreads)
    {
        float* scores = (float*)malloc(sizeof(float) * (size_t)(G * (max_seq_len + 8)));
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < T * Hkv * per_head; item++) {
            int64_t t = item / (Hkv * per_head), rest = item % (Hkv * per_head);
            int64_t kh = rest / per_head, g_first = (rest % per_head) * G;
#define ITEM(KVT)                                                                              \
    attention_item(q, ldq, k_cache, v_cache, k_scale, v_scale, block_tables, max_blocks,       \
                   seq_lens, query_start_loc, token_to_seq, out, t, kh, g_first, G, Hq, Hkv, D, \
                   block_size, scale, scores, KVT, window, softcap)
            switch (kvt) {
                case KV_BF16: ITEM(KV_BF16); break;
                case KV_FP8: ITEM(KV_FP8); break;
                case KV_I8: ITEM(KV_I8); break;
                default: ITEM(KV_F32); break;
            }
#undef ITEM
        }
        free(scores);
    }
}

/* ---- LoRA: y[rows] += (x[rows] Aᵀ) Bᵀ for every adapter group of a step -------------
 * One call per Linear serves every group (adapter) of the step. Per group g:
 *   rows[n]      its token rows of x [*, in] and y [*, out]
 *   a [R, in]    the adapter's A, shards stacked along the rank
 *   bt [R, out]  its Bᵀ (already scaled); rank row r only writes columns
 *                [col_lo[r], col_hi[r]) (its shard's output rows), the rest is not read
 *   s            scratch [n, R] for the shrunk activations
 * Shrink: one dot product per (token, rank row), parallel over (group, rank row) so each
 * row of A is read once for all of the group's tokens. Expand: parallel over one column
 * range per thread, so each element of Bᵀ is read once, in long contiguous runs. Every field is 8 bytes (see lora/layers.py). */
typedef struct {
    const int64_t* rows;
    int64_t n;
    const float* a;
    const float* bt;
    const int64_t* col_lo;
    const int64_t* col_hi;
    int64_t rank;
    float* s;
} LoraGroupDesc;

static inline float dot_f32(const float* x, const float* w, int64_t n) {
    vf acc0 = vf_zero(), acc1 = vf_zero();
    int64_t k = 0;
    for (; k + 2 * VW <= n; k += 2 * VW) {
        acc0 = vf_fma(vf_load(x + k), vf_load(w + k), acc0);
        acc1 = vf_fma(vf_load(x + k + VW), vf_load(w + k + VW), acc1);
    }
    for (; k + VW <= n; k += VW) acc0 = vf_fma(vf_load(x + k), vf_load(w + k), acc0);
    float sum = vf_hsum(vf_add(acc0, acc1));
    for (; k < n; k++) sum += x[k] * w[k];
    return sum;
}

void pagellm_lora_apply(const float* x, float* y, int64_t in, int64_t out, const void* groups_,
                        int64_t n_groups, int nthreads) {
    const LoraGroupDesc* groups = (const LoraGroupDesc*)groups_;
    int64_t total = 0;
    for (int64_t g = 0; g < n_groups; g++) total += groups[g].rank;
    if (total == 0) return; /* no adapter of this step targets this linear */
    /* One contiguous column range per thread: each thread streams long runs of every
     * rank row of Bᵀ (short chunks made it jump between rows every 256 bytes). */
    int64_t chunk = (out + nthreads - 1) / (nthreads > 0 ? nthreads : 1);
    chunk = (chunk + 4 * VW - 1) / (4 * VW) * (4 * VW);
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < total; k++) {
            int64_t g = 0, r = k;
            while (r >= groups[g].rank) r -= groups[g++].rank;
            const LoraGroupDesc* d = &groups[g];
            const float* ar = d->a + r * in;
            for (int64_t t = 0; t < d->n; t++)
                d->s[t * d->rank + r] = dot_f32(x + d->rows[t] * in, ar, in);
        }
#pragma omp for schedule(static)
        for (int64_t c0 = 0; c0 < out; c0 += chunk) {
            const int64_t c1 = c0 + chunk < out ? c0 + chunk : out;
            /* Blocks of 4 vectors of one token's row stay in registers while every rank
             * row adds into them; Bᵀ is zero outside a rank row's shard, so a block that
             * straddles a shard edge is still right, and rows wholly outside are skipped. */
            for (int64_t g = 0; g < n_groups; g++) {
                const LoraGroupDesc* d = &groups[g];
                for (int64_t t = 0; t < d->n; t++) {
                    float* yr = y + d->rows[t] * out;
                    const float* st = d->s + t * d->rank;
                    int64_t c = c0;
                    for (; c + 4 * VW <= c1; c += 4 * VW) {
                        vf a0 = vf_load(yr + c), a1 = vf_load(yr + c + VW);
                        vf a2 = vf_load(yr + c + 2 * VW), a3 = vf_load(yr + c + 3 * VW);
                        for (int64_t r = 0; r < d->rank; r++) {
                            if (d->col_hi[r] <= c || d->col_lo[r] >= c + 4 * VW) continue;
                            const float* br = d->bt + r * out + c;
                            const vf sv = vf_set1(st[r]);
                            a0 = vf_fma(sv, vf_load(br), a0);
                            a1 = vf_fma(sv, vf_load(br + VW), a1);
                            a2 = vf_fma(sv, vf_load(br + 2 * VW), a2);
                            a3 = vf_fma(sv, vf_load(br + 3 * VW), a3);
                        }
                        vf_store(yr + c, a0);
                        vf_store(yr + c + VW, a1);
                        vf_store(yr + c + 2 * VW, a2);
                        vf_store(yr + c + 3 * VW, a3);
                    }
                    for (; c < c1; c++) {
                        float acc = yr[c];
                        for (int64_t r = 0; r < d->rank; r++) acc += st[r] * d->bt[r * out + c];
                        yr[c] = acc;
                    }
                }
            }
        }
    }
}
