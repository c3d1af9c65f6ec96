/**
 * The native addon (native/src/addon/addon.cpp) and its hand-written type. Nothing here has logic of its
 * own beyond finding and loading the compiled `.node` file; the Engine service builds on this.
 *
 * @since 0.1.0
 */
import { existsSync, readFileSync } from "node:fs"
import { createRequire } from "node:module"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import type { CpuIsa } from "../config/Config.js"

/** `code` of every error the addon throws or rejects with: "VDIFF_" + the native error code's name. */
export type NativeErrorCode =
  | "VDIFF_INVALID_MODEL"
  | "VDIFF_INVALID_ARGUMENT"
  | "VDIFF_CANCELLED"
  | "VDIFF_OUT_OF_MEMORY"
  | "VDIFF_UNAVAILABLE"
  /** The model computed NaN or infinity for a sequence's rows: its step fails, nothing is committed. */
  | "VDIFF_NUMERIC"
  | "VDIFF_INTERNAL"

export interface NativeError extends Error {
  readonly code: NativeErrorCode
}

const nativeErrorCodes: ReadonlySet<string> = new Set<NativeErrorCode>([
  "VDIFF_INVALID_MODEL",
  "VDIFF_INVALID_ARGUMENT",
  "VDIFF_CANCELLED",
  "VDIFF_OUT_OF_MEMORY",
  "VDIFF_UNAVAILABLE",
  "VDIFF_NUMERIC",
  "VDIFF_INTERNAL"
])

export const isNativeError = (u: unknown): u is NativeError =>
  u instanceof Error && "code" in u && typeof u.code === "string" && nativeErrorCodes.has(u.code)

/** config.json of the loaded model, camelCased. */
export interface NativeModelConfig {
  readonly dModel: number
  readonly nHeads: number
  readonly nKvHeads: number
  readonly nLayers: number
  readonly mlpHiddenSize: number
  readonly vocabSize: number
  readonly embeddingSize: number
  readonly maskTokenId: number
  readonly eosTokenId: number
  readonly maxSequenceLength: number
  readonly ropeTheta: number
  readonly rmsNormEps: number
  readonly weightTying: boolean
  readonly includeBias: boolean
}

/**
 * How a model family writes its answer (native ModelConfig::decoding and the family description):
 * "full_canvas" (LLaDA: bidirectional attention over prompt and answer), "block" (LLaDA2.x, SDAR:
 * block-causal attention over blocks of `blockLength` aligned at position 0, finished blocks cached exactly)
 * or "dream" (Dream: bidirectional over the whole canvas, the prediction for a position read from the
 * output at the position before it; Dream's sampler, no blocks).
 */
export type NativeDecoding = "full_canvas" | "block" | "dream"

/** The loaded model's family, for per-family defaults and for refusing settings that do not apply. */
export interface NativeModelFamily {
  /** config.json "model_type": "llada" | "llada2_moe" | "sdar" | "sdar_moe"; "dream" for model_type "Dream". */
  readonly name: string
  readonly decoding: NativeDecoding
  /** Block decoding: the block size the model was trained with (LLaDA2 32, SDAR 4), the only one it accepts; 0 for full_canvas and dream. */
  readonly blockLength: number
  /** Whether the family has LLaDA2.1 token editing (editingThreshold >= 0 is refused otherwise). */
  readonly editing: boolean
  /** The mask token of the model (config.json, else the family's default). */
  readonly maskTokenId: number
  readonly eosTokenId: number
  /** Further end tokens besides eosTokenId (an "eos_token_id" list's rest); block decoding stops after the block holding any. */
  readonly stopTokenIds: ReadonlyArray<number>
}

