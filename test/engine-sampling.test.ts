/**
 * The sampler options of the step API through the addon, on the golden `plain` model (random weights):
 * top-k / top-p, infilling with a suffix, parallel decoding and early stop, and the statistics steps
 * report. The exact rules are tested natively against a fake model (native/src/tests/sampler_tests.cpp);
 * here: that they reach the engine, keep the reference's answers when off, and keep their promises on
 * a real forward pass.
 */
import { join } from "node:path"
import { beforeAll, describe, expect, it } from "vitest"
import { type NativeEngine, type NativeSamplingParams, loadAddon } from "../src/engine/native.js"
import { greedy, runTogether } from "./support/engine.js"
import { goldenCases, goldenDir, nativeParamsOf } from "./support/golden.js"

const cases = goldenCases("plain")
const EOS = 94
const EOT = 93
const MASK = 95

const paramsOf = nativeParamsOf

const byName = (name: string) => cases.find((c) => c.name === name)!

let engine: NativeEngine
beforeAll(async () => {
  engine = await loadAddon().loadModel(join(goldenDir, "plain"), { threads: 2 })
})

describe("with every new option off", () => {
  it("gives every golden answer, the options spelled out at their off values", async () => {
    const off = { topK: 0, topP: 1, parallelThreshold: 0, parallelFactor: 0, earlyStop: false }
    const runs = await runTogether(
      engine,
      cases.map((c) => ({ prompt: c.prompt, params: paramsOf(c, off) }))
    )
    runs.forEach((run, i) => expect(run.answer, cases[i]!.name).toEqual(cases[i]!.answer))
    // One canvas evaluation per step, two with cfg; nothing filled.
    runs.forEach((run, i) => {
      const last = run.results[run.results.length - 1]!
      expect(last.forwardPasses).toBe(run.results.length * (cases[i]!.params.cfg_scale > 0 ? 2 : 1))
      expect(run.results.every((r) => r.filled === 0)).toBe(true)
    })
  })

  it("top-k and top-p change nothing at temperature 0", async () => {
    const filtered = { topK: 1, topP: 0.2 }
    const runs = await runTogether(
      engine,
      cases.map((c) => ({ prompt: c.prompt, params: paramsOf(c, filtered) }))
    )
    runs.forEach((run, i) => expect(run.answer, cases[i]!.name).toEqual(cases[i]!.answer))
  })
})

describe("repetition penalties", () => {
  // The exact rule is checked natively (sampler_tests.cpp, test_penalties); here: the addon reads the three
  // fields, a penalty changes a greedy answer on a real forward, and the native check refuses a bad value.
  const prompt = [5, 17, 33, 2]
  const answer = (overrides: Partial<NativeSamplingParams>) =>
    runTogether(engine, [{ prompt, params: greedy({ genLength: 24, blockLength: 8, steps: 24, ...overrides }) }]).then(
      ([run]) => run!.answer
    )

  it("leaves the answer alone at their off values and changes it when on", async () => {
    const plain = await answer({})
    expect(await answer({ presencePenalty: 0, frequencyPenalty: 0, repetitionPenalty: 1 })).toEqual(plain)
    const repeats = (tokens: ReadonlyArray<number>) => tokens.length - new Set(tokens).size
    for (const on of [{ presencePenalty: 2 }, { frequencyPenalty: 2 }, { repetitionPenalty: 2 }]) {
      const penalised = await answer(on)
      expect(penalised, JSON.stringify(on)).not.toEqual(plain)
      expect(repeats(penalised), JSON.stringify(on)).toBeLessThan(repeats(plain))
    }
  })

  it("refuses a value out of range natively, naming the field", () => {
    expect(() => engine.create(prompt, greedy({ genLength: 8, blockLength: 8, steps: 8, repetitionPenalty: 0 }))).toThrow(
      /repetition_penalty must be in \(0, 2\]/
    )
  })
})

