/**
 * Every bad input reaches the caller as a typed error (`code`) whose message says what is wrong. Broken
 * model directories are made from the tiny preset: written with the project's writer, then damaged.
 */
import { cp, mkdir, mkdtemp, readFile, rm, truncate, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { fromNative } from "../src/engine/errors.js"
import { type NativeEngine, isNativeError, loadAddon } from "../src/engine/native.js"
import { makeModel, presetTensors, writeModelDir } from "../src/model/makeModel.js"
import { quantizeModel } from "../src/model/quantize.js"
import { generate } from "../src/cli/generate.js"
import { unusedTensorsWarning } from "../src/engine/Engine.js"
import { configJson, presets } from "../src/model/presets.js"
import { readSafetensorsHeader } from "../src/model/safetensors.js"
import { greedy } from "./support/engine.js"

const tiny = presets["tiny"]!
let dir: string
let good: string
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "vdiff-engine-errors-"))
  good = join(dir, "good")
  await makeModel({ preset: "tiny", seed: 1, out: good })
})
afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

/** Resolves to the error a promise rejected with, failing the test when it resolved. */
const rejection = async (promise: Promise<unknown>): Promise<Error & { code?: unknown }> => {
  try {
    await promise
  } catch (error) {
    return error as Error & { code?: unknown }
  }
  throw new Error("expected a rejection, but the promise resolved")
}

const thrown = (f: () => unknown): Error & { code?: unknown } => {
  try {
    f()
  } catch (error) {
    return error as Error & { code?: unknown }
  }
  throw new Error("expected an exception, but the call returned")
}

const expectError = (error: Error & { code?: unknown }, code: string, message: RegExp) => {
  expect(isNativeError(error), `a typed native error: ${String(error)}`).toBe(true)
  expect(error.code).toBe(code)
  expect(error.message).toMatch(message)
}

/** A copy of the good model to damage. */
const copyOfGood = async (name: string): Promise<string> => {
  const target = join(dir, name)
  await cp(good, target, { recursive: true })
  return target
}

const load = (path: string) => loadAddon().loadModel(path, { threads: 1 })

