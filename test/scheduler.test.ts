import { describe, expect, it } from "@effect/vitest"
import { Chunk, Context, Effect, Either, Exit, Fiber, Layer, Scope, Stream } from "effect"
import type { SamplingSettings } from "../src/engine/Engine.js"
import { layerFake, makeFake, type FakeEngineOptions } from "../src/engine/EngineTest.js"
import * as Scheduler from "../src/scheduler/Scheduler.js"

const settings = (genLength: number, seed = 0): SamplingSettings => ({
  genLength,
  blockLength: genLength,
  steps: genLength,
  temperature: 0,
  remasking: "low_confidence",
  cfgScale: 0,
  seed,
  logitsEosInf: false,
  confidenceEosEotInf: false,
  eotTokenId: -1
})

const defaults: Scheduler.SchedulerOptions = {
  maxConcurrent: 4,
  queueCapacity: 16,
  maxBatchTokens: 100_000,
  requestTimeoutMs: 0
}

const setup = (options: Partial<Scheduler.SchedulerOptions> = {}, engineOptions: FakeEngineOptions = {}) => {
  const engine = makeFake(engineOptions)
  const layer = Scheduler.layer({ ...defaults, ...options }).pipe(Layer.provide(layerFake(engine)))
  return { engine, layer }
}

const waitUntil = (condition: () => boolean) =>
  Effect.gen(function* () {
    while (!condition()) yield* Effect.sleep(1)
  })

