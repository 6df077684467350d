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

#if defined(PAGELLM_AVX512) && defined(__AVX512VNNI__)
#define HAVE_Q512 1
/* Rows of activations per tile of 16 weight rows (two groups) on the 512-bit path
 * (8 measured best on a Xeon with AVX-512 VNNI; 4, 6 and 12 were slower). */
#define MR512 8

/* The same group of 8 weight rows with 512-bit vpdpbusd: one zmm holds two quads of the
 * 8 rows (bytes j*32 .. j*32+63 of a tile are quads j and j + 1), its lanes permuted once
 * per block so that lane 2r / 2r + 1 is row r's quad j / j + 1; the activations' two
 * quads then come from one 64-bit broadcast. Each row keeps a 16-lane float accumulator
 * (lanes 2r and 2r + 1 are row r's two halves, added at the end), so a block costs 4
 * integer dots per activation row instead of 8.
 * S8 weights are the signed operand and the activations go in biased by 128 (x ^ 0x80 as
 * an unsigned byte): the dot is then sum (x + 128) w, and 128 * sum w, one more dot per
 * block shared by every row, is subtracted. Exact, as the integer dots above are.
 * ng groups (1 or 2) at once: each activation broadcast feeds both groups' dots.
 * Batch invariance holds as on the 256-bit path: a row's operations do not depend on
 * mr, ng or the thread that runs it. */
static inline __attribute__((always_inline)) void qgroup512(
    const uint8_t* tiles, int64_t gbytes, int ng, int64_t nb, int kind, int nsub, int f16,
    const int8_t* xq, const float* xd, const float* xs, int64_t K, int64_t m0, int mr, float* y,
    int64_t ldy, int64_t n0, int64_t N, const float* bias) {
    const int64_t tile = pagellm_q_tile_bytes(kind, nsub, f16);
    const int64_t ssz = f16 ? 2 : 4;
    const __m512i pidx = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const __m512i didx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i bias8 = _mm512_set1_epi8((char)0x80);
    __m512 acc[MR512][2];
    for (int i = 0; i < mr; i++)
        for (int q = 0; q < ng; q++) acc[i][q] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        /* w[q][p]: group q's quads 2p and 2p + 1, lanes interleaved by row */
        __m512i w[2][4], corr[2][2];
        __m512 s[2][2], mv[2][2];
        for (int q = 0; q < ng; q++) {
            const uint8_t* t = tiles + q * gbytes + b * tile;
            const uint8_t* sc = t + code_bytes(kind);
            const uint8_t* mn = sc + nsub * 8 * ssz;
            if (is_u4(kind)) {
                const __m512i lo4 = _mm512_set1_epi8(0x0F);
                __m512i r0 = _mm512_loadu_si512((const void*)t);
                __m512i r1 = _mm512_loadu_si512((const void*)(t + 64));
                w[q][0] = _mm512_permutexvar_epi32(pidx, _mm512_and_si512(r0, lo4));
                w[q][1] = _mm512_permutexvar_epi32(pidx, _mm512_and_si512(r1, lo4));
                w[q][2] = _mm512_permutexvar_epi32(pidx, _mm512_and_si512(_mm512_srli_epi16(r0, 4), lo4));
                w[q][3] = _mm512_permutexvar_epi32(pidx, _mm512_and_si512(_mm512_srli_epi16(r1, 4), lo4));
            } else {
                for (int p = 0; p < 4; p++)
                    w[q][p] = _mm512_permutexvar_epi32(pidx, _mm512_loadu_si512((const void*)(t + 64 * p)));
            }
            /* S8: 128 * the code sums of half-blocks 0 and 1 (one sum for nsub = 1) */
            corr[q][0] = corr[q][1] = _mm512_setzero_si512();
            if (kind == KIND_S8) {
                const __m512i zero = _mm512_setzero_si512();
                __m512i c0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, bias8, w[q][0]), bias8, w[q][1]);
                __m512i c1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, bias8, w[q][2]), bias8, w[q][3]);
                corr[q][0] = nsub == 2 ? c0 : _mm512_add_epi32(c0, c1);
                corr[q][1] = c1;
            }
            for (int h = 0; h < nsub; h++) {
                s[q][h] = _mm512_permutexvar_ps(didx, _mm512_castps256_ps512(load_scales(sc + h * 8 * ssz, f16)));
                /* the min term goes to the even lane of each row only */
                mv[q][h] = kind == KIND_S8 ? _mm512_setzero_ps()
                           : kind == KIND_U4S
                               ? _mm512_maskz_mov_ps(0x5555, _mm512_mul_ps(s[q][h], _mm512_set1_ps(-8.0f)))
                               : _mm512_maskz_permutexvar_ps(
                                     0x5555, didx, _mm512_castps256_ps512(load_scales(mn + h * 8 * ssz, f16)));
            }
        }
        for (int i = 0; i < mr; i++) {
            const int64_t m = m0 + i;
            const int64_t* xr = (const int64_t*)(xq + m * K + b * 32);
            __m512i a[4];
            for (int p = 0; p < 4; p++) {
                a[p] = _mm512_set1_epi64(xr[p]);
                if (kind == KIND_S8) a[p] = _mm512_xor_si512(a[p], bias8);
            }
            const __m512 dx = _mm512_set1_ps(xd[m * nb + b]);
            const float* sx = xs + m * nb * 2 + 2 * b;
            const __m512 sum = _mm512_set1_ps(sx[0] + sx[1]);
            for (int q = 0; q < ng; q++) {
                __m512i d0, d1;
                /* S8: activations are the unsigned operand, else the weights */
#define DP(ACC, p) (kind == KIND_S8 ? _mm512_dpbusd_epi32(ACC, a[p], w[q][p]) \
                                    : _mm512_dpbusd_epi32(ACC, w[q][p], a[p]))
                if (nsub == 2) {
                    d0 = DP(DP(_mm512_setzero_si512(), 0), 1);
                    d1 = DP(DP(_mm512_setzero_si512(), 2), 3);
                } else {
                    d0 = _mm512_add_epi32(DP(DP(_mm512_setzero_si512(), 0), 2),
                                          DP(DP(_mm512_setzero_si512(), 1), 3));
                    d1 = d0;
                }
#undef DP
                if (kind == KIND_S8) {
                    d0 = _mm512_sub_epi32(d0, corr[q][0]);
                    d1 = _mm512_sub_epi32(d1, corr[q][1]);
                }
                acc[i][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(s[q][0], dx), acc[i][q]);
                if (nsub == 2)
                    acc[i][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_mul_ps(s[q][1], dx), acc[i][q]);
                if (kind != KIND_S8) acc[i][q] = _mm512_fmadd_ps(mv[q][0], sum, acc[i][q]);
            }
        }
    }
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int i = 0; i < mr; i++) {
        for (int q = 0; q < ng; q++) {
            /* row r = lane 2r + lane 2r + 1 */
            __m512 tot = _mm512_add_ps(acc[i][q], _mm512_permute_ps(acc[i][q], 0xB1));
            float r[16];
            _mm512_storeu_ps(r, _mm512_permutexvar_ps(even, tot));
            int64_t nq = n0 + 8 * q;
            int nvalid = N - nq < 8 ? (int)(N - nq) : 8;
            float* out = y + (m0 + i) * ldy + nq;
            for (int l = 0; l < nvalid; l++) out[l] = r[l] + (bias ? bias[nq + l] : 0.0f);
        }
    }
}
#else
#define HAVE_Q512 0
#endif

