// bench/moe: a block-diffusion MoE model's denoising step against the memory-bandwidth floor, on the CPU
// (or, --device cuda, on a GPU: bench/gpu/moe.sh). Prints one JSON object on stdout (and progress on stderr).
//
//   1. Bandwidth: a streaming read of a buffer far larger than the caches (sum of 64-bit words, every
//      thread on its own part at once), best of several passes: bytes / s.
//   2. Per batch size (1 and 8 by default): that many sequences of a random prompt of --prompt tokens and
//      --gen answer tokens, stepped together through the engine (vdiff::Engine, temperature 0, the model's
//      block length, --steps steps per block, the exact block KV cache). Each step is timed, with its phase
//      (prefill / denoise / commit), its major page faults and the experts it touched (cpu/moe.h's
//      grouping counters: the active experts of every MoE layer's one grouped product).
//   3. The floor of a denoising step: the bytes of weights it reads — every attention, dense-MLP, router,
//      shared-expert and head matrix, the embedding rows of its tokens, and each touched expert's three
//      matrices, as stored (WeightRef::bytes: quantized or not) — over the measured bandwidth.
//   Peak RSS is getrusage's ru_maxrss (the mapped weights the process touched included).
//   --device cuda: the same steps on the CUDA backend (the experts grouped on the host by the same code,
//   so the counters hold); the floor's bandwidth is the GPU's, given by --bandwidth-gbps (bench/gpu/moe.sh
//   measures it with a device-to-device copy), and the backend's device memory is reported.
//
// Built by bench/moe/run.sh against libvdiff_core.a:
//   moebench --model DIR [--threads 2] [--batches 1,8] [--prompt 32] [--gen 64] [--steps 8]
//            [--bandwidth-mib 1024] [--seed 1] [--device cpu|cuda] [--bandwidth-gbps G]
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/backend.h"
#include "core/config.h"
#include "core/engine.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "cpu/moe.h"

using namespace vdiff;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

// The last component of a path (the model directory's name: the results carry no machine paths).
std::string base_name(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path.substr(path.find_last_of('/') + 1);
}

long major_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_majflt;
}

long peak_rss_kib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss;
}

// Streaming read: `threads` threads each sum their own contiguous part of a `bytes` buffer at once.
double bandwidth(size_t bytes, int threads, int passes) {
  const size_t words = bytes / 8;
  std::unique_ptr<uint64_t[]> buf(new uint64_t[words]);
  for (size_t i = 0; i < words; ++i) buf[i] = i * 0x9e3779b97f4a7c15ull;
  double best = 0;
  std::atomic<uint64_t> sink{0};
  for (int p = 0; p < passes; ++p) {
    std::vector<std::thread> pool;
    const double t0 = now();
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        const size_t b = words * t / threads, e = words * (t + 1) / threads;
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        size_t i = b;
        for (; i + 4 <= e; i += 4) {
          s0 += buf[i];
          s1 += buf[i + 1];
          s2 += buf[i + 2];
          s3 += buf[i + 3];
        }
        for (; i < e; ++i) s0 += buf[i];
        sink.fetch_add(s0 + s1 + s2 + s3);
      });
    for (auto& th : pool) th.join();
    best = std::max(best, static_cast<double>(words * 8) / (now() - t0));
  }
  if (sink.load() == 42) std::fprintf(stderr, " ");
  return best;
}

uint64_t mlp_bytes(const MlpWeights& m) { return m.present() ? m.gate.bytes() + m.up.bytes() + m.down.bytes() : 0; }

struct WeightBytes {
  uint64_t attention = 0, dense_mlp = 0, routers = 0, shared = 0, norms = 0, head = 0, embed_row = 0, expert = 0;
  uint64_t all_experts = 0, total = 0;
  int moe_layers = 0, experts = 0;
  std::string quant;
  uint64_t dense_per_step(int rows) const {
    return attention + dense_mlp + routers + shared + norms + head + embed_row * rows;
  }
};

