/*
 * Quantized linear layers: weights stay as small integer codes with a scale (and a
 * min) per block of 32 input channels; activations are quantized per row to int8
 * blocks of 32, as llama.cpp's Q8 blocks are; the dot products are integer
 * (VNNI vpdpbusd where the CPU has it, AVX2 maddubs/madd otherwise), one float
 * scale per block.
 *
 * Weight layout ("row-interleaved", written by pagellm/layers/quantization/packed.py).
 * Rows are taken 8 at a time (a group; the last one padded with zero rows); a group's
 * tiles follow each other block by block, so one thread streams its groups linearly:
 *
 *   tile(g, b) = codes | scales[nsub][8] | mins[nsub][8]      (mins absent for S8, U4S)
 *
 *   codes, S8 / U8 (one byte per code):   32 x 8 quads
 *       byte [j * 32 + r * 4 + t] = code of row 8g + r, input channel 32b + 4j + t
 *       (j = 0..7: quad j of the block; one 32-byte load = quad j of all 8 rows)
 *   codes, U4 and U4S (two codes per byte): 32 x 4
 *       byte [j * 32 + r * 4 + t] = code(quad j) | code(quad j + 4) << 4, j = 0..3
 *
 * so that lane r of an 8 x int32 accumulator is row r's dot product: the float work
 * (convert, scale) is done once per block for 8 rows, not once per row.
 *
 *   S8: w = scale * code,          code in [-128, 127]          (Q8_0, Q5_0, Q6_K, int8)
 *   U8: w = scale * code + min,    code in [0, 63]              (Q5_1, Q5_K)
 *   U4: w = scale * code + min,    code in [0, 15]              (Q4_1, Q4_K, AWQ, GPTQ)
 *   U4S: w = scale * (code - 8),   code in [0, 15]              (Q4_0, symmetric int4: the
 *        min -8 * scale is implied, not stored: 10% fewer bytes per step than U4)
 *   nsub = 2: two scales per block, for channels 0-15 and 16-31 (S8 only: Q6_K).
 *   Scales and mins are float16 or float32.
 *
 * Activations (pagellm_quantize_q8): per row m and block b, xq[m][32b..32b+31] int8,
 * xd[m][b] = amax / 127, xs[m][2b + h] = xd * sum of the 16 codes of half h.
 *
 * Batch invariance: output (m, n) is computed by the same sequence of operations for
 * every M and thread count: its integer dot per block is exact, and its float
 * accumulation runs over the blocks in order, in lane n % 8 of its own register.
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

enum { KIND_S8 = 0, KIND_U8 = 1, KIND_U4 = 2, KIND_U4S = 3 };

/* Nibble codes (U4, U4S); a min stored per block (U8, U4; U4S's is -8 * scale). */
static inline int is_u4(int kind) { return kind == KIND_U4 || kind == KIND_U4S; }
static inline int has_min(int kind) { return kind == KIND_U8 || kind == KIND_U4; }

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_VNNI 1
static inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#elif defined(__AVXVNNI__)
#define HAVE_VNNI 1
static inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#else
#define HAVE_VNNI 0
/* u8 x s8 -> 4-product sums; exact while each pair of products fits int16, which the
 * code ranges above guarantee (63 * 127 * 2 < 32768; S8 goes through abs/sign). */
static inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
    __m256i p = _mm256_maddubs_epi16(u, s);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#endif

int pagellm_q_has_vnni(void) { return HAVE_VNNI; }

/* Rows of activations handled together (each keeps its float accumulator in a register
 * beside the block's 8 decoded quads). */
#if defined(MR_OVERRIDE)
#define MR MR_OVERRIDE
#elif defined(PAGELLM_AVX512)
#define MR 8
#else
#define MR 4
#endif

static inline int64_t code_bytes(int kind) { return is_u4(kind) ? 128 : 256; }

int64_t pagellm_q_tile_bytes(int kind, int nsub, int f16) {
    int64_t sz = f16 ? 2 : 4;
    return code_bytes(kind) + nsub * 8 * sz * (has_min(kind) ? 2 : 1);
}

/* ---- activations ------------------------------------------------------------------ */

