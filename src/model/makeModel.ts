/**
 * Writes model directories: config.json plus model.safetensors (or shards with
 * model.safetensors.index.json), either from a preset with seeded random weights — LLaDA's (tiny, small,
 * llada-8b), a block-diffusion family's (llada2-tiny, sdar-tiny, sdar-moe-tiny, llada2-mini, sdar-4b) or
 * Dream's (dream-tiny, dream-7b) — or by importing the raw f32 tensors the training script exports. A
 * preset can be written straight into Q8_0 or Q4_0 (the format of `vdiff quantize`), tensor by tensor,
 * without an unquantized copy.
 *
 * @since 0.1.0
 */
import { copyFile, open, readdir, readFile, rm, stat, writeFile } from "node:fs/promises"
import { join } from "node:path"
import { embeddedModelDir } from "../config/package.js"
import {
  EMBEDDED_VOCAB,
  type FamilyPreset,
  type LladaConfig,
  type Preset,
  type TensorShape,
  configJson,
  familyConfigJson,
  familyPresets,
  familyTensors,
  familyTokenizers,
  lladaTensors,
  presets,
  requiredConfigKeys,
  tokenizerStyle,
  torchDtypeNames
} from "./presets.js"
import { type QuantFormat, quantizedLayout, writeQuantizedSafetensors } from "./quantize.js"
import {
  type DType,
  type TensorSource,
  elementCount,
  makeDirectory,
  tensorBytes,
  writeConfigJson,
  writeSafetensors,
  writeShardIndex
} from "./safetensors.js"

export interface WrittenModel {
  readonly dir: string
  /** The safetensors files written, in order. */
  readonly files: ReadonlyArray<string>
  readonly parameters: number
  /** Bytes of tensor data (the index's total_size). */
  readonly bytes: number
}

export interface WriteModelOptions {
  /** Split into shards of at most this many bytes of tensor data (a single tensor may exceed it). */
  readonly maxShardBytes?: number
  readonly metadata?: Readonly<Record<string, string>>
  readonly chunkElements?: number
  /** Called with a line of progress text per file written. */
  readonly onProgress?: (message: string) => void
  /**
   * Write the matrices block-quantized (src/model/quantize.ts), tensor by tensor: the same files
   * `vdiff quantize` makes of the unquantized directory, without writing that directory first.
   */
  readonly quantize?: QuantFormat
  /** Writes one quantized shard instead of writeQuantizedSafetensors (same contract; bench/moe's native writer). */
  readonly writeQuantizedShard?: typeof writeQuantizedSafetensors
  /** Writes one unquantized shard instead of writeSafetensors; returns the file's bytes (bench/moe's native writer). */
  readonly writeShard?: (path: string, tensors: ReadonlyArray<TensorSource>, metadata: Readonly<Record<string, string>>) => Promise<number>
}

// --- seeded random weights --------------------------------------------------------------------------

// MurmurHash3's 32-bit finaliser: a bijection on 32-bit integers that mixes every input bit into every
// output bit.
const fmix32 = (h: number): number => {
  h ^= h >>> 16
  h = Math.imul(h, 0x85ebca6b)
  h ^= h >>> 13
  h = Math.imul(h, 0xc2b2ae35)
  h ^= h >>> 16
  return h >>> 0
}

const fnv1a = (text: string): number => {
  let h = 0x811c9dc5
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193)
  return h >>> 0
}

/**
 * Uniform values in [-a, a] with a = sqrt(3) * std (so the standard deviation is `std`), where element
 * i of a tensor depends only on (seed, tensor name, i). Being counter-based rather than a stateful
 * generator, the output cannot depend on how the writer chunks the tensor. Two mixing rounds with
 * independent keys keep tensors from being shifted copies of one another.
 */
export const uniformFill = (seed: number, name: string, std: number) => {
  const { keyA, keyB, scale, a } = uniformKeys(seed, name, std)
  return (out: Float32Array, start: number): void => {
    for (let j = 0; j < out.length; j++) {
      const x = fmix32((start + j + keyA) >>> 0)
      const y = fmix32((x ^ keyB) >>> 0)
      out[j] = (y + 0.5) * scale - a
    }
  }
}

/**
 * The constants of uniformFill for a tensor: element i is f32((fmix32(fmix32(i + keyA) ^ keyB) + 0.5) *
 * scale - a), the arithmetic in doubles and 32-bit unsigned integers (for a writer in another language).
 */
