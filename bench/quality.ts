/**
 * What approximate decoding costs in quality, on the embedded model (models/shakespeare): every mode
 * answers the same held-out prompts greedily, and each answer is judged by
 *   - corpus-likeness: the fraction of its words (runs of letters, lowercased) that are words of
 *     tinyshakespeare (tools/train/corpus-words.txt), the measure of test/embedded-model.test.ts, up to
 *     the answer's first end token; a word that the prompt's cut splits is judged whole, and one that the
 *     canvas end cuts is not judged (answerWords);
 *   - own loss: the model's own masked-token loss on the answer, in nats per token: the answer's
 *     positions are split at random (seeded) into two halves, each half is masked in turn with the prompt
 *     and the other half visible, and every answer token is scored once (NativeEngine.score). Scored up
 *     to the answer's first end token; padding after it is not text.
 * The held-out continuation of each prompt (what Shakespeare wrote next) is scored the same way, as the
 * scale of the figures. Modes: none (the reference's vanilla decoding), prefix and dual caches, and
 * parallel decoding by threshold, alone or with a cache ("dual+0.9"). Two measures of degenerate text
 * (issue 19's): the longest run of one token repeated in a row, and distinct-2 (distinct word bigrams over
 * all word bigrams of the mode's answers, words as for corpus-likeness), each up to the answer's first end
 * token. Distinct-2 is taken over words because token bigrams count the tokenizer's punctuation and newline
 * pieces: the held-out text itself scores 0.66 on token bigrams.
 *
 *   npx tsx bench/quality.ts [--prompts 48 --gen 128 --block 32 --prompt-tokens 32 --threads 2
 *       --modes none,prefix,dual,none+0.9,dual+0.9 --corpus tinyshakespeare.txt --model DIR --json out.json --show N]
 *   npx tsx bench/quality.ts --write-speeches tinyshakespeare.txt   (rewrites the fixture of 48 speeches)
 * (--show N prints the first N answers of every mode, as text up to its first end token.)
 *
 * The mode "served" is what the server answers on the model when a request sets no sampling field: the
 * server's defaults under the model's generation_config.json (servedMode).
 *
 * test/acceleration-quality.test.ts runs a smaller instance and holds the modes to a margin.
 */
import { existsSync, readFileSync } from "node:fs"
import { join } from "node:path"
import { parseArgs } from "node:util"
import { Effect, Either, Option } from "effect"
import * as Sampling from "../src/config/sampling.js"
import type { NativeEngine, NativeKvCacheMode, NativeSamplingParams } from "../src/engine/native.js"
import { loadAddon } from "../src/engine/native.js"
import { make as makeTokenizer, type TokenizerShape } from "../src/tokenizer/Tokenizer.js"

const root = join(import.meta.dirname, "..")
export const embeddedModelDir = join(root, "models", "shakespeare")
/** Held-out speeches (bench/quality.ts --write-speeches), so tests need no copy of the corpus. */
export const speechesPath = join(root, "test", "fixtures", "heldout-speeches.json")

export interface Mode {
  readonly name: string
  readonly kvCache: NativeKvCacheMode
  readonly parallelThreshold: number
  /** Sampling temperature (0: greedy, the default); a hot mode shows what a real loss of quality looks like. */
  readonly temperature?: number
  readonly topP?: number
  readonly topK?: number
  readonly minP?: number
  /** EOS/EOT committed last (the engine's confidenceEosEotInf). */
  readonly endLast?: boolean
  readonly repetitionPenalty?: number
  readonly frequencyPenalty?: number
  readonly presencePenalty?: number
  /** Commit positions in random order (LLaDA's remasking "random") instead of the most confident first. */
  readonly randomOrder?: boolean
  /** The block length of this mode (default: the run's --block). */
  readonly blockLength?: number
  /** Classifier-free guidance scale (LLaDA's: the prompt masked for the unconditional pass; 0: off). */
  readonly cfgScale?: number
}

/**
 * "dual+0.9" → a dual cache with threshold 0.9; "none" → vanilla; "hot1.5" → vanilla at temperature 1.5.
 * Sampling options follow after colons: "none:t0.8:p0.9:k40:m0.05:rp1.2:fp0.5:pp0.5:end-last" (temperature,
 * top_p, top_k, min_p, repetition, frequency and presence penalties, EOS/EOT committed last); ":random"
 * commits positions in random order (remasking "random"); ":b8" sets the mode's block length, ":cfg1"
 * classifier-free guidance.
 */
