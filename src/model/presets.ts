/**
 * LLaDA model shapes: the config.json keys, the tensor names and shapes of a LLaDA checkpoint, and the
 * named presets `vdiff make-model` can write with random weights.
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
