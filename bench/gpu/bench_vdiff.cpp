// The vdiff side of the GPU benchmark (bench/gpu/run.sh): loads a model on a device and prints one JSON
// object with the backend's info, forward (step) latencies at the given shapes, and the tokens per second
// of vanilla generation and of dual-cache + threshold generation through the Engine.
//
//   vdiff-gpu-bench --model DIR [--device cuda|cpu] [--shapes 1x160,1x544,8x160,32x160] [--rows 32]
//       [--repeat 20] [--prompt-len 32 | --prompt-ids 1,2,3] [--gen 128] [--block 32] [--steps 128]
//       [--threshold 0.9] [--seed 0]
//
// A forward shape BxL is B canvases of L random tokens; each asks for its last `rows` positions (a
// block's worth, what a denoising step reads) through predict() at temperature 0, so the latency is a
// whole step's: forward, head on those rows, and the vocabulary reduction. Median and min over `repeat`
// runs after 3 warm-ups; on CUDA, then 5 steps with per-operation device times ("profile").
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/sampler.h"
#ifndef VDIFF_WITH_CUDA
#define VDIFF_WITH_CUDA 0
#endif
#if VDIFF_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

using namespace vdiff;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::vector<int32_t> random_prompt(std::mt19937& rng, const ModelConfig& c, int n) {
  std::uniform_int_distribution<int> d(0, c.vocab_size - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) {
    x = d(rng);
    if (x == c.mask_token_id || x == c.eos_token_id) x = 0;
  }
  return t;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out + "\"";
}

struct GenResult {
  double seconds = 0;
  int steps = 0;
  int forwards = 0;
  std::vector<int32_t> answer;
};