export const parseMode = (name: string): Mode => {
  const [head, ...options] = name.split(":")
  const hot = /^hot(\d+(?:\.\d+)?)$/.exec(head!)
  const [cache, threshold] = hot ? ["none", undefined] : head!.split("+")
  if (cache !== "none" && cache !== "prefix" && cache !== "dual") throw new Error(`unknown mode "${name}"`)
  const t = threshold === undefined ? 0 : Number(threshold)
  if (!(t >= 0 && t <= 1)) throw new Error(`bad threshold in mode "${name}"`)
  let mode: Mode = { name, kvCache: cache, parallelThreshold: t, ...(hot ? { temperature: Number(hot[1]) } : {}) }
  for (const option of options) {
    const m = /^(t|p|k|m|rp|fp|pp|b|cfg)(-?\d+(?:\.\d+)?)$/.exec(option)
    const keys = {
      t: "temperature",
      p: "topP",
      k: "topK",
      m: "minP",
      rp: "repetitionPenalty",
      fp: "frequencyPenalty",
      pp: "presencePenalty",
      b: "blockLength",
      cfg: "cfgScale"
    } as const
    if (option === "end-last") mode = { ...mode, endLast: true }
    else if (option === "random") mode = { ...mode, randomOrder: true }
    else if (m) mode = { ...mode, [keys[m[1] as keyof typeof keys]]: Number(m[2]) }
    else throw new Error(`unknown option "${option}" in mode "${name}"`)
  }
  return mode
}

/**
 * The mode "served": what `vdiff serve` answers a request that sets no sampling field, on this model: the
 * server's documented defaults under the model's generation_config.json (Sampling.modelDefaults, as
 * `--generation-config auto` applies them). Steps stay one token a step, as the server's default does.
 */
export const servedMode = (modelDir: string): Mode => {
  const path = join(modelDir, "generation_config.json")
  let mode: Mode = { name: "served", kvCache: "none", parallelThreshold: 0 }
  if (!existsSync(path)) return mode
  const model = Either.getOrThrowWith(Sampling.modelDefaults(JSON.parse(readFileSync(path, "utf8"))), (e) => new Error(`${path}: ${e}`))
  for (const [field, value] of Object.entries(model)) {
    if (field === "remasking") mode = { ...mode, randomOrder: value === "random" }
    else if (field in servedKeys) mode = { ...mode, [servedKeys[field as keyof typeof servedKeys]]: value }
    else throw new Error(`${path}: bench/quality.ts does not model ${field}`)
  }
  return mode
}

/** The generation_config.json settings that servedMode carries over (besides remasking), by Mode key. */
const servedKeys = {
  kv_cache: "kvCache",
  parallel_threshold: "parallelThreshold",
  temperature: "temperature",
  top_p: "topP",
  top_k: "topK",
  min_p: "minP",
  repetition_penalty: "repetitionPenalty",
  frequency_penalty: "frequencyPenalty",
  presence_penalty: "presencePenalty",
  block_length: "blockLength",
  cfg_scale: "cfgScale"
} as const

/**
 * The engine's settings for `mode` at answer length `genLength` (one token a step, seed 7; `blockLength`
 * unless the mode sets its own). `eot` is the model's end-of-turn token, for a mode that commits ends last.
 */
export const modeParams = (mode: Mode, genLength: number, blockLength: number, eot: number | undefined): NativeSamplingParams => ({
  genLength,
  blockLength: mode.blockLength ?? blockLength,
  steps: genLength,
  temperature: mode.temperature ?? 0,
  remasking: mode.randomOrder ? "random" : "low_confidence",
  cfgScale: mode.cfgScale ?? 0,
  seed: 7,
  kvCache: mode.kvCache,
  parallelThreshold: mode.parallelThreshold,
  ...(mode.topP === undefined ? {} : { topP: mode.topP }),
  ...(mode.topK === undefined ? {} : { topK: mode.topK }),
  ...(mode.minP === undefined ? {} : { minP: mode.minP }),
  ...(mode.repetitionPenalty === undefined ? {} : { repetitionPenalty: mode.repetitionPenalty }),
  ...(mode.frequencyPenalty === undefined ? {} : { frequencyPenalty: mode.frequencyPenalty }),
  ...(mode.presencePenalty === undefined ? {} : { presencePenalty: mode.presencePenalty }),
  ...(mode.endLast ? { confidenceEosEotInf: true, eotTokenId: eot ?? -1 } : {})
})

