import { execFile } from "node:child_process"
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { promisify } from "node:util"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { importRaw, makeModel, presetTensors } from "../src/model/makeModel.js"
import { parameterCount, presets } from "../src/model/presets.js"
import { type ShardIndex, f32BitsToBf16, readSafetensorsHeader, readShardIndex, readTensor } from "../src/model/safetensors.js"

const run = promisify(execFile)

let dir: string
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "vdiff-make-model-"))
})
afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

/**
 * LLaDA-8B's tensor names and shapes (DESIGN.md), written out here independently of src/model/presets.ts
 * so a wrong name or transposed shape there cannot pass unnoticed.
 */
const expectedTensors = (c: {
  d_model: number
  n_heads: number
  n_kv_heads: number
  n_layers: number
  mlp_hidden_size: number
  embedding_size: number
}) => {
  const D = c.d_model
  const kv = (D / c.n_heads) * c.n_kv_heads
  const H = c.mlp_hidden_size
  const V = c.embedding_size
  const out: Record<string, Array<number>> = { "model.transformer.wte.weight": [V, D] }
  for (let i = 0; i < c.n_layers; i++) {
    const b = `model.transformer.blocks.${i}.`
    Object.assign(out, {
      [b + "attn_norm.weight"]: [D],
      [b + "ff_norm.weight"]: [D],
      [b + "q_proj.weight"]: [D, D],
      [b + "k_proj.weight"]: [kv, D],
      [b + "v_proj.weight"]: [kv, D],
      [b + "attn_out.weight"]: [D, D],
      [b + "ff_proj.weight"]: [H, D],
      [b + "up_proj.weight"]: [H, D],
      [b + "ff_out.weight"]: [D, H]
    })
  }
  out["model.transformer.ln_f.weight"] = [D]
  out["model.transformer.ff_out.weight"] = [V, D]
  return out
}

