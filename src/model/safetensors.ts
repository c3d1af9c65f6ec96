/**
 * Safetensors files, written lazily and read back header-only.
 *
 * Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes
 * of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {string: string}}`, then
 * the tensor bytes, contiguous and without holes, offsets relative to the end of the header. The header
 * is padded with spaces so the data starts on a 64-byte boundary, which keeps every memory-mapped
 * tensor of these models aligned for vector loads.
 *
 * The writer never holds a whole tensor: each tensor is described by its name, dtype and shape plus a
 * function that produces its values as f32 chunk by chunk, converted to the file's dtype on the way out.
 * That is what lets a 16 GB LLaDA-8B checkpoint be written with a few megabytes of memory.
 *
 * @since 0.1.0
 */
import { type FileHandle, mkdir, open, readFile, stat, writeFile } from "node:fs/promises"
import { join, resolve, sep } from "node:path"

/** The element types this project reads and writes. */

/** Writes whole buffers one after another from the start of `file`, retrying short writes; `written` counts bytes. */
export const sequentialWriter = (file: FileHandle) => {
  let position = 0
  const write = async (data: Uint8Array): Promise<void> => {
    let done = 0
    while (done < data.byteLength) {
      const { bytesWritten } = await file.write(data, done, data.byteLength - done, position)
      done += bytesWritten
      position += bytesWritten
    }
  }
  return { write, written: () => position }
}

export type DType = "F32" | "BF16" | "F16"

export const dtypeBytes: Record<DType, number> = { F32: 4, BF16: 2, F16: 2 }

/**
 * One tensor to write. `fill(out, start)` writes elements `[start, start + out.length)` of the tensor
 * (row-major) into `out` as f32. The writer calls it with consecutive ranges from 0 to the end, so a
 * source may keep state between calls (a file position, say), but a source that computes each element
 * from its index alone is simplest.
 */
export interface TensorSource {
  readonly name: string
  readonly dtype: DType
  readonly shape: ReadonlyArray<number>
  readonly fill: (out: Float32Array, start: number) => void | Promise<void>
}

/** A tensor's entry in a safetensors header. */
export interface TensorEntry {
  readonly dtype: string
  readonly shape: ReadonlyArray<number>
  /** Byte range [begin, end) relative to the start of the data section. */
  readonly dataOffsets: readonly [number, number]
}

export interface SafetensorsHeader {
  /** The JSON length as stored in the first 8 bytes. */
  readonly headerLength: number
  /** Absolute file offset of the data section (8 + headerLength). */
  readonly dataStart: number
  readonly metadata: Readonly<Record<string, string>>
  /** Tensors in the order their data appears in the file. */
  readonly tensors: ReadonlyMap<string, TensorEntry>
}

const DATA_ALIGNMENT = 64
/** Elements converted per chunk: 1 Mi elements is 4 MiB of f32 scratch, small and still fast. */
const DEFAULT_CHUNK_ELEMENTS = 1 << 20

export const elementCount = (shape: ReadonlyArray<number>): number => shape.reduce((n, d) => n * d, 1)

export const tensorBytes = (t: Pick<TensorSource, "dtype" | "shape">): number => elementCount(t.shape) * dtypeBytes[t.dtype]

// --- element conversion ----------------------------------------------------------------------------

/** f32 bit pattern → bf16 bit pattern, rounding to nearest, ties to even; NaN stays a (quiet) NaN. */
export const f32BitsToBf16 = (bits: number): number => {
  if ((bits & 0x7fffffff) > 0x7f800000) return ((bits >>> 16) | 0x0040) & 0xffff
  // Adding 0x7fff plus the lowest kept bit rounds up exactly when the dropped half is above 0x8000,
  // or equal to it with an odd kept part. Overflow into the exponent is the correct rounding to inf.
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff
}

