/*
 * pagellm's CPU kernels (fp32, AVX2 + FMA, OpenMP).
 *
 * Compiled on first use by pagellm/layers/native.py and called through ctypes; every
 * function has a portable torch twin in pagellm/layers/ops.py that tests compare
 * against. The OpenMP runtime is the one torch already loaded (same soname), so the
 * kernels share torch's thread team instead of fighting it for the two cores.
 *
 * Layouts (row-major, strides in elements):
 *   linear:     x[M, K] (row stride ldx), W[N, K], y[M, N]  ->  y = x W^T (+ b)
 *   KV cache:   cache[num_blocks, block_size, num_kv_heads, head_dim]
 *   attention:  q[T, Hq, D] (row stride ldq), out[T, Hq, D] contiguous
 *               token t of sequence s sits at position
 *                   seq_lens[s] - (qsl[s+1] - qsl[s]) + (t - qsl[s])
 *               and attends to positions 0..that position through block_tables[s].
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* Sum each of four vectors: returns {sum(a), sum(b), sum(c), sum(d)}. */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* exp(x) for 8 lanes: range reduction x = n ln2 + r, degree-6 polynomial on r
 * (relative error about 2e-7 on [-87, 88]); below -87 it returns 0. */
static inline __m256 exp256(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    __m256 out = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, out);
}

/* Every linear path below computes output (m, n) in the same order, so a row's result
 * never depends on how many other rows share the batch (batch invariance: a request's
 * greedy output is the same alone or under load, chunked or not):
 *   lane l of an 8-wide accumulator sums x[m, k] * W[n, k] for k = l, l + 8, ... with FMA;
 *   the lanes are added as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))  (hsum4);
 *   then the K % 8 tail in increasing k; then the bias. */

static inline void store_out(float* y, __m128 v, const float* x, const float* const* w,
                             int64_t K8, int64_t K, const float* bias, int64_t n0, int nvalid) {
    float r[4];
    _mm_storeu_ps(r, v);
    for (int i = 0; i < nvalid; i++) {
        for (int64_t k = K8; k < K; k++) r[i] += x[k] * w[i][k];
        y[n0 + i] = r[i] + (bias ? bias[n0 + i] : 0.0f);
    }
}

/* Rows n0..n0+3 of W (clamped at N - 1) against one or two input rows: the decode path,
 * memory-bound, so every weight byte is loaded once and used for both rows. */
static void linear_rows4(const float* x, int64_t ldx, const float* W, const float* bias,
                         float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int nvalid) {
    const float* w[4];
    for (int i = 0; i < 4; i++) w[i] = W + (n0 + (i < nvalid ? i : nvalid - 1)) * K;
    int64_t K8 = K & ~(int64_t)7;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
        const float* xa = x + m * ldx;
        const float* xb = xa + ldx;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t k = 0; k < K8; k += 8) {
            __m256 va = _mm256_loadu_ps(xa + k), vb = _mm256_loadu_ps(xb + k);
            __m256 v0 = _mm256_loadu_ps(w[0] + k), v1 = _mm256_loadu_ps(w[1] + k);
            a0 = _mm256_fmadd_ps(va, v0, a0);
            b0 = _mm256_fmadd_ps(vb, v0, b0);
            a1 = _mm256_fmadd_ps(va, v1, a1);
            b1 = _mm256_fmadd_ps(vb, v1, b1);
            __m256 v2 = _mm256_loadu_ps(w[2] + k), v3 = _mm256_loadu_ps(w[3] + k);
            a2 = _mm256_fmadd_ps(va, v2, a2);
            b2 = _mm256_fmadd_ps(vb, v2, b2);
            a3 = _mm256_fmadd_ps(va, v3, a3);
            b3 = _mm256_fmadd_ps(vb, v3, b3);
        }
        store_out(y + m * N, hsum4(a0, a1, a2, a3), xa, w, K8, K, bias, n0, nvalid);
        store_out(y + (m + 1) * N, hsum4(b0, b1, b2, b3), xb, w, K8, K, bias, n0, nvalid);
    }
    for (; m < M; m++) {
        const float* xa = x + m * ldx;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K8; k += 8) {
            __m256 va = _mm256_loadu_ps(xa + k);
            a0 = _mm256_fmadd_ps(va, _mm256_loadu_ps(w[0] + k), a0);
            a1 = _mm256_fmadd_ps(va, _mm256_loadu_ps(w[1] + k), a1);
            a2 = _mm256_fmadd_ps(va, _mm256_loadu_ps(w[2] + k), a2);
            a3 = _mm256_fmadd_ps(va, _mm256_loadu_ps(w[3] + k), a3);
        }
        store_out(y + m * N, hsum4(a0, a1, a2, a3), xa, w, K8, K, bias, n0, nvalid);
    }
}

