import { execFile } from "node:child_process"
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { promisify } from "node:util"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Template } from "@huggingface/jinja"
import { Effect, Option } from "effect"
import { cutTokenizer, importRaw, makeModel, presetTensors, writeModelDir } from "../src/model/makeModel.js"
import { familyParameterCount, familyPresets, parameterCount, presets } from "../src/model/presets.js"
import { quantizeModel } from "../src/model/quantize.js"
import {
  type ShardIndex,
  type TensorSource,
  f32BitsToBf16,
  makeDirectory,
  readSafetensorsHeader,
  readShardIndex,
  readTensor
} from "../src/model/safetensors.js"
import { make as makeTokenizer } from "../src/tokenizer/Tokenizer.js"

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
      ["make-model", "--preset", "tiny", "--seed", "-1", "--out", out],
      ["generate", "--model", out, "--prompt-ids", "1", "--threads", "4097"],
      ["generate", "--model", out, "--prompt-ids", "1", "--cfg", "1e39"],
      ["frobnicate"]
    ]) {
      const failed = await run(tsx, [main, ...args]).then(
        () => undefined,
        (e: { code: number; stderr: string }) => e
      )
      expect(failed, args.join(" ")).toBeDefined()
      expect(failed!.code).toBe(2)
      expect(failed!.stderr).toMatch(
        /unknown preset "huge"|--dtype must be|exactly one of|--seed: must be an integer of at least 0, got "-1"|--threads: must be an integer from 0 to 4096|--cfg: must be a number from 0 to 1000|unknown command "frobnicate"/
      )
    }
  })

  it("--version prints the version; --out under /proc fails at once instead of hanging", async () => {
    expect((await run(tsx, [main, "--version"])).stdout).toMatch(/^vdiff \d+\.\d+\.\d+\n$/)
    const started = Date.now()
    const failed = await run(tsx, [main, "make-model", "--preset", "tiny", "--seed", "1", "--out", "/proc/vdiff-nope"], {
      timeout: 30_000
    }).then(
      () => undefined,
      (e: { code: number; stderr: string }) => e
    )
    expect(failed?.code).toBe(1)
    expect(failed?.stderr).toBe("vdiff: ENOENT: no such file or directory, mkdir '/proc/vdiff-nope'\n")
    expect(Date.now() - started).toBeLessThan(30_000)
    // A file where a directory should be is named.
    const file = join(dir, "a-file")
    await writeFile(file, "x")
    await expect(makeDirectory(file)).rejects.toThrow(`${file} exists and is not a directory`)
    await makeDirectory(join(dir, "made", "deep", "down"))
    expect((await stat(join(dir, "made", "deep", "down"))).isDirectory()).toBe(true)
  }, 60_000)

  it("make-model --quantize writes a family preset quantized; a bad format or --quantize with --from-raw exits with status 2", async () => {
    const out = join(dir, "cli-bad-quantize")
    const quantized = join(dir, "cli-llada2-q8")
    const q = await run(tsx, [main, "make-model", "--preset", "llada2-tiny", "--seed", "3", "--out", quantized, "--quantize", "q8_0"])
    expect(JSON.parse(q.stdout)).toMatchObject({ dir: quantized, files: ["model.safetensors"], parameters: 535_104 })
    expect((await readSafetensorsHeader(join(quantized, "model.safetensors"))).metadata["vdiff.quantization"]).toBe("q8_0")
    expect((await readdir(quantized)).sort()).toEqual(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])

    for (const args of [
      ["make-model", "--preset", "tiny", "--out", out, "--quantize", "q2"],
      ["make-model", "--from-raw", out, "--out", out, "--quantize", "q8_0"]
    ]) {
      const failed = await run(tsx, [main, ...args]).then(
        () => undefined,
        (e: { code: number; stderr: string }) => e
      )
      expect(failed, args.join(" ")).toBeDefined()
      expect(failed!.code).toBe(2)
      expect(failed!.stderr).toMatch(/quantize/)
    }
  }, 120_000)
})

/**
 * The block-diffusion families' tensor names and shapes (../shared/specs/block-diffusion.md A3 and B3),
 * written out here independently of src/model/presets.ts.
 */