export interface QualityOptions {
  readonly prompts: number
  readonly genLength: number
  readonly blockLength: number
  /**
   * Tokens of each prompt (BOS included): the start of a held-out speech. The speeches are those of
   * test/fixtures/heldout-speeches.json (48), or drawn from the corpus at corpusPath.
   */
  readonly promptTokens: number
  readonly modes: ReadonlyArray<Mode>
  readonly threads: number
  readonly modelDir?: string
  readonly corpusPath?: string
}

export interface Judged {
  /** Fraction of the words that are corpus words, and how many words there were. */
  readonly corpusWordFraction: number
  readonly words: number
  /** Own masked-token loss, nats per scored token, and how many tokens were scored. */
  readonly ownLoss: number
  readonly scoredTokens: number
  /** The most times one token follows itself in a row in any answer (1: never repeated). */
  readonly longestRun: number
  /** Distinct word bigrams over all word bigrams of the answers. */
  readonly distinct2: number
  /** The answers as text, each up to its first end token (--show prints them). */
  readonly answers: ReadonlyArray<string>
}

/** The answer up to its first end token (the padding after it is not text). */
const text = (answer: ReadonlyArray<number>, endTokens: ReadonlySet<number>): ReadonlyArray<number> => {
  const end = answer.findIndex((t) => endTokens.has(t))
  return end < 0 ? answer : answer.slice(0, end)
}

/** The longest run of one token in a row over the answers. */
export const longestRun = (answers: ReadonlyArray<ReadonlyArray<number>>): number => {
  let longest = 0
  for (const answer of answers) {
    for (let i = 0, run = 0; i < answer.length; i++) {
      run = i > 0 && answer[i] === answer[i - 1] ? run + 1 : 1
      longest = Math.max(longest, run)
    }
  }
  return longest
}

/** Distinct bigrams over all bigrams of the answers (bigrams do not cross answers); 0 when there are none. */
export const distinct2 = (answers: ReadonlyArray<ReadonlyArray<number | string>>): number => {
  const seen = new Set<string>()
  let total = 0
  for (const answer of answers) {
    for (let i = 1; i < answer.length; i++, total++) seen.add(`${answer[i - 1]}\u0000${answer[i]}`)
  }
  return total === 0 ? 0 : seen.size / total
}

export interface ModeQuality extends Judged {
  readonly mode: Mode
  readonly steps: number
  /** Answer tokens committed per step, on average. */
  readonly tokensPerStep: number
  readonly seconds: number
  /** Fraction of answer tokens equal to the first mode's answer at the same position. */
  readonly agreement: number
}

export interface QualityReport {
  readonly options: QualityOptions
  /** The held-out continuations, judged like the answers. */
  readonly heldOut: Judged
  readonly modes: ReadonlyArray<ModeQuality>
}

/**
 * The corpus split of tools/train/corpus.py: the first 90% trains, the rest is held out, cut at the first
 * blank line after the mark.
 */
export const splitCorpus = (corpus: string): { readonly train: string; readonly heldOut: string } => {
  const cut = corpus.indexOf("\n\n", Math.floor(corpus.length * 0.9)) + 2
  return { train: corpus.slice(0, cut), heldOut: corpus.slice(cut) }
}

/** The held-out last 10% of the corpus (splitCorpus). */
export const heldOutText = (corpus: string): string => splitCorpus(corpus).heldOut

/** The words of tinyshakespeare (tools/train/corpus-words.txt). */
export const readCorpusWords = (): Set<string> =>
  new Set(readFileSync(join(root, "tools", "train", "corpus-words.txt"), "utf8").split("\n"))

/** The tokens that end an answer: EOS, and the end of a turn where the tokenizer has one. */
export const endTokensOf = (tokenizer: TokenizerShape): Set<number> => {
  const { eos, eot } = tokenizer.specialTokens
  return new Set([eos, ...Option.toArray(eot)])
}

export const words = (text: string): Array<string> => text.toLowerCase().match(/[a-z]+/g) ?? []

