/**
 * `vdiff quantize`: a checkpoint's projection matrices block-quantized to Q8_0 or Q4_0, written
 * as a safetensors checkpoint the CPU engine maps and multiplies in place (native/src/cpu/quant.h).
 *
 * Format, per quantized matrix W [rows, cols] (cols a multiple of 32), in blocks of 32 along a row:
 *   - Q8_0: tensor `name`, dtype I8, shape [rows, cols]: value = q * d;
 *   - Q4_0: tensor `name`, dtype U8, shape [rows, cols / 2]: byte j of a block holds element j in its low
 *     nibble and element j + 16 in its high nibble, u in 0..15, value = (u - 8) * d;
 *   - the scales d: tensor `name + "_scale"`, dtype F16, shape [rows, cols / 32].
 * Q8_0 rows are rotated before they are quantized: multiplied by the Walsh-Hadamard matrix per block of
 * R columns (R = hadamardBlock(cols), the largest power of two up to 128 dividing cols). The engine rotates
 * the activations alike before their int8 rounding, so the product is the same in exact arithmetic while an
 * outlier is spread over R values before it is rounded (quant.h has the details, and why Q4_0 is not
 * rotated). The metadata says `"vdiff.quantization": "q8_0" | "q4_0"`, `"vdiff.block_size": "32"` and, for
 * Q8_0, `"vdiff.rotation": "hadamard"` (a checkpoint without that key is read as unrotated). The embedding
 * and the norms are copied as they are (the embedding is looked up by row, not multiplied), and so are the
 * LM head (its int8 input costs the most greedy tokens: isHead) and a matrix whose columns are not a
 * multiple of 32.
 *
 * The arithmetic is the engine's hadamard_transform and quantize_weight_row (quant.h) in f32, step for step, so a checkpoint
 * quantized here and the same checkpoint quantized at load (`--quantize`) hold the same bytes:
 *   Q8_0: d = f16(max|x| / 127), q = clamp(rne(x / d), -127, 127)
 *   Q4_0: d = f16(m / -8) for m the first element of largest magnitude, u = clamp(rne(x / d) + 8, 0, 15)
 * (a zero d gives zeros).
 *
 * Streaming: one input tensor is read a band of rows at a time (a few MB), quantized and written before
 * the next band is read; the output keeps the input's sharding (same file names, an index rewritten with
 * the scales added).
 */
import { copyFile, open, readdir, readFile, realpath, rename, rm, writeFile } from "node:fs/promises"
import type { FileHandle } from "node:fs/promises"
import { existsSync, statSync } from "node:fs"
import { join } from "node:path"
import {
  bf16ToF32,
  type DType,
  dtypeBytes,
  elementCount,
  encodeValues,
  f16ToF32,
  f32BitsToBf16,
  f32BitsToF16,
  makeDirectory,
  readSafetensorsHeader,
  sequentialWriter,
  type ShardIndex,
  type TensorEntry,
  type TensorSource,
  tensorBytes
} from "./safetensors.js"

export type QuantFormat = "q8_0" | "q4_0"
export const quantFormats: ReadonlyArray<QuantFormat> = ["q8_0", "q4_0"]
export const QBLOCK = 32

const DATA_ALIGNMENT = 64
/** Bytes of input read per band of rows. */
const BAND_BYTES = 8 << 20

const f32 = new Float32Array(1)
const u32 = new Uint32Array(f32.buffer)
const f32Bits = (x: number): number => {
  f32[0] = x
  return u32[0]!
}

/** Round half to even, exact on doubles. */
const rne = (v: number): number => {
  const f = Math.floor(v)
  const diff = v - f
  if (diff > 0.5) return f + 1
  if (diff < 0.5) return f
  return f % 2 === 0 ? f : f + 1
}

/**
 * Quantizes one row `x` (f32 values; length a multiple of 32) into `out` (cols bytes for Q8_0, cols / 2
 * for Q4_0) and `scales` (f16 bits, cols / 32), exactly as the engine's quantize_weight_row.
 */
