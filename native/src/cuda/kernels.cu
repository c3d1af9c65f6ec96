// The CUDA backend's kernels: one small kernel per operation. Indexing and synchronisation live here; the
// arithmetic of one element (one RMSNorm row's scale, one RoPE pair, one online-softmax merge, one Gumbel
// score) is ops.h's, which vdiff-cuda-tests also checks on the CPU.
#include <cfloat>
#include <cstdlib>
#include <string>

#include "cuda/kernels.cuh"
#include "cuda/ops.h"

namespace vdiff::cuda {

namespace {

constexpr int kWarp = 32;

// ---- block reductions ----------------------------------------------------------------------------

template <class T, class Op>
__device__ T warp_reduce(T v, Op op) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

// Reduces v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T partial[kWarp];
  __shared__ T result;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_reduce(v, op);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? partial[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) result = w;
  }
  __syncthreads();
  T out = result;
  __syncthreads();  // `result` and `partial` are reused by the next reduction
  return out;
}

__device__ ops::ArgBest shfl_down_arg(const ops::ArgBest& a, int o) {
  return ops::ArgBest{__shfl_down_sync(0xffffffffu, a.value, o), __shfl_down_sync(0xffffffffu, a.index, o)};
}

__device__ ops::ArgBest block_arg_max(ops::ArgBest v) {
  __shared__ double values[kWarp];
  __shared__ int indices[kWarp];
  __shared__ ops::ArgBest result;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int o = kWarp / 2; o > 0; o /= 2) v = ops::arg_max(v, shfl_down_arg(v, o));
  if (lane == 0) values[warp] = v.value, indices[warp] = v.index;
  __syncthreads();
  if (warp == 0) {
    ops::ArgBest w = lane < warps ? ops::ArgBest{values[lane], indices[lane]} : ops::arg_none();
    for (int o = kWarp / 2; o > 0; o /= 2) w = ops::arg_max(w, shfl_down_arg(w, o));
    if (lane == 0) result = w;
  }
  __syncthreads();
  ops::ArgBest out = result;
  __syncthreads();
  return out;
}

struct Sum {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxNoNaN {
  __device__ double operator()(double a, double b) const { return ops::max_no_nan(a, b); }
};

// ---- embedding, RMSNorm, RoPE, SwiGLU ------------------------------------------------------------------

template <class E>
__global__ void embed_kernel(const int32_t* tokens, const E* table, int D, float* x) {
  const int t = blockIdx.x;
  const E* row = table + static_cast<int64_t>(tokens[t]) * D;
  for (int j = threadIdx.x; j < D; j += blockDim.x) x[static_cast<int64_t>(t) * D + j] = load_f32(row, j);
}

template <class Y>
__global__ void rmsnorm_kernel(const float* x, const int32_t* src, int D, const float* w, float eps, Y* y) {
  const int r = blockIdx.x;
  const float* row = x + static_cast<int64_t>(src ? src[r] : r) * D;
  float s = 0.0f;
  for (int j = threadIdx.x; j < D; j += blockDim.x) s += row[j] * row[j];
  s = block_reduce(s, Sum{}, 0.0f);
  const float inverse = ops::rms_inverse(s, D, eps);
  for (int j = threadIdx.x; j < D; j += blockDim.x)
    y[static_cast<int64_t>(r) * D + j] = from_f32<Y>(ops::rms_apply(row[j], inverse, w[j]));
}

__global__ void rope_kernel(float* qkv, int T, int64_t ld, int q_heads, int heads, int hd, int rot, int k_col,
                            const int32_t* positions, const float* cos, const float* sin) {
  const int half = rot / 2;
  const int64_t n = static_cast<int64_t>(T) * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int head = static_cast<int>((idx / half) % heads);
    const int t = static_cast<int>(idx / (static_cast<int64_t>(half) * heads));
    float* x = qkv + t * ld + (head < q_heads ? head * hd : k_col + (head - q_heads) * hd);
    const int64_t table = static_cast<int64_t>(positions[t]) * half + i;
    ops::rope_pair(x[i], x[i + half], cos[table], sin[table]);
  }
}

