/**
 * Faults while serving, against the real native engine on the embedded model:
 *  - clients that go away at random points (before the response head, mid-stream, mid-wait for a JSON
 *    answer) free their batch slots within a step, leave no sequence alive in the engine, and do not
 *    disturb the requests around them, whose answers stay exactly what they are alone;
 *  - a sequence whose engine step fails (an injected fault) fails its own request with 500 and the
 *    OpenAI error body, while the requests batched with it complete with their usual answers.
 *
 * The disconnects run against a `vdiff serve` child process. The injected fault needs a hook inside the
 * engine, so that test builds the same server in-process (the real layers, HTTP over loopback, the
 * native engine) with a test-only wrapper around the engine: no fault hook exists in the product.
 */
import { Effect, Exit, Logger, LogLevel, Scope } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type EngineShape, make as makeEngine, type SequenceId } from "../src/engine/Engine.js"
import { EngineFailure } from "../src/engine/errors.js"
import { fromEngine, type Loader, ModelLoadFailed } from "../src/server/ModelHost.js"
import { make as makeTokenizer } from "../src/tokenizer/Tokenizer.js"
import * as Config from "../src/config/Config.js"
import { settings, startServer } from "./http-helpers.js"
import { answersAlone, prng, requestSpecs, type RequestSpec, send, specAt } from "./stress/load.js"
import { awaitIdle, embeddedModel, engineStats, type ServeProcess, size, sleep, startServe, timeLimit } from "./stress/serve.js"

const post = (url: string, spec: RequestSpec, signal?: AbortSignal) =>
  fetch(url + spec.path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(spec.body),
    ...(signal === undefined ? {} : { signal })
  })

/** A streaming completion long enough to be cut anywhere: 192 denoising steps. */
const longStream = (prompt: string): RequestSpec => ({
  key: "long",
  path: "/v1/completions",
  stream: true,
  n: 1,
  body: { prompt, max_tokens: 192, diffusion_steps: 192, stream: true, stream_options: { include_snapshots: true } }
})

/** Reads SSE events until `events` have arrived (or the stream ends). */
const readEvents = async (response: Response, events: number) => {
  const reader = response.body!.getReader()
  let seen = 0
  let text = ""
  while (seen < events) {
    const { done, value } = await reader.read()
    if (done) break
    text += new TextDecoder().decode(value)
    seen = text.split("\n\n").length - 1
  }
  return reader
}

