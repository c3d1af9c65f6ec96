// The mask predictor of every family (weights.h) on CPU. Weights stay memory-mapped in their stored dtype;
// activations are f32.
//
// One forward over a batch:
//   x = wte[tokens]                                   all sequences' tokens concatenated: [T, D]
//   per block:  x += attn_out(attention(rope(q), rope(k), v))   q, k, v = projections of rmsnorm(x)
//               x += ff_out(silu(ff_proj(h)) * up_proj(h))      h = rmsnorm(x)
//   logits = head(rmsnorm(x[requested rows]))         only the rows the sampler asked for
// with what ModelConfig says of the family: QK-norm (q and k heads RMS-normalised before RoPE), partial
// rotary (the first rotary_dim dims of a head), head_dim independent of d_model, and MoE layers in place
// of the dense MLP (moe(): routed with cpu/moe.h, one product per active expert, plus a shared expert).
// Linear layers run over all T tokens at once, split across threads by column panels; attention runs
// per (sequence, head, block of queries) over that sequence's own keys: all of them (bidirectional), or
// with ForwardSeq::attention_block those before the end of the query's block (block-causal), tiled over
// the keys with the online softmax (cpu/attention.h: at most 64 x kKeyTile scores per task).
//
// With a KV cache a sequence contributes only its computed range [begin, end) to the T tokens: their
// keys (after RoPE at their canvas positions) and values are written into the cache, and a read's
// attention runs over the cache's keys of the whole canvas (stale outside the range, fresh inside).
#include "cpu/backend_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <set>

#include <sys/mman.h>
#include <unistd.h>

#include "core/error.h"
#include "core/safetensors.h"
#include "core/threadpool.h"
#include "core/weights.h"
#include "cpu/attention.h"
#include "cpu/kernels.h"
#include "cpu/moe.h"
#include "cpu/quant.h"

namespace vdiff::cpu {

namespace {

constexpr int kQueryBlock = 64;  // queries per attention task (its scores: 64 x kKeyTile floats, cpu/attention.h)
// Tokens routed together by a MoE layer: bounds its scratch (routed rows x (2 D + 2 moe_hidden) floats) for
// long prefills; a token's result does not depend on which tokens share its chunk.
constexpr int kMoeTokens = 1024;

// A weight matrix [rows = out features, cols = in features], still in the mapping.
struct Weight {
  const void* data = nullptr;
  WType type = WType::F32;
  int rows = 0;
  int cols = 0;
  const void* packed = nullptr;  // the GEMM's layout of the whole matrix, when packed at load
  bool bf16_dot = true;          // MatB::bf16_dot: false for the MoE router, whose logits are f32 products
  // Block-quantized (cpu/quant.h): `data` holds the blocks, `scales` the f16 scales, both row-major, and
  // `packed` (on the SIMD ISAs) the same in the quantized gemm's layout, which replaces them.
  bool quantized = false;
  QType qtype = QType::Q8_0;
  const uint16_t* scales = nullptr;
  int rotation = 0;  // QMatB::rotation: rows rotated by Hadamard blocks of this width before quantizing
  MatB as_b() const { return MatB{data, type, cols, false, packed, bf16_dot}; }
  QMatB as_qb() const {
    return QMatB{static_cast<const uint8_t*>(data),
                 scales,
                 qtype,
                 static_cast<int64_t>(cols) / kQBlock * qblock_bytes(qtype),
                 cols / kQBlock,
                 packed,
                 rotation};
  }
};

struct Mlp {
  Weight gate, up, down;
};

// One layer. A dense layer uses ff_proj, up_proj and ff_out; a mixture-of-experts layer (moe) the router,
// the experts and the shared expert (shared.gate.data == nullptr: none).
struct Block {
  std::vector<float> attn_norm, ff_norm;
  std::vector<float> q_norm, k_norm;          // QK-norm weights [head_dim] (empty: none)
  std::vector<float> q_bias, k_bias, v_bias;  // q/k/v biases (empty: none)
  Weight q, k, v, attn_out, ff_proj, up_proj, ff_out;
  bool moe = false;
  Weight router;                   // [n_experts, D], float
  std::vector<float> expert_bias;  // [n_experts] (empty: none)
  std::vector<Mlp> experts;
  Mlp shared;
};

// A 64-byte aligned float array that only grows. Contents are not kept across growth.
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : data_(o.data_), size_(o.size_) { o.data_ = nullptr, o.size_ = 0; }
  ~Buffer() { std::free(data_); }

  // `huge_pages`: from 2 MiB on, whole 2 MiB huge pages where the kernel allows them (transparent huge
  // pages in "madvise" mode or above). For the weights packed at load: one read per forward then costs one
  // TLB entry per 2 MiB, not per 4 KiB, and fills in 512 times fewer page faults. Not for buffers that
  // grow while serving, whose first touch could then wait on the kernel's compaction.
  float* ensure(size_t n, bool huge_pages = false) {
    if (n > size_) {
      std::free(data_);
      data_ = nullptr;
      size_ = 0;
      const size_t huge = size_t{2} << 20;
      const size_t align = huge_pages && n * sizeof(float) >= huge ? huge : 64;
      size_t bytes = (n * sizeof(float) + align - 1) / align * align;
      data_ = static_cast<float*>(std::aligned_alloc(align, bytes));
      if (!data_)
        throw Error(ErrorCode::OutOfMemory, "cannot allocate " + std::to_string(bytes >> 20) + " MiB of activations");
      if (align == huge) madvise(data_, bytes, MADV_HUGEPAGE);
      size_ = n;
    }
    return data_;
  }
  float* data() const { return data_; }

 private:
  float* data_ = nullptr;
  size_t size_ = 0;
};

// Keys and values of every layer as [layer][keys | values][position][kv_dim], in one allocation.
class CpuKVCache final : public KVCache {
 public:
  CpuKVCache(int positions, int kv_dim, WType type, uint64_t bytes)
      : positions_(positions), kv_dim_(kv_dim), type_(type) {
    data_ = static_cast<char*>(std::aligned_alloc(64, ((bytes + 63) / 64) * 64));
    if (!data_) throw std::bad_alloc();
  }
  ~CpuKVCache() override { std::free(data_); }

  WType type() const { return type_; }
  size_t element_size() const { return type_ == WType::F32 ? 4 : 2; }
  // Start of position 0 of one layer's keys or values: rows of kv_dim elements.
  char* keys(int layer) const { return data_ + (2 * static_cast<size_t>(layer)) * table_bytes(); }
  char* values(int layer) const { return data_ + (2 * static_cast<size_t>(layer) + 1) * table_bytes(); }
  size_t row_bytes() const { return static_cast<size_t>(kv_dim_) * element_size(); }

 private:
  size_t table_bytes() const { return static_cast<size_t>(positions_) * row_bytes(); }

