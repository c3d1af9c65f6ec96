// Quantized weights end to end (cpu/quant.h, weights.h): a checkpoint quantized at load and the same
// quantization read from a quantized safetensors file give the same logits bit for bit; the quantized
// forward stays close to the float one; batching and threads change nothing; the loader's errors.
#include "core/weights.h"
#include "tests/model_fixtures.h"

namespace vdiff::test {

namespace {

// Whether LoadOptions::quantize quantizes a tensor of the tiny model: a matrix with in-features a multiple
// of 32, not the embedding and not the head (model.transformer.ff_out, as opposed to a block's ff_out).
bool quantized_at_load(const std::string& name, const std::vector<int64_t>& shape) {
  return shape.size() == 2 && shape[1] % 32 == 0 && name.find("wte") == std::string::npos &&
         name != "model.transformer.ff_out.weight";
}

// Writes `m` with every projection and head matrix quantized the way LoadOptions::quantize does it (the
// embedding and norms as they are): the layout vdiff quantize writes. `rotation`: the metadata's
// "vdiff.rotation" ("hadamard": the rows rotated first, as vdiff quantize writes them; "": not rotated, as
// the checkpoints before it were; anything else is written as it is, for the loader's error).
void write_quantized(const fs::path& dir, const TinyModel& m, cpu::QType type, const std::string& bad_scale,
                     const std::string& rotation) {
  fs::create_directories(dir);
  write_file(dir / "config.json", tiny_config_json(m.spec));
  std::vector<TensorSpec> specs;
  for (const auto& [name, v] : m.tensors) {
    const std::vector<int64_t>& shape = m.shapes.at(name);
    const char* dtype = v.type == WType::F32 ? "F32" : v.type == WType::BF16 ? "BF16" : "F16";
    const bool matrix = quantized_at_load(name, shape);
    if (!matrix) {
      specs.push_back({name, dtype, shape, v.raw()});
      continue;
    }
    const int rows = static_cast<int>(shape[0]), cols = static_cast<int>(shape[1]);
    const int row_bytes = cols / 32 * cpu::qblock_bytes(type);
    std::string blocks(static_cast<size_t>(rows) * row_bytes, '\0');
    std::vector<uint16_t> scales(static_cast<size_t>(rows) * cols / 32);
    std::vector<float> row(cols);
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < cols; ++c) row[c] = static_cast<float>(v.exact[static_cast<size_t>(r) * cols + c]);
      quantize_row_rotated(row, type, rotation == "hadamard", reinterpret_cast<uint8_t*>(blocks.data()) + r * row_bytes,
                           scales.data() + static_cast<size_t>(r) * cols / 32);
    }
    specs.push_back({name, type == cpu::QType::Q8_0 ? "I8" : "U8", {rows, row_bytes}, blocks});
    std::vector<int64_t> scale_shape = {rows, cols / 32};
    if (name == bad_scale) scale_shape = {rows, cols / 32 - 1};
    specs.push_back({name + "_scale", "F16", scale_shape,
                     std::string(reinterpret_cast<const char*>(scales.data()), scales.size() * 2)
                         .substr(0, name == bad_scale ? rows * (cols / 32 - 1) * 2 : std::string::npos)});
  }
  write_file(dir / "model.safetensors",
             safetensors_bytes(specs, rotation.empty() ? "" : ",\"vdiff.rotation\":\"" + rotation + "\""));
}

// ... with the rotation of quantizing at load (cpu::weight_rotation).
void write_quantized(const fs::path& dir, const TinyModel& m, cpu::QType type, const std::string& bad_scale = "") {
  write_quantized(dir, m, type, bad_scale, cpu::weight_rotation(type, 32) > 0 ? "hadamard" : "");
}

// `m` with every matrix write_quantized quantizes replaced by the float weights its quantized rows stand
// for: the dequantized values, rotated back (H deq / R, quant.h) when they were rotated (`rotate`).
TinyModel dequantized(const TinyModel& m, cpu::QType type, bool rotate) {
  TinyModel out = m;
  for (auto& [name, v] : out.tensors) {
    const std::vector<int64_t>& shape = m.shapes.at(name);
    Values f;
    f.type = WType::F32;
    for (double x : v.exact) f.f32.push_back(static_cast<float>(x));
    if (quantized_at_load(name, shape)) {
      const int rows = static_cast<int>(shape[0]), cols = static_cast<int>(shape[1]);
      std::vector<uint8_t> blocks(cols);
      std::vector<uint16_t> scales(cols / 32);
      for (int r = 0; r < rows; ++r) {
        float* row = f.f32.data() + static_cast<size_t>(r) * cols;
        const int rotation =
            quantize_row_rotated(std::vector<float>(row, row + cols), type, rotate, blocks.data(), scales.data());
        const cpu::QMatB B{blocks.data(), scales.data(), type, cols, cols / 32};
        for (int c = 0; c < cols; ++c) row[c] = cpu::qweight_value(B, 0, c);
        if (rotation > 0) {
          cpu::hadamard_transform(row, cols, rotation);
          for (int c = 0; c < cols; ++c) row[c] /= static_cast<float>(rotation);
        }
      }
    }
    f.exact.assign(f.f32.begin(), f.f32.end());
    v = std::move(f);
  }
  return out;
}

