// vdiff-cli: load a model and run one generation, a timed benchmark, or print what was loaded. Prints
// JSON on stdout; failures print {"error": {"code", "message"}} on stderr and exit 1.
//
//   vdiff-cli generate --model DIR --prompt-ids 1,2,3 [--gen 128 --block 32 --steps 128 --temperature 0
//       --cfg 0 --remasking low_confidence|random --seed 0 --threads N --batch B --eot ID
//       --logits-eos-inf --confidence-eos-eot-inf --trace --suffix-ids 4,5 --top-k K --top-p P
//       --threshold T --factor F --early-stop --kv-cache none|prefix|dual --kv-refresh N
//       --kv-cache-dtype f32|bf16 --kv-budget-mb N]
//   vdiff-cli bench --model DIR [--prompt-len 32 --gen 128 --block 32 --steps 128 --batch 1,8
//       --kv-cache none,prefix,dual --threads 2 --repeat 3 --seed 0 --prompt-ids 1,2,3 (and the sampling
//       flags of generate)]
//       --repeat 0 skips the forward latency part; the denoising part runs once per cache mode and batch.
//   vdiff-cli info --model DIR [--threads N]
//   vdiff-cli bench-kernels
//       core clock, measured FMA peak and GEMM GFLOP/s of the active kernels on 1 and 2 threads (text)
//   vdiff-cli bench-forward --model DIR [--threads 2 --seq-len 160 --rows 32 --read B,E]
//       forward latency of the model (one JSON line); with --read, of a KV cache read computing [B, E)
//   Every command that loads a model takes --cpu-isa auto|portable|avx2|avx512 (LoadOptions::cpu_isa;
//   auto: the widest the CPU has, or the environment variable VDIFF_ISA's choice).
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <new>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli/bench_native.h"
#include "core/backend.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/sampler.h"

using namespace vdiff;

namespace {

constexpr const char* kUsage =
    "usage: vdiff-cli generate --model DIR --prompt-ids 1,2,3 [--gen N --block N --steps N --temperature T "
    "--cfg S --remasking low_confidence|random --seed N --threads N --batch B --eot ID --logits-eos-inf "
    "--confidence-eos-eot-inf --trace --suffix-ids 4,5 --top-k K --top-p P --threshold T --factor F "
    "--early-stop --kv-cache none|prefix|dual --kv-refresh N --kv-cache-dtype f32|bf16 --kv-budget-mb N "
    "--pack-weights-max-mb N]\n"
    "       vdiff-cli bench --model DIR [--prompt-len N --gen N --block N --steps N --batch 1,8 "
    "--kv-cache none,prefix,dual --threads N --repeat N --seed N --prompt-ids 1,2,3 (and the sampling flags of "
    "generate)]\n"
    "       vdiff-cli info --model DIR [--threads N]\n"
    "       vdiff-cli bench-kernels\n"
    "       vdiff-cli bench-forward --model DIR [--threads N --seq-len L --rows R --read B,E]\n"
    "       (the commands that load a model also take --cpu-isa auto|portable|avx2|avx512; VDIFF_ISA sets auto's)";

Error usage(const std::string& message) { return Error(ErrorCode::InvalidArgument, message); }

// ---- arguments ------------------------------------------------------------------------------------

const std::set<std::string> kSwitches = {"--logits-eos-inf", "--confidence-eos-eot-inf", "--trace", "--early-stop"};

struct Args {
  std::string command;
  std::map<std::string, std::string> values;  // "--gen" -> "128"
  std::set<std::string> switches;             // "--trace"