export const uniformKeys = (seed: number, name: string, std: number) => {
  const seedLow = seed >>> 0
  const seedHigh = Math.floor(seed / 2 ** 32) >>> 0
  const keyA = fmix32((fnv1a(name) ^ fmix32(seedLow + 0x9e3779b9)) >>> 0)
  const keyB = fmix32((keyA ^ fmix32((seedHigh + 0x7f4a7c15) >>> 0) ^ 0x5bd1e995) >>> 0)
  return { keyA, keyB, scale: (Math.sqrt(3) * std * 2) / 2 ** 32, a: Math.sqrt(3) * std }
}

const ones = (out: Float32Array): void => {
  out.fill(1)
}

const isFamilyPreset = (preset: Preset | FamilyPreset): preset is FamilyPreset => "tokenizer" in preset

/** A preset's tensor, with how its values are made (for a writer in another language: uniformKeys). */
export interface PresetTensor extends TensorSource {
  readonly init: { readonly kind: "ones" } | { readonly kind: "uniform"; readonly seed: number; readonly std: number }
}

/**
 * The tensors of `preset` as lazily generated sources: norms exactly 1, matrices uniform with the
 * preset's std, an MoE router's expert bias uniform with its biasStd (stored f32).
 */
export const presetTensors = (preset: Preset | FamilyPreset, seed: number, dtype: DType = preset.dtype): Array<PresetTensor> => {
  const source = (name: string, shape: ReadonlyArray<number>, type: DType, std: number | undefined): PresetTensor => ({
    name,
    dtype: type,
    shape,
    fill: std === undefined ? ones : uniformFill(seed, name, std),
    init: std === undefined ? { kind: "ones" } : { kind: "uniform", seed, std }
  })
  if (!isFamilyPreset(preset)) {
    return lladaTensors(preset.config).map((t) => source(t.name, t.shape, dtype, t.kind === "norm" ? undefined : preset.initStd))
  }
  return familyTensors(preset.config).map((t) =>
    source(t.name, t.shape, t.dtype ?? dtype, t.kind === "norm" ? undefined : t.kind === "bias" ? preset.biasStd : preset.initStd)
  )
}

// --- writing a model directory ------------------------------------------------------------------------

/** Groups tensors into consecutive shards of at most `maxBytes` (never splitting a tensor). */
export const planShards = (tensors: ReadonlyArray<TensorSource>, maxBytes: number | undefined): Array<Array<TensorSource>> => {
  if (maxBytes === undefined) return [Array.from(tensors)]
  const shards: Array<Array<TensorSource>> = []
  let current: Array<TensorSource> = []
  let bytes = 0
  for (const t of tensors) {
    const size = tensorBytes(t)
    if (current.length > 0 && bytes + size > maxBytes) {
      shards.push(current)
      current = []
      bytes = 0
    }
    current.push(t)
    bytes += size
  }
  if (current.length > 0) shards.push(current)
  return shards
}

export const shardName = (index: number, count: number): string =>
  `model-${String(index + 1).padStart(5, "0")}-of-${String(count).padStart(5, "0")}.safetensors`

/** Removes weight files of an earlier model in `dir`, so the loader cannot mix old and new files. */
const removeOldWeights = async (dir: string): Promise<void> => {
  for (const name of await readdir(dir)) {
    if (name === "model.safetensors" || name === "model.safetensors.index.json" || /^model-\d+-of-\d+\.safetensors$/.test(name)) {
      await rm(join(dir, name))
    }
  }
}

