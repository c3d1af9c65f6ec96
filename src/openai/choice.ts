/**
 * Choice output, diffusion's way: `guided_choice: ["positive", "negative"]` (vLLM's field; also vLLM's newer
 * `structured_outputs: {choice: [...]}`). The answer is one of the strings, the one the model finds
 * likeliest after the prompt.
 *
 * vLLM builds this on constrained sampling, token by token, left to right. A masked diffusion model does
 * not write in order, but it can score: the probability of a whole answer, taken apart by the chain rule
 * over its positions in reading order. A choice of L tokens t1..tL followed by the token that ends an
 * answer (EOS; in chat, the end of the turn) is L + 1 canvases: the prompt, then t1..t(k-1) in place and
 * masks after them, predicting position k. All of a request's canvases run as one scoring job of the
 * scheduler (Scheduler.score), in batched forwards between two steps. Every choice sees the same number of
 * answer positions (the longest choice's, plus one), so choices of different lengths compare fairly, and
 * the end token makes "yes" and "yes sir" different answers.
 *
 * The choice is then the likeliest at temperature 0 (ties to the first listed), or drawn with the request's
 * seed from the choices' probabilities softened by the temperature, after top_k, min_p and top_p over the
 * choices. Each of the n answers draws with seed + its index. The answer's logprobs are the chain's, one per
 * token. The denoising settings, stops and token rules do not apply (400 naming the field).
 */
import { Effect, Option, Stream } from "effect"
import { BadRequest } from "../api/errors.js"
import { requestFields } from "../config/sampling.js"
import type { SamplingSettings, ScoreItem, Scored } from "../engine/Engine.js"
import { Scheduler } from "../scheduler/Scheduler.js"
import { RequestMetrics } from "../telemetry/requests.js"
import { Tokenizer } from "../tokenizer/Tokenizer.js"
import { MAX_CHOICE_CANVASES, MAX_CHOICES, pickChoice } from "./chains.js"
import { fromGenerationError } from "./errors.js"
import { type AnswerPlan, checkNoMaskToken, type PreparedPrompt } from "./plan.js"
import { answeredAtEnd, type ChoiceUpdate, emptyTally, type PromptJob, settledDecoders, settledStep } from "./run.js"
import { ServingConfig } from "./ServingConfig.js"

/** The choices of a request, tokenized, and the token an answer ends with. */
export interface ChoicePlan {
  readonly param: string
  readonly choices: ReadonlyArray<{ readonly text: string; readonly tokens: ReadonlyArray<number> }>
  readonly endToken: number
  /** Answer positions every canvas has: the longest choice's tokens, plus one for the end token. */
  readonly answerLength: number
}

/** The sampling fields a choice reads: its length bound and the draw among the choices. */
const choiceSettings = new Set(["max_tokens", "temperature", "top_k", "top_p", "min_p"])

/** Whether a request field holds a value that changes an answer (not absent, null, false, 0 or empty). */
const given = (value: unknown) =>
  value !== undefined &&
  value !== null &&
  value !== false &&
  !(Array.isArray(value) && value.length === 0) &&
  !(typeof value === "object" && !Array.isArray(value) && Object.keys(value as object).length === 0)

/** The request's list of choices, from guided_choice or structured_outputs.choice. */
const choicesOf = (request: Readonly<Record<string, unknown>>) => {
  const guided = request["guided_choice"]
  const structured = request["structured_outputs"] as Record<string, unknown> | null | undefined
  const fromStructured = structured === undefined || structured === null ? undefined : structured["choice"]
  if (given(guided) && fromStructured !== undefined && fromStructured !== null) {
    return Effect.fail(
      new BadRequest({ message: "give the choices once: guided_choice or structured_outputs.choice", param: "guided_choice" })
    )
  }
  if (guided !== undefined && guided !== null) return Effect.succeed(Option.some({ list: guided, param: "guided_choice" }))
  if (fromStructured !== undefined && fromStructured !== null) {
    return Effect.succeed(Option.some({ list: fromStructured, param: "structured_outputs.choice" }))
  }
  return Effect.succeed(Option.none<{ list: unknown; param: string }>())
}

/**
 * The choice plan of a request that asks for one, or undefined. `conflicting` names the endpoint's own
 * fields the request set that a choice cannot honour (chat's response_format, completions' suffix).
 */