export const quantizeRow = (x: Float32Array, format: QuantFormat, out: Uint8Array, scales: Uint16Array): void => {
  const q = new Int32Array(QBLOCK)
  for (let b = 0; b < x.length / QBLOCK; b++) {
    const base = b * QBLOCK
    let amax = 0
    let m = 0
    for (let j = 0; j < QBLOCK; j++) {
      const v = x[base + j]!
      if (Math.abs(v) > amax) {
        amax = Math.abs(v)
        m = v
      }
    }
    const d = Math.fround(format === "q8_0" ? amax / 127 : m / -8)
    const dh = f32BitsToF16(f32Bits(d))
    scales[b] = dh
    const d16 = f16ToF32(dh)
    for (let j = 0; j < QBLOCK; j++) {
      const r = d16 !== 0 ? rne(Math.fround(x[base + j]! / d16)) : 0
      q[j] = format === "q8_0" ? Math.max(-127, Math.min(127, r)) : Math.max(0, Math.min(15, r + 8))
    }
    if (format === "q8_0") {
      for (let j = 0; j < QBLOCK; j++) out[b * 32 + j] = q[j]! & 0xff
    } else {
      for (let j = 0; j < 16; j++) out[b * 16 + j] = q[j]! | (q[j + 16]! << 4)
    }
  }
}

/** The Hadamard block width for `cols` in-features (a multiple of 32): the largest power of two <= 128 dividing it. */
export const hadamardBlock = (cols: number): number => {
  let r = 128
  while (cols % r !== 0) r /= 2
  return r
}

/**
 * x <- its unnormalised Walsh-Hadamard transform per block of `r` columns, in place: the butterflies
 * (a, b) -> (a + b, a - b) at distance 1, 2, .., r / 2, each rounded to f32 as the engine's
 * hadamard_transform adds (the sum of two f32 values computed in double and rounded once is the f32 sum).
 */
export const hadamardTransform = (x: Float32Array, r: number): void => {
  for (let b = 0; b < x.length; b += r) {
    for (let h = 1; h < r; h *= 2) {
      for (let i = b; i < b + r; i += 2 * h) {
        for (let j = i; j < i + h; j++) {
          const u = x[j]!
          const v = x[j + h]!
          x[j] = u + v
          x[j + h] = u - v
        }
      }
    }
  }
}

/** Whether a format's rows are rotated before they are quantized (the engine's weight_rotation: Q8_0). */
export const rotates = (format: QuantFormat): boolean => format === "q8_0"

/** Rotates a row before quantizeRow as the format asks (in place). */
const rotateRow = (x: Float32Array, format: QuantFormat): void => {
  if (rotates(format)) hadamardTransform(x, hadamardBlock(x.length))
}

/** The metadata keys a quantized checkpoint carries. */
const quantizedMetadata = (format: QuantFormat): Record<string, string> => ({
  "vdiff.quantization": format,
  "vdiff.block_size": String(QBLOCK),
  ...(rotates(format) ? { "vdiff.rotation": "hadamard" } : {})
})

/** The value of element k of a row quantized by quantizeRow (for tests and tools). */
export const dequantizeElement = (row: Uint8Array, scales: Uint16Array, format: QuantFormat, k: number): number => {
  const d = f16ToF32(scales[Math.floor(k / QBLOCK)]!)
  if (format === "q8_0") return ((row[k]! << 24) >> 24) * d
  const b = Math.floor(k / QBLOCK)
  const j = k % QBLOCK
  const byte = row[b * 16 + (j & 15)]!
  return ((j < 16 ? byte & 15 : byte >> 4) - 8) * d
}

/**
 * The LM head (`lm_head.weight`; LLaDA's `model.transformer.ff_out.weight`, not a block's ff_out) stays in
 * its dtype, as the engine's --quantize leaves it: its int8 input cost the most greedy tokens of any
 * (native/src/cpu/quant.h has the figures).
 */
const isHead = (name: string): boolean => name === "lm_head.weight" || name === "model.transformer.ff_out.weight"

