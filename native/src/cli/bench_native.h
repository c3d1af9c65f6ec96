// The native micro-benchmarks of vdiff-cli (they check nothing):
//   vdiff-cli bench-kernels     core clock, measured FMA peak and GEMM GFLOP/s of the active kernels on 1 and
//                               2 threads (bench_native.cpp)
//   vdiff-cli bench-forward     forward latency of a model directory, one JSON line (bench_forward below)
// Include after the model header: bench_forward is a template over the loaded model's type.
#pragma once
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace vdiff::cli {

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int bench_kernels();

// Forward latency over a random canvas of seq_len tokens asking for `rows` logit rows (the last ones); with
// read_begin >= 0, of a KV cache read computing [read_begin, read_end) (rows from read_begin). Best of at
// least 5 runs and 3 s; wall and process CPU time.
template <typename Model>
int bench_forward(Model& model, const std::string& dir, int threads, int seq_len, int rows, int read_begin,
                  int read_end) {
  std::mt19937 rng(3);
  std::vector<int32_t> tokens(seq_len);
  std::uniform_int_distribution<int> token(0, model.config().vocab_size - 1);
  for (auto& t : tokens) t = token(rng);
  std::vector<int32_t> logit_rows;
  const bool read = read_begin >= 0;
  for (int i = 0; i < rows; ++i) logit_rows.push_back(read ? read_begin + i : seq_len - rows + i);
  std::vector<float> logits(logit_rows.size() * model.config().embedding_size);
  auto cache = read ? model.make_kv_cache(seq_len) : nullptr;
  if (read) model.forward({{tokens.data(), seq_len, nullptr, 0, cache.get()}}, logits.data(), nullptr);
  auto run = [&] {
    if (read)
      model.forward({{tokens.data(), seq_len, logit_rows.data(), rows, cache.get(), read_begin, read_end}},
                    logits.data(), nullptr);
    else model.forward({{tokens.data(), seq_len, logit_rows.data(), rows}}, logits.data(), nullptr);
  };
  run();
  // Wall time, and process CPU time (all threads): on a shared machine the CPU time of a 1-thread run is
  // the better measure of the work itself.
  auto cpu_seconds = [] {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
  };
  std::vector<double> times, cpu_times;
  auto t0 = std::chrono::steady_clock::now();
  while (seconds_since(t0) < 3.0 || times.size() < 5) {
    auto t1 = std::chrono::steady_clock::now();
    double c1 = cpu_seconds();
    run();
    times.push_back(seconds_since(t1) * 1e3);
    cpu_times.push_back((cpu_seconds() - c1) * 1e3);
  }
  std::sort(times.begin(), times.end());
  std::sort(cpu_times.begin(), cpu_times.end());
  std::printf(
      "{\"model\": \"%s\", \"isa\": \"%s\", \"dtype\": \"%s\", \"parameters\": %llu, \"threads\": %d, \"seq_len\": %d, "
      "\"logit_rows\": %d, \"computed\": %d, \"median_ms\": %.3f, \"min_ms\": %.3f, \"median_cpu_ms\": %.3f, "
      "\"min_cpu_ms\": %.3f, \"runs\": %zu}\n",
      dir.c_str(), model.info().backend == "cpu" ? model.info().device.c_str() : cpu::active_kernels().isa,
      model.weight_dtype().c_str(), static_cast<unsigned long long>(model.parameter_count()), threads, seq_len, rows,
      read ? read_end - read_begin : seq_len, times[times.size() / 2], times[0], cpu_times[cpu_times.size() / 2],
      cpu_times[0], times.size());
  return 0;
}

}  // namespace vdiff::cli
