/**
 * A deterministic stand-in for the native engine, for tests of everything above it (scheduler, server).
 * Each sequence commits one token per step, left to right, so a sequence of gen_length G finishes after G
 * steps; token = (prompt[0] + seed + position) % 1000. It records every batch it stepped, and can be told
 * to fail any step that includes a given prompt (to test fault isolation) or to take time per step.
 *
 * With a `script`, the answer's tokens, the order positions are committed in and their probabilities are
 * the script's instead (for tests of what is built on the committed tokens: text, stops, streaming).
 *
 * A suffix is recorded (and counts against the context) but does not change the answer. Every step is
 * one forward pass (two with cfg); with a KV cache the first step of each block counts as a refresh;
 * nothing is ever filled by an early stop. Stepping a finished sequence fails, as it does natively.
 *
 * Scoring: the fake model expects token (canvas[0] + position) % 1000 at a canvas position; the
 * log-probability it gives a target is -|target - expected| / 10 (a ranking, not a distribution); its
 * likeliest tokens and ranks run expected, expected + 1, expected - 1, expected + 2, ...
 */
import { Effect, Layer } from "effect"
import { Engine, type EngineShape, type SamplingSettings, type ScoreItem, type SequenceId, type StepResult } from "./Engine.js"
import { EngineFailure, InvalidRequestError } from "./errors.js"

export interface FakeEngineOptions {
  /** Milliseconds each step takes. */
  readonly stepMs?: number
  /** A step that includes a sequence whose prompt starts with this token fails. */
  readonly failOnPromptToken?: number
  readonly maxSequenceLength?: number
  readonly script?: FakeScript
}

export interface FakeScript {
  /** The whole answer (genLength tokens) a sequence produces. */
  readonly answer: (prompt: ReadonlyArray<number>, settings: SamplingSettings) => ReadonlyArray<number>
  /**
   * The answer positions committed by each step, in order; default one per step, left to right. Schedules
   * of different lengths per seed make the sequences of one request finish at different steps, as an early
   * stop does.
   */
  readonly schedule?: (genLength: number, settings: SamplingSettings) => ReadonlyArray<ReadonlyArray<number>>
  /** The probability a token is committed with; default 0.5. */
  readonly probability?: (position: number, token: number) => number
  /** Tokens that make the finish reason "eos" when the answer holds one (EOS, end-of-turn). */
  readonly endTokens?: ReadonlyArray<number>
}

export interface FakeEngine extends EngineShape {
  /** The sequence ids of every step, in order. */
  readonly batches: Array<ReadonlyArray<SequenceId>>
  /** The items of every score call, in order. */
  readonly scored: Array<ReadonlyArray<ScoreItem>>
  readonly created: Array<{
    readonly id: SequenceId
    readonly prompt: ReadonlyArray<number>
    readonly settings: SamplingSettings
    readonly suffix: ReadonlyArray<number>
    /** The answer's fixed positions (structured output, a tool call), when given. */
    readonly template?: ReadonlyArray<number>
  }>
}

const MASK = 999_999

interface FakeSequence {
  readonly prompt: ReadonlyArray<number>
  readonly settings: SamplingSettings
  readonly canvas: Int32Array
  done: number
  /** Scripted: the answer and the positions each step commits. */
  answer?: ReadonlyArray<number>
  schedule?: ReadonlyArray<ReadonlyArray<number>>
}

/** The fake model's KV cache bytes per canvas position. */
const KV_BYTES_PER_POSITION = 64

const forwardPasses = (s: FakeSequence) => s.done * (s.settings.cfgScale > 0 ? 2 : 1)

/** Refreshes so far of a cached sequence whose latest step worked on `block`: one per block begun. */
const kvRefreshes = (s: FakeSequence, block: number) =>
  (s.settings.kvCache ?? "none") === "none" ? 0 : (block + 1) * (s.settings.cfgScale > 0 ? 2 : 1)

