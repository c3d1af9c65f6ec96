/**
 * Test helpers around the native addon: run a set of sequences to the end in one shared step loop and
 * record what every step committed.
 */
import type { NativeEngine, NativeSamplingParams, StepSnapshot } from "../../src/engine/native.js"

export interface Run {
  readonly id: number
  /** The answer (canvas) once finished. */
  readonly answer: Array<number>
  /** Per step of this sequence: [position, token, probability] committed in it. */
  readonly trace: Array<Array<[number, number, number]>>
  readonly reason: StepSnapshot["reason"]
  /** Every step result of this sequence, in order. */
  readonly results: Array<StepSnapshot>
}

export interface Job {
  readonly prompt: ReadonlyArray<number>
  readonly params: NativeSamplingParams
  /** Answer positions fixed from the start (-1: denoised), as structured output lays a JSON skeleton. */
  readonly template?: ReadonlyArray<number>
}

/**
 * Creates every job's sequence and steps all unfinished ones together (one engine.step per round) until
 * all have finished. Sequences are released at the end unless `keep` is set.
 */
export const runTogether = async (engine: NativeEngine, jobs: ReadonlyArray<Job>, keep = false): Promise<Array<Run>> => {
  const ids = jobs.map((job) =>
    engine.create(Int32Array.from(job.prompt), job.params, undefined, job.template === undefined ? undefined : [...job.template])
  )
  const runs = new Map<number, { trace: Run["trace"]; results: Array<StepSnapshot>; reason: Run["reason"] }>(
    ids.map((id) => [id, { trace: [], results: [], reason: null }])
  )
  try {
    let running = [...ids]
    // A bound on rounds, so a sequence that never finishes fails the test instead of hanging it.
    const maxRounds = jobs.reduce((n, job) => Math.max(n, job.params.genLength + job.params.steps), 0) + 1
    for (let round = 0; running.length > 0; round++) {
      if (round > maxRounds) throw new Error(`sequences ${running.join(",")} did not finish in ${maxRounds} steps`)
      const results = await engine.step(running)
      if (results.length !== running.length) throw new Error(`step returned ${results.length} results for ${running.length} ids`)
      for (const r of results) {
        const run = runs.get(r.id)
        if (run === undefined) throw new Error(`step returned an unknown id ${r.id}`)
        run.results.push(r)
        run.trace.push(r.committed.map((c) => [c.position, c.token, c.probability]))
        if (r.finished) run.reason = r.reason
      }
      running = results.filter((r) => !r.finished).map((r) => r.id)
    }
    return ids.map((id) => {
      const run = runs.get(id)!
      return { id, answer: Array.from(engine.canvas(id)), trace: run.trace, reason: run.reason, results: run.results }
    })
  } finally {
    if (!keep) for (const id of ids) engine.release(id)
  }
}

/** Greedy low-confidence settings with every optional field spelled out. */
export const greedy = (overrides: Partial<NativeSamplingParams> = {}): NativeSamplingParams => ({
  genLength: 16,
  blockLength: 8,
  steps: 8,
  temperature: 0,
  remasking: "low_confidence",
  cfgScale: 0,
  seed: 0,
  ...overrides
})
