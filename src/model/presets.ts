/**
 * Model shapes: the config.json keys, the tensor names and shapes of a LLaDA checkpoint and of the other
 * families' (LLaDA2.x, SDAR, Dream), and the named presets `vdiff make-model` can write with random weights.
 *
 * @since 0.1.0
 */
import type { DType } from "./safetensors.js"

/** The config.json keys of a LLaDA checkpoint that the engine reads. */
export interface LladaConfig {
  readonly d_model: number
  readonly n_heads: number
  readonly n_kv_heads: number
  readonly n_layers: number
  readonly mlp_hidden_size: number
  readonly vocab_size: number
  readonly embedding_size: number
  readonly mask_token_id: number
  readonly eos_token_id: number
  readonly rope_theta: number
  readonly rms_norm_eps: number
  readonly max_sequence_length: number
  readonly weight_tying: boolean
  readonly include_bias: boolean
}

/**
 * Keys a config.json must carry; the others have the engine's defaults (n_kv_heads = n_heads,
 * embedding_size = vocab_size, max_sequence_length 4096, rope_theta 10000, rms_norm_eps 1e-5).
 */
export const requiredConfigKeys = [
  "d_model",
  "n_heads",
  "n_layers",
  "mlp_hidden_size",
  "vocab_size",
  "mask_token_id",
  "eos_token_id"
] as const

export interface Preset {
  readonly name: string
  readonly description: string
  readonly config: LladaConfig
  readonly dtype: DType
  /** Standard deviation of the projection and embedding weights; norm weights are exactly 1. */
  readonly initStd: number
  /** Shards of at most this many bytes; undefined: one model.safetensors. */
  readonly maxShardBytes?: number
}

export type TensorKind = "norm" | "matrix"

export interface TensorShape {
  readonly name: string
  readonly shape: ReadonlyArray<number>
  readonly kind: TensorKind
}

/**
 * The tensors of a LLaDA checkpoint with LLaDA-8B's names, in file order: embedding, the blocks in
 * order, final norm, LM head (unless tied).
 */
export const lladaTensors = (config: LladaConfig): Array<TensorShape> => {
  const { d_model: D, mlp_hidden_size: H, embedding_size: V } = config
  const kvDim = (D / config.n_heads) * config.n_kv_heads
  const tensors: Array<TensorShape> = [{ name: "model.transformer.wte.weight", shape: [V, D], kind: "matrix" }]
  for (let i = 0; i < config.n_layers; i++) {
    const block = `model.transformer.blocks.${i}`
    tensors.push(
      { name: `${block}.attn_norm.weight`, shape: [D], kind: "norm" },
      { name: `${block}.q_proj.weight`, shape: [D, D], kind: "matrix" },
      { name: `${block}.k_proj.weight`, shape: [kvDim, D], kind: "matrix" },
      { name: `${block}.v_proj.weight`, shape: [kvDim, D], kind: "matrix" },
      { name: `${block}.attn_out.weight`, shape: [D, D], kind: "matrix" },
      { name: `${block}.ff_norm.weight`, shape: [D], kind: "norm" },
      { name: `${block}.ff_proj.weight`, shape: [H, D], kind: "matrix" },
      { name: `${block}.up_proj.weight`, shape: [H, D], kind: "matrix" },
      { name: `${block}.ff_out.weight`, shape: [D, H], kind: "matrix" }
    )
  }
  tensors.push({ name: "model.transformer.ln_f.weight", shape: [D], kind: "norm" })
  // With weight tying the LM head is wte and the checkpoint has no head of its own.
  if (!config.weight_tying) tensors.push({ name: "model.transformer.ff_out.weight", shape: [V, D], kind: "matrix" })
  return tensors
}

export const parameterCount = (config: LladaConfig): number =>
  lladaTensors(config).reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0)

/** config.json's `torch_dtype` for each stored dtype. */
export const torchDtypeNames: Readonly<Record<DType, string>> = { F32: "float32", BF16: "bfloat16", F16: "float16" }