/**
 * The words of an answer that continues `promptText` with `answerText`, judged whole:
 * - a prompt cut after a fixed number of tokens often ends inside a word ("...for Brit" + "ain's"); the
 *   answer's first letters are then the rest of that word, and are judged joined to the prompt's last letters;
 * - an answer that the canvas cut (`cut`: no end token) and that ends in a letter may end inside a word
 *   ("...and hort"); that last word is not judged.
 * The held-out continuations, cut at both ends the same way, are judged by the same rule.
 */
export const answerWords = (promptText: string, answerText: string, cut = false): Array<string> => {
  const tail = /[A-Za-z]+$/.exec(promptText)?.[0] ?? ""
  const joined = tail !== "" && /^[A-Za-z]/.test(answerText)
  const all = words(joined ? tail + answerText : answerText)
  return cut && /[A-Za-z]$/.test(answerText) ? all.slice(0, -1) : all
}

/** `count` passages of `chars` characters, each from the start of a speech, spread evenly over the held-out text. */
export const heldOutSpeeches = (corpus: string, count: number, chars: number): Array<string> => {
  const text = heldOutText(corpus)
  const starts: Array<number> = [0]
  for (let i = text.indexOf("\n\n"); i >= 0; i = text.indexOf("\n\n", i + 2)) starts.push(i + 2)
  const usable = starts.filter((s) => text.length - s >= chars)
  if (usable.length < count) throw new Error(`the held-out text has only ${usable.length} usable speeches`)
  return Array.from({ length: count }, (_, i) => {
    const start = usable[Math.floor((i * usable.length) / count)]!
    return text.slice(start, start + chars)
  })
}

/** Prompts of `promptTokens` tokens (BOS included) and the `continuationTokens` that follow each. */
export const promptsFrom = (
  speeches: ReadonlyArray<string>,
  tokenizer: TokenizerShape,
  promptTokens: number,
  continuationTokens: number
): Array<{ prompt: Array<number>; continuation: Array<number> }> =>
  speeches.map((speech, i) => {
    const tokens = tokenizer.encode(speech, { addSpecialTokens: true })
    if (tokens.length < promptTokens + continuationTokens) {
      throw new Error(`speech ${i} has ${tokens.length} tokens; ${promptTokens + continuationTokens} are needed`)
    }
    return {
      prompt: tokens.slice(0, promptTokens),
      continuation: tokens.slice(promptTokens, promptTokens + continuationTokens)
    }
  })

const readSpeeches = (options: QualityOptions): Array<string> => {
  if (options.corpusPath !== undefined) {
    return heldOutSpeeches(readFileSync(options.corpusPath, "utf8"), options.prompts, SPEECH_CHARS)
  }
  const { speeches } = JSON.parse(readFileSync(speechesPath, "utf8")) as { speeches: Array<string> }
  if (speeches.length < options.prompts) throw new Error(`${speechesPath} holds only ${speeches.length} speeches`)
  return speeches.slice(0, options.prompts)
}

/** Characters per speech passage: enough for 32 + 128 tokens (about 3.5 characters a token). */
const SPEECH_CHARS = 1280

/** A small seeded generator (mulberry32), so the halves of every answer are the same in every run. */
const random = (seed: number) => () => {
  seed = (seed + 0x6d2b79f5) | 0
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}

/** Own loss of `answer` after `prompt`: summed NLL and count over its tokens up to the first end token. */
const ownLoss = async (
  engine: NativeEngine,
  prompt: ReadonlyArray<number>,
  answer: ReadonlyArray<number>,
  endTokens: ReadonlySet<number>,
  seed: number
): Promise<{ nll: number; count: number }> => {
  const end = answer.findIndex((t) => endTokens.has(t))
  const scored = end < 0 ? answer.length : end + 1
  const order = Array.from({ length: scored }, (_, i) => i)
  const next = random(seed)
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1))
    ;[order[i], order[j]] = [order[j]!, order[i]!]
  }
  const mask = engine.info().config.maskTokenId
  let nll = 0
  for (const half of [order.slice(0, scored >> 1), order.slice(scored >> 1)]) {
    if (half.length === 0) continue
    const canvas = [...prompt, ...answer]
    for (const i of half) canvas[prompt.length + i] = mask
    const scores = await engine.score(
      canvas,
      half.map((i) => prompt.length + i),
      half.map((i) => answer[i]!)
    )
    for (const s of scores) nll -= s
  }
  return { nll, count: scored }
}