  bool has(const std::string& key) const { return values.count(key) > 0; }
  std::string text(const std::string& key, const std::string& fallback) const {
    auto it = values.find(key);
    return it == values.end() ? fallback : it->second;
  }
  std::string required(const std::string& key) const {
    auto it = values.find(key);
    if (it == values.end()) throw usage("missing " + key);
    return it->second;
  }
  long long integer(const std::string& key, long long fallback) const {
    return has(key) ? parse_integer(key, values.at(key)) : fallback;
  }
  double number(const std::string& key, double fallback) const {
    if (!has(key)) return fallback;
    const std::string& v = values.at(key);
    char* end = nullptr;
    const double d = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0') throw usage(key + " expects a number, got '" + v + "'");
    return d;
  }
  static long long parse_integer(const std::string& key, const std::string& v) {
    char* end = nullptr;
    const long long n = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0') throw usage(key + " expects an integer, got '" + v + "'");
    return n;
  }
  std::vector<long long> integers(const std::string& key, const std::string& fallback) const {
    std::vector<long long> out;
    std::stringstream in(text(key, fallback));
    std::string item;
    while (std::getline(in, item, ',')) out.push_back(parse_integer(key, item));
    return out;
  }
};

Args parse_args(int argc, char** argv) {
  if (argc < 2) throw usage(kUsage);
  Args args;
  args.command = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string key = argv[i];
    if (key.rfind("--", 0) != 0) throw usage("unexpected argument '" + key + "'\n" + kUsage);
    if (kSwitches.count(key)) {
      args.switches.insert(key);
      continue;
    }
    if (i + 1 >= argc) throw usage(key + " needs a value");
    args.values[key] = argv[++i];
  }
  return args;
}

int to_int(const std::string& key, long long v) {
  if (v < -2147483647LL || v > 2147483647LL) throw usage(key + " is out of range");
  return static_cast<int>(v);
}

// ---- JSON output ----------------------------------------------------------------------------------

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string json_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

template <typename T>
std::string json_ints(const std::vector<T>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + std::to_string(v[i]);
  return out + "]";
}