/** Whether a tensor is quantized: a float matrix other than the embedding and the head, with columns in whole blocks. */
/** The router of an MoE layer (LLaDA2's and Qwen3-MoE's `mlp.gate.weight`) stays float too: its product is f32. */
export const isQuantizable = (name: string, entry: Pick<TensorEntry, "dtype" | "shape">): boolean =>
  entry.shape.length === 2 &&
  (entry.dtype === "F32" || entry.dtype === "BF16" || entry.dtype === "F16") &&
  entry.shape[1]! % QBLOCK === 0 &&
  !name.endsWith("wte.weight") &&
  !name.endsWith("embed_tokens.weight") &&
  !name.endsWith("word_embeddings.weight") &&
  !name.endsWith(".mlp.gate.weight") &&
  !isHead(name)

interface OutTensor {
  readonly name: string
  readonly dtype: string
  readonly shape: ReadonlyArray<number>
  readonly bytes: number
}

const outTensorsOf = (name: string, entry: TensorEntry, format: QuantFormat, keep: ReadonlySet<string>): Array<OutTensor> => {
  if (!isQuantizable(name, entry) || keep.has(name)) {
    return [{ name, dtype: entry.dtype, shape: entry.shape, bytes: entry.dataOffsets[1] - entry.dataOffsets[0] }]
  }
  const [rows, cols] = entry.shape as [number, number]
  const rowBytes = format === "q8_0" ? cols : cols / 2
  return [
    { name, dtype: format === "q8_0" ? "I8" : "U8", shape: [rows, rowBytes], bytes: rows * rowBytes },
    { name: `${name}_scale`, dtype: "F16", shape: [rows, cols / QBLOCK], bytes: rows * (cols / QBLOCK) * 2 }
  ]
}

const encodeRawHeader = (tensors: ReadonlyArray<OutTensor>, metadata: Readonly<Record<string, string>>): Buffer => {
  const header: Record<string, unknown> = { __metadata__: metadata }
  let offset = 0
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes] }
    offset += t.bytes
  }
  const json = Buffer.from(JSON.stringify(header), "utf8")
  const padded = Math.ceil((8 + json.length) / DATA_ALIGNMENT) * DATA_ALIGNMENT - 8
  const out = Buffer.alloc(8 + padded, 0x20)
  out.writeBigUInt64LE(BigInt(padded), 0)
  json.copy(out, 8)
  return out
}

const readFully = async (file: FileHandle, out: Uint8Array, position: number): Promise<void> => {
  let done = 0
  while (done < out.byteLength) {
    const { bytesRead } = await file.read(out, done, out.byteLength - done, position + done)
    if (bytesRead === 0) throw new Error("quantize: unexpected end of file")
    done += bytesRead
  }
}

const decodeInto = (bytes: Uint8Array, dtype: DType, out: Float32Array): void => {
  if (dtype === "F32") {
    out.set(new Float32Array(new Uint8Array(bytes).buffer, 0, out.length))
    return
  }
  const halves = new Uint16Array(new Uint8Array(bytes).buffer, 0, out.length)
  const convert = dtype === "BF16" ? bf16ToF32 : f16ToF32
  for (let i = 0; i < out.length; i++) out[i] = convert(halves[i]!)
}

export interface QuantizeFileReport {
  readonly quantized: number
  readonly copied: number
  /** Of the copied, the tensors the input already stored quantized (copied as they are, not converted). */
  readonly alreadyQuantized: number
  readonly bytesIn: number
  readonly bytesOut: number
}