/**
 * The config.json written for a preset or an import: LLaDA's keys plus the identifying keys of the
 * Hugging Face checkpoint, so the directory looks like the real thing to other tools.
 */
export const configJson = (config: LladaConfig, dtype: DType): Record<string, unknown> => ({
  architectures: ["LLaDAModelLM"],
  model_type: "llada",
  ...config,
  pad_token_id: config.eos_token_id,
  activation_type: "silu",
  block_type: "llama",
  layer_norm_type: "rms",
  rope: true,
  torch_dtype: torchDtypeNames[dtype]
})

const tinyConfig: LladaConfig = {
  d_model: 64,
  n_heads: 4,
  n_kv_heads: 2,
  n_layers: 2,
  mlp_hidden_size: 160,
  vocab_size: 512,
  embedding_size: 512,
  mask_token_id: 511,
  eos_token_id: 510,
  rope_theta: 10000,
  rms_norm_eps: 1e-5,
  max_sequence_length: 512,
  weight_tying: false,
  include_bias: false
}

// 100,682,496 parameters: 2 × 10240 × 768 for embedding and head, 12 × 7.08M for the blocks.
const smallConfig: LladaConfig = {
  d_model: 768,
  n_heads: 12,
  n_kv_heads: 12,
  n_layers: 12,
  mlp_hidden_size: 2048,
  vocab_size: 10240,
  embedding_size: 10240,
  mask_token_id: 10239,
  eos_token_id: 10238,
  rope_theta: 10000,
  rms_norm_eps: 1e-5,
  max_sequence_length: 2048,
  weight_tying: false,
  include_bias: false
}

// The real LLaDA-8B shape (8,015,581,184 parameters, 16.03 GB in bf16).
const llada8bConfig: LladaConfig = {
  d_model: 4096,
  n_heads: 32,
  n_kv_heads: 32,
  n_layers: 32,
  mlp_hidden_size: 12288,
  vocab_size: 126464,
  embedding_size: 126464,
  mask_token_id: 126336,
  eos_token_id: 126081,
  rope_theta: 500000,
  rms_norm_eps: 1e-5,
  max_sequence_length: 4096,
  weight_tying: false,
  include_bias: false
}

export const presets: Readonly<Record<string, Preset>> = {
  tiny: {
    name: "tiny",
    description: "2 layers, d_model 64, GQA 4/2 heads, vocab 512: for fast tests",
    config: tinyConfig,
    dtype: "F32",
    // 1/sqrt(d_model) rather than 0.02: with 0.02 a model this narrow predicts an almost uniform
    // distribution, and argmax and confidence orderings would hinge on rounding differences between
    // implementations. This std gives logits with a spread of about 1.
    initStd: 0.125
  },
  small: {
    name: "small",
    description: "12 layers, d_model 768, vocab 10240: about 100.7M parameters, for benchmarks",
    config: smallConfig,
    dtype: "F32",
    initStd: 0.02
  },
  "llada-8b": {
    name: "llada-8b",
    description: "the real LLaDA-8B shape with random weights: 8.0B parameters, bf16, 5 shards",
    config: llada8bConfig,
    dtype: "BF16",
    initStd: 0.02,
    maxShardBytes: 4_000_000_000
  }
}

// --- block-diffusion families: LLaDA2.x (llada2_moe) and SDAR (sdar, sdar_moe) ----------------------------

/**
 * The config.json of an LLaDA2.0/2.1 checkpoint (`model_type: "llada2_moe"`, Hugging Face keys;
 * ../shared/specs/block-diffusion.md A1). Layers [0, first_k_dense_replace) are dense SwiGLUs of
 * intermediate_size, the others mixtures of num_experts experts of moe_intermediate_size with a group-limited
 * sigmoid router and num_shared_experts shared experts. Attention has a fused QKV, QK-norm and rotary
 * embeddings over the first partial_rotary_factor × head_dim dims of a head.
 */
