// bench/moe: the native writer of one quantized safetensors shard of a make-model preset, for the real
// shapes (llada2-mini: 16.26B random weights) that the TypeScript writer produces at a few million
// elements a second. bench/moe/write-model.ts plans the shard with make-model's own code (tensor list,
// shards, header, config.json, index, tokenizer) and hands this program the header bytes and, per tensor,
// how its values are made (uniformKeys of src/model/makeModel.ts); this program computes exactly what
// writeQuantizedSafetensors (src/model/quantize.ts) writes: the uniform values in double, rounded to f32,
// then to the stored dtype, rotated and quantized by the engine's hadamard_transform and
// quantize_weight_row (the arithmetic quantize.ts repeats). write-model.ts checks it byte for byte against the
// TypeScript writer on llada2-tiny before writing the big model.
//
//   moe-fill PLAN.json      PLAN: {"path", "header" (a file holding the header bytes), "format" (q8_0, q4_0
//                           or none), "threads", "tensors": [{"dtype", "rows", "cols", "quantize",
//                           "kind": "ones"|"uniform", "keyA", "keyB", "scale", "a"}]}; relative paths are
//                           taken from the plan's own directory (write-model.ts --plan-only).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/json.h"
#include "cpu/quant.h"

namespace {

uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

uint16_t f32_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even (no NaNs here)
  return static_cast<uint16_t>(bits >> 16);
}

float bf16_bits_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Tensor {
  std::string dtype;
  int64_t rows = 0, cols = 0;
  bool quantize = false;
  bool ones = false;
  uint32_t key_a = 0, key_b = 0;
  double scale = 0, a = 0;
};

// Elements [begin, end) of the tensor as f32, rounded to its stored dtype when that is BF16.
void values(const Tensor& t, int64_t begin, int64_t end, float* out) {
  for (int64_t i = begin; i < end; ++i) {
    float v;
    if (t.ones) {
      v = 1.0f;
    } else {
      const uint32_t x = fmix32(static_cast<uint32_t>(i) + t.key_a);
      const uint32_t y = fmix32(x ^ t.key_b);
      v = static_cast<float>((static_cast<double>(y) + 0.5) * t.scale - t.a);
    }
    if (t.dtype == "BF16") v = bf16_bits_to_f32(f32_to_bf16_bits(v));
    out[i - begin] = v;
  }
}

void write_all(std::FILE* f, const void* data, size_t bytes) {
  if (bytes > 0 && std::fwrite(data, 1, bytes, f) != bytes) throw std::runtime_error("short write");
}