describe("Scheduler", () => {
  it.live("runs one request to the end and collects every position", () => {
    const { engine, layer } = setup()
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const result = yield* scheduler.generate({ prompt: [7], settings: settings(5) })
      expect(result.choices).toHaveLength(1)
      expect(result.choices[0]!.tokens).toEqual([7, 8, 9, 10, 11])
      expect(result.choices[0]!.reason).toBe("length")
      expect(result.choices[0]!.steps).toBe(5)
      expect(yield* engine.live).toBe(0)
    }).pipe(Effect.provide(layer))
  })

  it.live("batches concurrent requests into one step and lets late ones join between steps", () => {
    const { engine, layer } = setup({}, { stepMs: 2 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const first = yield* Effect.fork(scheduler.generate({ prompt: [1], settings: settings(20) }))
      yield* waitUntil(() => engine.batches.length >= 3)
      const second = yield* scheduler.generate({ prompt: [2], settings: settings(3) })
      yield* Fiber.join(first)
      expect(second.choices[0]!.tokens).toEqual([2, 3, 4])
      // The second request ran inside steps of the first: some batch held both sequences.
      expect(engine.batches.some((b) => b.length === 2)).toBe(true)
      // ... and it joined after the first had started: the first batches held one sequence only.
      expect(engine.batches[0]).toHaveLength(1)
      expect(engine.batches.length).toBeLessThan(20 + 3)
      const stats = yield* scheduler.stats
      expect(stats.tokensCommitted).toBe(23)
      expect(stats.requestsFinished).toBe(2)
      expect(stats.stepsTotal).toBe(engine.batches.length)
      expect(stats.sequenceStepsTotal).toBe(23)
      expect(stats.averageBatchSize).toBeCloseTo(23 / engine.batches.length)
      expect(stats.averageTokensPerStep).toBe(1)
    }).pipe(Effect.provide(layer))
  })

  it.live("never steps more sequences than max-concurrent, and admits in arrival order", () => {
    const { engine, layer } = setup({ maxConcurrent: 2 }, { stepMs: 1 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const results = yield* Effect.forEach(
        [10, 20, 30, 40, 50],
        (token) => scheduler.generate({ prompt: [token], settings: settings(4) }),
        { concurrency: "unbounded" }
      )
      expect(results.map((r) => r.choices[0]!.tokens[0])).toEqual([10, 20, 30, 40, 50])
      expect(Math.max(...engine.batches.map((b) => b.length))).toBe(2)
      expect(engine.created.map((c) => c.prompt[0])).toEqual([10, 20, 30, 40, 50])
    }).pipe(Effect.provide(layer))
  })

  it.live("runs n answers as n sequences of the same batch with consecutive seeds", () => {
    const { engine, layer } = setup()
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const result = yield* scheduler.generate({ prompt: [100], settings: settings(2, 5), n: 3 })
      expect(result.choices.map((c) => c.tokens)).toEqual([
        [105, 106],
        [106, 107],
        [107, 108]
      ])
      expect(engine.batches[0]).toHaveLength(3)
      const tooMany = yield* Effect.either(scheduler.generate({ prompt: [1], settings: settings(2), n: 5 }))
      expect(Either.isLeft(tooMany) && tooMany.left._tag).toBe("InvalidRequestError")
    }).pipe(Effect.provide(layer))
  })

  it.live("refuses with QueueFull when the admission queue is full", () => {
    const { engine, layer } = setup({ maxConcurrent: 1, queueCapacity: 1 }, { stepMs: 5 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const running = yield* Effect.fork(scheduler.generate({ prompt: [1], settings: settings(10) }))
      yield* waitUntil(() => engine.batches.length >= 1)
      const queued = yield* Effect.fork(scheduler.generate({ prompt: [2], settings: settings(2) }))
      yield* Effect.sleep(5)
      const refused = yield* Effect.either(scheduler.generate({ prompt: [3], settings: settings(2) }))
      expect(Either.isLeft(refused) && refused.left._tag).toBe("QueueFull")
      yield* Fiber.join(running)
      yield* Fiber.join(queued)
      const stats = yield* scheduler.stats
      expect(stats.waiting).toBe(0)
    }).pipe(Effect.provide(layer))
  })

  it.live("counts against the queue only the requests the batch has no room for", () => {
    // Two batch slots and one queue place hold three requests that reach an idle server at once, however
    // they fall between the loop's admissions; a fourth then finds the queue full.
    const { engine, layer } = setup({ maxConcurrent: 2, queueCapacity: 1 }, { stepMs: 5 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const three = yield* Effect.all(
        [1, 2, 3].map((p) => scheduler.generate({ prompt: [p], settings: settings(4) })),
        { concurrency: "unbounded", mode: "either" }
      ).pipe(Effect.fork)
      yield* waitUntil(() => engine.batches.length >= 1)
      const refused = yield* Effect.either(scheduler.generate({ prompt: [4], settings: settings(2) }))
      expect(Either.isLeft(refused) && refused.left._tag).toBe("QueueFull")
      const results = yield* Fiber.join(three)
      expect(results.map((r) => Either.isRight(r) && r.right.choices[0]!.tokens.length)).toEqual([4, 4, 4])
      expect(engine.batches[0]).toHaveLength(2)
    }).pipe(Effect.provide(layer))
  })

  it.live("frees a cancelled request's sequences within one step", () => {
    const { engine, layer } = setup({}, { stepMs: 2 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const firstTwo = yield* scheduler.generateStream({ prompt: [1], settings: settings(1000) }).pipe(Stream.take(2), Stream.runCollect)
      expect(Chunk.size(firstTwo)).toBe(2)
      const stepsAtCancel = engine.batches.length
      yield* Effect.sleep(10)
      expect(yield* engine.live).toBe(0)
      // No step ran for it after the one in flight when the consumer left.
      expect(engine.batches.length).toBeLessThanOrEqual(stepsAtCancel + 1)
      // And the scheduler counts it so: one cancellation, freed after at most the step in flight.
      const stats = yield* scheduler.stats
      expect(stats.cancelledTotal).toBe(1)
      expect(stats.stepsAfterCancelMax).toBeLessThanOrEqual(1)
    }).pipe(Effect.provide(layer))
  })

  it.live("counts a request whose consumer stopped with its answers complete as finished, not cancelled", () => {
    const { engine, layer } = setup({}, { stepMs: 2 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const request = { prompt: [1], settings: settings(1000), answersComplete: () => true }
      yield* scheduler.generateStream(request).pipe(Stream.take(2), Stream.runCollect)
      yield* Effect.sleep(10)
      expect(yield* engine.live).toBe(0)
      const stats = yield* scheduler.stats
      expect([stats.requestsFinished, stats.cancelledTotal]).toEqual([1, 0])
    }).pipe(Effect.provide(layer))
  })

  it.live("times a request out at its deadline and releases it", () => {
    const { engine, layer } = setup({ requestTimeoutMs: 30 }, { stepMs: 5 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const started = Date.now()
      const timedOut = yield* Effect.either(scheduler.generate({ prompt: [1], settings: settings(1000) }))
      expect(Either.isLeft(timedOut) && timedOut.left._tag).toBe("RequestTimeout")
      expect(Date.now() - started).toBeLessThan(1000)
      const override = yield* Effect.either(scheduler.generate({ prompt: [1], settings: settings(3), timeoutMs: 5_000 }))
      expect(Either.isRight(override)).toBe(true)
      yield* Effect.sleep(15)
      expect(yield* engine.live).toBe(0)
    }).pipe(Effect.provide(layer))
  })

  it.live("times out a waiting request at its deadline while a long step runs", () => {
    // One sequence at a time, and each step takes 300 ms: the loop meets the waiting request only between
    // steps, so its deadline of 40 ms must be kept by its own timer.
    const { engine, layer } = setup({ maxConcurrent: 1 }, { stepMs: 300 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const running = yield* Effect.fork(scheduler.generate({ prompt: [1], settings: settings(2) }))
      yield* Effect.sleep(20)
      const started = Date.now()
      const waiting = yield* Effect.either(scheduler.generate({ prompt: [2], settings: settings(2), timeoutMs: 40 }))
      expect(Either.isLeft(waiting) && waiting.left._tag).toBe("RequestTimeout")
      expect(Date.now() - started).toBeLessThan(200)
      expect(Either.isRight(yield* Effect.either(Fiber.join(running)))).toBe(true)
      // It never ran.
      expect(engine.created.map((c) => c.prompt[0])).toEqual([1])
    }).pipe(Effect.provide(layer))
  })

  it.live("fails only the request whose sequence faults inside the engine", () => {
    const { layer } = setup({}, { failOnPromptToken: 666, stepMs: 1 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const [good, bad, alsoGood] = yield* Effect.all(
        [
          Effect.either(scheduler.generate({ prompt: [1], settings: settings(5) })),
          Effect.either(scheduler.generate({ prompt: [666], settings: settings(5) })),
          Effect.either(scheduler.generate({ prompt: [3], settings: settings(5) }))
        ],
        { concurrency: "unbounded" }
      )
      expect(Either.isRight(good)).toBe(true)
      expect(Either.isRight(alsoGood)).toBe(true)
      expect(Either.isLeft(bad) && bad.left._tag).toBe("EngineFailure")
    }).pipe(Effect.provide(layer))
  })

  it.live("drains: finishes in-flight work, refuses new work, and ends leftovers at the deadline", () => {
    const { engine, layer } = setup({ maxConcurrent: 1 }, { stepMs: 2 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const short = yield* Effect.fork(Effect.either(scheduler.generate({ prompt: [1], settings: settings(3) })))
      const long = yield* Effect.fork(Effect.either(scheduler.generate({ prompt: [2], settings: settings(4000) })))
      yield* Effect.sleep(5)
      yield* scheduler.drain(100)
      const refused = yield* Effect.either(scheduler.generate({ prompt: [3], settings: settings(1) }))
      expect(Either.isLeft(refused) && refused.left._tag).toBe("Draining")
      const shortResult = yield* Fiber.join(short)
      const longResult = yield* Fiber.join(long)
      expect(Either.isRight(shortResult)).toBe(true)
      expect(Either.isLeft(longResult) && longResult.left._tag).toBe("Draining")
      expect(yield* engine.live).toBe(0)
    }).pipe(Effect.provide(layer))
  })

  it.live("events carry the engine's step results unchanged, tagged with the answer's index", () => {
    const { layer } = setup()
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const events = yield* scheduler.generateStream({ prompt: [0], settings: settings(3), n: 2 }).pipe(Stream.runCollect)
      const steps = Chunk.toArray(events)
      expect(steps.map((e) => [e.index, e.step.stepsDone, e.step.committed.map((c) => c.token)])).toEqual([
        [0, 1, [0]],
        [1, 1, [1]],
        [0, 2, [1]],
        [1, 2, [2]],
        [0, 3, [2]],
        [1, 3, [3]]
      ])
      expect(steps.every((e) => e.step.stepsTotal === 3)).toBe(true)
    }).pipe(Effect.provide(layer))
  })

  it.live("steps only the unfinished sequences of a request whose sequences finish at different steps", () => {
    // Sequence i (seed i) commits its 6 positions in i + 1 steps: the first finishes after one step.
    const { engine, layer } = setup(
      {},
      {
        script: {
          answer: (_prompt, s) => Array.from({ length: s.genLength }, (_, q) => 10 * s.seed + q),
          schedule: (genLength, s) => {
            const steps = Math.min(s.seed + 1, genLength)
            return Array.from({ length: steps }, (_, k) =>
              Array.from(
                { length: Math.floor(((k + 1) * genLength) / steps) - Math.floor((k * genLength) / steps) },
                (_, j) => Math.floor((k * genLength) / steps) + j
              )
            )
          }
        }
      }
    )
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const result = yield* scheduler.generate({ prompt: [1], settings: settings(6), n: 3 })
      expect(result.choices.map((c) => c.tokens)).toEqual([0, 1, 2].map((i) => Array.from({ length: 6 }, (_, q) => 10 * i + q)))
      expect(result.choices.map((c) => c.steps)).toEqual([1, 2, 3])
      expect(engine.batches.map((b) => b.length)).toEqual([3, 2, 1])
      expect(yield* engine.live).toBe(0)
    }).pipe(Effect.provide(layer))
  })
})