export interface NativeModelInfo {
  readonly config: NativeModelConfig
  /**
   * The model's family. Always set by the addon; optional in the type only so that test doubles written
   * before block decoding need not set it (absent: LLaDA, full_canvas).
   */
  readonly family?: NativeModelFamily | undefined
  /** The backend computing the forward: "cpu" or "cuda". */
  readonly backend: "cpu" | "cuda"
  /** CPU: the instruction-set path of the kernels ("amx", "avx512bf16", "avx512", "avx2", "portable"); CUDA: the GPU's name. */
  readonly device: string
  /** The matrix-product implementation ("avx512", "cublas", "tiled fallback", ...). */
  readonly gemm: string
  /** Bytes the backend holds on its device (weights, packed copies, caches); CPU: the weights and packed copies. */
  readonly memoryUsedBytes: number
  /** The device's memory; 0 on the CPU (not reported). */
  readonly memoryTotalBytes: number
  /** The projection weights' type: as stored, or the block-quantized format (a `vdiff quantize` checkpoint or --quantize). */
  readonly weightDtype: "f32" | "bf16" | "f16" | "q8_0" | "q4_0"
  readonly parameterCount: number
  readonly weightBytes: number
  /** Bytes of the copies of the weights packed at load for the GEMM; 0: none (see packWeightsMaxBytes). */
  readonly packedWeightBytes: number
  /** Bytes a KV cache takes per canvas position (a sequence's cache: this x its canvas length). */
  readonly kvCacheBytesPerPosition: number
  /** The bound on the bytes of all live KV caches together; 0: none. */
  readonly kvCacheBudgetBytes: number
  /**
   * The prefix cache's capacity (NativeLoadOptions.prefixCacheBytes on a block-diffusion model); 0: none.
   * Optional in the type only so that test doubles need not set it.
   */
  readonly prefixCacheBytes?: number | undefined
  /**
   * Tensors of the checkpoint the model does not read (config.json may not describe it: a stored head the
   * config ties, biases it turns off). Optional in the type only so that test doubles need not set it.
   */
  readonly unusedTensors?: ReadonlyArray<string> | undefined
}

/**
 * The prefix cache of a block-diffusion model (native/src/core/prefix_cache.h): whole prompt blocks kept
 * across requests, exact. All zero without one.
 */
export interface NativePrefixCacheStats {
  readonly capacityBytes: number
  /** Held by its entries now (also counted in kvCacheBytes()). */
  readonly bytes: number
  readonly entries: number
  /** Sequences that looked a prompt up (kvCache "prefix", at least one whole block), and those that found one. */
  readonly lookups: number
  readonly hits: number
  /** Prompt positions copied instead of computed. */
  readonly hitPositions: number
  readonly inserts: number
  /** Entries dropped to make room (the capacity, or the KV budget for a new sequence). */
  readonly evictions: number
}

/**
 * Approximate KV caching (Fast-dLLM): "prefix" refreshes a cache of every position's keys and values at
 * each block start and then recomputes only the block and what follows it; "dual" recomputes only the
 * block. "none": every step evaluates the whole canvas.
 */
export type NativeKvCacheMode = "none" | "prefix" | "dual"

export type NativeRemasking = "low_confidence" | "random"

/**
 * Sampling settings of one sequence; validated natively (VDIFF_INVALID_ARGUMENT names the bad field). The
 * type comes from the sampling settings' table (src/config/sampling.ts); its field names are the ones
 * params_of in native/src/addon/addon.cpp reads.
 *
 * Block decoding (family.decoding "block") reads the same fields with their own meaning and two more:
 * - blockLength must be family.blockLength; steps is per block (the reference's quota schedule);
 * - parallelThreshold > 0 commits every masked position above it (strict >) when they are at least the
 *   step's quota, else the quota's most confident (LLaDA2.0 "threshold", SDAR "confidence_threshold");
 * - kvCache "prefix" is the exact block cache (prefill of the prompt's whole blocks, one commit forward
 *   per finished block), "none" recomputes [0, block end) every step; "dual" is refused;
 * - editingThreshold (optional number; absent, null or < 0: off) and maxPostSteps (optional integer >= 0;
 *   absent or null: 16): LLaDA2.1 token editing, refused (param "editing_threshold") on a family
 *   without it. A full-canvas model refuses editingThreshold >= 0.
 * Refused on block models, each naming its field: cfgScale > 0 ("cfg_scale"), remasking "random"
 * ("remasking"), a suffix ("suffix"), a template ("template"), parallelFactor > 0 ("parallel_factor"),
 * kvCache "dual" ("kv_cache"), blockLength other than the model's ("block_length"). earlyStop and
 * kvRefreshInterval have no effect there (block decoding always stops after the block holding an end token).
 *
 * Dream decoding (family.decoding "dream", tools/reference/dream_generate.py) reads three more, each
 * optional and ignored by the other families (the serving layer refuses them there):
 * - alg: "origin" | "maskgit_plus" | "topk_margin" | "entropy" (absent: "entropy"): the confidence a step
 *   commits by (origin: each mask revealed at random with probability 1 − s/t);
 * - algTemp: number >= 0 (absent: 0): above 0 the committed positions are drawn by softmax(confidence / algTemp);
 * - eps: number in (0, 1) (absent: 1e-3): timesteps linspace(1, eps, steps + 1) in f32; step i commits
 *   int(n (1 − t[i+1]/t[i])) of the n masks left, the last step all.
 * `steps` counts the whole answer (more than genLength: steps that commit nothing); temperature, topP and
 * topK follow Dream's rule (at temperature 0 they still change the confidences). Refused there, each naming
 * its field: cfgScale > 0, remasking "random", a suffix, a template, parallelThreshold > 0, parallelFactor > 0,
 * kvCache other than "none", minP > 0, logitsEosInf, confidenceEosEotInf, editingThreshold >= 0 ("alg",
 * "alg_temp", "eps" for their own bad values). blockLength, earlyStop and kvRefreshInterval are not read.
 * Every step is phase "denoise" of block 0 and evaluates the whole canvas; stepsTotal = steps; a committed
 * token's probability is its softmax probability after top_p/top_k (Dream's trace probability).
 */