// QK-norm: one warp per (token, head), the head's hd values RMS-normalised in place with its weights.
__global__ void head_rmsnorm_kernel(float* qkv, int T, int64_t ld, int q_heads, int heads, int hd, int k_col,
                                    const float* q_norm, const float* k_norm, float eps) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= static_cast<int64_t>(T) * heads) return;  // the same for every lane of the warp
  const int t = static_cast<int>(warp / heads), head = static_cast<int>(warp % heads);
  float* x = qkv + t * ld + (head < q_heads ? head * hd : k_col + (head - q_heads) * hd);
  const float* w = head < q_heads ? q_norm : k_norm;
  float s = 0.0f;
  for (int j = lane; j < hd; j += kWarp) s += x[j] * x[j];
  s = __shfl_sync(0xffffffffu, warp_reduce(s, Sum{}), 0);
  const float inverse = ops::rms_inverse(s, hd, eps);
  for (int j = lane; j < hd; j += kWarp) x[j] = ops::rms_apply(x[j], inverse, w[j]);
}

template <class O>
__global__ void swiglu_kernel(const float* gu, int T, int H, O* out) {
  const int64_t n = static_cast<int64_t>(T) * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / H, j = idx % H;
    const float* row = gu + t * 2 * H;
    out[idx] = from_f32<O>(ops::silu_mul(row[j], row[H + j]));
  }
}

// ---- mixture of experts ----------------------------------------------------------------------------------

template <class E>
__global__ void gather_rows_kernel(const E* x, int D, const int32_t* src, int R, E* rows) {
  const int64_t n = static_cast<int64_t>(R) * D;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    rows[idx] = x[static_cast<int64_t>(src[idx / D]) * D + idx % D];
}

__global__ void moe_combine_kernel(const float* out, const int32_t* sorted_row, const float* weight, int T, int k,
                                   int D, float* y) {
  const int64_t n = static_cast<int64_t>(T) * D;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[idx] = ops::moe_combine(out, sorted_row, weight, k, D, idx);
}

__global__ void add_kernel(float* x, const float* y, int64_t n) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[idx] += y[idx];
}

// ---- KV caches -----------------------------------------------------------------------------------------

__global__ void store_kv_kernel(const float* qkv, int T, int64_t ld, int k_col, int v_col, int kv_dim, int layer,
                                const int32_t* token_seq, const SeqDesc* seqs) {
  const int64_t n = static_cast<int64_t>(T) * kv_dim;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    store_kv_element(qkv, ld, k_col, v_col, kv_dim, layer, token_seq, seqs, idx);
}

// ---- attention -----------------------------------------------------------------------------------------
// One block per (query tile, head), the phases of attention_tile.h with a barrier after each.

constexpr int kKeys = kAttentionKeys, kAttnThreads = kAttentionThreads;

size_t attention_smem_bytes(int hd) { return sizeof(float) * attention_smem_floats(hd); }

template <class O>
__global__ void __launch_bounds__(kAttnThreads)
    attention_kernel(const float* qkv, int64_t ld, int k_col, int v_col, int q_heads, int kv_heads, int hd, int layer,
                     const SeqDesc* seqs, const QueryTile* tiles, O* out, int64_t out_ld) {
  extern __shared__ float smem[];
  const AttentionSmem m = attention_smem(smem, hd);
  const AttentionArgs a{qkv, ld, k_col, v_col, q_heads, kv_heads, hd, layer};
  const QueryTile tile = tiles[blockIdx.x];
  const int h = blockIdx.y, kv_head = h / (q_heads / kv_heads), tid = threadIdx.x;
  const SeqDesc s = seqs[tile.seq];
  const float scale = 1.0f / sqrtf(static_cast<float>(hd));
  attention_start(tid, a, s, tile, h, m);
  const int keys = tile_keys(s, tile);
  for (int k0 = 0; k0 < keys; k0 += kKeys) {
    const int nk = min(kKeys, keys - k0);
    __syncthreads();
    attention_load_keys(tid, a, s, kv_head, k0, nk, m);
    __syncthreads();
    attention_scores(tid, hd, s, tile, k0, nk, scale, m);
    __syncthreads();
    attention_softmax(tid, nk, m);
    __syncthreads();
    attention_accumulate(tid, hd, nk, m);
  }
  __syncthreads();
  for (int i = tid; i < tile.nq * hd; i += kAttnThreads)
    out[attention_out_index(i, hd, s, tile, h, out_ld)] = from_f32<O>(attention_result(i, hd, m));
}

