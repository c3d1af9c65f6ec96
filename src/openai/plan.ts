/**
 * Planning a request (completions and chat): the checks that need the server (its model name, batch size,
 * context length, vocabulary, mask token) and the engine's sampling settings for each prompt — the
 * request's values, else the server's defaults, as src/config/sampling.ts resolves them. Like vLLM's
 * `to_sampling_params`. Ranges that do not depend on the model were checked by the request schema.
 *
 * The engine checks the settings again when it creates a sequence (native/src/core/engine.cpp, validate),
 * as its own invariant; the checks here stay because they answer in OpenAI's words (context_length_exceeded,
 * the batch size as `n`'s bound) and before anything is queued, so a request of several prompts is refused
 * whole.
 */
import type { TemplateChoice } from "./chains.js"
import { Effect, Option, Random } from "effect"
import { BadRequest, NotFound } from "../api/errors.js"
import * as Sampling from "../config/sampling.js"
import type { SamplingSettings } from "../engine/Engine.js"
import { Scheduler } from "../scheduler/Scheduler.js"
import { Tokenizer, type TokenizerShape } from "../tokenizer/Tokenizer.js"
import type { SamplingRequest, Unhonoured } from "./protocol.js"
import { ServingConfig } from "./ServingConfig.js"

/** `model` may be left out; when given it must name the served model. */
export const checkModel = (model: string | undefined) =>
  Effect.flatMap(ServingConfig, (config) =>
    model === undefined || model === config.modelName
      ? Effect.void
      : Effect.fail(
          new NotFound({
            message: `The model \`${model}\` does not exist; this server serves \`${config.modelName}\``,
            param: "model",
            code: "model_not_found"
          })
        )
  )

const notSupported = (param: string, message: string) => Effect.fail(new BadRequest({ message, param, code: "unsupported_parameter" }))

/**
 * A 400 naming the first field of `table` (protocol.ts: chatUnhonoured, completionUnhonoured) that the
 * request gives with a value that would change the answer: it would otherwise be answered as if the field
 * were not there.
 */
const refuseUnhonoured = (request: object, table: Readonly<Record<string, Unhonoured>>) => {
  for (const [name, { neutral, reason }] of Object.entries(table)) {
    const value = (request as Record<string, unknown>)[name]
    if (value !== undefined && !neutral(value)) return notSupported(name, `${name} is not supported: ${reason}`)
  }
  return Effect.void
}

/**
 * logit_bias as the engine takes it: [token, bias] pairs by ascending token. Keys are token ids in decimal
 * (no sign, no leading zero, so that no two keys name one token) inside the vocabulary; biases are numbers
 * from -100 to 100, as OpenAI's.
 */
const logitBiasOf = (bias: Readonly<Record<string, number>> | undefined, vocabSize: number) => {
  const pairs: Array<readonly [number, number]> = []
  for (const [key, value] of Object.entries(bias ?? {})) {
    const id = /^(0|[1-9][0-9]*)$/.test(key) ? Number(key) : Number.NaN
    if (!(id < vocabSize)) {
      return Effect.fail(
        new BadRequest({
          message: `logit_bias key ${JSON.stringify(key)} is not a token id (a decimal integer from 0 to ${vocabSize - 1})`,
          param: "logit_bias"
        })
      )
    }
    if (!(value >= -100 && value <= 100)) {
      return Effect.fail(
        new BadRequest({ message: `logit_bias for token ${key} must be a number from -100 to 100, got ${value}`, param: "logit_bias" })
      )
    }
    pairs.push([id, value])
  }
  return Effect.succeed(pairs.sort((a, b) => a[0] - b[0]))
}

/** Why a decoding other than full canvas takes no suffix (infilling lays tokens after the answer's masks). */
const noSuffix: Record<Exclude<Sampling.Decoding, "full_canvas">, string> = {
  block: "it writes its answer block by block after the prompt",
  dream: "Dream's sampler denoises a canvas of the prompt and the answer's masks, with nothing after them"
}

/** The answer length a request asked for, and under which name (max_tokens or max_completion_tokens). */
export interface MaxTokens {
  readonly value: number
  readonly param: string
}

