/**
 * The scheduler over the real native engine, on the golden fixture models: batching must not change
 * answers, and cancellation, deadlines and drain must leave the engine with no live sequence.
 */
import { describe, expect, it } from "@effect/vitest"
import { Chunk, Effect, Either, Fiber, Layer, Stream, TestClock } from "effect"
import { join } from "node:path"
import * as Engine from "../src/engine/Engine.js"
import * as Scheduler from "../src/scheduler/Scheduler.js"
import { engineSettingsOf, type GoldenCase, goldenCases, goldenDir } from "./support/golden.js"

const golden = goldenCases

const settingsOf = engineSettingsOf

const layerFor = (model: string, options: Partial<Scheduler.SchedulerOptions> = {}, engine: Partial<Engine.EngineOptions> = {}) =>
  Layer.provideMerge(
    Scheduler.layer({
      maxConcurrent: 8,
      queueCapacity: 64,
      maxBatchTokens: 1 << 20,
      requestTimeoutMs: 0,
      ...options
    }),
    Engine.layer({ modelDir: join(goldenDir, model), threads: 2, ...engine })
  )

describe("Scheduler on the native engine", () => {
  for (const model of ["plain", "gqa", "odd"]) {
    it.live(`${model}: every golden case gives the reference answer, alone and all batched together`, () =>
      Effect.gen(function* () {
        const scheduler = yield* Scheduler.Scheduler
        const cases = golden(model)
        const alone = yield* Effect.forEach(cases, (c) => scheduler.generate({ prompt: c.prompt, settings: settingsOf(c) }))
        const together = yield* Effect.forEach(cases, (c) => scheduler.generate({ prompt: c.prompt, settings: settingsOf(c) }), {
          concurrency: "unbounded"
        })
        cases.forEach((c, i) => {
          expect(alone[i]!.choices[0]!.tokens, c.name).toEqual(c.answer)
          expect(together[i]!.choices[0]!.tokens, c.name).toEqual(c.answer)
        })
        const stats = yield* scheduler.stats
        // The concurrent round really ran batched.
        expect(stats.averageBatchSize).toBeGreaterThan(1.5)
        const engine = yield* Engine.Engine
        expect(yield* engine.live).toBe(0)
      }).pipe(Effect.provide(layerFor(model)))
    )
  }

  it.live("a KV cache the budget has no room for waits for running requests; one that can never fit fails", () =>
    Effect.gen(function* () {
      const c = golden("plain")[0]!
      const settings: Engine.SamplingSettings = { ...settingsOf(c), kvCache: "prefix" }
      const probe = yield* Engine.make({ modelDir: join(goldenDir, "plain"), threads: 1 })
      // Room for exactly one sequence's cache.
      const budget = probe.info.kvCacheBytesPerPosition * (c.prompt.length + c.params.gen_length)
      expect(budget).toBeGreaterThan(0)
      yield* Effect.gen(function* () {
        const scheduler = yield* Scheduler.Scheduler
        const alone = yield* scheduler.generate({ prompt: c.prompt, settings })
        const together = yield* Effect.forEach([0, 1, 2], () => scheduler.generate({ prompt: c.prompt, settings }), {
          concurrency: "unbounded"
        })
        for (const result of together) expect(result.choices[0]!.tokens).toEqual(alone.choices[0]!.tokens)
        // They ran one after the other: the budget, not the batch size, kept them apart.
        expect((yield* scheduler.stats).averageBatchSize).toBe(1)
        const tooBig = yield* Effect.either(scheduler.generate({ prompt: c.prompt, settings, n: 2 }))
        expect(Either.isLeft(tooBig) && tooBig.left._tag === "EngineFailure" && tooBig.left.code).toBe("VDIFF_OUT_OF_MEMORY")
        // Uncached requests need no budget and still batch.
        const plain = yield* scheduler.generate({ prompt: c.prompt, settings: settingsOf(c), n: 2 })
        expect(plain.choices[0]!.tokens).toEqual(c.answer)
        expect(yield* (yield* Engine.Engine).live).toBe(0)
      }).pipe(Effect.provide(layerFor("plain", {}, { kvCacheBudgetBytes: budget })))
    })
  )

  it.live("n answers at temperature > 0 differ by seed and repeat for the same seed", () =>
    Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const c = golden("plain")[1]!
      const settings = { ...settingsOf(c, 42), temperature: 1.5 }
      const first = yield* scheduler.generate({ prompt: c.prompt, settings, n: 4 })
      const again = yield* scheduler.generate({ prompt: c.prompt, settings, n: 4 })
      expect(again.choices.map((x) => x.tokens)).toEqual(first.choices.map((x) => x.tokens))
      const distinct = new Set(first.choices.map((x) => x.tokens.join(",")))
      expect(distinct.size).toBeGreaterThan(1)
    }).pipe(Effect.provide(layerFor("plain")))
  )

  it.live("a consumer that goes away cancels its sequence while the others finish unaffected", () =>
    Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const engine = yield* Engine.Engine
      const cases = golden("plain")
      const long: GoldenCase = { ...cases[0]!, params: { ...cases[0]!.params, gen_length: 200, block_length: 8, steps: 200 } }
      const others = yield* Effect.fork(
        Effect.forEach(cases.slice(1, 4), (c) => scheduler.generate({ prompt: c.prompt, settings: settingsOf(c) }), {
          concurrency: "unbounded"
        })
      )
      const firstEvents = yield* scheduler
        .generateStream({ prompt: long.prompt, settings: settingsOf(long) })
        .pipe(Stream.take(3), Stream.runCollect)
      expect(Chunk.size(firstEvents)).toBe(3)
      const results = yield* Fiber.join(others)
      results.forEach((r, i) => expect(r.choices[0]!.tokens).toEqual(cases[i + 1]!.answer))
      while ((yield* engine.live) > 0) yield* Effect.sleep(1)
      const stats = yield* scheduler.stats
      expect(stats.running).toBe(0)
    }).pipe(Effect.provide(layerFor("plain")))
  )

  it.effect("a request past its deadline fails with RequestTimeout (TestClock) and is released", () =>
    Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const engine = yield* Engine.Engine
      const c = golden("plain")[0]!
      const long = { ...settingsOf(c), genLength: 200, blockLength: 8, steps: 200 }
      const fiber = yield* Effect.fork(Effect.either(scheduler.generate({ prompt: c.prompt, settings: long })))
      // Let a few real steps run, then move the clock past the 5 s deadline.
      while ((yield* scheduler.stats).stepsTotal < 2) yield* Effect.promise(() => new Promise((r) => setTimeout(r, 1)))
      yield* TestClock.adjust("6 seconds")
      const result = yield* Fiber.join(fiber)
      expect(Either.isLeft(result) && result.left._tag).toBe("RequestTimeout")
      while ((yield* engine.live) > 0) yield* Effect.promise(() => new Promise((r) => setTimeout(r, 1)))
    }).pipe(Effect.provide(layerFor("plain", { requestTimeoutMs: 5_000 })))
  )

  it.live("queue full → QueueFull; drain finishes in-flight work", () =>
    Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const engine = yield* Engine.Engine
      const c = golden("plain")[1]!
      const inFlight = yield* Effect.fork(
        Effect.forEach([0, 1, 2], () => scheduler.generate({ prompt: c.prompt, settings: settingsOf(c) }), {
          concurrency: "unbounded"
        })
      )
      while ((yield* scheduler.stats).waiting < 2) yield* Effect.sleep(1)
      const refused = yield* Effect.either(scheduler.generate({ prompt: c.prompt, settings: settingsOf(c) }))
      expect(Either.isLeft(refused) && refused.left._tag).toBe("QueueFull")
      yield* scheduler.drain(30_000)
      const results = yield* Fiber.join(inFlight)
      results.forEach((r) => expect(r.choices[0]!.tokens).toEqual(c.answer))
      expect(yield* engine.live).toBe(0)
    }).pipe(Effect.provide(layerFor("plain", { maxConcurrent: 1, queueCapacity: 2 })))
  )
})