// The first, plain version of the same computation (one score or output element per thread and step),
// kept as a second opinion: VDIFF_CUDA_ATTENTION=simple selects it, and the op-parity test checks both.
constexpr int kQueriesSimple = kAttentionQueries;

size_t attention_simple_smem(int hd) {
  return sizeof(float) * (static_cast<size_t>(kQueriesSimple) * hd * 2 + static_cast<size_t>(kKeys) * (hd + 1) +
                          static_cast<size_t>(kKeys) * hd + kQueriesSimple * kKeys + 4 * kQueriesSimple);
}

template <class O>
__global__ void __launch_bounds__(kAttnThreads)
    attention_simple_kernel(const float* qkv, int64_t ld, int k_col, int v_col, int q_heads, int kv_heads, int hd,
                            int layer, const SeqDesc* seqs, const QueryTile* tiles, O* out, int64_t out_ld) {
  extern __shared__ float smem[];
  float* Qs = smem;                               // [kQueriesSimple][hd]
  float* Os = Qs + kQueriesSimple * hd;           // [kQueriesSimple][hd]
  float* Ks = Os + kQueriesSimple * hd;           // [kKeys][hd + 1]
  float* Vs = Ks + kKeys * (hd + 1);              // [kKeys][hd]
  float* S = Vs + kKeys * hd;                     // [kQueriesSimple][kKeys]
  float* state_max = S + kQueriesSimple * kKeys;  // [kQueriesSimple] x 4
  float* state_sum = state_max + kQueriesSimple;
  float* scale_old = state_sum + kQueriesSimple;
  float* scale_new = scale_old + kQueriesSimple;

  const QueryTile tile = tiles[blockIdx.x];
  const int h = blockIdx.y, kv_head = h / (q_heads / kv_heads);
  const SeqDesc s = seqs[tile.seq];
  const int kv_dim = kv_heads * hd, L = tile_keys(s, tile), tid = threadIdx.x;
  const float scale = 1.0f / sqrtf(static_cast<float>(hd));

  for (int i = tid; i < kQueriesSimple * hd; i += blockDim.x) {
    const int q = i / hd, d = i % hd;
    Qs[i] = q < tile.nq ? qkv[static_cast<int64_t>(s.offset + tile.q0 + q) * ld + h * hd + d] : 0.0f;
    Os[i] = 0.0f;
  }
  if (tid < kQueriesSimple) state_max[tid] = -INFINITY, state_sum[tid] = 0.0f;

  const char* k_cache = s.reads_cache ? cache_table(s, layer, kv_dim, 0) : nullptr;
  const char* v_cache = s.reads_cache ? cache_table(s, layer, kv_dim, 1) : nullptr;
  for (int k0 = 0; k0 < L; k0 += kKeys) {
    const int nk = min(kKeys, L - k0);
    __syncthreads();
    for (int i = tid; i < kKeys * hd; i += blockDim.x) {
      const int j = i / hd, d = i % hd;
      float k = 0.0f, v = 0.0f;
      if (j < nk) {
        const int64_t p = k0 + j;
        if (!s.reads_cache) {
          const float* row = qkv + (s.offset + p) * ld;
          k = row[k_col + kv_head * hd + d];
          v = row[v_col + kv_head * hd + d];
        } else if (s.cache_bf16) {
          k = ops::bf16_to_f32(reinterpret_cast<const uint16_t*>(k_cache)[p * kv_dim + kv_head * hd + d]);
          v = ops::bf16_to_f32(reinterpret_cast<const uint16_t*>(v_cache)[p * kv_dim + kv_head * hd + d]);
        } else {
          k = reinterpret_cast<const float*>(k_cache)[p * kv_dim + kv_head * hd + d];
          v = reinterpret_cast<const float*>(v_cache)[p * kv_dim + kv_head * hd + d];
        }
      }
      Ks[j * (hd + 1) + d] = k;
      Vs[j * hd + d] = v;
    }
    __syncthreads();
    for (int i = tid; i < kQueriesSimple * kKeys; i += blockDim.x) {
      const int q = i / kKeys, j = i % kKeys;
      float dot = 0.0f;
      if (q < tile.nq && j < nk && k0 + j < seq_keys_of(s, s.begin + tile.q0 + q)) {
        for (int d = 0; d < hd; ++d) dot += Qs[q * hd + d] * Ks[j * (hd + 1) + d];
        S[i] = dot * scale;
      } else {
        S[i] = -INFINITY;
      }
    }
    __syncthreads();
    if (tid < kQueriesSimple) {
      float m = -INFINITY;
      for (int j = 0; j < nk; ++j) m = fmaxf(m, S[tid * kKeys + j]);
      float sum = 0.0f;
      for (int j = 0; j < kKeys; ++j) {
        // A block-causal query may attend none of this tile's keys (m = -inf): then they all weigh 0.
        const float p = (j < nk && m > -INFINITY) ? expf(S[tid * kKeys + j] - m) : 0.0f;
        S[tid * kKeys + j] = p;
        sum += p;
      }
      ops::SoftmaxState a{state_max[tid], state_sum[tid]};
      float sa, sb;
      ops::softmax_merge(a, ops::SoftmaxState{m, sum}, sa, sb);
      state_max[tid] = a.max, state_sum[tid] = a.sum, scale_old[tid] = sa, scale_new[tid] = sb;
    }
    __syncthreads();
    for (int i = tid; i < kQueriesSimple * hd; i += blockDim.x) {
      const int q = i / hd, d = i % hd;
      float acc = 0.0f;
      for (int j = 0; j < nk; ++j) acc += S[q * kKeys + j] * Vs[j * hd + d];
      Os[i] = Os[i] * scale_old[q] + acc * scale_new[q];
    }
  }
  __syncthreads();
  for (int i = tid; i < tile.nq * hd; i += blockDim.x) {
    const int q = i / hd, d = i % hd;
    out[static_cast<int64_t>(s.offset + tile.q0 + q) * out_ld + h * hd + d] = from_f32<O>(Os[i] / state_sum[q]);
  }
}