/* Up to three input rows against rows n0..n0+3 of W: 12 accumulators, every loaded weight
 * vector feeds three FMAs. Compute-bound; on a 2-core AVX2 machine it matches or beats
 * MKL's GEMM on these skinny shapes (MKL loses time packing them). */
static void linear_tile3x4(const float* x, int64_t ldx, const float* W, const float* bias,
                           float* y, int64_t N, int64_t K, int64_t n0, int nvalid, int mr) {
    const float* w[4];
    for (int i = 0; i < 4; i++) w[i] = W + (n0 + (i < nvalid ? i : nvalid - 1)) * K;
    const float* x0 = x;
    const float* x1 = mr > 1 ? x + ldx : x;
    const float* x2 = mr > 2 ? x + 2 * ldx : x;
    int64_t K8 = K & ~(int64_t)7;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 v0 = _mm256_loadu_ps(w[0] + k), v1 = _mm256_loadu_ps(w[1] + k);
        __m256 v2 = _mm256_loadu_ps(w[2] + k), v3 = _mm256_loadu_ps(w[3] + k);
        __m256 xa = _mm256_loadu_ps(x0 + k);
        a00 = _mm256_fmadd_ps(xa, v0, a00);
        a01 = _mm256_fmadd_ps(xa, v1, a01);
        a02 = _mm256_fmadd_ps(xa, v2, a02);
        a03 = _mm256_fmadd_ps(xa, v3, a03);
        xa = _mm256_loadu_ps(x1 + k);
        a10 = _mm256_fmadd_ps(xa, v0, a10);
        a11 = _mm256_fmadd_ps(xa, v1, a11);
        a12 = _mm256_fmadd_ps(xa, v2, a12);
        a13 = _mm256_fmadd_ps(xa, v3, a13);
        xa = _mm256_loadu_ps(x2 + k);
        a20 = _mm256_fmadd_ps(xa, v0, a20);
        a21 = _mm256_fmadd_ps(xa, v1, a21);
        a22 = _mm256_fmadd_ps(xa, v2, a22);
        a23 = _mm256_fmadd_ps(xa, v3, a23);
    }
    store_out(y, hsum4(a00, a01, a02, a03), x0, w, K8, K, bias, n0, nvalid);
    if (mr > 1) store_out(y + N, hsum4(a10, a11, a12, a13), x1, w, K8, K, bias, n0, nvalid);
    if (mr > 2) store_out(y + 2 * N, hsum4(a20, a21, a22, a23), x2, w, K8, K, bias, n0, nvalid);
}

/* y[M, N] = x W^T + bias. Each thread streams its own contiguous share of W's rows once
 * and applies it to every input row. */
void pagellm_linear_f32(const float* x, int64_t ldx, const float* W, const float* bias, float* y,
                        int64_t M, int64_t N, int64_t K, int nthreads) {
    int64_t nblocks = (N + 3) / 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t n0 = b * 4;
        int nvalid = N - n0 < 4 ? (int)(N - n0) : 4;
        if (M <= 2) {
            linear_rows4(x, ldx, W, bias, y, M, N, K, n0, nvalid);
        } else {
            for (int64_t m = 0; m < M; m += 3)
                linear_tile3x4(x + m * ldx, ldx, W, bias, y + m * N, N, K, n0, nvalid,
                               M - m < 3 ? (int)(M - m) : 3);
        }
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
            for (; k + 8 <= N; k += 8)
                _mm256_storeu_ps(r + k, _mm256_add_ps(_mm256_loadu_ps(xr + k), _mm256_loadu_ps(r + k)));
            for (; k < N; k++) r[k] = xr[k] + r[k];
            src = r;
        }
        __m256 acc = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= N; k += 8) {
            __m256 v = _mm256_loadu_ps(src + k);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum256(acc);
        for (; k < N; k++) ss += src[k] * src[k];
        float inv = 1.0f / sqrtf(ss / (float)N + eps);
        __m256 vi = _mm256_set1_ps(inv);
        k = 0;
        for (; k + 8 <= N; k += 8)
            _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_loadu_ps(weight + k),
                                                  _mm256_mul_ps(_mm256_loadu_ps(src + k), vi)));
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
            for (; k + 8 <= half; k += 8) {
                __m256 va = _mm256_loadu_ps(a + k), vb = _mm256_loadu_ps(b + k);
                __m256 c = _mm256_loadu_ps(cs + k), s = _mm256_loadu_ps(sn + k);
                _mm256_storeu_ps(a + k, _mm256_fmsub_ps(va, c, _mm256_mul_ps(vb, s)));
                _mm256_storeu_ps(b + k, _mm256_fmadd_ps(vb, c, _mm256_mul_ps(va, s)));
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
        const __m256 one = _mm256_set1_ps(1.0f);
        for (; k + 8 <= N; k += 8) {
            __m256 vg = _mm256_loadu_ps(g + k);
            __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), vg));
            __m256 s = _mm256_div_ps(vg, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + k, _mm256_mul_ps(s, _mm256_loadu_ps(u + k)));
        }
        for (; k < N; k++) o[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
    }
}