describe("Scheduler drain at shutdown", () => {
  it.live("a request submitted after the scheduler's scope closed is told so at once (it once waited forever)", () =>
    Effect.gen(function* () {
      // Shutdown drains an idle scheduler at once and closes its scope; a request fiber preempted between
      // submit's draining check and its offer to the queue reaches the queue only after that.
      const scope = yield* Scope.make()
      const scheduler = yield* Layer.buildWithScope(setup().layer, scope).pipe(Effect.map(Context.get(Scheduler.Scheduler)))
      yield* Scope.close(scope, Exit.void)
      const late = yield* Effect.either(scheduler.generate({ prompt: [1], settings: settings(3) })).pipe(Effect.timeout(5_000))
      expect(Either.isLeft(late) && late.left._tag).toBe("Draining")
    })
  )

  it.live("a request offered while the scope closes is answered, not lost with the loop", () =>
    Effect.gen(function* () {
      // The loop waits in Queue.take; closing the scope interrupts it. A job offered in between can be
      // handed to that take and vanish with the loop (a CI run once held such a request until HAProxy's
      // 300 s). Every request submitted around the close must end at once, with its answer or Draining.
      for (let round = 0; round < 200; round++) {
        const scope = yield* Scope.make()
        const scheduler = yield* Layer.buildWithScope(setup().layer, scope).pipe(Effect.map(Context.get(Scheduler.Scheduler)))
        yield* Effect.yieldNow()
        // The close and the requests interleave differently from round to round.
        const closing = yield* Effect.fork(Scope.close(scope, Exit.void))
        for (let i = 0; i < round % 4; i++) yield* Effect.yieldNow()
        const requests = yield* Effect.forkAll(
          Array.from({ length: 3 }, () => Effect.either(scheduler.generate({ prompt: [1], settings: settings(2) })))
        )
        yield* Fiber.join(closing)
        const ended = yield* Fiber.join(requests).pipe(Effect.timeout(5_000), Effect.either)
        expect(Either.isRight(ended), `round ${round}: a request never ended`).toBe(true)
      }
    })
  )

  it.live("keeps its deadline inside an uninterruptible finalizer", () => {
    const { engine, layer } = setup({ maxConcurrent: 1 }, { stepMs: 2 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const long = yield* Effect.fork(Effect.either(scheduler.generate({ prompt: [2], settings: settings(4000) })))
      yield* waitUntil(() => engine.batches.length >= 1)
      const started = Date.now()
      yield* Effect.uninterruptible(scheduler.drain(50))
      expect(Date.now() - started).toBeLessThan(2_000)
      const result = yield* Fiber.join(long)
      expect(Either.isLeft(result) && result.left._tag).toBe("Draining")
    }).pipe(Effect.provide(layer))
  })
})

