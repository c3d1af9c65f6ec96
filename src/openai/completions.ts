/**
 * POST /v1/completions: one or more prompts (text or token ids), n answers each, as one JSON response or
 * as server-sent events. With `suffix` the answer is infilled: the canvas is prompt, masks, suffix (the
 * suffix tokenized without special tokens, the same for every prompt); the text returned is the inserted
 * text only, as OpenAI's, and usage counts the suffix among the prompt tokens. With response_format
 * json_schema (or vLLM's guided_json, structured_outputs.json) each prompt's answer is laid out as chat's
 * structured output is (structured.ts).
 */
import { Effect } from "effect"
import { RequestId } from "../api/RequestId.js"
import { Scheduler } from "../scheduler/Scheduler.js"
import { Tokenizer, type TokenizerShape } from "../tokenizer/Tokenizer.js"
import { BadRequest } from "../api/errors.js"
import type { ChoiceDecoder } from "./ChoiceDecoder.js"
import { type CompletionLogprobs, type CompletionRequest, completionUnhonoured } from "./protocol.js"
import { checkNoMaskToken, checkTokenIds, makePlan, type PreparedPrompt } from "./plan.js"
import { completionLogprobs, concatLogprobs, respond, TokenTexts, tokenLogprobs } from "./render.js"
import { promptOnlyJobs, rankedLogprobs, scorePrompt } from "./promptLogprobs.js"
import { preparePromptJobs, type PromptJob } from "./run.js"
import { planChoice, prepareChoiceJobs } from "./choice.js"
import { ServingConfig } from "./ServingConfig.js"
import { planStructured, promptTemplate, requestedFormat, templateConflicts } from "./structured.js"

/** A prompt with the text that `echo` puts before its answer. */
interface CompletionPrompt extends PreparedPrompt {
  readonly text: string
}

/**
 * The request's prompts: a string or a list of token ids is one prompt; a list of strings or of token id
 * lists is one prompt per entry. Text is encoded with the tokenizer's special tokens (BOS), as vLLM does.
 */
const preparePrompts = (prompt: CompletionRequest["prompt"], tokenizer: TokenizerShape) =>
  Effect.gen(function* () {
    const fromText = (text: string, param: string): CompletionPrompt => ({ text, tokens: tokenizer.encode(text), param })
    const fromTokens = (tokens: ReadonlyArray<number>, param: string) =>
      Effect.as(checkTokenIds(tokens, param, tokenizer), {
        tokens,
        param,
        text: tokenizer.decode(tokens, { skipSpecialTokens: true })
      })
    const prompts: Array<CompletionPrompt> = []
    if (typeof prompt === "string") prompts.push(fromText(prompt, "prompt"))
    else if (prompt.length === 0) return yield* new BadRequest({ message: "prompt must not be empty", param: "prompt" })
    else if (typeof prompt[0] === "number") prompts.push(yield* fromTokens(prompt as ReadonlyArray<number>, "prompt"))
    else {
      for (const [i, entry] of prompt.entries()) {
        const param = `prompt[${i}]`
        prompts.push(typeof entry === "string" ? fromText(entry, param) : yield* fromTokens(entry as ReadonlyArray<number>, param))
      }
    }
    for (const p of prompts) {
      if (p.tokens.length === 0) return yield* new BadRequest({ message: `${p.param} encodes to no tokens`, param: p.param })
    }
    return prompts
  }).pipe(
    Effect.tap((prompts) =>
      Effect.annotateCurrentSpan({
        "vdiff.prompts": prompts.length,
        "vdiff.prompt_tokens": prompts.reduce((sum, p) => sum + p.tokens.length, 0)
      })
    ),
    Effect.withSpan("vdiff.tokenize")
  )