const llada2Expected = (c: {
  D: number
  layers: number
  heads: number
  kv: number
  hd: number
  dense: number
  moe: number
  experts: number
  shared: number
  firstDense: number
  V: number
}) => {
  const out: Record<string, Array<number>> = { "model.word_embeddings.weight": [c.V, c.D] }
  const mlp = (p: string, w: number) => {
    out[`${p}.gate_proj.weight`] = [w, c.D]
    out[`${p}.up_proj.weight`] = [w, c.D]
    out[`${p}.down_proj.weight`] = [c.D, w]
  }
  for (let i = 0; i < c.layers; i++) {
    const l = `model.layers.${i}.`
    out[l + "input_layernorm.weight"] = [c.D]
    out[l + "post_attention_layernorm.weight"] = [c.D]
    out[l + "attention.query_key_value.weight"] = [(c.heads + 2 * c.kv) * c.hd, c.D]
    out[l + "attention.query_layernorm.weight"] = [c.hd]
    out[l + "attention.key_layernorm.weight"] = [c.hd]
    out[l + "attention.dense.weight"] = [c.D, c.heads * c.hd]
    if (i < c.firstDense) {
      mlp(l + "mlp", c.dense)
      continue
    }
    out[l + "mlp.gate.weight"] = [c.experts, c.D]
    out[l + "mlp.gate.expert_bias"] = [c.experts]
    for (let e = 0; e < c.experts; e++) mlp(`${l}mlp.experts.${e}`, c.moe)
    mlp(l + "mlp.shared_experts", c.moe * c.shared)
  }
  out["model.norm.weight"] = [c.D]
  out["lm_head.weight"] = [c.V, c.D]
  return out
}

const sdarExpected = (c: {
  D: number
  layers: number
  heads: number
  kv: number
  hd: number
  ff: number
  V: number
  experts?: number
  moe?: number
}) => {
  const out: Record<string, Array<number>> = { "model.embed_tokens.weight": [c.V, c.D] }
  const mlp = (p: string, w: number) => {
    out[`${p}.gate_proj.weight`] = [w, c.D]
    out[`${p}.up_proj.weight`] = [w, c.D]
    out[`${p}.down_proj.weight`] = [c.D, w]
  }
  for (let i = 0; i < c.layers; i++) {
    const l = `model.layers.${i}.`
    out[l + "input_layernorm.weight"] = [c.D]
    out[l + "post_attention_layernorm.weight"] = [c.D]
    out[l + "self_attn.q_proj.weight"] = [c.heads * c.hd, c.D]
    out[l + "self_attn.k_proj.weight"] = [c.kv * c.hd, c.D]
    out[l + "self_attn.v_proj.weight"] = [c.kv * c.hd, c.D]
    out[l + "self_attn.o_proj.weight"] = [c.D, c.heads * c.hd]
    out[l + "self_attn.q_norm.weight"] = [c.hd]
    out[l + "self_attn.k_norm.weight"] = [c.hd]
    if (c.experts === undefined) {
      mlp(l + "mlp", c.ff)
      continue
    }
    out[l + "mlp.gate.weight"] = [c.experts, c.D]
    for (let e = 0; e < c.experts; e++) mlp(`${l}mlp.experts.${e}`, c.moe!)
  }
  out["model.norm.weight"] = [c.D]
  out["lm_head.weight"] = [c.V, c.D]
  return out
}

/**
 * Dream's tensor names and shapes (HF Qwen2 names, tools/reference/README.md "Dream"): q/k/v with a bias,
 * o_proj and the MLP without, head_dim = hidden / heads.
 */
const dreamExpected = (c: { D: number; layers: number; heads: number; kv: number; ff: number; V: number; tied?: boolean }) => {
  const hd = c.D / c.heads
  const out: Record<string, Array<number>> = { "model.embed_tokens.weight": [c.V, c.D] }
  for (let i = 0; i < c.layers; i++) {
    const l = `model.layers.${i}.`
    out[l + "input_layernorm.weight"] = [c.D]
    out[l + "post_attention_layernorm.weight"] = [c.D]
    out[l + "self_attn.q_proj.weight"] = [c.heads * hd, c.D]
    out[l + "self_attn.q_proj.bias"] = [c.heads * hd]
    out[l + "self_attn.k_proj.weight"] = [c.kv * hd, c.D]
    out[l + "self_attn.k_proj.bias"] = [c.kv * hd]
    out[l + "self_attn.v_proj.weight"] = [c.kv * hd, c.D]
    out[l + "self_attn.v_proj.bias"] = [c.kv * hd]
    out[l + "self_attn.o_proj.weight"] = [c.D, c.heads * hd]
    out[l + "mlp.gate_proj.weight"] = [c.ff, c.D]
    out[l + "mlp.up_proj.weight"] = [c.ff, c.D]
    out[l + "mlp.down_proj.weight"] = [c.D, c.ff]
  }
  out["model.norm.weight"] = [c.D]
  if (c.tied !== true) out["lm_head.weight"] = [c.V, c.D]
  return out
}