describe("Scheduler score", () => {
  const item = (first: number, length: number, positions: ReadonlyArray<number>, targets: ReadonlyArray<number>) => ({
    canvas: [first, ...new Array<number>(length - 1).fill(0)],
    positions,
    targets
  })

  it.live("runs between two steps of the running requests, in forwards of at most the batch size", () => {
    const { engine, layer } = setup({ maxConcurrent: 2 }, { stepMs: 2 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const running = yield* Effect.fork(scheduler.generate({ prompt: [1], settings: settings(30) }))
      yield* waitUntil(() => engine.batches.length >= 2)
      // The fake model expects token (canvas[0] + position) % 1000; its log-probability is -|off| / 10.
      const items = [item(5, 4, [1, 2], [6, 9]), item(7, 3, [0], [7]), item(1, 2, [], []), item(2, 5, [4], [16])]
      const scores = yield* scheduler.score({ items })
      expect(scores.map((s) => Array.from(s.logprobs))).toEqual([[-0, -0.2], [-0], [], [-1]])
      // Four canvases, batch size 2: two forwards, while the other request was still being stepped.
      expect(engine.scored.map((batch) => batch.length)).toEqual([2, 2])
      expect(Either.isRight(yield* Effect.either(Fiber.join(running)))).toBe(true)
      const stats = yield* scheduler.stats
      expect(stats.requestsFinished).toBe(2)
    }).pipe(Effect.provide(layer))
  })

  it.live("keeps each forward within max-batch-tokens, one canvas at least", () => {
    const { engine, layer } = setup({ maxConcurrent: 8, maxBatchTokens: 10 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const items = [item(1, 4, [0], [1]), item(1, 4, [0], [1]), item(1, 3, [0], [1]), item(1, 12, [0], [1]), item(1, 2, [0], [1])]
      const scores = yield* scheduler.score({ items })
      expect(scores).toHaveLength(5)
      // 4 + 4 fit in 10, + 3 does not; 3 alone; 12 alone though over the bound; then 2.
      expect(engine.scored.map((batch) => batch.map((i) => i.canvas.length))).toEqual([[4, 4], [3], [12], [2]])
    }).pipe(Effect.provide(layer))
  })

  it.live("waits in line behind a request the batch has no room for yet (first come, first served)", () => {
    const { engine, layer } = setup({ maxConcurrent: 1 }, { stepMs: 2 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const first = yield* Effect.fork(scheduler.generate({ prompt: [1], settings: settings(10) }))
      yield* waitUntil(() => engine.batches.length >= 1)
      const second = yield* Effect.fork(scheduler.generate({ prompt: [2], settings: settings(10) }))
      while ((yield* scheduler.stats).waiting < 1) yield* Effect.sleep(1)
      yield* scheduler.score({ items: [item(3, 2, [1], [4])] })
      // The second request was admitted (so the first had finished) before the scoring ran.
      expect(engine.created.length).toBe(2)
      yield* Fiber.join(first)
      yield* Fiber.join(second)
    }).pipe(Effect.provide(layer))
  })

  it.live("fails alone when its forward faults, and is refused while draining", () => {
    const { layer } = setup({}, { failOnPromptToken: 666, stepMs: 1 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const [good, bad] = yield* Effect.all(
        [
          Effect.either(scheduler.generate({ prompt: [1], settings: settings(5) })),
          Effect.either(scheduler.score({ items: [item(666, 2, [0], [1])] }))
        ],
        { concurrency: "unbounded" }
      )
      expect(Either.isRight(good)).toBe(true)
      expect(Either.isLeft(bad) && bad.left._tag).toBe("EngineFailure")
      yield* scheduler.drain(100)
      const refused = yield* Effect.either(scheduler.score({ items: [item(1, 2, [0], [1])] }))
      expect(Either.isLeft(refused) && refused.left._tag).toBe("Draining")
    }).pipe(Effect.provide(layer))
  })

  it.live("times out while it waits, and a caller that went away leaves its forwards unrun", () => {
    const { engine, layer } = setup({ maxConcurrent: 1 }, { stepMs: 5 })
    return Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const first = yield* Effect.fork(scheduler.generate({ prompt: [1], settings: settings(20) }))
      yield* waitUntil(() => engine.batches.length >= 1)
      const blocked = yield* Effect.fork(scheduler.generate({ prompt: [2], settings: settings(2) }))
      while ((yield* scheduler.stats).waiting < 1) yield* Effect.sleep(1)
      const timedOut = yield* Effect.either(scheduler.score({ items: [item(3, 2, [1], [4])], timeoutMs: 20 }))
      expect(Either.isLeft(timedOut) && timedOut.left._tag).toBe("RequestTimeout")
      const abandoned = yield* Effect.fork(scheduler.score({ items: [item(4, 2, [1], [5])] }))
      yield* Effect.sleep(10)
      yield* Fiber.interrupt(abandoned)
      yield* Fiber.join(first)
      yield* Fiber.join(blocked)
      expect(engine.scored).toEqual([])
      expect((yield* scheduler.stats).cancelledTotal).toBe(1)
    }).pipe(Effect.provide(layer))
  })
})