export interface Llada2Config {
  readonly model_type: "llada2_moe"
  readonly hidden_size: number
  readonly num_hidden_layers: number
  readonly num_attention_heads: number
  readonly num_key_value_heads: number
  readonly head_dim: number
  readonly intermediate_size: number
  readonly moe_intermediate_size: number
  readonly num_experts: number
  readonly num_experts_per_tok: number
  readonly num_shared_experts: number
  readonly first_k_dense_replace: number
  readonly n_group: number
  readonly topk_group: number
  readonly routed_scaling_factor: number
  readonly vocab_size: number
  readonly rope_theta: number
  readonly partial_rotary_factor: number
  readonly rms_norm_eps: number
  readonly max_position_embeddings: number
  readonly tie_word_embeddings: boolean
  readonly pad_token_id: number
  readonly eos_token_id: number
  readonly mask_token_id: number
  readonly block_size: number
}

/**
 * The config.json of an SDAR checkpoint (Qwen3 keys; spec B1): `sdar` is dense, `sdar_moe` has Qwen3-MoE
 * experts (softmax router, top-k renormalised when norm_topk_prob, no shared expert) in every layer.
 * eos_token_id may be a list: the first is the end of text, the rest further stop tokens.
 */
export interface SdarConfig {
  readonly model_type: "sdar" | "sdar_moe"
  readonly hidden_size: number
  readonly num_hidden_layers: number
  readonly num_attention_heads: number
  readonly num_key_value_heads: number
  readonly head_dim: number
  readonly intermediate_size: number
  readonly vocab_size: number
  readonly rope_theta: number
  readonly rms_norm_eps: number
  readonly max_position_embeddings: number
  readonly tie_word_embeddings: boolean
  readonly bos_token_id: number
  readonly eos_token_id: number | ReadonlyArray<number>
  readonly mask_token_id: number
  readonly block_size: number
  /** sdar_moe only. */
  readonly moe?: {
    readonly num_experts: number
    readonly num_experts_per_tok: number
    readonly moe_intermediate_size: number
    readonly norm_topk_prob: boolean
  }
}

/**
 * The config.json of a Dream checkpoint (`model_type: "Dream"`, `architectures: ["DreamModel"]`; Qwen2 keys,
 * tools/reference/README.md "Dream"): Qwen2.5's dense decoder with q/k/v biases (none on o_proj and the MLP),
 * head_dim = hidden_size / num_attention_heads, trained as a masked diffusion model whose prediction for a
 * position is the output at the position before it. bos, eos and pad are all `<|endoftext|>`.
 */
export interface DreamConfig {
  readonly model_type: "Dream"
  readonly hidden_size: number
  readonly num_hidden_layers: number
  readonly num_attention_heads: number
  readonly num_key_value_heads: number
  readonly intermediate_size: number
  readonly vocab_size: number
  readonly rope_theta: number
  readonly rms_norm_eps: number
  readonly max_position_embeddings: number
  readonly tie_word_embeddings: boolean
  readonly mask_token_id: number
  readonly pad_token_id: number
  readonly bos_token_id: number
  readonly eos_token_id: number
}

export type FamilyConfig = Llada2Config | SdarConfig | DreamConfig

/** A family's attention head width: Dream's config has none (hidden_size / heads), the others say it. */
export const headDim = (config: FamilyConfig): number =>
  config.model_type === "Dream" ? config.hidden_size / config.num_attention_heads : config.head_dim

/**
 * A tensor of a family checkpoint: "bias" is a bias vector (the router's expert bias, stored f32; Dream's
 * q/k/v biases), small random values.
 */
export interface FamilyTensorShape {
  readonly name: string
  readonly shape: ReadonlyArray<number>
  readonly kind: TensorKind | "bias"
  /** Stored in this dtype whatever the model's (LLaDA2's expert_bias is f32 in the real checkpoints). */
  readonly dtype?: DType
}

