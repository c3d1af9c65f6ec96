/**
 * The request settings by model family (src/config/sampling.ts): which settings apply to full-canvas,
 * block and Dream decoding, the family defaults, the 400s that name a setting a model cannot honour, what
 * the serving layer says about a block or Dream model (/v1/models, the usage's `diffusion`, snapshots) and
 * where each family's answers end, over the fake engine made to report a family, phases and provisional
 * tokens. The same through the native engine on
 * real tiny models of each family: test/families-serving.test.ts.
 */
import { readFileSync } from "node:fs"
import { mkdtemp, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Either, Layer, ParseResult, Schema } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import * as Sampling from "../src/config/sampling.js"
import { Engine, type EngineShape, familyOf, type StepResult } from "../src/engine/Engine.js"
import { makeFake } from "../src/engine/EngineTest.js"
import { embeddedModelDir } from "../src/config/package.js"
import { makeModel } from "../src/model/makeModel.js"
import { fromEngine } from "../src/server/ModelHost.js"
import * as Tokenizer from "../src/tokenizer/Tokenizer.js"
import { kvPositions } from "../src/telemetry/kvReuse.js"
import { parseSse, startServer, startServerWith, type TestServer, tinyTokenizer } from "./openai-support.js"

const families = Object.fromEntries(Sampling.knownFamilies.map((family) => [family.name, family]))
const llada = families["llada"]!
const llada2 = families["llada2_moe"]!
const sdar = families["sdar"]!
const dream = families["dream"]!
const serverDefaults: Sampling.EngineDefaults = {
  maxTokens: 16,
  steps: 0,
  blockLength: 32,
  remasking: "low_confidence",
  cfgScale: 0,
  temperature: 0,
  parallelThreshold: 0,
  parallelFactor: 0,
  earlyStop: true,
  kvCache: "none"
}