const judge = async (
  engine: NativeEngine,
  tokenizer: TokenizerShape,
  corpusWords: ReadonlySet<string>,
  endTokens: ReadonlySet<number>,
  pairs: ReadonlyArray<{ prompt: ReadonlyArray<number>; answer: ReadonlyArray<number> }>
): Promise<Judged> => {
  let inCorpus = 0,
    total = 0,
    nll = 0,
    count = 0
  // Each answer up to its first end token, and its words (judged once, for corpus-likeness and distinct-2).
  const texts = pairs.map(({ answer }) => text(answer, endTokens))
  const answers = texts.map((t) => tokenizer.decode(t, { skipSpecialTokens: true }))
  const judged = pairs.map(({ prompt, answer }, i) =>
    answerWords(tokenizer.decode(prompt, { skipSpecialTokens: true }), answers[i]!, texts[i]!.length === answer.length)
  )
  for (const [i, { prompt, answer }] of pairs.entries()) {
    inCorpus += judged[i]!.filter((w) => corpusWords.has(w)).length
    total += judged[i]!.length
    const loss = await ownLoss(engine, prompt, answer, endTokens, 1000 + i)
    nll += loss.nll
    count += loss.count
  }
  return {
    corpusWordFraction: total === 0 ? 0 : inCorpus / total,
    words: total,
    ownLoss: nll / count,
    scoredTokens: count,
    longestRun: longestRun(texts),
    distinct2: distinct2(judged),
    answers
  }
}

/**
 * Answers every prompt in one batch (one engine step per round for all of them). Prompt i is seeded with
 * params.seed + i, as the server seeds each request on its own: with one seed for all, every answer would
 * draw the same noise at the same step and position.
 */
export const generateAll = async (
  engine: NativeEngine,
  prompts: ReadonlyArray<ReadonlyArray<number>>,
  params: NativeSamplingParams
): Promise<{ answers: Array<Array<number>>; steps: number; denoised: number }> => {
  const ids = prompts.map((prompt, i) => engine.create(prompt, { ...params, seed: Number(params.seed) + i }))
  try {
    let running = [...ids],
      steps = 0,
      denoised = 0
    while (running.length > 0) {
      const results = await engine.step(running)
      for (const r of results) {
        steps += 1
        denoised += r.committed.length - r.filled
      }
      running = results.filter((r) => !r.finished).map((r) => r.id)
    }
    return { answers: ids.map((id) => Array.from(engine.canvas(id))), steps, denoised }
  } finally {
    for (const id of ids) engine.release(id)
  }
}

export const measureQuality = async (options: QualityOptions): Promise<QualityReport> => {
  const modelDir = options.modelDir ?? embeddedModelDir
  const tokenizer = await Effect.runPromise(makeTokenizer(modelDir))
  const engine = await loadAddon().loadModel(modelDir, { threads: options.threads })
  const corpusWords = readCorpusWords()
  const endTokens = endTokensOf(tokenizer)
  const eot = tokenizer.specialTokens.eot
  const prompts = promptsFrom(readSpeeches(options), tokenizer, options.promptTokens, options.genLength)
  const heldOut = await judge(
    engine,
    tokenizer,
    corpusWords,
    endTokens,
    prompts.map(({ prompt, continuation }) => ({ prompt, answer: continuation }))
  )
  const modes: Array<ModeQuality> = []
  let first: Array<Array<number>> | undefined
  for (const mode of options.modes) {
    const params = modeParams(mode, options.genLength, options.blockLength, Option.getOrUndefined(eot))
    const started = performance.now()
    const run = await generateAll(
      engine,
      prompts.map((p) => p.prompt),
      params
    )
    const seconds = (performance.now() - started) / 1000
    first ??= run.answers
    let same = 0
    run.answers.forEach((answer, i) => answer.forEach((t, j) => (same += t === first![i]![j] ? 1 : 0)))
    const judged = await judge(
      engine,
      tokenizer,
      corpusWords,
      endTokens,
      prompts.map(({ prompt }, i) => ({ prompt, answer: run.answers[i]! }))
    )
    modes.push({
      ...judged,
      mode,
      steps: run.steps,
      tokensPerStep: run.denoised / run.steps,
      seconds,
      agreement: same / (prompts.length * options.genLength)
    })
  }
  return { options, heldOut, modes }
}

