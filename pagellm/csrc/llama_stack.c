/*
 * The decoder layers of a Llama-family model (Llama, Mistral, Qwen2, Qwen3) run from one
 * call per step, for the CPU path.
 *
 * Every op is one of the kernels the Python modules call (RMSNorm, linear, quantized
 * linear, RoPE, KV write, paged attention, SiLU-and-multiply), called in the same order
 * on the same buffers, so the results are bit-identical to pagellm/models/llama.py's
 * module-by-module forward. What this saves is the Python between them: about ten calls
 * per layer, each with its allocation, argument conversion and module dispatch, which
 * on a small model cost as much as the arithmetic.
 *
 * Per layer (T tokens, H hidden, Q/KV = q/k/v widths, I intermediate):
 *
 *   x, res      <- rmsnorm(x + res) * w_in, x + res           (first layer: res = x)
 *   qkv[T, Q+2KV] = x Wqkv^T (+b)        [q | k | v] per row
 *   q, k         <- per-head RMSNorm (Qwen3), then RoPE, in place in qkv
 *   cache[slots] <- k, v;  att[T, Q] = paged attention(q, cache)
 *   x            = att Wo^T (+b)
 *   x, res      <- rmsnorm(x + res) * w_post, x + res
 *   gu[T, 2I]    = x Wgu^T;  a[T, I] = silu(g) * u;  x = a Wdown^T
 *
 * and at the end  x <- rmsnorm(x + res) * w_final  (the model's final norm).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* From cpu_ops.c and quant_ops.c (the same library). */
void pagellm_linear_f32(const float* x, int64_t ldx, const float* W, const float* bias, float* y,
                        int64_t M, int64_t N, int64_t K, int nthreads);
void pagellm_rms_norm_f32(const float* x, float* residual, const float* weight, float* out,
                          int64_t M, int64_t N, float eps, int nthreads);
void pagellm_rope_f32(const int64_t* positions, float* x, int64_t ldx, const float* cos_sin,
                      int64_t T, int64_t H, int64_t D, int64_t rot_dim, int nthreads);
void pagellm_silu_and_mul_f32(const float* x, float* out, int64_t M, int64_t N, int nthreads);
void pagellm_write_kv(const float* k, int64_t ldk, const float* v, int64_t ldv, void* k_cache,
                      void* v_cache, float* k_scale, float* v_scale, const int64_t* slot_mapping,
                      int64_t T, int64_t Hkv, int64_t D, int kvt);
void pagellm_paged_attention(const float* q, int64_t ldq, const void* k_cache,
                             const void* v_cache, const float* k_scale, const float* v_scale,
                             const int32_t* block_tables, int64_t max_blocks,
                             const int32_t* seq_lens, const int32_t* query_start_loc,
                             const int32_t* token_to_seq, float* out, int64_t T, int64_t Hq,
                             int64_t Hkv, int64_t D, int64_t block_size, int64_t max_seq_len,
                             float scale, int kvt, int64_t window, float softcap, int nthreads);

void pagellm_linear_half(const float* x, int64_t ldx, const uint16_t* W, int wtype,
                         const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                         int nthreads);

/* y = x W^T + b for a float run of either weight type. */
static void dense(const void* W, int64_t wtype, const float* x, int64_t ldx, const float* bias,
                  float* y, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (wtype)
        pagellm_linear_half(x, ldx, (const uint16_t*)W, (int)wtype, bias, y, M, N, K, nthreads);
    else
        pagellm_linear_f32(x, ldx, (const float*)W, bias, y, M, N, K, nthreads);
}

typedef struct pagellm_qweight pagellm_qweight;
void pagellm_qlinear_f32(const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                         const pagellm_qweight* w, int nthreads);

#define MAX_RUNS 4

/* Output rows [start, end) of a linear layer stored one way: a packed quantized matrix
 * (with its bias inside) or a float32 weight [end - start, K] (and bias). A permuted run
 * (GPTQ act-order) gathers its input channels first. */