describe("loading a broken model directory", () => {
  it("missing directory", async () => {
    const missing = join(dir, "does-not-exist")
    expectError(await rejection(load(missing)), "VDIFF_INVALID_MODEL", /does-not-exist/)
  })

  it("missing config.json", async () => {
    const target = await copyOfGood("no-config")
    await rm(join(target, "config.json"))
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /config\.json/)
  })

  // The keys without a default (n_kv_heads, embedding_size, max_sequence_length, rope_theta, ... have one).
  it.each(["d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size", "mask_token_id", "eos_token_id"])(
    "config.json without %s names the key",
    async (key) => {
      const target = await copyOfGood(`no-${key}`)
      const config = JSON.parse(await readFile(join(target, "config.json"), "utf8"))
      delete config[key]
      await writeFile(join(target, "config.json"), JSON.stringify(config))
      expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", new RegExp(`config\\.json.*"${key}"`))
    }
  )

  it.each([
    ["d_model", "64", /"d_model" must be an integer/],
    ["n_heads", 5, /"d_model".*divisible by "n_heads"/],
    ["mask_token_id", 512, /"mask_token_id" = 512 is outside the vocabulary/],
    ["include_bias", true, /"include_bias"/]
  ])("config.json with a bad %s says why", async (key, value, message) => {
    const target = await copyOfGood(`bad-${key}`)
    const config = JSON.parse(await readFile(join(target, "config.json"), "utf8"))
    config[key] = value
    await writeFile(join(target, "config.json"), JSON.stringify(config))
    const error = await rejection(load(target))
    expectError(error, "VDIFF_INVALID_MODEL", message)
    // The path, then the problem: the file is named once.
    expect(error.message.startsWith(`${join(target, "config.json")}: "`)).toBe(true)
  })

  it("config.json that is a directory", async () => {
    const target = await copyOfGood("config-dir")
    await rm(join(target, "config.json"))
    await mkdir(join(target, "config.json"))
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /config\.json: is a directory, not a file/)
  })

  it("config.json that is not JSON", async () => {
    const target = await copyOfGood("config-not-json")
    await writeFile(join(target, "config.json"), '{"d_model": 64,')
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /config\.json/)
  })

  it("missing model.safetensors", async () => {
    const target = await copyOfGood("no-weights")
    await rm(join(target, "model.safetensors"))
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /model\.safetensors/)
  })

  it("truncated model.safetensors", async () => {
    const target = await copyOfGood("truncated")
    const file = join(target, "model.safetensors")
    const { dataStart } = await readSafetensorsHeader(file)
    await truncate(file, dataStart + 1000)
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /model\.safetensors.*(past the end|truncated|beyond|exceeds|size)/i)
    // Cut inside the header, and inside the length prefix.
    await truncate(file, dataStart - 10)
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /model\.safetensors/)
    await truncate(file, 5)
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /model\.safetensors/)
  })

  it("corrupt header JSON", async () => {
    const target = await copyOfGood("corrupt-header")
    const file = join(target, "model.safetensors")
    const bytes = await readFile(file)
    bytes.write("{{", 8) // the header's opening brace becomes invalid JSON
    await writeFile(file, bytes)
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /model\.safetensors.*(JSON|json|header)/)
  })

  it("unknown or unsupported dtype", async () => {
    const target = await copyOfGood("bad-dtype")
    const file = join(target, "model.safetensors")
    const bytes = await readFile(file)
    const text = bytes.toString("latin1")
    // Same length, so offsets stay valid: first an unsupported real dtype, then a made-up one.
    for (const [replacement, pattern] of [
      ['"dtype":"I32"', /I32/],
      ['"dtype":"Q32"', /Q32/]
    ] as const) {
      const at = text.indexOf('"dtype":"F32"')
      expect(at).toBeGreaterThan(0)
      const damaged = Buffer.from(bytes)
      damaged.write(replacement, at, "latin1")
      await writeFile(file, damaged)
      expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", pattern)
    }
  })

  it("a tensor with the wrong shape names the tensor", async () => {
    const target = join(dir, "wrong-shape")
    const tensors = presetTensors(tiny, 1).map((t) =>
      t.name === "model.transformer.blocks.1.up_proj.weight" ? { ...t, shape: [tiny.config.d_model, tiny.config.mlp_hidden_size] } : t
    )
    await writeModelDir(target, configJson(tiny.config, "F32"), tensors)
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /blocks\.1\.up_proj\.weight.*shape/)
  })

  it("a missing tensor is named", async () => {
    const target = join(dir, "missing-tensor")
    const tensors = presetTensors(tiny, 1).filter((t) => t.name !== "model.transformer.ln_f.weight")
    await writeModelDir(target, configJson(tiny.config, "F32"), tensors)
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /missing tensor "model\.transformer\.ln_f\.weight"/)
  })

  it("a shard named by the index is missing", async () => {
    const target = join(dir, "missing-shard")
    await makeModel({ preset: "tiny", seed: 1, out: target, maxShardBytes: 200_000 })
    await rm(join(target, "model-00002-of-00004.safetensors"))
    expectError(await rejection(load(target)), "VDIFF_INVALID_MODEL", /model-00002-of-00004\.safetensors/)
  })

  it("the directory still loads after all that (the damage was in the copies)", async () => {
    const engine = await load(good)
    expect(engine.info().config.dModel).toBe(64)
  })
})