const swiglu = (prefix: string, width: number, D: number): Array<FamilyTensorShape> => [
  { name: `${prefix}.gate_proj.weight`, shape: [width, D], kind: "matrix" },
  { name: `${prefix}.up_proj.weight`, shape: [width, D], kind: "matrix" },
  { name: `${prefix}.down_proj.weight`, shape: [D, width], kind: "matrix" }
]

/**
 * The tensors of a family checkpoint with the Hugging Face names (spec A3 for llada2_moe: fused
 * query_key_value, query_layernorm / key_layernorm, dense, mlp.gate + expert_bias, mlp.experts.E.*,
 * mlp.shared_experts.*, word_embeddings, lm_head; spec B3 for sdar: self_attn.{q,k,v,o}_proj, q_norm /
 * k_norm, mlp.*, embed_tokens, lm_head; sdar_moe: mlp.gate and mlp.experts.E.*), in file order.
 */
export const familyTensors = (config: FamilyConfig): Array<FamilyTensorShape> => {
  const D = config.hidden_size
  const hd = headDim(config)
  const q = config.num_attention_heads * hd
  const kv = config.num_key_value_heads * hd
  const V = config.vocab_size
  const out: Array<FamilyTensorShape> = []
  if (config.model_type === "llada2_moe") {
    out.push({ name: "model.word_embeddings.weight", shape: [V, D], kind: "matrix" })
    for (let i = 0; i < config.num_hidden_layers; i++) {
      const l = `model.layers.${i}`
      out.push(
        { name: `${l}.input_layernorm.weight`, shape: [D], kind: "norm" },
        { name: `${l}.attention.query_key_value.weight`, shape: [q + 2 * kv, D], kind: "matrix" },
        { name: `${l}.attention.query_layernorm.weight`, shape: [hd], kind: "norm" },
        { name: `${l}.attention.key_layernorm.weight`, shape: [hd], kind: "norm" },
        { name: `${l}.attention.dense.weight`, shape: [D, q], kind: "matrix" },
        { name: `${l}.post_attention_layernorm.weight`, shape: [D], kind: "norm" }
      )
      if (i < config.first_k_dense_replace) {
        out.push(...swiglu(`${l}.mlp`, config.intermediate_size, D))
        continue
      }
      const E = config.num_experts
      out.push(
        { name: `${l}.mlp.gate.weight`, shape: [E, D], kind: "matrix" },
        { name: `${l}.mlp.gate.expert_bias`, shape: [E], kind: "bias", dtype: "F32" }
      )
      for (let e = 0; e < E; e++) out.push(...swiglu(`${l}.mlp.experts.${e}`, config.moe_intermediate_size, D))
      if (config.num_shared_experts > 0) {
        out.push(...swiglu(`${l}.mlp.shared_experts`, config.moe_intermediate_size * config.num_shared_experts, D))
      }
    }
    out.push({ name: "model.norm.weight", shape: [D], kind: "norm" })
  } else if (config.model_type === "Dream") {
    out.push({ name: "model.embed_tokens.weight", shape: [V, D], kind: "matrix" })
    for (let i = 0; i < config.num_hidden_layers; i++) {
      const l = `model.layers.${i}`
      out.push(
        { name: `${l}.input_layernorm.weight`, shape: [D], kind: "norm" },
        { name: `${l}.self_attn.q_proj.weight`, shape: [q, D], kind: "matrix" },
        { name: `${l}.self_attn.q_proj.bias`, shape: [q], kind: "bias" },
        { name: `${l}.self_attn.k_proj.weight`, shape: [kv, D], kind: "matrix" },
        { name: `${l}.self_attn.k_proj.bias`, shape: [kv], kind: "bias" },
        { name: `${l}.self_attn.v_proj.weight`, shape: [kv, D], kind: "matrix" },
        { name: `${l}.self_attn.v_proj.bias`, shape: [kv], kind: "bias" },
        { name: `${l}.self_attn.o_proj.weight`, shape: [D, q], kind: "matrix" },
        { name: `${l}.post_attention_layernorm.weight`, shape: [D], kind: "norm" },
        ...swiglu(`${l}.mlp`, config.intermediate_size, D)
      )
    }
    out.push({ name: "model.norm.weight", shape: [D], kind: "norm" })
  } else {
    out.push({ name: "model.embed_tokens.weight", shape: [V, D], kind: "matrix" })
    for (let i = 0; i < config.num_hidden_layers; i++) {
      const l = `model.layers.${i}`
      out.push(
        { name: `${l}.input_layernorm.weight`, shape: [D], kind: "norm" },
        { name: `${l}.self_attn.q_proj.weight`, shape: [q, D], kind: "matrix" },
        { name: `${l}.self_attn.k_proj.weight`, shape: [kv, D], kind: "matrix" },
        { name: `${l}.self_attn.v_proj.weight`, shape: [kv, D], kind: "matrix" },
        { name: `${l}.self_attn.q_norm.weight`, shape: [hd], kind: "norm" },
        { name: `${l}.self_attn.k_norm.weight`, shape: [hd], kind: "norm" },
        { name: `${l}.self_attn.o_proj.weight`, shape: [D, q], kind: "matrix" },
        { name: `${l}.post_attention_layernorm.weight`, shape: [D], kind: "norm" }
      )
      if (config.moe === undefined) {
        out.push(...swiglu(`${l}.mlp`, config.intermediate_size, D))
        continue
      }
      out.push({ name: `${l}.mlp.gate.weight`, shape: [config.moe.num_experts, D], kind: "matrix" })
      for (let e = 0; e < config.moe.num_experts; e++) {
        out.push(...swiglu(`${l}.mlp.experts.${e}`, config.moe.moe_intermediate_size, D))
      }
    }
    out.push({ name: "model.norm.weight", shape: [D], kind: "norm" })
  }
  if (!config.tie_word_embeddings) out.push({ name: "lm_head.weight", shape: [V, D], kind: "matrix" })
  return out
}

