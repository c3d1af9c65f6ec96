/**
 * Quantized weights: `vdiff quantize` (src/model/quantize.ts) writes the checkpoint the engine maps, and
 * quantizing at load (the addon's `quantize` option) gives the same model bit for bit; on the embedded
 * model widened to f32, Q8_0 keeps the own loss on held-out text within 1% of f32's and agrees on at least
 * 90% of its greedy answer tokens over 32 prompts (bench/cpu/quant-quality.ts; the Q4_0 figures are printed).
 */
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, describe, expect, it } from "vitest"
import { formatQuantQuality, measureQuantQuality, widenToF32 } from "../bench/cpu/quant-quality.js"
import { embeddedModelDir } from "../bench/quality.js"
import { loadAddon, type NativeLoadOptions } from "../src/engine/native.js"
import { dequantizeElement, hadamardBlock, hadamardTransform, quantizeModel, quantizeRow } from "../src/model/quantize.js"
import { f16ToF32, readSafetensorsHeader } from "../src/model/safetensors.js"

const tmp = mkdtempSync(join(tmpdir(), "vdiff-quantize-"))
afterAll(() => rmSync(tmp, { recursive: true, force: true }))

describe("quantizeRow", () => {
  it("keeps every value within half a step (Q8_0) or one step (Q4_0); zero blocks stay zero", () => {
    const x = new Float32Array(96)
    for (let i = 0; i < 96; i++) x[i] = Math.fround(Math.sin(i * 1.7) * 0.05)
    x.fill(0, 32, 64)
    x[70] = 3
    for (const format of ["q8_0", "q4_0"] as const) {
      const out = new Uint8Array(format === "q8_0" ? 96 : 48)
      const scales = new Uint16Array(3)
      quantizeRow(x, format, out, scales)
      for (let k = 0; k < 96; k++) {
        const step = Math.abs(f16ToF32(scales[Math.floor(k / 32)]!))
        const err = Math.abs(dequantizeElement(out, scales, format, k) - x[k]!)
        expect(err).toBeLessThanOrEqual((format === "q8_0" ? 0.5 : 1) * step * 1.001)
        if (k >= 32 && k < 64) expect(Math.abs(dequantizeElement(out, scales, format, k))).toBe(0)
      }
    }
  })
})

describe("hadamardTransform", () => {
  it("equals the Hadamard matrix per block and applied twice is r times x; hadamardBlock is the engine's", () => {
    expect([96, 192, 256, 768, 4096, 12288].map(hadamardBlock)).toEqual([32, 64, 128, 128, 128, 128])
    for (const r of [32, 64, 128]) {
      const x = Float32Array.from({ length: 2 * r }, (_, i) => ((i * 37) % 101) - 50)
      const y = Float32Array.from(x)
      hadamardTransform(y, r)
      const popcount = (v: number) => v.toString(2).replaceAll("0", "").length
      for (let b = 0; b < 2 * r; b += r) {
        for (let i = 0; i < r; i++) {
          let want = 0
          for (let j = 0; j < r; j++) want += (popcount(i & j) % 2 === 1 ? -1 : 1) * x[b + j]!
          expect(y[b + i]).toBe(want)
        }
      }
      hadamardTransform(y, r)
      expect(Array.from(y)).toEqual(Array.from(x, (v) => v * r))
    }
  })
})