export const formatReport = (report: QualityReport): string => {
  const { options } = report
  const vanilla = report.modes[0]
  const row = (cells: ReadonlyArray<string>) => cells.map((c, i) => (i === 0 ? c.padEnd(16) : c.padStart(11))).join(" ")
  const lines = [
    `${options.modelDir ?? "embedded model"}, ${options.prompts} held-out prompts of ${options.promptTokens} tokens, gen ${options.genLength}, ` +
      `block ${options.blockLength} (or the mode's), steps = gen, greedy unless the mode samples, ${options.threads} threads`,
    `own loss: the model's masked-token loss on the answer (nats/token, lower = likelier to the model); ` +
      `corpus: fraction of answer words that are corpus words; vs: relative to ${vanilla?.mode.name ?? "-"}; ` +
      `same: answer tokens equal to ${vanilla?.mode.name ?? "-"}'s`,
    "",
    row(["mode", "own loss", "vs", "corpus", "vs", "words", "run", "distinct-2", "tok/step", "same", "seconds"]),
    row([
      "held-out text",
      report.heldOut.ownLoss.toFixed(3),
      "",
      report.heldOut.corpusWordFraction.toFixed(3),
      "",
      String(report.heldOut.words),
      String(report.heldOut.longestRun),
      report.heldOut.distinct2.toFixed(3),
      "",
      "",
      ""
    ])
  ]
  for (const m of report.modes) {
    const lossVs = vanilla ? `${(100 * (m.ownLoss / vanilla.ownLoss - 1)).toFixed(1)}%` : ""
    const corpusVs = vanilla ? `${(100 * (m.corpusWordFraction - vanilla.corpusWordFraction)).toFixed(1)} pt` : ""
    lines.push(
      row([
        m.mode.name,
        m.ownLoss.toFixed(3),
        lossVs,
        m.corpusWordFraction.toFixed(3),
        corpusVs,
        String(m.words),
        String(m.longestRun),
        m.distinct2.toFixed(3),
        m.tokensPerStep.toFixed(2),
        m.agreement.toFixed(3),
        m.seconds.toFixed(1)
      ])
    )
  }
  return lines.join("\n")
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { values } = parseArgs({
    options: {
      prompts: { type: "string", default: "48" },
      gen: { type: "string", default: "128" },
      block: { type: "string", default: "32" },
      "prompt-tokens": { type: "string", default: "32" },
      threads: { type: "string", default: "2" },
      modes: { type: "string", default: "none,prefix,dual,none+0.9,dual+0.9" },
      corpus: { type: "string" },
      model: { type: "string" },
      json: { type: "string" },
      show: { type: "string", default: "0" },
      "write-speeches": { type: "string" }
    }
  })
  if (values["write-speeches"] !== undefined) {
    const { writeFileSync } = await import("node:fs")
    const speeches = heldOutSpeeches(readFileSync(values["write-speeches"], "utf8"), 48, SPEECH_CHARS)
    const source =
      "tinyshakespeare (public domain), the held-out last 10% (tools/train/corpus.py): " +
      "48 passages from the start of speeches spread evenly over it"
    writeFileSync(speechesPath, JSON.stringify({ source, speeches }, null, 1) + "\n")
    console.log(`wrote ${speeches.length} speeches to ${speechesPath}`)
    process.exit(0)
  }
  const report = await measureQuality({
    prompts: Number(values.prompts),
    genLength: Number(values.gen),
    blockLength: Number(values.block),
    promptTokens: Number(values["prompt-tokens"]),
    threads: Number(values.threads),
    modes: values.modes!.split(",").map((name) => (name === "served" ? servedMode(values.model ?? embeddedModelDir) : parseMode(name))),
    ...(values.corpus === undefined ? {} : { corpusPath: values.corpus }),
    ...(values.model === undefined ? {} : { modelDir: values.model })
  })
  console.log(formatReport(report))
  for (const m of report.modes) {
    for (const [i, answer] of m.answers.slice(0, Number(values.show)).entries()) {
      console.log(`\n[${m.mode.name} #${i}] ${JSON.stringify(answer)}`)
    }
  }
  if (values.json !== undefined) {
    const { writeFileSync } = await import("node:fs")
    writeFileSync(values.json, JSON.stringify(report, null, 2))
  }
}