export const familyParameterCount = (config: FamilyConfig): number =>
  familyTensors(config).reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0)

/** The config.json written for a family preset: the checkpoint's own keys, as the real ones have them. */
export const familyConfigJson = (config: FamilyConfig, dtype: DType): Record<string, unknown> => {
  const common = {
    hidden_act: "silu",
    rope_scaling: null,
    use_sliding_window: false,
    torch_dtype: torchDtypeNames[dtype]
  }
  if (config.model_type === "llada2_moe") {
    return {
      architectures: ["LLaDA2MoeModelLM"],
      ...config,
      rotary_dim: config.partial_rotary_factor * config.head_dim,
      score_function: "sigmoid",
      moe_router_enable_expert_bias: true,
      norm_topk_prob: true,
      router_dtype: "fp32",
      use_qk_norm: true,
      use_qkv_bias: false,
      use_bias: false,
      ...common
    }
  }
  if (config.model_type === "Dream") {
    // Dream-v0-Instruct-7B's keys (the ones a loader ignores included); q/k/v biases are Dream's own rule,
    // so, as in the real config, there is no attention_bias key.
    return {
      architectures: ["DreamModel"],
      ...config,
      max_window_layers: config.num_hidden_layers,
      sliding_window: null,
      attention_dropout: 0,
      initializer_range: 0.02,
      use_cache: false,
      ...common
    }
  }
  const { moe, ...rest } = config
  return {
    architectures: [config.model_type === "sdar_moe" ? "SDARMoeForCausalLM" : "SDARForCausalLM"],
    ...rest,
    ...(moe !== undefined ? { ...moe, decoder_sparse_step: 1, mlp_only_layers: [] } : {}),
    attention_bias: false,
    ...common
  }
}

/**
 * A preset of a block-diffusion family. `tokenizer: "embedded"`: the directory gets the embedded model's
 * tokenizer (models/shakespeare) cut to 2048 ids (cutTokenizer), with its six special tokens renamed to the family's own
 * (see familyTokenizers) and a chat template in the family's style, so that the server can serve it;
 * "none": no tokenizer (the real shapes, whose vocabularies are the real ones; prompts go in as token ids).
 */