  int positions_, kv_dim_;
  WType type_;
  char* data_ = nullptr;
};

// f32 -> bf16 with round to nearest even (NaN stays NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

const char* wtype_name(WType t) {
  switch (t) {
    case WType::F32: return "f32";
    case WType::BF16: return "bf16";
    case WType::F16: return "f16";
  }
  return "?";
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelConfig& config, TensorSet tensors, const LoadOptions& options);

  BackendInfo info() const override {
    return BackendInfo{"cpu", kernels_->isa, gemm_name(),
                       weight_bytes_ + packed_weight_bytes_ + quantized_bytes_ - released_weight_bytes_, 0};
  }
  std::string weight_dtype() const override {
    return blocks_[0].q.quantized ? qtype_name(blocks_[0].q.qtype) : wtype_name(blocks_[0].q.type);
  }
  uint64_t parameter_count() const override { return parameter_count_; }
  uint64_t weight_bytes() const override { return weight_bytes_; }
  uint64_t packed_weight_bytes() const override { return packed_weight_bytes_; }

  void forward(const std::vector<ForwardSeq>& batch, float* logits, const std::atomic<bool>* cancel) override;

 protected:
  std::unique_ptr<KVCache> allocate_kv_cache(int positions, uint64_t bytes) override;
  void copy_kv_tables(const KVCache& from, KVCache& to, int positions) override;

 private:
  using SeqPlan = BatchPlan::Seq;
  static CpuKVCache& cache_of(const SeqPlan& p) { return *static_cast<CpuKVCache*>(p.cache); }  // checked: made here

  // One output of a fused linear call: out[:, 0:w.rows] (+)= A · w^T.
  struct LinearOut {
    const Weight* w;
    float* out;
    int64_t ldc;
    bool accumulate;
  };
  // One product of a grouped linear call: out[0 .. m1-m0, 0:w.rows] = A[m0 .. m1) · w^T.
  struct GroupOut {
    const Weight* w;
    int m0, m1;
    float* out;
    int64_t ldc;
  };

  ThreadPool& pool() const { return host_pool(); }

  int item_columns(int columns) const;
  void linear(const float* A, int M, int K, std::initializer_list<LinearOut> outs);
  void linear_grouped(const float* A, int M, int K, const std::vector<GroupOut>& outs);
  // The activations A[0 .. M)[0 .. K) of one input prepared once for all its products: quantized per row
  // and block of 32 for quantized weights (qa_), staged for the bf16 products (bf16_a_).
  // `rotation`: -1 when no product is quantized, else the Hadamard width of the quantized ones (0: none).
  void prepare_activations(const float* A, int M, int K, int rotation, bool staged);
  static int common_rotation(int rotation, const Weight& w);
  // Whether w's products read the staged activations: a bf16 weight on a path that stages them.
  bool staged_bf16(const Weight& w) const {
    return kernels_->gemm_staged != nullptr && w.type == WType::BF16 && w.bf16_dot && !w.quantized;
  }
  // One work item: rows [m0, m1) of A times columns [n0, n1) of w into C (row m0 at C), by the kind of w.
  void product(const Weight& w, const float* A, int K, int m0, int m1, int n0, int n1, float* C, int64_t ldc,
               bool accumulate, int thread);
  void qk_norm(const Block& blk, int T);
  void moe(const Block& blk, int T);
  void routed_experts(const Block& blk, int t0, int T);
  std::vector<Weight*> matrices(bool experts);
  void rmsnorm_rows(const float* x, const std::vector<float>& w, float* y, int rows);
  void ensure_rope(int length);
  void apply_rope(float* q, float* k, int T);
  void store_in_caches(int layer);
  void attention(int layer);
  void add_bias(float* y, const std::vector<float>& bias, int T);  // y[t] += bias for each of T rows
  void ensure_scratch(int T, int rows, int max_len);
  void pack_weights(uint64_t max_bytes);
  void quantize_weights(QType type);
  void pack_quantized();
  std::string gemm_name() const {
    return quantized_bytes_ > 0 || blocks_[0].q.quantized ? std::string(kernels_->isa) + " + quantized " + quant_->isa
                                                          : kernels_->isa;
  }

  TensorSet tensors_;
  const Kernels* kernels_;
  const QuantKernels* quant_;
  Weight wte_, head_;
  std::vector<Block> blocks_;
  std::vector<float> ln_f_;
  uint64_t parameter_count_ = 0;
  uint64_t weight_bytes_ = 0;
  std::vector<Buffer> packed_;  // the packed copies of the weights (Weight::packed points into them)
  uint64_t packed_weight_bytes_ = 0;
  uint64_t released_weight_bytes_ = 0;           // mapped weights whose packed copy replaced them (pages released)
  std::vector<std::vector<uint8_t>> quantized_;  // the copies quantized at load (Weight::data points into them)
  uint64_t quantized_bytes_ = 0;
  Buffer qa_;         // activations quantized for the integer GEMM (QBlockA, K / 32 per row)
  Buffer rotated_a_;  // the activations rotated for rotated quantized weights (quant.h), before qa_
  Buffer bf16_a_;     // activations staged for the bf16 products (Kernels::stage_bf16_a)
  size_t bf16_a_row_bytes_ = 0;
  WType cache_type_;

  // RoPE tables [position][head_dim / 2], grown to the longest sequence seen.
  int rope_len_ = 0;
  std::vector<float> rope_cos_, rope_sin_;

  // Per-forward state and scratch (forward is not reentrant).
  std::vector<SeqPlan> plan_;  // check_batch's layout of the current forward
  Buffer x_, xn_, q_, k_, v_, att_, gate_, up_, rows_;
  // Mixture of experts: router logits [T, E]; the routed rows sorted by expert: inputs [T*k, D], gate
  // and up [T*k, moe_hidden], outputs [T*k, D]; the layer's output [T, D].
  Buffer router_logits_, moe_in_, moe_gate_, moe_up_, moe_out_, moe_y_;
  RouterParams router_params_;
  Routing routing_;
  ExpertGroups groups_;
  std::vector<int32_t> sorted_row_;            // routed slot -> its row in the sorted order
  std::vector<Buffer> gemm_scratch_, scores_;  // per thread
};

WType wtype_of(DType t) { return t == DType::F32 ? WType::F32 : t == DType::BF16 ? WType::BF16 : WType::F16; }

Weight weight_of(const WeightRef& w) {
  Weight out;
  out.data = w.data;
  out.type = w.quant == Quant::None ? wtype_of(w.dtype) : WType::F32;
  out.rows = w.rows;
  out.cols = w.cols;
  if (w.quant != Quant::None) {
    out.quantized = true;
    out.qtype = w.quant == Quant::Q8_0 ? QType::Q8_0 : QType::Q4_0;
    out.scales = static_cast<const uint16_t*>(w.scales);
    out.rotation = w.hadamard ? hadamard_block(w.cols) : 0;
  }
  return out;
}