/** Writes config.json and the weights of a LLaDA model into `dir` (created if needed). */
export const writeModelDir = async (
  dir: string,
  config: Readonly<Record<string, unknown>>,
  tensors: ReadonlyArray<TensorSource>,
  options: WriteModelOptions = {}
): Promise<WrittenModel> => {
  await makeDirectory(dir)
  await removeOldWeights(dir)
  await writeConfigJson(join(dir, "config.json"), config)
  const metadata = { format: "pt", ...options.metadata }
  const shards = planShards(tensors, options.maxShardBytes)
  const files: Array<string> = []
  const weightMap: Record<string, string> = {}
  const format = options.quantize
  let fileBytes = 0
  for (const [i, shard] of shards.entries()) {
    const name = shards.length === 1 ? "model.safetensors" : shardName(i, shards.length)
    const started = Date.now()
    const size =
      format === undefined
        ? options.writeShard !== undefined
          ? await options.writeShard(join(dir, name), shard, metadata)
          : await writeSafetensors(join(dir, name), shard, {
              metadata,
              ...(options.chunkElements !== undefined ? { chunkElements: options.chunkElements } : {})
            })
        : await (options.writeQuantizedShard ?? writeQuantizedSafetensors)(join(dir, name), shard, format, metadata)
    options.onProgress?.(
      `wrote ${name}: ${shard.length} tensors${format !== undefined ? ` (${format})` : ""}, ${(size / 1e6).toFixed(1)} MB in ${((Date.now() - started) / 1000).toFixed(1)} s`
    )
    files.push(name)
    fileBytes += size
    if (format === undefined) for (const t of shard) weightMap[t.name] = name
    else for (const t of quantizedLayout(shard, format)) weightMap[t.name] = name
  }
  const parameters = tensors.reduce((n, t) => n + elementCount(t.shape), 0)
  if (format !== undefined) {
    // The index `vdiff quantize` writes for a sharded checkpoint (its total_size counts the files' bytes).
    if (shards.length > 1) {
      await writeFile(
        join(dir, "model.safetensors.index.json"),
        JSON.stringify({ metadata: { total_size: fileBytes, "vdiff.quantization": format }, weight_map: weightMap }, null, 2) + "\n"
      )
    }
    return { dir, files, parameters, bytes: quantizedLayout(tensors, format).reduce((n, t) => n + t.bytes, 0) }
  }
  const bytes = tensors.reduce((n, t) => n + tensorBytes(t), 0)
  if (shards.length > 1) {
    await writeShardIndex(join(dir, "model.safetensors.index.json"), { metadata: { total_size: bytes }, weight_map: weightMap })
  }
  return { dir, files, parameters, bytes }
}

export interface MakeModelOptions {
  readonly preset: string
  readonly seed: number
  readonly out: string
  /** Defaults to the preset's dtype (f32 for the tiny ones and small, bf16 for the real shapes). */
  readonly dtype?: DType
  /** Defaults to the preset's shard size (the real shapes: 4 GB; others: one file). */
  readonly maxShardBytes?: number
  /** Write the matrices in Q8_0 or Q4_0 (see WriteModelOptions.quantize). */
  readonly quantize?: QuantFormat
  readonly writeQuantizedShard?: WriteModelOptions["writeQuantizedShard"]
  readonly writeShard?: WriteModelOptions["writeShard"]
  readonly onProgress?: (message: string) => void
}

export const presetNames = (): Array<string> => [...Object.keys(presets), ...Object.keys(familyPresets)]

export const findPreset = (name: string): Preset | FamilyPreset => {
  const preset = presets[name] ?? familyPresets[name]
  if (preset === undefined) throw new Error(`unknown preset "${name}" (known: ${presetNames().join(", ")})`)
  return preset
}

interface BpeTokenizerJson {
  added_tokens: Array<{ id: number; content: string }>
  post_processor: unknown
  model: { vocab: Record<string, number>; merges: Array<readonly [string, string] | string> }
}

/**
 * A byte-level BPE tokenizer.json cut to its first `size` ids: the tokens below size - (special tokens), the
 * merges that make them, and the special tokens renumbered after them. tools/train/bpe.py learns its merges
 * in a fixed order, so the embedded 8192-id tokenizer cut to 2048 is exactly the 2048-id tokenizer of the same
 * corpus that the tiny family presets (and their golden fixtures) were made with.
 */
export const cutTokenizer = (tokenizer: BpeTokenizerJson, size: number): BpeTokenizerJson => {
  const special = [...tokenizer.added_tokens].sort((a, b) => a.id - b.id)
  const keep = size - special.length
  const vocab = Object.fromEntries(Object.entries(tokenizer.model.vocab).filter(([, id]) => id < keep))
  if (Object.keys(vocab).length !== keep) {
    throw new Error(`tokenizer.json: ids below ${keep} are not contiguous, so it cannot be cut to ${size}`)
  }
  const merges = tokenizer.model.merges.filter((merge) => {
    const [a, b] = typeof merge === "string" ? merge.split(" ") : merge
    return vocab[`${a}${b}`] !== undefined
  })
  return {
    ...tokenizer,
    added_tokens: special.map((token, i) => ({ ...token, id: keep + i })),
    model: { ...tokenizer.model, vocab, merges }
  }
}