const char* reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Eos: return "eos";
    case FinishReason::Length: return "length";
    case FinishReason::None: break;
  }
  return "none";
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// The host threads a run uses: --threads, or every core.
int threads_of(const Args& args) {
  const int threads = to_int("--threads", args.integer("--threads", 0));
  return threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// "backend":"cpu","device":"avx512","gemm":"avx512" — what ran, for every JSON line.
std::string backend_fields(const Backend& backend) {
  const BackendInfo i = backend.info();
  return "\"backend\":" + json_string(i.backend) + ",\"device\":" + json_string(i.device) +
         ",\"gemm\":" + json_string(i.gemm);
}

std::shared_ptr<Backend> load_model(const Args& args) {
  LoadOptions options;
  options.threads = to_int("--threads", args.integer("--threads", 0));
  const std::string device = args.text("--device", "cpu");
  if (device == "auto") options.device = Device::Auto;
  else if (device == "cuda") options.device = Device::Cuda;
  else if (device != "cpu") throw usage("--device must be auto, cpu or cuda, got '" + device + "'");
  const std::string dtype = args.text("--kv-cache-dtype", "f32");
  if (dtype == "bf16") options.kv_cache_dtype = KVCacheDType::BF16;
  else if (dtype != "f32") throw usage("--kv-cache-dtype must be f32 or bf16, got '" + dtype + "'");
  const long long budget_mb = args.integer("--kv-budget-mb", 0);
  if (budget_mb < 0) throw usage("--kv-budget-mb must be >= 0 (0: no bound)");
  options.kv_cache_budget_bytes = static_cast<uint64_t>(budget_mb) << 20;
  const long long pack_mb =
      args.integer("--pack-weights-max-mb", static_cast<long long>(options.pack_weights_max_bytes >> 20));
  if (pack_mb < 0) throw usage("--pack-weights-max-mb must be >= 0 (0: never pack)");
  options.pack_weights_max_bytes = static_cast<uint64_t>(pack_mb) << 20;
  options.cpu_isa = args.text("--cpu-isa", "auto");
  return Backend::load(args.required("--model"), options);
}

KVCacheMode kv_cache_mode(const std::string& name) {
  if (name == "none") return KVCacheMode::None;
  if (name == "prefix") return KVCacheMode::Prefix;
  if (name == "dual") return KVCacheMode::Dual;
  throw usage("--kv-cache must be none, prefix or dual, got '" + name + "'");
}

const char* kv_cache_name(KVCacheMode mode) {
  return mode == KVCacheMode::Prefix ? "prefix" : mode == KVCacheMode::Dual ? "dual" : "none";
}

SamplingParams sampling_params(const Args& args) {
  SamplingParams p;
  p.gen_length = to_int("--gen", args.integer("--gen", p.gen_length));
  p.block_length = to_int("--block", args.integer("--block", p.block_length));
  p.steps = to_int("--steps", args.integer("--steps", p.steps));
  p.temperature = args.number("--temperature", p.temperature);
  p.cfg_scale = args.number("--cfg", p.cfg_scale);
  p.seed = static_cast<uint64_t>(args.integer("--seed", 0));
  p.eot_token_id = to_int("--eot", args.integer("--eot", -1));
  p.logits_eos_inf = args.switches.count("--logits-eos-inf") > 0;
  p.confidence_eos_eot_inf = args.switches.count("--confidence-eos-eot-inf") > 0;
  p.top_k = to_int("--top-k", args.integer("--top-k", p.top_k));
  p.top_p = args.number("--top-p", p.top_p);
  p.parallel_threshold = args.number("--threshold", p.parallel_threshold);
  p.parallel_factor = args.number("--factor", p.parallel_factor);
  p.early_stop = args.switches.count("--early-stop") > 0;
  // bench takes a list of modes and sets each itself.
  if (args.command != "bench") p.kv_cache = kv_cache_mode(args.text("--kv-cache", "none"));
  p.kv_refresh_interval = to_int("--kv-refresh", args.integer("--kv-refresh", 0));
  const std::string remasking = args.text("--remasking", "low_confidence");
  if (remasking == "low_confidence") p.remasking = Remasking::LowConfidence;
  else if (remasking == "random") p.remasking = Remasking::Random;
  else throw usage("--remasking must be low_confidence or random, got '" + remasking + "'");
  return p;
}

// ---- commands -------------------------------------------------------------------------------------

int generate(const Args& args) {
  std::vector<int32_t> prompt;
  for (long long t : args.integers("--prompt-ids", args.required("--prompt-ids")))
    prompt.push_back(to_int("--prompt-ids", t));
  std::vector<int32_t> suffix;
  for (long long t : args.integers("--suffix-ids", "")) suffix.push_back(to_int("--suffix-ids", t));
  const SamplingParams base = sampling_params(args);
  const int batch = to_int("--batch", args.integer("--batch", 1));
  if (batch < 1) throw usage("--batch must be >= 1");
  const bool trace = args.switches.count("--trace") > 0;

  const auto load_start = std::chrono::steady_clock::now();
  Engine engine(load_model(args));
  const double load_ms = ms_since(load_start);

  // Sequence i of the batch uses seed + i.
  std::vector<uint64_t> ids;
  for (int i = 0; i < batch; ++i) {
    SamplingParams p = base;
    p.seed = base.seed + static_cast<uint64_t>(i);
    ids.push_back(engine.create(prompt, p, suffix));
  }

  std::vector<std::string> traces(ids.size());  // per sequence: [[[position, token, probability], ...], ...]
  std::vector<FinishReason> reasons(ids.size(), FinishReason::None);
  int steps = 0;
  const auto start = std::chrono::steady_clock::now();
  std::vector<uint64_t> running = ids;
  while (!running.empty()) {
    std::vector<uint64_t> still_running;
    for (const StepOutput& out : engine.step(running)) {
      const size_t index = std::find(ids.begin(), ids.end(), out.id) - ids.begin();
      if (trace) {
        std::string step = "[";
        for (size_t j = 0; j < out.committed.size(); ++j) {
          const CommittedToken& t = out.committed[j];
          step += (j ? ",[" : "[") + std::to_string(t.position) + "," + std::to_string(t.token) + "," +
                  json_number(t.probability) + "]";
        }
        traces[index] += (traces[index].empty() ? "" : ",") + step + "]";
      }
      if (out.finished) reasons[index] = out.reason;
      else still_running.push_back(out.id);
    }
    running = std::move(still_running);
    ++steps;
  }
  const double ms = ms_since(start);

  std::string json = "{\"answer\":" + json_ints(engine.canvas(ids[0]));
  if (batch > 1) {
    json += ",\"answers\":[";
    for (size_t i = 0; i < ids.size(); ++i) json += (i ? "," : "") + json_ints(engine.canvas(ids[i]));
    json += "]";
  }
  json += ",\"finish_reason\":" + json_string(reason_name(reasons[0]));
  if (trace) json += ",\"trace\":[" + traces[0] + "]";
  // Statistics of the first sequence: its denoising steps, canvas evaluations, and the tokens it
  // committed by sampling per step (an early stop's EOS fill is not sampled, so not counted).
  const SequenceInfo first = engine.info(ids[0]);
  json += ",\"sequence_steps\":" + std::to_string(first.steps_done) +
          ",\"forward_passes\":" + std::to_string(first.forward_passes) +
          ",\"tokens_denoised\":" + std::to_string(first.tokens_denoised) + ",\"tokens_per_step\":" +
          json_number(static_cast<double>(first.tokens_denoised) / std::max(1, first.steps_done)) +
          ",\"kv_cache\":" + json_string(kv_cache_name(base.kv_cache)) +
          ",\"kv_refreshes\":" + std::to_string(first.kv_refreshes);
  json += ",\"steps\":" + std::to_string(steps) + ",\"ms\":" + json_number(ms) +
          ",\"load_ms\":" + json_number(load_ms) + "}";
  std::printf("%s\n", json.c_str());
  return 0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// Process CPU time (all threads) in ms: on a shared machine a better measure of the work than wall time.
double cpu_ms() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// The 1-minute load average, to read the timings against (the machine may be shared).
double load_average() {
  double load = -1;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &load) != 1) load = -1;
    std::fclose(f);
  }
  return load;
}