std::vector<float> norm_of(const WeightRef& w) {
  std::vector<float> out(w.cols);
  for (int i = 0; i < w.cols; ++i) out[i] = weight_element(w, i);
  return out;
}

CpuBackend::CpuBackend(const ModelConfig& config, TensorSet tensors, const LoadOptions& options)
    : Backend(config, options),
      tensors_(std::move(tensors)),
      kernels_(&kernels_for_setting(options.cpu_isa)),
      quant_(&quant_kernels_for(*kernels_)) {
  const ModelWeights w = find_weights(tensors_, config_, family_of(config_));
  unused_tensors_ = w.unused;
  parameter_count_ = w.parameter_count;
  weight_bytes_ = w.bytes;
  wte_ = weight_of(w.embed);
  blocks_.resize(config_.n_layers);
  for (int i = 0; i < config_.n_layers; ++i) {
    const LayerWeights& l = w.layers[i];
    Block& blk = blocks_[i];
    blk.attn_norm = norm_of(l.attn_norm);
    blk.ff_norm = norm_of(l.ffn_norm);
    blk.q = weight_of(l.q);
    blk.k = weight_of(l.k);
    blk.v = weight_of(l.v);
    blk.attn_out = weight_of(l.o);
    if (l.q_norm.data) blk.q_norm = norm_of(l.q_norm), blk.k_norm = norm_of(l.k_norm);
    if (l.q_bias.data) blk.q_bias = norm_of(l.q_bias), blk.k_bias = norm_of(l.k_bias), blk.v_bias = norm_of(l.v_bias);
    if (l.mlp.present()) {
      blk.ff_proj = weight_of(l.mlp.gate);
      blk.up_proj = weight_of(l.mlp.up);
      blk.ff_out = weight_of(l.mlp.down);
    }
    if (!l.moe.experts.empty()) {
      blk.moe = true;
      blk.router = weight_of(l.moe.router);
      blk.router.bf16_dot = false;  // the references compute router logits in f32 from the widened weight
      if (l.moe.expert_bias.data) blk.expert_bias = norm_of(l.moe.expert_bias);
      for (const MlpWeights& e : l.moe.experts)
        blk.experts.push_back(Mlp{weight_of(e.gate), weight_of(e.up), weight_of(e.down)});
      if (l.moe.shared.present())
        blk.shared = Mlp{weight_of(l.moe.shared.gate), weight_of(l.moe.shared.up), weight_of(l.moe.shared.down)};
    }
  }
  if (config_.n_experts > 0) router_params_ = router_params(config_);
  ln_f_ = norm_of(w.final_norm);
  head_ = weight_of(w.head);
  if (options.quantize != Quant::None) quantize_weights(options.quantize == Quant::Q8_0 ? QType::Q8_0 : QType::Q4_0);
  pack_quantized();
  pack_weights(options.pack_weights_max_bytes);
  cache_type_ = options.kv_cache_dtype == KVCacheDType::BF16 ? WType::BF16 : WType::F32;
  gemm_scratch_.resize(pool().size());
  scores_.resize(pool().size());
}

// Drops the pages of a mapped matrix from this process's resident set once a copy replaces it (the
// mapping stays valid; a later read faults them back in from the file). Returns the bytes released.
uint64_t release_pages(const void* data, uint64_t bytes) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) / page * page;
  if (end <= begin) return 0;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
  return end - begin;
}

// Quantizes every projection (QuantKernels::quantize_weights, each row converted to f32 and rotated first), not
// the head: it stays in its stored dtype (cpu/quant.h says why; a checkpoint may still store it quantized).
// On an ISA whose quantized gemm reads packed panels (QuantKernels::nr), each panel's rows are quantized
// into a small buffer and packed from it, so the matrix exists only in that layout; otherwise (and for
// the MoE experts, which the gemm packs per product: see pack_quantized) into a row-major copy. Either way
// the float original's pages are released (unless it is also the embedding). Matrices stored quantized
// stay as they are.
void CpuBackend::quantize_weights(QType type) {
  const std::vector<Weight*> weights = matrices(/*experts=*/true);
  const std::vector<Weight*> dense = matrices(/*experts=*/false);
  quantized_.reserve(weights.size());
  for (Weight* wp : weights) {
    Weight& w = *wp;
    const bool expert = std::find(dense.begin(), dense.end(), wp) == dense.end();
    if (w.quantized || w.cols % kQBlock != 0) continue;
    const int64_t row_bytes = static_cast<int64_t>(w.cols) / kQBlock * qblock_bytes(type);
    const int64_t row_scales = w.cols / kQBlock;
    const size_t in_row = static_cast<size_t>(w.cols) * (w.type == WType::F32 ? 4 : 2);
    const void* original = w.data;
    const int rotation = weight_rotation(type, w.cols);
    // Rows [r0, r0 + n) rotated and quantized into blocks (row_bytes each) and scales (row_scales each).
    const auto quantize_rows = [&](int r0, int n, uint8_t* blocks, uint16_t* scales, std::vector<float>& row) {
      for (int r = 0; r < n; ++r) {
        kernels_->convert(static_cast<const char*>(w.data) + (r0 + r) * in_row, w.type, row.data(), w.cols);
        if (rotation > 0) quant_->rotate(row.data(), w.cols, rotation);
        quant_->quantize_weights(row.data(), w.cols, type, blocks + r * row_bytes, scales + r * row_scales);
      }
    };
    if (quant_->nr > 0 && !expert) {
      const int nr = quant_->nr, panels = (w.rows + nr - 1) / nr;
      const size_t panel_bytes = quant_->packed_panel_bytes(w.cols, type);
      char* out =
          reinterpret_cast<char*>(packed_.emplace_back().ensure((panels * panel_bytes + 3) / 4, /*huge_pages=*/true));
      pool().parallel_for(panels, [&](size_t begin, size_t end, int) {
        std::vector<float> row(w.cols);
        std::vector<uint8_t> blocks(static_cast<size_t>(nr) * row_bytes);
        std::vector<uint16_t> scales(static_cast<size_t>(nr) * row_scales);
        for (size_t p = begin; p < end; ++p) {
          const int r0 = static_cast<int>(p) * nr, n = std::min(nr, w.rows - r0);
          quantize_rows(r0, n, blocks.data(), scales.data(), row);
          const QMatB panel{blocks.data(), scales.data(), type, row_bytes, row_scales, nullptr, rotation};
          quant_->pack_panel(panel, n, w.cols, 0, out + p * panel_bytes);
        }
      });
      w.packed = out;  // `data` stays the (released) original: the gemm reads only the panels
      packed_weight_bytes_ += uint64_t{panel_bytes} * panels;
    } else {
      std::vector<uint8_t>& store = quantized_.emplace_back(static_cast<size_t>(w.rows) * (row_bytes + 2 * row_scales));
      uint8_t* blocks = store.data();
      auto* scales = reinterpret_cast<uint16_t*>(blocks + static_cast<size_t>(w.rows) * row_bytes);
      pool().parallel_for(w.rows, [&](size_t begin, size_t end, int) {
        std::vector<float> row(w.cols);
        quantize_rows(static_cast<int>(begin), static_cast<int>(end - begin), blocks + begin * row_bytes,
                      scales + begin * row_scales, row);
      });
      quantized_bytes_ += store.size();
      w.data = blocks;
      w.scales = scales;
    }
    // The float original is not read again (unless it is also the embedding).
    if (original != wte_.data) released_weight_bytes_ += release_pages(original, w.rows * in_row);
    w.quantized = true;
    w.qtype = type;
    w.type = WType::F32;
    w.rotation = rotation;
  }
}