typedef struct {
    const pagellm_qweight* packed;
    const void* weight; /* float32 [end - start, K], or 16-bit (wtype) */
    const float* bias;
    const int64_t* perm;
    int64_t start, end;
    int64_t wtype; /* 0: float32 weight; 1: bfloat16, 2: fp16 (pagellm_linear_half) */
} pagellm_run_desc;

typedef struct {
    int64_t num_runs, in_features, out_features;
    pagellm_run_desc runs[MAX_RUNS];
} pagellm_linear_desc;

typedef struct {
    const float* input_norm;
    const float* post_norm;
    const float* q_norm; /* per-head norms (Qwen3), or NULL */
    const float* k_norm;
    pagellm_linear_desc qkv, o, gate_up, down;
    void* k_cache;
    void* v_cache;
    float* k_scale;
    float* v_scale;
    int64_t window; /* sliding window (0: full attention) */
    float softcap;  /* attention logit soft-cap (0: none) */
    int32_t pad_;
} pagellm_layer_desc;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, rot_dim, intermediate;
    int64_t block_size;
    float eps, attn_scale;
    int32_t kvt, pad_;
    const float* cos_sin;
    const float* final_norm;
    const pagellm_layer_desc* layers;
    /* LoRA adapter groups of this step, or NULL: [num_layers][4 linears][lora_groups]
     * descriptors of pagellm_lora_apply (cpu_ops.c), 8 int64 each. */
    const int64_t* lora;
    int64_t lora_groups;
} pagellm_stack_desc;

void pagellm_lora_apply(const float* x, float* y, int64_t in, int64_t out, const void* groups,
                        int64_t n_groups, int nthreads);

/* y[T, out] += the adapters' deltas of linear j (0 qkv, 1 o, 2 gate_up, 3 down) of layer l. */
static void lora(const pagellm_stack_desc* s, int64_t l, int64_t j, const float* x, float* y,
                 int64_t in, int64_t out, int nthreads) {
    if (s->lora == NULL) return;
    pagellm_lora_apply(x, y, in, out, s->lora + ((l * 4 + j) * s->lora_groups) * 8, s->lora_groups,
                       nthreads);
}

/* y[M, out] (row stride ldy) = x[M, in] (row stride ldx) W^T, run by run. */
static void linear(const pagellm_linear_desc* d, const float* x, int64_t ldx, int64_t M, float* y,
                   int64_t ldy, float* gather, float* tmp, int nthreads) {
    for (int64_t r = 0; r < d->num_runs; r++) {
        const pagellm_run_desc* run = &d->runs[r];
        const float* xin = x;
        int64_t ldin = ldx, K = d->in_features, n = run->end - run->start;
        if (run->perm) {
            for (int64_t m = 0; m < M; m++)
                for (int64_t k = 0; k < K; k++) gather[m * K + k] = x[m * ldx + run->perm[k]];
            xin = gather;
            ldin = K;
        }
        if (run->packed) {
            pagellm_qlinear_f32(xin, ldin, M, y + run->start, ldy, run->packed, nthreads);
        } else if (d->num_runs == 1 && ldy == n) {
            dense(run->weight, run->wtype, xin, ldin, run->bias, y, M, n, K, nthreads);
        } else { /* into a scratch [M, n], then its columns of y (as the module path does) */
            dense(run->weight, run->wtype, xin, ldin, run->bias, tmp, M, n, K, nthreads);
            for (int64_t m = 0; m < M; m++)
                memcpy(y + m * ldy + run->start, tmp + m * n, sizeof(float) * (size_t)n);
        }
    }
}

