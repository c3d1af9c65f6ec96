// Host entry points to each kernel on its own (testing.h): copy in, launch on a private stream, copy out.
#include <algorithm>
#include <cstring>

#include "cuda/cublas_loader.h"
#include "cuda/cuda_backend.h"
#include "cuda/kernels.cuh"
#include "cuda/tasks.h"
#include "cuda/testing.h"

namespace vdiff::cuda::testing {

namespace {

// A device copy of host data (or an uninitialised buffer), freed with the object.
class Dev {
 public:
  explicit Dev(size_t bytes, const void* host = nullptr) {
    VDIFF_CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(bytes, 1)));
    if (host && bytes) VDIFF_CUDA_CHECK(cudaMemcpy(p_, host, bytes, cudaMemcpyHostToDevice));
  }
  ~Dev() { cudaFree(p_); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  template <class T = void>
  T* get() const {
    return static_cast<T*>(p_);
  }
  void to_host(void* host, size_t bytes) const {
    VDIFF_CUDA_CHECK(cudaMemcpy(host, p_, bytes, cudaMemcpyDeviceToHost));
  }

 private:
  void* p_ = nullptr;
};

Elem elem(Type t) { return static_cast<Elem>(static_cast<int>(t)); }

void finish() {
  VDIFF_CUDA_CHECK(cudaGetLastError());
  VDIFF_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace

bool available(std::string* reason) {
  if (device_count() > 0) return true;
  if (reason) *reason = unavailable_reason();
  return false;
}

void embed(const std::vector<int32_t>& tokens, const void* table, size_t table_bytes, Type type, int D, float* x) {
  Dev t(tokens.size() * 4, tokens.data()), w(table_bytes, table), out(tokens.size() * D * 4);
  launch_embed(t.get<int32_t>(), static_cast<int>(tokens.size()), w.get(), elem(type), D, out.get<float>(), 0);
  finish();
  out.to_host(x, tokens.size() * D * 4);
}

void rmsnorm(const float* x, int rows, int D, const float* w, float eps, float* y) {
  const size_t n = static_cast<size_t>(rows) * D * 4;
  Dev dx(n, x), dw(D * 4, w), dy(n);
  launch_rmsnorm(dx.get<float>(), nullptr, rows, D, dw.get<float>(), eps, dy.get(), Elem::F32, 0);
  finish();
  dy.to_host(y, n);
}

void rope(float* qk, int T, int q_heads, int kv_heads, int hd, int rot, const int32_t* positions, const float* cos,
          const float* sin, int n_positions) {
  const size_t n = static_cast<size_t>(T) * (q_heads + kv_heads) * hd * 4;
  const size_t table = static_cast<size_t>(n_positions) * (rot / 2) * 4;
  Dev dx(n, qk), dp(T * 4, positions), dc(table, cos), ds(table, sin);
  launch_rope(dx.get<float>(), T, (q_heads + kv_heads) * hd, q_heads, kv_heads, hd, rot, q_heads * hd,
              dp.get<int32_t>(), dc.get<float>(), ds.get<float>(), 0);
  finish();
  dx.to_host(qk, n);
}

void qk_norm(float* qk, int T, int q_heads, int kv_heads, int hd, const float* q_norm, const float* k_norm, float eps) {
  const size_t n = static_cast<size_t>(T) * (q_heads + kv_heads) * hd * 4;
  Dev dx(n, qk), dq(hd * 4, q_norm), dk(hd * 4, k_norm);
  launch_head_rmsnorm(dx.get<float>(), T, (q_heads + kv_heads) * hd, q_heads, kv_heads, hd, q_heads * hd,
                      dq.get<float>(), dk.get<float>(), eps, 0);
  finish();
  dx.to_host(qk, n);
}

void moe_rows(const float* x, int D, const std::vector<int32_t>& src, float* rows, const float* out,
              const std::vector<int32_t>& sorted_row, const std::vector<float>& weight, int T, int k, float* y) {
  const int R = static_cast<int>(src.size());
  int n_x = 0;
  for (int32_t r : src) n_x = std::max(n_x, r + 1);
  Dev dx(static_cast<size_t>(n_x) * D * 4, x), dsrc(src.size() * 4, src.data()), drows(static_cast<size_t>(R) * D * 4);
  launch_gather_rows(dx.get(), Elem::F32, D, dsrc.get<int32_t>(), R, drows.get(), 0);
  Dev dout(static_cast<size_t>(R) * D * 4, out), dsorted(sorted_row.size() * 4, sorted_row.data()),
      dweight(weight.size() * 4, weight.data()), dy(static_cast<size_t>(T) * D * 4);
  launch_moe_combine(dout.get<float>(), dsorted.get<int32_t>(), dweight.get<float>(), T, k, D, dy.get<float>(), 0);
  finish();
  drows.to_host(rows, static_cast<size_t>(R) * D * 4);
  dy.to_host(y, static_cast<size_t>(T) * D * 4);
}

void swiglu(const float* gate, const float* up, int T, int H, float* out) {
  std::vector<float> gu(static_cast<size_t>(T) * 2 * H);
  for (int t = 0; t < T; ++t) {
    std::memcpy(gu.data() + static_cast<size_t>(t) * 2 * H, gate + static_cast<size_t>(t) * H, H * 4);
    std::memcpy(gu.data() + static_cast<size_t>(t) * 2 * H + H, up + static_cast<size_t>(t) * H, H * 4);
  }
  Dev dgu(gu.size() * 4, gu.data()), dout(static_cast<size_t>(T) * H * 4);
  launch_swiglu(dgu.get<float>(), T, H, dout.get(), Elem::F32, 0);
  finish();
  dout.to_host(out, static_cast<size_t>(T) * H * 4);
}

void attention(const float* qkv, int T, int q_heads, int kv_heads, int hd, const std::vector<AttentionSeq>& seqs,
               float* out, bool simple) {
  const int q_dim = q_heads * hd, kv_dim = kv_heads * hd, ld = q_dim + 2 * kv_dim;
  Dev dqkv(static_cast<size_t>(T) * ld * 4, qkv), dout(static_cast<size_t>(T) * q_dim * 4);
  std::vector<std::unique_ptr<Dev>> caches;
  std::vector<SeqDesc> descs;
  std::vector<QueryTile> tiles;
  std::vector<int32_t> token_seq(T, 0);
  bool any_cache = false;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const AttentionSeq& a = seqs[s];
    char* cache = nullptr;
    if (a.cache) {
      const size_t bytes = static_cast<size_t>(2) * a.length * kv_dim * (a.cache_bf16 ? 2 : 4);
      caches.push_back(std::make_unique<Dev>(bytes, a.cache));
      cache = caches.back()->get<char>();
      any_cache = true;
    }
    const bool whole = a.begin == 0 && a.end == a.length;
    descs.push_back(
        SeqDesc{a.offset, a.begin, a.end, a.length, cache && !whole ? 1 : 0, a.cache_bf16 ? 1 : 0, cache, a.block});
    for (int i = 0; i < a.end - a.begin; ++i) token_seq[a.offset + i] = static_cast<int32_t>(s);
    for (int q0 = 0; q0 < a.end - a.begin; q0 += kAttentionQueries)
      tiles.push_back(QueryTile{static_cast<int>(s), q0, std::min(kAttentionQueries, a.end - a.begin - q0)});
  }
  Dev dseqs(descs.size() * sizeof(SeqDesc), descs.data()), dtiles(tiles.size() * sizeof(QueryTile), tiles.data());
  Dev dtoken_seq(T * 4, token_seq.data());
  if (any_cache)
    launch_store_kv(dqkv.get<float>(), T, ld, q_dim, q_dim + kv_dim, kv_dim, 0, dtoken_seq.get<int32_t>(),
                    dseqs.get<SeqDesc>(), 0);
  const AttentionVariant before = attention_variant();
  set_attention_variant(simple ? AttentionVariant::Simple : AttentionVariant::Blocked);
  launch_attention(dqkv.get<float>(), ld, q_dim, q_dim + kv_dim, q_heads, kv_heads, hd, 0, dseqs.get<SeqDesc>(),
                   dtiles.get<QueryTile>(), static_cast<int>(tiles.size()), dout.get(), Elem::F32, q_dim, 0);
  set_attention_variant(before);
  finish();
  dout.to_host(out, static_cast<size_t>(T) * q_dim * 4);
}

bool gemm(const void* A, const void* W, Type type, int M, int N, int K, float* C, bool accumulate, bool use_cublas,
          std::string* library) {
  const size_t e = type == Type::F32 ? 4 : 2;
  Dev dA(static_cast<size_t>(M) * K * e, A), dW(static_cast<size_t>(N) * K * e, W),
      dC(static_cast<size_t>(M) * N * 4, C);
  if (use_cublas) {
    const Cublas* cublas = load_cublas(nullptr);
    if (!cublas) return false;
    if (library) *library = cublas->library;
    Cublas::Handle handle = nullptr;
    if (cublas->create(&handle) != 0) return false;
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    const int t = type == Type::F32 ? Cublas::kR32F : type == Type::BF16 ? Cublas::kR16BF : Cublas::kR16F;
    const int status =
        cublas->gemm_ex(handle, Cublas::kOpT, Cublas::kOpN, N, M, K, &alpha, dW.get(), t, K, dA.get(), t, K, &beta,
                        dC.get(), Cublas::kR32F, N, Cublas::kCompute32F, Cublas::kComputeDefaultAlgo);
    cublas->destroy(handle);
    if (status != 0) throw Error(ErrorCode::Internal, "cublasGemmEx failed with status " + std::to_string(status));
  } else {
    launch_gemm_tiled(dA.get(), K, dW.get(), K, elem(type), M, N, K, dC.get<float>(), N, accumulate, 0);
  }
  finish();
  dC.to_host(C, static_cast<size_t>(M) * N * 4);
  return true;
}

void reduce_rows(const float* logits, int n_rows, int row_size, const std::vector<RowTask>& tasks, RowResult* out) {
  std::vector<TaskDesc> descs;
  for (const RowTask& t : tasks) {
    if (needs_host(t))
      throw Error(ErrorCode::InvalidArgument, "reduce_rows: top-k / top-p rows are sampled on the host");
    descs.push_back(task_desc(t, row_size));
  }
  Dev dl(static_cast<size_t>(n_rows) * row_size * 4, logits), dt(descs.size() * sizeof(TaskDesc), descs.data()),
      dr(descs.size() * sizeof(TaskResult));
  launch_reduce_rows(dl.get<float>(), row_size, dt.get<TaskDesc>(), static_cast<int>(descs.size()),
                     dr.get<TaskResult>(), 0);
  finish();
  std::vector<TaskResult> results(descs.size());
  dr.to_host(results.data(), results.size() * sizeof(TaskResult));
  for (size_t i = 0; i < results.size(); ++i) to_row_result(results[i], out[i]);
}

}  // namespace vdiff::cuda::testing