describe("clients that disconnect", () => {
  let server: ServeProcess

  beforeAll(async () => {
    server = await startServe({ flags: ["--max-concurrent-requests", "4", "--max-queue-size", "64"] })
  })
  afterAll(async () => {
    expect(await server.stop()).toBe(0)
  })

  it(
    "a stream cut mid-way frees its slot within a step and its sequence at once",
    async () => {
      const controller = new AbortController()
      const response = await post(server.url, longStream("ROMEO:\n"), controller.signal)
      expect(response.status).toBe(200)
      await readEvents(response, 5)
      const before = await engineStats(server.url)
      expect(before.scheduler.running).toBe(1)
      controller.abort()
      const { stats, waitedMs } = await awaitIdle(server.url, 5_000)
      // Counted by the server from the moment it saw the disconnect: freed before the next step, so after
      // at most the step then in flight. (Counted from this test's `before`, the steps also include those
      // that ran while the stats answer and the abort crossed the network, which on a loaded machine can
      // be one more: an earlier version of this test asserted that total and failed in CI.)
      expect(stats.scheduler.cancelled_total - before.scheduler.cancelled_total).toBe(1)
      expect(stats.scheduler.steps_after_cancel_max).toBeLessThanOrEqual(1)
      const steps = stats.scheduler.steps_total - before.scheduler.steps_total
      console.log(
        `disconnect: slot and sequence freed ${steps} step(s) / ${waitedMs} ms after the abort, ` +
          `${stats.scheduler.steps_after_cancel_max} after the server saw it`
      )
    },
    timeLimit()
  )

  it(
    "random disconnects leave nothing running and do not disturb the other requests",
    async () => {
      const specs = requestSpecs(8, 7)
      const expected = await answersAlone(server.url, specs)
      const random = prng(42)
      const cut = size(16, 96)
      const kept = size(8, 32)
      const cuts = { beforeHead: 0, midStream: 0, midWait: 0 }

      /** A request abandoned at a random point. */
      const abandon = async (i: number) => {
        const controller = new AbortController()
        const stream = random() < 0.7
        const spec: RequestSpec = stream
          ? longStream(["ROMEO:\n", "JULIET:\n"][i % 2]!)
          : { key: "long-json", path: "/v1/completions", stream: false, n: 1, body: { prompt: "HAMLET:\n", max_tokens: 96 } }
        const when = random()
        try {
          const pending = post(server.url, spec, controller.signal)
          if (when < 0.2) {
            // Gone before the answer started (the request may still be queued or just admitted).
            await sleep(Math.floor(random() * 30))
            controller.abort()
            cuts.beforeHead++
            await pending.catch(() => undefined)
            return
          }
          const response = await pending
          if (stream) {
            await readEvents(response, 1 + Math.floor(random() * 40))
            cuts.midStream++
          } else {
            await sleep(Math.floor(random() * 400))
            cuts.midWait++
          }
          controller.abort()
        } catch {
          // The abort itself rejects what was pending.
        }
      }

      /** A request that runs to the end among the abandoned ones. */
      const keep = async (i: number) => {
        const spec = specAt(specs, i)
        const outcome = await send(server.url, spec)
        expect(outcome.kind, JSON.stringify(outcome)).toBe("ok")
        if (outcome.kind === "ok") expect(outcome.texts).toEqual(expected.get(spec.key))
      }

      // Waves of 8 abandoned requests, each with its share of the kept ones running among them.
      const started = performance.now()
      const waves = Math.ceil(cut / 8)
      const keptPerWave = Math.ceil(kept / waves)
      for (let wave = 0; wave < waves; wave++) {
        const abandoned = Array.from({ length: Math.min(8, cut - wave * 8) }, (_, i) => abandon(wave * 8 + i))
        const finishing = Array.from({ length: keptPerWave }, (_, i) => keep(wave * keptPerWave + i))
        await Promise.all([...abandoned, ...finishing])
      }
      const { stats, waitedMs } = await awaitIdle(server.url, 10_000)
      console.log(
        `random disconnects: ${cut} abandoned (${cuts.beforeHead} before the head, ${cuts.midStream} mid-stream, ` +
          `${cuts.midWait} waiting for JSON), ${waves * keptPerWave} completed alongside with their exact answers; idle ` +
          `${waitedMs} ms after the last, in ${Math.round(performance.now() - started)} ms; engine live sequences ` +
          `${stats.engine.live_sequences}`
      )
      expect(stats.engine.live_sequences).toBe(0)
      expect(cuts.midStream).toBeGreaterThan(0)
      // Still serving.
      const after = await send(server.url, specAt(specs, 0))
      expect(after.kind).toBe("ok")
    },
    // A hang guard, not a speed target: a 96-token answer alone takes 2 s on a Xeon core and 14 s on the
    // slowest CPU these machines have had, and each wave runs 8 abandoned and 4 kept requests on 4 slots.
    timeLimit(240_000)
  )
})

// ---- an injected engine fault --------------------------------------------------------------------------

/** Prompts (as token ids) starting with this id fail inside the engine; text prompts start with BOS. */
const POISON = 100