// ---- the vocabulary reduction ---------------------------------------------------------------------------

constexpr int kReduceThreads = 512;

// The top logprobs of a task's row under the softmax of its final logits (max, sum): rounds of a max over
// the drawable tokens ranked after the previous pick.
__device__ void top_logprobs(const TaskDesc& t, const float* cond, const float* uncond, int row_size, double max,
                             double sum, TaskResult& r) {
  const int tid = threadIdx.x;
  ops::ArgBest previous = ops::arg_none();
  for (int k = 0; k < t.top_logprobs && k < kMaxTop; ++k) {
    ops::ArgBest pick = ops::arg_none();
    for (int i = tid; i < row_size; i += blockDim.x) ops::top_candidate(pick, t, cond, uncond, i, previous);
    pick = block_arg_max(pick);
    if (pick.index < 0) break;
    if (tid == 0) {
      r.top_token[k] = pick.index;
      r.top_logprob[k] =
          static_cast<float>(ops::log_probability(ops::final_logit(t, cond, uncond, pick.index), max, sum));
      r.n_top = k + 1;
    }
    previous = pick;
  }
}

// A Dream row (ops.h: the DreamPass of every thread merged in thread order in shared memory; then the sum,
// and the entropy's sum when its algorithm asks), and the log-probabilities from the row's own softmax.
__device__ void dream_row(const TaskDesc& t, const float* cond, const float* uncond, int row_size, TaskResult& r) {
  __shared__ ops::DreamPass passes[kReduceThreads];
  const int tid = threadIdx.x;
  ops::DreamPass mine = ops::dream_pass_start();
  double raw_max = -static_cast<double>(INFINITY);
  for (int i = tid; i < row_size; i += blockDim.x) {
    ops::dream_pass_add(mine, t, cond, uncond, i);
    raw_max = ops::max_no_nan(raw_max, static_cast<double>(ops::final_logit(t, cond, uncond, i)));
  }
  passes[tid] = mine;
  __syncthreads();
  if (tid == 0) {
    ops::DreamPass all = passes[0];
    for (int i = 1; i < static_cast<int>(blockDim.x); ++i) all = ops::dream_pass_merge(all, passes[i]);
    passes[0] = all;
  }
  __syncthreads();
  const ops::DreamPass pass = passes[0];
  raw_max = block_reduce(raw_max, MaxNoNaN{}, -static_cast<double>(INFINITY));
  const bool usable = ops::dream_usable(pass);
  double sum = 0.0, raw_sum = 0.0;
  for (int i = tid; i < row_size; i += blockDim.x) {
    if (usable) sum += ops::dream_sum_term(t, cond, uncond, i, pass.z1);
    raw_sum += ops::row_sum_term(t, cond, uncond, i, raw_max);
  }
  sum = block_reduce(sum, Sum{}, 0.0);
  raw_sum = block_reduce(raw_sum, Sum{}, 0.0);
  double negative_entropy = 0.0;
  if (usable && t.dream == ops::kDreamEntropy) {
    for (int i = tid; i < row_size; i += blockDim.x)
      negative_entropy += ops::dream_entropy_term(t, cond, uncond, i, pass.z1, sum);
    negative_entropy = block_reduce(negative_entropy, Sum{}, 0.0);
  }
  if (tid == 0) {
    ops::dream_finish(t, cond, uncond, pass, sum, negative_entropy, r);
    r.target_logprob =
        t.target >= 0 ? ops::log_probability(ops::final_logit(t, cond, uncond, t.target), raw_max, raw_sum) : 0.0;
  }
  top_logprobs(t, cond, uncond, row_size, raw_max, raw_sum, r);
}