describe("tiny preset", () => {
  it("is deterministic for a seed and different for another", async () => {
    const a = join(dir, "tiny-a")
    const b = join(dir, "tiny-b")
    const c = join(dir, "tiny-c")
    await makeModel({ preset: "tiny", seed: 7, out: a })
    await makeModel({ preset: "tiny", seed: 7, out: b })
    await makeModel({ preset: "tiny", seed: 8, out: c })
    const [fa, fb, fc] = await Promise.all([a, b, c].map((d) => readFile(join(d, "model.safetensors"))))
    expect(fa!.equals(fb!)).toBe(true)
    expect(await readFile(join(a, "config.json"), "utf8")).toBe(await readFile(join(b, "config.json"), "utf8"))
    expect(fa!.length).toBe(fc!.length)
    expect(fa!.equals(fc!)).toBe(false)
    // Every random tensor differs between the seeds, not just one.
    const wa = await readTensor(join(a, "model.safetensors"), "model.transformer.blocks.1.up_proj.weight")
    const wc = await readTensor(join(c, "model.safetensors"), "model.transformer.blocks.1.up_proj.weight")
    expect(wa.filter((v, i) => v === wc[i]).length).toBeLessThan(5)
  })

  it("writes config.json with LLaDA's keys", async () => {
    const out = join(dir, "tiny-config")
    await makeModel({ preset: "tiny", seed: 1, out })
    const config = JSON.parse(await readFile(join(out, "config.json"), "utf8"))
    expect(config).toMatchObject({
      architectures: ["LLaDAModelLM"],
      model_type: "llada",
      d_model: 64,
      n_heads: 4,
      n_kv_heads: 2,
      n_layers: 2,
      mlp_hidden_size: 160,
      vocab_size: 512,
      embedding_size: 512,
      mask_token_id: 511,
      eos_token_id: 510,
      max_sequence_length: 512,
      weight_tying: false,
      include_bias: false,
      torch_dtype: "float32"
    })
    expect(typeof config.rope_theta).toBe("number")
    expect(config.rms_norm_eps).toBe(1e-5)
  })

  it("has exactly LLaDA-8B's tensor names and shapes, norms at 1 and projections at the preset's std", async () => {
    const out = join(dir, "tiny-tensors")
    await makeModel({ preset: "tiny", seed: 3, out })
    const file = join(out, "model.safetensors")
    const header = await readSafetensorsHeader(file)
    const actual = Object.fromEntries([...header.tensors].map(([name, t]) => [name, t.shape]))
    expect(actual).toEqual(expectedTensors(presets["tiny"]!.config))
    for (const t of header.tensors.values()) expect(t.dtype).toBe("F32")
    expect(header.metadata["format"]).toBe("pt")

    expect(new Set(await readTensor(file, "model.transformer.blocks.0.ff_norm.weight"))).toEqual(new Set([1]))
    expect(new Set(await readTensor(file, "model.transformer.ln_f.weight"))).toEqual(new Set([1]))
    const wte = await readTensor(file, "model.transformer.wte.weight")
    const mean = wte.reduce((s, v) => s + v, 0) / wte.length
    const std = Math.sqrt(wte.reduce((s, v) => s + (v - mean) ** 2, 0) / wte.length)
    const bound = Math.sqrt(3) * presets["tiny"]!.initStd
    expect(Math.abs(mean)).toBeLessThan(0.01)
    expect(std).toBeGreaterThan(presets["tiny"]!.initStd * 0.97)
    expect(std).toBeLessThan(presets["tiny"]!.initStd * 1.03)
    expect(Math.max(...wte)).toBeLessThanOrEqual(bound)
    expect(Math.min(...wte)).toBeGreaterThanOrEqual(-bound)
  })

  it("writes bf16 as the rounded f32 weights of the same seed", async () => {
    const f32 = join(dir, "tiny-f32")
    const bf16 = join(dir, "tiny-bf16")
    await makeModel({ preset: "tiny", seed: 5, out: f32 })
    await makeModel({ preset: "tiny", seed: 5, out: bf16, dtype: "BF16" })
    const header = await readSafetensorsHeader(join(bf16, "model.safetensors"))
    for (const t of header.tensors.values()) expect(t.dtype).toBe("BF16")
    expect(JSON.parse(await readFile(join(bf16, "config.json"), "utf8")).torch_dtype).toBe("bfloat16")
    const name = "model.transformer.blocks.0.k_proj.weight"
    const exact = await readTensor(join(f32, "model.safetensors"), name)
    const rounded = await readTensor(join(bf16, "model.safetensors"), name)
    const bits = new Uint32Array(exact.buffer)
    const expected = Array.from(bits, (b) => new Float32Array(new Uint32Array([f32BitsToBf16(b) << 16]).buffer)[0])
    expect(Array.from(rounded)).toEqual(expected)
  })

  it("shards with an index like Hugging Face checkpoints, covering every tensor once", async () => {
    const whole = join(dir, "tiny-whole")
    const sharded = join(dir, "tiny-sharded")
    await makeModel({ preset: "tiny", seed: 9, out: whole })
    await makeModel({ preset: "tiny", seed: 9, out: sharded, maxShardBytes: 200_000 })
    const files = (await readdir(sharded)).sort()
    const shards = files.filter((f) => f.endsWith(".safetensors"))
    expect(shards.length).toBeGreaterThan(2)
    expect(shards[0]).toBe(`model-00001-of-0000${shards.length}.safetensors`)
    expect(files).toContain("model.safetensors.index.json")
    expect(files).not.toContain("model.safetensors")
    const index: ShardIndex = await readShardIndex(join(sharded, "model.safetensors.index.json"))
    expect(Object.keys(index.weight_map).sort()).toEqual(Object.keys(expectedTensors(presets["tiny"]!.config)).sort())
    let total = 0
    for (const shard of shards) {
      const header = await readSafetensorsHeader(join(sharded, shard))
      const [, end] = [...header.tensors.values()].at(-1)!.dataOffsets
      // A shard exceeds the limit only when it holds a single tensor larger than the limit.
      if (header.tensors.size > 1) expect(end).toBeLessThanOrEqual(200_000)
      total += end
      for (const name of header.tensors.keys()) {
        expect(index.weight_map[name]).toBe(shard)
        const a = await readTensor(join(sharded, shard), name)
        const b = await readTensor(join(whole, "model.safetensors"), name)
        expect(Buffer.from(a.buffer).equals(Buffer.from(b.buffer))).toBe(true)
      }
    }
    expect(index.metadata.total_size).toBe(total)
    // Re-writing a sharded directory unsharded leaves no stale shards behind.
    await makeModel({ preset: "tiny", seed: 9, out: sharded })
    expect((await readdir(sharded)).sort()).toEqual(["config.json", "model.safetensors"])
  })
})