void pagellm_quantize_q8(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* xq, float* xd,
                         float* xs, int nthreads) {
    int64_t nb = K / 32;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * nb > 64)
    for (int64_t i = 0; i < M * nb; i++) {
        int64_t m = i / nb, b = i % nb;
        const float* src = x + m * ldx + b * 32;
        __m256 v[4], amax = _mm256_setzero_ps();
        const __m256 signbit = _mm256_set1_ps(-0.0f);
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(src + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(signbit, v[j]));
        }
        float mx = hmax256(amax);
        float d = mx / 127.0f;
        float id = mx > 0.0f ? 127.0f / mx : 0.0f;
        __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int j = 0; j < 4; j++)
            q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], vid),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* sums of the two halves (channels 0-15, 16-31) */
        int32_t s0 = hsum256_epi32(_mm256_add_epi32(q[0], q[1]));
        int32_t s1 = hsum256_epi32(_mm256_add_epi32(q[2], q[3]));
        __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);
        __m256i p = _mm256_packs_epi16(p01, p23);
        /* packs works per 128-bit lane: restore channel order 0..31 */
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)(xq + m * K + b * 32), p);
        xd[m * nb + b] = d;
        xs[m * nb * 2 + 2 * b] = d * (float)s0;
        xs[m * nb * 2 + 2 * b + 1] = d * (float)s1;
    }
}

/* ---- the matmul --------------------------------------------------------------------- */

static inline __m256 load_scales(const uint8_t* p, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)) : _mm256_loadu_ps((const float*)p);
}

/* Quad j of a byte-code tile (S8, U8). */
static inline __m256i code_quad(const uint8_t* codes, int j) {
    return _mm256_loadu_si256((const __m256i*)(codes + j * 32));
}

/* One group of 8 weight rows against rows m0..m0+mr-1 of the activations.
 *
 * Per block: the 8 code quads are decoded once into registers, then each activation row
 * runs a short chain of dpbusd over them (two accumulators, even and odd quads, halve
 * the dependency on its latency; per half-block for nsub = 2) and folds its block into
 * its float accumulator at once. Rows outer and quads inner keep every accumulator in a
 * register: with the quads outer, 8 rows x 4 integer sums did not fit and were spilled. */
static inline __attribute__((always_inline)) void qgroup(
    const uint8_t* tiles, int64_t nb, int kind, int nsub, int f16, const int8_t* xq,
    const float* xd, const float* xs, int64_t K, int64_t m0, int mr, float* y, int64_t ldy,
    int64_t n0, int nvalid, const float* bias) {
    const int64_t tile = pagellm_q_tile_bytes(kind, nsub, f16);
    const int64_t ssz = f16 ? 2 : 4;
    __m256 acc[MR];
    for (int i = 0; i < mr; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* t = tiles + b * tile;
        const uint8_t* sc = t + code_bytes(kind);
        const uint8_t* mn = sc + nsub * 8 * ssz;
        /* S8 codes go through abs / sign (dpbusd multiplies unsigned by signed). */
        __m256i w[8], aw[8];
        if (is_u4(kind)) {
            /* one load gives quads j (low nibbles) and j + 4 (high) */
            const __m256i lo4 = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                __m256i raw = _mm256_loadu_si256((const __m256i*)(t + j * 32));
                aw[j] = w[j] = _mm256_and_si256(raw, lo4);
                aw[j + 4] = w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4);
            }
        } else {
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                w[j] = code_quad(t, j);
                aw[j] = kind == KIND_S8 ? _mm256_sign_epi8(w[j], w[j]) : w[j];
            }
        }
        __m256 s[2], mv[2];
        for (int h = 0; h < nsub; h++) {
            s[h] = load_scales(sc + h * 8 * ssz, f16);
            mv[h] = kind == KIND_S8    ? _mm256_setzero_ps()
                    : kind == KIND_U4S ? _mm256_mul_ps(s[h], _mm256_set1_ps(-8.0f))
                                       : load_scales(mn + h * 8 * ssz, f16);
        }
        for (int i = 0; i < mr; i++) {
            const int64_t m = m0 + i;
            const int32_t* xr = (const int32_t*)(xq + m * K + b * 32);
            /* Integer sums of half-block 0 / 1, even / odd quads (two vpdpbusd chains
             * halve the wait on its latency; the maddubs path's chain is an add).
             * Written out: an array indexed in a loop may be left on the stack. */
            __m256i e0 = _mm256_setzero_si256(), o0 = e0, e1 = e0, o1 = e0;
#define XQ(j) (kind == KIND_S8 ? _mm256_sign_epi8(_mm256_set1_epi32(xr[j]), w[j]) \
                               : _mm256_set1_epi32(xr[j]))