double rms(const std::vector<float>& a) {
  double s = 0;
  for (float x : a) s += static_cast<double>(x) * x;
  return std::sqrt(s / std::max<size_t>(a.size(), 1));
}

double rms_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
  return std::sqrt(s / std::max<size_t>(a.size(), 1));
}

}  // namespace

void test_quant_model() {
  TempDir tmp;
  const std::string isa = cpu::active_kernels().isa;
  std::mt19937 rng(11);
  TinySpec spec;
  spec.d_model = 64;
  spec.hidden = 96;  // every in-feature count a multiple of 32, so every matrix is quantized
  for (WType type : {WType::F32, WType::BF16}) {
    TinyModel tiny = make_tiny(spec, type, 300 + static_cast<int>(type));
    const fs::path dir = tmp.path / (std::string("f-") + type_name(type));
    write_tiny(dir, tiny);
    auto dense = Backend::load(dir.string(), test_options(2));
    std::vector<int32_t> a = random_tokens(rng, 70, spec.vocab), b = random_tokens(rng, 9, spec.vocab);
    const std::vector<float> ref = run_forward(*dense, {a}, {all_rows(a.size())});
    const double scale = max_abs(ref);
    for (cpu::QType q : {cpu::QType::Q8_0, cpu::QType::Q4_0}) {
      const std::string name =
          std::string("quantized model (") + isa + ", " + type_name(type) + " -> " + cpu::qtype_name(q) + ")";
      LoadOptions options = test_options(2);
      options.quantize = q == cpu::QType::Q8_0 ? Quant::Q8_0 : Quant::Q4_0;
      auto at_load = Backend::load(dir.string(), options);
      const std::vector<float> got = run_forward(*at_load, {a}, {all_rows(a.size())});
      // Against the float forward of the dequantized weights, what is left is the activations' int8
      // rounding (a step of 1/254 of each block's largest value, like the Q8_0 weights' own): measured 2% rms
      // on this random 2-layer model, whose sharp attention amplifies it. The weights' own rounding is what
      // quantization costs: measured 2% rms for Q8_0 and 30% for Q4_0. The margins guard against a broken
      // kernel (off by 100%); the family tests hold the kernels to a reference that rounds the activations
      // the same way, and test/quantize.test.ts a trained model's quality.
      const fs::path ddir = tmp.path / (std::string("dq-") + type_name(type) + cpu::qtype_name(q));
      write_tiny(ddir, dequantized(tiny, q, cpu::weight_rotation(q, 32) > 0));
      auto deq = Backend::load(ddir.string(), test_options(2));
      const std::vector<float> deq_logits = run_forward(*deq, {a}, {all_rows(a.size())});
      const double act_err = rms_diff(got, deq_logits) / rms(deq_logits), w_err = rms_diff(deq_logits, ref) / rms(ref);
      const double w_margin = q == cpu::QType::Q8_0 ? 0.05 : 0.5;
      report(
          act_err <= 0.05 && w_err <= w_margin && at_load->weight_dtype() == cpu::qtype_name(q) &&
              at_load->info().memory_used < dense->info().memory_used,
          name + " quantized at load: within 5% (rms) of the float forward of its dequantized weights, in less memory",
          fmt("rms error %.4f from activations, %.4f from the weights (max |logit| %.2f)", act_err, w_err, scale) +
              fmt("; weights %.0f KiB against %.0f KiB", at_load->info().memory_used / 1024.0,
                  dense->info().memory_used / 1024.0));

      const fs::path qdir = tmp.path / (std::string("q-") + type_name(type) + cpu::qtype_name(q));
      write_quantized(qdir, tiny, q);
      auto from_file = Backend::load(qdir.string(), test_options(2));
      const std::vector<float> file_logits = run_forward(*from_file, {a}, {all_rows(a.size())});
      report(file_logits == got && from_file->weight_dtype() == cpu::qtype_name(q),
             name + " from a quantized checkpoint: the logits of quantizing at load, bit for bit");
      auto one = Backend::load(qdir.string(), test_options(1));
      std::vector<float> batched = run_forward(*from_file, {a, b}, {{0, 69, 5}, {8, 1}});
      std::vector<float> joined = run_forward(*one, {a}, {{0, 69, 5}});
      const std::vector<float> alone_b = run_forward(*one, {b}, {{8, 1}});
      joined.insert(joined.end(), alone_b.begin(), alone_b.end());
      report(batched == joined, name + ": batch of 2 equals each alone, 1 vs 2 threads, bit for bit");

      // A checkpoint quantized the other way (Q8_0 without the rotation, as before vdiff quantize rotated;
      // Q4_0 with it) loads too, and is close to the float forward of its own dequantized weights.
      const bool other = cpu::weight_rotation(q, 32) == 0;
      const fs::path udir = tmp.path / (std::string("u-") + type_name(type) + cpu::qtype_name(q));
      write_quantized(udir, tiny, q, "", other ? "hadamard" : "");
      auto unrotated = Backend::load(udir.string(), test_options(2));
      const std::vector<float> u_logits = run_forward(*unrotated, {a}, {all_rows(a.size())});
      const fs::path uddir = tmp.path / (std::string("ud-") + type_name(type) + cpu::qtype_name(q));
      write_tiny(uddir, dequantized(tiny, q, other));
      auto udeq = Backend::load(uddir.string(), test_options(2));
      const std::vector<float> ud_logits = run_forward(*udeq, {a}, {all_rows(a.size())});
      const double u_err = rms_diff(u_logits, ud_logits) / rms(ud_logits);
      report(u_err <= 0.05 && u_logits != file_logits,
             name + (other ? " from a rotated" : " from an unrotated") +
                 " quantized checkpoint: within 5% (rms) of its dequantized weights' forward",
             fmt("rms error %.4f", u_err));
    }
  }

  // Loader errors: a quantized matrix without its scales (or with the wrong shape), or an unknown rotation.
  TinyModel tiny = make_tiny(spec, WType::F32, 9);
  const std::string q_name = "model.transformer.blocks.1.q_proj.weight";
  const fs::path bad = tmp.path / "bad-scale";
  write_quantized(bad, tiny, cpu::QType::Q8_0, q_name);
  expect_error("quantized checkpoint with a wrong scale shape", ErrorCode::InvalidModel, {q_name + "_scale", "[64, 2]"},
               [&] { Backend::load(bad.string(), test_options(1)); });
  const fs::path odd = tmp.path / "odd-rotation";
  write_quantized(odd, tiny, cpu::QType::Q8_0, "", "givens");
  expect_error("quantized checkpoint with an unknown rotation", ErrorCode::InvalidModel,
               {"vdiff.rotation", "givens", "hadamard"}, [&] { Backend::load(odd.string(), test_options(1)); });

  // dequantize_row (what the CUDA backend uploads, in bf16, for a quantized checkpoint): every row of
  // every quantized matrix equals the float weights the quantized rows stand for (`dequantized`: the
  // values, rotated back where they were rotated), bit for bit; float matrices come back as stored.
  for (const auto& [type, rotate] : {std::pair{cpu::QType::Q8_0, true}, std::pair{cpu::QType::Q4_0, false}}) {
    const fs::path dir = tmp.path / (std::string("rows-") + cpu::qtype_name(type));
    write_quantized(dir, tiny, type, "", rotate ? "hadamard" : "");
    const TinyModel want = dequantized(tiny, type, rotate);
    const TensorSet set = TensorSet::load_dir(dir.string());
    const ModelConfig config = ModelConfig::from_file((dir / "config.json").string());
    const ModelWeights w = find_weights(set, config, family_of(config));
    int matrices = 0, quantized = 0, differ = 0;
    for (const LayerWeights& l : w.layers)
      for (const WeightRef* m : {&l.q, &l.k, &l.v, &l.o, &l.mlp.gate, &l.mlp.up, &l.mlp.down}) {
        ++matrices;
        quantized += m->quant != Quant::None;
        const std::vector<float>& f = want.tensors.at(m->name).f32;
        std::vector<float> row(m->cols);
        for (int r = 0; r < m->rows; ++r) {
          dequantize_row(*m, r, row.data());
          differ += std::memcmp(row.data(), f.data() + static_cast<size_t>(r) * m->cols, m->cols * sizeof(float)) != 0;
        }
      }
    report(quantized == matrices && differ == 0,
           std::string("dequantize_row: a ") + cpu::qtype_name(type) + (rotate ? " (rotated)" : "") +
               " checkpoint's matrices as the float weights their rows stand for",
           std::to_string(quantized) + " of " + std::to_string(matrices) + " quantized, " + std::to_string(differ) +
               " rows differ");
  }
}

}  // namespace vdiff::test