// Runs fn(begin, end) over [0, n) split in `threads` contiguous parts.
template <class F>
void parallel(int threads, int64_t n, F fn) {
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    const int64_t b = n * t / threads, e = n * (t + 1) / threads;
    pool.emplace_back([=] { fn(b, e); });
  }
  for (auto& th : pool) th.join();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: moe-fill PLAN.json\n");
    return 2;
  }
  try {
    std::ifstream in(argv[1]);
    std::stringstream text;
    text << in.rdbuf();
    const vdiff::Json plan = vdiff::Json::parse(text.str());
    const std::string format = plan.find("format")->as_string();
    if (format != "q8_0" && format != "q4_0" && format != "none")
      throw std::runtime_error("format must be q8_0, q4_0 or none, got " + format);
    const vdiff::cpu::QType qtype = format == "q8_0" ? vdiff::cpu::QType::Q8_0 : vdiff::cpu::QType::Q4_0;
    const int threads = static_cast<int>(plan.find("threads")->as_int64());
    const std::filesystem::path here = std::filesystem::path(argv[1]).parent_path();
    auto resolve = [&](const std::string& p) {
      const std::filesystem::path path(p);
      return (path.is_absolute() ? path : here / path).string();
    };
    std::ifstream hin(resolve(plan.find("header")->as_string()), std::ios::binary);
    if (!hin) throw std::runtime_error("cannot read " + resolve(plan.find("header")->as_string()));
    const std::string header((std::istreambuf_iterator<char>(hin)), std::istreambuf_iterator<char>());
    const std::string out_path = resolve(plan.find("path")->as_string());
    std::FILE* f = std::fopen(out_path.c_str(), "wb");
    if (!f) throw std::runtime_error("cannot open " + out_path);
    std::setvbuf(f, nullptr, _IOFBF, 8 << 20);
    write_all(f, header.data(), header.size());
    uint64_t written = header.size();
    for (const vdiff::Json& j : plan.find("tensors")->items()) {
      Tensor t;
      t.dtype = j.find("dtype")->as_string();
      t.rows = j.find("rows")->as_int64();
      t.cols = j.find("cols")->as_int64();
      t.quantize = j.find("quantize")->as_bool();
      if (t.quantize && format == "none") throw std::runtime_error("a tensor to quantize in a plan of format none");
      t.ones = j.find("kind")->as_string() == "ones";
      if (!t.ones) {
        t.key_a = static_cast<uint32_t>(j.find("keyA")->as_int64());
        t.key_b = static_cast<uint32_t>(j.find("keyB")->as_int64());
        t.scale = j.find("scale")->as_number();
        t.a = j.find("a")->as_number();
      }
      const int64_t band = std::max<int64_t>(1, (int64_t{16} << 20) / (t.cols * 4));
      std::vector<float> buf(static_cast<size_t>(std::min(band, t.rows) * t.cols));
      if (!t.quantize) {
        std::vector<uint8_t> bytes(buf.size() * (t.dtype == "BF16" ? 2 : 4));
        for (int64_t r0 = 0; r0 < t.rows; r0 += band) {
          const int64_t n = std::min(band, t.rows - r0);
          parallel(threads, n, [&](int64_t b, int64_t e) {
            values(t, (r0 + b) * t.cols, (r0 + e) * t.cols, buf.data() + b * t.cols);
            if (t.dtype == "BF16") {
              auto* h = reinterpret_cast<uint16_t*>(bytes.data());
              for (int64_t i = b * t.cols; i < e * t.cols; ++i) h[i] = f32_to_bf16_bits(buf[i]);
            }
          });
          if (t.dtype == "BF16") {
            write_all(f, bytes.data(), n * t.cols * 2);
            written += n * t.cols * 2;
          } else if (t.dtype == "F32") {
            write_all(f, buf.data(), n * t.cols * 4);
            written += n * t.cols * 4;
          } else {
            throw std::runtime_error("moe-fill writes F32 and BF16 tensors only, got " + t.dtype);
          }
        }
        continue;
      }
      const int64_t out_row = qtype == vdiff::cpu::QType::Q8_0 ? t.cols : t.cols / 2;
      const int64_t blocks = t.cols / 32;
      std::vector<uint8_t> q(static_cast<size_t>(std::min(band, t.rows) * out_row));
      std::vector<uint16_t> scales(static_cast<size_t>(t.rows * blocks));
      for (int64_t r0 = 0; r0 < t.rows; r0 += band) {
        const int64_t n = std::min(band, t.rows - r0);
        parallel(threads, n, [&](int64_t b, int64_t e) {
          values(t, (r0 + b) * t.cols, (r0 + e) * t.cols, buf.data() + b * t.cols);
          const int rotation = vdiff::cpu::weight_rotation(qtype, static_cast<int>(t.cols));
          for (int64_t r = b; r < e; ++r) {
            vdiff::cpu::hadamard_transform(buf.data() + r * t.cols, static_cast<int>(t.cols), rotation);
            vdiff::cpu::quantize_weight_row(buf.data() + r * t.cols, static_cast<int>(t.cols), qtype,
                                            q.data() + r * out_row, scales.data() + (r0 + r) * blocks);
          }
        });
        write_all(f, q.data(), n * out_row);
        written += n * out_row;
      }
      write_all(f, scales.data(), scales.size() * 2);
      written += scales.size() * 2;
    }
    if (std::fclose(f) != 0) throw std::runtime_error("close failed");
    std::printf("%llu\n", static_cast<unsigned long long>(written));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-fill: %s\n", e.what());
    return 1;
  }
  return 0;
}