/** Quantizes one safetensors file into another, streaming. */
export const quantizeFile = async (
  input: string,
  output: string,
  format: QuantFormat,
  keep: ReadonlySet<string> = new Set()
): Promise<QuantizeFileReport> => {
  const header = await readSafetensorsHeader(input)
  const outTensors: Array<OutTensor> = []
  for (const [name, entry] of header.tensors) outTensors.push(...outTensorsOf(name, entry, format, keep))
  const metadata = { ...header.metadata, ...quantizedMetadata(format) }
  const head = encodeRawHeader(outTensors, metadata)
  const src = await open(input, "r")
  // Written under another name and renamed when whole: a failure leaves no half-written checkpoint.
  const partial = `${output}.partial`
  const dst = await open(partial, "w")
  let quantized = 0
  let copied = 0
  let alreadyQuantized = 0
  let whole = false
  const { write, written } = sequentialWriter(dst)
  try {
    await write(head)
    for (const [name, entry] of header.tensors) {
      const [begin, end] = entry.dataOffsets
      if (!isQuantizable(name, entry) || keep.has(name)) {
        for (let at = begin; at < end; at += BAND_BYTES) {
          const chunk = new Uint8Array(Math.min(BAND_BYTES, end - at))
          await readFully(src, chunk, header.dataStart + at)
          await write(chunk)
        }
        copied++
        if (entry.dtype === "I8" || entry.dtype === "U8") alreadyQuantized++
        continue
      }
      const [rows, cols] = entry.shape as [number, number]
      const dtype = entry.dtype as DType
      const inRow = cols * dtypeBytes[dtype]
      const outRow = format === "q8_0" ? cols : cols / 2
      const band = Math.max(1, Math.floor(BAND_BYTES / inRow))
      const scaleChunks: Array<Uint8Array> = []
      // Values first (as they are laid out), the scales after them: kept per band (1/16 of the values).
      const rowValues = new Float32Array(cols)
      for (let r0 = 0; r0 < rows; r0 += band) {
        const n = Math.min(band, rows - r0)
        const raw = new Uint8Array(n * inRow)
        await readFully(src, raw, header.dataStart + begin + r0 * inRow)
        const blocks = new Uint8Array(n * outRow)
        const scales = new Uint16Array(n * (cols / QBLOCK))
        for (let r = 0; r < n; r++) {
          decodeInto(raw.subarray(r * inRow, (r + 1) * inRow), dtype, rowValues)
          rotateRow(rowValues, format)
          quantizeRow(
            rowValues,
            format,
            blocks.subarray(r * outRow, (r + 1) * outRow),
            scales.subarray(r * (cols / QBLOCK), (r + 1) * (cols / QBLOCK))
          )
        }
        await write(blocks)
        scaleChunks.push(new Uint8Array(scales.buffer))
      }
      for (const chunk of scaleChunks) await write(chunk)
      quantized++
    }
    whole = true
  } finally {
    await src.close()
    await dst.close()
    if (whole) await rename(partial, output)
    else await rm(partial, { force: true })
  }
  return { quantized, copied, alreadyQuantized, bytesIn: await readFileSize(input), bytesOut: written() }
}

/**
 * Writes tensors produced chunk by chunk (a make-model preset) straight into a quantized safetensors file,
 * without an unquantized copy on disk or in memory: a band of rows of one tensor at a time is produced,
 * rounded to the tensor's own dtype (so the bytes are those `vdiff quantize` writes from the unquantized
 * checkpoint), quantized and written. `metadata` is the unquantized file's; the quantization keys are added
 * as quantizeFile adds them. Returns the file's size in bytes.
 */