// Packs the matrices stored quantized in the checkpoint for an ISA whose gemm reads panels, and releases
// the mapped blocks and scales (the panels replace them). Not the MoE experts: a step reads only the
// experts it routes to, so they stay mapped (a 16B model then runs in a few GiB) and are packed per
// product.
void CpuBackend::pack_quantized() {
  if (quant_->nr == 0) return;
  std::vector<Weight*> weights = matrices(/*experts=*/false);
  weights.push_back(&head_);
  for (Weight* wp : weights) {
    Weight& w = *wp;
    if (!w.quantized || w.packed != nullptr) continue;
    const int nr = quant_->nr, panels = (w.rows + nr - 1) / nr;
    const size_t panel_bytes = quant_->packed_panel_bytes(w.cols, w.qtype);
    char* out =
        reinterpret_cast<char*>(packed_.emplace_back().ensure((panels * panel_bytes + 3) / 4, /*huge_pages=*/true));
    const QMatB b = w.as_qb();
    pool().parallel_for(panels, [&](size_t begin, size_t end, int) {
      for (size_t p = begin; p < end; ++p)
        quant_->pack_panel(b, w.rows, w.cols, static_cast<int>(p), out + p * panel_bytes);
    });
    w.packed = out;
    packed_weight_bytes_ += uint64_t{panel_bytes} * panels;
    released_weight_bytes_ += release_pages(b.data, static_cast<uint64_t>(w.rows) * b.ld);
    released_weight_bytes_ += release_pages(b.scales, static_cast<uint64_t>(w.rows) * b.ld_scales * 2);
  }
}

// The projection matrices of every layer (present ones only): attention, dense MLP, shared expert and,
// with `experts`, every expert (not the router, which stays float and unpacked).
std::vector<Weight*> CpuBackend::matrices(bool experts) {
  std::vector<Weight*> out;
  const auto add = [&out](Weight& w) {
    if (w.data) out.push_back(&w);
  };
  for (Block& blk : blocks_) {
    for (Weight* w : {&blk.q, &blk.k, &blk.v, &blk.attn_out, &blk.ff_proj, &blk.up_proj, &blk.ff_out}) add(*w);
    for (Weight* w : {&blk.shared.gate, &blk.shared.up, &blk.shared.down}) add(*w);
    if (experts)
      for (Mlp& e : blk.experts)
        for (Weight* w : {&e.gate, &e.up, &e.down}) add(*w);
  }
  return out;
}

void CpuBackend::pack_weights(uint64_t max_bytes) {
  if (kernels_->pack_panel == nullptr || max_bytes == 0) return;
  // Not the experts: a few of them run per token, and packed copies of all of them would take many
  // times the checkpoint's memory.
  std::vector<Weight*> weights;
  for (Weight* w : matrices(/*experts=*/false))
    if (!w->quantized) weights.push_back(w);
  if (!head_.quantized) weights.push_back(&head_);
  const int nr = kernels_->gemm_nr;
  const auto panels = [nr](const Weight& w) { return (w.rows + nr - 1) / nr; };
  const auto panel_bytes = [this](const Weight& w) { return kernels_->packed_panel_bytes(w.as_b(), w.cols); };
  const auto stored_bytes = [](const Weight& w) {
    return uint64_t{w.type == WType::F32 ? 4u : 2u} * static_cast<uint64_t>(w.rows) * w.cols;
  };
  // A matrix whose packed copy is no larger than it is stored (bf16 on the vdpbf16ps path: the same
  // bytes, as pairs; f32 whose rows fill whole panels) replaces it: its mapped pages are released, so it costs no
  // memory, and the products read contiguous panels instead of packing rows of the mapping on every call (bench/cpu:
  // the llada-8b forward 5.6 s mapped, 4.4 s packed). Not the embedding (a tied head), which is read as stored.
  const auto replaces = [&](const Weight& w) {
    return w.data != wte_.data && uint64_t{panel_bytes(w)} * panels(w) <= stored_bytes(w);
  };
  uint64_t total = 0;
  for (const Weight* w : weights)
    if (!replaces(*w)) total += uint64_t{panel_bytes(*w)} * panels(*w);
  const bool pack_all = total <= max_bytes;
  packed_.reserve(weights.size());
  for (Weight* wp : weights) {
    Weight& w = *wp;
    if (!pack_all && !replaces(w)) continue;
    const size_t bytes = panel_bytes(w);
    char* out =
        reinterpret_cast<char*>(packed_.emplace_back().ensure((panels(w) * bytes + 3) / 4, /*huge_pages=*/true));
    const MatB b = w.as_b();
    pool().parallel_for(panels(w), [&](size_t begin, size_t end, int) {
      for (size_t p = begin; p < end; ++p)
        kernels_->pack_panel(b, w.rows, w.cols, static_cast<int>(p), out + p * bytes);
    });
    w.packed = out;
    packed_weight_bytes_ += uint64_t{bytes} * panels(w);
    if (replaces(w)) released_weight_bytes_ += release_pages(w.data, stored_bytes(w));
  }
}