#if HAVE_VNNI
#define DP2(E, O, j)              \
    E = dpbusd(E, aw[j], XQ(j)); \
    O = dpbusd(O, aw[j + 1], XQ(j + 1))
#else
/* One chain: the maddubs path's dependency is an add. (Adding several quads' int16
 * products before widening, exact for U4 codes, measured slower on Zen 4.) */
#define DP2(E, O, j)              \
    E = dpbusd(E, aw[j], XQ(j)); \
    E = dpbusd(E, aw[j + 1], XQ(j + 1))
#endif
            DP2(e0, o0, 0);
            DP2(e0, o0, 2);
            if (nsub == 2) {
                DP2(e1, o1, 4);
                DP2(e1, o1, 6);
            } else {
                DP2(e0, o0, 4);
                DP2(e0, o0, 6);
            }
#undef DP2
#undef XQ
            __m256i dots[2] = {_mm256_add_epi32(e0, o0), _mm256_add_epi32(e1, o1)};
            const __m256 dx = _mm256_set1_ps(xd[m * nb + b]);
            const float* sx = xs + m * nb * 2 + 2 * b;
            for (int h = 0; h < nsub; h++) {
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[h]), _mm256_mul_ps(s[h], dx), acc[i]);
                if (kind != KIND_S8) {
                    float sum = nsub == 2 ? sx[h] : sx[0] + sx[1];
                    acc[i] = _mm256_fmadd_ps(mv[h], _mm256_set1_ps(sum), acc[i]);
                }
            }
        }
    }
    for (int i = 0; i < mr; i++) {
        float r[8];
        _mm256_storeu_ps(r, acc[i]);
        float* out = y + (m0 + i) * ldy + n0;
        for (int l = 0; l < nvalid; l++) out[l] = r[l] + (bias ? bias[n0 + l] : 0.0f);
    }
}

static inline __attribute__((always_inline)) void qlinear_impl(
    const int8_t* xq, const float* xd, const float* xs, int64_t M, int64_t K, const uint8_t* w,
    int64_t N, int kind, int nsub, int f16, float* y, int64_t ldy, const float* bias, int nthreads) {
    int64_t nb = K / 32, groups = (N + 7) / 8;
    int64_t gbytes = nb * pagellm_q_tile_bytes(kind, nsub, f16);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int nvalid = N - g * 8 < 8 ? (int)(N - g * 8) : 8;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            int mr = M - m0 < MR ? (int)(M - m0) : MR;
            /* A literal row count per case: the accumulators live in registers. */
#define QG(R)                                                                                   \
    case R:                                                                                     \
        qgroup(w + g * gbytes, nb, kind, nsub, f16, xq, xd, xs, K, m0, R, y, ldy, g * 8, nvalid, \
               bias);                                                                           \
        break
            switch (mr) {
                QG(1); QG(2); QG(3); QG(4);
#if MR > 4
                QG(5); QG(6); QG(7); QG(8);
#endif
            }
#undef QG
        }
    }
}

