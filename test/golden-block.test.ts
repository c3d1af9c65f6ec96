/**
 * Block decoding through the native addon, against the golden-block fixtures of the PyTorch reference
 * (tools/reference/block_generate.py, test/fixtures/golden-block): for each family, the model's family
 * info, every case token for token with its trace, denoise steps per block and forwards per phase, alone
 * and in the fixture's batch (one engine step mixing prefill, denoise and commit forwards of different
 * sequences), and the settings block decoding refuses with the field they name. The native tests
 * (block_tests.cpp) check the same fixtures below the addon; this checks what the addon hands TypeScript.
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import type { NativeSamplingParams } from "../src/config/sampling.js"
import { isNativeError, loadAddon, type NativeEngine, type StepSnapshot } from "../src/engine/native.js"

const fixtureDir = join(import.meta.dirname, "fixtures", "golden-block")

interface Case {
  readonly name: string
  readonly prompt: Array<number>
  readonly params: {
    readonly gen_length: number
    readonly block_length: number
    readonly steps: number
    readonly threshold: number
    readonly editing_threshold: number
    readonly max_post_steps: number
  }
  readonly answer: Array<number>
  readonly finished_eos: boolean
  readonly block_steps: Array<number>
  readonly trace: Array<Array<[number, number, number]>>
  readonly forwards: { readonly prefill: number; readonly denoise: number; readonly commit: number }
  readonly edits: number
}

interface Fixture {
  readonly model_type: string
  readonly block_size: number
  readonly mask_token_id: number
  readonly eos_token_ids: Array<number>
  readonly generate: Array<Case>
  readonly batches: Array<Array<number>>
}

interface Run {
  readonly answer: Array<number>
  readonly reason: StepSnapshot["reason"]
  readonly phases: string
  /** Per denoise step: the answer positions it wrote (committed, or provisionally with editing). */
  readonly trace: Array<Array<[number, number, number]>>
  readonly blockSteps: Array<number>
  readonly edits: number
  readonly forwardPasses: number
}

const paramsOf = (c: Case, kvCache: "prefix" | "none"): NativeSamplingParams => ({
  genLength: c.params.gen_length,
  blockLength: c.params.block_length,
  steps: c.params.steps,
  temperature: 0,
  remasking: "low_confidence",
  cfgScale: 0,
  seed: 0,
  kvCache,
  parallelThreshold: c.params.threshold,
  editingThreshold: c.params.editing_threshold,
  maxPostSteps: c.params.max_post_steps
})

/** Steps the sequences together until all have finished; the trace is rebuilt from committed and provisional. */
const runTogether = async (
  engine: NativeEngine,
  jobs: ReadonlyArray<{ prompt: Array<number>; params: NativeSamplingParams }>
): Promise<Array<Run>> => {
  const ids = jobs.map((job) => engine.create(Int32Array.from(job.prompt), job.params))
  const state = ids.map(() => ({
    phases: "",
    trace: [] as Array<Array<[number, number, number]>>,
    blockSteps: [] as Array<number>,
    lastBlock: -1,
    shown: new Map<number, number>(),
    edits: 0,
    reason: null as StepSnapshot["reason"],
    forwardPasses: 0
  }))
  try {
    let running = [...ids]
    for (let round = 0; running.length > 0; round++) {
      if (round > 10_000) throw new Error("sequences did not finish")
      const results = await engine.step(running)
      for (const r of results) {
        const s = state[ids.indexOf(r.id)]!
        const phase = r.phase ?? "denoise"
        s.phases += phase === "prefill" ? "P" : phase === "commit" ? "C" : "D"
        s.forwardPasses = r.forwardPasses
        if (phase === "denoise") {
          if (r.block !== s.lastBlock) {
            s.blockSteps.push(0)
            s.lastBlock = r.block
          }
          s.blockSteps[s.blockSteps.length - 1]! += 1
          const provisional = r.provisional ?? []
          const writes: Array<[number, number, number]> = []
          for (const t of [...r.committed, ...provisional]) {
            const before = s.shown.get(t.position)
            if (before !== t.token) {
              if (before !== undefined) s.edits += 1
              writes.push([t.position, t.token, t.probability])
            }
          }
          writes.sort((a, b) => a[0] - b[0])
          s.trace.push(writes)
          if (r.committed.length > 0 || provisional.length > 0) {
            s.shown = new Map(provisional.map((t) => [t.position, t.token]))
          }
        }
        if (r.finished) s.reason = r.reason
      }
      running = results.filter((r) => !r.finished).map((r) => r.id)
    }
    return ids.map((id, i) => {
      const s = state[i]!
      return {
        answer: Array.from(engine.canvas(id)),
        reason: s.reason,
        phases: s.phases,
        trace: s.trace,
        blockSteps: s.blockSteps,
        edits: s.edits,
        forwardPasses: s.forwardPasses
      }
    })
  } finally {
    for (const id of ids) engine.release(id)
  }
}