const shapesOf = async (dir: string) => {
  const header = await readSafetensorsHeader(join(dir, "model.safetensors"))
  return { header, shapes: Object.fromEntries([...header.tensors].map(([name, t]) => [name, t.shape])) }
}

describe("block-diffusion family presets", () => {
  it("llada2-tiny: LLaDA2's names and shapes (fused QKV, QK-norm, dense layer 0, 4 groups of 4 experts, a shared expert) and config keys", async () => {
    const out = join(dir, "llada2-tiny")
    await makeModel({ preset: "llada2-tiny", seed: 2, out })
    const { header, shapes } = await shapesOf(out)
    expect(shapes).toEqual(
      llada2Expected({ D: 64, layers: 3, heads: 4, kv: 2, hd: 16, dense: 128, moe: 32, experts: 16, shared: 1, firstDense: 1, V: 2048 })
    )
    for (const [name, t] of header.tensors) expect(t.dtype, name).toBe("F32")
    const config = JSON.parse(await readFile(join(out, "config.json"), "utf8"))
    expect(config).toMatchObject({
      architectures: ["LLaDA2MoeModelLM"],
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
      score_function: "sigmoid",
      moe_router_enable_expert_bias: true,
      partial_rotary_factor: 0.5,
      rotary_dim: 8,
      use_qk_norm: true,
      use_qkv_bias: false,
      use_bias: false,
      tie_word_embeddings: false,
      vocab_size: 2048,
      mask_token_id: 2044,
      eos_token_id: 2043,
      block_size: 32,
      torch_dtype: "float32"
    })
    // Several groups, and fewer kept than there are: the group limit can exclude experts.
    expect(config.n_group).toBeGreaterThan(config.topk_group)
    // The expert bias is random (it changes the choice), the norms are 1.
    const bias = await readTensor(join(out, "model.safetensors"), "model.layers.1.mlp.gate.expert_bias")
    expect(new Set(bias).size).toBe(16)
    expect(Math.max(...bias.map(Math.abs))).toBeLessThanOrEqual(Math.sqrt(3) * familyPresets["llada2-tiny"]!.biasStd)
    expect(new Set(await readTensor(join(out, "model.safetensors"), "model.layers.2.attention.key_layernorm.weight"))).toEqual(new Set([1]))
  })

  it("sdar-tiny and sdar-moe-tiny: Qwen3's names and shapes (q width != hidden), stop ids as a list, block 4", async () => {
    const dense = join(dir, "sdar-tiny")
    const moe = join(dir, "sdar-moe-tiny")
    await makeModel({ preset: "sdar-tiny", seed: 2, out: dense })
    await makeModel({ preset: "sdar-moe-tiny", seed: 2, out: moe })
    expect((await shapesOf(dense)).shapes).toEqual(sdarExpected({ D: 64, layers: 2, heads: 4, kv: 2, hd: 32, ff: 160, V: 2048 }))
    expect((await shapesOf(moe)).shapes).toEqual(
      sdarExpected({ D: 64, layers: 2, heads: 4, kv: 2, hd: 32, ff: 160, V: 2048, experts: 8, moe: 32 })
    )
    const common = {
      hidden_size: 64,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      head_dim: 32,
      vocab_size: 2048,
      tie_word_embeddings: false,
      attention_bias: false,
      eos_token_id: [2045, 2043],
      mask_token_id: 2044,
      block_size: 4
    }
    expect(JSON.parse(await readFile(join(dense, "config.json"), "utf8"))).toMatchObject({
      architectures: ["SDARForCausalLM"],
      model_type: "sdar",
      intermediate_size: 160,
      ...common
    })
    const moeConfig = JSON.parse(await readFile(join(moe, "config.json"), "utf8"))
    expect(moeConfig).toMatchObject({
      architectures: ["SDARMoeForCausalLM"],
      model_type: "sdar_moe",
      num_experts: 8,
      num_experts_per_tok: 2,
      moe_intermediate_size: 32,
      norm_topk_prob: true,
      decoder_sparse_step: 1,
      mlp_only_layers: [],
      ...common
    })
    expect(moeConfig.moe).toBeUndefined()
  })

  it("the tiny ones carry the embedded tokenizer under the family's special tokens, with the family's chat template", async () => {
    const conversation = {
      messages: [
        { role: "system", content: "Be brief." },
        { role: "user", content: "Who art thou?" },
        { role: "assistant", content: "A player." },
        { role: "user", content: "Speak!" }
      ],
      add_generation_prompt: true,
      bos_token: "",
      eos_token: ""
    }
    const cases = [
      {
        preset: "llada2-tiny",
        mask: "<|mask|>",
        eos: "<|endoftext|>",
        specials: ["<|role_end|>", "<role>", "</role>"],
        rendered:
          "<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|><role>HUMAN</role>Who art thou?<|role_end|>" +
          "<role>ASSISTANT</role>A player.<|role_end|><role>HUMAN</role>Speak!<|role_end|><role>ASSISTANT</role>"
      },
      {
        preset: "sdar-tiny",
        mask: "<|MASK|>",
        eos: "<|im_end|>",
        specials: ["<|im_start|>", "<|endoftext|>"],
        rendered:
          "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n" +
          "<|im_start|>assistant\nA player.<|im_end|>\n<|im_start|>user\nSpeak!<|im_end|>\n<|im_start|>assistant\n"
      },
      {
        preset: "dream-tiny",
        mask: "<|mask|>",
        eos: "<|endoftext|>",
        specials: ["<|im_start|>", "<|im_end|>", "<|beginoftext|>"],
        rendered:
          "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n" +
          "<|im_start|>assistant\nA player.<|im_end|>\n<|im_start|>user\nSpeak!<|im_end|>\n<|im_start|>assistant\n"
      }
    ]
    const embedded = JSON.parse(await readFile(join(import.meta.dirname, "..", "models", "shakespeare", "tokenizer.json"), "utf8"))
    for (const c of cases) {
      const out = join(dir, `tok-${c.preset}`)
      await makeModel({ preset: c.preset, seed: 1, out })
      const config = JSON.parse(await readFile(join(out, "config.json"), "utf8"))
      const tokenizer = await Effect.runPromise(makeTokenizer(out))
      expect(tokenizer.vocabSize).toBe(config.vocab_size)
      expect(tokenizer.specialTokens.mask).toBe(config.mask_token_id)
      expect(tokenizer.tokenId(c.mask)).toEqual(Option.some(config.mask_token_id))
      const eos = Array.isArray(config.eos_token_id) ? config.eos_token_id[0] : config.eos_token_id
      expect(tokenizer.tokenId(c.eos)).toEqual(Option.some(eos))
      for (const name of c.specials) expect(Option.isSome(tokenizer.tokenId(name)), name).toBe(true)
      // The BPE itself is the embedded model's, cut to the presets' 2048 ids; no BOS is added.
      const written = JSON.parse(await readFile(join(out, "tokenizer.json"), "utf8"))
      expect(written.model).toEqual(cutTokenizer(embedded, 2048).model)
      const text = "Now is the winter of our discontent"
      const ids = tokenizer.encode(text)
      expect(ids.every((id) => id < 2042)).toBe(true)
      expect(tokenizer.decode(ids)).toBe(text)
      // The chat template in the family's style; its markers are single special tokens.
      const tokenizerConfig = JSON.parse(await readFile(join(out, "tokenizer_config.json"), "utf8"))
      const rendered = new Template(tokenizerConfig.chat_template).render(conversation)
      expect(rendered).toBe(c.rendered)
      const encoded = tokenizer.encode(rendered)
      expect(tokenizer.decode(encoded)).toBe(rendered)
      for (const name of c.specials.slice(0, 1)) {
        const id = Option.getOrThrow(tokenizer.tokenId(name))
        expect(encoded.filter((t) => t === id).length, name).toBe(c.rendered.split(name).length - 1)
      }
    }
  })

  it("dream-tiny: Dream's names and shapes (q/k/v biases, GQA), config keys, random biases, and Qwen2's chat template with its default system turn", async () => {
    const out = join(dir, "dream-tiny")
    await makeModel({ preset: "dream-tiny", seed: 2, out })
    const { header, shapes } = await shapesOf(out)
    expect(shapes).toEqual(dreamExpected({ D: 64, layers: 2, heads: 4, kv: 2, ff: 160, V: 2048 }))
    for (const [name, t] of header.tensors) expect(t.dtype, name).toBe("F32")
    const config = JSON.parse(await readFile(join(out, "config.json"), "utf8"))
    expect(config).toMatchObject({
      architectures: ["DreamModel"],
      model_type: "Dream",
      hidden_size: 64,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      intermediate_size: 160,
      vocab_size: 2048,
      rope_theta: 1000000,
      rms_norm_eps: 1e-6,
      tie_word_embeddings: false,
      mask_token_id: 2047,
      eos_token_id: 2042,
      pad_token_id: 2042,
      bos_token_id: 2042,
      hidden_act: "silu",
      rope_scaling: null,
      sliding_window: null,
      torch_dtype: "float32"
    })
    // Dream's q/k/v biases are its architecture's rule: the real config has no key for them.
    expect(config).not.toHaveProperty("attention_bias")
    expect(config).not.toHaveProperty("head_dim")
    const bias = await readTensor(join(out, "model.safetensors"), "model.layers.1.self_attn.k_proj.bias")
    expect(new Set(bias).size).toBe(32)
    expect(Math.max(...bias.map(Math.abs))).toBeLessThanOrEqual(Math.sqrt(3) * familyPresets["dream-tiny"]!.biasStd)
    expect(new Set(await readTensor(join(out, "model.safetensors"), "model.layers.0.input_layernorm.weight"))).toEqual(new Set([1]))
    // The special tokens: <|endoftext|> ends the text (config's eos), <|im_end|> a chat turn, <|mask|> is the last id.
    const tokenizer = await Effect.runPromise(makeTokenizer(out))
    expect(tokenizer.specialTokens).toMatchObject({ eos: 2042, mask: 2047, bos: Option.some(2046), pad: 2042 })
    expect(tokenizer.tokenId("<|im_end|>")).toEqual(Option.some(2044))
    const template = new Template(JSON.parse(await readFile(join(out, "tokenizer_config.json"), "utf8")).chat_template)
    expect(template.render({ messages: [{ role: "user", content: "Speak." }], add_generation_prompt: true })).toBe(
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nSpeak.<|im_end|>\n<|im_start|>assistant\n"
    )
  })

  it("dream-7b has Dream-v0-7B's shape: 7.62B parameters, q/k/v biases, untied head (counted, nothing written)", () => {
    const preset = familyPresets["dream-7b"]!
    expect(Object.fromEntries(presetTensors(preset, 0).map((t) => [t.name, t.shape]))).toEqual(
      dreamExpected({ D: 3584, layers: 28, heads: 28, kv: 4, ff: 18944, V: 152064 })
    )
    // Qwen2.5-7B's count: 28 × 233,057,792 per layer, 2 × 152064 × 3584 for embedding and head, the final norm.
    expect(familyParameterCount(preset.config)).toBe(7_615_616_512)
    expect(preset.config).toMatchObject({
      model_type: "Dream",
      rope_theta: 1000000,
      rms_norm_eps: 1e-6,
      tie_word_embeddings: false,
      mask_token_id: 151666,
      eos_token_id: 151643,
      pad_token_id: 151643,
      max_position_embeddings: 131072
    })
    expect(preset).toMatchObject({ dtype: "BF16", maxShardBytes: 4_000_000_000, tokenizer: "none" })
    expect(presetTensors(preset, 0).every((t) => t.dtype === "BF16")).toBe(true)
  })

  it("llada2-mini and sdar-4b have the real shapes: 16.26B and 4.41B parameters (counted, nothing written)", () => {
    const mini = familyPresets["llada2-mini"]!
    const shapes = Object.fromEntries(presetTensors(mini, 0).map((t) => [t.name, t.shape]))
    expect(shapes).toEqual(
      llada2Expected({
        D: 2048,
        layers: 20,
        heads: 16,
        kv: 4,
        hd: 128,
        dense: 5120,
        moe: 512,
        experts: 256,
        shared: 1,
        firstDense: 1,
        V: 157184
      })
    )
    expect(familyParameterCount(mini.config)).toBe(16_255_643_392)
    expect(mini.config).toMatchObject({
      n_group: 8,
      topk_group: 4,
      num_experts_per_tok: 8,
      routed_scaling_factor: 2.5,
      mask_token_id: 156895
    })
    expect(
      presetTensors(mini, 0)
        .filter((t) => t.dtype !== "BF16")
        .map((t) => t.name)
    ).toEqual(Array.from({ length: 19 }, (_, i) => `model.layers.${i + 1}.mlp.gate.expert_bias`))
    const sdar = familyPresets["sdar-4b"]!
    expect(Object.fromEntries(presetTensors(sdar, 0).map((t) => [t.name, t.shape]))).toEqual(
      sdarExpected({ D: 2560, layers: 36, heads: 32, kv: 8, hd: 128, ff: 9728, V: 151936 })
    )
    expect(familyParameterCount(sdar.config)).toBe(4_411_424_256)
    expect(sdar.config).toMatchObject({ mask_token_id: 151669, eos_token_id: [151645, 151643], block_size: 4 })
  })
})

