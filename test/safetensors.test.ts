import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import {
  type TensorSource,
  bf16ToF32,
  f16ToF32,
  f32BitsToBf16,
  f32BitsToF16,
  readSafetensorsHeader,
  readTensor,
  writeSafetensors
} from "../src/model/safetensors.js"

let dir: string
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "vdiff-safetensors-"))
})
afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

const bitsOf = (x: number): number => new Uint32Array(new Float32Array([x]).buffer)[0]!
const floatOf = (bits: number): number => new Float32Array(new Uint32Array([bits]).buffer)[0]!

/** A tensor whose element i is values(i). */
const tensor = (name: string, dtype: TensorSource["dtype"], shape: Array<number>, value: (i: number) => number): TensorSource => ({
  name,
  dtype,
  shape,
  fill: (out, start) => {
    for (let j = 0; j < out.length; j++) out[j] = value(start + j)
  }
})

// A deterministic stream of f32 bit patterns (xorshift32) for the exhaustive-ish rounding checks.
const randomBits = (count: number, seed: number): Array<number> => {
  const out: Array<number> = []
  let x = seed >>> 0 || 1
  for (let i = 0; i < count; i++) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    out.push(x)
  }
  return out
}

/**
 * Reference rounding: the candidate with the smaller distance in float64, ties to the even encoding.
 * `lower` and `upper` are the two encodings bracketing x, `decode` their values.
 */
const nearest = (x: number, lower: number, upper: number, decode: (h: number) => number): number => {
  const dl = Math.abs(x - decode(lower))
  const du = Math.abs(decode(upper) - x)
  if (dl < du) return lower
  if (du < dl) return upper
  return (lower & 1) === 0 ? lower : upper
}

describe("writer round trip", () => {
  it("writes a header that reads back with the right dtypes, shapes, contiguous offsets and metadata", async () => {
    const path = join(dir, "round-trip.safetensors")
    const tensors = [
      tensor("a", "F32", [3, 5], (i) => i * 0.25 - 1),
      tensor("b.weight", "BF16", [7], (i) => 1 + i / 128),
      tensor("c", "F16", [2, 2, 3], (i) => -i / 4),
      tensor("empty", "F32", [0, 4], () => 0)
    ]
    const size = await writeSafetensors(path, tensors, { metadata: { format: "pt", note: "x" } })
    const header = await readSafetensorsHeader(path)
    expect(header.metadata).toEqual({ format: "pt", note: "x" })
    expect(header.dataStart % 64).toBe(0)
    expect([...header.tensors.keys()]).toEqual(["a", "b.weight", "c", "empty"])
    expect(header.tensors.get("a")).toEqual({ dtype: "F32", shape: [3, 5], dataOffsets: [0, 60] })
    expect(header.tensors.get("b.weight")).toEqual({ dtype: "BF16", shape: [7], dataOffsets: [60, 74] })
    expect(header.tensors.get("c")).toEqual({ dtype: "F16", shape: [2, 2, 3], dataOffsets: [74, 98] })
    expect(header.tensors.get("empty")).toEqual({ dtype: "F32", shape: [0, 4], dataOffsets: [98, 98] })
    const bytes = await readFile(path)
    expect(size).toBe(bytes.length)
    expect(bytes.length).toBe(header.dataStart + 98)
    // The length prefix is little-endian and the padding is spaces (valid JSON whitespace).
    expect(Number(bytes.readBigUInt64LE(0))).toBe(header.headerLength)
    expect(bytes.subarray(8, header.dataStart).toString("utf8").trimEnd().endsWith("}")).toBe(true)

    expect(Array.from(await readTensor(path, "a"))).toEqual(Array.from({ length: 15 }, (_, i) => i * 0.25 - 1))
    // 1 + i/128 is exact in bf16 (7 mantissa bits) and -i/4 exact in f16.
    expect(Array.from(await readTensor(path, "b.weight"))).toEqual(Array.from({ length: 7 }, (_, i) => 1 + i / 128))
    expect(Array.from(await readTensor(path, "c"))).toEqual(Array.from({ length: 12 }, (_, i) => -i / 4))
    // The raw F32 bytes are the values' little-endian encoding.
    expect(bytes.readFloatLE(header.dataStart + 4)).toBe(-0.75)
  })

  it("rejects duplicate tensor names", async () => {
    await expect(
      writeSafetensors(join(dir, "dup.safetensors"), [tensor("x", "F32", [1], () => 0), tensor("x", "F32", [1], () => 0)])
    ).rejects.toThrow(/duplicate/)
  })

  it("reports a corrupt or truncated file", async () => {
    const good = join(dir, "good.safetensors")
    await writeSafetensors(good, [tensor("x", "F32", [16], (i) => i)])
    const bytes = await readFile(good)
    const truncated = join(dir, "truncated.safetensors")
    await writeFile(truncated, bytes.subarray(0, bytes.length - 4))
    await expect(readSafetensorsHeader(truncated)).rejects.toThrow(/runs past the end/)
    const corrupt = Buffer.from(bytes)
    corrupt.write("#", 8)
    const corruptPath = join(dir, "corrupt.safetensors")
    await writeFile(corruptPath, corrupt)
    await expect(readSafetensorsHeader(corruptPath)).rejects.toThrow(/not valid JSON/)
  })
})

