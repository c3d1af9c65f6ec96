// The readers of the model files: the JSON reader, safetensors (single file, shards, corrupt files) and
// config.json.
#include "tests/model_fixtures.h"

namespace vdiff::test {

// ------------------------------------------------------------------------------------------------
// JSON

void test_json() {
  {
    Json j = Json::parse(
        R"( {"a": [1, -2.5e3, true, false, null], "s": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00", "o": {}, "e": []} )");
    const Json& a = *j.find("a");
    bool ok = j.is_object() && a.size() == 5 && a[0].as_int64() == 1 && a[1].as_number() == -2500.0 && a[2].as_bool() &&
              !a[3].as_bool() && a[4].is_null() && j.find("o")->size() == 0 && j.find("e")->size() == 0 &&
              !j.find("zz");
    ok = ok && j.find("s")->as_string() == "x\"\\/\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80";
    ok = ok && j.keys() == std::vector<std::string>({"a", "s", "o", "e"});
    report(ok, "json: values, escapes, \\u and surrogate pairs");
  }
  {
    bool ok = Json::parse("9223372036854775807").as_int64() == INT64_MAX && Json::parse("-0").as_int64() == 0 &&
              Json::parse("2.0").is_integer() && !Json::parse("1.5").is_integer() &&
              !Json::parse("1e30").is_integer() && std::isinf(Json::parse("1e400").as_number()) &&
              Json::parse("1e-400").as_number() == 0.0 && Json::parse("\"\xc3\xa9\"").as_string() == "\xc3\xa9";
    bool threw = false;
    try {
      Json::parse("1.5").as_int64();
    } catch (const JsonError&) {
      threw = true;
    }
    bool threw_type = false;
    try {
      Json::parse("\"s\"").as_number();
    } catch (const JsonError& e) {
      threw_type = std::string(e.what()).find("expected a number, got string") != std::string::npos;
    }
    report(ok && threw && threw_type, "json: integers, big/small numbers, raw UTF-8, type errors");
  }
  struct Bad {
    const char* text;
    size_t offset;
    const char* needle;
  };
  const Bad bad[] = {
      {"", 0, "unexpected end"},
      {"{\"a\":1,}", 7, "expected a string key"},
      {"[1,2", 4, "end of input inside an array"},
      {"[1 2]", 3, "expected ',' or ']'"},
      {"{\"a\" 1}", 5, "expected ':'"},
      {"\"abc", 4, "unterminated string"},
      {"\"a\\x\"", 3, "invalid escape"},
      {"\"\\u12g4\"", 5, "invalid hex digit"},
      {"\"\\ud800\"", 1, "high surrogate"},
      {"\"\\udc00\"", 1, "lone low surrogate"},
      {"\"a\nb\"", 2, "control character"},
      {"01", 1, "after the JSON value"},
      {"-", 1, "truncated number"},
      {"1.", 2, "digit after '.'"},
      {"1e+", 3, "exponent"},
      {"tru", 0, "invalid literal"},
      {"{\"a\":1,\"a\":2}", 7, "duplicate key"},
      {"[] x", 3, "after the JSON value"},
      {"\"\xc3", 1, "truncated UTF-8"},
      {"\"\xc3\"", 1, "invalid UTF-8 continuation"},
      {"\"\xc0\xaf\"", 1, "invalid UTF-8"},
      {"\"\xed\xa0\x80\"", 1, "invalid UTF-8"},
  };
  for (const Bad& b : bad) {
    try {
      Json::parse(b.text);
      report(false, std::string("json error: ") + b.needle, "parsed without error");
    } catch (const JsonError& e) {
      bool ok = e.offset() == b.offset && std::string(e.what()).find(b.needle) != std::string::npos;
      report(ok, std::string("json error: ") + b.needle, e.what());
    }
  }
  {
    std::string deep(600, '[');
    deep += std::string(600, ']');
    bool ok = false;
    try {
      Json::parse(deep);
    } catch (const JsonError& e) {
      ok = std::string(e.what()).find("nesting") != std::string::npos;
    }
    report(ok, "json error: nesting depth limit");
  }
}