export interface FamilyPreset {
  readonly name: string
  readonly description: string
  readonly config: FamilyConfig
  readonly dtype: DType
  readonly initStd: number
  /** Standard deviation of the router's expert bias (LLaDA2). */
  readonly biasStd: number
  readonly maxShardBytes?: number
  readonly tokenizer: "embedded" | "none"
}

/** The embedded tokenizer's special token ids (2042 .. 2047) under each family's names, by chat style. */
export const familyTokenizers = {
  llada2_moe: {
    names: { 2042: "<|startoftext|>", 2043: "<|endoftext|>", 2044: "<|mask|>", 2045: "<|role_end|>", 2046: "<role>", 2047: "</role>" },
    config: {
      bos_token: "<|startoftext|>",
      eos_token: "<|endoftext|>",
      pad_token: "<|endoftext|>",
      mask_token: "<|mask|>",
      additional_special_tokens: ["<|role_end|>", "<role>", "</role>"],
      // LLaDA2's template (tokenizer_config.json of inclusionAI/LLaDA2.x): a system turn that always ends
      // with "detailed thinking off", then HUMAN / ASSISTANT turns each closed by <|role_end|>.
      chat_template:
        "<role>SYSTEM</role>{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n' }}{% endif %}" +
        "detailed thinking off<|role_end|>{% for message in messages %}{% if message['role'] == 'user' %}" +
        "<role>HUMAN</role>{{ message['content'] }}<|role_end|>{% elif message['role'] == 'assistant' %}" +
        "<role>ASSISTANT</role>{{ message['content'] }}<|role_end|>{% endif %}{% endfor %}" +
        "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
    }
  },
  sdar: {
    names: { 2042: "<|im_start|>", 2043: "<|endoftext|>", 2044: "<|MASK|>", 2045: "<|im_end|>", 2046: "<think>", 2047: "</think>" },
    config: {
      bos_token: null,
      eos_token: "<|im_end|>",
      pad_token: "<|endoftext|>",
      mask_token: "<|MASK|>",
      additional_special_tokens: ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
      // Qwen3's ChatML (SDAR is Qwen3 converted to block diffusion).
      chat_template:
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}" +
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    }
  },
  dream: {
    // Dream's special tokens in the order of their ids in Dream-v0 (151643, 151644, 151645, 151664, 151665,
    // 151666): the mask is the last id, as in the golden-dream fixtures.
    names: {
      2042: "<|endoftext|>",
      2043: "<|im_start|>",
      2044: "<|im_end|>",
      2045: "<|file_sep|>",
      2046: "<|beginoftext|>",
      2047: "<|mask|>"
    },
    config: {
      bos_token: "<|beginoftext|>",
      eos_token: "<|endoftext|>",
      pad_token: "<|endoftext|>",
      mask_token: "<|mask|>",
      additional_special_tokens: ["<|im_start|>", "<|im_end|>", "<|file_sep|>"],
      // Qwen2's ChatML with its default system turn (Dream is Qwen2.5 trained as a diffusion model).
      chat_template:
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}" +
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}" +
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}" +
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    }
  }
} as const

/** Which of familyTokenizers a family's tiny preset carries. */
export const tokenizerStyle = (config: FamilyConfig): keyof typeof familyTokenizers =>
  config.model_type === "llada2_moe" ? "llada2_moe" : config.model_type === "Dream" ? "dream" : "sdar"

/** The tiny family presets' vocabulary: the embedded tokenizer cut to 2048 ids (2042 BPE tokens + 6 special; cutTokenizer). */
export const EMBEDDED_VOCAB = 2048