export type { NativeSamplingParams } from "../config/sampling.js"

/** A likely alternative at the step that committed a token: its id and natural log-probability. */
export interface TopLogprob {
  readonly token: number
  readonly logprob: number
}

export interface CommittedToken {
  /**
   * Index into the answer (0 .. genLength-1). Block decoding denoises the last block past genLength too
   * (and the prompt's tail with the first); only answer positions are reported.
   */
  readonly position: number
  readonly token: number
  /** The softmax probability the token had at the step that committed it (1 for an early stop's EOS). */
  readonly probability: number
  /** With topLogprobs > 0: that step's likeliest tokens, most likely first (absent for an early stop's EOS). */
  readonly top?: ReadonlyArray<TopLogprob>
}

/**
 * What a sequence's forward did in a step. Full-canvas models: always "denoise". Block decoding:
 * "prefill" (the prompt's whole blocks into the KV cache, once; nothing committed), "denoise" (the open
 * block), "commit" (the finished block again from its final tokens, caching its exact keys and values;
 * nothing committed; none after the last block). One batched step mixes the phases of its sequences.
 */
export type NativePhase = "prefill" | "denoise" | "commit"

/**
 * What one denoising step did to one sequence, as the addon builds it; the Engine, the Scheduler and the
 * serving layer pass this object on unchanged.
 */
export interface StepSnapshot {
  readonly id: number
  /** Answer positions committed in this step, ascending; never masked again. */
  readonly committed: ReadonlyArray<CommittedToken>
  readonly finished: boolean
  /** Set once finished: "eos" when the answer holds an EOS/EOT token, else "length". */
  readonly reason: "length" | "eos" | null
  /**
   * The block this step worked on. Block decoding: counted from the block that holds the answer's first
   * position (the prompt's tail shares it); a prefill says 0, a commit the block it cached.
   */
  readonly block: number
  /** Steps done by this sequence so far, this one included (block decoding: denoise steps only). */
  readonly stepsDone: number
  /**
   * Steps planned for the whole answer; an upper bound with parallel decoding or early stop (block
   * decoding: steps per block times its blocks, or with editing each block's masks plus maxPostSteps).
   */
  readonly stepsTotal: number
  /** How many of the committed tokens (the last ones) an early stop filled with EOS (probability 1). */
  readonly filled: number
  /** Canvas evaluations of this sequence so far: one per step, two with cfg (a cached step's counts too). */
  readonly forwardPasses: number
  /**
   * Of those, the ones that refreshed a KV cache (evaluated the whole canvas). Block decoding: the prefill
   * and commit forwards (those that write final keys and values).
   */
  readonly kvRefreshes: number
  /**
   * The rest is set by the addon for every model; optional in the type only so that test doubles written
   * before block decoding need not set it.
   * What this step's forward did for the sequence (absent: "denoise").
   */
  readonly phase?: NativePhase | undefined
  /**
   * Editing (block decoding with editingThreshold >= 0): the open block's tokens that may still change
   * (answer positions, ascending, each with its current token and probability). They reach `committed`
   * only when their block closes, with their final token. Empty otherwise.
   */
  readonly provisional?: ReadonlyArray<CommittedToken> | undefined
  /** Canvas positions this sequence's forwards computed so far (prefill, denoise and commit forwards). */
  readonly positionsComputed?: number | undefined
  /** Prompt positions whose keys and values the sequence copied from the prefix cache (the same every step). */
  readonly promptCached?: number | undefined
}