void CpuBackend::ensure_scratch(int T, int rows, int max_len) {
  const size_t D = config_.d_model;
  // The widest MLP the gate/up buffers hold: a dense layer's or the shared expert's.
  const size_t shared = static_cast<size_t>(config_.moe_hidden_size) * config_.n_shared_experts;
  const size_t H = std::max<size_t>(config_.mlp_hidden_size, shared);
  const size_t q_dim = static_cast<size_t>(config_.n_heads) * config_.head_dim();
  const size_t kv_dim = static_cast<size_t>(config_.n_kv_heads) * config_.head_dim();
  x_.ensure(T * D);
  xn_.ensure(T * D);
  q_.ensure(T * q_dim);
  k_.ensure(T * kv_dim);
  v_.ensure(T * kv_dim);
  att_.ensure(T * q_dim);
  gate_.ensure(T * H);
  up_.ensure(T * H);
  rows_.ensure(static_cast<size_t>(rows > 0 ? rows : 1) * D);
  if (config_.n_experts > 0) {
    const size_t chunk = std::min(T, kMoeTokens), routed = chunk * config_.experts_per_token;
    router_logits_.ensure(chunk * config_.n_experts);
    moe_in_.ensure(routed * D);
    moe_gate_.ensure(routed * config_.moe_hidden_size);
    moe_up_.ensure(routed * config_.moe_hidden_size);
    moe_out_.ensure(routed * D);
    moe_y_.ensure(T * D);
  }
  int max_k = std::max({config_.d_model, static_cast<int>(H), config_.moe_hidden_size, config_.head_dim(), max_len,
                        config_.n_heads * config_.head_dim()});
  const int query_block = std::min(kQueryBlock, max_len);
  for (int t = 0; t < pool().size(); ++t) {
    gemm_scratch_[t].ensure(std::max(kernels_->gemm_scratch_floats(max_k), quant_->gemm_scratch_floats(max_k)));
    scores_[t].ensure(attention_scratch_floats(*kernels_, query_block, config_.head_dim()));
  }
}

// Runs task(i, thread) for every i in [0, n), handing items out one at a time to whichever thread is
// free: items of unequal cost (attention over sequences of different lengths) and threads slowed down by
// other work on the machine both balance out. Results do not depend on which thread ran what.
template <class Task>
void run_dynamic(ThreadPool& pool, size_t n, const Task& task) {
  std::atomic<size_t> next{0};
  pool.parallel_for(std::min(n, static_cast<size_t>(pool.size())), [&](size_t, size_t, int thread) {
    for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) task(i, thread);
  });
}

// Columns per work item of a product with `columns` outputs in all: whole panels (gemm_nr; 16 for the
// portable kernels, whose gemm takes any range), up to 8 of them, and at least 4 items per thread so that
// threads slowed down by other work still balance out.
int CpuBackend::item_columns(int columns) const {
  const int nr = kernels_->gemm_nr == 1 ? 16 : kernels_->gemm_nr;
  const int panels = (columns + nr - 1) / nr;
  return nr * std::clamp(panels / (4 * static_cast<int>(pool().size())), 1, 8);
}

void CpuBackend::linear(const float* A, int M, int K, std::initializer_list<LinearOut> outs) {
  // Work items are runs of column panels (item_columns), numbered across all outputs so that one
  // parallel_for covers e.g. q, k and v together. Within an item the gemm reads each k block of A once for
  // all its panels, so an item of several panels reads A from memory that many times less often than one
  // panel per item did (bench/cpu: the AVX2 GEMM went from about half of the FMA peak to 90% with it).
  // Many rows (a batch of whole canvases) are also split into chunks of about 1 MiB of A; the chunks go
  // in order, so the threads share one chunk at a time. The kernel's result per output does not depend on
  // M or on the columns it is given, so neither does the forward's.
  const int chunk = std::clamp((1 << 20) / (4 * std::max(K, 1)) / 6 * 6, 192, 1026);
  int rotation = -1;
  bool any_staged = false;
  for (const LinearOut& o : outs) {
    if (o.w->quantized) rotation = common_rotation(rotation, *o.w);
    any_staged = any_staged || staged_bf16(*o.w);
  }
  prepare_activations(A, M, K, rotation, any_staged);
  struct Item {
    const LinearOut* out;
    int m0, m1, n0, n1;
  };
  std::vector<Item> items;
  int columns = 0;
  for (const LinearOut& o : outs) columns += o.w->rows;
  const int step = item_columns(columns);
  for (int m0 = 0; m0 < M; m0 += chunk)
    for (const LinearOut& o : outs)
      for (int n0 = 0; n0 < o.w->rows; n0 += step)
        items.push_back({&o, m0, std::min(m0 + chunk, M), n0, std::min(n0 + step, o.w->rows)});
  run_dynamic(pool(), items.size(), [&](size_t i, int thread) {
    const Item& item = items[i];
    const LinearOut& o = *item.out;
    product(*o.w, A, K, item.m0, item.m1, item.n0, item.n1, o.out + static_cast<int64_t>(item.m0) * o.ldc, o.ldc,
            o.accumulate, thread);
  });
}

// The rotation `w` (quantized) shares with the other quantized products of one input (-1: none yet): the
// activations are rotated once for all of them, so they must agree (a checkpoint mixing rotated and
// unrotated matrices of one input is refused here rather than multiplied wrong).
int CpuBackend::common_rotation(int rotation, const Weight& w) {
  if (rotation >= 0 && rotation != w.rotation)
    throw Error(ErrorCode::InvalidModel, "quantized matrices of one input disagree on their Hadamard rotation (" +
                                             std::to_string(rotation) + " and " + std::to_string(w.rotation) +
                                             "): quantize the checkpoint again with vdiff quantize");
  return w.rotation;
}

void CpuBackend::prepare_activations(const float* A, int M, int K, int rotation, bool staged) {
  if (rotation >= 0) {
    static_assert(sizeof(QBlockA) % sizeof(float) == 0, "qa_ holds whole blocks");
    QBlockA* out = reinterpret_cast<QBlockA*>(qa_.ensure(static_cast<size_t>(M) * (K / kQBlock) * sizeof(QBlockA) / 4));
    // Rotated weights: the rows of A rotated alike (quant.h), into rotated_a_, quantized from there with
    // the scales times 1 / R (exact).
    float* rotated = rotation > 0 ? rotated_a_.ensure(static_cast<size_t>(M) * K) : nullptr;
    pool().parallel_for(M, [&](size_t begin, size_t end, int) {
      const float* rows = A + begin * K;
      if (rotated) {
        float* r = rotated + begin * K;
        std::memcpy(r, rows, (end - begin) * K * sizeof(float));
        for (size_t m = 0; m < end - begin; ++m) quant_->rotate(r + m * K, K, rotation);
        rows = r;
      }
      QBlockA* q = out + begin * (K / kQBlock);
      quant_->quantize(static_cast<int>(end - begin), K, rows, K, q);
      if (rotated)
        for (size_t b = 0; b < (end - begin) * (K / kQBlock); ++b) q[b].scale *= 1.0f / static_cast<float>(rotation);
    });
  }
  // The bf16 products take A rounded and laid out once for all outputs, rather than again by every work
  // item (bench/cpu: 16% of an llada-8b forward went to that).
  if (staged) {
    bf16_a_row_bytes_ = kernels_->bf16_a_row_bytes(K);
    char* out = reinterpret_cast<char*>(bf16_a_.ensure((static_cast<size_t>(M) * bf16_a_row_bytes_ + 3) / 4));
    pool().parallel_for(M, [&](size_t begin, size_t end, int) {
      kernels_->stage_bf16_a(static_cast<int>(end - begin), K, A + begin * K, K, out + begin * bf16_a_row_bytes_);
    });
  }
}

