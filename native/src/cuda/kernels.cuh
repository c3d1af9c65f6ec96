// The CUDA backend's kernels, one small kernel per operation, each launched on the given stream. The
// per-element arithmetic lives in ops.h (checked on the CPU by vdiff-cuda-tests).
#pragma once
#include "cuda/common.cuh"

namespace vdiff::cuda {

// x[t] = f32(table[tokens[t]]), rows of D.
void launch_embed(const int32_t* tokens, int T, const void* table, Elem type, int D, float* x, cudaStream_t stream);

// y[r] = rmsnorm(x[src ? src[r] : r]) * w, y in `y_type` (f32 or the GEMM's input type), rows of D.
void launch_rmsnorm(const float* x, const int32_t* src, int rows, int D, const float* w, float eps, void* y,
                    Elem y_type, cudaStream_t stream);

// NeoX rotate-half RoPE in place on the q and k columns of each token's row of `qkv` (row stride ld):
// q heads at column 0, k heads at column k_col; token t at canvas position positions[t]. Over the first
// `rot` dims of each head (rot = hd: the whole head; less: partial rotary, the rest pass), cos/sin tables
// [position][rot / 2].
void launch_rope(float* qkv, int T, int64_t ld, int q_heads, int kv_heads, int hd, int rot, int k_col,
                 const int32_t* positions, const float* cos, const float* sin, cudaStream_t stream);

// QK-norm: every query head (column 0) and key head (column k_col) of each token's row of `qkv`
// RMS-normalised over its hd values in place, with the weights q_norm / k_norm [hd] (f32).
void launch_head_rmsnorm(float* qkv, int T, int64_t ld, int q_heads, int kv_heads, int hd, int k_col,
                         const float* q_norm, const float* k_norm, float eps, cudaStream_t stream);

// Mixture of experts (cpu/moe.h routes and groups on the host):
// rows[r] = x[src[r]] for r < R (rows of D elements of `type`): the routed rows sorted by expert.
void launch_gather_rows(const void* x, Elem type, int D, const int32_t* src, int R, void* rows, cudaStream_t stream);
// y[t] = sum over the token's slots j = 0 .. k-1, in order, of weight[t k + j] * out[sorted_row[t k + j]]
// (f32 rows of D; ops::moe_combine).
void launch_moe_combine(const float* out, const int32_t* sorted_row, const float* weight, int T, int k, int D, float* y,
                        cudaStream_t stream);
// x[i] += y[i] for n floats.
void launch_add(float* x, const float* y, int64_t n, cudaStream_t stream);

// Writes layer `layer`'s fresh keys and values (columns k_col and v_col of qkv) of every token of every
// cached sequence into its cache at the token's canvas position.
void launch_store_kv(const float* qkv, int T, int64_t ld, int k_col, int v_col, int kv_dim, int layer,
                     const int32_t* token_seq, const SeqDesc* seqs, cudaStream_t stream);

// y[t, j] += bias[j] for j < n, rows of stride ld (the q/k/v biases on the fused projection's output).
void launch_add_bias(float* y, int T, int64_t ld, const float* bias, int n, cudaStream_t stream);

// Which attention kernel launch_attention runs: the register-blocked one, or the plain first version
// (VDIFF_CUDA_ATTENTION=simple at start-up; tests switch between them).
enum class AttentionVariant { Blocked, Simple };
AttentionVariant attention_variant();
void set_attention_variant(AttentionVariant v);

// Bidirectional attention with GQA over ragged sequences: out[t, h*hd ..] for every query tile and head.
// Keys and values from qkv (fresh) or from the sequence's cache (reads_cache). out in `out_type`.
void launch_attention(const float* qkv, int64_t ld, int k_col, int v_col, int q_heads, int kv_heads, int hd, int layer,
                      const SeqDesc* seqs, const QueryTile* tiles, int n_tiles, void* out, Elem out_type,
                      int64_t out_ld, cudaStream_t stream);

// out[t, j] = silu(gu[t, j]) * gu[t, H + j] (row stride 2H), out [T, H] in `out_type`.
void launch_swiglu(const float* gu, int T, int H, void* out, Elem out_type, cudaStream_t stream);

// The vocabulary reduction: per task, cfg, the draw (argmax or Gumbel-max), float64 softmax probability and
// confidence, the top logprobs and the target's log-probability, from rows of `row_size` logits.
void launch_reduce_rows(const float* logits, int row_size, const TaskDesc* tasks, int n_tasks, TaskResult* results,
                        cudaStream_t stream);

// C[m, n] (+)= sum_k A[m, k] * W[n, k]: the project's own tiled GEMM (the fallback without cuBLAS). A and W
// of one type (f32, bf16 or f16), f32 accumulation and output.
void launch_gemm_tiled(const void* A, int64_t lda, const void* W, int64_t ldw, Elem type, int M, int N, int K, float* C,
                       int64_t ldc, bool accumulate, cudaStream_t stream);

// dst = f32(src) for n elements.
void launch_to_f32(const void* src, Elem type, int64_t n, float* dst, cudaStream_t stream);

}  // namespace vdiff::cuda