/** Everything about how to answer a request that does not depend on the prompt. */
export interface AnswerPlan {
  readonly n: number
  readonly seed: number
  readonly stopStrings: ReadonlyArray<string>
  readonly stopTokens: ReadonlySet<number>
  /** min_tokens: the answer's first positions, where no end token, stop token or stop string ends it. */
  readonly minTokens: number
  /** include_stop_str_in_output: an answer's text ends with the stop string that ended it. */
  readonly includeStopString: boolean
  /** truncate_prompt_tokens: the prompt as it is run, its first tokens dropped (`truncatedFrom` set) if needed. */
  readonly truncatePrompt: <P extends PreparedPrompt>(prompt: P) => P
  /** EOS and end-of-turn: where an answer ends. */
  readonly endTokens: ReadonlySet<number>
  readonly stream: boolean
  readonly includeUsage: boolean
  /** vLLM's continuous_usage_stats (with include_usage): each chunk's usage is the tokens sent so far. */
  readonly continuousUsage: boolean
  readonly includeSnapshots: boolean
  readonly returnTokenIds: boolean
  /** The served model's family: which settings applied, and how its steps are reported. */
  readonly family: Sampling.ModelFamily
  /**
   * The engine's settings for a prompt (and suffix) of the given lengths; fails when they leave no room
   * for the answer in the context.
   */
  readonly settingsFor: (promptLength: number, promptParam: string, suffixLength?: number) => Effect.Effect<SamplingSettings, BadRequest>
}

/**
 * The tokens vLLM's bad_words ban: each word as it is and after a space (vLLM bans both forms), each of
 * which must be one token — a word of several tokens is banned in vLLM by the tokens before its last, and
 * a diffusion answer is not written in order, so it is a 400 naming the word.
 */
const bannedWords = (words: ReadonlyArray<string>, tokenizer: TokenizerShape) =>
  Effect.gen(function* () {
    const banned = new Set<number>()
    for (const [i, word] of words.entries()) {
      const bare = word.trimStart()
      if (bare === "") return yield* new BadRequest({ message: `bad_words[${i}] is empty`, param: `bad_words[${i}]` })
      for (const form of [bare, ` ${bare}`]) {
        const tokens = tokenizer.encode(form, { addSpecialTokens: false })
        if (tokens.length !== 1) {
          return yield* new BadRequest({
            message:
              `bad_words[${i}] ${JSON.stringify(form)} is ${tokens.length} tokens: only words whose forms (as written, and ` +
              "after a space) are one token each can be banned, at every position; a word of several tokens is banned by " +
              "the tokens before it, and a diffusion answer is not written in order",
            param: `bad_words[${i}]`,
            code: "unsupported_parameter"
          })
        }
        banned.add(tokens[0]!)
      }
    }
    return banned
  })

/**
 * Checks what completions and chat share and resolves the server's defaults. Parameters the sampler
 * cannot honour (the `unhonoured` table) are accepted only at their neutral values: an answer that
 * silently ignored them would not be the answer the client asked for.
 */