export const writeQuantizedSafetensors = async (
  path: string,
  tensors: ReadonlyArray<TensorSource>,
  format: QuantFormat,
  metadata: Readonly<Record<string, string>>
): Promise<number> => {
  const head = quantizedHeader(tensors, format, metadata)
  const dst = await open(path, "w")
  const { write, written } = sequentialWriter(dst)
  try {
    await write(head)
    for (const t of tensors) {
      const total = elementCount(t.shape)
      const width = dtypeBytes[t.dtype]
      if (!isQuantizable(t.name, t)) {
        const chunkElements = Math.max(1, Math.floor(BAND_BYTES / 4))
        const values = new Float32Array(Math.min(chunkElements, total))
        const bytes = new Uint8Array(values.length * width)
        for (let start = 0; start < total; start += chunkElements) {
          const n = Math.min(chunkElements, total - start)
          await t.fill(values.subarray(0, n), start)
          encodeValues(values.subarray(0, n), t.dtype, bytes.subarray(0, n * width))
          await write(bytes.subarray(0, n * width))
        }
        continue
      }
      const [rows, cols] = t.shape as [number, number]
      const outRow = format === "q8_0" ? cols : cols / 2
      const band = Math.max(1, Math.floor(BAND_BYTES / (cols * 4)))
      const values = new Float32Array(Math.min(band, rows) * cols)
      const bits = new Uint32Array(values.buffer)
      const scales = new Uint16Array(rows * (cols / QBLOCK))
      for (let r0 = 0; r0 < rows; r0 += band) {
        const n = Math.min(band, rows - r0)
        await t.fill(values.subarray(0, n * cols), r0 * cols)
        // Round to the stored dtype first, as the unquantized checkpoint holds the values.
        if (t.dtype === "BF16") {
          for (let i = 0; i < n * cols; i++) values[i] = bf16ToF32(f32BitsToBf16(bits[i]!))
        } else if (t.dtype === "F16") {
          for (let i = 0; i < n * cols; i++) values[i] = f16ToF32(f32BitsToF16(bits[i]!))
        }
        const blocks = new Uint8Array(n * outRow)
        for (let r = 0; r < n; r++) {
          rotateRow(values.subarray(r * cols, (r + 1) * cols), format)
          quantizeRow(
            values.subarray(r * cols, (r + 1) * cols),
            format,
            blocks.subarray(r * outRow, (r + 1) * outRow),
            scales.subarray((r0 + r) * (cols / QBLOCK), (r0 + r + 1) * (cols / QBLOCK))
          )
        }
        await write(blocks)
      }
      await write(new Uint8Array(scales.buffer))
    }
    return written()
  } finally {
    await dst.close()
  }
}

/** The header (length prefix included) of the quantized file writeQuantizedSafetensors writes for `tensors`. */
export const quantizedHeader = (
  tensors: ReadonlyArray<Pick<TensorSource, "name" | "dtype" | "shape">>,
  format: QuantFormat,
  metadata: Readonly<Record<string, string>>
): Buffer => {
  const outTensors: Array<OutTensor> = []
  for (const t of tensors) {
    outTensors.push(...outTensorsOf(t.name, { dtype: t.dtype, shape: t.shape, dataOffsets: [0, tensorBytes(t)] }, format, new Set()))
  }
  return encodeRawHeader(outTensors, { ...metadata, ...quantizedMetadata(format) })
}

/** The names and bytes a quantized file holds for `tensors` (quantized ones with their `_scale`). */
export const quantizedLayout = (
  tensors: ReadonlyArray<Pick<TensorSource, "name" | "dtype" | "shape">>,
  format: QuantFormat
): Array<{ readonly name: string; readonly bytes: number }> =>
  tensors.flatMap((t) =>
    outTensorsOf(t.name, { dtype: t.dtype, shape: t.shape, dataOffsets: [0, tensorBytes(t)] }, format, new Set()).map((o) => ({
      name: o.name,
      bytes: o.bytes
    }))
  )

const readFileSize = async (path: string): Promise<number> => {
  const f = await open(path, "r")
  try {
    return (await f.stat()).size
  } finally {
    await f.close()
  }
}

export interface QuantizeOptions {
  readonly model: string
  readonly out: string
  readonly format: QuantFormat
  /** Tensors to copy as they are although they could be quantized (e.g. the head). */
  readonly keep?: ReadonlyArray<string>
  readonly log?: (line: string) => void
}

/**
 * The shard files an index names: plain file names in the model's directory (a name with a path in it,
 * such as "../x.safetensors", would be read and written outside the directories given).
 */
const shardsOf = (indexPath: string, text: string): Array<string> => {
  let index: unknown
  try {
    index = JSON.parse(text)
  } catch (cause) {
    throw new Error(`quantize: ${indexPath} is not valid JSON (${String(cause)})`)
  }
  const map = (index as Partial<ShardIndex> | null)?.weight_map
  if (typeof map !== "object" || map === null || Array.isArray(map)) throw new Error(`quantize: ${indexPath} has no weight_map object`)
  const shards = [...new Set(Object.values(map as Record<string, unknown>))].sort()
  for (const shard of shards) {
    if (typeof shard !== "string" || !/^[^/\\]+\.safetensors$/.test(shard) || shard.startsWith(".")) {
      throw new Error(`quantize: ${indexPath} names the shard ${JSON.stringify(shard)}, which is not a .safetensors file name`)
    }
  }
  return shards as Array<string>
}

