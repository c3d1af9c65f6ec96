/**
 * The addon's step API on the tiny preset: how steps advance, what committing means for the canvas,
 * determinism, release, batching sequences with different settings, and the model formats the preset
 * writer produces (bf16, f16, sharded).
 */
import { execFile } from "node:child_process"
import { mkdtemp, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { promisify } from "node:util"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type NativeEngine, type NativeSamplingParams, loadAddon } from "../src/engine/native.js"
import { makeModel } from "../src/model/makeModel.js"
import { parameterCount, presets } from "../src/model/presets.js"
import { greedy, runTogether } from "./support/engine.js"

const tiny = presets["tiny"]!
const MASK = tiny.config.mask_token_id
const prompt = [17, 4, 250, 99, 3, 42, 7]

let dir: string
let engine: NativeEngine
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "vdiff-engine-step-"))
  await makeModel({ preset: "tiny", seed: 1, out: join(dir, "tiny") })
  engine = await loadAddon().loadModel(join(dir, "tiny"), { threads: 2 })
})
afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

describe("the loaded model", () => {
  it("reports the preset's config, dtype and size", () => {
    const info = engine.info()
    expect(info.config).toMatchObject({
      dModel: 64,
      nHeads: 4,
      nKvHeads: 2,
      nLayers: 2,
      mlpHiddenSize: 160,
      vocabSize: 512,
      embeddingSize: 512,
      maskTokenId: 511,
      eosTokenId: 510,
      maxSequenceLength: 512,
      weightTying: false,
      includeBias: false
    })
    expect(info.weightDtype).toBe("f32")
    expect(info.parameterCount).toBe(parameterCount(tiny.config))
    expect(info).toMatchObject({ backend: "cpu", memoryTotalBytes: 0 })
    expect(["portable", "avx2", "avx512", "avx512bf16", "amx"]).toContain(info.device)
  })
})

describe("stepping one sequence", () => {
  it("advances stepsDone by one, commits each position once and never re-masks, finishes after the planned steps", async () => {
    // gen 16 in blocks of 4 over 8 steps: 2 steps per block, 2 tokens per step.
    const params = greedy({ genLength: 16, blockLength: 4, steps: 8 })
    const id = engine.create(prompt, params)
    const info = engine.sequenceInfo(id)
    expect(info).toMatchObject({ promptLength: prompt.length, genLength: 16, stepsTotal: 8, stepsDone: 0, finished: false })
    expect(info.memoryBytes).toBeGreaterThan(0)
    expect(Array.from(engine.canvas(id))).toEqual(Array(16).fill(MASK))

    const committed = new Map<number, number>()
    for (let step = 1; step <= 8; step++) {
      const [r] = await engine.step([id])
      expect(r!.id).toBe(id)
      expect(r!.stepsDone).toBe(step)
      expect(r!.block).toBe(Math.floor((step - 1) / 2))
      expect(r!.committed.length).toBe(2)
      expect(r!.stepsTotal).toBe(8)
      // Ascending, new, and inside the block being worked on.
      expect(r!.committed[0]!.position).toBeLessThan(r!.committed[1]!.position)
      for (const { position, token, probability } of r!.committed) {
        expect(committed.has(position)).toBe(false)
        expect(Math.floor(position / 4)).toBe(r!.block)
        expect(token).not.toBe(MASK)
        expect(probability).toBeGreaterThan(0)
        expect(probability).toBeLessThanOrEqual(1)
        committed.set(position, token)
      }
      // The canvas holds exactly what was committed so far; everything else is still masked.
      const canvas = Array.from(engine.canvas(id))
      canvas.forEach((token, position) => expect(token).toBe(committed.get(position) ?? MASK))
      expect(r!.finished).toBe(step === 8)
      expect(r!.reason).toBe(step === 8 ? (canvas.includes(tiny.config.eos_token_id) ? "eos" : "length") : null)
      expect(engine.sequenceInfo(id).stepsDone).toBe(step)
    }
    expect(committed.size).toBe(16)
    expect(engine.sequenceInfo(id).finished).toBe(true)
    engine.release(id)
  })

  it("commits uneven amounts when steps do not divide the block: gen 10, block 4, steps 7 → 2,1,1 | 2,2 | 1,1", async () => {
    const [run] = await runTogether(engine, [{ prompt, params: greedy({ genLength: 10, blockLength: 4, steps: 7 }) }])
    expect(run!.trace.map((step) => step.length)).toEqual([2, 1, 1, 2, 2, 1, 1])
    expect(run!.results.map((r) => r.block)).toEqual([0, 0, 0, 1, 1, 2, 2])
    expect(run!.answer).not.toContain(MASK)
  })

  it("random remasking also commits every position exactly once", async () => {
    const [run] = await runTogether(engine, [
      { prompt, params: greedy({ genLength: 24, blockLength: 8, steps: 12, remasking: "random", seed: 3 }) }
    ])
    const positions = run!.trace.flat().map(([p]) => p)
    expect(positions.slice().sort((a, b) => a - b)).toEqual(Array.from({ length: 24 }, (_, i) => i))
    expect(run!.answer).not.toContain(MASK)
  })
})