__global__ void __launch_bounds__(kReduceThreads)
    reduce_rows_kernel(const float* logits, int row_size, const TaskDesc* tasks, TaskResult* results) {
  const TaskDesc t = tasks[blockIdx.x];
  const float* cond = logits + static_cast<int64_t>(t.cond) * row_size;
  const float* uncond = t.uncond >= 0 ? logits + static_cast<int64_t>(t.uncond) * row_size : nullptr;
  const int tid = threadIdx.x;
  TaskResult* r = results + blockIdx.x;
  int bad = 0;
  for (int i = tid; i < row_size; i += blockDim.x) bad |= !ops::raw_finite(cond, uncond, i);
  const int finite = __syncthreads_or(bad) == 0;
  if (t.dream) {
    dream_row(t, cond, uncond, row_size, *r);
    if (tid == 0) r->finite = finite;
    return;
  }

  // Pass 1: the row's max (for the softmax) and the drawn token.
  ops::RowPass pass = ops::row_pass_start();
  for (int i = tid; i < row_size; i += blockDim.x) ops::row_pass_add(pass, t, cond, uncond, i);
  pass.max = block_reduce(pass.max, MaxNoNaN{}, -static_cast<double>(INFINITY));
  pass.best = block_arg_max(pass.best);

  // Pass 2: the sum of exp(l - max) in float64.
  double sum = 0.0;
  for (int i = tid; i < row_size; i += blockDim.x) sum += ops::row_sum_term(t, cond, uncond, i, pass.max);
  sum = block_reduce(sum, Sum{}, 0.0);

  if (tid == 0) ops::row_finish(t, cond, uncond, pass, sum, *r);
  top_logprobs(t, cond, uncond, row_size, pass.max, sum, *r);
  if (tid == 0) r->finite = finite;
}

// ---- the tiled GEMM (fallback) -----------------------------------------------------------------------------

constexpr int kTile = 64, kTileK = 16, kGemmThreads = 256;