describe("top-k and top-p", () => {
  const prompt = [5, 17, 33, 2]
  const sampled = (overrides: Partial<NativeSamplingParams>) =>
    runTogether(engine, [
      { prompt, params: greedy({ genLength: 16, blockLength: 8, steps: 16, temperature: 1, seed: 7, ...overrides }) }
    ]).then(([run]) => run!.answer)

  it("top_k 1 samples the argmax: the greedy answer at any temperature", async () => {
    const [reference] = await runTogether(engine, [{ prompt, params: greedy({ genLength: 16, blockLength: 8, steps: 16 }) }])
    expect(await sampled({ topK: 1, temperature: 1.7 })).toEqual(reference!.answer)
  })

  it("restricts the draw, deterministically per seed", async () => {
    const open = await sampled({})
    const nucleus = await sampled({ topP: 0.3 })
    expect(await sampled({ topP: 0.3 })).toEqual(nucleus)
    expect(nucleus).not.toEqual(open)
    expect(await sampled({ topK: 3 })).toEqual(await sampled({ topK: 3 }))
  })

  it("refuses values out of range, naming them", () => {
    const create = (overrides: Partial<NativeSamplingParams>) => () => engine.create(prompt, greedy(overrides))
    expect(create({ topK: -1 })).toThrow(/top_k/)
    expect(create({ topP: 0 })).toThrow(/top_p/)
    expect(create({ topP: 1.5 })).toThrow(/top_p/)
    expect(create({ parallelThreshold: 2 })).toThrow(/parallel_threshold/)
    expect(create({ parallelFactor: -1 })).toThrow(/parallel_factor/)
    expect(create({ parallelThreshold: 0.5, parallelFactor: 1 })).toThrow(/cannot both be set/)
    expect(engine.live()).toBe(0)
  })
})

describe("a suffix", () => {
  /** Steps one sequence to the end; returns its answer and the positions each step committed. */
  const runWithSuffix = async (prompt: ReadonlyArray<number>, params: NativeSamplingParams, suffix: ReadonlyArray<number>) => {
    const id = engine.create(prompt, params, suffix)
    const positions: Array<number> = []
    try {
      for (let guard = 0; guard < 1000; guard++) {
        const [r] = await engine.step([id])
        positions.push(...r!.committed.map((c) => c.position))
        if (r!.finished) break
      }
      return { answer: Array.from(engine.canvas(id)), positions }
    } finally {
      engine.release(id)
    }
  }

  it("is context after the answer's masks: the answer is the middle, and the suffix changes it", async () => {
    const prompt = [5, 17, 33, 2]
    const suffix = [40, 41, 42, 43, 44]
    const params = greedy({ genLength: 12, blockLength: 4, steps: 12 })
    const id = engine.create(prompt, params, suffix)
    expect(engine.sequenceInfo(id)).toMatchObject({ promptLength: 4, genLength: 12, suffixLength: 5 })
    expect(Array.from(engine.canvas(id))).toEqual(Array(12).fill(MASK))
    engine.release(id)

    const infilled = await runWithSuffix(prompt, params, suffix)
    expect(infilled.answer).toHaveLength(12)
    expect(infilled.answer).not.toContain(MASK)
    expect([...infilled.positions].sort((a, b) => a - b)).toEqual(Array.from({ length: 12 }, (_, i) => i))
    const [plain] = await runTogether(engine, [{ prompt, params }])
    expect(infilled.answer).not.toEqual(plain!.answer)
    // An empty suffix is no suffix.
    expect((await runWithSuffix(prompt, params, [])).answer).toEqual(plain!.answer)
  })

  it("counts against the context and may not hold the mask token", () => {
    const params = greedy({ genLength: 16 })
    expect(() => engine.create(Array(200).fill(1), params, Array(41).fill(2))).toThrow(/plus suffix of 41 tokens exceeds/)
    expect(() => engine.create([1], params, [2, MASK])).toThrow(/suffix\[1\] is the mask token/)
    expect(engine.create(Array(200).fill(1), params, Array(40).fill(2))).toBeGreaterThan(0)
  })
})