const llada2Tiny: Llada2Config = {
  model_type: "llada2_moe",
  hidden_size: 64,
  num_hidden_layers: 3,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  head_dim: 16,
  intermediate_size: 128,
  moe_intermediate_size: 32,
  num_experts: 16,
  num_experts_per_tok: 4,
  num_shared_experts: 1,
  first_k_dense_replace: 1,
  n_group: 4,
  topk_group: 2,
  routed_scaling_factor: 2.5,
  vocab_size: EMBEDDED_VOCAB,
  rope_theta: 600000,
  partial_rotary_factor: 0.5,
  rms_norm_eps: 1e-6,
  max_position_embeddings: 512,
  tie_word_embeddings: false,
  pad_token_id: 2043,
  eos_token_id: 2043,
  mask_token_id: 2044,
  block_size: 32
}

// spec A1: 16.26B parameters (about 1.4B active per token).
const llada2Mini: Llada2Config = {
  model_type: "llada2_moe",
  hidden_size: 2048,
  num_hidden_layers: 20,
  num_attention_heads: 16,
  num_key_value_heads: 4,
  head_dim: 128,
  intermediate_size: 5120,
  moe_intermediate_size: 512,
  num_experts: 256,
  num_experts_per_tok: 8,
  num_shared_experts: 1,
  first_k_dense_replace: 1,
  n_group: 8,
  topk_group: 4,
  routed_scaling_factor: 2.5,
  vocab_size: 157184,
  rope_theta: 600000,
  partial_rotary_factor: 0.5,
  rms_norm_eps: 1e-6,
  max_position_embeddings: 32768,
  tie_word_embeddings: false,
  pad_token_id: 156892,
  eos_token_id: 156892,
  mask_token_id: 156895,
  block_size: 32
}

const sdarTiny: SdarConfig = {
  model_type: "sdar",
  hidden_size: 64,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  // As in SDAR-4B the query width (4 × 32) is not the hidden size.
  head_dim: 32,
  intermediate_size: 160,
  vocab_size: EMBEDDED_VOCAB,
  rope_theta: 1000000,
  rms_norm_eps: 1e-6,
  max_position_embeddings: 512,
  tie_word_embeddings: false,
  bos_token_id: 2043,
  eos_token_id: [2045, 2043],
  mask_token_id: 2044,
  block_size: 4
}

// spec B1 (JetLM/SDAR-4B-Chat): 4.41B parameters.
const sdar4b: SdarConfig = {
  model_type: "sdar",
  hidden_size: 2560,
  num_hidden_layers: 36,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  head_dim: 128,
  intermediate_size: 9728,
  vocab_size: 151936,
  rope_theta: 1000000,
  rms_norm_eps: 1e-6,
  max_position_embeddings: 32768,
  tie_word_embeddings: false,
  bos_token_id: 151643,
  eos_token_id: [151645, 151643],
  mask_token_id: 151669,
  block_size: 4
}

const dreamTiny: DreamConfig = {
  model_type: "Dream",
  hidden_size: 64,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  intermediate_size: 160,
  vocab_size: EMBEDDED_VOCAB,
  rope_theta: 1000000,
  rms_norm_eps: 1e-6,
  max_position_embeddings: 512,
  tie_word_embeddings: false,
  mask_token_id: 2047,
  pad_token_id: 2042,
  bos_token_id: 2042,
  eos_token_id: 2042
}

// The `small` LLaDA preset's dimensions in Dream's layout (q/k/v biases, shifted logits): for the CPU
// benchmark's family comparison at one size (bench/engine.mjs).
const dreamSmall: DreamConfig = {
  model_type: "Dream",
  hidden_size: smallConfig.d_model,
  num_hidden_layers: smallConfig.n_layers,
  num_attention_heads: smallConfig.n_heads,
  num_key_value_heads: smallConfig.n_kv_heads,
  intermediate_size: smallConfig.mlp_hidden_size,
  vocab_size: smallConfig.vocab_size,
  rope_theta: smallConfig.rope_theta,
  rms_norm_eps: 1e-6,
  max_position_embeddings: smallConfig.max_sequence_length,
  tie_word_embeddings: false,
  mask_token_id: smallConfig.mask_token_id,
  pad_token_id: smallConfig.eos_token_id,
  bos_token_id: smallConfig.eos_token_id,
  eos_token_id: smallConfig.eos_token_id
}