static inline __attribute__((always_inline)) void qlinear_impl(
    const int8_t* xq, const float* xd, const float* xs, int64_t M, int64_t K, const uint8_t* w,
    int64_t N, int kind, int nsub, int f16, float* y, int64_t ldy, const float* bias, int nthreads) {
    int64_t nb = K / 32, groups = (N + 7) / 8;
    int64_t gbytes = nb * pagellm_q_tile_bytes(kind, nsub, f16);
#if HAVE_Q512
    /* Two groups (16 weight rows) per item: each activation broadcast feeds both. */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t gp = 0; gp < (groups + 1) / 2; gp++) {
        const int64_t g = 2 * gp;
        const int ng = g + 1 < groups ? 2 : 1;
        for (int64_t m0 = 0; m0 < M; m0 += MR512) {
            int mr = M - m0 < MR512 ? (int)(M - m0) : MR512;
#define QG(R)                                                                                  \
    case R:                                                                                    \
        if (ng == 2)                                                                           \
            qgroup512(w + g * gbytes, gbytes, 2, nb, kind, nsub, f16, xq, xd, xs, K, m0, R, y, \
                      ldy, g * 8, N, bias);                                                    \
        else                                                                                   \
            qgroup512(w + g * gbytes, gbytes, 1, nb, kind, nsub, f16, xq, xd, xs, K, m0, R, y, \
                      ldy, g * 8, N, bias);                                                    \
        break
            switch (mr) {
                QG(1); QG(2); QG(3); QG(4); QG(5); QG(6);
#if MR512 > 6
                QG(7); QG(8);
#endif
            }
#undef QG
        }
    }
#else
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
#endif
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
