// The CUDA backend: every family's forward on one GPU (the layer structure comes from ModelConfig and
// ModelWeights, as on the CPU). Weights live on the device in their stored dtype (q, k, v concatenated into
// one matrix per layer, gate and up into another, per expert too, so each is one GEMM); the residual stream
// and the GEMMs' outputs are f32, the GEMMs' inputs are in the weights' dtype, accumulation is f32.
//
// One forward over a batch (all sequences' computed tokens concatenated, T of them):
//   x = wte[tokens]
//   per layer:  xn = rmsnorm(x) · attn_norm        (in the GEMM input type)
//               qkv = xn · Wqkv^T (+ q/k/v biases) ; QK-norm per head ; RoPE on the first rotary_dim dims
//               fresh k, v into the KV caches
//               att = attention(q, keys, values)   (per sequence and head, bidirectional or block-causal;
//                                                   keys from the cache on a read)
//               x += att · Wo^T                    (the GEMM's beta = 1 is the residual add)
//               xn = rmsnorm(x) · ff_norm
//               dense:  gu = xn · [Wgate; Wup]^T ; h = silu(g) * u ; x += h · Wdown^T
//               MoE:    router logits in f32 -> the host routes and groups the tokens by expert (cpu/moe.h,
//                       the CPU backend's code) -> gather the routed rows sorted by expert -> per ACTIVE
//                       expert one GEMM over its run of rows (gate/up, then down) -> combine per token in
//                       slot order -> + shared expert -> x += y
//   logits = rmsnorm(x[requested rows]) · ln_f · head^T
// predict() then reduces every task's rows on the device (kernels.cu, reduce_rows) and copies back only
// RowResults. Matrix products go to cuBLAS when it loads (cublas_loader.h), else to the tiled kernel.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <vector>

#include "core/config.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "cpu/moe.h"
#include "cuda/cublas_loader.h"
#include "cuda/cuda_backend.h"
#include "cuda/kernels.cuh"
#include "cuda/ops.h"
#include "cuda/tasks.h"