/**
 * Quantizes the checkpoint in `model` (model.safetensors, or the shards of model.safetensors.index.json)
 * into `out`, copying every other file of the directory (config.json, the tokenizer, ...).
 */
export const quantizeModel = async (options: QuantizeOptions): Promise<QuantizeFileReport> => {
  const { model, out, format } = options
  if (!quantFormats.includes(format)) throw new Error(`quantize: unknown format "${format}" (q8_0 or q4_0)`)
  await makeDirectory(out)
  // Writing into the directory it reads would truncate the weights before they are read.
  if ((await realpath(out)) === (await realpath(model))) {
    throw new Error(`quantize: --out ${out} is the model's own directory; write the quantized copy to another one`)
  }
  const indexPath = join(model, "model.safetensors.index.json")
  const sharded = existsSync(indexPath)
  let shards: Array<string>
  if (sharded) {
    shards = shardsOf(indexPath, await readFile(indexPath, "utf8"))
  } else {
    if (!existsSync(join(model, "model.safetensors"))) throw new Error(`quantize: ${model} has no model.safetensors`)
    shards = ["model.safetensors"]
  }
  // Every shard there before anything is written, so a missing one leaves no partial copy behind.
  for (const shard of shards) {
    const path = join(model, shard)
    if (!existsSync(path) || !statSync(path).isFile()) throw new Error(`quantize: ${path} (a shard of the checkpoint) is not a file`)
  }
  for (const entry of await readdir(model, { withFileTypes: true })) {
    if (!entry.isFile() || entry.name.endsWith(".safetensors") || entry.name === "model.safetensors.index.json") continue
    await copyFile(join(model, entry.name), join(out, entry.name))
  }
  const total = { quantized: 0, copied: 0, alreadyQuantized: 0, bytesIn: 0, bytesOut: 0 }
  const weightMap: Record<string, string> = {}
  for (const shard of shards) {
    const r = await quantizeFile(join(model, shard), join(out, shard), format, new Set(options.keep ?? []))
    options.log?.(`${shard}: ${r.quantized} tensors quantized, ${r.copied} copied, ${r.bytesIn} -> ${r.bytesOut} bytes`)
    total.quantized += r.quantized
    total.copied += r.copied
    total.alreadyQuantized += r.alreadyQuantized
    total.bytesIn += r.bytesIn
    total.bytesOut += r.bytesOut
    for (const name of (await readSafetensorsHeader(join(out, shard))).tensors.keys()) weightMap[name] = shard
  }
  if (total.alreadyQuantized > 0) {
    options.log?.(
      `${total.alreadyQuantized} tensors were already quantized in ${model} and are copied as they are, not converted to ${format}`
    )
  }
  if (sharded) {
    const index = { metadata: { total_size: total.bytesOut, "vdiff.quantization": format }, weight_map: weightMap }
    await writeFile(join(out, "model.safetensors.index.json"), JSON.stringify(index, null, 2) + "\n")
  }
  return total
}

/**
 * The `vdiff quantize` command on the values of its settings table (src/cli/commands.ts `quantize`):
 * checks the required flags, quantizes, and prints one JSON line of what it did.
 */
export const quantizeCommand = async (values: {
  readonly model?: string | undefined
  readonly out?: string | undefined
  readonly format: QuantFormat
}): Promise<void> => {
  if (values.model === undefined || values.out === undefined) throw new Error("quantize needs --model DIR and --out DIR")
  const started = performance.now()
  const report = await quantizeModel({
    model: values.model,
    out: values.out,
    format: values.format,
    log: (line) => console.error(line)
  })
  console.log(JSON.stringify({ out: values.out, format: values.format, ...report, seconds: (performance.now() - started) / 1000 }))
}