describe("vdiff quantize on the embedded model", () => {
  it("refuses to write into the directory it reads, and shard names with a path in them", async () => {
    const copy = join(tmp, "copy")
    cpSync(embeddedModelDir, copy, { recursive: true })
    const before = statSync(join(copy, "model.safetensors")).size
    await expect(quantizeModel({ model: copy, out: copy, format: "q8_0" })).rejects.toThrow(/is the model's own directory/)
    await expect(quantizeModel({ model: copy, out: join(copy, "."), format: "q8_0" })).rejects.toThrow(/own directory/)
    expect(statSync(join(copy, "model.safetensors")).size).toBe(before)

    const sharded = join(tmp, "escaping")
    cpSync(embeddedModelDir, sharded, { recursive: true })
    writeFileSync(join(sharded, "model.safetensors.index.json"), JSON.stringify({ weight_map: { a: "../evil.safetensors" } }))
    await expect(quantizeModel({ model: sharded, out: join(tmp, "escaping-out"), format: "q8_0" })).rejects.toThrow(
      /names the shard "\.\.\/evil\.safetensors"/
    )
    expect(existsSync(join(tmp, "evil.safetensors"))).toBe(false)

    writeFileSync(join(sharded, "model.safetensors.index.json"), JSON.stringify({ weight_map: { a: "gone.safetensors" } }))
    await expect(quantizeModel({ model: sharded, out: join(tmp, "gone-out"), format: "q8_0" })).rejects.toThrow(
      /gone\.safetensors \(a shard of the checkpoint\) is not a file/
    )
    writeFileSync(join(sharded, "model.safetensors.index.json"), JSON.stringify({ weight_map: ["model.safetensors"] }))
    await expect(quantizeModel({ model: sharded, out: join(tmp, "list-out"), format: "q8_0" })).rejects.toThrow(/has no weight_map object/)
  })

  it("says when the input is already quantized: those tensors are copied as they are", async () => {
    const q8 = join(tmp, "already-q8")
    const first = await quantizeModel({ model: embeddedModelDir, out: q8, format: "q8_0" })
    expect(first.quantized).toBeGreaterThan(0)
    expect(first.alreadyQuantized).toBe(0)
    const lines: Array<string> = []
    const again = await quantizeModel({ model: q8, out: join(tmp, "already-q4"), format: "q4_0", log: (line) => lines.push(line) })
    expect(again).toMatchObject({ quantized: 0, alreadyQuantized: first.quantized })
    expect(lines.at(-1)).toBe(
      `${first.quantized} tensors were already quantized in ${q8} and are copied as they are, not converted to q4_0`
    )
  })

  it("refuses a header the engine would refuse, naming the tensor, and leaves no half-written output", async () => {
    const broken = join(tmp, "broken")
    cpSync(embeddedModelDir, broken, { recursive: true })
    const file = join(broken, "model.safetensors")
    const bytes = readFileSync(file)
    const length = Number(bytes.readBigUInt64LE(0))
    const header = JSON.parse(bytes.subarray(8, 8 + length).toString("utf8")) as Record<string, { dtype: string }>
    const name = Object.keys(header).find((key) => key !== "__metadata__")!
    for (const [dtype, message] of [
      ["FP8", /unknown dtype "FP8"/],
      ["F32", /data_offsets span \d+ bytes, but F32/]
    ] as const) {
      const json = Buffer.from(JSON.stringify({ ...header, [name]: { ...header[name], dtype } }).padEnd(length, " "))
      if (json.length !== length) throw new Error("the edited header must keep its length")
      writeFileSync(file, Buffer.concat([bytes.subarray(0, 8), json, bytes.subarray(8 + length)]))
      const out = join(tmp, `broken-out-${dtype}`)
      await expect(quantizeModel({ model: broken, out, format: "q4_0" })).rejects.toThrow(new RegExp(`tensor "${name}": ${message.source}`))
      expect(existsSync(join(out, "model.safetensors"))).toBe(false)
      expect(existsSync(join(out, "model.safetensors.partial"))).toBe(false)
    }
  })

  for (const format of ["q8_0", "q4_0"] as const) {
    it(`${format}: the checkpoint's layout, and the same logits as quantizing at load`, async () => {
      const out = join(tmp, format)
      const report = await quantizeModel({ model: embeddedModelDir, out, format })
      expect(report.quantized).toBe(6 * 7) // every projection; not the head
      const header = await readSafetensorsHeader(join(out, "model.safetensors"))
      expect(header.metadata["vdiff.quantization"]).toBe(format)
      // Q8_0 rows are rotated (the logits below equal the engine's, which rotates the activations alike).
      expect(header.metadata["vdiff.rotation"]).toBe(format === "q8_0" ? "hadamard" : undefined)
      const q = header.tensors.get("model.transformer.blocks.0.ff_out.weight")!
      expect(q.dtype).toBe(format === "q8_0" ? "I8" : "U8")
      expect(q.shape).toEqual([256, format === "q8_0" ? 768 : 384])
      expect(header.tensors.get("model.transformer.blocks.0.ff_out.weight_scale")).toMatchObject({ dtype: "F16", shape: [256, 24] })
      expect(header.tensors.get("model.transformer.wte.weight")!.dtype).toBe("BF16")
      expect(header.tensors.get("model.transformer.ff_out.weight")!.dtype).toBe("BF16")

      const addon = loadAddon()
      const atLoad: NativeLoadOptions & { quantize: string } = { threads: 2, quantize: format }
      const a = await addon.loadModel(embeddedModelDir, atLoad)
      const b = await addon.loadModel(out, { threads: 2 })
      expect(String(a.info().weightDtype)).toBe(format)
      expect(String(b.info().weightDtype)).toBe(format)
      const mask = a.info().config.maskTokenId
      const canvas = [2042, 40, 41, 42, 43, mask, mask, 44, mask, mask, 45, mask]
      const positions = [5, 6, 8, 9, 11]
      const targets = [46, 47, 48, 49, 50]
      expect(await b.score(canvas, positions, targets)).toEqual(await a.score(canvas, positions, targets))
    })
  }

  it("Q8_0 keeps the held-out own loss within 1% of f32's and >= 90% of its greedy tokens over 32 prompts", async () => {
    // The stage-3 embedded model (test/fixtures/shakespeare-stage3: the model issue 24's target was set and
    // measured on) widened to f32 (the same values), so that "none" is its exact f32 arithmetic. The stage-5
    // embedded model keeps 89.2% (bench/cpu/RESULTS.md): its greedy decisions are closer still (gaps of 1e-5).
    const f32 = await widenToF32(join(import.meta.dirname, "fixtures", "shakespeare-stage3"), join(tmp, "f32"))
    const options = { prompts: 32, genLength: 32, threads: 2, formats: ["none", "q8_0", "q4_0"] as const, modelDir: f32 }
    const rows = await measureQuantQuality(options)
    console.log(formatQuantQuality(rows, options))
    const [stored, q8] = rows
    // Better than a uniform guess over the vocabulary (ln 2048 = 7.6); measured 3.92 (held-out text).
    expect(stored!.heldOutLoss).toBeLessThan(Math.log(2048))
    expect(Math.abs(q8!.lossRatio - 1)).toBeLessThanOrEqual(0.01)
    // The integer GEMM multiplies int8 activations (llama.cpp's Q8_0 dot), rotated with the Q8_0 weights
    // (quant.h), and the head is not quantized: 94.5% of the f32 greedy tokens stay (2026-12-06; 88.0% with
    // the head quantized, 84.8% unrotated as well). This small model's confidences are so close that any
    // rounding moves its greedy path: the bf16 dot product's own rounding of the activations keeps 93.1%
    // (bench/cpu/RESULTS.md). Deterministic: every ISA computes the same bits. A broken kernel keeps ~0%.
    expect(q8!.agreement).toBeGreaterThanOrEqual(0.9)
    // Q4_0 is reported, not held to the margin; it must still be a working model (not a broken kernel).
    expect(rows[2]!.heldOutLoss).toBeLessThan(stored!.heldOutLoss * 1.5)
  }, 900_000)
})