void test_safetensors() {
  TempDir dir;
  const fs::path file = dir.path / "t.safetensors";
  {
    uint16_t bf[4] = {0x3f80, 0x4000, 0xc040, 0x0000};  // 1, 2, -3, 0
    write_file(file, safetensors_bytes({{"a", "F32", {2, 3}, float_bytes({1, 2, 3, 4, 5, 6})},
                                        {"b", "BF16", {4}, std::string(reinterpret_cast<char*>(bf), 8)},
                                        {"empty", "F16", {0, 5}, ""}}));
    auto f = SafetensorsFile::open(file.string());
    const TensorView* a = f->find("a");
    const TensorView* b = f->find("b");
    bool ok = a && b && f->tensors().size() == 3 && a->dtype == DType::F32 && a->shape == std::vector<int64_t>{2, 3} &&
              a->numel() == 6 && static_cast<const float*>(a->data)[5] == 6.0f && b->dtype == DType::BF16 &&
              cpu::bf16_to_f32(static_cast<const uint16_t*>(b->data)[2]) == -3.0f && f->find("empty")->numel() == 0;
    report(ok, "safetensors: valid file (F32, BF16, empty F16, metadata)");
  }
  auto corrupt = [&](const std::string& name, const std::string& bytes, std::vector<std::string> needles) {
    write_file(file, bytes);
    needles.push_back(file.string());
    expect_error("safetensors error: " + name, ErrorCode::InvalidModel, needles,
                 [&] { SafetensorsFile::open(file.string()); });
  };
  const std::string tensor_a = "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
  corrupt("shorter than the length field", "abc", {"truncated", "shorter than the 8-byte"});
  corrupt("header length past the end", raw_safetensors("{" + tensor_a + "}", float_bytes({1, 2})).substr(0, 20),
          {"truncated", "header length"});
  corrupt("implausible header length", std::string("\xff\xff\xff\xff\xff\xff\x00\x00", 8) + "{}",
          {"implausibly large"});
  corrupt("header is not JSON", raw_safetensors("{\"a\":", ""), {"bad header", "JSON error"});
  corrupt("header is not an object", raw_safetensors("[1,2]", ""), {"expected an object"});
  corrupt("unknown dtype",
          raw_safetensors("{\"a\":{\"dtype\":\"Q4_K\",\"shape\":[2],\"data_offsets\":[0,8]}}", float_bytes({1, 2})),
          {"tensor \"a\"", "unknown dtype \"Q4_K\""});
  corrupt("size does not match shape",
          raw_safetensors("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", float_bytes({1, 2})),
          {"tensor \"a\"", "needs 12 bytes", "span 8"});
  corrupt("data past the end (truncated)", raw_safetensors("{" + tensor_a + "}", float_bytes({1})),
          {"tensor \"a\"", "truncated file"});
  corrupt("end before begin",
          raw_safetensors("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", float_bytes({1, 2})),
          {"tensor \"a\"", "before begin"});
  corrupt("overlapping tensors",
          raw_safetensors("{" + tensor_a + ",\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                          float_bytes({1, 2, 3})),
          {"\"a\"", "\"b\"", "overlap"});
  corrupt("negative shape",
          raw_safetensors("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", float_bytes({1, 2})),
          {"non-negative"});
  corrupt("missing data_offsets", raw_safetensors("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", float_bytes({1, 2})),
          {"data_offsets"});
  expect_error("safetensors error: missing file", ErrorCode::InvalidModel, {"cannot open", "nope.safetensors"},
               [&] { SafetensorsFile::open((dir.path / "nope.safetensors").string()); });

  // Sharded directories.
  const fs::path shard_dir = dir.path / "sharded";
  fs::create_directories(shard_dir);
  write_file(shard_dir / "s1.safetensors", safetensors_bytes({{"x", "F32", {1}, float_bytes({7})}}));
  write_file(shard_dir / "s2.safetensors", safetensors_bytes({{"y", "F32", {2}, float_bytes({8, 9})}}));
  write_file(shard_dir / "model.safetensors.index.json",
             R"({"metadata": {"total_size": 12}, "weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}})");
  {
    TensorSet set = TensorSet::load_dir(shard_dir.string());
    bool ok = set.all().size() == 2 && set.files().size() == 2 &&
              static_cast<const float*>(set.get("y").data)[1] == 9.0f &&
              static_cast<const float*>(set.get("x").data)[0] == 7.0f;
    report(ok, "safetensors: sharded directory through the index");
    expect_error("safetensors error: missing tensor names the tensor", ErrorCode::InvalidModel,
                 {"missing tensor \"z\""}, [&] { set.get("z"); });
  }
  auto bad_index = [&](const std::string& name, const std::string& index, std::vector<std::string> needles) {
    write_file(shard_dir / "model.safetensors.index.json", index);
    expect_error("safetensors index error: " + name, ErrorCode::InvalidModel, needles,
                 [&] { TensorSet::load_dir(shard_dir.string()); });
  };
  bad_index("missing shard file", R"({"weight_map": {"x": "s3.safetensors"}})", {"s3.safetensors", "cannot open"});
  bad_index("tensor not in its shard", R"({"weight_map": {"x": "s2.safetensors"}})", {"\"x\"", "does not contain"});
  bad_index("path outside the directory", R"({"weight_map": {"x": "../s1.safetensors"}})", {"not a plain file name"});
  bad_index("no weight_map", R"({"metadata": {}})", {"weight_map"});
  bad_index("not JSON", R"({"weight_map": )", {"JSON error"});
  expect_error("safetensors error: empty directory", ErrorCode::InvalidModel, {"neither model.safetensors"},
               [&] { TensorSet::load_dir((dir.path / "nothing").string()); });
}

// ------------------------------------------------------------------------------------------------
// config.json