/**
 * The embedded model's tokenizer as another family's (LLaDA2, SDAR, Dream): tokenizer.json with the six
 * special tokens (ids 2042 .. 2047) renamed to the family's and no post-processor (no family adds a BOS
 * when encoding), and a tokenizer_config.json with the family's special tokens and chat template.
 */
export const writeFamilyTokenizer = async (dir: string, family: keyof typeof familyTokenizers): Promise<void> => {
  const spec = familyTokenizers[family]
  const source = embeddedModelDir()
  const tokenizer = cutTokenizer(JSON.parse(await readFile(join(source, "tokenizer.json"), "utf8")), EMBEDDED_VOCAB)
  const names: Readonly<Record<number, string>> = spec.names
  for (const token of tokenizer.added_tokens) {
    const name = names[token.id]
    if (name === undefined) throw new Error(`${source}/tokenizer.json: unexpected special token ${token.id} ${token.content}`)
    token.content = name
  }
  if (tokenizer.added_tokens.length !== Object.keys(names).length) {
    throw new Error(
      `${source}/tokenizer.json: expected ${Object.keys(names).length} special tokens, found ${tokenizer.added_tokens.length}`
    )
  }
  tokenizer.post_processor = null
  await writeFile(join(dir, "tokenizer.json"), JSON.stringify(tokenizer))
  const config = {
    tokenizer_class: "PreTrainedTokenizerFast",
    ...spec.config,
    add_bos_token: false,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    model_max_length: 4096
  }
  await writeFile(join(dir, "tokenizer_config.json"), JSON.stringify(config, null, 2) + "\n")
}

/** `vdiff make-model --preset`: a model directory with deterministic random weights. */
export const makeModel = async (options: MakeModelOptions): Promise<WrittenModel> => {
  const preset = findPreset(options.preset)
  if (!Number.isSafeInteger(options.seed) || options.seed < 0) {
    throw new Error(`seed must be a non-negative integer, got ${options.seed}`)
  }
  const dtype = options.dtype ?? preset.dtype
  const maxShardBytes = options.maxShardBytes ?? preset.maxShardBytes
  const config = isFamilyPreset(preset) ? familyConfigJson(preset.config, dtype) : configJson(preset.config, dtype)
  const written = await writeModelDir(options.out, config, presetTensors(preset, options.seed, dtype), {
    metadata: { generator: "vdiff make-model", preset: preset.name, seed: String(options.seed) },
    ...(maxShardBytes !== undefined ? { maxShardBytes } : {}),
    ...(options.quantize !== undefined ? { quantize: options.quantize } : {}),
    ...(options.writeQuantizedShard !== undefined ? { writeQuantizedShard: options.writeQuantizedShard } : {}),
    ...(options.writeShard !== undefined ? { writeShard: options.writeShard } : {}),
    ...(options.onProgress !== undefined ? { onProgress: options.onProgress } : {})
  })
  if (isFamilyPreset(preset) && preset.tokenizer === "embedded") {
    await writeFamilyTokenizer(options.out, tokenizerStyle(preset.config))
  }
  return written
}

// --- importing raw tensors from the training script ---------------------------------------------------

/**
 * What the training script exports: `manifest.json` with the model's config.json contents and one raw
 * little-endian f32 file per tensor (paths relative to the manifest's directory).
 */
export interface RawManifest {
  readonly config: Record<string, unknown>
  readonly tensors: ReadonlyArray<{ readonly name: string; readonly shape: ReadonlyArray<number>; readonly file: string }>
}

/** Files that travel with an imported model when the raw directory has them. */
const tokenizerFiles = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

/** Reads LLaDA's keys from a config object, filling the engine's defaults; throws naming a bad key. */
export const parseLladaConfig = (raw: Readonly<Record<string, unknown>>): LladaConfig => {
  const int = (key: string, fallback?: number): number => {
    const value = raw[key] ?? fallback
    if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0) {
      throw new Error(`config key "${key}" must be a non-negative integer, got ${JSON.stringify(raw[key])}`)
    }
    return value
  }
  const num = (key: string, fallback: number): number => {
    const value = raw[key] ?? fallback
    if (typeof value !== "number" || !Number.isFinite(value)) throw new Error(`config key "${key}" must be a number`)
    return value
  }
  const bool = (key: string): boolean => {
    const value = raw[key] ?? false
    if (typeof value !== "boolean") throw new Error(`config key "${key}" must be a boolean`)
    return value
  }
  for (const key of requiredConfigKeys) {
    if (!(key in raw)) throw new Error(`config is missing the required key "${key}"`)
  }
  const nHeads = int("n_heads")
  const vocab = int("vocab_size")
  return {
    d_model: int("d_model"),
    n_heads: nHeads,
    n_kv_heads: int("n_kv_heads", nHeads),
    n_layers: int("n_layers"),
    mlp_hidden_size: int("mlp_hidden_size"),
    vocab_size: vocab,
    embedding_size: int("embedding_size", vocab),
    mask_token_id: int("mask_token_id"),
    eos_token_id: int("eos_token_id"),
    rope_theta: num("rope_theta", 10000),
    rms_norm_eps: num("rms_norm_eps", 1e-5),
    max_sequence_length: int("max_sequence_length", 4096),
    weight_tying: bool("weight_tying"),
    include_bias: bool("include_bias")
  }
}