describe("bf16 conversion", () => {
  it("rounds to nearest with ties to even", () => {
    expect(f32BitsToBf16(bitsOf(1))).toBe(0x3f80)
    expect(f32BitsToBf16(bitsOf(-2))).toBe(0xc000)
    expect(f32BitsToBf16(bitsOf(-0))).toBe(0x8000)
    // 1 + 2^-8 lies halfway between 1 (even, 0x3f80) and 1 + 2^-7 (0x3f81): stays at 1.
    expect(f32BitsToBf16(bitsOf(1 + 2 ** -8))).toBe(0x3f80)
    // 1 + 3·2^-8 lies halfway between 0x3f81 and 0x3f82 (even): goes up.
    expect(f32BitsToBf16(bitsOf(1 + 3 * 2 ** -8))).toBe(0x3f82)
    // Just above the halfway point rounds up.
    expect(f32BitsToBf16(bitsOf(1 + 2 ** -8) + 1)).toBe(0x3f81)
    // The largest finite f32 rounds to infinity; infinity and NaN survive.
    expect(f32BitsToBf16(0x7f7fffff)).toBe(0x7f80)
    expect(f32BitsToBf16(bitsOf(-Infinity))).toBe(0xff80)
    expect(Number.isNaN(bf16ToF32(f32BitsToBf16(bitsOf(NaN))))).toBe(true)
    expect(Number.isNaN(bf16ToF32(f32BitsToBf16(0x7f800001)))).toBe(true)
  })

  it("matches a float64 nearest-value reference on 200k random bit patterns", () => {
    for (const bits of randomBits(200_000, 12345)) {
      // inf/NaN and the values above the largest finite bf16 (which round to inf): covered above.
      if ((bits & 0x7fffffff) >= 0x7f7f0000) continue
      const lower = bits >>> 16
      const upper = lower + 1 // the next bf16 away from zero (may be inf, which decodes fine)
      const expected = nearest(floatOf(bits), lower, upper, bf16ToF32)
      const got = f32BitsToBf16(bits)
      if (got !== expected) expect({ bits: bits.toString(16), got }).toEqual({ bits: bits.toString(16), got: expected })
    }
  })
})