/** f32 bit pattern → IEEE binary16 bit pattern, rounding to nearest, ties to even (subnormals included). */
export const f32BitsToF16 = (bits: number): number => {
  const sign = (bits >>> 16) & 0x8000
  const exponent = (bits >>> 23) & 0xff
  const mantissa = bits & 0x7fffff
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa !== 0 ? 0x0200 : 0)
  const e = exponent - 127 + 15
  if (e >= 0x1f) return sign | 0x7c00
  if (e <= 0) {
    // Subnormal in f16 (or zero): the value in units of 2^-24 is (1.mantissa) >> (14 - e).
    if (e < -10) return sign
    const full = mantissa | 0x800000
    const shift = 14 - e
    const kept = full >>> shift
    const dropped = full & ((1 << shift) - 1)
    const half = 1 << (shift - 1)
    const rounded = dropped > half || (dropped === half && (kept & 1) === 1) ? kept + 1 : kept
    return sign | rounded // kept + 1 == 0x400 is exactly the smallest normal's encoding
  }
  const kept = sign | (e << 10) | (mantissa >>> 13)
  const dropped = mantissa & 0x1fff
  // A carry out of the mantissa bumps the exponent, and from the largest finite value gives inf: both right.
  return dropped > 0x1000 || (dropped === 0x1000 && (kept & 1) === 1) ? kept + 1 : kept
}

const f32Scratch = new Float32Array(1)
const u32Scratch = new Uint32Array(f32Scratch.buffer)

export const bf16ToF32 = (h: number): number => {
  u32Scratch[0] = (h & 0xffff) << 16
  return f32Scratch[0]!
}

export const f16ToF32 = (h: number): number => {
  const sign = h & 0x8000 ? -1 : 1
  const exponent = (h >>> 10) & 0x1f
  const mantissa = h & 0x3ff
  if (exponent === 0) return sign * mantissa * 2 ** -24
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : NaN
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15)
}

/** Converts f32 values to the bytes of `dtype` (little-endian), into `out` (sized for `values`). */
export const encodeValues = (values: Float32Array, dtype: DType, out: Uint8Array): void => {
  if (dtype === "F32") {
    out.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength))
    return
  }
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length)
  const halves = new Uint16Array(out.buffer, out.byteOffset, values.length)
  const convert = dtype === "BF16" ? f32BitsToBf16 : f32BitsToF16
  for (let i = 0; i < bits.length; i++) halves[i] = convert(bits[i]!)
}

/** Decodes little-endian bytes of `dtype` to f32 values. */
export const decodeValues = (bytes: Uint8Array, dtype: DType): Float32Array => {
  const n = bytes.byteLength / dtypeBytes[dtype]
  // Copy first: `bytes` may sit at an offset that is not a multiple of the element size.
  const aligned = new Uint8Array(bytes)
  if (dtype === "F32") return new Float32Array(aligned.buffer, 0, n)
  const halves = new Uint16Array(aligned.buffer, 0, n)
  const out = new Float32Array(n)
  const convert = dtype === "BF16" ? bf16ToF32 : f16ToF32
  for (let i = 0; i < n; i++) out[i] = convert(halves[i]!)
  return out
}

// --- writing -----------------------------------------------------------------------------------------

export interface WriteOptions {
  /** String → string pairs stored under "__metadata__". */
  readonly metadata?: Readonly<Record<string, string>>
  /** Elements per conversion chunk (tests use small values to exercise the chunking). */
  readonly chunkElements?: number
}

/** Builds the header bytes (length prefix included) for `tensors` laid out in the given order. */
export const encodeHeader = (
  tensors: ReadonlyArray<Pick<TensorSource, "name" | "dtype" | "shape">>,
  metadata: Readonly<Record<string, string>> = {}
): Uint8Array => {
  const header: Record<string, unknown> = {}
  if (Object.keys(metadata).length > 0) header["__metadata__"] = metadata
  let offset = 0
  const seen = new Set<string>()
  for (const t of tensors) {
    if (t.name === "__metadata__" || seen.has(t.name)) throw new Error(`safetensors: duplicate or reserved tensor name "${t.name}"`)
    seen.add(t.name)
    if (t.shape.some((d) => !Number.isSafeInteger(d) || d < 0)) {
      throw new Error(`safetensors: tensor "${t.name}" has a bad shape [${t.shape.join(", ")}]`)
    }
    const bytes = tensorBytes(t)
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] }
    offset += bytes
  }
  const json = Buffer.from(JSON.stringify(header), "utf8")
  const padded = Math.ceil((8 + json.length) / DATA_ALIGNMENT) * DATA_ALIGNMENT - 8
  const out = Buffer.alloc(8 + padded, 0x20)
  out.writeBigUInt64LE(BigInt(padded), 0)
  json.copy(out, 8)
  return out
}