describe("settings by family", () => {
  it("leaves LLaDA's settings as they were: no editing fields, the server's defaults", () => {
    const params = Sampling.resolve({}, serverDefaults, 16, llada) as unknown as Record<string, unknown>
    expect(params).toEqual(Sampling.resolve({}, serverDefaults, 16) as unknown as Record<string, unknown>)
    expect(params).toMatchObject({ genLength: 16, steps: 16, blockLength: 16, parallelThreshold: 0, kvCache: "none", earlyStop: true })
    expect(params).not.toHaveProperty("editingThreshold")
    expect(params).not.toHaveProperty("maxPostSteps")
    expect(Sampling.familyViolation({ cfg_scale: 1.5, remasking: "random", kv_cache: "dual", block_length: 7 }, llada)).toBeUndefined()
    expect(Sampling.familyViolation({ editing_threshold: 0.5 }, llada)).toMatchObject({ param: "editing_threshold" })
  })

  it("gives block models their family's defaults: the trained block, steps = block_length per block, threshold 0.95, the exact prefix cache", () => {
    const params = Sampling.resolve({}, serverDefaults, 10, sdar) as unknown as Record<string, unknown>
    expect(params).toMatchObject({
      genLength: 10,
      steps: 4,
      blockLength: 4,
      parallelThreshold: 0.95,
      kvCache: "prefix",
      remasking: "low_confidence",
      cfgScale: 0
    })
    // Settings that do not apply are left out (off), whatever the server's default.
    expect(params).not.toHaveProperty("parallelFactor")
    expect(params).not.toHaveProperty("earlyStop")
    expect(params).not.toHaveProperty("editingThreshold")
    const two = Sampling.resolve({}, { ...serverDefaults, cfgScale: 2, parallelFactor: 1 }, 64, llada2) as unknown as Record<
      string,
      unknown
    >
    expect(two).toMatchObject({ steps: 32, blockLength: 32, parallelThreshold: 0.95, kvCache: "prefix", cfgScale: 0, maxPostSteps: 16 })
    expect(two).not.toHaveProperty("parallelFactor")
    expect(two).not.toHaveProperty("editingThreshold")
  })

  it("takes a request's values, and the server's where they differ from the documented default", () => {
    const request = { diffusion_steps: 2, parallel_threshold: 0, kv_cache: "none", temperature: 0.7, top_k: 5 } as const
    expect(Sampling.resolve(request, serverDefaults, 16, sdar)).toMatchObject({
      steps: 2,
      parallelThreshold: 0,
      kvCache: "none",
      temperature: 0.7,
      topK: 5
    })
    // More steps than the block has positions: one token a step.
    expect(Sampling.resolve({ diffusion_steps: 9 }, serverDefaults, 16, sdar)).toMatchObject({ steps: 4 })
    expect(Sampling.resolve({}, { ...serverDefaults, parallelThreshold: 0.8, steps: 2 }, 16, sdar)).toMatchObject({
      parallelThreshold: 0.8,
      steps: 2
    })
    // The server's block length is LLaDA's; a block model always takes its own.
    expect(Sampling.resolve({}, { ...serverDefaults, blockLength: 8 }, 16, sdar)).toMatchObject({ blockLength: 4 })
    // A server cache mode the family cannot take leaves the family default.
    expect(Sampling.resolve({}, { ...serverDefaults, kvCache: "dual" }, 16, sdar)).toMatchObject({ kvCache: "prefix" })
    // Editing: only where a request asks for it.
    expect(Sampling.resolve({ editing_threshold: 0.5, max_post_steps: 4 }, serverDefaults, 64, llada2)).toMatchObject({
      editingThreshold: 0.5,
      maxPostSteps: 4
    })
  })

  it("names the setting a block model cannot honour", () => {
    const misfit = (request: Sampling.SamplingRequest, family = sdar) => Sampling.familyViolation(request, family)
    expect(misfit({ cfg_scale: 1.5 })).toEqual({
      param: "cfg_scale",
      message: "cfg_scale does not apply to this model (sdar, block decoding): it is a setting of full-canvas decoding (LLaDA)"
    })
    expect(misfit({ editing_threshold: 0.5 })).toEqual({
      param: "editing_threshold",
      message:
        "editing_threshold does not apply to this model (sdar, block decoding): it needs a model with token editing (LLaDA2.1's llada2_moe)"
    })
    expect(misfit({ max_post_steps: 3 })?.param).toBe("max_post_steps")
    expect(misfit({ block_length: 32 })).toEqual({
      param: "block_length",
      message: "block_length must be 4, the block length this model (sdar) was trained with, got 32"
    })
    expect(misfit({ block_length: 8 }, llada2)?.param).toBe("block_length")
    expect(misfit({ kv_cache: "dual" })?.param).toBe("kv_cache")
    expect(misfit({ remasking: "random" })?.param).toBe("remasking")
    expect(misfit({ parallel_factor: 1 })?.param).toBe("parallel_factor")
    expect(misfit({ early_stop: false })?.param).toBe("early_stop")
    // Neutral values change nothing, and the model's own block length is its default.
    expect(misfit({ cfg_scale: 0, remasking: "low_confidence", parallel_factor: 0, early_stop: true, block_length: 4 })).toBeUndefined()
    expect(misfit({ editing_threshold: 0, max_post_steps: 0, block_length: 32, kv_cache: "none" }, llada2)).toBeUndefined()
    expect(misfit({ editing_threshold: 0.5, diffusion_steps: 8 }, llada2)?.param).toBe("diffusion_steps")
    expect(misfit({ diffusion_steps: 8 }, llada2)).toBeUndefined()
  })

  it("gives Dream models Dream's sampler: entropy at alg_temp 0, eps 1e-3, steps = max_tokens, neutral values for LLaDA's settings", () => {
    expect(dream).toEqual({ name: "dream", decoding: "dream", blockLength: 0, editing: false })
    const params = Sampling.resolve({}, serverDefaults, 16, dream) as unknown as Record<string, unknown>
    expect(params).toEqual({
      genLength: 16,
      steps: 16,
      // Not read by Dream decoding; the whole answer is one block.
      blockLength: 16,
      remasking: "low_confidence",
      cfgScale: 0,
      temperature: 0,
      topK: 0,
      topP: 1,
      presencePenalty: 0,
      frequencyPenalty: 0,
      repetitionPenalty: 1,
      alg: "entropy",
      algTemp: 0,
      eps: 0.001
    })
    // A server tuned for LLaDA (a cache, a parallel rule, guidance, its block) hands none of it to Dream.
    const tuned = {
      ...serverDefaults,
      blockLength: 8,
      kvCache: "prefix",
      cfgScale: 2,
      parallelThreshold: 0.9,
      minP: 0.1,
      remasking: "random"
    }
    expect(Sampling.resolve({}, tuned as Sampling.EngineDefaults, 16, dream)).toEqual(params)
    expect(Sampling.resolve({}, { ...serverDefaults, parallelFactor: 1 }, 16, dream)).toEqual(params)
    // The server's Dream defaults and a request's values.
    expect(Sampling.resolve({}, { ...serverDefaults, alg: "maskgit_plus", algTemp: 0.5, eps: 0.01, steps: 4 }, 16, dream)).toMatchObject({
      alg: "maskgit_plus",
      algTemp: 0.5,
      eps: 0.01,
      steps: 4
    })
    const request = { alg: "topk_margin", alg_temp: 0.2, eps: 0.05, diffusion_steps: 40, temperature: 0.7, top_p: 0.9, top_k: 5 } as const
    expect(Sampling.resolve(request, serverDefaults, 16, dream)).toMatchObject({
      alg: "topk_margin",
      algTemp: 0.2,
      eps: 0.05,
      // More steps than tokens: Dream runs them (the extra ones commit nothing).
      steps: 40,
      temperature: 0.7,
      topP: 0.9,
      topK: 5
    })
    // The other families never get Dream's settings.
    for (const family of [llada, sdar, llada2]) {
      const other = Sampling.resolve({}, { ...serverDefaults, alg: "origin", algTemp: 1, eps: 0.1 }, 16, family)
      expect(other).not.toHaveProperty("alg")
      expect(other).not.toHaveProperty("algTemp")
      expect(other).not.toHaveProperty("eps")
    }
  })

  it("names the setting a Dream model cannot honour, and Dream's settings on the other families", () => {
    const misfit = (request: Sampling.SamplingRequest, family = dream) => Sampling.familyViolation(request, family)
    expect(misfit({ cfg_scale: 1.5 })).toEqual({
      param: "cfg_scale",
      message: "cfg_scale does not apply to this model (dream, Dream decoding): it is a setting of full-canvas decoding (LLaDA)"
    })
    expect(misfit({ kv_cache: "prefix" })).toEqual({
      param: "kv_cache",
      message:
        "kv_cache does not apply to this model (dream, Dream decoding): it is a setting of full-canvas decoding (LLaDA) and block decoding (LLaDA2.x, SDAR)"
    })
    for (const [field, value] of [
      ["block_length", 4],
      ["remasking", "random"],
      ["parallel_threshold", 0.9],
      ["parallel_factor", 1],
      ["min_p", 0.1],
      ["early_stop", false],
      ["editing_threshold", 0.5],
      ["max_post_steps", 2]
    ] as const) {
      expect(misfit({ [field]: value })?.param, field).toBe(field)
    }
    // Neutral values change nothing; Dream's own settings fit.
    expect(
      misfit({
        cfg_scale: 0,
        remasking: "low_confidence",
        kv_cache: "none",
        parallel_threshold: 0,
        parallel_factor: 0,
        min_p: 0,
        early_stop: true,
        alg: "origin",
        alg_temp: 1,
        eps: 0.5,
        diffusion_steps: 3,
        top_k: 3,
        top_p: 0.5,
        temperature: 1
      })
    ).toBeUndefined()
    expect(misfit({ alg: "entropy" }, llada)).toEqual({
      param: "alg",
      message: "alg does not apply to this model (llada, full-canvas decoding): it is a setting of Dream decoding (Dream)"
    })
    expect(misfit({ alg_temp: 0 }, sdar)?.param).toBe("alg_temp")
    expect(misfit({ eps: 0.001 }, llada2)?.param).toBe("eps")
  })

  it("checks Dream's request fields' values", () => {
    const decode = Schema.decodeUnknownEither(Schema.Struct(Sampling.requestFields))
    const message = (body: Record<string, unknown>) =>
      Either.match(decode(body), { onLeft: (e) => ParseResult.TreeFormatter.formatErrorSync(e), onRight: () => "ok" })
    expect(message({ alg: "maskgit_plus", alg_temp: 0, eps: 0.5 })).toBe("ok")
    expect(message({ alg: "random" })).toContain('alg must be "origin", "maskgit_plus", "topk_margin" or "entropy"')
    expect(message({ alg_temp: -1 })).toContain("alg_temp must be a number >= 0")
    expect(message({ eps: 0 })).toContain("eps must be a number greater than 0 and less than 1")
    expect(message({ eps: 1 })).toContain("eps must be a number greater than 0 and less than 1")
    expect(message({ eps: 0.999 })).toBe("ok")
  })

  it("is documented in README.md's Model families table, generated from the table", () => {
    const readme = readFileSync(join(import.meta.dirname, "..", "README.md"), "utf8").split("\n")
    const start = readme.indexOf("## Model families")
    expect(start, 'README.md has a "## Model families" section').toBeGreaterThanOrEqual(0)
    const header = Sampling.familiesMarkdown().split("\n")[0]!
    const first = readme.findIndex((line, i) => i > start && line === header)
    expect(first, "the settings table follows the heading").toBeGreaterThan(start)
    const end = readme.findIndex((line, i) => i > first && !line.startsWith("|"))
    expect(readme.slice(first, end).join("\n")).toBe(Sampling.familiesMarkdown())
    for (const field of Object.keys({ ...Sampling.samplingSettings, ...Sampling.requestOnlySettings })) {
      expect(Sampling.familiesMarkdown()).toContain(`| \`${field}\` |`)
    }
  })
})