/* hidden[T, H]: in, the embeddings; out, the final-normed hidden states. */
void pagellm_llama_stack(const pagellm_stack_desc* s, float* hidden, const int64_t* positions,
                         int64_t T, const int64_t* slot_mapping, const int32_t* block_tables,
                         int64_t max_blocks, const int32_t* seq_lens,
                         const int32_t* query_start_loc, const int32_t* token_to_seq,
                         int64_t max_seq_len, int nthreads) {
    const int64_t H = s->hidden, D = s->head_dim, Hq = s->num_heads, Hkv = s->num_kv_heads;
    const int64_t Q = Hq * D, KV = Hkv * D, W = Q + 2 * KV, I = s->intermediate;
    int64_t widest = W > 2 * I ? W : 2 * I;
    if (widest < H) widest = H;
    int64_t in_max = H > I ? H : I;
    if (in_max < Q) in_max = Q;
    size_t n_res = (size_t)(T * H), n_x = (size_t)(T * H), n_qkv = (size_t)(T * W);
    size_t n_att = (size_t)(T * Q), n_gu = (size_t)(T * 2 * I), n_act = (size_t)(T * I);
    size_t n_gather = (size_t)(T * in_max), n_tmp = (size_t)(T * widest);
    float* buf = (float*)malloc(sizeof(float) *
                                (n_res + n_x + n_qkv + n_att + n_gu + n_act + n_gather + n_tmp));
    float* res = buf;
    float* x = res + n_res;
    float* qkv = x + n_x;
    float* att = qkv + n_qkv;
    float* gu = att + n_att;
    float* act = gu + n_gu;
    float* gather = act + n_act;
    float* tmp = gather + n_gather;

    float* cur = hidden; /* the layer input: the embeddings, then each MLP's output */
    for (int64_t l = 0; l < s->num_layers; l++) {
        const pagellm_layer_desc* L = &s->layers[l];
        if (l == 0) {
            pagellm_rms_norm_f32(cur, NULL, L->input_norm, x, T, H, s->eps, nthreads);
            memcpy(res, cur, sizeof(float) * n_res); /* the residual is the input itself */
        } else {
            pagellm_rms_norm_f32(cur, res, L->input_norm, x, T, H, s->eps, nthreads);
        }
        linear(&L->qkv, x, H, T, qkv, W, gather, tmp, nthreads);
        lora(s, l, 0, x, qkv, H, W, nthreads);
        if (L->q_norm) { /* per-head RMSNorm of q and k, in place (rows of D) */
            for (int64_t t = 0; t < T; t++) {
                pagellm_rms_norm_f32(qkv + t * W, NULL, L->q_norm, qkv + t * W, Hq, D, s->eps, 1);
                pagellm_rms_norm_f32(qkv + t * W + Q, NULL, L->k_norm, qkv + t * W + Q, Hkv, D,
                                     s->eps, 1);
            }
        }
        pagellm_rope_f32(positions, qkv, W, s->cos_sin, T, Hq, D, s->rot_dim, nthreads);
        pagellm_rope_f32(positions, qkv + Q, W, s->cos_sin, T, Hkv, D, s->rot_dim, nthreads);
        pagellm_write_kv(qkv + Q, W, qkv + Q + KV, W, L->k_cache, L->v_cache, L->k_scale,
                         L->v_scale, slot_mapping, T, Hkv, D, s->kvt);
        pagellm_paged_attention(qkv, W, L->k_cache, L->v_cache, L->k_scale, L->v_scale,
                                block_tables, max_blocks, seq_lens, query_start_loc, token_to_seq,
                                att, T, Hq, Hkv, D, s->block_size, max_seq_len, s->attn_scale,
                                s->kvt, L->window, L->softcap, nthreads);
        linear(&L->o, att, Q, T, x, H, gather, tmp, nthreads);
        lora(s, l, 1, att, x, Q, H, nthreads);
        pagellm_rms_norm_f32(x, res, L->post_norm, x, T, H, s->eps, nthreads);
        linear(&L->gate_up, x, H, T, gu, 2 * I, gather, tmp, nthreads);
        lora(s, l, 2, x, gu, H, 2 * I, nthreads);
        pagellm_silu_and_mul_f32(gu, act, T, I, nthreads);
        linear(&L->down, act, I, T, hidden, H, gather, tmp, nthreads);
        lora(s, l, 3, act, hidden, I, H, nthreads);
        cur = hidden;
    }
    pagellm_rms_norm_f32(cur, res, s->final_norm, hidden, T, H, s->eps, nthreads);
    free(buf);
}