void CpuBackend::product(const Weight& w, const float* A, int K, int m0, int m1, int n0, int n1, float* C, int64_t ldc,
                         bool accumulate, int thread) {
  if (w.quantized) {
    const QBlockA* rows = reinterpret_cast<const QBlockA*>(qa_.data()) + static_cast<int64_t>(m0) * (K / kQBlock);
    return quant_->gemm(m1 - m0, n0, n1, K, rows, w.as_qb(), C, ldc, accumulate, gemm_scratch_[thread].data());
  }
  if (staged_bf16(w)) {
    const char* staged = reinterpret_cast<const char*>(bf16_a_.data()) + static_cast<size_t>(m0) * bf16_a_row_bytes_;
    return kernels_->gemm_staged(m1 - m0, n0, n1, K, staged, w.as_b(), C, ldc, accumulate,
                                 gemm_scratch_[thread].data());
  }
  kernels_->gemm(m1 - m0, n0, n1, K, A + static_cast<int64_t>(m0) * K, K, w.as_b(), C, ldc, accumulate,
                 gemm_scratch_[thread].data());
}

// Several products over row ranges of one A [M, K], in one parallel pass: the experts of a MoE layer,
// each over the rows routed to it (a grouped GEMM over sorted tokens). Work items are (product, rows
// chunk, run of column panels), as in linear(); each output row's values are those linear() would give it.
void CpuBackend::linear_grouped(const float* A, int M, int K, const std::vector<GroupOut>& outs) {
  const int chunk = std::clamp((1 << 20) / (4 * std::max(K, 1)) / 6 * 6, 192, 1026);
  int rotation = -1;
  bool any_staged = false;
  for (const GroupOut& o : outs) {
    if (o.w->quantized) rotation = common_rotation(rotation, *o.w);
    any_staged = any_staged || staged_bf16(*o.w);
  }
  prepare_activations(A, M, K, rotation, any_staged);
  struct Item {
    const GroupOut* out;
    int m0, m1, n0, n1;
  };
  std::vector<Item> items;
  int columns = 0;
  for (const GroupOut& o : outs) columns += o.w->rows;
  const int step = item_columns(columns);
  for (const GroupOut& o : outs)
    for (int m0 = o.m0; m0 < o.m1; m0 += chunk)
      for (int n0 = 0; n0 < o.w->rows; n0 += step)
        items.push_back({&o, m0, std::min(m0 + chunk, o.m1), n0, std::min(n0 + step, o.w->rows)});
  run_dynamic(pool(), items.size(), [&](size_t i, int thread) {
    const Item& item = items[i];
    const GroupOut& o = *item.out;
    product(*o.w, A, K, item.m0, item.m1, item.n0, item.n1, o.out + static_cast<int64_t>(item.m0 - o.m0) * o.ldc, o.ldc,
            false, thread);
  });
}

// QK-norm: every query and key head RMS-normalised over head_dim with its own weights (before RoPE).
void CpuBackend::qk_norm(const Block& blk, int T) {
  const int hd = config_.head_dim(), q_heads = config_.n_heads, kv_heads = config_.n_kv_heads;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  pool().parallel_for(T, [&](size_t begin, size_t end, int) {
    for (size_t t = begin; t < end; ++t) {
      for (int h = 0; h < q_heads; ++h) {
        float* x = q_.data() + (t * q_heads + h) * hd;
        kernels_->rmsnorm(x, blk.q_norm.data(), x, hd, eps);
      }
      for (int h = 0; h < kv_heads; ++h) {
        float* x = k_.data() + (t * kv_heads + h) * hd;
        kernels_->rmsnorm(x, blk.k_norm.data(), x, hd, eps);
      }
    }
  });
}

// A mixture-of-experts MLP over the normed rows xn_ [T, D], added to x_ (the residual):
//   route (cpu/moe.h) from the f32 router logits; sort the routed (token, slot) pairs by expert; per
//   ACTIVE expert one product over its rows (gate and up together, then down), all experts in one
//   parallel pass each; combine per token over its k slots in slot order, weighted; plus the shared
//   expert. A token's result does not depend on the other tokens of the batch, so the routed part runs in
//   chunks of kMoeTokens tokens.
void CpuBackend::moe(const Block& blk, int T) {
  float* y = moe_y_.data();
  for (int t0 = 0; t0 < T; t0 += kMoeTokens) routed_experts(blk, t0, std::min(kMoeTokens, T - t0));
  const int D = config_.d_model;
  const float* xn = xn_.data();
  if (blk.shared.gate.data) {
    const int Hs = blk.shared.gate.rows;
    linear(xn, T, D, {{&blk.shared.gate, gate_.data(), Hs, false}, {&blk.shared.up, up_.data(), Hs, false}});
    pool().parallel_for(T, [&](size_t begin, size_t end, int) {
      for (size_t t = begin; t < end; ++t)
        kernels_->silu_mul(gate_.data() + t * Hs, up_.data() + t * Hs, gate_.data() + t * Hs, Hs);
    });
    linear(gate_.data(), T, Hs, {{&blk.shared.down, y, D, true}});  // y += shared(xn)
  }
  float* x = x_.data();
  pool().parallel_for(T, [&](size_t begin, size_t end, int) {
    for (size_t i = begin * D; i < end * D; ++i) x[i] += y[i];
  });
}

// The routed experts of the tokens [t0, t0 + T) into moe_y_'s rows [t0, t0 + T).
void CpuBackend::routed_experts(const Block& blk, int t0, int T) {
  const int D = config_.d_model, E = config_.n_experts, k = config_.experts_per_token, Hm = config_.moe_hidden_size;
  const float* xn = xn_.data() + static_cast<size_t>(t0) * D;
  float* logits = router_logits_.data();
  linear(xn, T, D, {{&blk.router, logits, E, false}});
  route(router_params_, logits, T, E, blk.expert_bias.empty() ? nullptr : blk.expert_bias.data(), routing_);
  group_by_expert(routing_, E, groups_);
  const int R = T * k;  // routed rows, sorted by expert
  sorted_row_.resize(R);
  float* in = moe_in_.data();
  pool().parallel_for(R, [&](size_t begin, size_t end, int) {
    for (size_t r = begin; r < end; ++r) {
      std::memcpy(in + r * D, xn + static_cast<size_t>(groups_.token[r]) * D, D * sizeof(float));
      sorted_row_[groups_.slot[r]] = static_cast<int32_t>(r);
    }
  });
  float* g = moe_gate_.data();
  float* u = moe_up_.data();
  float* o = moe_out_.data();
  std::vector<GroupOut> gate_up, down;
  gate_up.reserve(2 * groups_.active.size());
  down.reserve(groups_.active.size());
  for (int e : groups_.active) {
    const int m0 = groups_.offsets[e], m1 = groups_.offsets[e + 1];
    const Mlp& x = blk.experts[e];
    gate_up.push_back({&x.gate, m0, m1, g + static_cast<size_t>(m0) * Hm, Hm});
    gate_up.push_back({&x.up, m0, m1, u + static_cast<size_t>(m0) * Hm, Hm});
    down.push_back({&x.down, m0, m1, o + static_cast<size_t>(m0) * D, D});
  }
  linear_grouped(in, R, D, gate_up);
  pool().parallel_for(R, [&](size_t begin, size_t end, int) {
    for (size_t r = begin; r < end; ++r) kernels_->silu_mul(g + r * Hm, u + r * Hm, g + r * Hm, Hm);
  });
  linear_grouped(g, R, Hm, down);
  // y[t] = sum over the token's slots j (in order) of weight * expert output.
  float* y = moe_y_.data() + static_cast<size_t>(t0) * D;
  pool().parallel_for(T, [&](size_t begin, size_t end, int) {
    for (size_t t = begin; t < end; ++t) {
      float* yt = y + t * D;
      for (int j = 0; j < k; ++j) {
        const size_t slot = t * k + j;
        const float w = routing_.weight[slot];
        const float* ot = o + static_cast<size_t>(sorted_row_[slot]) * D;
        if (j == 0)
          for (int d = 0; d < D; ++d) yt[d] = w * ot[d];
        else
          for (int d = 0; d < D; ++d) yt[d] += w * ot[d];
      }
    }
  });
}