/** The engine, but a step that includes a sequence whose prompt starts with POISON fails. */
const faultyEngine = (engine: EngineShape): EngineShape => {
  const poisoned = new Set<SequenceId>()
  return {
    ...engine,
    create: (prompt, settings) =>
      Effect.tap(engine.create(prompt, settings), (id) =>
        Effect.sync(() => {
          if (prompt[0] === POISON) poisoned.add(id)
        })
      ),
    step: (ids) =>
      ids.some((id) => poisoned.has(id))
        ? Effect.fail(new EngineFailure({ message: "injected fault", code: "VDIFF_INTERNAL" }))
        : engine.step(ids),
    release: (id) =>
      Effect.zipRight(
        Effect.sync(() => poisoned.delete(id)),
        engine.release(id)
      )
  }
}

const faultyLoader = (config: Config.Settings): Loader =>
  Effect.gen(function* () {
    const tokenizer = yield* makeTokenizer(config.model)
    const engine = yield* makeEngine({ modelDir: config.model, threads: 1 })
    return yield* fromEngine(faultyEngine(engine), tokenizer, {
      modelName: Config.servedModelName(config),
      scheduler: {
        maxConcurrent: config.maxConcurrentRequests,
        queueCapacity: config.maxQueueSize,
        maxBatchTokens: Number.MAX_SAFE_INTEGER,
        requestTimeoutMs: 0
      },
      defaults: {
        maxTokens: 16,
        steps: null,
        blockLength: 8,
        remasking: "low_confidence",
        cfgScale: 0,
        temperature: 0
      }
    })
  }).pipe(Effect.mapError((e) => new ModelLoadFailed({ modelDir: config.model, message: String(e) })))

describe("a fault inside the engine", () => {
  const scope = Effect.runSync(Scope.make())
  let url: string

  beforeAll(async () => {
    const config = await settings(["--model", embeddedModel, "--max-concurrent-requests", "4"])
    const server = startServer({ config, load: faultyLoader(config) }).pipe(
      Scope.extend(scope),
      // The access log of an in-process server would go to the test's output.
      Effect.provide(Logger.minimumLogLevel(LogLevel.None))
    )
    url = (await Effect.runPromise(server)).url
  })
  afterAll(async () => {
    await Effect.runPromise(Scope.close(scope, Exit.void))
  })

  it(
    "fails only its own request with 500 while the requests batched with it complete",
    async () => {
      const specs = requestSpecs(6, 3)
      const expected = await answersAlone(url, specs)
      const healthy = size(8, 32)
      const faulty = size(3, 12)
      const poisoned = (i: number): RequestSpec => {
        const stream = i % 2 === 0
        const body = { prompt: [POISON, 200 + i, 300], max_tokens: 16, ...(stream ? { stream: true } : {}) }
        return { key: `poisoned${i}`, path: "/v1/completions", stream, n: 1, body }
      }
      const healthyRuns = Array.from({ length: healthy }, (_, i) => send(url, specAt(specs, i)))
      // The faulty ones arrive while the healthy ones are in the batch.
      await sleep(50)
      const faultyRuns = Array.from({ length: faulty }, async (_, i) => {
        const response = await post(url, poisoned(i))
        return { status: response.status, body: (await response.json()) as any }
      })
      const results = await Promise.all(healthyRuns)
      results.forEach((outcome, i) => {
        expect(outcome.kind, JSON.stringify(outcome)).toBe("ok")
        if (outcome.kind === "ok") expect(outcome.texts).toEqual(expected.get(specAt(specs, i).key))
      })
      for (const { status, body } of await Promise.all(faultyRuns)) {
        // Streams too: the fault comes before the first chunk, so it still has its own status.
        expect(status).toBe(500)
        expect(body.error).toEqual({
          message: "injected fault",
          type: "server_error",
          param: null,
          code: "vdiff_internal",
          request_id: expect.any(String)
        })
      }
      const { stats } = await awaitIdle(url)
      expect(stats.engine.live_sequences).toBe(0)
      console.log(`injected fault: ${faulty} poisoned requests failed with 500, ${healthy} batched with them completed exactly`)
    },
    timeLimit()
  )
})