// config.json text from the base keys, with `changes` applied: a value replaces (or adds) a key, an empty
// value removes it.
std::string config_text(const std::vector<std::pair<std::string, std::string>>& changes = {}) {
  std::vector<std::pair<std::string, std::string>> keys = {
      {"d_model", "64"},     {"n_heads", "4"},        {"n_layers", "2"},     {"mlp_hidden_size", "96"},
      {"vocab_size", "100"}, {"mask_token_id", "99"}, {"eos_token_id", "98"}};
  for (const auto& [key, value] : changes) {
    auto it = std::find_if(keys.begin(), keys.end(), [&](const auto& kv) { return kv.first == key; });
    if (it != keys.end()) keys.erase(it);
    if (!value.empty()) keys.emplace_back(key, value);
  }
  std::string s = "{";
  for (size_t i = 0; i < keys.size(); ++i) s += (i ? ", \"" : "\"") + keys[i].first + "\": " + keys[i].second;
  return s + "}";
}

void test_config() {
  {
    ModelConfig c = ModelConfig::from_json(Json::parse(config_text()));
    bool ok = c.n_kv_heads == 4 && c.embedding_size == 100 && c.rope_theta == 10000.0 && c.rms_norm_eps == 1e-5 &&
              c.max_sequence_length == 4096 && !c.weight_tying && c.head_dim() == 16;
    report(ok, "config: defaults for absent optional keys");
  }
  auto bad = [](const std::string& name, const std::string& text, std::vector<std::string> needles) {
    expect_error("config error: " + name, ErrorCode::InvalidModel, needles,
                 [&] { ModelConfig::from_json(Json::parse(text)); });
  };
  for (const char* key :
       {"d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size", "mask_token_id", "eos_token_id"})
    bad(std::string("missing ") + key, config_text({{key, ""}}),
        {"missing required key", std::string("\"") + key + "\""});
  bad("string where an integer belongs", config_text({{"n_kv_heads", "\"4\""}}), {"\"n_kv_heads\"", "integer"});
  bad("fractional integer", config_text({{"max_sequence_length", "10.5"}}), {"\"max_sequence_length\""});
  bad("eos_token_id as a list", config_text({{"eos_token_id", "[98]"}}), {"\"eos_token_id\"", "integer"});
  bad("d_model not divisible by n_heads", config_text({{"n_heads", "5"}}), {"\"d_model\"", "\"n_heads\""});
  bad("n_heads not divisible by n_kv_heads", config_text({{"n_kv_heads", "3"}}), {"\"n_kv_heads\""});
  bad("odd head_dim", config_text({{"d_model", "12"}}), {"head dimension", "even"});
  bad("include_bias true", config_text({{"include_bias", "true"}}), {"\"include_bias\""});
  bad("negative n_layers", config_text({{"n_layers", "-1"}}), {"\"n_layers\"", "positive"});
  bad("zero d_model", config_text({{"d_model", "0"}}), {"\"d_model\"", "positive"});
  bad("mask token outside the vocabulary", config_text({{"mask_token_id", "100"}}), {"\"mask_token_id\""});
  bad("embedding_size below vocab_size", config_text({{"embedding_size", "50"}}), {"\"embedding_size\""});
  bad("rope_theta not positive", config_text({{"rope_theta", "0"}}), {"\"rope_theta\""});
  bad("rms_norm_eps not a number", config_text({{"rms_norm_eps", "\"1e-5\""}}), {"\"rms_norm_eps\""});
  bad("weight_tying not a boolean", config_text({{"weight_tying", "1"}}), {"\"weight_tying\"", "boolean"});
  bad("alibi true", config_text({{"alibi", "true"}}), {"\"alibi\""});
  bad("rope false", config_text({{"rope", "false"}}), {"\"rope\""});
  bad("unsupported layer_norm_type", config_text({{"layer_norm_type", "\"default\""}}), {"\"layer_norm_type\""});
  bad("not an object", "[1]", {"object"});
  {
    ModelConfig c = ModelConfig::from_json(Json::parse(config_text({{"rope", "true"},
                                                                    {"alibi", "false"},
                                                                    {"activation_type", "\"silu\""},
                                                                    {"block_type", "\"llama\""},
                                                                    {"layer_norm_type", "\"rms\""},
                                                                    {"n_kv_heads", "2"},
                                                                    {"embedding_size", "128"},
                                                                    {"rope_theta", "500000.0"},
                                                                    {"max_sequence_length", "null"},
                                                                    {"pad_token_id", "98"}})));
    report(c.d_model == 64 && c.n_kv_heads == 2 && c.embedding_size == 128 && c.rope_theta == 500000.0 &&
               c.max_sequence_length == 4096,
           "config: explicit values, supported switches and unknown keys are accepted");
  }
  TempDir dir;
  write_file(dir.path / "config.json", "{\"d_model\": 64,");
  expect_error("config error: bad JSON names the file", ErrorCode::InvalidModel,
               {"config.json", "JSON error at offset"},
               [&] { ModelConfig::from_file((dir.path / "config.json").string()); });
  write_file(dir.path / "config.json", config_text({{"n_heads", ""}}));
  expect_error("config error: from_file names the file and the key", ErrorCode::InvalidModel,
               {"config.json", "\"n_heads\""}, [&] { ModelConfig::from_file((dir.path / "config.json").string()); });
}

}  // namespace vdiff::test