describe("determinism", () => {
  const sampled = (seed: number): NativeSamplingParams => greedy({ genLength: 32, blockLength: 8, steps: 16, temperature: 1, seed })

  it("same seed, same output at temperature > 0; different seeds differ", async () => {
    const [a] = await runTogether(engine, [{ prompt, params: sampled(5) }])
    const [b] = await runTogether(engine, [{ prompt, params: sampled(5) }])
    const [c] = await runTogether(engine, [{ prompt, params: sampled(6) }])
    expect(b!.answer).toEqual(a!.answer)
    expect(b!.trace).toEqual(a!.trace)
    expect(c!.answer).not.toEqual(a!.answer)
  })

  it("greedy decoding does not depend on the seed", async () => {
    const [a] = await runTogether(engine, [{ prompt, params: greedy({ seed: 1 }) }])
    const [b] = await runTogether(engine, [{ prompt, params: greedy({ seed: 2 }) }])
    expect(b!.answer).toEqual(a!.answer)
  })
})

describe("release", () => {
  it("frees sequences: live() counts them and returns to 0", async () => {
    expect(engine.live()).toBe(0)
    const ids = [engine.create(prompt, greedy()), engine.create(prompt, greedy()), engine.create([1], greedy())]
    expect(engine.live()).toBe(3)
    await engine.step(ids)
    engine.release(ids[1]!)
    expect(engine.live()).toBe(2)
    engine.release(ids[1]!) // releasing twice is harmless
    expect(engine.live()).toBe(2)
    const results = await engine.step([ids[0]!, ids[2]!])
    expect(results.map((r) => r.stepsDone)).toEqual([2, 2])
    for (const id of ids) engine.release(id)
    expect(engine.live()).toBe(0)
  })

  it("releasing while a step is in flight frees the sequence when the step returns", async () => {
    const id = engine.create(prompt, greedy())
    const pending = engine.step([id])
    engine.release(id)
    await pending
    expect(engine.live()).toBe(0)
  })
})

describe("batching", () => {
  const jobs = [
    { prompt, params: greedy({ genLength: 16, blockLength: 4, steps: 8 }) },
    { prompt: [5, 6, 7], params: greedy({ genLength: 9, blockLength: 9, steps: 3, temperature: 0.7, seed: 11 }) },
    {
      prompt: [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310],
      params: greedy({ genLength: 12, blockLength: 6, steps: 12, cfgScale: 1.5 })
    },
    { prompt: [9], params: greedy({ genLength: 20, blockLength: 5, steps: 8, remasking: "random", seed: 4 }) },
    { prompt: [1, 2], params: greedy({ genLength: 1, blockLength: 1, steps: 1 }) }
  ]

  it("n sequences with different settings in one step loop give what each gives alone", async () => {
    const together = await runTogether(engine, jobs)
    for (const [i, job] of jobs.entries()) {
      const [alone] = await runTogether(engine, [job])
      const label = `job ${i}`
      expect(together[i]!.answer, label).toEqual(alone!.answer)
      expect(
        together[i]!.trace.map((s) => s.map(([p, t]) => [p, t])),
        label
      ).toEqual(alone!.trace.map((s) => s.map(([p, t]) => [p, t])))
      together[i]!.trace.flat().forEach(([, , p], k) => expect(Math.abs(p - alone!.trace.flat()[k]![2]), label).toBeLessThan(1e-5))
      expect(together[i]!.results.length, label).toBe(alone!.results.length)
    }
    // Each finished after its own number of steps, the shortest after one.
    expect(together.map((r) => r.results.length)).toEqual([8, 3, 12, 8, 1])
    expect(engine.live()).toBe(0)
  })
})

