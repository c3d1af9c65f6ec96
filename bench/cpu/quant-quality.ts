/**
 * What block quantization costs in quality, on the embedded model (models/shakespeare), by three measures:
 *   - own loss on held-out text: each held-out continuation (what Shakespeare wrote after the prompt) is
 *     scored by the model itself, its positions split at random (seeded) into two halves, each half
 *     masked in turn with the prompt and the other half visible (NativeEngine.score), in nats per token;
 *   - log-prob deviation: the mean |log p - log p_first| of those same scores, position by position: how
 *     far the predictions moved, stable from change to change (bench/cpu/RESULTS.md, 2026-12-07);
 *   - agreement: the fraction of answer tokens that greedy (temperature 0) decoding of the same prompts
 *     produces identically with the quantized weights and with the stored ones (a first different token
 *     changes the rest of the answer, so this one jumps by points where the predictions barely moved).
 * Formats: "none" (the checkpoint as stored), "q8_0", "q4_0", each quantized at load (LoadOptions
 * quantize); `fromDir` runs a checkpoint written by `vdiff quantize` instead.
 *
 *   npx tsx bench/cpu/quant-quality.ts [--prompts 32 --gen 64 --formats none,q8_0,q4_0 --threads 2] [--f32]
 *
 * --f32 measures on a copy of the model with every tensor widened to f32 (widenToF32: the same values), so
 * that "none" is the model's exact f32 arithmetic, what the agreement target compares with.
 *
 * test/quantize.test.ts runs it (--f32) and holds Q8_0 to 1% of loss and 90% agreement.
 */
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { parseArgs } from "node:util"
import { Effect } from "effect"
import { embeddedModelDir, promptsFrom, speechesPath } from "../quality.js"
import type { NativeEngine, NativeLoadOptions, NativeSamplingParams } from "../../src/engine/native.js"
import { loadAddon } from "../../src/engine/native.js"
import { make as makeTokenizer } from "../../src/tokenizer/Tokenizer.js"
import { readSafetensorsHeader, readTensor, writeSafetensors } from "../../src/model/safetensors.js"

/**
 * Writes `out`: the model directory `dir` (one model.safetensors) with every tensor widened to F32, the
 * same values; its other files copied. Returns `out`.
 */
export const widenToF32 = async (dir: string, out: string): Promise<string> => {
  mkdirSync(out, { recursive: true })
  for (const f of readdirSync(dir)) if (f !== "model.safetensors") copyFileSync(join(dir, f), join(out, f))
  const path = join(dir, "model.safetensors")
  const header = await readSafetensorsHeader(path)
  const tensors = await Promise.all(
    [...header.tensors.entries()].map(async ([name, entry]) => {
      const values = await readTensor(path, name)
      return {
        name,
        dtype: "F32" as const,
        shape: entry.shape,
        fill: (o: Float32Array, start: number) => o.set(values.subarray(start, start + o.length))
      }
    })
  )
  await writeSafetensors(join(out, "model.safetensors"), tensors, { metadata: header.metadata })
  return out
}

export type Format = "none" | "q8_0" | "q4_0"

export interface FormatQuality {
  readonly format: Format
  readonly dir: string
  readonly weightDtype: string
  /** Own loss on the held-out continuations, nats per token, and its ratio to the first format's. */
  readonly heldOutLoss: number
  readonly lossRatio: number
  /**
   * Mean |log p - log p_first| over the same held-out positions: how far each prediction moved, with no
   * decoding path to diverge (greedy agreement counts every token after a first difference as lost).
   */
  readonly logProbDeviation: number
  /** Fraction of greedy answer tokens equal to the first format's. */
  readonly agreement: number
  readonly seconds: number
}

export interface QuantQualityOptions {
  readonly prompts: number
  readonly genLength: number
  readonly promptTokens?: number
  readonly threads: number
  readonly formats: ReadonlyArray<Format>
  readonly modelDir?: string
  /** A directory per format to load as it is (vdiff quantize output) instead of quantizing at load. */
  readonly fromDir?: Partial<Record<Format, string>>
  /** The addon to load (default: build/native). */
  readonly addonPath?: string
  readonly log?: (line: string) => void
}

/** mulberry32, so the halves of every continuation are the same in every run. */
const random = (seed: number) => () => {
  seed = (seed + 0x6d2b79f5) | 0
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}

/** The log-probabilities of every held-out position (in a fixed order) and their mean negative, nats per token. */
const heldOutScores = async (
  engine: NativeEngine,
  pairs: ReadonlyArray<{ prompt: ReadonlyArray<number>; continuation: ReadonlyArray<number> }>
): Promise<{ readonly loss: number; readonly scores: ReadonlyArray<number> }> => {
  const mask = engine.info().config.maskTokenId
  const all: Array<number> = []
  for (const [p, { prompt, continuation }] of pairs.entries()) {
    const order = Array.from({ length: continuation.length }, (_, i) => i)
    const next = random(1000 + p)
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(next() * (i + 1))
      ;[order[i], order[j]] = [order[j]!, order[i]!]
    }
    for (const half of [order.slice(0, order.length >> 1), order.slice(order.length >> 1)]) {
      const canvas = [...prompt, ...continuation]
      for (const i of half) canvas[prompt.length + i] = mask
      const scores = await engine.score(
        canvas,
        half.map((i) => prompt.length + i),
        half.map((i) => continuation[i]!)
      )
      all.push(...scores)
    }
  }
  return { loss: -all.reduce((a, b) => a + b, 0) / all.length, scores: all }
}