describe("KV reuse", () => {
  const settings = { genLength: 10, blockLength: 4, kvCache: "prefix" as const, cfgScale: 0 }
  it("counts block decoding's cached prefix: the prompt's whole blocks, then every finished block", () => {
    const sequence = { promptLength: 6, suffixLength: 0, settings }
    // P = 6, B = 4: prefill [0, 4); the first open block is block 1 (positions 4..7, the prompt's tail 4, 5).
    expect(kvPositions(sdar, sequence, { phase: "prefill", block: 0, refreshed: false })).toEqual({ attended: 4, reused: 0 })
    expect(kvPositions(sdar, sequence, { phase: "denoise", block: 0, refreshed: false })).toEqual({ attended: 8, reused: 4 })
    expect(kvPositions(sdar, sequence, { phase: "commit", block: 2, refreshed: false })).toEqual({ attended: 16, reused: 12 })
    const none = { ...sequence, settings: { ...settings, kvCache: "none" as const } }
    expect(kvPositions(sdar, none, { phase: "denoise", block: 2, refreshed: false })).toEqual({ attended: 16, reused: 0 })
  })

  it("counts the prompt blocks a prefill copied from the prefix cache, and a prefill in chunks, as reused", () => {
    // Prompt 22 with blocks of 4: five whole blocks [0, 20); the prefix cache held [0, 8); chunks of 8.
    const sequence = { promptLength: 22, suffixLength: 0, settings }
    const step = { phase: "prefill" as const, block: 0, refreshed: false, promptCached: 8 }
    expect(kvPositions(sdar, sequence, { ...step, positionsComputed: 8, computed: 8 })).toEqual({ attended: 16, reused: 8 })
    expect(kvPositions(sdar, sequence, { ...step, positionsComputed: 12, computed: 4 })).toEqual({ attended: 20, reused: 16 })
    // Without the counts: the whole prefill in one forward, after what was copied.
    expect(kvPositions(sdar, sequence, step)).toEqual({ attended: 20, reused: 8 })
  })

  it("counts LLaDA's approximate caches between refreshes", () => {
    const sequence = { promptLength: 6, suffixLength: 2, settings: { ...settings, blockLength: 5 } }
    expect(kvPositions(llada, sequence, { phase: "denoise", block: 1, refreshed: true })).toEqual({ attended: 18, reused: 0 })
    expect(kvPositions(llada, sequence, { phase: "denoise", block: 1, refreshed: false })).toEqual({ attended: 18, reused: 11 })
    const dual = { ...sequence, settings: { ...sequence.settings, kvCache: "dual" as const, cfgScale: 1 } }
    expect(kvPositions(llada, dual, { phase: "denoise", block: 1, refreshed: false })).toEqual({ attended: 36, reused: 26 })
  })
})