export const makeFake = (options: FakeEngineOptions = {}): FakeEngine => {
  const sequences = new Map<SequenceId, FakeSequence>()
  const script = options.script
  const batches: Array<ReadonlyArray<SequenceId>> = []
  const scored: Array<ReadonlyArray<ScoreItem>> = []
  const created: FakeEngine["created"] = []
  let nextId = 1
  const maxLen = options.maxSequenceLength ?? 4096

  const scriptedStep = (id: SequenceId, s: FakeSequence): StepResult => {
    const answer = s.answer!
    const schedule = s.schedule!
    const positions = [...schedule[s.done]!].sort((a, b) => a - b)
    const committed = positions.map((position) => {
      const token = answer[position]!
      s.canvas[position] = token
      return { position, token, probability: script?.probability?.(position, token) ?? 0.5 }
    })
    s.done++
    const finished = s.done === schedule.length
    const ends = new Set(script?.endTokens ?? [])
    return {
      id,
      committed,
      finished,
      reason: finished ? (Array.from(s.canvas).some((token) => ends.has(token)) ? "eos" : "length") : null,
      block: Math.floor((positions[0] ?? 0) / s.settings.blockLength),
      stepsDone: s.done,
      stepsTotal: schedule.length,
      filled: 0,
      forwardPasses: forwardPasses(s),
      kvRefreshes: kvRefreshes(s, Math.floor((positions[0] ?? 0) / s.settings.blockLength))
    }
  }

  return {
    modelDir: "fake",
    info: {
      config: {
        dModel: 8,
        nHeads: 1,
        nKvHeads: 1,
        nLayers: 1,
        mlpHiddenSize: 8,
        vocabSize: 1000,
        embeddingSize: 1000,
        maskTokenId: MASK,
        eosTokenId: 998,
        maxSequenceLength: maxLen,
        ropeTheta: 10000,
        rmsNormEps: 1e-5,
        weightTying: false,
        includeBias: false
      },
      backend: "cpu",
      device: "fake",
      gemm: "none",
      memoryUsedBytes: 0,
      memoryTotalBytes: 0,
      weightDtype: "f32",
      parameterCount: 0,
      weightBytes: 0,
      packedWeightBytes: 0,
      kvCacheBytesPerPosition: KV_BYTES_PER_POSITION,
      kvCacheBudgetBytes: 0,
      prefixCacheBytes: 0
    },
    batches,
    scored,
    created,
    create: (prompt, settings, suffix = [], template) =>
      Effect.suspend(() => {
        if (prompt.length + settings.genLength + suffix.length > maxLen) {
          return Effect.fail(new InvalidRequestError({ message: "prompt too long for the context" }))
        }
        const id = nextId++
        const sequence: FakeSequence = { prompt, settings, canvas: new Int32Array(settings.genLength).fill(MASK), done: 0 }
        if (script !== undefined) {
          sequence.answer = script.answer(prompt, settings)
          sequence.schedule =
            script.schedule?.(settings.genLength, settings) ?? Array.from({ length: settings.genLength }, (_, position) => [position])
        }
        if (template !== undefined) {
          // As natively: the template's tokens are in place from the start and never reported; the
          // answer's other positions are committed one a step, in order.
          sequence.answer ??= Array.from(
            { length: settings.genLength },
            (_, position) => ((prompt[0] ?? 0) + settings.seed + position) % 1000
          )
          sequence.schedule = template.flatMap((token, position) => (token === -1 ? [[position]] : []))
          template.forEach((token, position) => {
            if (token !== -1) sequence.canvas[position] = token
          })
        }
        sequences.set(id, sequence)
        created.push({ id, prompt, settings, suffix, ...(template === undefined ? {} : { template }) })
        return Effect.succeed(id)
      }),
    step: (ids) =>
      Effect.gen(function* () {
        batches.push([...ids])
        if (options.stepMs !== undefined) yield* Effect.sleep(options.stepMs)
        const results: Array<StepResult> = []
        for (const id of ids) {
          const s = sequences.get(id)
          if (s === undefined) return yield* new InvalidRequestError({ message: `unknown sequence ${id}` })
          // As natively: stepping a finished sequence is the caller's mistake.
          if (s.done >= (s.schedule?.length ?? s.settings.genLength)) {
            return yield* new InvalidRequestError({ message: `sequence ${id} is already finished` })
          }
          if (options.failOnPromptToken !== undefined && s.prompt[0] === options.failOnPromptToken) {
            return yield* new EngineFailure({ message: "injected fault", code: "VDIFF_INTERNAL" })
          }
        }
        for (const id of ids) {
          const s = sequences.get(id)!
          if (s.answer !== undefined) {
            results.push(scriptedStep(id, s))
            continue
          }
          const position = s.done
          const token = ((s.prompt[0] ?? 0) + s.settings.seed + position) % 1000
          s.canvas[position] = token
          s.done++
          const finished = s.done === s.settings.genLength
          results.push({
            id,
            committed: [{ position, token, probability: 0.5 }],
            finished,
            reason: finished ? "length" : null,
            block: Math.floor(position / s.settings.blockLength),
            stepsDone: s.done,
            stepsTotal: s.settings.genLength,
            filled: 0,
            forwardPasses: forwardPasses(s),
            kvRefreshes: kvRefreshes(s, Math.floor(position / s.settings.blockLength))
          })
        }
        return results
      }),
    score: (items) =>
      Effect.gen(function* () {
        scored.push(items)
        if (options.stepMs !== undefined) yield* Effect.sleep(options.stepMs)
        if (options.failOnPromptToken !== undefined && items.some((item) => item.canvas[0] === options.failOnPromptToken)) {
          return yield* new EngineFailure({ message: "injected fault", code: "VDIFF_INTERNAL" })
        }
        // The likeliest tokens: the expected one, then those beside it (one above, one below, ...).
        const expected = (item: ScoreItem, position: number) => ((item.canvas[0] ?? 0) + position) % 1000
        const topOf = (e: number, k: number) =>
          Array.from({ length: k }, (_, i) => {
            const token = e + (i % 2 === 1 ? (i + 1) / 2 : -i / 2)
            return { token, logprob: -Math.abs(token - e) / 10 }
          })
        return items.map((item) => ({
          logprobs: Float64Array.from(item.positions, (position, j) => -Math.abs(item.targets[j]! - expected(item, position)) / 10),
          top: (item.topLogprobs ?? 0) > 0 ? item.positions.map((position) => topOf(expected(item, position), item.topLogprobs!)) : [],
          // In topOf's order: the expected token 1, one above 2, one below 3, two above 4, ...
          ranks: Int32Array.from(item.rank === true ? item.positions : [], (position, j) => {
            const d = item.targets[j]! - expected(item, position)
            return d === 0 ? 1 : d > 0 ? 2 * d : 2 * -d + 1
          })
        }))
      }),
    release: (id) => Effect.sync(() => void sequences.delete(id)),
    canvas: (id) => Effect.sync(() => Int32Array.from(sequences.get(id)?.canvas ?? [])),
    live: Effect.sync(() => sequences.size),
    // As natively: an unfinished cached sequence holds a cache per canvas (two with cfg).
    kvCacheBytes: Effect.sync(() => {
      let bytes = 0
      for (const [id, s] of sequences) {
        const suffix = created.find((c) => c.id === id)?.suffix.length ?? 0
        const finished = s.done >= (s.schedule?.length ?? s.settings.genLength)
        if ((s.settings.kvCache ?? "none") === "none" || finished) continue
        bytes += (s.prompt.length + s.settings.genLength + suffix) * KV_BYTES_PER_POSITION * (s.settings.cfgScale > 0 ? 2 : 1)
      }
      return bytes
    }),
    prefixCache: Effect.succeed({ capacityBytes: 0, bytes: 0, entries: 0, lookups: 0, hits: 0, hitPositions: 0, inserts: 0, evictions: 0 })
  }
}

export const layerFake = (engine: FakeEngine): Layer.Layer<Engine> => Layer.succeed(Engine, engine)