export const makePlan = (
  request: SamplingRequest,
  maxTokens: MaxTokens | undefined,
  /** Alternatives per token the engine reports (completions' logprobs, chat's top_logprobs); 0: none. */
  topLogprobs = 0,
  /** The endpoint's fields that are not honoured (protocol.ts: chatUnhonoured, completionUnhonoured). */
  unhonoured: Readonly<Record<string, Unhonoured>> = {}
) =>
  Effect.gen(function* () {
    const config = yield* ServingConfig
    const tokenizer = yield* Tokenizer
    const scheduler = yield* Scheduler
    yield* checkModel(request.model)
    yield* refuseUnhonoured(request, unhonoured)

    const exclusive = Sampling.exclusiveViolation(request)
    if (exclusive !== undefined) return yield* new BadRequest(exclusive)
    const family = config.family ?? Sampling.lladaFamily
    const misfit = Sampling.familyViolation(request, family)
    if (misfit !== undefined) return yield* notSupported(misfit.param, misfit.message)
    const logitBias = yield* logitBiasOf(request.logit_bias, tokenizer.vocabSize)
    const asked = request.allowed_token_ids
    if (asked !== undefined) {
      if (asked.length === 0) return yield* new BadRequest({ message: "allowed_token_ids must not be empty", param: "allowed_token_ids" })
      yield* checkTokenIds(asked, "allowed_token_ids", tokenizer)
      if (asked.every((id) => id === tokenizer.specialTokens.mask)) {
        return yield* new BadRequest({
          message: "allowed_token_ids holds only the mask token, which the model never writes",
          param: "allowed_token_ids"
        })
      }
    }
    // vLLM's bad_words: their tokens leave the allowed ones (every token of the vocabulary when no
    // allowed_token_ids are given).
    const banned = yield* bannedWords(request.bad_words ?? [], tokenizer)
    const allowed =
      banned.size === 0
        ? asked
        : (asked ?? Array.from({ length: tokenizer.vocabSize }, (_, id) => id)).filter(
            (id) => !banned.has(id) && id !== tokenizer.specialTokens.mask
          )
    if (allowed !== undefined && allowed.length === 0) {
      return yield* new BadRequest({ message: "bad_words bans every token allowed_token_ids allows", param: "bad_words" })
    }
    if (request.stream_options !== undefined && request.stream !== true) {
      return yield* new BadRequest({ message: "stream_options can only be given when stream is true", param: "stream_options" })
    }

    const n = request.n ?? 1
    const { maxConcurrent } = yield* scheduler.stats
    if (n > maxConcurrent) {
      return yield* new BadRequest({
        message: `n must be at most ${maxConcurrent} (the server's batch size), got ${n}`,
        param: "n"
      })
    }

    const stopStrings = request.stop === undefined ? [] : typeof request.stop === "string" ? [request.stop] : [...request.stop]
    if (stopStrings.includes("")) {
      return yield* new BadRequest({ message: "stop strings must not be empty", param: "stop" })
    }
    const special = tokenizer.specialTokens
    const endTokens = new Set([special.eos, ...Option.toArray(special.eot), ...(config.endTokenIds ?? [])])
    const seed = request.seed ?? (yield* Random.nextIntBetween(0, 2 ** 31))
    const defaults = config.defaults
    const minTokens = request.min_tokens ?? 0
    const truncation = request.truncate_prompt_tokens
    if (truncation !== undefined && (truncation === 0 || truncation > config.maxModelLen)) {
      return yield* new BadRequest({
        message: `truncate_prompt_tokens must be -1 (the context length) or from 1 to the context length ${config.maxModelLen}, got ${truncation}`,
        param: "truncate_prompt_tokens"
      })
    }
    const keep = truncation === -1 ? config.maxModelLen : truncation
    const truncatePrompt = <P extends PreparedPrompt>(prompt: P): P =>
      keep === undefined || prompt.tokens.length <= keep
        ? prompt
        : { ...prompt, tokens: prompt.tokens.slice(prompt.tokens.length - keep), truncatedFrom: prompt.tokens.length }

    const settingsFor = (promptLength: number, promptParam: string, suffixLength = 0): Effect.Effect<SamplingSettings, BadRequest> => {
      if (suffixLength > 0 && family.decoding !== "full_canvas") {
        return notSupported(
          "suffix",
          `suffix does not apply to this model (${family.name}, ${Sampling.decodingDocs[family.decoding].words}): ${noSuffix[family.decoding]}`
        )
      }
      const context = promptLength + suffixLength
      const has = suffixLength === 0 ? `${promptLength} tokens` : `${promptLength} tokens and the suffix ${suffixLength}`
      const room = config.maxModelLen - context
      if (room < 1) {
        return Effect.fail(
          new BadRequest({
            message:
              `This model's maximum context length is ${config.maxModelLen} tokens, and the ${promptParam} ` +
              `has ${has}, which leaves no room for an answer. Please shorten the ${promptParam}` +
              `${suffixLength === 0 ? "" : " or the suffix"}.`,
            param: promptParam,
            code: "context_length_exceeded"
          })
        )
      }
      if (maxTokens !== undefined && maxTokens.value > room) {
        return Effect.fail(
          new BadRequest({
            message:
              `This model's maximum context length is ${config.maxModelLen} tokens. However, you requested ` +
              `${context + maxTokens.value} tokens (${promptLength} in the ${promptParam}, ` +
              `${suffixLength === 0 ? "" : `${suffixLength} in the suffix, `}${maxTokens.value} ` +
              `for the answer). Please reduce the length of the ${promptParam} or ${maxTokens.param}.`,
            param: maxTokens.param,
            code: "context_length_exceeded"
          })
        )
      }
      const genLength = maxTokens?.value ?? Math.min(defaults.maxTokens, room)
      if (minTokens > genLength) {
        return Effect.fail(
          new BadRequest({
            message: `min_tokens (${minTokens}) must be at most the answer length (${maxTokens?.param ?? "max_tokens"}: ${genLength})`,
            param: "min_tokens"
          })
        )
      }
      return Effect.succeed({
        ...Sampling.resolve(request, defaults, genLength, family),
        seed,
        logitsEosInf: false,
        confidenceEosEotInf: false,
        eotTokenId: Option.getOrElse(special.eot, () => -1),
        ...(topLogprobs > 0 ? { topLogprobs } : {}),
        ...(minTokens > 0 ? { minTokens, stopTokenIds: request.stop_token_ids ?? [] } : {}),
        ...(request.ignore_eos === true ? { ignoreEos: true } : {}),
        // Every token the answer ends at is barred with the model's own (Qwen's <|im_end|> for Dream).
        ...(minTokens > 0 || request.ignore_eos === true ? { endTokenIds: [...endTokens] } : {}),
        ...(logitBias.length > 0 ? { logitBias } : {}),
        ...(allowed === undefined ? {} : { allowedTokenIds: allowed })
      })
    }

    return {
      n,
      seed,
      stopStrings,
      stopTokens: new Set(request.stop_token_ids ?? []),
      minTokens,
      includeStopString: request.include_stop_str_in_output === true,
      truncatePrompt,
      endTokens,
      stream: request.stream === true,
      includeUsage: request.stream_options?.include_usage === true,
      continuousUsage: request.stream_options?.include_usage === true && request.stream_options?.continuous_usage_stats === true,
      includeSnapshots: request.stream_options?.include_snapshots === true,
      returnTokenIds: request.return_token_ids === true,
      family,
      settingsFor
    } satisfies AnswerPlan
  })