describe("f16 conversion", () => {
  it("encodes known values", () => {
    expect(f32BitsToF16(bitsOf(1))).toBe(0x3c00)
    expect(f32BitsToF16(bitsOf(-2))).toBe(0xc000)
    expect(f32BitsToF16(bitsOf(65504))).toBe(0x7bff)
    expect(f32BitsToF16(bitsOf(65519.99))).toBe(0x7bff)
    expect(f32BitsToF16(bitsOf(65520))).toBe(0x7c00) // halfway to 65536: ties to even = infinity
    expect(f32BitsToF16(bitsOf(1e10))).toBe(0x7c00)
    expect(f32BitsToF16(bitsOf(1 / 3))).toBe(0x3555)
    expect(f32BitsToF16(bitsOf(2 ** -24))).toBe(0x0001) // smallest subnormal
    expect(f32BitsToF16(bitsOf(2 ** -25))).toBe(0x0000) // halfway to it: ties to even = 0
    expect(f32BitsToF16(bitsOf(2 ** -25 * 1.0001))).toBe(0x0001)
    expect(f32BitsToF16(bitsOf(3 * 2 ** -25))).toBe(0x0002) // halfway between 1 and 2 units: even
    expect(f32BitsToF16(bitsOf(2 ** -14 - 2 ** -26))).toBe(0x0400) // rounds up into the smallest normal
    expect(f32BitsToF16(bitsOf(1e-10))).toBe(0x0000)
    expect(f32BitsToF16(bitsOf(-1e-10))).toBe(0x8000)
    expect(f32BitsToF16(bitsOf(-Infinity))).toBe(0xfc00)
    expect(Number.isNaN(f16ToF32(f32BitsToF16(bitsOf(NaN))))).toBe(true)
  })

  it("encodes every finite f16 value exactly back to itself", () => {
    for (let h = 0; h < 0x10000; h++) {
      if ((h & 0x7c00) === 0x7c00) continue
      const got = f32BitsToF16(bitsOf(f16ToF32(h)))
      if (got !== h) expect(got.toString(16)).toBe(h.toString(16))
    }
  })

  it("rounds midpoints between neighbouring f16 values to the even one", () => {
    for (let h = 0; h < 0x7bff; h++) {
      const mid = (f16ToF32(h) + f16ToF32(h + 1)) / 2 // exact in f32: one more mantissa bit than f16
      const expected = (h & 1) === 0 ? h : h + 1
      const got = f32BitsToF16(bitsOf(mid))
      if (got !== expected) expect({ h: h.toString(16), got }).toEqual({ h: h.toString(16), got: expected })
    }
  })

  it("matches a float64 nearest-value reference on random values in range", () => {
    for (const bits of randomBits(200_000, 777)) {
      const x = floatOf(bits)
      if (!Number.isFinite(x) || Math.abs(x) >= 65504) continue
      // Find the bracketing encodings by decoding: f16 is monotone in its magnitude bits.
      let lo = 0
      let hi = 0x7bff
      const m = Math.abs(x)
      while (lo < hi) {
        const mid = (lo + hi + 1) >>> 1
        if (f16ToF32(mid) <= m) lo = mid
        else hi = mid - 1
      }
      const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0
      const magnitude = nearest(m, lo, Math.min(lo + 1, 0x7bff), f16ToF32)
      const got = f32BitsToF16(bits)
      if (got !== (sign | magnitude)) expect({ x, got }).toEqual({ x, got: sign | magnitude })
    }
  })
})

describe("lazy chunking", () => {
  it("asks for consecutive chunks no larger than the chunk size, and the bytes do not depend on it", async () => {
    const calls: Array<[number, number]> = []
    const value = (i: number) => Math.sin(i) * 3
    const spy: TensorSource = {
      name: "t",
      dtype: "BF16",
      shape: [5, 10],
      fill: (out, start) => {
        calls.push([start, out.length])
        for (let j = 0; j < out.length; j++) out[j] = value(start + j)
      }
    }
    const small = join(dir, "chunk-7.safetensors")
    const whole = join(dir, "chunk-all.safetensors")
    await writeSafetensors(small, [spy, tensor("u", "F16", [9], value)], { chunkElements: 7 })
    expect(calls).toEqual([
      [0, 7],
      [7, 7],
      [14, 7],
      [21, 7],
      [28, 7],
      [35, 7],
      [42, 7],
      [49, 1]
    ])
    await writeSafetensors(whole, [tensor("t", "BF16", [5, 10], value), tensor("u", "F16", [9], value)])
    expect((await readFile(small)).equals(await readFile(whole))).toBe(true)
  })

  it("awaits asynchronous fills in order", async () => {
    const order: Array<number> = []
    const asyncSource: TensorSource = {
      name: "t",
      dtype: "F32",
      shape: [10],
      fill: async (out, start) => {
        await new Promise((resolve) => setTimeout(resolve, 10 - start))
        order.push(start)
        for (let j = 0; j < out.length; j++) out[j] = start + j
      }
    }
    const path = join(dir, "async.safetensors")
    await writeSafetensors(path, [asyncSource], { chunkElements: 3 })
    expect(order).toEqual([0, 3, 6, 9])
    expect(Array.from(await readTensor(path, "t"))).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
  })
})
