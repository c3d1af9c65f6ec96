/**
 * Dream decoding through the native addon, against the golden-dream fixtures of the PyTorch reference
 * (tools/reference/dream_generate.py, test/fixtures/golden-dream): for each of the four fixture models
 * (GQA, MHA with a tied head, no q/k/v bias, bf16), the model's family info, the shifted logits (through
 * `score`), every case token for token with its commit trace and the count committed at each step, alone
 * and in the fixture's batches (sequences of different algorithms, lengths and step counts stepped together
 * in one engine), the stochastic paths reproducible per seed, and the settings Dream decoding refuses with
 * the field they name. The native tests (dream_tests.cpp) check the same fixtures below the addon; this
 * checks what the addon hands TypeScript.
 *
 * Tolerances. Positions, tokens, the count per step and the number of steps: exactly. Probabilities: within
 * 1e-4 relative to the fixture's (which are float64 softmaxes of f32 logits written with 6 significant
 * digits, so rounding alone is up to 5e-6 relative; the engine's f32 forward agrees with the reference's
 * within about 1e-6 of the largest logit, which moves a probability by about that much relative): relative
 * rather than absolute so that the small probabilities of the topk_margin and entropy cases are checked as
 * closely as the large ones. The step snapshot carries the committed token's probability but not the
 * algorithm's confidence; for maskgit_plus the two are the same number and both are compared, for
 * topk_margin and entropy the confidence shows only through the order of the commits, which is compared
 * exactly. Logits: `score` gives log-softmax rows, compared with the log-softmax of the fixture's shifted
 * logits within 1e-4 × the row's largest |logit| (the reference README's tolerance; the fixture's values
 * are rounded to 6 digits, about 5e-6 of each).
 *
 * The bf16 model's probabilities: within 2e-2 relative. Its products are the bf16 dot product
 * (native/src/cpu/kernels.h), which rounds each activation to bf16 first, as the reference does; where the
 * two f32 sums (added in different orders) differ in the last bit, an activation can round to the
 * neighbouring bf16 value (2^-8 relative), which moves a probability by up to about 1e-3 relative (8e-4
 * measured on 2026-12-06). Tokens, positions, counts and steps stay exact.
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import type { NativeSamplingParams } from "../src/config/sampling.js"
import { isNativeError, loadAddon, type NativeEngine, type StepSnapshot } from "../src/engine/native.js"

const fixtureDir = join(import.meta.dirname, "fixtures", "golden-dream")

type Alg = "origin" | "maskgit_plus" | "topk_margin" | "entropy"

interface Case {
  readonly name: string
  readonly prompt: Array<number>
  readonly params: {
    readonly gen_length: number
    readonly steps: number
    readonly alg: Alg
    readonly alg_temp: number
    readonly temperature: number
    readonly top_p: number | null
    readonly top_k: number | null
    readonly eps: number
  }
  readonly answer: Array<number>
  /** Answer index of the first EOS, or -1. */
  readonly first_eos: number
  /** Tokens committed per step. */
  readonly counts: Array<number>
  /** Per step: [answer position, token, probability, confidence], ascending position. */
  readonly trace: Array<Array<[number, number, number, number]>>
}

interface Fixture {
  readonly model: string
  readonly model_type: string
  readonly mask_token_id: number
  readonly eos_token_id: number
  /** Canvases with their SHIFTED logits: row i is the prediction for position i. */
  readonly forward: Array<{ readonly tokens: Array<number>; readonly logits: Array<Array<number>> }>
  readonly generate: Array<Case>
  readonly batches: Array<Array<number>>
}

interface Run {
  readonly answer: Array<number>
  readonly reason: StepSnapshot["reason"]
  /** Per step: the committed [answer position, token, probability], as the snapshot lists them. */
  readonly trace: Array<Array<[number, number, number]>>
  readonly snapshots: Array<StepSnapshot>
}

/** A case's settings in the addon's names (blockLength is not read by Dream decoding). */
const paramsOf = (c: Case, seed = 0): NativeSamplingParams => ({
  genLength: c.params.gen_length,
  blockLength: c.params.gen_length,
  steps: c.params.steps,
  temperature: c.params.temperature,
  remasking: "low_confidence",
  cfgScale: 0,
  seed,
  alg: c.params.alg,
  algTemp: c.params.alg_temp,
  eps: c.params.eps,
  ...(c.params.top_p === null ? {} : { topP: c.params.top_p }),
  ...(c.params.top_k === null ? {} : { topK: c.params.top_k })
})