// Dream-v0-Instruct-7B (tools/reference/README.md, "dream-7b"): 7.62B parameters, Qwen2.5-7B's shape.
const dream7b: DreamConfig = {
  model_type: "Dream",
  hidden_size: 3584,
  num_hidden_layers: 28,
  num_attention_heads: 28,
  num_key_value_heads: 4,
  intermediate_size: 18944,
  vocab_size: 152064,
  rope_theta: 1000000,
  rms_norm_eps: 1e-6,
  max_position_embeddings: 131072,
  tie_word_embeddings: false,
  mask_token_id: 151666,
  pad_token_id: 151643,
  bos_token_id: 151643,
  eos_token_id: 151643
}

export const familyPresets: Readonly<Record<string, FamilyPreset>> = {
  "llada2-tiny": {
    name: "llada2-tiny",
    description:
      "llada2_moe, 3 layers (layer 0 dense), d 64, 16 experts in 4 groups (2 kept), top 4, a shared expert, partial rotary, QK-norm, fused QKV; the embedded tokenizer",
    config: llada2Tiny,
    dtype: "F32",
    initStd: 0.125,
    biasStd: 0.05,
    tokenizer: "embedded"
  },
  "sdar-tiny": {
    name: "sdar-tiny",
    description: "sdar, 2 layers, d 64, 4/2 heads of 32, block 4; the embedded tokenizer",
    config: sdarTiny,
    dtype: "F32",
    initStd: 0.125,
    biasStd: 0,
    tokenizer: "embedded"
  },
  "sdar-moe-tiny": {
    name: "sdar-moe-tiny",
    description: "sdar_moe, 2 layers, d 64, 8 experts, top 2 renormalised, block 4; the embedded tokenizer",
    config: {
      ...sdarTiny,
      model_type: "sdar_moe",
      moe: { num_experts: 8, num_experts_per_tok: 2, moe_intermediate_size: 32, norm_topk_prob: true }
    },
    dtype: "F32",
    initStd: 0.125,
    biasStd: 0,
    tokenizer: "embedded"
  },
  "dream-tiny": {
    name: "dream-tiny",
    description: "Dream (Qwen2 layout), 2 layers, d 64, 4/2 heads of 16 with q/k/v biases, shifted logits; the embedded tokenizer",
    config: dreamTiny,
    dtype: "F32",
    initStd: 0.125,
    biasStd: 0.125,
    tokenizer: "embedded"
  },
  "dream-small": {
    name: "dream-small",
    description: "Dream (Qwen2 layout) at the small preset's size: 12 layers, d 768, vocab 10240, q/k/v biases; for benchmarks",
    config: dreamSmall,
    dtype: "F32",
    initStd: 0.02,
    biasStd: 0.02,
    tokenizer: "none"
  },
  "llada2-mini": {
    name: "llada2-mini",
    description: "the real LLaDA2.0/2.1-mini shape with random weights: 16.26B parameters (256 experts, top 8), bf16 (use --quantize)",
    config: llada2Mini,
    dtype: "BF16",
    initStd: 0.02,
    biasStd: 0.01,
    maxShardBytes: 4_000_000_000,
    tokenizer: "none"
  },
  "sdar-4b": {
    name: "sdar-4b",
    description: "the real SDAR-4B shape with random weights: 4.41B parameters, bf16",
    config: sdar4b,
    dtype: "BF16",
    initStd: 0.02,
    biasStd: 0,
    maxShardBytes: 4_000_000_000,
    tokenizer: "none"
  },
  "dream-7b": {
    name: "dream-7b",
    description: "the real Dream-v0-7B shape with random weights: 7.62B parameters, q/k/v biases, bf16",
    config: dream7b,
    dtype: "BF16",
    initStd: 0.02,
    biasStd: 0.02,
    maxShardBytes: 4_000_000_000,
    tokenizer: "none"
  }
}