int bench(const Args& args) {
  const int prompt_len = to_int("--prompt-len", args.integer("--prompt-len", 32));
  const int repeat = to_int("--repeat", args.integer("--repeat", 3));
  if (prompt_len < 0) throw usage("--prompt-len must be >= 0");
  if (repeat < 0) throw usage("--repeat must be >= 0 (0: no forward latency part)");
  const SamplingParams params = sampling_params(args);
  std::vector<int> batches;
  for (long long b : args.integers("--batch", "1,8")) {
    if (b < 1) throw usage("--batch sizes must be >= 1");
    batches.push_back(to_int("--batch", b));
  }
  std::vector<KVCacheMode> modes;
  {
    std::stringstream in(args.text("--kv-cache", "none"));
    for (std::string item; std::getline(in, item, ',');) modes.push_back(kv_cache_mode(item));
  }

  std::shared_ptr<Backend> model = load_model(args);
  const ModelConfig& config = model->config();
  if (params.gen_length < 1 || params.block_length < 1) throw usage("--gen and --block must be >= 1");
  const double load_before = load_average();

  // The given prompt, else a random one of ordinary tokens (no mask, no EOS). A trained model is rarely
  // confident about anything after a random prompt, so parallel decoding wants a real one.
  std::vector<int32_t> prompt;
  for (long long t : args.integers("--prompt-ids", "")) prompt.push_back(to_int("--prompt-ids", t));
  Rng rng(params.seed);
  while (!args.has("--prompt-ids") && static_cast<int>(prompt.size()) < prompt_len) {
    const int32_t t = static_cast<int32_t>(rng.next() % static_cast<uint64_t>(config.vocab_size));
    if (t != config.mask_token_id && t != config.eos_token_id) prompt.push_back(t);
  }

  if (static_cast<int>(prompt.size()) + params.gen_length > config.max_sequence_length)
    throw usage("the prompt plus --gen exceeds the model context");
  const int prompt_used = static_cast<int>(prompt.size());

  // Forward latency over the full canvas: logits for every row vs for one block of rows.
  std::vector<int32_t> canvas = prompt;
  canvas.resize(prompt.size() + params.gen_length, config.mask_token_id);
  const int length = static_cast<int>(canvas.size());
  std::vector<int32_t> all_rows(length), block_rows;
  for (int i = 0; i < length; ++i) all_rows[i] = i;
  for (int i = 0; i < std::min(params.block_length, params.gen_length); ++i) block_rows.push_back(prompt_used + i);
  auto time_forward = [&](const std::vector<int32_t>& rows) {
    std::vector<float> logits(rows.size() * static_cast<size_t>(config.embedding_size));
    const std::vector<ForwardSeq> batch = {
        ForwardSeq{canvas.data(), length, rows.data(), static_cast<int>(rows.size())}};
    model->forward(batch, logits.data());  // warm-up: page in the weights
    std::vector<double> times;
    for (int r = 0; r < repeat; ++r) {
      const auto start = std::chrono::steady_clock::now();
      model->forward(batch, logits.data());
      times.push_back(ms_since(start));
    }
    return times;
  };
  auto stats = [](const std::vector<double>& v) {
    return "{\"median\":" + json_number(median(v)) + ",\"min\":" + json_number(*std::min_element(v.begin(), v.end())) +
           "}";
  };
  std::string forward_ms = "null";
  if (repeat > 0)
    forward_ms = "{\"canvas\":" + std::to_string(length) + ",\"all_rows\":" + stats(time_forward(all_rows)) +
                 ",\"block_rows\":" + stats(time_forward(block_rows)) + "}";

  // Denoising throughput: a full generation per cache mode and batch size (sequence i seeded with
  // seed + i). Forwards per token: canvas evaluations (a cached step's partial forward counts as one)
  // over the answer tokens; canvas forwards per token: the positions they computed, in whole canvases.
  Engine engine(model);
  std::string denoise = "[";
  for (size_t mi = 0; mi < modes.size(); ++mi) {
    for (size_t bi = 0; bi < batches.size(); ++bi) {
      std::vector<uint64_t> ids;
      for (int i = 0; i < batches[bi]; ++i) {
        SamplingParams p = params;
        p.seed = params.seed + static_cast<uint64_t>(i);
        p.kv_cache = modes[mi];
        ids.push_back(engine.create(prompt, p));
      }
      const uint64_t cache_bytes = engine.info(ids[0]).kv_cache_bytes;
      std::vector<double> step_ms;
      long long sequence_steps = 0, denoised = 0, forwards = 0, refreshes = 0, computed = 0;
      const auto start = std::chrono::steady_clock::now();
      const double cpu_start = cpu_ms();
      while (!ids.empty()) {
        const auto step_start = std::chrono::steady_clock::now();
        std::vector<uint64_t> running;
        for (const StepOutput& out : engine.step(ids)) {
          ++sequence_steps;
          denoised += static_cast<long long>(out.committed.size()) - out.filled;
          if (out.finished) {
            forwards += out.forward_passes;
            refreshes += out.kv_refreshes;
            computed += out.positions_computed;
            engine.release(out.id);
          } else {
            running.push_back(out.id);
          }
        }
        step_ms.push_back(ms_since(step_start));
        ids = std::move(running);
      }
      const double total_ms = ms_since(start), total_cpu_ms = cpu_ms() - cpu_start;
      const double tokens = static_cast<double>(batches[bi]) * params.gen_length;
      denoise += std::string(mi + bi ? "," : "") + "{\"kv_cache\":" + json_string(kv_cache_name(modes[mi])) +
                 ",\"batch\":" + std::to_string(batches[bi]) + ",\"steps\":" + std::to_string(step_ms.size()) +
                 ",\"ms\":" + json_number(total_ms) + ",\"cpu_ms\":" + json_number(total_cpu_ms) +
                 ",\"step_ms_median\":" + json_number(median(step_ms)) +
                 ",\"tokens_per_s\":" + json_number(tokens / (total_ms / 1000.0)) +
                 ",\"tokens_per_cpu_s\":" + json_number(tokens / (total_cpu_ms / 1000.0)) +
                 ",\"tokens_per_step\":" + json_number(static_cast<double>(denoised) / sequence_steps) +
                 ",\"forwards_per_token\":" + json_number(forwards / tokens) +
                 ",\"refreshes_per_token\":" + json_number(refreshes / tokens) +
                 ",\"canvas_forwards_per_token\":" + json_number(computed / static_cast<double>(length) / tokens) +
                 ",\"kv_cache_bytes_per_sequence\":" + std::to_string(cache_bytes) + "}";
    }
  }
  denoise += "]";

  std::printf(
      "{%s,\"threads\":%d,\"weight_dtype\":%s,\"prompt_len\":%d,\"gen\":%d,\"block\":%d,\"steps\":%d,"
      "\"threshold\":%s,\"factor\":%s,\"load_average\":[%s,%s],\"forward_ms\":%s,\"denoise\":%s}\n",
      backend_fields(*model).c_str(), threads_of(args), json_string(model->weight_dtype()).c_str(), prompt_used,
      params.gen_length, params.block_length, params.steps, json_number(params.parallel_threshold).c_str(),
      json_number(params.parallel_factor).c_str(), json_number(load_before).c_str(),
      json_number(load_average()).c_str(), forward_ms.c_str(), denoise.c_str());
  return 0;
}

