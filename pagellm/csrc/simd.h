/*
 * A small vector layer so that every kernel is written once and compiled per ISA.
 *
 * pagellm/layers/native.py builds the kernel library once for each instruction set the
 * host supports (AVX-512 and AVX2 + FMA today) and loads the widest; tests load every
 * one. `vf` is the widest float vector of the build (VW lanes); helpers below keep one
 * fixed reduction order per build, so results are batch invariant on every path (the
 * order differs between builds, which tests compare to torch with a tolerance).
 */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* 8-lane helpers shared by both builds. */
static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

static inline float hmax256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_max_ps(lo, hi);
    lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_max_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* {sum(a), sum(b), sum(c), sum(d)} of four 8-lane vectors. */
static inline __m128 hsum4_256(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* One IEEE half (F16C) as a float. */
static inline float fp16_to_float(uint16_t h) {
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

/* Sum of the eight int32 lanes. */
static inline int32_t hsum256_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define PAGELLM_AVX512 1
#define VW 16
typedef __m512 vf;
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_set1(float x) { return _mm512_set1_ps(x); }
static inline vf vf_load(const float* p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_fms(vf a, vf b, vf c) { return _mm512_fmsub_ps(a, b, c); }
static inline vf vf_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vf vf_broadcast(const float* p) { return _mm512_set1_ps(*p); }
static inline __m256 vf_fold(vf v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}
static inline float vf_hsum(vf v) { return hsum256(vf_fold(v)); }
static inline float vf_hmax(vf v) {
    return hmax256(_mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
static inline __m128 vf_hsum4(vf a, vf b, vf c, vf d) {
    return hsum4_256(vf_fold(a), vf_fold(b), vf_fold(c), vf_fold(d));
}
static inline vf vf_round(vf x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* 2^n for integral n held in floats (n in [-127, 128]). */
static inline vf vf_pow2i(vf n) {
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(e);
}
/* x where keep, else 0 (keep: x >= lo). */
static inline vf vf_zero_below(vf x, vf value, vf lo) {
    __mmask16 m = _mm512_cmp_ps_mask(value, lo, _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(m, x);
}
#else
#define VW 8
typedef __m256 vf;
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_set1(float x) { return _mm256_set1_ps(x); }
static inline vf vf_load(const float* p) { return _mm256_loadu_ps(p); }
static inline void vf_store(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_fms(vf a, vf b, vf c) { return _mm256_fmsub_ps(a, b, c); }
static inline vf vf_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vf vf_broadcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline float vf_hsum(vf v) { return hsum256(v); }
static inline float vf_hmax(vf v) { return hmax256(v); }
static inline __m128 vf_hsum4(vf a, vf b, vf c, vf d) { return hsum4_256(a, b, c, d); }
static inline vf vf_round(vf x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vf vf_pow2i(vf n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(e);
}
static inline vf vf_zero_below(vf x, vf value, vf lo) {
    return _mm256_and_ps(_mm256_cmp_ps(value, lo, _CMP_GE_OQ), x);
}
#endif

/* Loads of VW KV-cache elements stored in a narrower type, widened to float:
 * bfloat16 (the high half of a float), fp8 e4m3fn (4-bit exponent biased by 7, 3-bit
 * mantissa; shifted into a float's exponent and mantissa and rescaled by 2^120, which
 * also handles its subnormals), int8 (the caller applies the scale). */
#if defined(PAGELLM_AVX512)
static inline vf vf_load_bf16(const uint16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline vf vf_load_fp8(const uint8_t* p) {
    __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    __m512i mag = _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x7F)), 20);
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x80)), 24);
    vf v = _mm512_mul_ps(_mm512_castsi512_ps(mag), _mm512_set1_ps(0x1p120f));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
}
static inline vf vf_load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#else
static inline vf vf_load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline vf vf_load_fp8(const uint8_t* p) {
    __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    __m256i mag = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x7F)), 20);
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x80)), 24);
    vf v = _mm256_mul_ps(_mm256_castsi256_ps(mag), _mm256_set1_ps(0x1p120f));
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(v), sign));
}
static inline vf vf_load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#endif

/* exp(x) per lane: x = n ln2 + r, degree-6 polynomial on r (relative error about 2e-7
 * on [-87, 88]); below -87 it returns 0. */
static inline vf vf_exp(vf x) {
    const vf hi = vf_set1(88.3762626647949f), lo = vf_set1(-87.0f);
    vf xc = vf_min(vf_max(x, lo), hi);
    vf fx = vf_round(vf_mul(xc, vf_set1(1.44269504088896341f)));
    vf r = vf_fnma(fx, vf_set1(0.693359375f), xc);
    r = vf_fnma(fx, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.9875691500e-4f);
    p = vf_fma(p, r, vf_set1(1.3981999507e-3f));
    p = vf_fma(p, r, vf_set1(8.3334519073e-3f));
    p = vf_fma(p, r, vf_set1(4.1665795894e-2f));
    p = vf_fma(p, r, vf_set1(1.6666665459e-1f));
    p = vf_fma(p, r, vf_set1(5.0000001201e-1f));
    p = vf_fma(p, vf_mul(r, r), vf_add(r, vf_set1(1.0f)));
    return vf_zero_below(vf_mul(p, vf_pow2i(fx)), x, lo);
}
