/*
 * The compute roofline's probe: the arithmetic peak of this core's vector units, per
 * instruction, with every operand in registers (no memory traffic at all).
 *
 *   kind 0: fp32 FMA (vfmadd231ps)          2 FLOPs per lane
 *   kind 1: int8 dot, u8 x s8 -> s32        8 ops per 32-bit lane (4 multiply-adds):
 *           vpdpbusd (VNNI) where the build has it, else vpmaddubsw + vpmaddwd + vpaddd
 *   kind 2: bf16 dot, bf16 pairs -> fp32    4 FLOPs per 32-bit lane (vdpbf16ps, AVX512-BF16)
 *
 * Each thread runs `iters` rounds of NACC independent chains (enough to cover the
 * instruction latency on every core seen: 4 cycles x 2 ports). Returns the operations
 * executed by all threads together, or 0 when this build cannot run the kind.
 */
#include <omp.h>

#include "simd.h"

#define NACC 10

double pagellm_peak_ops(int kind, int64_t iters, int nthreads) {
    double lanes32 = VW; /* 32-bit lanes of the build's widest vector */
    double per_round;
    switch (kind) {
        case 0: per_round = 2.0 * lanes32 * NACC; break;
        case 1: per_round = 8.0 * lanes32 * NACC; break;
#if defined(__AVX512BF16__) && VW == 16
        case 2: per_round = 4.0 * lanes32 * NACC; break;
#endif
        default: return 0.0;
    }
    float sink = 0.0f;
    int team = 1;
#pragma omp parallel num_threads(nthreads) reduction(+ : sink)
    {
#pragma omp single
        team = omp_get_num_threads();
        float local = 0.0f;
        if (kind == 0) {
            vf acc[NACC];
            vf a = vf_set1(1.0000001f), b = vf_set1(0.9999999f);
            for (int j = 0; j < NACC; j++) acc[j] = vf_set1((float)j);
            for (int64_t i = 0; i < iters; i++) {
#pragma GCC unroll 10
                for (int j = 0; j < NACC; j++) acc[j] = vf_fma(acc[j], a, b);
            }
            vf s = acc[0];
            for (int j = 1; j < NACC; j++) s = vf_add(s, acc[j]);
            local = vf_hsum(s);
        } else if (kind == 1) {
#if VW == 16
            __m512i acc[NACC];
            __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
            for (int j = 0; j < NACC; j++) acc[j] = _mm512_set1_epi32(j);
            for (int64_t i = 0; i < iters; i++) {
#pragma GCC unroll 10
                for (int j = 0; j < NACC; j++) {
#if defined(__AVX512VNNI__)
                    acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
#else
                    acc[j] = _mm512_add_epi32(
                        acc[j], _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)));
#endif
                }
            }
            __m512i s = acc[0];
            for (int j = 1; j < NACC; j++) s = _mm512_add_epi32(s, acc[j]);
            local = (float)_mm512_reduce_add_epi32(s);
#else
            __m256i acc[NACC];
            __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
            for (int j = 0; j < NACC; j++) acc[j] = _mm256_set1_epi32(j);
            for (int64_t i = 0; i < iters; i++) {
#pragma GCC unroll 10
                for (int j = 0; j < NACC; j++) {
#if defined(__AVXVNNI__)
                    acc[j] = _mm256_dpbusd_avx_epi32(acc[j], a, b);
#else
                    acc[j] = _mm256_add_epi32(
                        acc[j], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
                }
            }
            __m256i s = acc[0];
            for (int j = 1; j < NACC; j++) s = _mm256_add_epi32(s, acc[j]);
            local = (float)hsum256_epi32(s);
#endif
        } else {
#if defined(__AVX512BF16__) && VW == 16
            __m512 acc[NACC];
            __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0f), _mm512_set1_ps(0.5f));
            __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.25f), _mm512_set1_ps(-0.25f));
            for (int j = 0; j < NACC; j++) acc[j] = _mm512_set1_ps((float)j);
            for (int64_t i = 0; i < iters; i++) {
#pragma GCC unroll 10
                for (int j = 0; j < NACC; j++) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
            }
            __m512 s = acc[0];
            for (int j = 1; j < NACC; j++) s = _mm512_add_ps(s, acc[j]);
            local = _mm512_reduce_add_ps(s);
#endif
        }
        sink += local;
    }
    /* the sum is never 12345 for these inputs; the test only keeps the chains alive */
    if (sink == 12345.0f) per_round += 1e-9;
    return per_round * (double)iters * (double)team;
}