export interface NativeSequenceInfo {
  readonly promptLength: number
  readonly genLength: number
  readonly suffixLength: number
  /** Planned steps; an upper bound with parallel decoding (genLength) or early stop. */
  readonly stepsTotal: number
  readonly stepsDone: number
  readonly finished: boolean
  readonly memoryBytes: number
  readonly forwardPasses: number
  /** Answer positions committed by sampling (not filled by an early stop). */
  readonly tokensDenoised: number
  readonly kvRefreshes: number
  /** Held by its KV caches (included in memoryBytes); 0 once finished. */
  readonly kvCacheBytes: number
  /** Canvas positions its forwards computed so far: the work a cache cuts. */
  readonly positionsComputed: number
  /** Prompt positions copied from the prefix cache instead of computed. */
  readonly promptCached: number
}

/** A flag a running step checks; once cancelled the step rejects with VDIFF_CANCELLED and changes nothing. */
export interface NativeCancelToken {
  cancel(): void
  readonly cancelled: boolean
}

export interface NativeEngine {
  info(): NativeModelInfo
  /**
   * Creates a sequence; throws VDIFF_INVALID_ARGUMENT. Returns its id. With a suffix the canvas is
   * prompt, genLength masks, suffix (infilling); answers and positions are the masked middle's. With a
   * template (genLength entries: -1 where the model writes, else the token fixed there) the fixed tokens
   * are committed from the start and the model denoises the rest around them (structured output).
   */
  create(
    prompt: Int32Array | ReadonlyArray<number>,
    params: import("../config/sampling.js").NativeSamplingParams,
    suffix?: Int32Array | ReadonlyArray<number> | null,
    template?: Int32Array | ReadonlyArray<number>
  ): number
  /**
   * Advances every given sequence by one denoising step in one batched forward, off the JS thread.
   * Steps run one at a time; a second call waits for the first.
   */
  step(ids: ReadonlyArray<number>, cancel?: NativeCancelToken): Promise<Array<StepSnapshot>>
  /**
   * The model's log-probability of targets[i] at canvas position positions[i], from one forward over the
   * whole canvas (mask tokens where it is to predict): the masked-token likelihood of a text, for
   * evaluation. Off the JS thread, one at a time with steps. Rejects with VDIFF_INVALID_ARGUMENT.
   */
  score(
    canvas: Int32Array | ReadonlyArray<number>,
    positions: Int32Array | ReadonlyArray<number>,
    targets: Int32Array | ReadonlyArray<number>
  ): Promise<Float64Array>
  /**
   * score for several canvases in one batched forward: per item, its targets' log-probabilities and, with
   * topLogprobs, each position's likeliest tokens (most likely first; `top` is empty without). Rejects
   * with VDIFF_INVALID_ARGUMENT naming the item ("score: items[2]: ...").
   */
  scoreBatch(
    items: ReadonlyArray<{
      readonly canvas: Int32Array | ReadonlyArray<number>
      readonly positions: Int32Array | ReadonlyArray<number>
      readonly targets: Int32Array | ReadonlyArray<number>
      /** 0 .. 20: each position's likeliest tokens to report besides (the mask token left out). */
      readonly topLogprobs?: number
      /** Also each target's rank in its row (1: the likeliest; `ranks` is empty without). */
      readonly rank?: boolean
    }>
  ): Promise<Array<{ readonly logprobs: Float64Array; readonly top: Array<Array<TopLogprob>>; readonly ranks: Int32Array }>>
  /** Frees the sequence now (or when an in-flight step using it returns). Unknown ids are ignored. */
  release(id: number): void
  /** The answer region of the canvas, mask tokens where nothing is committed yet. */
  canvas(id: number): Int32Array
  sequenceInfo(id: number): NativeSequenceInfo
  /** Number of live (created, not released) sequences. */
  live(): number
  /** Bytes the KV caches of live sequences and the prefix cache's entries hold now (a sequence's are freed when it finishes). */
  kvCacheBytes(): number
  prefixCache(): NativePrefixCacheStats
}

