// The attention kernel's work for one block — one tile of queries of one sequence, one head — as phases of
// VDIFF_HD functions over the block's shared memory, each taking the thread index. The kernel (kernels.cu)
// runs every phase on its 128 threads with a barrier after each; vdiff-cuda-tests runs the same phases on
// the CPU, thread after thread, so the kernel's indexing is checked without a GPU. Plain C++ when not
// compiled by nvcc.
//
// Keys and values stream through shared memory in tiles of kAttentionKeys; each query keeps an online
// softmax (ops::softmax_merge of each key tile's partial state). Register-blocked: a thread computes
// 2 queries x 4 keys of a score tile and 4 queries x 8 dimensions (per 128) of the output. f32 throughout,
// like the CPU backend.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cuda/ops.h"

#if defined(__CUDACC__)
#define VDIFF_UNROLL _Pragma("unroll")
#else
#define VDIFF_UNROLL
#endif

namespace vdiff::cuda {

// One sequence of a forward, as the attention and cache kernels see it.
struct SeqDesc {
  int offset;       // first computed token among the T computed tokens
  int begin, end;   // computed range of the canvas
  int length;       // canvas length (keys attended to)
  int reads_cache;  // 1: keys and values of all `length` positions come from the cache
  int cache_bf16;   // the cache's element type (1: bf16, 0: f32)
  char* cache;      // [layer][keys | values][position][kv_dim], or nullptr
  int block;        // 0: bidirectional; B > 0: block-causal (BatchPlan::Seq::block)
};

// A tile of queries of one sequence for the attention kernel.
struct QueryTile {
  int seq;
  int q0;  // first query, relative to the sequence's computed range
  int nq;  // 1 .. kAttentionQueries
};

constexpr int kAttentionQueries = 32, kAttentionKeys = 32, kAttentionThreads = 128;

// The keys the query at canvas position i attends: all `length` of them, or block-causal those before the
// end of its block (BatchPlan::Seq::keys_of).
VDIFF_HD int seq_keys_of(const SeqDesc& s, int i) {
  if (s.block <= 0) return s.length;
  const int end = (i / s.block + 1) * s.block;
  return end < s.length ? end : s.length;
}

// The keys a tile's queries attend at most (its last query's): the key tiles its block loads. Block-causal
// without a cache the computed range may stop short of `length`, and no key past it is ever loaded.
VDIFF_HD int tile_keys(const SeqDesc& s, const QueryTile& t) { return seq_keys_of(s, s.begin + t.q0 + t.nq - 1); }

// Start of one layer's keys (which 0) or values (which 1) in a sequence's cache.
VDIFF_HD char* cache_table(const SeqDesc& s, int layer, int kv_dim, int which) {
  const size_t table_bytes = static_cast<size_t>(s.length) * kv_dim * (s.cache_bf16 ? 2 : 4);
  return s.cache + (2 * static_cast<size_t>(layer) + which) * table_bytes;
}

// The store kernel's element idx (token idx / kv_dim, column idx % kv_dim): a computed token's fresh key
// and value into its sequence's cache, at its canvas position.
VDIFF_HD void store_kv_element(const float* qkv, int64_t ld, int k_col, int v_col, int kv_dim, int layer,
                               const int32_t* token_seq, const SeqDesc* seqs, int64_t idx) {
  const int t = static_cast<int>(idx / kv_dim), j = static_cast<int>(idx % kv_dim);
  const SeqDesc s = seqs[token_seq[t]];
  if (!s.cache) return;
  const int64_t at = static_cast<int64_t>(s.begin + t - s.offset) * kv_dim + j;
  const float k = qkv[t * ld + k_col + j], v = qkv[t * ld + v_col + j];
  if (s.cache_bf16) {
    reinterpret_cast<uint16_t*>(cache_table(s, layer, kv_dim, 0))[at] = ops::f32_to_bf16(k);
    reinterpret_cast<uint16_t*>(cache_table(s, layer, kv_dim, 1))[at] = ops::f32_to_bf16(v);
  } else {
    reinterpret_cast<float*>(cache_table(s, layer, kv_dim, 0))[at] = k;
    reinterpret_cast<float*>(cache_table(s, layer, kv_dim, 1))[at] = v;
  }
}

struct AttentionArgs {
  const float* qkv;  // [T][ld]: q heads at column 0, keys at k_col, values at v_col
  int64_t ld;
  int k_col, v_col, q_heads, kv_heads, hd, layer;
};

// The block's shared memory, carved from one float array of attention_smem_floats(hd).
struct AttentionSmem {
  float* Qs;         // [queries][hd + 1]
  float* Os;         // [queries][hd]
  float* Ks;         // [keys][hd + 1]
  float* Vs;         // [keys][hd]
  float* S;          // [queries][keys + 1]
  float* state_max;  // [queries] x 4
  float* state_sum;
  float* scale_old;
  float* scale_new;
};

VDIFF_HD size_t attention_smem_floats(int hd) {
  return static_cast<size_t>(kAttentionQueries) * (hd + 1) + static_cast<size_t>(kAttentionQueries) * hd +
         static_cast<size_t>(kAttentionKeys) * (hd + 1) + static_cast<size_t>(kAttentionKeys) * hd +
         kAttentionQueries * (kAttentionKeys + 1) + 4 * kAttentionQueries;
}

VDIFF_HD AttentionSmem attention_smem(float* base, int hd) {
  AttentionSmem m;
  m.Qs = base;
  m.Os = m.Qs + kAttentionQueries * (hd + 1);
  m.Ks = m.Os + kAttentionQueries * hd;
  m.Vs = m.Ks + kAttentionKeys * (hd + 1);
  m.S = m.Vs + kAttentionKeys * hd;
  m.state_max = m.S + kAttentionQueries * (kAttentionKeys + 1);
  m.state_sum = m.state_max + kAttentionQueries;
  m.scale_old = m.state_sum + kAttentionQueries;
  m.scale_new = m.scale_old + kAttentionQueries;
  return m;
}

// Phase 0: the tile's queries (zero past nq), a zero output, empty softmax states.
VDIFF_HD void attention_start(int tid, const AttentionArgs& a, const SeqDesc& s, const QueryTile& tile, int h,
                              const AttentionSmem& m) {
  const int hd = a.hd;
  for (int i = tid; i < kAttentionQueries * hd; i += kAttentionThreads) {
    const int q = i / hd, d = i % hd;
    m.Qs[q * (hd + 1) + d] =
        q < tile.nq ? a.qkv[static_cast<int64_t>(s.offset + tile.q0 + q) * a.ld + h * hd + d] : 0.0f;
    m.Os[i] = 0.0f;
  }
  if (tid < kAttentionQueries) m.state_max[tid] = -INFINITY, m.state_sum[tid] = 0.0f;
}

// Four floats / four bf16 read as one 16- / 8-byte access (the device's vector loads; memcpy on the host).
struct alignas(16) Float4 {
  float x, y, z, w;
};
struct alignas(8) Bf16x4 {
  uint16_t x, y, z, w;
};
VDIFF_HD Float4 load_float4(const float* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Float4*>(p);
#else
  Float4 r;
  memcpy(&r, p, sizeof r);
  return r;
#endif
}
VDIFF_HD Float4 load_bf16x4(const uint16_t* p) {
#if defined(__CUDA_ARCH__)
  const Bf16x4 h = *reinterpret_cast<const Bf16x4*>(p);
#else
  Bf16x4 h;
  memcpy(&h, p, sizeof h);
#endif
  return Float4{ops::bf16_to_f32(h.x), ops::bf16_to_f32(h.y), ops::bf16_to_f32(h.z), ops::bf16_to_f32(h.w)};
}

// Whether keys and values can be read four at a time (every row and column offset a multiple of 4
// elements; the buffers themselves are cudaMalloc'd, so aligned).
VDIFF_HD bool attention_vector_loads(const AttentionArgs& a) {
  return a.hd % 4 == 0 && a.ld % 4 == 0 && a.k_col % 4 == 0 && a.v_col % 4 == 0;
}

// Phase 1 of a key tile: keys and values k0 .. k0 + nk - 1 (fresh, or from the cache on a read), zero past nk.
// Vector path: every thread issues all its loads (up to 8 x 2 of 16 bytes) before its first store, so
// one memory latency covers the tile.
VDIFF_HD void attention_load_keys(int tid, const AttentionArgs& a, const SeqDesc& s, int kv_head, int k0, int nk,
                                  const AttentionSmem& m) {
  const int hd = a.hd, kv_dim = a.kv_heads * hd;
  const char* k_cache = s.reads_cache ? cache_table(s, a.layer, kv_dim, 0) : nullptr;
  const char* v_cache = s.reads_cache ? cache_table(s, a.layer, kv_dim, 1) : nullptr;
  if (attention_vector_loads(a)) {
    constexpr int kBatch = 8;
    const int hd4 = hd / 4, n4 = kAttentionKeys * hd4;
    for (int base = tid; base < n4; base += kAttentionThreads * kBatch) {
      Float4 k[kBatch], v[kBatch];
      VDIFF_UNROLL
      for (int b = 0; b < kBatch; ++b) {
        const int i = base + b * kAttentionThreads, j = i / hd4, d = (i % hd4) * 4;
        k[b] = v[b] = Float4{0.0f, 0.0f, 0.0f, 0.0f};
        if (i >= n4 || j >= nk) continue;
        const int64_t p = k0 + j;
        const int64_t at = p * kv_dim + kv_head * hd + d;
        if (!s.reads_cache) {
          const float* row = a.qkv + (s.offset + p) * a.ld;
          k[b] = load_float4(row + a.k_col + kv_head * hd + d);
          v[b] = load_float4(row + a.v_col + kv_head * hd + d);
        } else if (s.cache_bf16) {
          k[b] = load_bf16x4(reinterpret_cast<const uint16_t*>(k_cache) + at);
          v[b] = load_bf16x4(reinterpret_cast<const uint16_t*>(v_cache) + at);
        } else {
          k[b] = load_float4(reinterpret_cast<const float*>(k_cache) + at);
          v[b] = load_float4(reinterpret_cast<const float*>(v_cache) + at);
        }
      }
      VDIFF_UNROLL
      for (int b = 0; b < kBatch; ++b) {
        const int i = base + b * kAttentionThreads, j = i / hd4, d = (i % hd4) * 4;
        if (i >= n4) continue;
        float* kr = m.Ks + j * (hd + 1) + d;
        float* vr = m.Vs + j * hd + d;
        kr[0] = k[b].x, kr[1] = k[b].y, kr[2] = k[b].z, kr[3] = k[b].w;
        vr[0] = v[b].x, vr[1] = v[b].y, vr[2] = v[b].z, vr[3] = v[b].w;
      }
    }
    return;
  }
  for (int i = tid; i < kAttentionKeys * hd; i += kAttentionThreads) {
    const int j = i / hd, d = i % hd;
    float k = 0.0f, v = 0.0f;
    if (j < nk) {
      const int64_t p = k0 + j;
      const int64_t at = p * kv_dim + kv_head * hd + d;
      if (!s.reads_cache) {
        const float* row = a.qkv + (s.offset + p) * a.ld;
        k = row[a.k_col + kv_head * hd + d];
        v = row[a.v_col + kv_head * hd + d];
      } else if (s.cache_bf16) {
        k = ops::bf16_to_f32(reinterpret_cast<const uint16_t*>(k_cache)[at]);
        v = ops::bf16_to_f32(reinterpret_cast<const uint16_t*>(v_cache)[at]);
      } else {
        k = reinterpret_cast<const float*>(k_cache)[at];
        v = reinterpret_cast<const float*>(v_cache)[at];
      }
    }
    m.Ks[j * (hd + 1) + d] = k;
    m.Vs[j * hd + d] = v;
  }
}

// Phase 2: scaled scores of 2 queries x 4 keys of the key tile at k0 (-inf past nq or nk, and for keys
// the query does not attend).
VDIFF_HD void attention_scores(int tid, int hd, const SeqDesc& s, const QueryTile& tile, int k0, int nk, float scale,
                               const AttentionSmem& m) {
  const int q0 = (tid / 8) * 2, j0 = (tid % 8) * 4, nq = tile.nq;
  float acc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
  for (int d = 0; d < hd; ++d) {
    const float a0 = m.Qs[q0 * (hd + 1) + d], a1 = m.Qs[(q0 + 1) * (hd + 1) + d];
    VDIFF_UNROLL
    for (int kk = 0; kk < 4; ++kk) {
      const float k = m.Ks[(j0 + kk) * (hd + 1) + d];
      acc[0][kk] += a0 * k;
      acc[1][kk] += a1 * k;
    }
  }
  VDIFF_UNROLL
  for (int qq = 0; qq < 2; ++qq) {
    const int visible = seq_keys_of(s, s.begin + tile.q0 + q0 + qq) - k0;
    VDIFF_UNROLL
    for (int kk = 0; kk < 4; ++kk)
      m.S[(q0 + qq) * (kAttentionKeys + 1) + j0 + kk] =
          (q0 + qq < nq && j0 + kk < nk && j0 + kk < visible) ? acc[qq][kk] * scale : -INFINITY;
  }
}

// Phase 3 (threads < queries, one query each): the tile's probabilities exp(s - tile max) in place, and the
// factors that merge them into the running state.
VDIFF_HD void attention_softmax(int tid, int nk, const AttentionSmem& m) {
  if (tid >= kAttentionQueries) return;
  float* row = m.S + tid * (kAttentionKeys + 1);
  float mx = -INFINITY;
  for (int j = 0; j < nk; ++j) mx = row[j] > mx ? row[j] : mx;
  float sum = 0.0f;
  for (int j = 0; j < kAttentionKeys; ++j) {
    const float p = (j < nk && mx > -INFINITY) ? expf(row[j] - mx) : 0.0f;
    row[j] = p;
    sum += p;
  }
  ops::SoftmaxState state{m.state_max[tid], m.state_sum[tid]};
  float sa, sb;
  ops::softmax_merge(state, ops::SoftmaxState{mx, sum}, sa, sb);
  m.state_max[tid] = state.max, m.state_sum[tid] = state.sum, m.scale_old[tid] = sa, m.scale_new[tid] = sb;
}

// Phase 4: the output of 4 queries x 8 dimensions (per 128) rescaled and the tile's P · V added.
VDIFF_HD void attention_accumulate(int tid, int hd, int nk, const AttentionSmem& m) {
  const int q0 = (tid / 16) * 4, dd = tid % 16;
  for (int d0 = 0; d0 < hd; d0 += 128) {
    float acc[4][8] = {{0}};
    for (int j = 0; j < nk; ++j) {
      float p[4], v[8];
      VDIFF_UNROLL
      for (int qq = 0; qq < 4; ++qq) p[qq] = m.S[(q0 + qq) * (kAttentionKeys + 1) + j];
      VDIFF_UNROLL
      for (int i = 0; i < 8; ++i) {
        const int d = d0 + dd + 16 * i;
        v[i] = d < hd ? m.Vs[j * hd + d] : 0.0f;
      }
      VDIFF_UNROLL
      for (int qq = 0; qq < 4; ++qq) VDIFF_UNROLL
      for (int i = 0; i < 8; ++i) acc[qq][i] += p[qq] * v[i];
    }
    VDIFF_UNROLL
    for (int qq = 0; qq < 4; ++qq) VDIFF_UNROLL
    for (int i = 0; i < 8; ++i) {
      const int q = q0 + qq, d = d0 + dd + 16 * i;
      if (d < hd) m.Os[q * hd + d] = m.Os[q * hd + d] * m.scale_old[q] + acc[qq][i] * m.scale_new[q];
    }
  }
}

// Phase 5: output element i (i < nq * hd) of the tile: its value and where it goes in out[T][out_ld].
VDIFF_HD float attention_result(int i, int hd, const AttentionSmem& m) { return m.Os[i] / m.state_sum[i / hd]; }
VDIFF_HD int64_t attention_out_index(int i, int hd, const SeqDesc& s, const QueryTile& tile, int h, int64_t out_ld) {
  return static_cast<int64_t>(s.offset + tile.q0 + i / hd) * out_ld + h * hd + i % hd;
}

}  // namespace vdiff::cuda