// ---- the serving layer over an engine that reports a block family --------------------------------------

/** The fake engine as a block model: its info names the family; its steps a phase and provisional tokens. */
const blockEngine = (family: Sampling.ModelFamily) => {
  const fake = makeFake()
  let steps = 0
  const engine: EngineShape = {
    ...fake,
    info: { ...fake.info, family } as EngineShape["info"],
    step: (ids) =>
      Effect.map(fake.step(ids), (results) =>
        results.map((r): StepResult => {
          steps++
          // The first step of every sequence is its prefill; with editing, a token past the committed one is provisional.
          const phase = r.stepsDone === 1 ? "prefill" : r.committed.length === 0 ? "commit" : "denoise"
          const next = r.committed[r.committed.length - 1]
          const provisional = family.editing && next !== undefined ? [{ position: next.position + 1, token: 5, probability: 0.5 }] : []
          return { ...r, phase, provisional } as StepResult
        })
      )
  }
  return { engine, fake, steps: () => steps }
}

describe.each([
  ["sdar", sdar],
  ["llada2_moe", llada2]
] as const)("serving a %s model", (name, family) => {
  let server: TestServer<EngineShape>
  let fake: ReturnType<typeof makeFake>
  beforeAll(async () => {
    const made = blockEngine(family)
    const engine = made.engine
    fake = made.fake
    expect(familyOf(engine.info)).toEqual(family)
    server = await startServerWith({
      engine,
      engineLayer: Layer.succeed(Engine, engine),
      tokenizer: await tinyTokenizer(),
      config: { family, defaults: serverDefaults }
    })
  })
  afterAll(() => server?.close())

  it("names the family in /v1/models", async () => {
    const models = (await (await fetch(`${server.url}/v1/models`)).json()) as { data: Array<Record<string, unknown>> }
    expect(models.data[0]!["family"]).toEqual({ name, decoding: "block", block_length: family.blockLength, editing: family.editing })
  })

  it("answers 400 naming what the model cannot honour", async () => {
    const refused = async (body: Record<string, unknown>, path = "/v1/completions") => {
      const response = await server.post(path, { prompt: "Hello", max_tokens: 4, ...body })
      expect(response.status).toBe(400)
      return ((await response.json()) as { error: { param: string; message: string; type: string } }).error
    }
    expect(await refused({ cfg_scale: 1 })).toMatchObject({ param: "cfg_scale", type: "invalid_request_error" })
    expect((await refused({ block_length: family.blockLength * 2 })).param).toBe("block_length")
    expect((await refused({ kv_cache: "dual" })).param).toBe("kv_cache")
    expect((await refused({ suffix: " world" })).param).toBe("suffix")
    if (!family.editing) expect((await refused({ editing_threshold: 0.5 })).param).toBe("editing_threshold")
  })

  it("lays structured output and tool calls on the canvas as for full-canvas models: the engine gets the template", async () => {
    const schema = { type: "object", properties: { a: { type: "string" }, ok: { type: "boolean" } } }
    const messages = [{ role: "user", content: "Hello" }]
    const answered = async (body: Record<string, unknown>, path = "/v1/chat/completions") => {
      const response = await server.post(path, { max_tokens: undefined, ...body })
      expect(response.status, await response.clone().text()).toBe(200)
      const created = fake.created.at(-1) as { template?: ReadonlyArray<number> } | undefined
      expect(created?.template).toBeDefined()
      return (await response.json()) as any
    }
    const chat = await answered({ messages, response_format: { type: "json_schema", json_schema: { name: "x", schema } } })
    expect(Object.keys(JSON.parse(chat.choices[0].message.content))).toEqual(["a", "ok"])
    const completion = await answered({ prompt: "Hello", guided_json: schema }, "/v1/completions")
    expect(Object.keys(JSON.parse(completion.choices[0].text))).toEqual(["a", "ok"])
    const response = await answered({ input: "Hello", text: { format: { type: "json_schema", name: "x", schema } } }, "/v1/responses")
    expect(Object.keys(JSON.parse(response.output[0].content[0].text))).toEqual(["a", "ok"])
    const call = await answered({
      messages,
      tools: [{ type: "function", function: { name: "f", parameters: schema } }],
      tool_choice: "required"
    })
    expect(call.choices[0].message.tool_calls[0].function.name).toBe("f")
    expect(Object.keys(JSON.parse(call.choices[0].message.tool_calls[0].function.arguments))).toEqual(["a", "ok"])
  })

  it("hands the engine the family's settings and reports the forwards by phase", async () => {
    // A fixed seed: the fake engine's tokens follow it, and an unlucky one writes an end token early.
    const body = { prompt: "Hello", max_tokens: 6, seed: 42, ...(family.editing ? { editing_threshold: 0.5 } : {}) }
    const response = await server.post("/v1/completions", body)
    expect(response.status).toBe(200)
    const json = (await response.json()) as { diffusion: Record<string, unknown> }
    expect(json.diffusion).toMatchObject({
      decoding: "block",
      block_length: family.blockLength,
      kv_cache: "prefix",
      parallel: { threshold: 0.95 },
      editing: family.editing ? { threshold: 0.5, max_post_steps: 16 } : null
    })
    const forwards = json.diffusion["forwards"] as Record<string, number>
    // The fake engine commits one token a step; its first step reports the prefill.
    expect(forwards).toEqual({ prefill: 1, denoise: 5, commit: 0 })
    expect(json.diffusion["tokens_per_forward"]).toBe(1)
    const settings = fake.created[fake.created.length - 1]!.settings as unknown as Record<string, unknown>
    expect(settings).toMatchObject({
      genLength: 6,
      blockLength: family.blockLength,
      steps: family.blockLength,
      parallelThreshold: 0.95,
      kvCache: "prefix",
      cfgScale: 0
    })
    expect(settings["editingThreshold"]).toBe(family.editing ? 0.5 : undefined)
  })

  it("marks the phase and, with editing, the provisional tokens in snapshots", async () => {
    const response = await server.post("/v1/completions", {
      prompt: "Hello",
      max_tokens: 3,
      stream: true,
      stream_options: { include_snapshots: true },
      ...(family.editing ? { editing_threshold: 0.5 } : {})
    })
    const snapshots = parseSse(await response.text())
      .filter((e): e is { choices: Array<{ snapshot?: Record<string, unknown> }> } => typeof e === "object")
      .flatMap((e) => e.choices.flatMap((c) => (c.snapshot === undefined ? [] : [c.snapshot])))
    expect(snapshots.map((s) => s["phase"])).toEqual(["prefill", "denoise", "denoise"])
    if (family.editing) {
      // After the first step position 0 is committed and position 1 provisional: shown, not masked.
      expect(snapshots[0]).toMatchObject({ provisional: [1], masked: 1, committed_now: [0] })
      expect((snapshots[0]!["canvas"] as Array<string>)[1]).not.toBe("<mask>")
      // Past the answer's end nothing is shown.
      expect(snapshots[2]).toMatchObject({ provisional: [], masked: 0 })
    } else {
      for (const snapshot of snapshots) expect(snapshot).not.toHaveProperty("provisional")
    }
  })
})