/**
 * Writes `tensors` to `path` in the given order, producing each one chunk by chunk.
 * Returns the file's total size in bytes.
 */
export const writeSafetensors = async (path: string, tensors: ReadonlyArray<TensorSource>, options: WriteOptions = {}): Promise<number> => {
  const chunkElements = Math.max(1, Math.floor(options.chunkElements ?? DEFAULT_CHUNK_ELEMENTS))
  const header = encodeHeader(tensors, options.metadata)
  const values = new Float32Array(chunkElements)
  const bytes = new Uint8Array(chunkElements * 4)
  const file = await open(path, "w")
  try {
    const { write, written } = sequentialWriter(file)
    await write(header)
    for (const t of tensors) {
      const total = elementCount(t.shape)
      const width = dtypeBytes[t.dtype]
      for (let start = 0; start < total; start += chunkElements) {
        const n = Math.min(chunkElements, total - start)
        const chunk = values.subarray(0, n)
        await t.fill(chunk, start)
        const encoded = bytes.subarray(0, n * width)
        encodeValues(chunk, t.dtype, encoded)
        await write(encoded)
      }
    }
    return written()
  } finally {
    await file.close()
  }
}

// --- reading (tools and tests) ------------------------------------------------------------------------

/** Reads and checks the header of a safetensors file without touching its data. */
/** Bytes per element of the safetensors format's element types. */
const elementBytes: Readonly<Record<string, number>> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  F8_E4M3: 1,
  F8_E5M2: 1,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  U8: 1,
  BOOL: 1
}

/** What is wrong with a header entry, as the engine's loader would refuse it; undefined when nothing is. */
const entryProblem = (entry: TensorEntry): string | undefined => {
  const bytes = elementBytes[entry.dtype]
  if (bytes === undefined) return `unknown dtype "${entry.dtype}" (safetensors names ${Object.keys(elementBytes).join(", ")})`
  if (!entry.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) return `shape ${JSON.stringify(entry.shape)} is not a list of sizes`
  const [begin, end] = entry.dataOffsets
  if (!Number.isSafeInteger(begin) || !Number.isSafeInteger(end) || begin < 0 || end < begin) {
    return `data_offsets ${JSON.stringify(entry.dataOffsets)} is not a byte range`
  }
  const want = entry.shape.reduce((n, d) => n * d, 1) * bytes
  return end - begin === want
    ? undefined
    : `data_offsets span ${end - begin} bytes, but ${entry.dtype} ${JSON.stringify(entry.shape)} takes ${want}`
}