describe("make-model --quantize", () => {
  it("writes the same files as make-model followed by vdiff quantize, sharded or not, in q8_0 and q4_0", async () => {
    for (const format of ["q8_0", "q4_0"] as const) {
      for (const [preset, dtype, maxShardBytes] of [
        ["llada2-tiny", "BF16", 300_000],
        ["sdar-moe-tiny", "F32", undefined]
      ] as const) {
        const tag = `${preset}-${format}-${dtype}`
        const direct = join(dir, `q-direct-${tag}`)
        const plain = join(dir, `q-plain-${tag}`)
        const twoStep = join(dir, `q-two-${tag}`)
        const shard = maxShardBytes !== undefined ? { maxShardBytes } : {}
        await makeModel({ preset, seed: 4, out: direct, dtype, quantize: format, ...shard })
        await makeModel({ preset, seed: 4, out: plain, dtype, ...shard })
        await quantizeModel({ model: plain, out: twoStep, format })
        const files = (await readdir(direct)).sort()
        expect(files).toEqual((await readdir(twoStep)).sort())
        expect(files.filter((f) => f.endsWith(".safetensors")).length > 1, tag).toBe(maxShardBytes !== undefined)
        for (const f of files) expect((await readFile(join(direct, f))).equals(await readFile(join(twoStep, f))), `${tag} ${f}`).toBe(true)
        // Embeddings, heads, routers, norms and the expert bias stay float; the projections are quantized.
        const tensors = new Map<string, { dtype: string; shape: ReadonlyArray<number> }>()
        for (const f of files.filter((f) => f.endsWith(".safetensors"))) {
          for (const [name, t] of (await readSafetensorsHeader(join(direct, f))).tensors) tensors.set(name, t)
        }
        const q = format === "q8_0" ? "I8" : "U8"
        const embed = preset === "llada2-tiny" ? "model.word_embeddings.weight" : "model.embed_tokens.weight"
        expect(tensors.get(embed)!.dtype).toBe(dtype)
        expect(tensors.get("model.layers.1.mlp.gate.weight")!.dtype).toBe(dtype)
        expect(tensors.get("model.layers.1.mlp.experts.3.down_proj.weight")!.dtype).toBe(q)
        expect(tensors.get("model.layers.1.mlp.experts.3.down_proj.weight_scale")!.dtype).toBe("F16")
        expect(tensors.get("lm_head.weight")!.dtype).toBe(dtype) // the head stays as stored
        if (preset === "llada2-tiny") {
          expect(tensors.get("model.layers.1.mlp.gate.expert_bias")!.dtype).toBe("F32")
          expect(tensors.get("model.layers.0.attention.query_key_value.weight")!.shape).toEqual([128, format === "q8_0" ? 64 : 32])
        }
      }
    }
  })

  it("streams: no tensor is ever produced whole (a 16 MB matrix in bands of at most 8 MB of f32)", async () => {
    let largest = 0
    const rows = 2048
    const cols = 2048
    const source: TensorSource = {
      name: "model.layers.0.mlp.experts.0.up_proj.weight",
      dtype: "BF16",
      shape: [rows, cols],
      fill: (out, start) => {
        largest = Math.max(largest, out.length)
        for (let i = 0; i < out.length; i++) out[i] = Math.sin(start + i)
      }
    }
    const norm: TensorSource = { name: "model.norm.weight", dtype: "F32", shape: [cols], fill: (out) => void out.fill(1) }
    const out = join(dir, "q-stream")
    const written = await writeModelDir(out, { model_type: "test" }, [source, norm], { quantize: "q4_0" })
    expect(largest).toBeLessThanOrEqual((8 << 20) / 4)
    expect(largest).toBeLessThan(rows * cols)
    expect(written.bytes).toBe(rows * (cols / 2) + rows * (cols / 32) * 2 + cols * 4)
    const header = await readSafetensorsHeader(join(out, "model.safetensors"))
    expect(header.tensors.get(source.name)).toMatchObject({ dtype: "U8", shape: [rows, cols / 2] })
    expect(header.metadata["vdiff.quantization"]).toBe("q4_0")
  })
})

