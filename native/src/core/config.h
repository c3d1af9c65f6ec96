// Model configuration as read from an HF-style config.json. The family (weights.h, family_of) is chosen by
// "model_type" (or "architectures"): llada (LLaDA's own keys), llada2_moe, sdar and sdar_moe (HF keys:
// hidden_size, num_hidden_layers, ...). An unknown model_type is refused with InvalidModel naming it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace vdiff {

class Json;

// How a family writes its answer.
//   FullCanvas (LLaDA): bidirectional attention over prompt + answer; semi-autoregressive blocks of the
//     answer only decide which positions a step may commit.
//   Block (LLaDA2.x, SDAR): block-causal attention over blocks of block_length aligned at position 0 (the
//     prompt's tail shares the first answer block); a finished block's keys and values are exact and cached.
//   Dream: bidirectional attention over prompt + answer, no blocks; Dream's eps time schedule says how many
//     positions a step commits and its algorithm (maskgit_plus, topk_margin, entropy, origin) which
//     (core/dream_decoding.h).
enum class Decoding { FullCanvas, Block, Dream };

// The router of a mixture-of-experts layer.
//   GroupedSigmoid (LLaDA2): f32 sigmoid scores; expert_bias added for the choice only; the n_group groups
//     scored by the sum of their top 2, the best topk_group kept; top-k experts among them; weights the
//     unbiased scores, normalised (+1e-20), times routed_scaling_factor; plus the shared expert(s).
//   Softmax (Qwen3-MoE, SDAR-MoE): softmax over all experts in f32, top-k, renormalised when norm_topk_prob.
enum class RouterKind { None, GroupedSigmoid, Softmax };

struct ModelConfig {
  std::string model_type = "llada";  // config.json "model_type" (LLaDA's configs: "llada" or absent)
  Decoding decoding = Decoding::FullCanvas;
  int block_length = 0;  // Block decoding: the block size the model was trained with (LLaDA2 32, SDAR 4)

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
  bool include_bias = false;  // LLaDA's all-biases switch: not supported; true is rejected with InvalidModel
  bool qkv_bias = false;      // the q, k and v projections add a bias (Qwen2/Dream's "attention_bias")
  // The output row of position i predicts token i + 1 (an autoregressive parent's convention, kept by
  // Dream): the prediction for canvas position p is the output row prediction_row(p) = max(p - 1, 0).
  bool shifted_logits = false;
  std::vector<int> stop_token_ids;  // further end tokens besides eos_token_id (an "eos_token_id" list's rest)

  // Attention details of the newer families.
  int head_dim_size = 0;  // config "head_dim"; 0: d_model / n_heads
  int rotary_dim = 0;     // NeoX rotate-half RoPE over the first rotary_dim dims of a head; 0: the whole head
  bool qk_norm = false;   // RMSNorm over head_dim of every query and key head (own weights), before RoPE

  // Mixture of experts (n_experts == 0: every layer is a dense SwiGLU of mlp_hidden_size).
  int n_experts = 0;
  int experts_per_token = 0;  // top-k
  int moe_hidden_size = 0;    // width of one expert
  int n_shared_experts = 0;   // shared expert width: moe_hidden_size * n_shared_experts
  int first_k_dense = 0;      // layers [0, first_k_dense) are dense
  int n_group = 1;            // GroupedSigmoid only
  int topk_group = 1;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;  // Softmax: renormalise the top-k weights
  RouterKind router = RouterKind::None;
  bool expert_bias = false;       // GroupedSigmoid: the layers hold mlp.gate.expert_bias (choice only)
  int moe_layer_step = 1;         // Qwen3-MoE decoder_sparse_step: layer i is MoE when (i + 1) % step == 0
  std::vector<int> dense_layers;  // Qwen3-MoE mlp_only_layers: dense whatever the rules above say

  int prediction_row(int position) const { return shifted_logits && position > 0 ? position - 1 : position; }
  int head_dim() const { return head_dim_size > 0 ? head_dim_size : d_model / n_heads; }
  int rope_dims() const { return rotary_dim > 0 ? rotary_dim : head_dim(); }
  bool moe_layer(int layer) const {
    if (n_experts == 0 || layer < first_k_dense || (layer + 1) % moe_layer_step != 0) return false;
    for (int d : dense_layers)
      if (d == layer) return false;
    return true;
  }
  bool has_dense_layer() const {
    for (int i = 0; i < n_layers; ++i)
      if (!moe_layer(i)) return true;
    return false;
  }

  // Parses and validates; throws Error(InvalidModel) naming the missing or bad key.
  static ModelConfig from_json(const Json& j);
  static ModelConfig from_file(const std::string& path);
  void validate() const;
};

}  // namespace vdiff