/** A tensor read from a raw f32 file chunk by chunk. */
const rawTensor = (path: string, name: string, shape: ReadonlyArray<number>, dtype: DType): TensorSource => ({
  name,
  dtype,
  shape,
  fill: async (out, start) => {
    const file = await open(path, "r")
    try {
      const bytes = new Uint8Array(out.buffer, out.byteOffset, out.byteLength)
      const { bytesRead } = await file.read(bytes, 0, bytes.byteLength, start * 4)
      if (bytesRead !== bytes.byteLength) throw new Error(`${path}: short read at element ${start}`)
    } finally {
      await file.close()
    }
  }
})

const sameShape = (a: ReadonlyArray<number>, b: ReadonlyArray<number>): boolean => a.length === b.length && a.every((d, i) => d === b[i])

export interface ImportRawOptions {
  readonly from: string
  readonly out: string
  readonly dtype?: DType
  readonly maxShardBytes?: number
  readonly onProgress?: (message: string) => void
}

/** `vdiff make-model --from-raw`: converts the training script's export into a LLaDA directory. */
export const importRaw = async (options: ImportRawOptions): Promise<WrittenModel> => {
  const dtype = options.dtype ?? "F32"
  const manifestPath = join(options.from, "manifest.json")
  const manifest = JSON.parse(await readFile(manifestPath, "utf8")) as RawManifest
  if (typeof manifest.config !== "object" || manifest.config === null || !Array.isArray(manifest.tensors)) {
    throw new Error(`${manifestPath}: expected {"config": {...}, "tensors": [...]}`)
  }
  const config = parseLladaConfig(manifest.config)
  const given = new Map(manifest.tensors.map((t) => [t.name, t]))
  const expected: Array<TensorShape> = lladaTensors(config)
  const expectedNames = new Set(expected.map((t) => t.name))
  const unexpected = manifest.tensors.filter((t) => !expectedNames.has(t.name)).map((t) => t.name)
  if (unexpected.length > 0) throw new Error(`${manifestPath}: tensors a LLaDA model does not have: ${unexpected.join(", ")}`)
  const sources: Array<TensorSource> = []
  for (const t of expected) {
    const entry = given.get(t.name)
    if (entry === undefined) throw new Error(`${manifestPath}: missing tensor ${t.name}`)
    if (!sameShape(entry.shape, t.shape)) {
      throw new Error(`${manifestPath}: tensor ${t.name} has shape [${entry.shape.join(", ")}], expected [${t.shape.join(", ")}]`)
    }
    const path = join(options.from, entry.file)
    const { size } = await stat(path)
    if (size !== elementCount(t.shape) * 4) {
      throw new Error(`${path}: ${size} bytes, expected ${elementCount(t.shape) * 4} (f32 [${t.shape.join(", ")}])`)
    }
    sources.push(rawTensor(path, t.name, t.shape, dtype))
  }
  // The trainer's config is kept whole (extra keys such as bos_token_id included); torch_dtype now
  // describes the converted weights.
  const written = await writeModelDir(
    options.out,
    { architectures: ["LLaDAModelLM"], model_type: "llada", ...manifest.config, torch_dtype: torchDtypeNames[dtype] },
    sources,
    {
      metadata: { generator: "vdiff make-model --from-raw" },
      ...(options.maxShardBytes !== undefined ? { maxShardBytes: options.maxShardBytes } : {}),
      ...(options.onProgress !== undefined ? { onProgress: options.onProgress } : {})
    }
  )
  const present = new Set(await readdir(options.from))
  for (const name of tokenizerFiles) {
    if (present.has(name)) await copyFile(join(options.from, name), join(options.out, name))
  }
  return written
}
