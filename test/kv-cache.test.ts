/**
 * Approximate KV caching through the addon and the Engine service, on the golden fixture models (random
 * weights): a cache refreshed every step is the uncached output exactly; the default schedule refreshes
 * once per block, cuts the computed positions, and frees its memory; the budget refuses caches with the
 * engine's error kinds. The forward itself (exact reads, stale-key semantics, ragged batches) is tested
 * natively in native/src/tests/main.cpp.
 */
import { Effect } from "effect"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import * as Engine from "../src/engine/Engine.js"
import { defaultSettings } from "../src/index.js"
import { type NativeEngine, type NativeSamplingParams, loadAddon } from "../src/engine/native.js"
import { runTogether } from "./support/engine.js"
import { goldenCases, goldenDir, nativeParamsOf } from "./support/golden.js"

const golden = goldenCases

const paramsOf = nativeParamsOf

const load = (model: string, options: { kvCacheBudgetBytes?: number } = {}): Promise<NativeEngine> =>
  loadAddon().loadModel(join(goldenDir, model), { threads: 2, ...options })

describe("KV cache through the addon", () => {
  for (const model of ["plain", "gqa", "odd"]) {
    it(`${model}: prefix and dual refreshed every step equal no cache exactly, in one batch`, async () => {
      const engine = await load(model)
      const cases = golden(model)
      const jobs = cases.flatMap((c) => [
        { prompt: c.prompt, params: paramsOf(c) },
        { prompt: c.prompt, params: paramsOf(c, { kvCache: "prefix", kvRefreshInterval: 1 }) },
        { prompt: c.prompt, params: paramsOf(c, { kvCache: "dual", kvRefreshInterval: 1 }) }
      ])
      const runs = await runTogether(engine, jobs)
      cases.forEach((c, i) => {
        const [none, prefix, dual] = [runs[3 * i]!, runs[3 * i + 1]!, runs[3 * i + 2]!]
        expect(none.answer, c.name).toEqual(c.answer)
        expect(prefix.trace, `${c.name} prefix`).toEqual(none.trace)
        expect(dual.trace, `${c.name} dual`).toEqual(none.trace)
        // Every forward of a cached sequence refreshed it.
        const last = prefix.results[prefix.results.length - 1]!
        expect(last.kvRefreshes).toBe(last.forwardPasses)
      })
      expect(engine.live()).toBe(0)
    })
  }

  it("the default schedule refreshes once per block and computes fewer positions", async () => {
    const engine = await load("plain")
    const c = golden("plain").find((g) => g.name === "blocks")! // 16 tokens in blocks of 4, 2 steps each
    const length = c.prompt.length + c.params.gen_length
    const perPosition = engine.info().kvCacheBytesPerPosition
    expect(perPosition).toBeGreaterThan(0)
    const runs = await runTogether(
      engine,
      (["none", "prefix", "dual"] as const).map((kvCache) => ({ prompt: c.prompt, params: paramsOf(c, { kvCache }) })),
      true
    )
    const info = runs.map((run) => engine.sequenceInfo(run.id))
    for (const [i, run] of runs.entries()) {
      expect(run.answer).not.toContain(95) // no mask left
      expect(info[i]!.forwardPasses).toBe(c.params.steps)
      expect(info[i]!.kvRefreshes).toBe(i === 0 ? 0 : c.params.gen_length / c.params.block_length)
      expect(info[i]!.kvCacheBytes).toBe(0) // freed when it finished
    }
    // Positions computed: none = every step the whole canvas; prefix = a refresh then block + rest;
    // dual = a refresh then the block only.
    const blocks = c.params.gen_length / c.params.block_length
    const stepsPerBlock = c.params.steps / blocks
    let prefix = 0
    for (let b = 0; b < blocks; b++) prefix += length + (stepsPerBlock - 1) * (length - c.prompt.length - 4 * b)
    expect(info.map((s) => s.positionsComputed)).toEqual([c.params.steps * length, prefix, blocks * (length + (stepsPerBlock - 1) * 4)])
    for (const run of runs) engine.release(run.id)
  })

  it("a live sequence reports its cache bytes; the budget refuses more", async () => {
    const probe = await load("plain")
    const perPosition = probe.info().kvCacheBytesPerPosition
    const prompt = [5, 17, 33, 2]
    const params: NativeSamplingParams = {
      genLength: 12,
      blockLength: 4,
      steps: 12,
      temperature: 0,
      remasking: "low_confidence",
      cfgScale: 0,
      seed: 0,
      kvCache: "dual"
    }
    const perSequence = perPosition * (prompt.length + 12)
    const engine = await load("plain", { kvCacheBudgetBytes: 2 * perSequence })
    expect(engine.info().kvCacheBudgetBytes).toBe(2 * perSequence)
    const a = engine.create(prompt, params)
    expect(engine.sequenceInfo(a).kvCacheBytes).toBe(perSequence)
    expect(engine.sequenceInfo(a).memoryBytes).toBeGreaterThan(perSequence)
    const b = engine.create(prompt, params)
    expect(engine.kvCacheBytes()).toBe(2 * perSequence)
    expect(() => engine.create(prompt, params)).toThrow(expect.objectContaining({ code: "VDIFF_OUT_OF_MEMORY" }))
    expect(() => engine.create(prompt, { ...params, genLength: 40 })).toThrow(expect.objectContaining({ code: "VDIFF_INVALID_ARGUMENT" }))
    // A budget below a KiB is shown in bytes.
    const tiny = await load("plain", { kvCacheBudgetBytes: 1000 })
    expect(() => tiny.create(prompt, params)).toThrow(/more than the whole cache budget of 1000 bytes/)
    engine.release(a)
    expect(engine.kvCacheBytes()).toBe(perSequence)
    const c = engine.create(prompt, { ...params, kvCache: "prefix" })
    expect(engine.sequenceInfo(c).kvCacheBytes).toBe(perSequence)
    engine.release(b)
    engine.release(c)
    expect(engine.kvCacheBytes()).toBe(0)
    expect(() => engine.create(prompt, { ...params, kvCache: "full" as "dual" })).toThrow(/kvCache/)
    expect(() => engine.create(prompt, { ...params, kvRefreshInterval: -1 })).toThrow(/kv_refresh_interval/)
  })
})