describe("a block model that stops at one of its own end tokens", () => {
  // The engine stops after the block that holds an end token of the model's config (here " night", which
  // the tokenizer does not know as an end): later blocks are never committed.
  const serve = async (endTokenIds: ReadonlyArray<number> | undefined) =>
    startServer({
      script: (tokenizer) => {
        const night = tokenizer.encode(" night", { addSpecialTokens: false })
        expect(night).toHaveLength(1)
        return {
          answer: (_prompt, settings) => {
            const tokens = tokenizer.encode("Hello world night Good", { addSpecialTokens: false })
            return Array.from({ length: settings.genLength }, (_, i) => tokens[i % tokens.length]!)
          },
          schedule: () => [
            [0, 1],
            [2, 3]
          ],
          endTokens: night
        }
      },
      config: { family: sdar, defaults: serverDefaults, ...(endTokenIds === undefined ? {} : { endTokenIds }) }
    })

  it("ends the answer there, with the text before it", async () => {
    const tokenizer = await tinyTokenizer()
    const [night] = tokenizer.encode(" night", { addSpecialTokens: false })
    const server = await serve([night!])
    try {
      const response = await server.post("/v1/completions", { prompt: "Hello", max_tokens: 8 })
      expect(response.status).toBe(200)
      const json = (await response.json()) as { choices: Array<{ text: string; finish_reason: string }>; usage: Record<string, number> }
      expect(json.choices[0]).toMatchObject({ text: "Hello world", finish_reason: "stop" })
      expect(json.usage["completion_tokens"]).toBe(2)
    } finally {
      await server.close()
    }
  })

  it("cannot end an answer whose end token it is not told (the control)", async () => {
    const server = await serve(undefined)
    try {
      const response = await server.post("/v1/completions", { prompt: "Hello", max_tokens: 8 })
      expect(response.status).toBe(500)
    } finally {
      await server.close()
    }
  })
})