describe("bad requests", () => {
  let engine: NativeEngine
  beforeAll(async () => {
    engine = await load(good)
  })
  afterAll(() => {
    expect(engine.live()).toBe(0)
  })

  const prompt = [1, 2, 3, 4]
  const vocab = tiny.config.vocab_size

  it("a prompt longer than the context", () => {
    const long = Array.from({ length: tiny.config.max_sequence_length - 8 }, (_, i) => i % 100)
    expectError(
      thrown(() => engine.create(long, greedy({ genLength: 16 }))),
      "VDIFF_INVALID_ARGUMENT",
      /max_sequence_length|context/
    )
    expect(engine.live()).toBe(0)
  })

  it.each([
    ["gen length 0", greedy({ genLength: 0 }), /genLength|gen_length/],
    ["block length 0", greedy({ blockLength: 0 }), /blockLength|block_length/],
    ["steps 0", greedy({ steps: 0 }), /steps/],
    ["negative temperature", greedy({ temperature: -0.5 }), /temperature/],
    ["NaN temperature", greedy({ temperature: Number.NaN }), /temperature/],
    ["infinite temperature", greedy({ temperature: Number.POSITIVE_INFINITY }), /temperature/],
    ["negative cfg", greedy({ cfgScale: -1 }), /cfg/i],
    ["NaN cfg", greedy({ cfgScale: Number.NaN }), /cfg/i],
    ["unknown remasking", greedy({ remasking: "sideways" as "random" }), /remasking/],
    ["negative seed", greedy({ seed: -1 }), /seed/],
    ["fractional gen length", greedy({ genLength: 2.5 }), /genLength|gen_length/],
    ["EOT id outside the vocabulary", greedy({ eotTokenId: vocab }), /eot/i]
  ])("%s", (_, params, message) => {
    expectError(
      thrown(() => engine.create(prompt, params)),
      "VDIFF_INVALID_ARGUMENT",
      message
    )
    expect(engine.live()).toBe(0)
  })

  it.each([
    ["gen length 0", greedy({ genLength: 0 }), "gen_length", "max_tokens"],
    ["top_p above 1", greedy({ topP: 1.5 }), "top_p", "top_p"],
    ["min_p above 1", greedy({ minP: 2 }), "min_p", "min_p"],
    ["steps 0", greedy({ steps: 0 }), "steps", "diffusion_steps"],
    ["both parallel rules", greedy({ parallelThreshold: 0.9, parallelFactor: 1 }), "parallel_factor", "parallel_factor"]
  ])("names the setting at fault: %s", (_, params, native, request) => {
    const error = thrown(() => engine.create(prompt, params))
    expect((error as { param?: unknown }).param).toBe(native)
    // The Engine service reports it under the request's name for it.
    const tagged = fromNative(error)
    expect(tagged._tag).toBe("InvalidRequestError")
    expect(tagged._tag === "InvalidRequestError" && tagged.param).toBe(request)
  })

  it("names the input at fault: a prompt token", () => {
    const tagged = fromNative(thrown(() => engine.create([1, -1], greedy())))
    expect(tagged._tag === "InvalidRequestError" && tagged.param).toBe("prompt")
  })

  it.each([
    ["id past the vocabulary", [1, vocab, 2]],
    ["negative id", [1, -1, 2]],
    ["the mask token", [1, tiny.config.mask_token_id]]
  ])("prompt token: %s", (_, bad) => {
    expectError(
      thrown(() => engine.create(bad, greedy())),
      "VDIFF_INVALID_ARGUMENT",
      /prompt\[\d\]/
    )
    expect(engine.live()).toBe(0)
  })

  it("step on a released, an unknown, a finished or a repeated id", async () => {
    const released = engine.create(prompt, greedy())
    engine.release(released)
    expectError(await rejection(engine.step([released])), "VDIFF_INVALID_ARGUMENT", new RegExp(`${released}`))
    expectError(await rejection(engine.step([123456])), "VDIFF_INVALID_ARGUMENT", /123456/)

    const once = engine.create(prompt, greedy({ genLength: 1, blockLength: 1, steps: 1 }))
    const [result] = await engine.step([once])
    expect(result!.finished).toBe(true)
    expectError(await rejection(engine.step([once])), "VDIFF_INVALID_ARGUMENT", /finished/)
    engine.release(once)

    const twice = engine.create(prompt, greedy())
    expectError(await rejection(engine.step([twice, twice])), "VDIFF_INVALID_ARGUMENT", /twice/)
    // The failed step left the sequence untouched.
    expect(engine.sequenceInfo(twice).stepsDone).toBe(0)
    engine.release(twice)
    expectError(
      thrown(() => engine.canvas(twice)),
      "VDIFF_INVALID_ARGUMENT",
      new RegExp(`${twice}`)
    )
    expectError(
      thrown(() => engine.sequenceInfo(twice)),
      "VDIFF_INVALID_ARGUMENT",
      new RegExp(`${twice}`)
    )
  })

  it("a cancelled step rejects with VDIFF_CANCELLED and leaves the sequences as they were", async () => {
    const addon = loadAddon()
    const ids = [engine.create(prompt, greedy()), engine.create([5, 6], greedy({ genLength: 32, blockLength: 32, steps: 4 }))]
    const before = ids.map((id) => Array.from(engine.canvas(id)))

    const early = new addon.CancelToken()
    early.cancel()
    expect(early.cancelled).toBe(true)
    expectError(await rejection(engine.step(ids, early)), "VDIFF_CANCELLED", /cancel/)
    expect(ids.map((id) => engine.sequenceInfo(id).stepsDone)).toEqual([0, 0])
    expect(ids.map((id) => Array.from(engine.canvas(id)))).toEqual(before)

    // Cancelled right after the call, while the step is queued or running on the worker thread. Eight
    // near-full canvases make the step take tens of milliseconds, far longer than reaching cancel().
    const longPrompt = Array.from({ length: 400 }, (_, i) => (i * 7) % 500)
    const heavy = Array.from({ length: 8 }, () => engine.create(longPrompt, greedy({ genLength: 96, blockLength: 32, steps: 96 })))
    const late = new addon.CancelToken()
    const pending = engine.step([...ids, ...heavy], late)
    late.cancel()
    expectError(await rejection(pending), "VDIFF_CANCELLED", /cancel/)
    expect([...ids, ...heavy].map((id) => engine.sequenceInfo(id).stepsDone)).toEqual(Array(10).fill(0))
    expect(ids.map((id) => Array.from(engine.canvas(id)))).toEqual(before)
    for (const id of heavy) engine.release(id)

    // The sequences still work afterwards.
    const results = await engine.step(ids)
    expect(results.map((r) => r.stepsDone)).toEqual([1, 1])
    for (const id of ids) engine.release(id)
  })
})