void CpuBackend::rmsnorm_rows(const float* x, const std::vector<float>& w, float* y, int rows) {
  const int D = config_.d_model;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  pool().parallel_for(rows, [&](size_t begin, size_t end, int) {
    for (size_t r = begin; r < end; ++r) kernels_->rmsnorm(x + r * D, w.data(), y + r * D, D, eps);
  });
}

void CpuBackend::ensure_rope(int length) {
  if (length <= rope_len_) return;
  // Angles in double, so the f32 tables are the correctly rounded cos/sin of pos * theta^(-2i/hd) (the
  // PyTorch reference in tools/reference does the same; LLaDA's own code rounds the angle to f32 first,
  // which moves it by up to half an f32 ulp of the angle).
  // Partial rotary (rotary_dim < head_dim): the frequencies are those of a rotary_dim-wide head.
  const int rd = config_.rope_dims(), half = rd / 2;
  std::vector<double> inv_freq(half);
  for (int i = 0; i < half; ++i) inv_freq[i] = 1.0 / std::pow(config_.rope_theta, 2.0 * i / rd);
  rope_cos_.resize(static_cast<size_t>(length) * half);
  rope_sin_.resize(static_cast<size_t>(length) * half);
  for (int pos = rope_len_; pos < length; ++pos)
    for (int i = 0; i < half; ++i) {
      double angle = pos * inv_freq[i];
      rope_cos_[static_cast<size_t>(pos) * half + i] = static_cast<float>(std::cos(angle));
      rope_sin_[static_cast<size_t>(pos) * half + i] = static_cast<float>(std::sin(angle));
    }
  rope_len_ = length;
}

void CpuBackend::apply_rope(float* q, float* k, int T) {
  const int hd = config_.head_dim(), half = config_.rope_dims() / 2;
  const int q_heads = config_.n_heads, kv_heads = config_.n_kv_heads;
  // Position of token t is its index within its own canvas.
  std::vector<int> position(T);
  for (const SeqPlan& p : plan_)
    for (int i = 0; i < p.end - p.begin; ++i) position[p.offset + i] = p.begin + i;
  pool().parallel_for(T, [&](size_t begin, size_t end, int) {
    for (size_t t = begin; t < end; ++t) {
      const float* c = rope_cos_.data() + static_cast<size_t>(position[t]) * half;
      const float* s = rope_sin_.data() + static_cast<size_t>(position[t]) * half;
      auto rotate = [&](float* x) {
        // NeoX rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves of the
        // first rope_dims() dims of the head (the whole head unless rotary is partial); the rest pass.
        for (int i = 0; i < half; ++i) {
          float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] - x2 * s[i];
          x[i + half] = x2 * c[i] + x1 * s[i];
        }
      };
      for (int h = 0; h < q_heads; ++h) rotate(q + t * q_heads * hd + h * hd);
      for (int h = 0; h < kv_heads; ++h) rotate(k + t * kv_heads * hd + h * hd);
    }
  });
}

// Copies this layer's fresh keys and values of every cached sequence into its cache, at their positions.
void CpuBackend::store_in_caches(int layer) {
  const int kv_dim = config_.n_kv_heads * config_.head_dim();
  for (const SeqPlan& p : plan_) {
    if (!p.cache) continue;
    const CpuKVCache& c = cache_of(p);
    pool().parallel_for(p.end - p.begin, [&](size_t begin, size_t end, int) {
      for (size_t i = begin; i < end; ++i) {
        const float* k = k_.data() + (p.offset + i) * kv_dim;
        const float* v = v_.data() + (p.offset + i) * kv_dim;
        char* k_dst = c.keys(layer) + (p.begin + i) * c.row_bytes();
        char* v_dst = c.values(layer) + (p.begin + i) * c.row_bytes();
        if (c.type() == WType::F32) {
          std::memcpy(k_dst, k, c.row_bytes());
          std::memcpy(v_dst, v, c.row_bytes());
        } else {
          auto* kh = reinterpret_cast<uint16_t*>(k_dst);
          auto* vh = reinterpret_cast<uint16_t*>(v_dst);
          for (int j = 0; j < kv_dim; ++j) kh[j] = f32_to_bf16(k[j]), vh[j] = f32_to_bf16(v[j]);
        }
      }
    });
  }
}

void CpuBackend::attention(int layer) {
  const int hd = config_.head_dim();
  const int q_heads = config_.n_heads, kv_heads = config_.n_kv_heads, group = q_heads / kv_heads;
  const int64_t q_dim = static_cast<int64_t>(q_heads) * hd, kv_dim = static_cast<int64_t>(kv_heads) * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  struct Task {
    int seq, head, q0, nq;
  };
  std::vector<Task> tasks;
  for (size_t s = 0; s < plan_.size(); ++s) {
    const int n = plan_[s].end - plan_[s].begin;
    for (int h = 0; h < q_heads; ++h)
      for (int q0 = 0; q0 < n; q0 += kQueryBlock)
        tasks.push_back({static_cast<int>(s), h, q0, std::min(kQueryBlock, n - q0)});
  }
  run_dynamic(pool(), tasks.size(), [&](size_t i, int thread) {
    const Task& task = tasks[i];
    const SeqPlan& p = plan_[task.seq];
    const int kv_head = task.head / group;
    const float* Q = q_.data() + (p.offset + task.q0) * q_dim + task.head * hd;
    // Keys and values of all L positions: the fresh ones when the whole canvas was computed, else the
    // cache's (which holds this call's fresh ones for the computed range).
    MatB K, V;
    if (p.reads_cache) {
      const size_t head_bytes = static_cast<size_t>(kv_head) * hd * cache_of(p).element_size();
      K = MatB{cache_of(p).keys(layer) + head_bytes, cache_of(p).type(), kv_dim, false};
      V = MatB{cache_of(p).values(layer) + head_bytes, cache_of(p).type(), kv_dim, true};
    } else {
      K = MatB{k_.data() + p.offset * kv_dim + kv_head * hd, WType::F32, kv_dim, false};
      V = MatB{v_.data() + p.offset * kv_dim + kv_head * hd, WType::F32, kv_dim, true};
    }
    float* out = att_.data() + (p.offset + task.q0) * q_dim + task.head * hd;
    // Bidirectional: every query attends all L keys; block-causal: query i the keys [0, keys_of(i)). Each
    // row's result depends only on its query and its keys (cpu/attention.h), so a cached read equals the
    // full forward bit for bit.
    const AttentionRows rows{task.nq, p.begin + task.q0, p.length, p.block};
    attention_rows(*kernels_, rows, hd, scale, Q, q_dim, K, V, out, q_dim, scores_[thread].data());
  });
}