/* Write this step's K/V rows into the paged cache: cache row slot = block * bs + offset. */
void pagellm_write_kv_f32(const float* k, int64_t ldk, const float* v, int64_t ldv,
                          float* k_cache, float* v_cache, const int64_t* slot_mapping, int64_t T,
                          int64_t row_elems) {
    for (int64_t t = 0; t < T; t++) {
        int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        memcpy(k_cache + slot * row_elems, k + t * ldk, row_elems * sizeof(float));
        memcpy(v_cache + slot * row_elems, v + t * ldv, row_elems * sizeof(float));
    }
}

/* scores[g][j] = scale * q_g . K[j] for the G query heads of one KV head, j < ctx.
 * Walks the block table (no division per key) four keys at a time, so one horizontal
 * reduction serves four dot products. */
static void attn_scores(const float* qs, int64_t G, int64_t D, const float* k_cache,
                        const int32_t* bt, int64_t block_size, int64_t row, int64_t kh,
                        int64_t ctx, float scale, float* scores) {
    const __m128 vscale = _mm_set1_ps(scale);
    for (int64_t b = 0, j0 = 0; j0 < ctx; b++, j0 += block_size) {
        const float* base = k_cache + (int64_t)bt[b] * block_size * row + kh * D;
        int64_t n = ctx - j0 < block_size ? ctx - j0 : block_size;
        for (int64_t r0 = 0; r0 < n; r0 += 4) {
            int64_t nk = n - r0 < 4 ? n - r0 : 4;
            const float* k0 = base + r0 * row;
            const float* k1 = nk > 1 ? k0 + row : k0;
            const float* k2 = nk > 2 ? k0 + 2 * row : k0;
            const float* k3 = nk > 3 ? k0 + 3 * row : k0;
            for (int64_t g = 0; g < G; g++) {
                const float* qg = qs + g * D;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(),
                       a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) {
                    __m256 qv = _mm256_loadu_ps(qg + d);
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
                }
                float* dst = scores + g * ctx + j0 + r0;
                if (nk == 4) {
                    _mm_storeu_ps(dst, _mm_mul_ps(hsum4(a0, a1, a2, a3), vscale));
                } else {
                    float tmp[4];
                    _mm_storeu_ps(tmp, _mm_mul_ps(hsum4(a0, a1, a2, a3), vscale));
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
        __m256 vm = _mm256_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 8 <= ctx; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(sc + j));
        float mx = hmax256(vm);
        for (; j < ctx; j++) mx = sc[j] > mx ? sc[j] : mx;
        __m256 vmx = _mm256_set1_ps(mx), vs = _mm256_setzero_ps();
        j = 0;
        for (; j + 8 <= ctx; j += 8) {
            __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + j), vmx));
            _mm256_storeu_ps(sc + j, e);
            vs = _mm256_add_ps(vs, e);
        }
        float sum = hsum256(vs);
        for (; j < ctx; j++) {
            sc[j] = expf(sc[j] - mx);
            sum += sc[j];
        }
        __m256 inv = _mm256_set1_ps(1.0f / sum);
        j = 0;
        for (; j + 8 <= ctx; j += 8) _mm256_storeu_ps(sc + j, _mm256_mul_ps(_mm256_loadu_ps(sc + j), inv));
        for (; j < ctx; j++) sc[j] *= 1.0f / sum;
    }
}