describe("small and llada-8b presets", () => {
  it("small has about 100M parameters (counted from the shapes, nothing written)", () => {
    const count = parameterCount(presets["small"]!.config)
    expect(count).toBe(100_682_496)
    const fromTensors = presetTensors(presets["small"]!, 0).reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0)
    expect(fromTensors).toBe(count)
  })

  it("llada-8b has LLaDA-8B's config, names and 8.0B parameters, in bf16 shards of at most 4 GB", () => {
    const preset = presets["llada-8b"]!
    expect(preset.config).toMatchObject({
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
    })
    const tensors = presetTensors(preset, 0)
    const shapes = Object.fromEntries(tensors.map((t) => [t.name, t.shape]))
    expect(shapes).toEqual(expectedTensors(preset.config))
    expect(parameterCount(preset.config)).toBe(8_015_581_184)
    expect(tensors.every((t) => t.dtype === "BF16")).toBe(true)
    expect(preset.maxShardBytes).toBe(4_000_000_000)
  })
})

describe("--from-raw import", () => {
  /** Exports the tiny model as the training script would: manifest.json plus raw f32 files. */
  const exportRaw = async (
    source: string,
    raw: string,
    tamper?: (m: { config: Record<string, unknown>; tensors: Array<{ name: string; shape: Array<number>; file: string }> }) => void
  ) => {
    await mkdir(raw, { recursive: true })
    const header = await readSafetensorsHeader(join(source, "model.safetensors"))
    const tensors: Array<{ name: string; shape: Array<number>; file: string }> = []
    for (const [name, t] of header.tensors) {
      const file = `t${tensors.length}.f32`
      await writeFile(join(raw, file), await readTensor(join(source, "model.safetensors"), name))
      tensors.push({ name, shape: [...t.shape], file })
    }
    const {
      architectures: _a,
      model_type: _m,
      torch_dtype: _t,
      ...config
    } = JSON.parse(await readFile(join(source, "config.json"), "utf8"))
    const manifest = { config: { ...config, bos_token_id: 3 }, tensors }
    tamper?.(manifest)
    await writeFile(join(raw, "manifest.json"), JSON.stringify(manifest))
  }

  it("converts raw f32 tensors into the same weights, keeps extra config keys and copies the tokenizer", async () => {
    const source = join(dir, "raw-source")
    const raw = join(dir, "raw")
    const out = join(dir, "raw-imported")
    await makeModel({ preset: "tiny", seed: 11, out: source })
    await exportRaw(source, raw)
    await writeFile(join(raw, "tokenizer.json"), '{"model": {}}')
    await writeFile(join(raw, "tokenizer_config.json"), '{"bos_token": "<s>"}')
    await importRaw({ from: raw, out })
    const a = await readSafetensorsHeader(join(source, "model.safetensors"))
    const b = await readSafetensorsHeader(join(out, "model.safetensors"))
    expect([...b.tensors]).toEqual([...a.tensors])
    const sourceBytes = await readFile(join(source, "model.safetensors"))
    const outBytes = await readFile(join(out, "model.safetensors"))
    expect(outBytes.subarray(b.dataStart).equals(sourceBytes.subarray(a.dataStart))).toBe(true)
    const config = JSON.parse(await readFile(join(out, "config.json"), "utf8"))
    expect(config).toMatchObject({
      architectures: ["LLaDAModelLM"],
      model_type: "llada",
      d_model: 64,
      bos_token_id: 3,
      torch_dtype: "float32"
    })
    expect(await readFile(join(out, "tokenizer.json"), "utf8")).toBe('{"model": {}}')
    expect(await readFile(join(out, "tokenizer_config.json"), "utf8")).toBe('{"bos_token": "<s>"}')

    // The same export in f16.
    const f16 = join(dir, "raw-imported-f16")
    await importRaw({ from: raw, out: f16, dtype: "F16" })
    const h = await readSafetensorsHeader(join(f16, "model.safetensors"))
    expect(h.tensors.get("model.transformer.wte.weight")!.dtype).toBe("F16")
    const w = await readTensor(join(f16, "model.safetensors"), "model.transformer.wte.weight")
    const exact = await readTensor(join(source, "model.safetensors"), "model.transformer.wte.weight")
    expect(Math.max(...w.map((v, i) => Math.abs(v - exact[i]!)))).toBeLessThan(2e-4)
  })

  it("rejects a missing tensor, a wrong shape, a short file and a config without a required key", async () => {
    const source = join(dir, "raw-source-bad")
    await makeModel({ preset: "tiny", seed: 12, out: source })
    const cases: Array<[string, Parameters<typeof exportRaw>[2], RegExp]> = [
      ["missing", (m) => void m.tensors.splice(3, 1), /missing tensor model\.transformer\.blocks\.0\.k_proj\.weight/],
      ["shape", (m) => void (m.tensors[1]!.shape = [32]), /attn_norm\.weight has shape \[32\], expected \[64\]/],
      ["extra", (m) => void m.tensors.push({ name: "lm_head.weight", shape: [1], file: "t0.f32" }), /does not have: lm_head\.weight/],
      ["config", (m) => void delete m.config["mlp_hidden_size"], /missing the required key "mlp_hidden_size"/]
    ]
    for (const [name, tamper, message] of cases) {
      const raw = join(dir, `raw-bad-${name}`)
      await exportRaw(source, raw, tamper)
      await expect(importRaw({ from: raw, out: join(dir, `raw-bad-out-${name}`) })).rejects.toThrow(message)
    }
    const short = join(dir, "raw-bad-short")
    await exportRaw(source, short)
    await writeFile(join(short, "t2.f32"), Buffer.alloc(12))
    await expect(importRaw({ from: short, out: join(dir, "raw-bad-out-short") })).rejects.toThrow(/t2\.f32: 12 bytes, expected 16384/)
  })
})