WeightBytes weight_bytes(const std::string& dir) {
  const ModelConfig config = ModelConfig::from_file(dir + "/config.json");
  const TensorSet tensors = TensorSet::load_dir(dir);
  const ModelWeights w = find_weights(tensors, config, family_of(config));
  WeightBytes b;
  b.embed_row = w.embed.bytes() / w.embed.rows;
  b.head = w.head.bytes();
  b.norms = w.final_norm.bytes();
  b.experts = config.n_experts;
  for (const LayerWeights& l : w.layers) {
    b.attention += l.q.bytes() + l.k.bytes() + l.v.bytes() + l.o.bytes();
    b.norms += l.attn_norm.bytes() + l.ffn_norm.bytes() + (l.q_norm.data ? l.q_norm.bytes() + l.k_norm.bytes() : 0);
    b.dense_mlp += mlp_bytes(l.mlp);
    if (l.moe.experts.empty()) continue;
    ++b.moe_layers;
    b.routers += l.moe.router.bytes() + (l.moe.expert_bias.data ? l.moe.expert_bias.bytes() : 0);
    b.shared += mlp_bytes(l.moe.shared);
    b.expert = mlp_bytes(l.moe.experts[0]);
    for (const MlpWeights& e : l.moe.experts) b.all_experts += mlp_bytes(e);
    if (b.quant.empty()) b.quant = quant_name(l.moe.experts[0].gate.quant);
  }
  if (b.quant.empty()) b.quant = quant_name(w.head.quant);
  b.total = w.bytes;
  return b;
}

struct StepRecord {
  Phase phase;
  double ms;
  long majflt;
  uint64_t experts;  // active experts summed over the step's MoE layers
  uint64_t calls;    // grouped products (MoE layers x forwards)
  int rows;          // rows the step's forward computed (all sequences)
};