/* out[g][d0:d0+32] = sum_j p[g][j] V[j][d0:d0+32] for GC (1..3) heads at once: each
 * 32-float slice of a V row is loaded once and feeds GC x 4 register accumulators. */
#define PV_SLICE(GC)                                                                           \
    static void pv_slice_##GC(const float* probs, int64_t ctx, const float* v_cache,          \
                              const int32_t* bt, int64_t block_size, int64_t row,             \
                              int64_t off, float* out, int64_t D) {                           \
        __m256 acc[GC][4];                                                                     \
        for (int g = 0; g < GC; g++)                                                           \
            for (int i = 0; i < 4; i++) acc[g][i] = _mm256_setzero_ps();                       \
        for (int64_t b = 0, j0 = 0; j0 < ctx; b++, j0 += block_size) {                       \
            const float* vr = v_cache + (int64_t)bt[b] * block_size * row + off;               \
            int64_t n = ctx - j0 < block_size ? ctx - j0 : block_size;                         \
            for (int64_t r = 0; r < n; r++, vr += row) {                                       \
                __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8),                 \
                       v2 = _mm256_loadu_ps(vr + 16), v3 = _mm256_loadu_ps(vr + 24);           \
                for (int g = 0; g < GC; g++) {                                                 \
                    __m256 p = _mm256_broadcast_ss(probs + g * ctx + j0 + r);                  \
                    acc[g][0] = _mm256_fmadd_ps(p, v0, acc[g][0]);                             \
                    acc[g][1] = _mm256_fmadd_ps(p, v1, acc[g][1]);                             \
                    acc[g][2] = _mm256_fmadd_ps(p, v2, acc[g][2]);                             \
                    acc[g][3] = _mm256_fmadd_ps(p, v3, acc[g][3]);                             \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int g = 0; g < GC; g++)                                                           \
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(out + g * D + i * 8, acc[g][i]);      \
    }
PV_SLICE(1)
PV_SLICE(2)
PV_SLICE(3)

/* Paged attention for a flattened batch of prefill chunks and decode tokens.
 * One work item is (token, kv head): the G = Hq / Hkv query heads of the group read each
 * K and V row once (per 32-channel slice). Exact two-pass softmax over the token's whole
 * visible context. Requires head_dim % 32 == 0 (checked by the caller). */
void pagellm_paged_attention_f32(const float* q, int64_t ldq, const float* k_cache,
                                 const float* v_cache, const int32_t* block_tables,
                                 int64_t max_blocks, const int32_t* seq_lens,
                                 const int32_t* query_start_loc, const int32_t* token_to_seq,
                                 float* out, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                                 int64_t block_size, int64_t max_seq_len, float scale,
                                 int nthreads) {
    const int64_t G = Hq / Hkv;
    const int64_t row = Hkv * D; /* elements per cache row (one token) */
#pragma omp parallel num_threads(nthreads)
    {
        float* scores = (float*)malloc(sizeof(float) * (size_t)(G * (max_seq_len + 8)));
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < T * Hkv; item++) {
            int64_t t = item / Hkv, kh = item % Hkv;
            int64_t s = token_to_seq[t];
            int64_t qlen = query_start_loc[s + 1] - query_start_loc[s];
            int64_t pos = seq_lens[s] - qlen + (t - query_start_loc[s]);
            int64_t ctx = pos + 1;
            const int32_t* bt = block_tables + s * max_blocks;
            const float* qs = q + t * ldq + kh * G * D;
            attn_scores(qs, G, D, k_cache, bt, block_size, row, kh, ctx, scale, scores);
            softmax_rows(scores, G, ctx);
            float* o = out + (t * Hq + kh * G) * D;
            for (int64_t g0 = 0; g0 < G; g0 += 3) {
                int64_t gc = G - g0 < 3 ? G - g0 : 3;
                for (int64_t d0 = 0; d0 < D; d0 += 32) {
                    const float* pr = scores + g0 * ctx;
                    float* og = o + g0 * D + d0;
                    int64_t off = kh * D + d0;
                    if (gc == 3) pv_slice_3(pr, ctx, v_cache, bt, block_size, row, off, og, D);
                    else if (gc == 2) pv_slice_2(pr, ctx, v_cache, bt, block_size, row, off, og, D);
                    else pv_slice_1(pr, ctx, v_cache, bt, block_size, row, off, og, D);
                }
            }
        }
        free(scores);
    }
}