/** Steps the sequences together until all have finished. */
const runTogether = async (
  engine: NativeEngine,
  jobs: ReadonlyArray<{ prompt: Array<number>; params: NativeSamplingParams }>
): Promise<Array<Run>> => {
  const ids = jobs.map((job) => engine.create(Int32Array.from(job.prompt), job.params))
  const state = ids.map(() => ({ trace: [] as Array<Array<[number, number, number]>>, snapshots: [] as Array<StepSnapshot> }))
  try {
    let running = [...ids]
    for (let round = 0; running.length > 0; round++) {
      if (round > 10_000) throw new Error("sequences did not finish")
      const results = await engine.step(running)
      for (const r of results) {
        const s = state[ids.indexOf(r.id)]!
        s.snapshots.push(r)
        s.trace.push(r.committed.map((t) => [t.position, t.token, t.probability]))
      }
      running = results.filter((r) => !r.finished).map((r) => r.id)
    }
    return ids.map((id, i) => {
      const s = state[i]!
      const last = s.snapshots[s.snapshots.length - 1]!
      return { answer: Array.from(engine.canvas(id)), reason: last.reason, trace: s.trace, snapshots: s.snapshots }
    })
  } finally {
    for (const id of ids) engine.release(id)
  }
}

/** The relative probability bound of a fixture model: see the header for the bf16 one. */
const relativeTolerance = (model: string) => (model === "bf16" ? 2e-2 : 1e-4)

const expectClose = (got: number, want: number, relative: number, what: string) =>
  expect(Math.abs(got - want), `${what}: ${got} vs ${want}`).toBeLessThanOrEqual(relative * Math.abs(want))

const expectMatches = (run: Run, c: Case, relative: number) => {
  expect(run.answer, c.name).toEqual(c.answer)
  // The engine reports "eos" when the answer holds the EOS (Dream never stops early; all steps run).
  expect(run.reason, c.name).toBe(c.first_eos >= 0 ? "eos" : "length")
  expect(run.trace.length, `${c.name}: steps`).toBe(c.params.steps)
  expect(
    run.trace.map((step) => step.length),
    `${c.name}: counts`
  ).toEqual(c.counts)
  run.trace.forEach((step, i) => {
    const want = c.trace[i]!
    expect(
      step.map(([p, t]) => [p, t]),
      `${c.name} step ${i}`
    ).toEqual(want.map(([p, t]) => [p, t]))
    step.forEach(([, , probability], j) => {
      expectClose(probability, want[j]![2], relative, `${c.name} step ${i} probability`)
      if (c.params.alg === "maskgit_plus") expectClose(probability, want[j]![3], relative, `${c.name} step ${i} confidence`)
    })
  })
  run.snapshots.forEach((s, i) => {
    expect(s, `${c.name} snapshot ${i}`).toMatchObject({ phase: "denoise", block: 0, stepsDone: i + 1, stepsTotal: c.params.steps })
    expect(s.finished, `${c.name} snapshot ${i}`).toBe(i === c.params.steps - 1)
  })
}

const logSoftmax = (row: ReadonlyArray<number>): Array<number> => {
  const max = Math.max(...row)
  const sum = row.reduce((total, x) => total + Math.exp(x - max), 0)
  const lse = max + Math.log(sum)
  return row.map((x) => x - lse)
}