export interface NativeLoadOptions {
  /** Where the forward runs: "cuda", "cpu", or "auto" (CUDA when a GPU is visible, else the CPU). Absent: "cpu". */
  readonly device?: "auto" | "cpu" | "cuda" | undefined
  /** CUDA: the share of the GPU's memory for weights, KV caches and activations, in (0, 1]; absent: 0.9. */
  readonly gpuMemoryUtilization?: number | undefined
  /**
   * CPU: quantize the projection matrices at load (not the head) into blocks of 32 (int8 with a scale, or 4-bit)
   * for the integer GEMM; absent or "none": compute from the weights as stored.
   */
  readonly quantize?: "none" | "q8_0" | "q4_0" | undefined
  /**
   * CPU: the kernels' instruction set; absent or "auto": the widest the CPU has (or the one the VDIFF_ISA
   * environment variable names). One this CPU lacks rejects with VDIFF_UNAVAILABLE listing those it has.
   */
  readonly cpuIsa?: CpuIsa | undefined
  /** Called on the JS thread while a device backend uploads the weights (every 256 MiB, and at the end). */
  readonly onProgress?: ((bytesDone: number, bytesTotal: number) => void) | undefined
  /** Worker threads for the forward pass; 0 or absent: all hardware threads. */
  readonly threads?: number | undefined
  /** Element type of the KV caches; absent: "f32" (exact reads), "bf16" halves their memory. */
  readonly kvCacheDtype?: "f32" | "bf16" | undefined
  /** Bound on the bytes of all live KV caches together; 0 or absent: none. */
  readonly kvCacheBudgetBytes?: number | undefined
  /**
   * Block-diffusion models: bytes of finished prefixes' keys and values kept for later sequences whose
   * prompts start with the same whole blocks (drawn from the KV budget, given back to a new sequence when
   * it needs them); 0 or absent: none. Other models ignore it.
   */
  readonly prefixCacheBytes?: number | undefined
  /**
   * Block-diffusion models: the most prompt positions a sequence prefills in one step (rounded down to whole
   * blocks, at least one); a longer prompt's prefill takes several steps. 0 or absent: all in one.
   */
  readonly prefillChunk?: number | undefined
  /**
   * The projection and head weights are packed once at load (f32, in the GEMM's layout) when that takes
   * at most this many bytes: the same results with less work per forward. Absent: 4 GiB; 0: never.
   */
  readonly packWeightsMaxBytes?: number | undefined
}

export interface NativeAddon {
  /** Loads config.json and safetensors weights from dir, off the JS thread. Rejects with VDIFF_INVALID_MODEL. */
  loadModel(dir: string, options?: NativeLoadOptions): Promise<NativeEngine>
  readonly CancelToken: new () => NativeCancelToken
  /** GPUs the CUDA backend sees: 0 when the build has no CUDA, or there is no driver or device. */
  cudaDevices(): number
}

/** The directory holding this package's package.json, found by walking up from this module. */
const packageRoot = (): string => {
  let dir = dirname(fileURLToPath(import.meta.url))
  for (;;) {
    const manifest = join(dir, "package.json")
    if (existsSync(manifest)) {
      const name: unknown = JSON.parse(readFileSync(manifest, "utf8")).name
      if (name === "vdiff") return dir
    }
    const parent = dirname(dir)
    if (parent === dir) throw new Error("vdiff: cannot find the package root (package.json named vdiff)")
    dir = parent
  }
}

/** Where `npm run build:native` puts the addon. */
export const defaultAddonPath = (): string => join(packageRoot(), "build", "native", "Release", "vdiff.node")

const loaded = new Map<string, NativeAddon>()

/**
 * Loads the compiled addon (once per path). Throws a plain Error saying how to build it when the file
 * is missing.
 */
export const loadAddon = (path: string = defaultAddonPath()): NativeAddon => {
  const cached = loaded.get(path)
  if (cached !== undefined) return cached
  if (!existsSync(path)) {
    throw new Error(`vdiff native addon not found at ${path}: run npm install (or npm run build:native)`)
  }
  const require = createRequire(import.meta.url)
  const addon = require(path) as NativeAddon
  loaded.set(path, addon)
  return addon
}
