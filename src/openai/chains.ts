/**
 * Choosing among known values by the chain rule. A masked diffusion model has no left-to-right
 * factorisation of its own, but it can score a value of L tokens in reading order: L + 1 canvases, each
 * with the value's first k tokens in place and masks after them, predicting position k (the last predicts
 * what ends the value). guided_choice scores whole answers this way (choice.ts); a JSON template scores its
 * enum and boolean values in their place among the skeleton's tokens (`TemplateChoice`, structured.ts).
 */
import { Effect, Random } from "effect"
import type { CommittedToken, SamplingSettings, ScoreItem, Scored } from "../engine/Engine.js"
import { NOT_COMMITTED } from "./ChoiceDecoder.js"

/** The most strings (values) one choice may hold. */
export const MAX_CHOICES = 256
/** The most canvases (a value's tokens + 1 each) one request's choices may take to score. */
export const MAX_CHOICE_CANVASES = 4096

/**
 * Which choice an answer takes: the likeliest at temperature 0 (the first of equals), else a draw from
 * softmax(logprob / temperature) over the choices that top_k, min_p and top_p keep. `seed` keys the draw.
 */
export const pickChoice = (logprobs: ReadonlyArray<number>, settings: SamplingSettings, seed: number | string): Effect.Effect<number> =>
  Effect.gen(function* () {
    const best = logprobs.reduce((at, value, i) => (value > logprobs[at]! ? i : at), 0)
    if (settings.temperature === 0) return best
    const scaled = logprobs.map((value) => value / settings.temperature)
    const top = Math.max(...scaled)
    const weights = scaled.map((value) => Math.exp(value - top))
    const total = weights.reduce((a, b) => a + b, 0)
    // Likeliest first (ties to the first listed), as the token filters order a row.
    let kept = weights.map((w, i) => ({ i, p: w / total })).sort((a, b) => b.p - a.p || a.i - b.i)
    const topK = settings.topK ?? 0
    if (topK > 0) kept = kept.slice(0, topK)
    const minP = settings.minP ?? 0
    if (minP > 0) kept = kept.filter((c) => c.p >= minP * kept[0]!.p)
    const topP = settings.topP ?? 1
    if (topP < 1) {
      let sum = 0
      const upTo = kept.findIndex((c) => (sum += c.p) >= topP)
      if (upTo >= 0) kept = kept.slice(0, upTo + 1)
    }
    const mass = kept.reduce((sum, c) => sum + c.p, 0)
    const u = (yield* Random.next.pipe(Effect.withRandom(Random.make(seed)))) * mass
    let acc = 0
    for (const c of kept) {
      acc += c.p
      if (u < acc) return c.i
    }
    return kept.at(-1)!.i
  })

// ---- values chosen in a JSON template -----------------------------------------------------------------

/**
 * A value of a JSON template chosen among known ones (an `enum`, a boolean): `width` answer positions from
 * `start`, one more than the longest value's tokens. The chosen value's tokens go first and the rest is
 * padded with spaces (whitespace JSON allows after a value); the first pad is what ends the value, and
 * is scored with it, so that a value which is a prefix of another is not favoured for being short.
 */
export interface TemplateChoice {
  readonly start: number
  readonly width: number
  /** The values: their JSON text and its tokens. */
  readonly values: ReadonlyArray<{ readonly text: string; readonly tokens: ReadonlyArray<number> }>
}

/** Canvases a template's choices take to score: per value, its tokens and the pad after them. */
export const templateCanvasCount = (choices: ReadonlyArray<TemplateChoice>): number =>
  choices.reduce((sum, choice) => sum + choice.values.reduce((n, value) => n + value.tokens.length + 1, 0), 0)

/**
 * The canvases that score every value of every choice: the prompt and the template, with every position
 * the model writes masked (the other choices and the string values too), the value's first k tokens in
 * place, predicting position k: its token k, or the pad after its last.
 */
export const templateCanvases = (
  prompt: ReadonlyArray<number>,
  template: ReadonlyArray<number>,
  choices: ReadonlyArray<TemplateChoice>,
  pad: number,
  mask: number
): Array<ScoreItem> => {
  const base = template.map((token) => (token === NOT_COMMITTED ? mask : token))
  return choices.flatMap(({ start, values }) =>
    values.flatMap(({ tokens }) =>
      Array.from({ length: tokens.length + 1 }, (_, k) => {
        const answer = base.slice()
        for (let j = 0; j < k; j++) answer[start + j] = tokens[j]!
        return { canvas: [...prompt, ...answer], positions: [prompt.length + start + k], targets: [k < tokens.length ? tokens[k]! : pad] }
      })
    )
  )
}

/** Per choice, per value: the log-probabilities of its tokens and of the pad after them, in the canvases' order. */
export const templateChains = (choices: ReadonlyArray<TemplateChoice>, scores: ReadonlyArray<Scored>): Array<Array<Array<number>>> => {
  let at = 0
  return choices.map(({ values }) =>
    values.map(({ tokens }) => {
      const chain = scores.slice(at, at + tokens.length + 1).map((scored) => scored.logprobs[0]!)
      at += tokens.length + 1
      return chain
    })
  )
}

/**
 * One answer's values: each choice's pick (`pickChoice`, keyed by the answer's seed and the choice's
 * index), as the tokens to commit with their scored probabilities (the pads after the first are filler,
 * probability 1), and the template with them in place.
 */
export const pickTemplateValues = (
  choices: ReadonlyArray<TemplateChoice>,
  chains: ReadonlyArray<ReadonlyArray<ReadonlyArray<number>>>,
  template: ReadonlyArray<number>,
  pad: number,
  settings: SamplingSettings,
  seed: number
) =>
  Effect.gen(function* () {
    const filled = template.slice()
    const committed: Array<CommittedToken> = []
    for (const [c, choice] of choices.entries()) {
      const totals = chains[c]!.map((chain) => chain.reduce((a, b) => a + b, 0))
      const picked = yield* pickChoice(totals, settings, c === 0 ? seed : `${seed}:${c}`)
      const { tokens } = choice.values[picked]!
      const chain = chains[c]![picked]!
      for (let k = 0; k < choice.width; k++) {
        const position = choice.start + k
        const token = k < tokens.length ? tokens[k]! : pad
        filled[position] = token
        committed.push({ position, token, probability: k <= tokens.length ? Math.exp(chain[k]!) : 1 })
      }
    }
    return { committed, template: filled }
  })