describe.each(["gqa", "mha_tied", "nobias", "bf16"])("golden Dream %s through the addon", (name) => {
  const fixture = JSON.parse(readFileSync(join(fixtureDir, `${name}.json`), "utf8")) as Fixture
  let engine: NativeEngine

  beforeAll(async () => {
    engine = await loadAddon().loadModel(join(fixtureDir, name), { threads: 2 })
  })
  afterAll(() => {
    expect(engine.live()).toBe(0)
  })

  it("describes the family", () => {
    expect(fixture.model_type).toBe("Dream")
    expect(engine.info().family).toEqual({
      name: "dream",
      decoding: "dream",
      blockLength: 0,
      editing: false,
      maskTokenId: fixture.mask_token_id,
      eosTokenId: fixture.eos_token_id,
      stopTokenIds: []
    })
  })

  it("predicts each position from the output before it: log-softmax of the fixture's shifted logits", async () => {
    for (const [k, canvas] of fixture.forward.entries()) {
      const vocab = canvas.logits[0]!.length
      const positions = canvas.tokens.flatMap((_, p) => Array.from({ length: vocab }, () => p))
      const targets = canvas.tokens.flatMap(() => Array.from({ length: vocab }, (_, v) => v))
      const scores = await engine.score(Int32Array.from(canvas.tokens), Int32Array.from(positions), Int32Array.from(targets))
      canvas.logits.forEach((row, p) => {
        const want = logSoftmax(row)
        const bound = 1e-4 * Math.max(...row.map(Math.abs))
        const worst = Math.max(...want.map((w, v) => Math.abs(scores[p * vocab + v]! - w)))
        expect(worst, `canvas ${k} position ${p}`).toBeLessThanOrEqual(bound)
      })
    }
  })

  it("answers every case token for token, with its commit trace and counts", async () => {
    for (const c of fixture.generate) {
      const [run] = await runTogether(engine, [{ prompt: c.prompt, params: paramsOf(c) }])
      expectMatches(run!, c, relativeTolerance(name))
    }
  })

  it("gives each case of the fixture's batches what it gets alone", async () => {
    for (const batch of fixture.batches) {
      const cases = batch.map((i) => fixture.generate[i]!)
      const runs = await runTogether(
        engine,
        cases.map((c) => ({ prompt: c.prompt, params: paramsOf(c) }))
      )
      runs.forEach((run, i) => expectMatches(run, cases[i]!, relativeTolerance(name)))
      // The batch mixed algorithms and step counts.
      expect(new Set(cases.map((c) => c.params.alg)).size).toBeGreaterThan(1)
      expect(new Set(cases.map((c) => c.params.steps)).size).toBeGreaterThan(1)
    }
  })

  it("draws the stochastic paths (origin, temperature, alg_temp) the same for a seed, differently for another", async () => {
    const base = fixture.generate.find((c) => c.params.gen_length >= 12)!
    for (const change of [
      { alg: "origin" as const },
      { temperature: 1 },
      { alg: "entropy" as const, alg_temp: 0.5 },
      { alg: "maskgit_plus" as const, temperature: 0.8, alg_temp: 1 }
    ]) {
      const c: Case = { ...base, params: { ...base.params, ...change } }
      const draw = async (seeds: ReadonlyArray<number>) =>
        runTogether(
          engine,
          seeds.map((seed) => ({ prompt: c.prompt, params: paramsOf(c, seed) }))
        )
      const [a, b, other] = await draw([7, 7, 8])
      const [alone] = await draw([7])
      const what = JSON.stringify(change)
      expect(b!.trace, what).toEqual(a!.trace)
      expect(alone!.trace, what).toEqual(a!.trace)
      // Every mask is committed by the last step.
      expect(a!.answer.includes(fixture.mask_token_id), what).toBe(false)
      // Another seed gives another run (the commits or their order).
      expect(
        other!.trace.map((step) => step.map(([p, t]) => [p, t])),
        what
      ).not.toEqual(a!.trace.map((step) => step.map(([p, t]) => [p, t])))
    }
  })

  it("refuses the settings Dream decoding does not take, naming them", () => {
    const c = fixture.generate[0]!
    const refused = (change: Partial<NativeSamplingParams>, param: string, suffix?: Array<number>, template?: Array<number>) => {
      let error: unknown
      try {
        engine.create(Int32Array.from(c.prompt), { ...paramsOf(c), ...change } as NativeSamplingParams, suffix, template)
      } catch (e) {
        error = e
      }
      expect(isNativeError(error) && error.code, param).toBe("VDIFF_INVALID_ARGUMENT")
      expect((error as { param?: string }).param, (error as Error).message).toBe(param)
    }
    refused({ cfgScale: 1 }, "cfg_scale")
    refused({ remasking: "random" }, "remasking")
    refused({ parallelThreshold: 0.9 }, "parallel_threshold")
    refused({ parallelFactor: 1 }, "parallel_factor")
    refused({ kvCache: "prefix" }, "kv_cache")
    refused({ kvCache: "dual" }, "kv_cache")
    refused({ minP: 0.1 }, "min_p")
    refused({ logitsEosInf: true }, "logits_eos_inf")
    refused({ confidenceEosEotInf: true }, "confidence_eos_eot_inf")
    refused({ editingThreshold: 0.5 }, "editing_threshold")
    refused({}, "suffix", [1, 2])
    // A template Dream takes (structured output), but not one of another length than the answer.
    refused(
      {},
      "template",
      undefined,
      Array.from({ length: c.params.gen_length + 1 }, (_, i) => (i === 0 ? 1 : -1))
    )
    refused({ algTemp: -1 }, "alg_temp")
    refused({ eps: 0 }, "eps")
    refused({ eps: 1 }, "eps")
    // What Dream decoding does not read is accepted: another block length, early stop, a refresh interval.
    const id = engine.create(Int32Array.from(c.prompt), { ...paramsOf(c), blockLength: 3, earlyStop: false, kvRefreshInterval: 2 })
    engine.release(id)
  })
})