/** Positions and tokens exactly, probabilities within 1e-4 (the fixture rounds them to 6 digits). */
const expectMatches = (run: Run, c: Case, cached: boolean) => {
  expect(run.answer, c.name).toEqual(c.answer)
  expect(run.reason === "eos", c.name).toBe(c.finished_eos)
  expect(run.blockSteps, c.name).toEqual(c.block_steps)
  expect(run.edits, c.name).toBe(c.edits)
  expect(run.trace.length, c.name).toBe(c.trace.length)
  run.trace.forEach((step, i) => {
    const want = c.trace[i]!
    expect(
      step.map(([p, t]) => [p, t]),
      `${c.name} step ${i}`
    ).toEqual(want.map(([p, t]) => [p, t]))
    step.forEach(([, , prob], j) => expect(Math.abs(prob - want[j]![2]), `${c.name} step ${i}`).toBeLessThan(1e-4))
  })
  const count = (letter: string) => [...run.phases].filter((p) => p === letter).length
  if (cached) {
    expect({ prefill: count("P"), denoise: count("D"), commit: count("C") }, c.name).toEqual(c.forwards)
    expect(run.forwardPasses, c.name).toBe(run.phases.length)
  } else {
    expect(run.phases, c.name).toBe("D".repeat(c.forwards.denoise))
  }
}

describe.each(["llada2", "sdar", "sdar_moe"])("golden block %s through the addon", (name) => {
  const fixture = JSON.parse(readFileSync(join(fixtureDir, `${name}.json`), "utf8")) as Fixture
  let engine: NativeEngine

  beforeAll(async () => {
    engine = await loadAddon().loadModel(join(fixtureDir, name), { threads: 2 })
  })
  afterAll(() => {
    expect(engine.live()).toBe(0)
  })

  it("describes the family", () => {
    const info = engine.info()
    expect(info.family).toEqual({
      name: fixture.model_type,
      decoding: "block",
      blockLength: fixture.block_size,
      editing: fixture.model_type === "llada2_moe",
      maskTokenId: fixture.mask_token_id,
      eosTokenId: fixture.eos_token_ids[0],
      stopTokenIds: fixture.eos_token_ids.slice(1)
    })
  })

  it("answers every case token for token, cached and recomputed", async () => {
    for (const c of fixture.generate) {
      const [cached] = await runTogether(engine, [{ prompt: c.prompt, params: paramsOf(c, "prefix") }])
      const [full] = await runTogether(engine, [{ prompt: c.prompt, params: paramsOf(c, "none") }])
      expectMatches(cached!, c, true)
      expectMatches(full!, c, false)
    }
  })

  it("gives each case of the fixture's batch what it gets alone", async () => {
    for (const batch of fixture.batches) {
      const cases = batch.map((i) => fixture.generate[i]!)
      const runs = await runTogether(
        engine,
        cases.map((c) => ({ prompt: c.prompt, params: paramsOf(c, "prefix") }))
      )
      runs.forEach((run, i) => expectMatches(run, cases[i]!, true))
      // The batch mixed phases: some step ran a prefill or commit next to another sequence's denoise.
      const length = Math.max(...runs.map((r) => r.phases.length))
      const mixed = Array.from({ length }, (_, k) => new Set(runs.map((r) => r.phases[k]).filter((p) => p !== undefined)))
      expect(mixed.some((phases) => phases.size > 1)).toBe(true)
    }
  })

  it("refuses the settings block decoding does not take, naming them", () => {
    const c = fixture.generate[0]!
    const refused = (change: Partial<NativeSamplingParams>, param: string, suffix?: Array<number>) => {
      let error: unknown
      try {
        engine.create(Int32Array.from(c.prompt), { ...paramsOf(c, "prefix"), ...change }, suffix)
      } catch (e) {
        error = e
      }
      expect(isNativeError(error) && error.code, param).toBe("VDIFF_INVALID_ARGUMENT")
      expect((error as { param?: string }).param).toBe(param)
    }
    refused({ cfgScale: 1 }, "cfg_scale")
    refused({ remasking: "random" }, "remasking")
    refused({ kvCache: "dual" }, "kv_cache")
    refused({ parallelFactor: 1 }, "parallel_factor")
    refused({ blockLength: fixture.block_size * 2 }, "block_length")
    refused({}, "suffix", [1, 2])
    if (fixture.model_type !== "llada2_moe") refused({ editingThreshold: 0.5 }, "editing_threshold")
  })
})