describe("a model that computes NaN", () => {
  it("fails the step of a canvas whose logits are not finite with VDIFF_NUMERIC, naming the sequence, and commits nothing", async () => {
    // Token 7's embedding is NaN: a canvas holding it computes NaN everywhere; others are unaffected.
    const target = join(dir, "nan-embedding")
    const D = tiny.config.d_model
    const tensors = presetTensors(tiny, 1).map((t) =>
      t.name === "model.transformer.wte.weight"
        ? {
            ...t,
            fill: async (out: Float32Array, start: number) => {
              await t.fill(out, start)
              for (let i = 0; i < out.length; i++) if (Math.floor((start + i) / D) === 7) out[i] = Number.NaN
            }
          }
        : t
    )
    await writeModelDir(target, configJson(tiny.config, "F32"), tensors)
    const engine = await load(target)
    const good = engine.create([1, 2, 3], greedy())
    const bad = engine.create([1, 7, 3], greedy())
    const error = await rejection(engine.step([good, bad]))
    expectError(error, "VDIFF_NUMERIC", new RegExp(`^sequence ${bad}: answer position \\d+: the model's logits hold NaN or infinity`))
    expect(fromNative(error)).toMatchObject({ _tag: "EngineFailure", code: "VDIFF_NUMERIC" })
    expect([good, bad].map((id) => engine.sequenceInfo(id).stepsDone)).toEqual([0, 0])
    // Alone, the other sequence steps as usual; the bad one fails again, alone.
    expect((await engine.step([good]))[0]!.committed.length).toBeGreaterThan(0)
    expectError(await rejection(engine.step([bad])), "VDIFF_NUMERIC", /NaN or infinity/)
    engine.release(good)
    engine.release(bad)
  })
})

describe("tensors the model does not read", () => {
  it("none in any tiny preset, a quantized copy or the embedded model", async () => {
    for (const preset of ["tiny", "llada2-tiny", "sdar-tiny", "sdar-moe-tiny", "dream-tiny"]) {
      const target = join(dir, `unused-${preset}`)
      await makeModel({ preset, seed: 1, out: target })
      expect((await load(target)).info().unusedTensors, preset).toEqual([])
    }
    await quantizeModel({ model: good, out: join(dir, "unused-q4"), format: "q4_0" })
    expect((await load(join(dir, "unused-q4"))).info().unusedTensors).toEqual([])
    expect((await load(join(import.meta.dirname, "..", "models", "shakespeare"))).info().unusedTensors).toEqual([])
  })

  it("names a stored head that config.json ties, and a tensor of no layer, but not a rotary buffer", async () => {
    const target = join(dir, "unused-extra")
    const extra = (name: string) => ({ name, dtype: "F32" as const, shape: [4], fill: (out: Float32Array) => void out.fill(0) })
    await writeModelDir(target, configJson(tiny.config, "F32"), [
      ...presetTensors(tiny, 1),
      extra("model.transformer.blocks.0.attn.rotary_emb.inv_freq"),
      extra("model.transformer.blocks.9.q_proj.bias")
    ])
    expect((await load(target)).info().unusedTensors).toEqual(["model.transformer.blocks.9.q_proj.bias"])
    // vdiff generate says so too.
    const warnings: Array<string> = []
    const settings = {
      genLength: 4,
      blockLength: 4,
      steps: 4,
      temperature: 0,
      seed: 0,
      threads: 1,
      device: "cpu",
      quantize: "none",
      cpuIsa: "auto"
    } as const
    await generate({ model: target, prompt: [1, 2], ...settings, onWarning: (message) => warnings.push(message) })
    expect(warnings).toEqual([unusedTensorsWarning(["model.transformer.blocks.9.q_proj.bias"], "llada")])
    const tied = join(dir, "unused-tied")
    await writeModelDir(tied, { ...configJson(tiny.config, "F32"), weight_tying: true }, presetTensors(tiny, 1))
    expect((await load(tied)).info().unusedTensors).toEqual(["model.transformer.ff_out.weight"])
  })

  it("is a warning at start-up that names the first five", () => {
    expect(unusedTensorsWarning(["a.bias"], "llada")).toBe(
      'the checkpoint holds 1 tensor that the llada family does not read ("a.bias"): check that config.json describes this checkpoint'
    )
    expect(unusedTensorsWarning(["a", "b", "c", "d", "e", "f", "g"], "sdar")).toMatch(/^the checkpoint holds 7 tensors .*"e" and 2 more\)/)
  })
})