export const completions = (request: CompletionRequest) =>
  Effect.gen(function* () {
    const tokenizer = yield* Tokenizer
    const config = yield* ServingConfig
    const scheduler = yield* Scheduler
    const requestId = yield* RequestId
    const maxTokens = request.max_tokens === undefined ? undefined : { value: request.max_tokens, param: "max_tokens" }
    const hasSuffix = request.suffix !== undefined && request.suffix !== ""
    // Structured output: the JSON skeleton is laid on the canvas after each prompt (structured.ts), and
    // the answer is as long as it is.
    const format = yield* requestedFormat(request)
    if (format !== undefined && format.type !== "text") {
      const clash = hasSuffix ? "suffix" : request.logprobs !== undefined ? "logprobs" : undefined
      if (clash !== undefined) {
        return yield* new BadRequest({
          message:
            clash === "suffix"
              ? `suffix cannot be used with ${format.param}: the answer is the JSON skeleton laid after the prompt, not text infilled before a suffix`
              : `logprobs is not supported with ${format.param} on completions: the text is the JSON read back from its value slots, which text_offset cannot index token by token (chat's logprobs give the tokens)`,
          param: clash,
          code: "unsupported_parameter"
        })
      }
    }
    const structured = yield* planStructured({
      type: format?.type,
      schema: format?.schema,
      param: format?.param ?? "response_format",
      ...(format === undefined ? {} : { schemaParam: format.schemaParam }),
      maxTokens,
      conflicting: templateConflicts(request)
    })
    const plan = yield* makePlan(
      request,
      structured === undefined ? maxTokens : { value: structured.template.length, param: "max_tokens" },
      request.logprobs ?? 0,
      completionUnhonoured
    )
    if (request.max_tokens === 0 && request.echo !== true) {
      return yield* new BadRequest({
        message: "max_tokens must be at least 1, or 0 with echo (the prompt alone, with its logprobs when asked)",
        param: "max_tokens"
      })
    }
    if (request.best_of !== undefined && request.best_of !== plan.n) {
      return yield* new BadRequest({
        message: "best_of other than n is not supported",
        param: "best_of",
        code: "unsupported_parameter"
      })
    }

    const suffix = hasSuffix ? tokenizer.encode(request.suffix!, { addSpecialTokens: false }) : []
    const prompts = (yield* preparePrompts(request.prompt, tokenizer)).map((prompt) =>
      suffix.length > 0 ? { ...prompt, suffix } : structured === undefined ? prompt : { ...prompt, ...promptTemplate(structured) }
    )
    // Every prompt is one request to the scheduler, all submitted at once: a list longer than an idle
    // server's batch and queue together can never be admitted whole, so it is the request that is wrong
    // (400), not the moment (503), and nothing is submitted. (A single prompt can only meet a queue that is
    // full now: 503, retry later.)
    const { capacity, maxConcurrent } = yield* scheduler.stats
    const atOnce = capacity + Math.floor(maxConcurrent / plan.n)
    if (prompts.length > 1 && prompts.length > atOnce) {
      return yield* new BadRequest({
        message:
          `prompt has ${prompts.length} prompts, but this server takes at most ${atOnce} requests of n = ${plan.n} ` +
          `at once (${Math.floor(maxConcurrent / plan.n)} in its batch, ${capacity} waiting); ` +
          `send at most ${atOnce} prompts per request`,
        param: "prompt",
        code: "too_many_prompts"
      })
    }
    const choice = yield* planChoice(request, {
      chat: false,
      conflicting: suffix.length > 0 ? ["suffix"] : structured === undefined || format === undefined ? [] : [format.param],
      maxTokens: request.max_tokens,
      endTokens: plan.endTokens
    })
    if (choice !== undefined && (request.logprobs ?? 0) > 0) {
      return yield* new BadRequest({
        message: `logprobs ${request.logprobs} is not supported with ${choice.param}: its answer has no alternatives per token (logprobs 0 gives each token's logprob)`,
        param: "logprobs",
        code: "unsupported_parameter"
      })
    }
    // echo with logprobs and vLLM's prompt_logprobs read the same scoring of each prompt, made first
    // (openai/promptLogprobs.ts), of the prompt as it is run.
    const top = request.logprobs
    const echoLogprobs = request.echo === true && top !== undefined
    const ranked = request.prompt_logprobs
    if (ranked !== undefined && plan.stream) {
      return yield* new BadRequest({
        message: "prompt_logprobs is not supported with stream (echo with logprobs streams the prompt's logprobs in its first chunk)",
        param: "prompt_logprobs",
        code: "unsupported_parameter"
      })
    }
    const promptScores =
      echoLogprobs || ranked !== undefined
        ? yield* checkNoMaskToken(prompts).pipe(
            Effect.zipRight(
              Effect.forEach(
                prompts.map(plan.truncatePrompt),
                (prompt) => scorePrompt(prompt.tokens, Math.max(echoLogprobs ? top : 0, ranked ?? 0), ranked !== undefined),
                { concurrency: "unbounded" }
              )
            )
          )
        : undefined
    const jobs = yield* choice !== undefined
      ? prepareChoiceJobs(prompts, plan, choice)
      : request.max_tokens === 0
        ? promptOnlyJobs(prompts, plan)
        : preparePromptJobs(prompts, plan)
    const scoredOf = (job: PromptJob) => promptScores?.[(jobs as ReadonlyArray<PromptJob>).indexOf(job)]
    const promptLogprobsOf = (job: PromptJob) => {
      const scored = scoredOf(job)
      return scored === undefined || !echoLogprobs ? undefined : tokenLogprobs(scored, top, texts)
    }
    /**
     * With echo and logprobs, the end token an answer ended at is listed last, as OpenAI's legacy
     * completions list <|endoftext|> (not in the text or the usage): an evaluation harness that asks for
     * one token and drops the answer's entry from the end then drops that one, not the prompt's last.
     */
    const endOf = (job: PromptJob, decoder: ChoiceDecoder) => {
      const ended = decoder.endedBy
      if (!echoLogprobs || ended === undefined) return undefined
      const offset = echoOf(job).length + decoder.text.length
      return tokenLogprobs(
        { ids: [ended.token], logprobs: [Math.log(ended.probability)], alternatives: [ended.alternatives], offsets: [offset] },
        top,
        texts
      )
    }
    const withEnd = (job: PromptJob, decoder: ChoiceDecoder, logprobs: CompletionLogprobs) => {
      const end = endOf(job, decoder)
      return end === undefined ? logprobs : concatLogprobs(logprobs, end)
    }
    const texts = new TokenTexts(tokenizer)
    // A structured answer's text is its JSON, complete once every slot is denoised: a stream carries it
    // whole in the choice's last chunk.
    const answerOf = (decoder: ChoiceDecoder) => (structured === undefined ? decoder.text : structured.render(decoder.canvas))
    // A truncated prompt echoes the text of the tokens that were kept.
    const echoOf = (job: PromptJob) =>
      request.echo !== true
        ? ""
        : job.prompt.truncatedFrom === undefined
          ? (job.prompt as CompletionPrompt).text
          : tokenizer.decode(job.prompt.tokens, { skipSpecialTokens: true })
    return yield* respond(plan, jobs, {
      id: `cmpl-${requestId}`,
      object: "text_completion",
      chunkObject: "text_completion",
      modelName: config.modelName,
      texts,
      wantsTokens: top !== undefined,
      textAtEnd: structured !== undefined,
      choice: (job, decoder) => {
        const echo = echoOf(job)
        const answer = top === undefined ? null : completionLogprobs(decoder, 0, decoder.tokenIds.length, top, echo.length, texts)
        const prompt = promptLogprobsOf(job)
        const scored = scoredOf(job)
        return {
          text: echo + answerOf(decoder),
          logprobs: answer === null || prompt === undefined ? answer : withEnd(job, decoder, concatLogprobs(prompt, answer)),
          ...(ranked === undefined || scored === undefined ? {} : { prompt_logprobs: rankedLogprobs(scored, ranked, texts) })
        }
      },
      delta: (job, { decoder, delta }) => {
        if (structured !== undefined) return { text: delta.finishReason === null ? "" : answerOf(decoder), logprobs: null }
        if (top === undefined) return { text: delta.text, logprobs: null }
        const logprobs = completionLogprobs(decoder, delta.firstToken, delta.endToken, top, echoOf(job).length, texts)
        return { text: delta.text, logprobs: delta.finishReason === null ? logprobs : withEnd(job, decoder, logprobs) }
      },
      // With echo, every choice's stream opens with its prompt's text.
      opening: request.echo === true ? (job) => ({ text: echoOf(job), logprobs: promptLogprobsOf(job) ?? null }) : undefined
    })
  })