export const planChoice = (
  request: Readonly<Record<string, unknown>>,
  options: {
    readonly chat: boolean
    readonly conflicting: ReadonlyArray<string>
    readonly maxTokens: number | undefined
    /** Tokens that end an answer (AnswerPlan.endTokens): a choice may not hold one. */
    readonly endTokens: ReadonlySet<number>
  }
) =>
  Effect.gen(function* () {
    const asked = yield* choicesOf(request)
    if (Option.isNone(asked)) return undefined
    const { list, param } = asked.value
    if (!Array.isArray(list) || list.length === 0 || list.some((c) => typeof c !== "string")) {
      return yield* new BadRequest({ message: `${param} must be a non-empty array of strings`, param })
    }
    if (list.length > MAX_CHOICES) {
      return yield* new BadRequest({ message: `${param} may hold at most ${MAX_CHOICES} strings, got ${list.length}`, param })
    }
    const sampling = Object.keys(requestFields).filter((field) => !choiceSettings.has(field) && given(request[field]))
    const others = [
      "stop",
      "stop_token_ids",
      "min_tokens",
      "ignore_eos",
      "allowed_token_ids",
      "bad_words",
      "logit_bias",
      "include_stop_str_in_output"
    ].filter((field) => given(request[field]))
    const options_ = request["stream_options"] as Record<string, unknown> | undefined
    const snapshots = options_?.["include_snapshots"] === true ? ["stream_options.include_snapshots"] : []
    const refused = [...sampling, ...others, ...options.conflicting, ...snapshots]
    if (refused.length > 0) {
      return yield* new BadRequest({
        message:
          `${refused.join(", ")} ${refused.length === 1 ? "does" : "do"} not apply with ${param}: the answer is the ` +
          "likeliest of the choices (or one drawn by temperature, top_k, top_p and min_p), scored, not denoised",
        param: refused[0]!,
        code: "unsupported_parameter"
      })
    }
    const tokenizer = yield* Tokenizer
    const config = yield* ServingConfig
    const choices: Array<{ text: string; tokens: ReadonlyArray<number> }> = []
    for (const [i, text] of (list as ReadonlyArray<string>).entries()) {
      const tokens = tokenizer.encode(text, { addSpecialTokens: false })
      if (tokens.length === 0) return yield* new BadRequest({ message: `${param}[${i}] encodes to no tokens`, param: `${param}[${i}]` })
      const special = tokens.find((id) => id === tokenizer.specialTokens.mask || options.endTokens.has(id))
      if (special !== undefined) {
        return yield* new BadRequest({
          message: `${param}[${i}] holds ${JSON.stringify(tokenizer.decode([special]))} (id ${special}), which ${special === tokenizer.specialTokens.mask ? "marks the positions the model fills in" : "ends an answer"}`,
          param: `${param}[${i}]`
        })
      }
      if (options.maxTokens !== undefined && tokens.length > options.maxTokens) {
        return yield* new BadRequest({
          message: `${param}[${i}] is ${tokens.length} tokens, more than max_tokens (${options.maxTokens})`,
          param: `${param}[${i}]`
        })
      }
      choices.push({ text, tokens })
    }
    const canvases = choices.reduce((sum, c) => sum + c.tokens.length + 1, 0)
    if (canvases > MAX_CHOICE_CANVASES) {
      return yield* new BadRequest({
        message: `${param} takes ${canvases} canvases to score (one per token of every choice, plus one each), more than ${MAX_CHOICE_CANVASES}`,
        param
      })
    }
    const special = tokenizer.specialTokens
    // Chat: the end of the turn (LLaDA's <|eot_id|>, else the model's own end token such as Qwen's
    // <|im_end|>); completions: EOS.
    const endToken = options.chat
      ? Option.getOrElse(special.eot, () => config.endTokenIds?.find((id) => id !== special.eos) ?? special.eos)
      : special.eos
    return {
      param,
      choices,
      endToken,
      answerLength: Math.max(...choices.map((c) => c.tokens.length)) + 1
    } satisfies ChoicePlan
  })

