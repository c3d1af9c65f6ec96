// Host entry points to each CUDA kernel on its own, for vdiff-cuda-tests' op parity against the CPU
// kernels: inputs and outputs in host memory, copied to and from the first GPU. Plain C++. Every function
// throws vdiff::Error when no GPU is there (check available() first).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/backend.h"

namespace vdiff::cuda::testing {

// Element types of weights and GEMM inputs (the backend's Elem): 0 f32, 1 bf16, 2 f16.
enum class Type : int { F32 = 0, BF16 = 1, F16 = 2 };

// Whether a GPU is visible; `reason` says why not.
bool available(std::string* reason);

// x[t] = table[tokens[t]] as f32; the table's rows of D elements of `type`, raw bits.
void embed(const std::vector<int32_t>& tokens, const void* table, size_t table_bytes, Type type, int D, float* x);

// y = rmsnorm(x) * w over rows of D (f32 out).
void rmsnorm(const float* x, int rows, int D, const float* w, float eps, float* y);

// RoPE in place on qk [T][(q_heads + kv_heads) * hd] (q heads first), token t at positions[t], over the
// first `rot` dims of each head, with tables cos/sin [n_positions][rot / 2].
void rope(float* qk, int T, int q_heads, int kv_heads, int hd, int rot, const int32_t* positions, const float* cos,
          const float* sin, int n_positions);

// QK-norm in place on qk [T][(q_heads + kv_heads) * hd]: each head RMS-normalised with q_norm / k_norm [hd].
void qk_norm(float* qk, int T, int q_heads, int kv_heads, int hd, const float* q_norm, const float* k_norm, float eps);

// The MoE layer's two data movements: rows[r] = x[src[r]] (the gather of the routed rows, f32, rows of D),
// and y [T][D] = the combine of the expert outputs out [src.size()][D] (launch_moe_combine).
void moe_rows(const float* x, int D, const std::vector<int32_t>& src, float* rows, const float* out,
              const std::vector<int32_t>& sorted_row, const std::vector<float>& weight, int T, int k, float* y);

// out[t][j] = silu(gate[t][j]) * up[t][j] (f32).
void swiglu(const float* gate, const float* up, int T, int H, float* out);

// One sequence of an attention test: keys and values come from k/v of its own tokens (a whole canvas) or,
// when cache_keys is set, from a cache of `length` positions (f32 or bf16 bits) for the keys outside.
struct AttentionSeq {
  int offset = 0, begin = 0, end = 0, length = 0;
  const void* cache = nullptr;  // [n_layers = 1][keys | values][length][kv_dim] of f32 (or bf16 bits)
  bool cache_bf16 = false;
  int block = 0;  // ForwardSeq::attention_block: 0 bidirectional, B > 0 block-causal
};

// out[T][q_heads * hd] = attention over the given ragged sequences; qkv [T][(q_heads + 2 kv_heads) * hd]
// with q at column 0, k at q_heads * hd, v after it. Fresh keys of cached sequences are stored into a
// device copy of their cache first, as the backend does.
// `simple`: the plain first version of the kernel instead of the register-blocked one the backend runs.
void attention(const float* qkv, int T, int q_heads, int kv_heads, int hd, const std::vector<AttentionSeq>& seqs,
               float* out, bool simple = false);

// C[M][N] (+)= A[M][K] · W[N][K]^T, A and W of `type` (raw bits), through cuBLAS when `use_cublas` (and it
// loads; returns false when it does not) or the tiled kernel.
bool gemm(const void* A, const void* W, Type type, int M, int N, int K, float* C, bool accumulate, bool use_cublas,
          std::string* library = nullptr);

// The vocabulary reduction on rows of logits [n_rows][row_size] (host), one result per task; tasks that
// need the host (top-k / top-p filtering) are rejected with Error(InvalidArgument).
void reduce_rows(const float* logits, int n_rows, int row_size, const std::vector<RowTask>& tasks, RowResult* out);

}  // namespace vdiff::cuda::testing