const char* phase_name(Phase p) {
  switch (p) {
    case Phase::Prefill: return "prefill";
    case Phase::Denoise: return "denoise";
    case Phase::Commit: return "commit";
  }
  return "?";
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  std::string model;
  int threads = 2, prompt_len = 32, gen = 64, steps = 8, seed = 1;
  size_t bandwidth_mib = 1024;
  Device device = Device::Cpu;
  double given_gbps = 0;  // > 0: the floor's bandwidth, not measured here
  std::vector<int> batches = {1, 8};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--model") model = v;
    else if (a == "--threads") threads = std::atoi(v.c_str());
    else if (a == "--prompt") prompt_len = std::atoi(v.c_str());
    else if (a == "--gen") gen = std::atoi(v.c_str());
    else if (a == "--steps") steps = std::atoi(v.c_str());
    else if (a == "--seed") seed = std::atoi(v.c_str());
    else if (a == "--bandwidth-mib") bandwidth_mib = std::strtoul(v.c_str(), nullptr, 10);
    else if (a == "--bandwidth-gbps") given_gbps = std::atof(v.c_str());
    else if (a == "--device" && (v == "cpu" || v == "cuda")) device = v == "cpu" ? Device::Cpu : Device::Cuda;
    else if (a == "--batches") {
      batches.clear();
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ',')) batches.push_back(std::atoi(item.c_str()));
    } else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  if (model.empty()) {
    std::fprintf(stderr,
                 "usage: moebench --model DIR [--threads 2] [--batches 1,8] [--prompt 32] [--gen 64] [--steps 8]\n"
                 "                [--device cpu|cuda] [--bandwidth-gbps G] [--bandwidth-mib 1024] [--seed 1]\n");
    return 2;
  }
  try {
    const WeightBytes wb = weight_bytes(model);
    LoadOptions options;
    options.threads = threads;
    options.device = device;
    const double t_load = now();
    std::shared_ptr<Backend> backend = Backend::load(model, options);
    const double load_s = now() - t_load;
    const ModelConfig& config = backend->config();
    const BackendInfo info = backend->info();
    Engine engine(backend);
    std::mt19937 rng(seed);
    // Prompt tokens away from the special ids at the top of the vocabulary.
    std::uniform_int_distribution<int> token(100, std::min(config.vocab_size, config.mask_token_id) - 100);

    struct Run {
      int batch, steps, prefill, denoise, commit, blocks, expected_forwards, forwards, eos;
      double ms_median, ms_min, ms_max, experts, faults, touched, rss_gib;
      unsigned long long calls;
    };
    std::vector<Run> runs;
    for (int batch : batches) {
      SamplingParams p;
      p.gen_length = gen;
      p.block_length = config.block_length;
      p.steps = steps;
      p.temperature = 0;
      p.kv_cache = KVCacheMode::Prefix;
      std::vector<uint64_t> ids;
      for (int b = 0; b < batch; ++b) {
        std::vector<int32_t> prompt(prompt_len);
        for (auto& t : prompt) t = token(rng);
        ids.push_back(engine.create(prompt, p));
      }
      std::vector<StepRecord> records;
      std::vector<uint64_t> live = ids;
      std::vector<int> forward_passes(batch, 0);
      int eos_finished = 0;
      std::fprintf(stderr, "batch %d:", batch);
      while (!live.empty()) {
        const long f0 = major_faults();
        const cpu::GroupingCounters g0 = cpu::grouping_counters();
        const double t0 = now();
        const std::vector<StepOutput> out = engine.step(live);
        const double ms = (now() - t0) * 1e3;
        const cpu::GroupingCounters g1 = cpu::grouping_counters();
        StepRecord r{out[0].phase,        ms, major_faults() - f0, g1.active_experts - g0.active_experts,
                     g1.calls - g0.calls, 0};
        for (const StepOutput& o : out)
          if (o.phase != r.phase) throw std::runtime_error("sequences of one batch in different phases");
        records.push_back(r);
        std::fprintf(stderr, " %s %.0f ms", phase_name(r.phase), ms);
        std::vector<uint64_t> next;
        for (size_t i = 0; i < out.size(); ++i) {
          const size_t index = std::find(ids.begin(), ids.end(), out[i].id) - ids.begin();
          forward_passes[index] = out[i].forward_passes;
          if (!out[i].finished) next.push_back(out[i].id);
          else if (out[i].reason == FinishReason::Eos) ++eos_finished;
        }
        live = next;
      }
      std::fprintf(stderr, "\n");
      for (uint64_t id : ids) engine.release(id);
      Run run{};
      run.batch = batch;
      run.steps = static_cast<int>(records.size());
      std::vector<double> denoise_ms, denoise_experts, denoise_faults;
      for (const StepRecord& r : records) {
        if (r.phase == Phase::Prefill) ++run.prefill;
        if (r.phase == Phase::Commit) ++run.commit;
        if (r.phase != Phase::Denoise) continue;
        ++run.denoise;
        denoise_ms.push_back(r.ms);
        denoise_experts.push_back(static_cast<double>(r.experts));
        denoise_faults.push_back(static_cast<double>(r.majflt));
        run.calls = r.calls;
      }
      run.blocks =
          (prompt_len + gen + config.block_length - 1) / config.block_length - prompt_len / config.block_length;
      run.expected_forwards = (prompt_len / config.block_length > 0 ? 1 : 0) + run.blocks * steps + (run.blocks - 1);
      run.forwards = *std::max_element(forward_passes.begin(), forward_passes.end());
      run.eos = eos_finished;
      run.ms_median = median(denoise_ms);
      run.ms_min = denoise_ms.empty() ? 0 : *std::min_element(denoise_ms.begin(), denoise_ms.end());
      run.ms_max = denoise_ms.empty() ? 0 : *std::max_element(denoise_ms.begin(), denoise_ms.end());
      run.experts = median(denoise_experts);
      run.faults = median(denoise_faults);
      run.touched = static_cast<double>(wb.dense_per_step(batch * config.block_length)) + run.experts * wb.expert;
      run.rss_gib = peak_rss_kib() / 1048576.0;
      runs.push_back(run);
      std::fprintf(stderr, "batch %d: %.1f ms per denoising step (median), %.0f experts/step\n", batch, run.ms_median,
                   run.experts);
    }
    // The bandwidth is measured after the runs: its buffer would count in their peak RSS.
    const double peak_rss = peak_rss_kib() / 1048576.0;
    double bw = given_gbps * 1e9, bw1 = 0;
    if (given_gbps <= 0) {
      std::fprintf(stderr, "bandwidth: streaming read of %zu MiB on %d threads\n", bandwidth_mib, threads);
      bw = bandwidth(bandwidth_mib << 20, threads, 5);
      bw1 = bandwidth(bandwidth_mib << 20, 1, 3);
    }
    const BackendInfo after = backend->info();

    std::string runs_json;
    for (const Run& r : runs) {
      const double floor_ms = r.touched / bw * 1e3;
      const double pct = r.ms_median > 0 ? 100.0 * floor_ms / r.ms_median : 0;
      std::fprintf(stderr, "batch %d: floor %.1f ms, %.1f%% of the measured %.1f ms\n", r.batch, floor_ms, pct,
                   r.ms_median);
      char buf[4096];
      std::snprintf(
          buf, sizeof buf,
          "%s{\"batch\": %d, \"steps\": %d, \"prefill_steps\": %d, \"denoise_steps\": %d, \"commit_steps\": %d, "
          "\"blocks\": %d, \"expected_forwards\": %d, \"forward_passes_per_sequence\": %d, \"finished_by_eos\": %d, "
          "\"denoise_ms_median\": %.1f, \"denoise_ms_min\": %.1f, \"denoise_ms_max\": %.1f, "
          "\"experts_touched_per_step_median\": %.0f, \"experts_touched_per_layer\": %.1f, "
          "\"moe_calls_per_step\": %llu, \"touched_bytes_per_step\": %.0f, \"floor_ms\": %.1f, \"floor_pct\": %.1f, "
          "\"major_faults_per_denoise_step_median\": %.0f, \"peak_rss_gib\": %.2f}",
          runs_json.empty() ? "" : ", ", r.batch, r.steps, r.prefill, r.denoise, r.commit, r.blocks,
          r.expected_forwards, r.forwards, r.eos, r.ms_median, r.ms_min, r.ms_max, r.experts,
          wb.moe_layers ? r.experts / wb.moe_layers : 0, r.calls, r.touched, floor_ms, pct, r.faults, r.rss_gib);
      runs_json += buf;
    }
    std::printf(
        "{\"cpu\": \"%s\", \"threads\": %d, \"model\": \"%s\", \"quant\": \"%s\", \"backend\": \"%s\", "
        "\"device\": \"%s\", \"device_memory_used_gib\": %.2f, \"gemm\": \"%s\", \"load_s\": %.1f, "
        "\"bandwidth_gbps\": %.2f, \"bandwidth_source\": \"%s\", \"bandwidth_1thread_gbps\": %.2f, "
        "\"bandwidth_buffer_mib\": %zu, "
        "\"weights\": {\"total_bytes\": %llu, \"attention\": %llu, \"dense_mlp\": %llu, \"routers\": %llu, "
        "\"shared_experts\": %llu, \"head\": %llu, \"one_expert\": %llu, \"all_experts\": %llu, \"moe_layers\": %d, "
        "\"experts_per_layer\": %d}, "
        "\"prompt\": %d, \"gen\": %d, \"steps_per_block\": %d, \"block_length\": %d, \"runs\": [%s], "
        "\"peak_rss_gib\": %.2f}\n",
        cpu_model().c_str(), threads, base_name(model).c_str(), wb.quant.c_str(), info.backend.c_str(),
        after.device.c_str(), after.memory_used / 1073741824.0, info.gemm.c_str(), load_s, bw / 1e9,
        given_gbps > 0 ? "given" : "streaming read (host)", bw1 / 1e9, bandwidth_mib, static_cast<unsigned long long>(wb.total),
        static_cast<unsigned long long>(wb.attention), static_cast<unsigned long long>(wb.dense_mlp),
        static_cast<unsigned long long>(wb.routers), static_cast<unsigned long long>(wb.shared),
        static_cast<unsigned long long>(wb.head), static_cast<unsigned long long>(wb.expert),
        static_cast<unsigned long long>(wb.all_experts), wb.moe_layers, wb.experts, prompt_len, gen, steps,
        config.block_length, runs_json.c_str(), peak_rss);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moebench: %s\n", e.what());
    return 1;
  }
  return 0;
}