void CpuBackend::add_bias(float* y, const std::vector<float>& bias, int T) {
  const size_t n = bias.size();
  pool().parallel_for(T, [&](size_t begin, size_t end, int) {
    for (size_t t = begin; t < end; ++t)
      for (size_t j = 0; j < n; ++j) y[t * n + j] += bias[j];
  });
}

void CpuBackend::forward(const std::vector<ForwardSeq>& batch, float* logits, const std::atomic<bool>* cancel) {
  const BatchPlan plan = check_batch(batch);
  plan_ = plan.seqs;
  auto check_cancel = [&] {
    if (cancel && cancel->load(std::memory_order_relaxed)) throw Error(ErrorCode::Cancelled, "forward cancelled");
  };
  check_cancel();
  if (batch.empty()) return;

  int T = 0, rows = 0, max_len = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    T += plan_[s].end - plan_[s].begin;
    rows += batch[s].n_logit_rows;
    max_len = std::max(max_len, batch[s].length);
  }
  const int D = config_.d_model, H = config_.mlp_hidden_size, E = config_.embedding_size;
  const int q_dim = config_.n_heads * config_.head_dim(), kv_dim = config_.n_kv_heads * config_.head_dim();
  try {
    ensure_scratch(T, rows, max_len);
    ensure_rope(max_len);
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::OutOfMemory, "forward: cannot allocate scratch for " + std::to_string(T) + " tokens");
  }
  float* x = x_.data();
  float* xn = xn_.data();

  // Embedding lookup.
  std::vector<int32_t> tokens;
  tokens.reserve(T);
  for (size_t s = 0; s < batch.size(); ++s)
    tokens.insert(tokens.end(), batch[s].tokens + plan_[s].begin, batch[s].tokens + plan_[s].end);
  pool().parallel_for(T, [&](size_t begin, size_t end, int) {
    const size_t row_bytes = static_cast<size_t>(D) * (wte_.type == WType::F32 ? 4 : 2);
    for (size_t t = begin; t < end; ++t)
      kernels_->convert(static_cast<const char*>(wte_.data) + tokens[t] * row_bytes, wte_.type, x + t * D, D);
  });

  const std::vector<int> cached_before = caches_computing(plan);

  for (int layer = 0; layer < config_.n_layers; ++layer) {
    const Block& blk = blocks_[layer];
    check_cancel();
    rmsnorm_rows(x, blk.attn_norm, xn, T);
    linear(xn, T, D,
           {{&blk.q, q_.data(), q_dim, false}, {&blk.k, k_.data(), kv_dim, false}, {&blk.v, v_.data(), kv_dim, false}});
    if (!blk.q_bias.empty()) {
      add_bias(q_.data(), blk.q_bias, T), add_bias(k_.data(), blk.k_bias, T), add_bias(v_.data(), blk.v_bias, T);
    }
    if (!blk.q_norm.empty()) qk_norm(blk, T);
    apply_rope(q_.data(), k_.data(), T);
    store_in_caches(layer);
    attention(layer);
    linear(att_.data(), T, q_dim, {{&blk.attn_out, x, D, true}});  // residual: x += attn_out(att)

    rmsnorm_rows(x, blk.ff_norm, xn, T);
    if (blk.moe) {
      moe(blk, T);
      continue;
    }
    linear(xn, T, D, {{&blk.ff_proj, gate_.data(), H, false}, {&blk.up_proj, up_.data(), H, false}});
    pool().parallel_for(T, [&](size_t begin, size_t end, int) {
      for (size_t t = begin; t < end; ++t)
        kernels_->silu_mul(gate_.data() + t * H, up_.data() + t * H, gate_.data() + t * H, H);
    });
    linear(gate_.data(), T, H, {{&blk.ff_out, x, D, true}});  // residual: x += ff_out(...)
  }
  caches_computed(plan, cached_before);
  check_cancel();

  // Final norm and LM head for the requested rows only.
  if (rows == 0) return;
  float* r = rows_.data();
  int row = 0;
  for (size_t s = 0; s < batch.size(); ++s)
    for (int i = 0; i < batch[s].n_logit_rows; ++i, ++row)
      std::memcpy(r + static_cast<size_t>(row) * D,
                  x + static_cast<size_t>(plan_[s].offset + batch[s].logit_rows[i] - plan_[s].begin) * D,
                  D * sizeof(float));
  rmsnorm_rows(r, ln_f_, r, rows);
  linear(r, rows, D, {{&head_, logits, E, false}});
}

std::unique_ptr<KVCache> CpuBackend::allocate_kv_cache(int positions, uint64_t bytes) {
  return std::make_unique<CpuKVCache>(positions, config_.n_kv_heads * config_.head_dim(), cache_type_, bytes);
}

void CpuBackend::copy_kv_tables(const KVCache& from, KVCache& to, int positions) {
  const auto& src = static_cast<const CpuKVCache&>(from);  // checked by copy_kv: made here
  auto& dst = static_cast<CpuKVCache&>(to);
  const size_t bytes = static_cast<size_t>(positions) * src.row_bytes();
  for (int l = 0; l < config_.n_layers; ++l) {
    std::memcpy(dst.keys(l), src.keys(l), bytes);
    std::memcpy(dst.values(l), src.values(l), bytes);
  }
}

}  // namespace

std::unique_ptr<Backend> load(const std::string& dir, const LoadOptions& options) {
  const ModelConfig config = ModelConfig::from_file(dir + "/config.json");
  kernels_for_setting(options.cpu_isa);  // an ISA this CPU lacks fails before the weights are mapped
  return std::make_unique<CpuBackend>(config, TensorSet::load_dir(dir), options);
}

}  // namespace vdiff::cpu