const greedyAnswers = async (
  engine: NativeEngine,
  prompts: ReadonlyArray<ReadonlyArray<number>>,
  genLength: number
): Promise<Array<Array<number>>> => {
  const params: NativeSamplingParams = {
    genLength,
    blockLength: 32,
    steps: genLength,
    temperature: 0,
    remasking: "low_confidence",
    cfgScale: 0,
    seed: 7,
    kvCache: "none",
    parallelThreshold: 0
  }
  const ids = prompts.map((prompt) => engine.create(prompt, params))
  try {
    let running = [...ids]
    while (running.length > 0) running = (await engine.step(running)).filter((r) => !r.finished).map((r) => r.id)
    return ids.map((id) => Array.from(engine.canvas(id)))
  } finally {
    for (const id of ids) engine.release(id)
  }
}

export const measureQuantQuality = async (options: QuantQualityOptions): Promise<Array<FormatQuality>> => {
  const modelDir = options.modelDir ?? embeddedModelDir
  const tokenizer = await Effect.runPromise(makeTokenizer(modelDir))
  const { speeches } = JSON.parse(readFileSync(speechesPath, "utf8")) as { speeches: Array<string> }
  if (speeches.length < options.prompts) throw new Error(`${speechesPath} holds only ${speeches.length} speeches`)
  const pairs = promptsFrom(speeches.slice(0, options.prompts), tokenizer, options.promptTokens ?? 32, options.genLength)
  const addon = loadAddon(options.addonPath)
  const out: Array<FormatQuality> = []
  let firstLoss = 0
  let firstScores: ReadonlyArray<number> | undefined
  let firstAnswers: Array<Array<number>> | undefined
  for (const format of options.formats) {
    const started = performance.now()
    const fromDir = options.fromDir?.[format]
    const load: NativeLoadOptions & { quantize?: string } = {
      threads: options.threads,
      ...(fromDir === undefined ? { quantize: format } : {})
    }
    const engine = await addon.loadModel(fromDir ?? modelDir, load)
    {
      const weightDtype: string = engine.info().weightDtype
      if (fromDir === undefined && format !== "none" && weightDtype !== format) {
        throw new Error(`loaded ${format} but the engine reports weights of ${weightDtype} (an addon without quantize?)`)
      }
      const { loss, scores } = await heldOutScores(engine, pairs)
      firstScores ??= scores
      const logProbDeviation = scores.reduce((a, s, i) => a + Math.abs(s - firstScores![i]!), 0) / scores.length
      const answers = await greedyAnswers(
        engine,
        pairs.map((p) => p.prompt),
        options.genLength
      )
      firstAnswers ??= answers
      if (out.length === 0) firstLoss = loss
      let same = 0
      let total = 0
      answers.forEach((a, i) =>
        a.forEach((t, j) => {
          same += t === firstAnswers![i]![j] ? 1 : 0
          total += 1
        })
      )
      out.push({
        format,
        dir: fromDir ?? modelDir,
        weightDtype,
        heldOutLoss: loss,
        lossRatio: loss / firstLoss,
        logProbDeviation,
        agreement: same / total,
        seconds: (performance.now() - started) / 1000
      })
      options.log?.(
        `${format}: loss ${loss.toFixed(4)}, mean |dlog p| ${logProbDeviation.toExponential(2)}, agreement ${(out.at(-1)!.agreement * 100).toFixed(1)}%, ${out.at(-1)!.seconds.toFixed(1)} s`
      )
    }
  }
  return out
}

export const formatQuantQuality = (rows: ReadonlyArray<FormatQuality>, options: QuantQualityOptions): string =>
  [
    `embedded model, ${options.prompts} held-out prompts, gen ${options.genLength}, greedy, ${options.threads} threads`,
    "format   weights  held-out own loss   vs first   mean |dlog p|   greedy agreement",
    ...rows.map(
      (r) =>
        `${r.format.padEnd(8)} ${r.weightDtype.padEnd(8)} ${r.heldOutLoss.toFixed(4).padStart(17)} ` +
        `${(100 * (r.lossRatio - 1)).toFixed(2).padStart(9)}% ${r.logProbDeviation.toExponential(2).padStart(15)} ` +
        `${(100 * r.agreement).toFixed(1).padStart(17)}%`
    )
  ].join("\n")

if (import.meta.url === `file://${process.argv[1]}`) {
  const { values } = parseArgs({
    options: {
      prompts: { type: "string", default: "32" },
      gen: { type: "string", default: "64" },
      threads: { type: "string", default: "2" },
      formats: { type: "string", default: "none,q8_0,q4_0" },
      model: { type: "string" },
      addon: { type: "string" },
      f32: { type: "boolean", default: false }
    }
  })
  const model = values.model ?? embeddedModelDir
  const modelDir = values.f32 ? await widenToF32(model, join(tmpdir(), `vdiff-f32-${process.pid}`)) : model
  const options: QuantQualityOptions = {
    prompts: Number(values.prompts),
    genLength: Number(values.gen),
    threads: Number(values.threads),
    formats: values.formats!.split(",") as Array<Format>,
    modelDir,
    ...(values.addon === undefined ? {} : { addonPath: values.addon }),
    log: (line: string) => console.error(line)
  }
  try {
    console.log(formatQuantQuality(await measureQuantQuality(options), options))
  } finally {
    if (values.f32) rmSync(modelDir, { recursive: true, force: true })
  }
}