/** Checks that every id of a token prompt is one the tokenizer knows. */
export const checkTokenIds = (tokens: ReadonlyArray<number>, param: string, tokenizer: TokenizerShape) => {
  if (tokens.length === 0) return Effect.fail(new BadRequest({ message: `${param} must not be empty`, param }))
  const bad = tokens.findIndex((id) => id >= tokenizer.vocabSize)
  return bad < 0
    ? Effect.void
    : Effect.fail(
        new BadRequest({
          message: `token id ${tokens[bad]} is not in the vocabulary (ids 0 to ${tokenizer.vocabSize - 1})`,
          param: `${param}[${bad}]`
        })
      )
}

/** A prompt of the request, tokenized, with the name its errors carry ("prompt[2]", "messages"). */
export interface PreparedPrompt {
  readonly tokens: ReadonlyArray<number>
  readonly param: string
  /** Tokens after the answer (completions' `suffix`): the answer is infilled between the two. */
  readonly suffix?: ReadonlyArray<number>
  /**
   * Answer positions fixed from the start (structured output's JSON skeleton; NOT_COMMITTED where the
   * model writes). The answer then ends only where the template does: end tokens and stops do not end
   * it, and filling it whole is finish reason "stop".
   */
  readonly template?: ReadonlyArray<number>
  /** The template's values chosen among known ones (enums, booleans), scored before denoising, and their pad. */
  readonly templateChoices?: { readonly choices: ReadonlyArray<TemplateChoice>; readonly pad: number }
  /** The tokens the template's number slots may take, by answer position (the engine's settings of that name). */
  readonly templateAllowed?: {
    readonly positionAllowed: ReadonlyArray<number>
    readonly allowedSets: ReadonlyArray<ReadonlyArray<number>>
  }
  /** The request field that asked for the template (errors name it); default "response_format". */
  readonly templateParam?: string
  /** truncate_prompt_tokens dropped the first tokens of a prompt this long (AnswerPlan.truncatePrompt). */
  readonly truncatedFrom?: number
}

/**
 * Refuses a prompt or suffix that holds the mask token (typed as text, e.g. "<|mdm_mask|>", or given as
 * an id): on the canvas it marks the positions the model writes, so it cannot stand for itself in the
 * context. The engine refuses it too, but only once the request is queued and in its own words.
 */
export const checkNoMaskToken = (prompts: ReadonlyArray<PreparedPrompt>) =>
  Effect.flatMap(Tokenizer, (tokenizer) => {
    const mask = tokenizer.specialTokens.mask
    for (const prompt of prompts) {
      for (const [param, tokens] of [
        [prompt.param, prompt.tokens],
        ["suffix", prompt.suffix ?? []]
      ] as const) {
        if (tokens.includes(mask)) {
          return Effect.fail(
            new BadRequest({
              message:
                `${param} contains the mask token ${JSON.stringify(tokenizer.decode([mask]))} (id ${mask}), ` +
                "which marks the positions the model fills in and cannot be part of a prompt",
              param
            })
          )
        }
      }
    }
    return Effect.void
  })