export const readSafetensorsHeader = async (path: string): Promise<SafetensorsHeader> => {
  const file = await open(path, "r")
  try {
    const { size } = await file.stat()
    const prefix = Buffer.alloc(8)
    if (size < 8 || (await file.read(prefix, 0, 8, 0)).bytesRead !== 8) {
      throw new Error(`${path}: too short for a safetensors header`)
    }
    const headerLength = Number(prefix.readBigUInt64LE(0))
    if (headerLength > size - 8) throw new Error(`${path}: header length ${headerLength} runs past the end of the file`)
    const json = Buffer.alloc(headerLength)
    await file.read(json, 0, headerLength, 8)
    let parsed: unknown
    try {
      parsed = JSON.parse(json.toString("utf8"))
    } catch (cause) {
      throw new Error(`${path}: header is not valid JSON (${String(cause)})`)
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
      throw new Error(`${path}: header is not a JSON object`)
    }
    const entries: Array<[string, TensorEntry]> = []
    let metadata: Record<string, string> = {}
    for (const [name, value] of Object.entries(parsed as Record<string, unknown>)) {
      if (name === "__metadata__") {
        metadata = value as Record<string, string>
        continue
      }
      const v = value as { dtype?: unknown; shape?: unknown; data_offsets?: unknown }
      if (typeof v.dtype !== "string" || !Array.isArray(v.shape) || !Array.isArray(v.data_offsets) || v.data_offsets.length !== 2) {
        throw new Error(`${path}: tensor "${name}" lacks dtype, shape or data_offsets`)
      }
      const entry = { dtype: v.dtype, shape: v.shape as number[], dataOffsets: [v.data_offsets[0], v.data_offsets[1]] as const }
      const problem = entryProblem(entry)
      if (problem !== undefined) throw new Error(`${path}: tensor "${name}": ${problem}`)
      entries.push([name, entry])
    }
    entries.sort((a, b) => a[1].dataOffsets[0] - b[1].dataOffsets[0])
    const dataStart = 8 + headerLength
    for (let i = 1; i < entries.length; i++) {
      if (entries[i]![1].dataOffsets[0] < entries[i - 1]![1].dataOffsets[1]) {
        throw new Error(`${path}: tensors "${entries[i - 1]![0]}" and "${entries[i]![0]}" overlap`)
      }
    }
    const last = entries.at(-1)
    if (last !== undefined && dataStart + last[1].dataOffsets[1] > size) {
      throw new Error(`${path}: tensor "${last[0]}" runs past the end of the file`)
    }
    return { headerLength, dataStart, metadata, tensors: new Map(entries) }
  } finally {
    await file.close()
  }
}

/** Reads one tensor's values as f32 (for tests and tools; loads the tensor whole). */
export const readTensor = async (path: string, name: string): Promise<Float32Array> => {
  const header = await readSafetensorsHeader(path)
  const entry = header.tensors.get(name)
  if (entry === undefined) throw new Error(`${path}: no tensor "${name}"`)
  if (!(entry.dtype in dtypeBytes)) throw new Error(`${path}: tensor "${name}" has unsupported dtype ${entry.dtype}`)
  const [begin, end] = entry.dataOffsets
  const bytes = Buffer.alloc(end - begin)
  const file = await open(path, "r")
  try {
    await file.read(bytes, 0, bytes.byteLength, header.dataStart + begin)
  } finally {
    await file.close()
  }
  return decodeValues(bytes, entry.dtype as DType)
}

// --- sharded checkpoints and config.json -------------------------------------------------------------

/** The `model.safetensors.index.json` of a sharded checkpoint, as Hugging Face writes it. */
export interface ShardIndex {
  readonly metadata: { readonly total_size: number }
  readonly weight_map: Readonly<Record<string, string>>
}

export const readShardIndex = async (path: string): Promise<ShardIndex> => JSON.parse(await readFile(path, "utf8")) as ShardIndex

export const writeShardIndex = (path: string, index: ShardIndex): Promise<void> => writeFile(path, JSON.stringify(index, null, 2) + "\n")

/** Writes an HF-style config.json (pretty-printed, keys in the given order). */
export const writeConfigJson = (path: string, config: Readonly<Record<string, unknown>>): Promise<void> =>
  writeFile(path, JSON.stringify(config, null, 2) + "\n")

/**
 * `mkdir -p`, one level at a time: Node's recursive mkdir never returns for a path under /proc (it retries
 * the ENOENT /proc answers for every new name), so `--out /proc/x` hung instead of failing.
 */
export const makeDirectory = async (dir: string): Promise<void> => {
  const absolute = resolve(dir)
  let path: string = sep
  for (const part of absolute.split(sep).filter((p) => p !== "")) {
    path = join(path, part)
    try {
      await mkdir(path)
    } catch (error) {
      if ((error as { code?: unknown }).code !== "EEXIST") throw error
    }
  }
  if (!(await stat(absolute)).isDirectory()) throw new Error(`${dir} exists and is not a directory`)
}