int info(const Args& args) {
  std::shared_ptr<Backend> model = load_model(args);
  const ModelConfig& c = model->config();
  std::printf(
      "{\"config\":{\"d_model\":%d,\"n_heads\":%d,\"n_kv_heads\":%d,\"n_layers\":%d,\"mlp_hidden_size\":%d,"
      "\"vocab_size\":%d,\"embedding_size\":%d,\"mask_token_id\":%d,\"eos_token_id\":%d,"
      "\"max_sequence_length\":%d,\"rope_theta\":%s,\"rms_norm_eps\":%s,\"weight_tying\":%s,"
      "\"include_bias\":%s},%s,\"threads\":%d,\"weight_dtype\":%s,\"parameter_count\":%llu,"
      "\"weight_bytes\":%llu,\"packed_weight_bytes\":%llu}\n",
      c.d_model, c.n_heads, c.n_kv_heads, c.n_layers, c.mlp_hidden_size, c.vocab_size, c.embedding_size,
      c.mask_token_id, c.eos_token_id, c.max_sequence_length, json_number(c.rope_theta).c_str(),
      json_number(c.rms_norm_eps).c_str(), c.weight_tying ? "true" : "false", c.include_bias ? "true" : "false",
      backend_fields(*model).c_str(), threads_of(args), json_string(model->weight_dtype()).c_str(),
      static_cast<unsigned long long>(model->parameter_count()), static_cast<unsigned long long>(model->weight_bytes()),
      static_cast<unsigned long long>(model->packed_weight_bytes()));
  return 0;
}

