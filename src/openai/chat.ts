/**
 * POST /v1/chat/completions: the messages rendered with the model's chat template, n answers, as one JSON
 * response or as server-sent events.
 */
import { HttpServerResponse } from "@effect/platform"
import { Effect, Option } from "effect"
import { ChatFormatter, type ChatMessage } from "../chat/ChatFormatter.js"
import { RequestId } from "../api/RequestId.js"
import { Tokenizer } from "../tokenizer/Tokenizer.js"
import { BadRequest, InternalError } from "../api/errors.js"
import type {
  ChatCompletionChoice,
  ChatCompletionChunk,
  ChatCompletionChunkChoice,
  ChatCompletionRequest,
  ChatCompletionResponse
} from "./protocol.js"
import {
  chatLogprobs,
  diffusionOfJobs,
  makePlan,
  mergedChunks,
  nowSeconds,
  type PreparedPrompt,
  preparePromptJobs,
  runToEnd,
  snapshotOf,
  TokenTexts,
  usageOfJobs,
  worthAChunk
} from "./serving.js"
import { ServingConfig } from "./ServingConfig.js"
import { respondSse } from "./streaming.js"

/**
 * Renders and tokenizes a conversation, as chat completions and /tokenize do. Messages the template
 * cannot take are the client's fault (400); a template that fails to render is the model's (500).
 */
export const renderMessages = (messages: ReadonlyArray<ChatMessage>, options: {
  readonly addGenerationPrompt: boolean
  readonly addSpecialTokens?: boolean
}) =>
  Effect.gen(function*() {
    const formatter = yield* ChatFormatter
    const tokenizer = yield* Tokenizer
    const rendered = yield* formatter.render(messages, { addGenerationPrompt: options.addGenerationPrompt }).pipe(
      Effect.catchTags({
        InvalidChatRequest: (error) => Effect.fail(new BadRequest({ message: error.message, param: error.param })),
        ChatTemplateError: (error) => Effect.fail(new InternalError({ message: error.message, code: "chat_template" }))
      })
    )
    return tokenizer.encode(rendered.text, { addSpecialTokens: options.addSpecialTokens ?? rendered.addSpecialTokens })
  }).pipe(
    Effect.tap((tokens) =>
      Effect.annotateCurrentSpan({ "vdiff.messages": messages.length, "vdiff.prompt_tokens": tokens.length })
    ),
    Effect.withSpan("vdiff.render_prompt")
  )

export const chatCompletions = (request: ChatCompletionRequest) =>
  Effect.gen(function*() {
    const tokenizer = yield* Tokenizer
    const config = yield* ServingConfig
    const requestId = yield* RequestId
    const maxTokens = request.max_completion_tokens !== undefined
      ? { value: request.max_completion_tokens, param: "max_completion_tokens" }
      : request.max_tokens !== undefined
      ? { value: request.max_tokens, param: "max_tokens" }
      : undefined
    const plan = yield* makePlan(request, maxTokens)
    if (request.top_logprobs !== undefined && request.logprobs !== true) {
      return yield* new BadRequest({ message: "top_logprobs requires logprobs to be true", param: "top_logprobs" })
    }
    if (request.tools !== undefined && request.tools.length > 0) {
      return yield* new BadRequest({ message: "tools are not supported", param: "tools", code: "unsupported_parameter" })
    }
    if (request.response_format !== undefined && request.response_format.type !== "text") {
      return yield* new BadRequest({
        message: `response_format "${request.response_format.type}" is not supported; only "text" is`,
        param: "response_format",
        code: "unsupported_parameter"
      })
    }

    const prompt: PreparedPrompt = {
      tokens: yield* renderMessages(request.messages, { addGenerationPrompt: true }),
      param: "messages"
    }
    const [job] = yield* preparePromptJobs([prompt], plan)
    const jobs = [job!]
    const texts = new TokenTexts(tokenizer)
    const id = `chatcmpl-${requestId}`
    const created = yield* nowSeconds
    const head = <O extends string>(object: O) => ({ id, object, created, model: config.modelName })
    const top = request.logprobs === true ? request.top_logprobs ?? 0 : undefined

    if (!plan.stream) {
      yield* runToEnd(jobs)
      const choices = job!.run.decoders.map((decoder, index): ChatCompletionChoice => ({
        index,
        message: { role: "assistant", content: decoder.text },
        logprobs: top === undefined ? null : chatLogprobs(decoder, 0, decoder.tokenIds.length, top, texts),
        finish_reason: decoder.finishReason ?? "length",
        ...(plan.returnTokenIds ? { prompt_token_ids: prompt.tokens, token_ids: decoder.tokenIds } : {})
      }))
      return HttpServerResponse.unsafeJson(
        {
          ...head("chat.completion"),
          choices,
          usage: usageOfJobs(jobs),
          diffusion: diffusionOfJobs(jobs)
        } satisfies ChatCompletionResponse
      )
    }

    const chunk = (choice: ChatCompletionChunkChoice): ChatCompletionChunk => ({
      ...head("chat.completion.chunk"),
      choices: [choice],
      ...(plan.includeUsage ? { usage: null } : {})
    })
    // OpenAI opens every choice with a chunk carrying the role; vLLM's return_token_ids puts the prompt's
    // ids there.
    const preamble = job!.run.decoders.map((_, index) =>
      chunk({
        index,
        delta: { role: "assistant", content: "" },
        logprobs: null,
        finish_reason: null,
        ...(plan.returnTokenIds ? { prompt_token_ids: prompt.tokens } : {})
      })
    )
    const chunks = mergedChunks(jobs, plan.n, (job, index, update) => {
      if (!worthAChunk(update, plan.includeSnapshots, top !== undefined || plan.returnTokenIds)) return Option.none()
      const { decoder, delta } = update
      const to = delta.endToken
      return Option.some(chunk({
        index,
        delta: delta.text === "" ? {} : { content: delta.text },
        logprobs: top === undefined ? null : chatLogprobs(decoder, delta.firstToken, to, top, texts),
        finish_reason: delta.finishReason,
        ...(plan.includeSnapshots ? { snapshot: snapshotOf(update, job.totalSteps, texts) } : {}),
        ...(plan.returnTokenIds ? { token_ids: decoder.tokenIds.slice(delta.firstToken, to) } : {})
      }))
    })
    const epilogue = Effect.sync(() =>
      plan.includeUsage
        ? [{
          ...head("chat.completion.chunk"),
          choices: [],
          usage: usageOfJobs(jobs),
          diffusion: diffusionOfJobs(jobs)
        } satisfies ChatCompletionChunk]
        : []
    )
    return yield* respondSse({ preamble, chunks, epilogue })
  })