namespace vdiff::cuda {

namespace {

Elem elem_of(DType t) {
  switch (t) {
    case DType::F32: return Elem::F32;
    case DType::BF16: return Elem::BF16;
    case DType::F16: return Elem::F16;
    default: break;
  }
  throw Error(ErrorCode::InvalidModel, std::string("unsupported weight dtype ") + dtype_name(t));
}

const char* elem_name(Elem e) { return e == Elem::F32 ? "f32" : e == Elem::BF16 ? "bf16" : "f16"; }

std::string mib(uint64_t bytes) { return std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB"; }

// A device allocation that only grows; contents are not kept across growth.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }
  void* ensure(size_t bytes, const char* what) {
    if (bytes <= size_) return data_;
    release();
    void* p = nullptr;
    const cudaError_t status = cudaMalloc(&p, bytes);
    if (status != cudaSuccess) {
      cudaGetLastError();
      throw Error(ErrorCode::OutOfMemory, std::string("CUDA: cannot allocate ") + mib(bytes) + " for " + what);
    }
    data_ = p;
    size_ = bytes;
    return data_;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t size() const { return size_; }
  void release() {
    if (data_) cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Keys and values of every layer as [layer][keys | values][position][kv_dim] in one device allocation.
class CudaKVCache final : public KVCache {
 public:
  explicit CudaKVCache(uint64_t bytes) {
    const cudaError_t status = cudaMalloc(&data_, bytes);
    if (status != cudaSuccess) {
      cudaGetLastError();
      data_ = nullptr;
      throw Error(ErrorCode::OutOfMemory, "CUDA: cannot allocate " + mib(bytes) + " for a KV cache");
    }
  }
  ~CudaKVCache() override {
    if (data_) cudaFree(data_);
  }
  char* data() const { return static_cast<char*>(data_); }

 private:
  void* data_ = nullptr;
};

// Optional per-operation device times (set_profiling): CUDA events recorded after each operation of a
// forward, read once the forward is done, summed per operation name over forwards until taken.
struct Profile {
  std::mutex mu;
  bool on = false;
  std::vector<std::pair<std::string, double>> totals;  // ms per operation, first-seen order
  int forwards = 0;
  void add(const std::string& name, double ms) {
    for (auto& t : totals)
      if (t.first == name) {
        t.second += ms;
        return;
      }
    totals.emplace_back(name, ms);
  }
};
Profile g_profile;

class Marks {
 public:
  Marks(cudaStream_t stream, bool on) : stream_(stream), on_(on) { mark("start"); }
  ~Marks() {
    for (auto& m : marks_) cudaEventDestroy(m.second);
  }
  void mark(const char* name) {
    if (!on_) return;
    cudaEvent_t e;
    if (cudaEventCreate(&e) != cudaSuccess) return;
    cudaEventRecord(e, stream_);
    marks_.emplace_back(name, e);
  }
  // After the stream reached the last mark: the time between consecutive marks, to the later one's name.
  void collect() {
    if (!on_ || marks_.size() < 2) return;
    cudaEventSynchronize(marks_.back().second);
    std::lock_guard<std::mutex> lock(g_profile.mu);
    for (size_t i = 1; i < marks_.size(); ++i) {
      float ms = 0;
      cudaEventElapsedTime(&ms, marks_[i - 1].second, marks_[i].second);
      g_profile.add(marks_[i].first, ms);
    }
    ++g_profile.forwards;
  }

 private:
  cudaStream_t stream_;
  bool on_;
  std::vector<std::pair<std::string, cudaEvent_t>> marks_;
};

// One SwiGLU MLP on the device: a dense layer's, an expert's or the shared expert's.
struct DeviceMlp {
  void* gate_up = nullptr;  // [2 hidden, D]
  void* down = nullptr;     // [D, hidden]
  int hidden = 0;
};

struct DeviceLayer {
  float* attn_norm = nullptr;
  float* ffn_norm = nullptr;
  void* qkv = nullptr;        // [q_dim + 2 kv_dim, D]
  float* qkv_bias = nullptr;  // [q_dim + 2 kv_dim] f32 (ModelConfig::qkv_bias), else none
  float* q_norm = nullptr;    // [hd] f32 (ModelConfig::qk_norm), else none
  float* k_norm = nullptr;
  void* o = nullptr;  // [D, q_dim]
  DeviceMlp mlp;      // a dense layer's
  // A mixture-of-experts layer: the router [n_experts, D] in f32 (the router product is f32), the expert
  // bias on the host (it only steers the choice, made there), the experts and the shared expert (hidden 0:
  // none).
  float* router = nullptr;
  std::vector<float> expert_bias;
  std::vector<DeviceMlp> experts;
  DeviceMlp shared;
  bool moe() const { return !experts.empty(); }
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(const ModelConfig& config, TensorSet tensors, const LoadOptions& options);
  ~CudaBackend() override;

  BackendInfo info() const override;
  std::string weight_dtype() const override { return elem_name(type_); }
  uint64_t parameter_count() const override { return parameter_count_; }
  uint64_t weight_bytes() const override { return weight_bytes_; }

  void predict(const std::vector<ForwardSeq>& batch, const std::vector<RowTask>& tasks, RowResult* out,
               const std::atomic<bool>* cancel) override;
  void forward(const std::vector<ForwardSeq>& batch, float* logits, const std::atomic<bool>* cancel) override;

 protected:
  std::unique_ptr<KVCache> allocate_kv_cache(int positions, uint64_t bytes) override;
  void copy_kv_tables(const KVCache& from, KVCache& to, int positions) override;

 private:
  void* upload(const WeightRef& w, Elem as, uint64_t& done, uint64_t total);
  void* upload_concat(std::initializer_list<const WeightRef*> parts, Elem as, uint64_t& done, uint64_t total);
  float* upload_f32(const WeightRef& w);                              // a norm, a router: any float tensor, as f32
  float* upload_bias(std::initializer_list<const WeightRef*> parts);  // concatenated, as f32
  DeviceMlp upload_mlp(const MlpWeights& m, uint64_t& done, uint64_t total);
  void* device_alloc(size_t bytes, const std::string& what);
  // Runs the forward; leaves the requested rows' logits in logits_ (rows x embedding_size f32).
  int run(const std::vector<ForwardSeq>& batch, const std::atomic<bool>* cancel, Marks& marks);
  // A MoE layer over the normed rows xn [T, D] (xn_f32: the same rows in f32, for the router), added to x.
  void moe(const DeviceLayer& w, int T, const void* xn, const float* xn_f32, float* x, Marks& marks);
  // x += mlp(xn): gate/up, SwiGLU, down, over T rows (accumulate: the down GEMM adds to out, else writes).
  void mlp(const DeviceMlp& m, int T, const void* xn, float* out, bool accumulate);
  // C[M, N] (+)= A[M, K] · W[N, K]^T with A and W of `type` (the weights' dtype unless given), f32 C.
  void gemm(const void* A, int M, int K, const void* W, int N, float* C, int64_t ldc, bool accumulate) {
    gemm(A, M, K, W, type_, N, C, ldc, accumulate);
  }
  void gemm(const void* A, int M, int K, const void* W, Elem type, int N, float* C, int64_t ldc, bool accumulate);
  void sync() { VDIFF_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  int device_ = 0;
  std::string device_name_;
  uint64_t memory_total_ = 0;
  cudaStream_t stream_ = nullptr;
  const Cublas* cublas_ = nullptr;
  Cublas::Handle cublas_handle_ = nullptr;
  std::string cublas_reason_;

  Elem type_ = Elem::F32;   // the projection weights' dtype: the GEMMs' input type
  bool quantized_ = false;  // a quantized checkpoint, dequantized to type_ (bf16) at upload
  Elem embed_type_ = Elem::F32;
  void* embed_ = nullptr;
  void* head_ = nullptr;
  float* final_norm_ = nullptr;
  std::vector<DeviceLayer> layers_;
  std::vector<void*> allocations_;
  float* rope_cos_ = nullptr;
  float* rope_sin_ = nullptr;
  uint64_t parameter_count_ = 0, weight_bytes_ = 0, device_weight_bytes_ = 0;

  // Per-forward state (forward is not reentrant).
  DeviceBuffer x_, xn_, qkv_, att_, gu_, h_, head_in_, logits_, meta_, tasks_, results_;
  void* host_meta_ = nullptr;  // pinned
  size_t host_meta_size_ = 0;
  // Mixture of experts: the f32 normed rows and the router logits [T, E]; the routed rows sorted by expert
  // (inputs [T k, D], gate/up [T k, 2 moe_hidden], hidden [T k, moe_hidden], outputs [T k, D]), the layer's
  // output y [T, D]; the grouping's metadata (device and pinned host); the routing on the host.
  DeviceBuffer xn_f32_, router_logits_, moe_in_, moe_gu_, moe_h_, moe_out_, moe_y_, moe_meta_;
  std::vector<float> host_router_logits_;
  void* host_moe_meta_ = nullptr;  // pinned
  size_t host_moe_meta_size_ = 0;
  cpu::RouterParams router_params_;
  cpu::Routing routing_;
  cpu::ExpertGroups groups_;
  void (*progress_)(void*, uint64_t, uint64_t) = nullptr;
  void* progress_context_ = nullptr;
};

void* CudaBackend::device_alloc(size_t bytes, const std::string& what) {
  void* p = nullptr;
  const cudaError_t status = cudaMalloc(&p, std::max<size_t>(bytes, 1));
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw Error(ErrorCode::OutOfMemory, "CUDA: cannot allocate " + mib(bytes) + " for " + what);
  }
  allocations_.push_back(p);
  return p;
}

// Host-side conversion of one weight to `as` (f32 -> bf16/f16 rounds to nearest even); a quantized one
// dequantized first (dequantize_row: its rotation undone).
void convert_host(const WeightRef& w, Elem as, std::vector<char>& out) {
  out.resize(static_cast<size_t>(w.rows) * w.cols * elem_size(as));
  std::vector<float> row(w.cols);
  for (int r = 0; r < w.rows; ++r) {
    dequantize_row(w, r, row.data());
    for (int c = 0; c < w.cols; ++c) {
      const int64_t i = static_cast<int64_t>(r) * w.cols + c;
      const float f = row[c];
      if (as == Elem::F32) {
        std::memcpy(out.data() + i * 4, &f, 4);
      } else if (as == Elem::BF16) {
        const uint16_t h = ops::f32_to_bf16(f);
        std::memcpy(out.data() + i * 2, &h, 2);
      } else {
        const __half h = __float2half_rn(f);
        std::memcpy(out.data() + i * 2, &h, 2);
      }
    }
  }
}

void* CudaBackend::upload_concat(std::initializer_list<const WeightRef*> parts, Elem as, uint64_t& done,
                                 uint64_t total) {
  size_t bytes = 0;
  for (const WeightRef* w : parts) bytes += static_cast<size_t>(w->rows) * w->cols * elem_size(as);
  char* const base = static_cast<char*>(device_alloc(bytes, (*parts.begin())->name));
  device_weight_bytes_ += bytes;
  char* dst = base;
  std::vector<char> converted;
  for (const WeightRef* w : parts) {
    const size_t n = static_cast<size_t>(w->rows) * w->cols * elem_size(as);
    const void* src = w->data;
    if (w->quant != Quant::None || elem_of(w->dtype) != as) {
      convert_host(*w, as, converted);
      src = converted.data();
    }
    // In pieces of 256 MiB, so that progress moves within a large tensor too.
    constexpr size_t kPiece = size_t{256} << 20;
    for (size_t at = 0; at < n; at += kPiece) {
      const size_t len = std::min(kPiece, n - at);
      VDIFF_CUDA_CHECK(cudaMemcpy(dst + at, static_cast<const char*>(src) + at, len, cudaMemcpyHostToDevice));
      done +=
          static_cast<uint64_t>(static_cast<double>(len) / static_cast<double>(n) * static_cast<double>(w->bytes()));
      if (progress_) progress_(progress_context_, std::min(done, total), total);
    }
    dst += n;
  }
  return base;
}

void* CudaBackend::upload(const WeightRef& w, Elem as, uint64_t& done, uint64_t total) {
  return upload_concat({&w}, as, done, total);
}

float* CudaBackend::upload_f32(const WeightRef& w) {
  std::vector<float> host(static_cast<size_t>(w.rows) * w.cols);
  for (size_t i = 0; i < host.size(); ++i) host[i] = weight_element(w, static_cast<int64_t>(i));
  float* d = static_cast<float*>(device_alloc(host.size() * 4, w.name));
  VDIFF_CUDA_CHECK(cudaMemcpy(d, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
  device_weight_bytes_ += host.size() * 4;
  return d;
}

DeviceMlp CudaBackend::upload_mlp(const MlpWeights& m, uint64_t& done, uint64_t total) {
  DeviceMlp d;
  d.gate_up = upload_concat({&m.gate, &m.up}, type_, done, total);
  d.down = upload(m.down, type_, done, total);
  d.hidden = m.gate.rows;
  return d;
}

float* CudaBackend::upload_bias(std::initializer_list<const WeightRef*> parts) {
  std::vector<float> host;
  for (const WeightRef* w : parts)
    for (int64_t i = 0; i < static_cast<int64_t>(w->rows) * w->cols; ++i) host.push_back(weight_element(*w, i));
  float* d = static_cast<float*>(device_alloc(host.size() * 4, "q/k/v biases"));
  VDIFF_CUDA_CHECK(cudaMemcpy(d, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
  device_weight_bytes_ += host.size() * 4;
  return d;
}

CudaBackend::CudaBackend(const ModelConfig& config, TensorSet tensors, const LoadOptions& options)
    : Backend(config, options), progress_(options.progress), progress_context_(options.progress_context) {
  const ModelWeights w = find_weights(tensors, config, family_of(config));
  unused_tensors_ = w.unused;
  parameter_count_ = w.parameter_count;
  weight_bytes_ = w.bytes;

  VDIFF_CUDA_CHECK(cudaSetDevice(device_));
  cudaDeviceProp prop{};
  VDIFF_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
  device_name_ = prop.name;
  size_t free_bytes = 0, total_bytes = 0;
  VDIFF_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  memory_total_ = total_bytes;
  const double utilization = options.gpu_memory_utilization;
  if (!(utilization > 0.0 && utilization <= 1.0))
    throw Error(ErrorCode::InvalidArgument,
                "gpu_memory_utilization must be in (0, 1], got " + std::to_string(utilization));
  // What this process may hold: the share of the device, less what others hold already.
  const double allowed = utilization * static_cast<double>(total_bytes) - static_cast<double>(total_bytes - free_bytes);

  // A quantized checkpoint runs in bf16: its matrices dequantized at upload (no int8 / int4 kernels here).
  quantized_ = w.layers.at(0).q.quant != Quant::None;
  type_ = quantized_ ? Elem::BF16 : elem_of(w.layers.at(0).q.dtype);
  embed_type_ = elem_of(w.embed.dtype);
  const ModelConfig& c = config_;
  const int D = c.d_model, hd = c.head_dim();
  const int q_dim = c.n_heads * hd, kv_dim = c.n_kv_heads * hd;
  // The device bytes of what is uploaded: matrices in the GEMM type, norms, biases and routers in f32.
  auto in_type = [&](const WeightRef& m) { return static_cast<uint64_t>(m.rows) * m.cols * elem_size(type_); };
  auto in_f32 = [](const WeightRef& v) { return v.data ? static_cast<uint64_t>(v.rows) * v.cols * 4 : 0; };
  auto mlp_bytes = [&](const MlpWeights& m) {
    return m.present() ? in_type(m.gate) + in_type(m.up) + in_type(m.down) : 0;
  };
  uint64_t need = static_cast<uint64_t>(c.embedding_size) * D * elem_size(embed_type_);
  if (!(w.head.data == w.embed.data && embed_type_ == type_)) need += in_type(w.head);
  need += in_f32(w.final_norm);
  for (const LayerWeights& l : w.layers) {
    need += in_f32(l.attn_norm) + in_f32(l.ffn_norm) + in_type(l.q) + in_type(l.k) + in_type(l.v) + in_type(l.o);
    need += in_f32(l.q_bias) + in_f32(l.k_bias) + in_f32(l.v_bias) + in_f32(l.q_norm) + in_f32(l.k_norm);
    need += mlp_bytes(l.mlp) + in_f32(l.moe.router) + mlp_bytes(l.moe.shared);
    for (const MlpWeights& e : l.moe.experts) need += mlp_bytes(e);
  }
  if (static_cast<double>(need) > allowed)
    throw Error(ErrorCode::OutOfMemory, "the weights take " + mib(need) + " on " + device_name_ + ", more than the " +
                                            mib(static_cast<uint64_t>(std::max(allowed, 0.0))) +
                                            " that gpu_memory_utilization " + std::to_string(utilization) + " leaves");

  VDIFF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  cublas_ = load_cublas(&cublas_reason_);
  if (cublas_) {
    if (cublas_->create(&cublas_handle_) != 0) {
      cublas_reason_ = "cublasCreate failed";
      cublas_handle_ = nullptr;
      cublas_ = nullptr;
    } else if (cublas_->set_stream(cublas_handle_, stream_) != 0) {
      cublas_reason_ = "cublasSetStream failed";
      cublas_->destroy(cublas_handle_);
      cublas_handle_ = nullptr;
      cublas_ = nullptr;
    }
  }

  try {
    uint64_t done = 0;
    const uint64_t total = need;
    if (progress_) progress_(progress_context_, 0, total);
    embed_ = upload(w.embed, embed_type_, done, total);
    layers_.resize(c.n_layers);
    for (int l = 0; l < c.n_layers; ++l) {
      const LayerWeights& lw = w.layers[l];
      DeviceLayer& d = layers_[l];
      d.attn_norm = upload_f32(lw.attn_norm);
      d.ffn_norm = upload_f32(lw.ffn_norm);
      d.qkv = upload_concat({&lw.q, &lw.k, &lw.v}, type_, done, total);
      if (c.qkv_bias) d.qkv_bias = upload_bias({&lw.q_bias, &lw.k_bias, &lw.v_bias});
      if (lw.q_norm.data) d.q_norm = upload_f32(lw.q_norm), d.k_norm = upload_f32(lw.k_norm);
      d.o = upload(lw.o, type_, done, total);
      if (lw.mlp.present()) d.mlp = upload_mlp(lw.mlp, done, total);
      if (!lw.moe.experts.empty()) {
        d.router = upload_f32(lw.moe.router);
        if (lw.moe.expert_bias.data)
          for (int64_t e = 0; e < static_cast<int64_t>(lw.moe.expert_bias.rows) * lw.moe.expert_bias.cols; ++e)
            d.expert_bias.push_back(weight_element(lw.moe.expert_bias, e));
        for (const MlpWeights& e : lw.moe.experts) d.experts.push_back(upload_mlp(e, done, total));
        if (lw.moe.shared.present()) d.shared = upload_mlp(lw.moe.shared, done, total);
      }
    }
    if (c.n_experts > 0) router_params_ = cpu::router_params(c);
    final_norm_ = upload_f32(w.final_norm);
    head_ = (w.head.data == w.embed.data && embed_type_ == type_) ? embed_ : upload(w.head, type_, done, total);
    if (progress_) progress_(progress_context_, total, total);

    // RoPE tables for every position the model accepts: angles in double, like the CPU backend; with
    // partial rotary the frequencies of a rotary_dim-wide head.
    const int rd = c.rope_dims(), half = rd / 2, L = c.max_sequence_length;
    std::vector<float> cos_table(static_cast<size_t>(L) * half), sin_table(cos_table.size());
    for (int i = 0; i < half; ++i) {
      const double inv_freq = 1.0 / std::pow(c.rope_theta, 2.0 * i / rd);
      for (int p = 0; p < L; ++p) {
        cos_table[static_cast<size_t>(p) * half + i] = static_cast<float>(std::cos(p * inv_freq));
        sin_table[static_cast<size_t>(p) * half + i] = static_cast<float>(std::sin(p * inv_freq));
      }
    }
    rope_cos_ = static_cast<float*>(device_alloc(cos_table.size() * 4, "RoPE tables"));
    rope_sin_ = static_cast<float*>(device_alloc(sin_table.size() * 4, "RoPE tables"));
    VDIFF_CUDA_CHECK(cudaMemcpy(rope_cos_, cos_table.data(), cos_table.size() * 4, cudaMemcpyHostToDevice));
    VDIFF_CUDA_CHECK(cudaMemcpy(rope_sin_, sin_table.data(), sin_table.size() * 4, cudaMemcpyHostToDevice));
    // The uploads went through the legacy default stream, and a pageable copy may return before its DMA
    // lands; forwards run on the non-blocking stream_, which does not wait for it.
    VDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    if (stream_) cudaStreamSynchronize(stream_);
    for (void* p : allocations_) cudaFree(p);
    allocations_.clear();
    if (cublas_handle_) cublas_->destroy(cublas_handle_);
    cudaStreamDestroy(stream_);
    throw;
  }

  // The KV budget: what the utilization leaves after the weights, less room for the activations of a
  // large step (8192 tokens and 1024 logit rows).
  VDIFF_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const double left = utilization * static_cast<double>(total_bytes) - static_cast<double>(total_bytes - free_bytes);
  const double H = std::max(c.mlp_hidden_size, c.moe_hidden_size * c.n_shared_experts);
  double per_token = 4.0 * D + 2.0 * D + 4.0 * (q_dim + 2 * kv_dim) + 2.0 * q_dim + 8.0 * H + 2.0 * H;
  if (c.n_experts > 0)  // f32 rows, router logits, y; per routed slot its row, gate/up, hidden and output
    per_token += 8.0 * D + 4.0 * c.n_experts +
                 c.experts_per_token * (2.0 * D + 8.0 * c.moe_hidden_size + 2.0 * c.moe_hidden_size + 4.0 * D);
  const double reserve = 8192.0 * per_token + 1024.0 * 4.0 * c.embedding_size;
  uint64_t budget = left > reserve ? static_cast<uint64_t>(left - reserve) : uint64_t{1};
  if (options.kv_cache_budget_bytes > 0) budget = std::min(budget, options.kv_cache_budget_bytes);
  set_kv_cache_budget(budget);
}

CudaBackend::~CudaBackend() {
  if (stream_) cudaStreamSynchronize(stream_);
  for (void* p : allocations_) cudaFree(p);
  if (host_meta_) cudaFreeHost(host_meta_);
  if (host_moe_meta_) cudaFreeHost(host_moe_meta_);
  if (cublas_handle_) cublas_->destroy(cublas_handle_);
  if (stream_) cudaStreamDestroy(stream_);
}

BackendInfo CudaBackend::info() const {
  BackendInfo i;
  i.backend = "cuda";
  i.device = device_name_;
  i.gemm =
      std::string(cublas_ ? "cublas" : "tiled fallback") + (quantized_ ? " (quantized checkpoint, run in bf16)" : "");
  i.memory_used = device_weight_bytes_ + kv_cache_live_bytes() + x_.size() + xn_.size() + qkv_.size() + att_.size() +
                  gu_.size() + h_.size() + head_in_.size() + logits_.size() + meta_.size() + tasks_.size() +
                  results_.size() + xn_f32_.size() + router_logits_.size() + moe_in_.size() + moe_gu_.size() +
                  moe_h_.size() + moe_out_.size() + moe_y_.size() + moe_meta_.size();
  i.memory_total = memory_total_;
  return i;
}

std::unique_ptr<KVCache> CudaBackend::allocate_kv_cache(int positions, uint64_t bytes) {
  VDIFF_CUDA_CHECK(cudaSetDevice(device_));
  return std::make_unique<CudaKVCache>(bytes);
}

void CudaBackend::copy_kv_tables(const KVCache& from, KVCache& to, int positions) {
  // 2 x n_layers tables of [position][kv_dim], each table's first `positions` rows, queued on the forward's
  // stream (so the next forward reading `to` runs after them).
  const size_t row =
      static_cast<size_t>(config_.n_kv_heads) * config_.head_dim() * (kv_cache_dtype() == KVCacheDType::BF16 ? 2 : 4);
  const size_t src_table = static_cast<size_t>(from.positions()) * row;
  const size_t dst_table = static_cast<size_t>(to.positions()) * row;
  const char* src = static_cast<const CudaKVCache&>(from).data();
  char* dst = static_cast<CudaKVCache&>(to).data();
  VDIFF_CUDA_CHECK(cudaSetDevice(device_));
  for (size_t t = 0; t < 2 * static_cast<size_t>(config_.n_layers); ++t)
    VDIFF_CUDA_CHECK(cudaMemcpyAsync(dst + t * dst_table, src + t * src_table, static_cast<size_t>(positions) * row,
                                     cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::gemm(const void* A, int M, int K, const void* W, Elem type, int N, float* C, int64_t ldc,
                       bool accumulate) {
  if (M == 0) return;
  if (cublas_) {
    // Row-major C[M, N] = A[M, K] · W[N, K]^T is column-major C^T[N, M] = W^T · A^T.
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    const int t = type == Elem::F32 ? Cublas::kR32F : type == Elem::BF16 ? Cublas::kR16BF : Cublas::kR16F;
    const int status =
        cublas_->gemm_ex(cublas_handle_, Cublas::kOpT, Cublas::kOpN, N, M, K, &alpha, W, t, K, A, t, K, &beta, C,
                         Cublas::kR32F, static_cast<int>(ldc), Cublas::kCompute32F, Cublas::kComputeDefaultAlgo);
    if (status != 0) throw Error(ErrorCode::Internal, "cublasGemmEx failed with status " + std::to_string(status));
  } else {
    launch_gemm_tiled(A, K, W, K, type, M, N, K, C, ldc, accumulate, stream_);
  }
}

void CudaBackend::mlp(const DeviceMlp& m, int T, const void* xn, float* out, bool accumulate) {
  const int D = config_.d_model, H = m.hidden;
  float* gu = static_cast<float*>(gu_.ensure(static_cast<size_t>(T) * 2 * H * 4, "activations"));
  void* h = h_.ensure(static_cast<size_t>(T) * H * elem_size(type_), "activations");
  gemm(xn, T, D, m.gate_up, 2 * H, gu, 2 * H, false);
  launch_swiglu(gu, T, H, h, type_, stream_);
  gemm(h, T, H, m.down, D, out, D, accumulate);
}

void CudaBackend::moe(const DeviceLayer& w, int T, const void* xn, const float* xn_f32, float* x, Marks& marks) {
  const ModelConfig& c = config_;
  const int D = c.d_model, E = c.n_experts, k = c.experts_per_token, Hm = c.moe_hidden_size, R = T * k;
  const size_t act = elem_size(type_);
  // Router logits in f32, routed and grouped on the host by the CPU backend's code (cpu/moe.h).
  float* logits = static_cast<float*>(router_logits_.ensure(static_cast<size_t>(T) * E * 4, "router logits"));
  gemm(xn_f32, T, D, w.router, Elem::F32, E, logits, E, false);
  host_router_logits_.resize(static_cast<size_t>(T) * E);
  VDIFF_CUDA_CHECK(cudaMemcpyAsync(host_router_logits_.data(), logits, host_router_logits_.size() * 4,
                                   cudaMemcpyDeviceToHost, stream_));
  sync();  // also: the previous MoE layer's upload from the pinned buffer is done
  marks.mark("moe router");
  cpu::route(router_params_, host_router_logits_.data(), T, E, w.expert_bias.empty() ? nullptr : w.expert_bias.data(),
             routing_);
  cpu::group_by_expert(routing_, E, groups_);
  // Metadata: each sorted row's input token, each slot's sorted row, each slot's weight.
  const size_t section = (static_cast<size_t>(R) * 4 + 255) / 256 * 256;
  if (host_moe_meta_size_ < 3 * section) {
    if (host_moe_meta_) cudaFreeHost(host_moe_meta_);
    host_moe_meta_ = nullptr;
    host_moe_meta_size_ = 0;
    VDIFF_CUDA_CHECK(cudaMallocHost(&host_moe_meta_, 6 * section));
    host_moe_meta_size_ = 6 * section;
  }
  char* h = static_cast<char*>(host_moe_meta_);
  auto* src = reinterpret_cast<int32_t*>(h);
  auto* sorted_row = reinterpret_cast<int32_t*>(h + section);
  std::memcpy(src, groups_.token.data(), static_cast<size_t>(R) * 4);
  for (int r = 0; r < R; ++r) sorted_row[groups_.slot[r]] = r;
  std::memcpy(h + 2 * section, routing_.weight.data(), static_cast<size_t>(R) * 4);
  char* meta = static_cast<char*>(moe_meta_.ensure(3 * section, "MoE metadata"));
  VDIFF_CUDA_CHECK(cudaMemcpyAsync(meta, h, 3 * section, cudaMemcpyHostToDevice, stream_));
  const auto* d_src = reinterpret_cast<const int32_t*>(meta);
  const auto* d_sorted_row = reinterpret_cast<const int32_t*>(meta + section);
  const auto* d_weight = reinterpret_cast<const float*>(meta + 2 * section);

  // The routed rows sorted by expert; one GEMM per active expert over its run of rows.
  char* in = static_cast<char*>(moe_in_.ensure(static_cast<size_t>(R) * D * act, "MoE rows"));
  float* gu = static_cast<float*>(moe_gu_.ensure(static_cast<size_t>(R) * 2 * Hm * 4, "MoE rows"));
  char* hidden = static_cast<char*>(moe_h_.ensure(static_cast<size_t>(R) * Hm * act, "MoE rows"));
  float* out = static_cast<float*>(moe_out_.ensure(static_cast<size_t>(R) * D * 4, "MoE rows"));
  float* y = static_cast<float*>(moe_y_.ensure(static_cast<size_t>(T) * D * 4, "MoE output"));
  launch_gather_rows(xn, type_, D, d_src, R, in, stream_);
  for (int e : groups_.active) {
    const int m0 = groups_.offsets[e], rows = groups_.count(e);
    gemm(in + static_cast<size_t>(m0) * D * act, rows, D, w.experts[e].gate_up, 2 * Hm,
         gu + static_cast<size_t>(m0) * 2 * Hm, 2 * Hm, false);
  }
  launch_swiglu(gu, R, Hm, hidden, type_, stream_);
  for (int e : groups_.active) {
    const int m0 = groups_.offsets[e], rows = groups_.count(e);
    gemm(hidden + static_cast<size_t>(m0) * Hm * act, rows, Hm, w.experts[e].down, D, out + static_cast<size_t>(m0) * D,
         D, false);
  }
  marks.mark("moe experts");
  launch_moe_combine(out, d_sorted_row, d_weight, T, k, D, y, stream_);
  if (w.shared.hidden > 0) mlp(w.shared, T, xn, y, true);  // y += shared(xn)
  launch_add(x, y, static_cast<int64_t>(T) * D, stream_);
  marks.mark("moe combine and shared expert");
}

// Aligned sections of one metadata upload.
struct MetaLayout {
  size_t tokens, positions, token_seq, head_rows, seqs, tiles, bytes;
};

int CudaBackend::run(const std::vector<ForwardSeq>& batch, const std::atomic<bool>* cancel, Marks& marks) {
  const BatchPlan plan = check_batch(batch);
  auto check_cancel = [&] {
    if (cancel && cancel->load(std::memory_order_relaxed)) {
      sync();
      throw Error(ErrorCode::Cancelled, "forward cancelled");
    }
  };
  check_cancel();
  const int T = plan.tokens, rows = plan.rows;
  if (batch.empty() || T == 0) return 0;
  VDIFF_CUDA_CHECK(cudaSetDevice(device_));
  const ModelConfig& c = config_;
  const int D = c.d_model, E = c.embedding_size, hd = c.head_dim();
  const int q_dim = c.n_heads * hd, kv_dim = c.n_kv_heads * hd, qkv_dim = q_dim + 2 * kv_dim;
  const size_t act = elem_size(type_);

  // Host metadata: tokens, positions, the sequence of each token, the rows the head reads, the sequences
  // and the attention's query tiles.
  std::vector<int32_t> tokens(T), positions(T), token_seq(T), head_rows;
  std::vector<SeqDesc> seqs(plan.seqs.size());
  std::vector<QueryTile> tiles;
  head_rows.reserve(rows);
  constexpr int kTileQueries = kAttentionQueries;
  for (size_t s = 0; s < plan.seqs.size(); ++s) {
    const BatchPlan::Seq& p = plan.seqs[s];
    for (int i = 0; i < p.end - p.begin; ++i) {
      tokens[p.offset + i] = batch[s].tokens[p.begin + i];
      positions[p.offset + i] = p.begin + i;
      token_seq[p.offset + i] = static_cast<int32_t>(s);
    }
    for (int r = 0; r < batch[s].n_logit_rows; ++r) head_rows.push_back(p.offset + batch[s].logit_rows[r] - p.begin);
    const auto* cache = static_cast<const CudaKVCache*>(p.cache);
    seqs[s] = SeqDesc{p.offset,
                      p.begin,
                      p.end,
                      p.length,
                      p.reads_cache ? 1 : 0,
                      kv_cache_dtype() == KVCacheDType::BF16 ? 1 : 0,
                      cache ? cache->data() : nullptr,
                      p.block};
    for (int q0 = 0; q0 < p.end - p.begin; q0 += kTileQueries)
      tiles.push_back(QueryTile{static_cast<int>(s), q0, std::min(kTileQueries, p.end - p.begin - q0)});
  }
  auto align = [](size_t n) { return (n + 255) / 256 * 256; };
  MetaLayout m{};
  m.tokens = 0;
  m.positions = m.tokens + align(T * 4);
  m.token_seq = m.positions + align(T * 4);
  m.head_rows = m.token_seq + align(T * 4);
  m.seqs = m.head_rows + align(std::max(rows, 1) * 4);
  m.tiles = m.seqs + align(seqs.size() * sizeof(SeqDesc));
  m.bytes = m.tiles + align(tiles.size() * sizeof(QueryTile));
  if (host_meta_size_ < m.bytes) {
    if (host_meta_) cudaFreeHost(host_meta_);
    host_meta_ = nullptr;
    host_meta_size_ = 0;
    VDIFF_CUDA_CHECK(cudaMallocHost(&host_meta_, m.bytes * 2));
    host_meta_size_ = m.bytes * 2;
  }
  char* h = static_cast<char*>(host_meta_);
  std::memcpy(h + m.tokens, tokens.data(), T * 4);
  std::memcpy(h + m.positions, positions.data(), T * 4);
  std::memcpy(h + m.token_seq, token_seq.data(), T * 4);
  if (rows) std::memcpy(h + m.head_rows, head_rows.data(), rows * 4);
  std::memcpy(h + m.seqs, seqs.data(), seqs.size() * sizeof(SeqDesc));
  std::memcpy(h + m.tiles, tiles.data(), tiles.size() * sizeof(QueryTile));
  char* meta = static_cast<char*>(meta_.ensure(m.bytes * 2, "forward metadata"));
  VDIFF_CUDA_CHECK(cudaMemcpyAsync(meta, h, m.bytes, cudaMemcpyHostToDevice, stream_));
  const auto* d_tokens = reinterpret_cast<const int32_t*>(meta + m.tokens);
  const auto* d_positions = reinterpret_cast<const int32_t*>(meta + m.positions);
  const auto* d_token_seq = reinterpret_cast<const int32_t*>(meta + m.token_seq);
  const auto* d_head_rows = reinterpret_cast<const int32_t*>(meta + m.head_rows);
  const auto* d_seqs = reinterpret_cast<const SeqDesc*>(meta + m.seqs);
  const auto* d_tiles = reinterpret_cast<const QueryTile*>(meta + m.tiles);

  float* x = static_cast<float*>(x_.ensure(static_cast<size_t>(T) * D * 4, "activations"));
  void* xn = xn_.ensure(static_cast<size_t>(T) * D * act, "activations");
  float* qkv = static_cast<float*>(qkv_.ensure(static_cast<size_t>(T) * qkv_dim * 4, "activations"));
  void* att = att_.ensure(static_cast<size_t>(T) * q_dim * act, "activations");
  // MoE layers route from the normed rows in f32 (the same buffer when the GEMMs take f32).
  float* xn_f32 = c.n_experts == 0 ? nullptr
                  : type_ == Elem::F32
                      ? static_cast<float*>(xn)
                      : static_cast<float*>(xn_f32_.ensure(static_cast<size_t>(T) * D * 4, "activations"));
  bool any_cache = false;
  for (const BatchPlan::Seq& p : plan.seqs) any_cache = any_cache || p.cache;
  const std::vector<int> cached_before = caches_computing(plan);

  const float eps = static_cast<float>(c.rms_norm_eps);
  launch_embed(d_tokens, T, embed_, embed_type_, D, x, stream_);
  marks.mark("embed");
  for (int l = 0; l < c.n_layers; ++l) {
    check_cancel();
    const DeviceLayer& w = layers_[l];
    launch_rmsnorm(x, nullptr, T, D, w.attn_norm, eps, xn, type_, stream_);
    marks.mark("rmsnorm");
    gemm(xn, T, D, w.qkv, qkv_dim, qkv, qkv_dim, false);
    if (w.qkv_bias) launch_add_bias(qkv, T, qkv_dim, w.qkv_bias, qkv_dim, stream_);
    marks.mark("gemm qkv");
    if (w.q_norm) {
      launch_head_rmsnorm(qkv, T, qkv_dim, c.n_heads, c.n_kv_heads, hd, q_dim, w.q_norm, w.k_norm, eps, stream_);
      marks.mark("qk norm");
    }
    launch_rope(qkv, T, qkv_dim, c.n_heads, c.n_kv_heads, hd, c.rope_dims(), q_dim, d_positions, rope_cos_, rope_sin_,
                stream_);
    marks.mark("rope");
    if (any_cache) launch_store_kv(qkv, T, qkv_dim, q_dim, q_dim + kv_dim, kv_dim, l, d_token_seq, d_seqs, stream_);
    marks.mark("kv cache store");
    launch_attention(qkv, qkv_dim, q_dim, q_dim + kv_dim, c.n_heads, c.n_kv_heads, hd, l, d_seqs, d_tiles,
                     static_cast<int>(tiles.size()), att, type_, q_dim, stream_);
    marks.mark("attention");
    gemm(att, T, q_dim, w.o, D, x, D, true);
    marks.mark("gemm o");
    launch_rmsnorm(x, nullptr, T, D, w.ffn_norm, eps, xn, type_, stream_);
    marks.mark("rmsnorm");
    if (w.moe()) {
      if (xn_f32 != xn) launch_rmsnorm(x, nullptr, T, D, w.ffn_norm, eps, xn_f32, Elem::F32, stream_);
      moe(w, T, xn, xn_f32, x, marks);
      continue;
    }
    mlp(w.mlp, T, xn, x, true);  // x += mlp(xn)
    marks.mark("mlp");
  }
  // Every layer is queued: the caches hold the whole computation once the stream gets there, and nothing
  // reads them before (later forwards run on the same stream), so no wait here.
  caches_computed(plan, cached_before);
  check_cancel();
  if (rows == 0) {
    sync();  // the pinned metadata buffer is rewritten by the next forward: its copy must be done
    return 0;
  }
  void* head_in = head_in_.ensure(static_cast<size_t>(rows) * D * act, "head input");
  float* logits = static_cast<float*>(logits_.ensure(static_cast<size_t>(rows) * E * 4, "logits"));
  launch_rmsnorm(x, d_head_rows, rows, D, final_norm_, eps, head_in, type_, stream_);
  marks.mark("rmsnorm");
  gemm(head_in, rows, D, head_, E, logits, E, false);
  marks.mark("gemm head");
  return rows;
}

void CudaBackend::forward(const std::vector<ForwardSeq>& batch, float* logits, const std::atomic<bool>* cancel) {
  Marks marks(stream_, g_profile.on);
  const int rows = run(batch, cancel, marks);
  if (rows == 0) return;
  VDIFF_CUDA_CHECK(cudaMemcpyAsync(logits, logits_.as<float>(), static_cast<size_t>(rows) * config_.embedding_size * 4,
                                   cudaMemcpyDeviceToHost, stream_));
  sync();
  marks.collect();
}

void CudaBackend::predict(const std::vector<ForwardSeq>& batch, const std::vector<RowTask>& tasks, RowResult* out,
                          const std::atomic<bool>* cancel) {
  Marks marks(stream_, g_profile.on);
  const int rows = run(batch, cancel, marks);
  const int E = config_.embedding_size;
  for (const RowTask& t : tasks)
    if (t.cond < 0 || t.cond >= rows || t.uncond >= rows)
      throw Error(ErrorCode::Internal, "predict: a task names a row the forward did not compute");
  std::vector<TaskDesc> device_tasks;
  std::vector<size_t> device_index, host_index;
  for (size_t j = 0; j < tasks.size(); ++j) {
    if (needs_host(tasks[j])) {
      host_index.push_back(j);
    } else {
      device_tasks.push_back(task_desc(tasks[j], E));
      device_index.push_back(j);
    }
  }
  // The stream is non-blocking: nothing on the legacy default stream waits for it. So the step is waited for
  // here whatever its tasks (the next forward reuses its buffers, and a kernel's error belongs to this call),
  // and the host rows' logits are copied on the stream itself.
  if (device_tasks.empty()) sync();
  if (!device_tasks.empty()) {
    const size_t n = device_tasks.size();
    auto* d_tasks = static_cast<TaskDesc*>(tasks_.ensure(n * sizeof(TaskDesc), "row tasks"));
    auto* d_results = static_cast<TaskResult*>(results_.ensure(n * sizeof(TaskResult), "row results"));
    VDIFF_CUDA_CHECK(
        cudaMemcpyAsync(d_tasks, device_tasks.data(), n * sizeof(TaskDesc), cudaMemcpyHostToDevice, stream_));
    launch_reduce_rows(logits_.as<float>(), E, d_tasks, static_cast<int>(n), d_results, stream_);
    marks.mark("vocabulary reduction");
    std::vector<TaskResult> results(n);
    VDIFF_CUDA_CHECK(
        cudaMemcpyAsync(results.data(), d_results, n * sizeof(TaskResult), cudaMemcpyDeviceToHost, stream_));
    sync();
    for (size_t i = 0; i < n; ++i) to_row_result(results[i], out[device_index[i]]);
  }
  marks.collect();
  // top-k / top-p rows: their logits to the host, sampled there exactly as the CPU backend does.
  std::vector<float> cond(E), uncond(E);
  std::vector<int32_t> scratch;
  for (size_t j : host_index) {
    const RowTask& t = tasks[j];
    VDIFF_CUDA_CHECK(cudaMemcpyAsync(cond.data(), logits_.as<float>() + static_cast<size_t>(t.cond) * E, E * 4,
                                     cudaMemcpyDeviceToHost, stream_));
    if (t.uncond >= 0)
      VDIFF_CUDA_CHECK(cudaMemcpyAsync(uncond.data(), logits_.as<float>() + static_cast<size_t>(t.uncond) * E, E * 4,
                                       cudaMemcpyDeviceToHost, stream_));
    sync();
    sample_task(cond.data(), t.uncond >= 0 ? uncond.data() : nullptr, E, t, out[j], &scratch);
  }
  if (cancel && cancel->load()) throw Error(ErrorCode::Cancelled, "step cancelled");
}

}  // namespace

int device_count() {
  int n = 0;
  const cudaError_t status = cudaGetDeviceCount(&n);
  if (status != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string unavailable_reason() {
  int n = 0;
  const cudaError_t status = cudaGetDeviceCount(&n);
  if (status != cudaSuccess) {
    cudaGetLastError();
    return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
  }
  return n > 0 ? "" : "no CUDA device";
}

void set_profiling(bool on) {
  std::lock_guard<std::mutex> lock(g_profile.mu);
  g_profile.on = on;
}

std::string take_profile() {
  std::lock_guard<std::mutex> lock(g_profile.mu);
  std::string json = "{\"forwards\": " + std::to_string(g_profile.forwards) + ", \"ms\": {";
  for (size_t i = 0; i < g_profile.totals.size(); ++i) {
    char value[64];
    std::snprintf(value, sizeof value, "%.4f", g_profile.totals[i].second / std::max(g_profile.forwards, 1));
    json += (i ? ", \"" : "\"") + g_profile.totals[i].first + "\": " + value;
  }
  g_profile.totals.clear();
  g_profile.forwards = 0;
  return json + "}}";
}

std::unique_ptr<Backend> load(const std::string& dir, const LoadOptions& options) {
  if (device_count() == 0)
    throw Error(ErrorCode::Unavailable, "device cuda: no CUDA GPU is visible (" + unavailable_reason() + ")");
  const ModelConfig config = ModelConfig::from_file(dir + "/config.json");
  return std::make_unique<CudaBackend>(config, TensorSet::load_dir(dir), options);
}

}  // namespace vdiff::cuda