describe("cutTokenizer", () => {
  // A byte-level BPE in tokenizer.json's shape: 4 base symbols, 3 merges in the order learnt, 2 special tokens.
  const bpe = {
    added_tokens: [
      { id: 8, content: "<eos>" },
      { id: 7, content: "<bos>" }
    ],
    post_processor: null,
    model: {
      vocab: { a: 0, b: 1, c: 2, d: 3, ab: 4, abc: 5, cd: 6 },
      merges: [
        ["a", "b"],
        ["ab", "c"],
        ["c", "d"]
      ] as Array<readonly [string, string]>
    }
  }

  it("keeps the first ids and the merges that make them, and renumbers the special tokens after them", () => {
    const cut = cutTokenizer(bpe, 7)
    expect(cut.model.vocab).toEqual({ a: 0, b: 1, c: 2, d: 3, ab: 4 })
    expect(cut.model.merges).toEqual([["a", "b"]])
    expect(cut.added_tokens).toEqual([
      { id: 5, content: "<bos>" },
      { id: 6, content: "<eos>" }
    ])
    // Merges written as "a b" strings (the other tokenizer.json form) are cut the same way.
    expect(cutTokenizer({ ...bpe, model: { ...bpe.model, merges: ["a b", "ab c", "c d"] } }, 8).model.merges).toEqual(["a b", "ab c"])
    // Cut to its own size it is unchanged but for the special tokens' order.
    expect(cutTokenizer(bpe, 9).model).toEqual(bpe.model)
  })

  it("refuses a vocabulary whose first ids are not all there", () => {
    const gapped = { ...bpe, model: { ...bpe.model, vocab: { a: 0, b: 1, c: 2, d: 5, ab: 4, abc: 6, cd: 7 } } }
    expect(() => cutTokenizer(gapped, 7)).toThrow(/not contiguous/)
  })

  it("cuts the embedded 8192-id tokenizer to the 2048 ids the tiny family presets use, encoding as before", async () => {
    const full = JSON.parse(await readFile(join(import.meta.dirname, "..", "models", "shakespeare", "tokenizer.json"), "utf8"))
    const cut = cutTokenizer(full, 2048)
    expect(Object.keys(cut.model.vocab)).toHaveLength(2042)
    expect(cut.model.merges).toHaveLength(1786)
    expect(cut.added_tokens.map((t) => [t.id, t.content])).toEqual([
      [2042, "<|startoftext|>"],
      [2043, "<|endoftext|>"],
      [2044, "<|mdm_mask|>"],
      [2045, "<|start_header_id|>"],
      [2046, "<|end_header_id|>"],
      [2047, "<|eot_id|>"]
    ])
    // The cut is the prefix the 8192-id run learnt first: the first 1786 merges are unchanged, in order.
    expect(cut.model.merges).toEqual(full.model.merges.slice(0, 1786))
  })
})
