// Model configuration as read from an HF-style config.json with LLaDA's keys.
#pragma once
#include <cstdint>
#include <string>

namespace vdiff {

class Json;

struct ModelConfig {
  int d_model = 0;
  int n_heads = 0;
  int n_kv_heads = 0;  // < n_heads means grouped-query attention; defaults to n_heads when absent
  int n_layers = 0;
  int mlp_hidden_size = 0;  // H of ff_proj/up_proj [H, D] and ff_out [D, H]
  int vocab_size = 0;
  int embedding_size = 0;  // rows of wte and of the LM head; defaults to vocab_size when absent
  int mask_token_id = 0;
  int eos_token_id = 0;
  int max_sequence_length = 0;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-5;
  bool weight_tying = false;  // true: the LM head is wte
  bool include_bias = false;  // biases are not supported; true is rejected with InvalidModel

  int head_dim() const { return d_model / n_heads; }

  // Parses and validates; throws Error(InvalidModel) naming the missing or bad key.
  static ModelConfig from_json(const Json& j);
  static ModelConfig from_file(const std::string& path);
  void validate() const;
};

}  // namespace vdiff