template <class E>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_tiled_kernel(const E* A, int64_t lda, const E* W, int64_t ldw, int M, int N, int K, float* C, int64_t ldc,
                      bool accumulate) {
  __shared__ float As[kTileK][kTile + 4];
  __shared__ float Ws[kTileK][kTile + 4];
  const int m0 = blockIdx.y * kTile, n0 = blockIdx.x * kTile, tid = threadIdx.x;
  const int tm = (tid / 16) * 4, tn = (tid % 16) * 4;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kTileK) {
    for (int i = tid; i < kTile * kTileK; i += kGemmThreads) {
      const int r = i / kTileK, k = i % kTileK;
      As[k][r] = (m0 + r < M && k0 + k < K) ? load_f32(A, (m0 + r) * lda + k0 + k) : 0.0f;
      Ws[k][r] = (n0 + r < N && k0 + k < K) ? load_f32(W, (n0 + r) * ldw + k0 + k) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float a[4], w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[k][tm + i], w[i] = Ws[k][tn + i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * w[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = m0 + tm + i, n = n0 + tn + j;
      if (m < M && n < N) {
        float* c = C + m * ldc + n;
        *c = accumulate ? *c + acc[i][j] : acc[i][j];
      }
    }
}

template <class E>
__global__ void to_f32_kernel(const E* src, int64_t n, float* dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = load_f32(src, i);
}

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

namespace {
AttentionVariant g_attention = [] {
  const char* v = std::getenv("VDIFF_CUDA_ATTENTION");
  return v && std::string(v) == "simple" ? AttentionVariant::Simple : AttentionVariant::Blocked;
}();
}  // namespace

AttentionVariant attention_variant() { return g_attention; }
void set_attention_variant(AttentionVariant v) { g_attention = v; }

// ---- launchers -----------------------------------------------------------------------------------------

void launch_embed(const int32_t* tokens, int T, const void* table, Elem type, int D, float* x, cudaStream_t stream) {
  if (T == 0) return;
  switch (type) {
    case Elem::F32: embed_kernel<<<T, 256, 0, stream>>>(tokens, static_cast<const float*>(table), D, x); break;
    case Elem::BF16: embed_kernel<<<T, 256, 0, stream>>>(tokens, static_cast<const __nv_bfloat16*>(table), D, x); break;
    case Elem::F16: embed_kernel<<<T, 256, 0, stream>>>(tokens, static_cast<const __half*>(table), D, x); break;
  }
  VDIFF_CUDA_LAUNCHED("embed");
}

void launch_rmsnorm(const float* x, const int32_t* src, int rows, int D, const float* w, float eps, void* y,
                    Elem y_type, cudaStream_t stream) {
  if (rows == 0) return;
  const int threads = D >= 2048 ? 512 : 256;
  switch (y_type) {
    case Elem::F32: rmsnorm_kernel<<<rows, threads, 0, stream>>>(x, src, D, w, eps, static_cast<float*>(y)); break;
    case Elem::BF16:
      rmsnorm_kernel<<<rows, threads, 0, stream>>>(x, src, D, w, eps, static_cast<__nv_bfloat16*>(y));
      break;
    case Elem::F16: rmsnorm_kernel<<<rows, threads, 0, stream>>>(x, src, D, w, eps, static_cast<__half*>(y)); break;
  }
  VDIFF_CUDA_LAUNCHED("rmsnorm");
}

void launch_rope(float* qkv, int T, int64_t ld, int q_heads, int kv_heads, int hd, int rot, int k_col,
                 const int32_t* positions, const float* cos, const float* sin, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(T) * (q_heads + kv_heads) * (rot / 2);
  if (n == 0) return;
  rope_kernel<<<grid_for(n, 256), 256, 0, stream>>>(qkv, T, ld, q_heads, q_heads + kv_heads, hd, rot, k_col, positions,
                                                    cos, sin);
  VDIFF_CUDA_LAUNCHED("rope");
}

void launch_head_rmsnorm(float* qkv, int T, int64_t ld, int q_heads, int kv_heads, int hd, int k_col,
                         const float* q_norm, const float* k_norm, float eps, cudaStream_t stream) {
  const int64_t threads = static_cast<int64_t>(T) * (q_heads + kv_heads) * kWarp;
  if (threads == 0) return;
  head_rmsnorm_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
      qkv, T, ld, q_heads, q_heads + kv_heads, hd, k_col, q_norm, k_norm, eps);
  VDIFF_CUDA_LAUNCHED("head_rmsnorm");
}

void launch_gather_rows(const void* x, Elem type, int D, const int32_t* src, int R, void* rows, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(R) * D;
  if (n == 0) return;
  const int grid = grid_for(n, 256);
  switch (type) {
    case Elem::F32:
      gather_rows_kernel<<<grid, 256, 0, stream>>>(static_cast<const float*>(x), D, src, R, static_cast<float*>(rows));
      break;
    case Elem::BF16:
      gather_rows_kernel<<<grid, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), D, src, R,
                                                   static_cast<__nv_bfloat16*>(rows));
      break;
    case Elem::F16:
      gather_rows_kernel<<<grid, 256, 0, stream>>>(static_cast<const __half*>(x), D, src, R,
                                                   static_cast<__half*>(rows));
      break;
  }
  VDIFF_CUDA_LAUNCHED("gather_rows");
}