GenResult generate(Engine& engine, const std::vector<int32_t>& prompt, const SamplingParams& p) {
  GenResult r;
  const double t0 = now();
  const uint64_t id = engine.create(prompt, p);
  for (int guard = 0; guard < 100000; ++guard) {
    ++r.steps;
    if (engine.step({id}).at(0).finished) break;
  }
  r.seconds = now() - t0;
  r.forwards = static_cast<int>(engine.info(id).forward_passes);
  const std::vector<int32_t> canvas = engine.canvas(id);
  r.answer.assign(canvas.end() - p.gen_length, canvas.end());
  engine.release(id);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> a;
  for (int i = 1; i + 1 < argc; i += 2) a[argv[i]] = argv[i + 1];
  auto get = [&](const std::string& k, const std::string& d) { return a.count(k) ? a[k] : d; };
  try {
    const std::string dir = get("--model", "");
    if (dir.empty()) throw Error(ErrorCode::InvalidArgument, "--model DIR is required");
    LoadOptions options;
    options.device = get("--device", "cuda") == "cpu" ? Device::Cpu : Device::Cuda;
    options.threads = 0;
    const int repeat = std::stoi(get("--repeat", "20")), rows_wanted = std::stoi(get("--rows", "32"));
    const int prompt_len = std::stoi(get("--prompt-len", "32")), gen = std::stoi(get("--gen", "128"));
    const int block = std::stoi(get("--block", "32")), steps = std::stoi(get("--steps", "128"));
    const double threshold = std::stod(get("--threshold", "0.9"));
    std::mt19937 rng(std::stoul(get("--seed", "0")));

    double t0 = now();
    std::shared_ptr<Backend> backend = Backend::load(dir, options);
    const double load_s = now() - t0;
    const ModelConfig& c = backend->config();
    const BackendInfo info = backend->info();
    std::printf("{\"backend\": {\"backend\": %s, \"device\": %s, \"gemm\": %s, \"memory_used\": %llu, \"memory_total\": %llu, "
                "\"weight_dtype\": %s, \"parameters\": %llu, \"load_s\": %.2f},\n",
                json_string(info.backend).c_str(), json_string(info.device).c_str(), json_string(info.gemm).c_str(),
                static_cast<unsigned long long>(info.memory_used), static_cast<unsigned long long>(info.memory_total),
                json_string(backend->weight_dtype()).c_str(), static_cast<unsigned long long>(backend->parameter_count()),
                load_s);
    std::fflush(stdout);

    // Forward (step) latency.
    RowRule rule;
    rule.row_size = c.embedding_size, rule.vocab_size = c.vocab_size, rule.mask_token_id = c.mask_token_id;
    rule.eos_token_id = c.eos_token_id;
    std::printf(" \"forward\": [");
    std::string shapes = get("--shapes", "1x160,1x544,8x160,32x160");
    bool first = true;
    for (size_t at = 0; at < shapes.size();) {
      const size_t comma = std::min(shapes.find(',', at), shapes.size());
      const std::string shape = shapes.substr(at, comma - at);
      at = comma + 1;
      const int B = std::stoi(shape.substr(0, shape.find('x'))), L = std::stoi(shape.substr(shape.find('x') + 1));
      const int R = std::min(rows_wanted, L);
      std::vector<std::vector<int32_t>> canvases, rows(B);
      std::vector<ForwardSeq> batch;
      std::vector<RowTask> tasks;
      for (int b = 0; b < B; ++b) canvases.push_back(random_prompt(rng, c, L));
      for (int b = 0; b < B; ++b) {
        for (int r = L - R; r < L; ++r) rows[b].push_back(r);
        batch.push_back({canvases[b].data(), L, rows[b].data(), R});
        for (int r = 0; r < R; ++r) {
          RowTask t;
          t.cond = b * R + r, t.rule = &rule, t.position = r;
          tasks.push_back(t);
        }
      }
      std::vector<RowResult> out(tasks.size());
      std::vector<double> times;
      for (int i = 0; i < repeat + 3; ++i) {
        const double s = now();
        backend->predict(batch, tasks, out.data());
        if (i >= 3) times.push_back(now() - s);
      }
      std::sort(times.begin(), times.end());
      const double median = times[times.size() / 2], best = times.front();
      // FLOPs: the projections over every token, attention (QK^T and PV) per canvas, the head over the rows.
      const double D = c.d_model, H = c.mlp_hidden_size, hd = c.head_dim();
      const double per_token = c.n_layers * 2.0 * (D * (c.n_heads * hd + 2 * c.n_kv_heads * hd) + c.n_heads * hd * D + 3 * H * D);
      const double attention = c.n_layers * 4.0 * c.n_heads * hd * double(L) * L * B;
      const double flops = per_token * B * L + attention + 2.0 * D * c.embedding_size * B * R;
      // Then 5 more steps with per-operation device times (CUDA events), kept apart from the timings above.
      std::string profile = "null";
#if VDIFF_WITH_CUDA
      if (info.backend == "cuda") {
        cuda::set_profiling(true);
        for (int i = 0; i < 5; ++i) backend->predict(batch, tasks, out.data());
        cuda::set_profiling(false);
        profile = cuda::take_profile();
      }
#endif
      std::printf("%s\n  {\"batch\": %d, \"length\": %d, \"rows\": %d, \"median_ms\": %.3f, \"min_ms\": %.3f, \"tflops\": %.1f, "
                  "\"profile\": %s}",
                  first ? "" : ",", B, L, R * B, median * 1e3, best * 1e3, flops / median / 1e12, profile.c_str());
      std::fflush(stdout);
      first = false;
    }
    std::printf("],\n");

    // Generation through the Engine, batch 1: vanilla, then dual cache + threshold.
    Engine engine(backend);
    std::vector<int32_t> prompt = random_prompt(rng, c, prompt_len);
    if (a.count("--prompt-ids")) {  // the PyTorch side's prompt, so that the answers can be compared
      prompt.clear();
      const std::string ids = a["--prompt-ids"];
      for (size_t at = 0; at < ids.size();) {
        const size_t comma = std::min(ids.find(',', at), ids.size());
        prompt.push_back(static_cast<int32_t>(std::stol(ids.substr(at, comma - at))));
        at = comma + 1;
      }
    }
    SamplingParams vanilla;
    vanilla.gen_length = gen, vanilla.block_length = block, vanilla.steps = steps;
    SamplingParams dual = vanilla;
    dual.kv_cache = KVCacheMode::Dual;
    dual.parallel_threshold = threshold;
    generate(engine, prompt, vanilla);  // warm-up
    const GenResult v = generate(engine, prompt, vanilla);
    generate(engine, prompt, dual);
    const GenResult d = generate(engine, prompt, dual);
    auto answer_json = [](const std::vector<int32_t>& t) {
      std::string s = "[";
      for (size_t i = 0; i < t.size(); ++i) s += (i ? "," : "") + std::to_string(t[i]);
      return s + "]";
    };
    std::printf(" \"generate\": {\"prompt_length\": %d, \"gen_length\": %d, \"block_length\": %d, \"steps\": %d,\n",
                static_cast<int>(prompt.size()), gen,
                block, steps);
    std::printf("  \"vanilla\": {\"seconds\": %.4f, \"tokens_per_s\": %.2f, \"steps\": %d, \"forwards\": %d, \"answer\": %s},\n",
                v.seconds, gen / v.seconds, v.steps, v.forwards, answer_json(v.answer).c_str());
    std::printf("  \"dual_threshold\": {\"threshold\": %.2f, \"seconds\": %.4f, \"tokens_per_s\": %.2f, \"steps\": %d, "
                "\"forwards\": %d, \"answer\": %s}},\n",
                threshold, d.seconds, gen / d.seconds, d.steps, d.forwards, answer_json(d.answer).c_str());
    std::printf(" \"prompt\": %s}\n", answer_json(prompt).c_str());
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "{\"error\": {\"code\": \"%s\", \"message\": %s}}\n", error_code_name(e.code()), json_string(e.what()).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "{\"error\": {\"code\": \"INTERNAL\", \"message\": %s}}\n", json_string(e.what()).c_str());
    return 1;
  }
}
