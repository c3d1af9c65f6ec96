/**
 * Continuous-batching benchmark: C concurrent requests through the Scheduler on one engine, for
 * C = 1, 4, 8, 16. Prints aggregate committed tokens/s, p50/p99 request latency and the average batch size
 * the scheduler actually formed, and the throughput ratio against C = 1.
 *
 *   npx tsx bench/scheduler.ts [--model DIR] [--concurrency 1,4,8,16] [--gen 32] [--block 32] [--steps 32]
 *                              [--prompt-len 32] [--rounds 2] [--threads 2]
 *
 * Without --model it writes the `small` preset (random weights, f32) to a temporary directory first.
 */
import { Effect, Layer } from "effect"
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import * as Engine from "../src/engine/Engine.js"
import { makeModel } from "../src/model/makeModel.js"
import * as Scheduler from "../src/scheduler/Scheduler.js"
import { defaultSettings } from "../src/index.js"
import { flags } from "./lib.mjs"

const values = flags({
  model: undefined,
  concurrency: "1,4,8,16",
  gen: "32",
  block: "32",
  steps: "32",
  "prompt-len": "32",
  rounds: "2",
  threads: "2"
})

const levels = values.concurrency.split(",").map(Number)
const genLength = Number(values.gen)
const promptLength = Number(values["prompt-len"])
const rounds = Number(values.rounds)

const percentile = (sorted: ReadonlyArray<number>, p: number) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!

const main = async () => {
  let modelDir = values.model
  let cleanup = () => {}
  if (modelDir === undefined) {
    const dir = mkdtempSync(join(tmpdir(), "vdiff-bench-"))
    modelDir = join(dir, "small")
    process.stderr.write(`writing the small preset to ${modelDir} ...\n`)
    await makeModel({ preset: "small", seed: 1, out: modelDir, dtype: "F32" })
    cleanup = () => rmSync(dir, { recursive: true, force: true })
  }
  const maxConcurrent = Math.max(...levels)
  const layer = Layer.provideMerge(
    Scheduler.layer({ maxConcurrent, queueCapacity: 1024, maxBatchTokens: 1 << 30, requestTimeoutMs: 0 }),
    Engine.layer({ modelDir, threads: Number(values.threads) })
  )
  const rows: Array<Record<string, number>> = []
  await Effect.runPromise(
    Effect.gen(function* () {
      const scheduler = yield* Scheduler.Scheduler
      const engine = yield* Engine.Engine
      const vocab = engine.info.config.vocabSize
      const settings: Engine.SamplingSettings = {
        ...defaultSettings,
        genLength,
        blockLength: Number(values.block),
        steps: Number(values.steps)
      }
      const prompt = (i: number) => Array.from({ length: promptLength }, (_, j) => (i * 7919 + j * 104729) % (vocab - 8))
      // Warm-up: page the weights in.
      yield* scheduler.generate({ prompt: prompt(0), settings })
      for (const c of levels) {
        const before = yield* scheduler.stats
        const latencies: Array<number> = []
        const started = performance.now()
        yield* Effect.forEach(
          Array.from({ length: c * rounds }, (_, i) => i),
          (i) =>
            Effect.gen(function* () {
              const t0 = performance.now()
              yield* scheduler.generate({ prompt: prompt(i + 1), settings })
              latencies.push(performance.now() - t0)
            }),
          { concurrency: c }
        )
        const seconds = (performance.now() - started) / 1000
        const after = yield* scheduler.stats
        latencies.sort((a, b) => a - b)
        const steps = after.stepsTotal - before.stepsTotal
        rows.push({
          concurrency: c,
          requests: c * rounds,
          tokens_per_s: (c * rounds * genLength) / seconds,
          p50_ms: percentile(latencies, 0.5),
          p99_ms: percentile(latencies, 0.99),
          avg_batch: (after.sequenceStepsTotal - before.sequenceStepsTotal) / steps,
          step_ms: (seconds * 1000) / steps
        })
      }
    }).pipe(Effect.scoped, Effect.provide(layer))
  )
  cleanup()
  const base = rows[0]!.tokens_per_s!
  console.log(
    `model ${values.model ?? "small (random, f32)"}; prompt ${promptLength}, gen ${genLength}, block ${values.block}, steps ${values.steps}; ${values.threads} threads; ${new Date().toISOString()}`
  )
  console.log("concurrency  requests  tokens/s  x vs 1   p50 ms   p99 ms  avg batch  step ms")
  for (const r of rows) {
    console.log(
      [
        String(r.concurrency).padStart(11),
        String(r.requests).padStart(9),
        r.tokens_per_s!.toFixed(1).padStart(9),
        (r.tokens_per_s! / base).toFixed(2).padStart(8),
        r.p50_ms!.toFixed(0).padStart(8),
        r.p99_ms!.toFixed(0).padStart(8),
        r.avg_batch!.toFixed(2).padStart(10),
        r.step_ms!.toFixed(1).padStart(8)
      ].join(" ")
    )
  }
}

main().catch((error) => {
  console.error(error)
  process.exit(1)
})