describe("command line", () => {
  const tsx = join(import.meta.dirname, "..", "node_modules", ".bin", "tsx")
  const main = join(import.meta.dirname, "..", "src", "main.ts")

  it("make-model writes the preset and prints a summary; bad usage exits with status 2", async () => {
    const out = join(dir, "cli-tiny")
    const { stdout } = await run(tsx, [main, "make-model", "--preset", "tiny", "--seed", "7", "--out", out, "--dtype", "bf16"])
    expect(JSON.parse(stdout)).toMatchObject({ dir: out, files: ["model.safetensors"], parameters: 151_872, bytes: 2 * 151_872 })
    const reference = join(dir, "cli-reference")
    await makeModel({ preset: "tiny", seed: 7, out: reference, dtype: "BF16" })
    expect((await readFile(join(out, "model.safetensors"))).equals(await readFile(join(reference, "model.safetensors")))).toBe(true)

    for (const args of [
      ["make-model", "--preset", "huge", "--out", out],
      ["make-model", "--preset", "tiny", "--out", out, "--dtype", "f64"],
      ["make-model", "--out", out],
      ["frobnicate"]
    ]) {
      const failed = await run(tsx, [main, ...args]).then(
        () => undefined,
        (e: { code: number; stderr: string }) => e
      )
      expect(failed, args.join(" ")).toBeDefined()
      expect(failed!.code).toBe(2)
      expect(failed!.stderr).toMatch(/unknown preset "huge"|--dtype must be|exactly one of|unknown command "frobnicate"/)
    }
  })
})