// bench-forward: the defaults of the benchmark (2 threads, a canvas of 160, the last 32 rows).
int bench_forward_command(Args args) {
  if (!args.has("--threads")) args.values["--threads"] = "2";
  const std::vector<long long> read = args.integers("--read", "");
  if (!read.empty() && (read.size() != 2 || read[0] < 0 || read[1] <= read[0]))
    throw usage("--read expects B,E with 0 <= B < E");
  const int seq_len = to_int("--seq-len", args.integer("--seq-len", 160));
  const int rows = to_int("--rows", args.integer("--rows", 32));
  if (seq_len < 1 || rows < 1 || rows > seq_len) throw usage("--seq-len and --rows must be >= 1, rows <= seq-len");
  auto model = load_model(args);
  return cli::bench_forward(*model, args.required("--model"), to_int("--threads", args.integer("--threads", 2)),
                            seq_len, rows, read.empty() ? -1 : to_int("--read", read[0]),
                            read.empty() ? -1 : to_int("--read", read[1]));
}

int fail(const char* code, const std::string& message) {
  std::fprintf(stderr, "{\"error\":{\"code\":%s,\"message\":%s}}\n", json_string(code).c_str(),
               json_string(message).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args args = parse_args(argc, argv);
    if (args.command == "generate") return generate(args);
    if (args.command == "bench") return bench(args);
    if (args.command == "info") return info(args);
    if (args.command == "bench-kernels") return cli::bench_kernels();
    if (args.command == "bench-forward") return bench_forward_command(args);
    throw usage("unknown command '" + args.command + "'\n" + kUsage);
  } catch (const Error& e) {
    return fail(error_code_name(e.code()), e.what());
  } catch (const std::bad_alloc&) {
    return fail("OUT_OF_MEMORY", "out of memory");
  } catch (const std::exception& e) {
    return fail("INTERNAL", e.what());
  }
}