/** The chain rule's canvases for every choice after `prompt`, in order: choice by choice, position by position. */
const canvasesOf = (prompt: ReadonlyArray<number>, choice: ChoicePlan, mask: number): Array<ScoreItem> =>
  choice.choices.flatMap(({ tokens }) =>
    Array.from({ length: tokens.length + 1 }, (_, k) => ({
      canvas: [...prompt, ...tokens.slice(0, k), ...new Array<number>(choice.answerLength - k).fill(mask)],
      positions: [prompt.length + k],
      targets: [k < tokens.length ? tokens[k]! : choice.endToken]
    }))
  )

/**
 * One prompt's answers under a choice plan, as a PromptJob that `respond` renders like any other: the
 * scoring runs when the updates are read; each answer then commits its choice's tokens and the end token
 * in one update, with the chain's probabilities.
 */
export const choiceJob = (prompt: PreparedPrompt, settings: SamplingSettings, plan: AnswerPlan, choice: ChoicePlan) =>
  Effect.gen(function* () {
    const scheduler = yield* Scheduler
    const tokenizer = yield* Tokenizer
    const metrics = yield* RequestMetrics
    yield* metrics.started(plan.n)
    const decoders = settledDecoders(plan.n, choice.answerLength, new Set([choice.endToken]), tokenizer)
    const items = canvasesOf(prompt.tokens, choice, tokenizer.specialTokens.mask)
    // The scoring is the prompt's one piece of work: its canvases count once, with the first answer.
    const tallies = decoders.map((_, i) => ({ ...emptyTally(), forwardPasses: i === 0 ? items.length : 0 }))
    const answer = (scores: ReadonlyArray<Scored>) =>
      Effect.gen(function* () {
        // Per choice, the log-probabilities of its tokens and of the end token after them.
        let at = 0
        const chains = choice.choices.map(({ tokens }) => {
          const chain = scores.slice(at, at + tokens.length + 1).map((s) => s.logprobs[0]!)
          at += tokens.length + 1
          return chain
        })
        const totals = chains.map((chain) => chain.reduce((a, b) => a + b, 0))
        const updates: Array<ChoiceUpdate> = []
        for (const [index, decoder] of decoders.entries()) {
          const picked = yield* pickChoice(totals, settings, settings.seed + index)
          const { tokens } = choice.choices[picked]!
          const committed = [...tokens, choice.endToken].map((token, position) => ({
            position,
            token,
            probability: Math.exp(chains[picked]![position]!)
          }))
          const step = settledStep(committed, tallies[index]!.forwardPasses, "eos")
          updates.push({ index, decoder, delta: decoder.commit(committed), step })
        }
        return updates
      })
    const updates = Stream.fromEffect(scheduler.score({ items }).pipe(Effect.mapError(fromGenerationError), Effect.flatMap(answer))).pipe(
      Stream.flattenIterables,
      Stream.tap((update) => metrics.advanced(update.decoder)),
      Stream.concat(answeredAtEnd(metrics, prompt.tokens.length, decoders))
    )
    return { prompt, settings, run: { decoders, tallies, updates } } satisfies PromptJob
  })

/**
 * Every prompt's choice job: the prompt plus the answer's positions must fit the context, which each
 * canvas fills.
 */
export const prepareChoiceJobs = (prompts: ReadonlyArray<PreparedPrompt>, plan: AnswerPlan, choice: ChoicePlan) =>
  Effect.gen(function* () {
    const config = yield* ServingConfig
    const kept = prompts.map(plan.truncatePrompt)
    yield* checkNoMaskToken(kept)
    return yield* Effect.forEach(kept, (prompt) =>
      Effect.gen(function* () {
        const length = prompt.tokens.length + choice.answerLength
        if (length > config.maxModelLen) {
          return yield* new BadRequest({
            message:
              `This model's maximum context length is ${config.maxModelLen} tokens; the ${prompt.param} has ` +
              `${prompt.tokens.length} tokens and the longest of ${choice.param} needs ${choice.answerLength} more ` +
              `(its tokens and the end token). Please shorten the ${prompt.param} or the choices.`,
            param: prompt.param,
            code: "context_length_exceeded"
          })
        }
        const settings = yield* plan.settingsFor(prompt.tokens.length, prompt.param)
        return yield* choiceJob(prompt, settings, plan, choice)
      })
    )
  })