describe("model formats written by make-model", () => {
  it("a sharded copy of the model gives the same output as the single file", async () => {
    const sharded = join(dir, "tiny-sharded")
    await makeModel({ preset: "tiny", seed: 1, out: sharded, maxShardBytes: 150_000 })
    const other = await loadAddon().loadModel(sharded, { threads: 2 })
    const job = { prompt, params: greedy({ genLength: 16, blockLength: 8, steps: 8 }) }
    const [a] = await runTogether(engine, [job])
    const [b] = await runTogether(other, [job])
    expect(b!.answer).toEqual(a!.answer)
    expect(b!.trace).toEqual(a!.trace)
  })

  it.each([
    ["BF16", "bf16"],
    ["F16", "f16"]
  ] as const)("%s weights load and generate", async (dtype, name) => {
    const out = join(dir, `tiny-${name}`)
    await makeModel({ preset: "tiny", seed: 1, out, dtype })
    const other = await loadAddon().loadModel(out, { threads: 2 })
    expect(other.info().weightDtype).toBe(name)
    const [run] = await runTogether(other, [{ prompt, params: greedy() }])
    expect(run!.answer).not.toContain(MASK)
    expect(run!.answer.length).toBe(16)
  })
})

describe("vdiff generate (command line)", () => {
  it("prints the answer the step API gives for the same settings, with timings", async () => {
    const tsx = join(import.meta.dirname, "..", "node_modules", ".bin", "tsx")
    const main = join(import.meta.dirname, "..", "src", "main.ts")
    const { stdout } = await promisify(execFile)(tsx, [
      main,
      "generate",
      "--model",
      join(dir, "tiny"),
      "--prompt-ids",
      prompt.join(","),
      "--gen",
      "24",
      "--block",
      "8",
      "--steps",
      "12",
      "--temperature",
      "0.8",
      "--seed",
      "9",
      "--threads",
      "1"
    ])
    const printed = JSON.parse(stdout)
    const [run] = await runTogether(engine, [
      { prompt, params: greedy({ genLength: 24, blockLength: 8, steps: 12, temperature: 0.8, seed: 9 }) }
    ])
    expect(printed.answer).toEqual(run!.answer)
    expect(printed.steps).toBe(12)
    expect(printed.finish_reason).toBe(run!.reason)
    expect(printed.ms).toBeGreaterThan(0)
    expect(printed.tokens_per_s).toBeGreaterThan(0)
  })

  it("gives a block model its family's settings, as vdiff serve does, and refuses a block it was not trained with", async () => {
    const tsx = join(import.meta.dirname, "..", "node_modules", ".bin", "tsx")
    const main = join(import.meta.dirname, "..", "src", "main.ts")
    const sdar = join(dir, "sdar-tiny")
    await makeModel({ preset: "sdar-tiny", seed: 1, out: sdar })
    const run = (...flags: Array<string>) =>
      promisify(execFile)(tsx, [main, "generate", "--model", sdar, "--prompt-ids", "10,20,30", "--gen", "8", "--threads", "1", ...flags])
    // SDAR's block of 4, one step per token: 2 blocks of 4 steps each.
    const printed = JSON.parse((await run()).stdout)
    const sdarEngine = await loadAddon().loadModel(sdar, { threads: 1 })
    const [direct] = await runTogether(sdarEngine, [{ prompt: [10, 20, 30], params: greedy({ genLength: 8, blockLength: 4, steps: 4 }) }])
    expect(printed.answer).toEqual(direct!.answer)
    // With --steps 1 (per block here, as a request's diffusion_steps): one denoising step a block.
    const fast = JSON.parse((await run("--steps", "1")).stdout)
    expect(fast.steps).toBeLessThan(printed.steps)
    const refused = await run("--block", "32").then(
      () => undefined,
      (error: { code: number; stderr: string }) => error
    )
    expect(refused?.code).toBe(1)
    expect(refused?.stderr).toMatch(/--block: block_length must be 4/)
  })
})