describe("parallel decoding", () => {
  const prompt = [9, 8, 7, 6, 5]
  const base = greedy({ genLength: 32, blockLength: 8, steps: 32 })

  it("threshold: every token after a step's most confident one had at least the threshold", async () => {
    const threshold = 0.05
    const [run] = await runTogether(engine, [{ prompt, params: { ...base, parallelThreshold: threshold } }], true)
    const info = engine.sequenceInfo(run!.id)
    engine.release(run!.id)
    expect(info.stepsTotal).toBe(32) // the upper bound: one token a step
    expect(info.stepsDone).toBe(run!.results.length)
    expect(info.tokensDenoised).toBe(32)
    expect(run!.answer).not.toContain(MASK)
    for (const step of run!.trace) {
      expect(step.length).toBeGreaterThanOrEqual(1)
      const probabilities = step.map(([, , p]) => p).sort((a, b) => b - a)
      for (const p of probabilities.slice(1)) expect(p).toBeGreaterThanOrEqual(threshold - 1e-6)
    }
    // On this model some steps commit several tokens, so fewer steps than tokens.
    expect(run!.results.length).toBeLessThan(32)
    // Each step stays in its block, and a block is finished before the next begins.
    for (const [s, step] of run!.trace.entries()) {
      for (const [position] of step) expect(Math.floor(position / 8)).toBe(run!.results[s]!.block)
    }
  })

  it("factor: the n-th most confident token of a step had at least 1 - f / (n + 1)", async () => {
    const factor = 1.9
    const [run] = await runTogether(engine, [{ prompt, params: { ...base, parallelFactor: factor } }])
    expect(run!.answer).not.toContain(MASK)
    let several = 0
    for (const step of run!.trace) {
      const probabilities = step.map(([, , p]) => p).sort((a, b) => b - a)
      probabilities.forEach((p, i) => {
        if (i > 0) expect(p).toBeGreaterThanOrEqual(1 - factor / (i + 2) - 1e-6)
      })
      if (step.length > 1) several++
    }
    expect(several).toBeGreaterThan(0)
  })

  it("threshold 1 commits one token a step: the vanilla answer of one step per token", async () => {
    const [vanilla, strict] = await runTogether(engine, [
      { prompt, params: base },
      { prompt, params: { ...base, parallelThreshold: 1 } }
    ])
    expect(strict!.results.length).toBe(32)
    expect(strict!.answer).toEqual(vanilla!.answer)
  })
})

describe("early stop", () => {
  it("finishes when a block ends an answer, filling the rest with EOS; the text before the end is unchanged", async () => {
    // The reference answer [36, 93, 94, 94, ...]: after the first block of 3 the answer has ended.
    const c = byName("steps_under_blocks")
    const [run] = await runTogether(engine, [{ prompt: c.prompt, params: paramsOf(c, { earlyStop: true }) }], true)
    const info = engine.sequenceInfo(run!.id)
    engine.release(run!.id)
    const last = run!.results[run!.results.length - 1]!
    expect(run!.results.length).toBe(1) // the first block's one step (3 steps over 4 blocks)
    expect(last).toMatchObject({ finished: true, reason: "eos", filled: 7 })
    expect(last.committed.slice(-7).map((c) => c.position)).toEqual([3, 4, 5, 6, 7, 8, 9])
    expect(last.committed.slice(-7).map((c) => c.token)).toEqual(Array(7).fill(EOS))
    expect(last.committed.slice(-7).map((c) => c.probability)).toEqual(Array(7).fill(1))
    expect(info).toMatchObject({ stepsDone: 1, tokensDenoised: 3, forwardPasses: 1 })
    const end = c.answer.findIndex((t) => t === EOS || t === EOT)
    expect(run!.answer.slice(0, end + 1)).toEqual(c.answer.slice(0, end + 1))
    expect(run!.answer.slice(3)).toEqual(Array(7).fill(EOS))
  })

  it("keeps the reference's tokens up to the first end token, and stops at the first block that ends the answer", async () => {
    // Reference [9, 9, 67, 94 | 94, 67, ...]: the first block of 4 ends with EOS, so the answer has ended
    // there (the reference goes on to denoise padding that an answer reader never looks at).
    const c = byName("blocks")
    const [run] = await runTogether(engine, [{ prompt: c.prompt, params: paramsOf(c, { earlyStop: true }) }])
    expect(run!.answer).toEqual([...c.answer.slice(0, 4), ...Array(12).fill(EOS)])
    expect(run!.results.length).toBe(2) // 8 steps over 4 blocks: the first block's two
  })

  it("changes nothing when no block ends the answer", async () => {
    const c = byName("cfg") // [66, 93, 73, 21 | 39, ...] with EOT 93: real tokens follow the end token
    const [run] = await runTogether(engine, [{ prompt: c.prompt, params: paramsOf(c, { earlyStop: true }) }])
    expect(run!.answer).toEqual(c.answer)
    expect(run!.results.length).toBe(8)
  })
})