void launch_moe_combine(const float* out, const int32_t* sorted_row, const float* weight, int T, int k, int D, float* y,
                        cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(T) * D;
  if (n == 0) return;
  moe_combine_kernel<<<grid_for(n, 256), 256, 0, stream>>>(out, sorted_row, weight, T, k, D, y);
  VDIFF_CUDA_LAUNCHED("moe_combine");
}

void launch_add(float* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  add_kernel<<<grid_for(n, 256), 256, 0, stream>>>(x, y, n);
  VDIFF_CUDA_LAUNCHED("add");
}

__global__ void add_bias_kernel(float* y, int T, int64_t ld, const float* bias, int n) {
  const int64_t count = static_cast<int64_t>(T) * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / n;
    const int j = static_cast<int>(i % n);
    y[t * ld + j] += bias[j];
  }
}

void launch_add_bias(float* y, int T, int64_t ld, const float* bias, int n, cudaStream_t stream) {
  const int64_t count = static_cast<int64_t>(T) * n;
  if (count == 0) return;
  add_bias_kernel<<<grid_for(count, 256), 256, 0, stream>>>(y, T, ld, bias, n);
  VDIFF_CUDA_LAUNCHED("add_bias");
}

void launch_store_kv(const float* qkv, int T, int64_t ld, int k_col, int v_col, int kv_dim, int layer,
                     const int32_t* token_seq, const SeqDesc* seqs, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(T) * kv_dim;
  if (n == 0) return;
  store_kv_kernel<<<grid_for(n, 256), 256, 0, stream>>>(qkv, T, ld, k_col, v_col, kv_dim, layer, token_seq, seqs);
  VDIFF_CUDA_LAUNCHED("store_kv");
}

template <class O>
static void attention_typed(const float* qkv, int64_t ld, int k_col, int v_col, int q_heads, int kv_heads, int hd,
                            int layer, const SeqDesc* seqs, const QueryTile* tiles, int n_tiles, O* out, int64_t out_ld,
                            cudaStream_t stream) {
  const bool simple = attention_variant() == AttentionVariant::Simple;
  const auto kernel = simple ? attention_simple_kernel<O> : attention_kernel<O>;
  const size_t smem = simple ? attention_simple_smem(hd) : attention_smem_bytes(hd);
  static size_t raised[2] = {0, 0};  // per instantiation and variant: the dynamic shared memory limit set so far
  if (smem > 48 * 1024 && smem > raised[simple]) {
    VDIFF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    raised[simple] = smem;
  }
  kernel<<<dim3(n_tiles, q_heads), kAttnThreads, smem, stream>>>(qkv, ld, k_col, v_col, q_heads, kv_heads, hd, layer,
                                                                 seqs, tiles, out, out_ld);
  VDIFF_CUDA_LAUNCHED("attention");
}