describe("serving a Dream model", () => {
  // The fake engine reporting the Dream family: every step a full-canvas denoise step.
  let server: TestServer<EngineShape>
  let fake: ReturnType<typeof makeFake>
  beforeAll(async () => {
    fake = makeFake()
    const engine: EngineShape = { ...fake, info: { ...fake.info, family: dream } as EngineShape["info"] }
    expect(familyOf(engine.info)).toEqual(dream)
    server = await startServerWith({
      engine,
      engineLayer: Layer.succeed(Engine, engine),
      tokenizer: await tinyTokenizer(),
      config: { family: dream, defaults: { ...serverDefaults, kvCache: "prefix", blockLength: 8 } }
    })
  })
  afterAll(() => server?.close())

  it("names the family in /v1/models", async () => {
    const models = (await (await fetch(`${server.url}/v1/models`)).json()) as { data: Array<Record<string, unknown>> }
    expect(models.data[0]!["family"]).toEqual({ name: "dream", decoding: "dream", block_length: 0, editing: false })
  })

  it("hands the engine Dream's settings and reports them in the usage's diffusion object", async () => {
    const response = await server.post("/v1/completions", { prompt: "Hello", max_tokens: 6 })
    expect(response.status).toBe(200)
    const json = (await response.json()) as { diffusion: Record<string, unknown> }
    expect(json.diffusion).toMatchObject({
      decoding: "dream",
      dream: { alg: "entropy", alg_temp: 0, eps: 0.001 },
      steps: 6,
      kv_cache: "none",
      parallel: null
    })
    expect(json.diffusion).not.toHaveProperty("block_length")
    const settings = fake.created[fake.created.length - 1]!.settings as unknown as Record<string, unknown>
    expect(settings).toMatchObject({ genLength: 6, steps: 6, blockLength: 6, alg: "entropy", algTemp: 0, eps: 0.001, cfgScale: 0 })
    expect(settings).not.toHaveProperty("kvCache")
    const chosen = await server.post("/v1/chat/completions", {
      messages: [{ role: "user", content: "Hello" }],
      max_tokens: 4,
      alg: "maskgit_plus",
      alg_temp: 0.5,
      eps: 0.01
    })
    expect(chosen.status).toBe(200)
    expect(((await chosen.json()) as { diffusion: Record<string, unknown> }).diffusion["dream"]).toEqual({
      alg: "maskgit_plus",
      alg_temp: 0.5,
      eps: 0.01
    })
    expect(fake.created[fake.created.length - 1]!.settings).toMatchObject({ alg: "maskgit_plus", algTemp: 0.5, eps: 0.01 })
  })

  it("answers 400 naming what the model cannot honour", async () => {
    const refused = async (body: Record<string, unknown>, path = "/v1/completions") => {
      const response = await server.post(path, { prompt: "Hello", max_tokens: 4, ...body })
      expect(response.status).toBe(400)
      return ((await response.json()) as { error: { param: string; message: string; type: string } }).error
    }
    expect(await refused({ cfg_scale: 1 })).toMatchObject({ param: "cfg_scale", type: "invalid_request_error" })
    for (const body of [
      { block_length: 4 },
      { kv_cache: "prefix" },
      { parallel_threshold: 0.9 },
      { min_p: 0.1 },
      { remasking: "random" }
    ]) {
      expect((await refused(body)).param).toBe(Object.keys(body)[0])
    }
    expect((await refused({ eps: 1 })).param).toBe("eps")
    expect(await refused({ suffix: " world" })).toMatchObject({
      param: "suffix",
      message: expect.stringContaining("(dream, Dream decoding)")
    })
  })

  it("lays structured output on the canvas: the engine gets the template", async () => {
    const schema = { type: "object", properties: { a: { type: "string" } } }
    const response = await server.post("/v1/responses", { input: "Hello", text: { format: { type: "json_schema", name: "x", schema } } })
    expect(response.status).toBe(200)
    const body = (await response.json()) as any
    expect(Object.keys(JSON.parse(body.output[0].content[0].text))).toEqual(["a"])
    expect((fake.created.at(-1) as { template?: ReadonlyArray<number> }).template).toBeDefined()
  })
})