/* y[m, n] (row stride ldy) = sum_k x[m, k] w[n, k] (+ bias[n]) for quantized x and w. */
void pagellm_qlinear(const int8_t* xq, const float* xd, const float* xs, int64_t M, int64_t K,
                     const uint8_t* w, int64_t N, int kind, int nsub, int f16, float* y, int64_t ldy,
                     const float* bias, int nthreads) {
    /* Literal arguments let the compiler specialise each format's inner loop. */
#define QL(KIND, NSUB, F16) qlinear_impl(xq, xd, xs, M, K, w, N, KIND, NSUB, F16, y, ldy, bias, nthreads)
    if (kind == KIND_U4S) {
        if (f16) QL(KIND_U4S, 1, 1); else QL(KIND_U4S, 1, 0);
    } else if (kind == KIND_U4) {
        if (f16) QL(KIND_U4, 1, 1); else QL(KIND_U4, 1, 0);
    } else if (kind == KIND_U8) {
        if (f16) QL(KIND_U8, 1, 1); else QL(KIND_U8, 1, 0);
    } else if (nsub == 2) {
        QL(KIND_S8, 2, 0);
    } else {
        if (f16) QL(KIND_S8, 1, 1); else QL(KIND_S8, 1, 0);
    }
#undef QL
}

/* ---- dequantization (embedding rows, tests, large-batch tiles) ---------------------- */

static inline float load_scale1(const uint8_t* p, int f16, int64_t idx) {
    return f16 ? fp16_to_float(((const uint16_t*)p)[idx]) : ((const float*)p)[idx];
}

/* out[i, :] = row rows[i] of the packed matrix, as floats: scale * code, then + min,
 * each rounded (no fused multiply-add), as the Python side dequantizes. */
__attribute__((optimize("fp-contract=off"))) void pagellm_q_dequant_rows(const uint8_t* w, int64_t K, int kind, int nsub, int f16,
                            const int64_t* rows, int64_t n, float* out, int nthreads) {
    int64_t nb = K / 32, tile = pagellm_q_tile_bytes(kind, nsub, f16), ssz = f16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > 4)
    for (int64_t i = 0; i < n; i++) {
        int64_t g = rows[i] / 8, r = rows[i] % 8;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t* t = w + (g * nb + b) * tile;
            const uint8_t* sc = t + code_bytes(kind);
            const uint8_t* mn = sc + nsub * 8 * ssz;
            float* o = out + i * K + b * 32;
            for (int k = 0; k < 32; k++) {
                int j = k / 4, q4 = k % 4, h = nsub == 2 ? k / 16 : 0;
                float code;
                if (is_u4(kind)) {
                    uint8_t byte = t[(j & 3) * 32 + r * 4 + q4];
                    code = (float)(j < 4 ? byte & 0x0F : byte >> 4);
                } else if (kind == KIND_U8) {
                    code = (float)t[j * 32 + r * 4 + q4];
                } else {
                    code = (float)(int8_t)t[j * 32 + r * 4 + q4];
                }
                float s = load_scale1(sc, f16, h * 8 + r);
                float lo = kind == KIND_U4S ? s * -8.0f : has_min(kind) ? load_scale1(mn, f16, h * 8 + r) : 0.0f;
                o[k] = kind == KIND_S8 ? s * code : s * code + lo;
            }
        }
    }
}

/* A packed matrix as the Python side describes it once (passed by pointer, so that a
 * call converts few arguments). */
typedef struct {
    const uint8_t* data;
    int64_t n, k;
    int32_t kind, nsub, f16, pad_;
    const float* bias;
} pagellm_qweight;

/* y = x w^T (+ bias) for float activations: quantize x (per row, blocks of 32) into a
 * scratch buffer, then the integer matmul; one call per layer. */
void pagellm_qlinear_f32(const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                         const pagellm_qweight* w, int nthreads) {
    int64_t K = w->k, nb = K / 32;
    size_t qbytes = (size_t)(M * K), fbytes = sizeof(float) * (size_t)(M * nb * 3);
    char stack[8192];
    char* buf = qbytes + fbytes + 64 <= sizeof(stack) ? stack : (char*)malloc(qbytes + fbytes + 64);
    int8_t* xq = (int8_t*)buf;
    float* xd = (float*)(buf + ((qbytes + 63) & ~(size_t)63));
    float* xs = xd + M * nb;
    pagellm_quantize_q8(x, ldx, M, K, xq, xd, xs, nthreads);
    pagellm_qlinear(xq, xd, xs, M, K, w->data, w->n, w->kind, w->nsub, w->f16, y, ldy, w->bias,
                    nthreads);
    if (buf != stack) free(buf);
}