describe("KV cache through the Engine service", () => {
  it("carries kvCache and reports refreshes; a cache larger than the budget is an InvalidRequestError", async () => {
    const c = golden("gqa").find((g) => g.name === "blocks")!
    const settings: Engine.SamplingSettings = {
      ...defaultSettings,
      genLength: c.params.gen_length,
      blockLength: c.params.block_length,
      steps: c.params.steps,
      eotTokenId: c.params.eot_token_id,
      kvCache: "prefix",
      kvRefreshInterval: 1
    }
    const program = Effect.gen(function* () {
      const engine = yield* Engine.Engine
      const id = yield* engine.create(c.prompt, settings)
      let last: Engine.StepResult | undefined
      while (last === undefined || !last.finished) last = (yield* engine.step([id]))[0]!
      const answer = Array.from(yield* engine.canvas(id))
      yield* engine.release(id)
      const refused = yield* Effect.flip(engine.create(c.prompt, { ...settings, genLength: 200 }))
      return { answer, last, refused }
    })
    const { answer, last, refused } = await Effect.runPromise(
      program.pipe(Effect.provide(Engine.layer({ modelDir: join(goldenDir, "gqa"), threads: 2, kvCacheBudgetBytes: 16 * 1024 })))
    )
    expect(answer).toEqual(c.answer) // refreshed every step: the reference answer
    expect(last.kvRefreshes).toBe(c.params.steps)
    expect(refused._tag).toBe("InvalidRequestError")
  })
})

describe("the prefix cache option", () => {
  it("keeps nothing for a full-canvas model, whose prompt keys depend on the answer; refuses a size that is not a byte count", async () => {
    const engine = await loadAddon().loadModel(join(goldenDir, "plain"), { threads: 1, prefixCacheBytes: 1 << 20 })
    expect(engine.info().prefixCacheBytes).toBe(0)
    expect(engine.prefixCache()).toMatchObject({ capacityBytes: 0, entries: 0, lookups: 0 })
    for (const bad of [-1, 1.5, Number.NaN]) {
      await expect(loadAddon().loadModel(join(goldenDir, "plain"), { prefixCacheBytes: bad })).rejects.toMatchObject({
        code: "VDIFF_INVALID_ARGUMENT",
        message: expect.stringContaining("options.prefixCacheBytes")
      })
    }
  })
})