void launch_attention(const float* qkv, int64_t ld, int k_col, int v_col, int q_heads, int kv_heads, int hd, int layer,
                      const SeqDesc* seqs, const QueryTile* tiles, int n_tiles, void* out, Elem out_type,
                      int64_t out_ld, cudaStream_t stream) {
  if (n_tiles == 0) return;
  switch (out_type) {
    case Elem::F32:
      attention_typed(qkv, ld, k_col, v_col, q_heads, kv_heads, hd, layer, seqs, tiles, n_tiles,
                      static_cast<float*>(out), out_ld, stream);
      break;
    case Elem::BF16:
      attention_typed(qkv, ld, k_col, v_col, q_heads, kv_heads, hd, layer, seqs, tiles, n_tiles,
                      static_cast<__nv_bfloat16*>(out), out_ld, stream);
      break;
    case Elem::F16:
      attention_typed(qkv, ld, k_col, v_col, q_heads, kv_heads, hd, layer, seqs, tiles, n_tiles,
                      static_cast<__half*>(out), out_ld, stream);
      break;
  }
}

void launch_swiglu(const float* gu, int T, int H, void* out, Elem out_type, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(T) * H;
  if (n == 0) return;
  const int grid = grid_for(n, 256);
  switch (out_type) {
    case Elem::F32: swiglu_kernel<<<grid, 256, 0, stream>>>(gu, T, H, static_cast<float*>(out)); break;
    case Elem::BF16: swiglu_kernel<<<grid, 256, 0, stream>>>(gu, T, H, static_cast<__nv_bfloat16*>(out)); break;
    case Elem::F16: swiglu_kernel<<<grid, 256, 0, stream>>>(gu, T, H, static_cast<__half*>(out)); break;
  }
  VDIFF_CUDA_LAUNCHED("swiglu");
}

void launch_reduce_rows(const float* logits, int row_size, const TaskDesc* tasks, int n_tasks, TaskResult* results,
                        cudaStream_t stream) {
  if (n_tasks == 0) return;
  reduce_rows_kernel<<<n_tasks, kReduceThreads, 0, stream>>>(logits, row_size, tasks, results);
  VDIFF_CUDA_LAUNCHED("reduce_rows");
}

void launch_gemm_tiled(const void* A, int64_t lda, const void* W, int64_t ldw, Elem type, int M, int N, int K, float* C,
                       int64_t ldc, bool accumulate, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile);
  switch (type) {
    case Elem::F32:
      gemm_tiled_kernel<<<grid, kGemmThreads, 0, stream>>>(
          static_cast<const float*>(A), lda, static_cast<const float*>(W), ldw, M, N, K, C, ldc, accumulate);
      break;
    case Elem::BF16:
      gemm_tiled_kernel<<<grid, kGemmThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(A), lda,
                                                           static_cast<const __nv_bfloat16*>(W), ldw, M, N, K, C, ldc,
                                                           accumulate);
      break;
    case Elem::F16:
      gemm_tiled_kernel<<<grid, kGemmThreads, 0, stream>>>(
          static_cast<const __half*>(A), lda, static_cast<const __half*>(W), ldw, M, N, K, C, ldc, accumulate);
      break;
  }
  VDIFF_CUDA_LAUNCHED("gemm_tiled");
}

void launch_to_f32(const void* src, Elem type, int64_t n, float* dst, cudaStream_t stream) {
  if (n == 0) return;
  const int grid = grid_for(n, 256);
  switch (type) {
    case Elem::F32: to_f32_kernel<<<grid, 256, 0, stream>>>(static_cast<const float*>(src), n, dst); break;
    case Elem::BF16: to_f32_kernel<<<grid, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(src), n, dst); break;
    case Elem::F16: to_f32_kernel<<<grid, 256, 0, stream>>>(static_cast<const __half*>(src), n, dst); break;
  }
  VDIFF_CUDA_LAUNCHED("to_f32");
}

}  // namespace vdiff::cuda