describe("Dream's settings on a LLaDA server", () => {
  let server: TestServer
  beforeAll(async () => {
    server = await startServer()
  })
  afterAll(() => server?.close())

  it("answers 400 naming alg, alg_temp and eps", async () => {
    for (const body of [{ alg: "entropy" }, { alg_temp: 0.5 }, { eps: 0.01 }]) {
      const response = await server.post("/v1/completions", { prompt: "Hello", max_tokens: 4, ...body })
      expect(response.status).toBe(400)
      const error = ((await response.json()) as { error: { param: string; message: string } }).error
      expect(error.param).toBe(Object.keys(body)[0])
      expect(error.message).toContain("it is a setting of Dream decoding (Dream)")
    }
  })
})

describe("where an answer of each family ends", () => {
  // The serving config that ModelHost builds from the engine's family and the model directory's files.
  const endTokensOf = async (preset: string | undefined, family: Sampling.ModelFamily | undefined, engineEnds: ReadonlyArray<number>) => {
    const made = await mkdtemp(join(tmpdir(), "vdiff-ends-"))
    // A preset's directory, or the embedded (LLaDA) model's.
    const dir = preset === undefined ? embeddedModelDir() : made
    try {
      if (preset !== undefined) await makeModel({ preset, seed: 1, out: dir })
      const fake = makeFake()
      const info =
        family === undefined
          ? fake.info
          : { ...fake.info, family: { ...family, eosTokenId: engineEnds[0], stopTokenIds: engineEnds.slice(1) } }
      const engine: EngineShape = { ...fake, info: info as EngineShape["info"] }
      const program = Effect.gen(function* () {
        const tokenizer = yield* Tokenizer.make(dir)
        const loaded = yield* fromEngine(engine, tokenizer, {
          modelName: preset ?? "embedded",
          scheduler: { maxConcurrent: 1, queueCapacity: 1, maxBatchTokens: 1_000, requestTimeoutMs: 0 },
          defaults: serverDefaults
        })
        return loaded.serving.endTokenIds
      })
      return await Effect.runPromise(Effect.scoped(program))
    } finally {
      await rm(made, { recursive: true, force: true })
    }
  }

  it("Dream: its <|endoftext|> and its chat template's turn end <|im_end|>", async () => {
    // dream-tiny: <|endoftext|> 2042 (config.json's eos_token_id), <|im_end|> 2044.
    expect(await endTokensOf("dream-tiny", dream, [2042])).toEqual([2042, 2044])
  })

  it("block models: the engine's and config.json's end tokens (SDAR's list holds <|im_end|> already)", async () => {
    expect(await endTokensOf("sdar-tiny", sdar, [2045, 2043])).toEqual([2045, 2043])
    expect(await endTokensOf("llada2-tiny", llada2, [2043])).toEqual([2043])
  })

  it("LLaDA: none beyond the tokenizer's, as before", async () => {
    expect(await endTokensOf(undefined, undefined, [])).toBeUndefined()
  })
})
