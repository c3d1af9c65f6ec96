/**
 * POST /v1/chat/completions: the messages rendered with the model's chat template, n answers, as one JSON
 * response or as server-sent events.
 */
import { Effect } from "effect"
import { ChatFormatter, type ChatMessage } from "../chat/ChatFormatter.js"
import { RequestId } from "../api/RequestId.js"
import { Tokenizer } from "../tokenizer/Tokenizer.js"
import { BadRequest, InternalError } from "../api/errors.js"
import { type ChatCompletionRequest, chatUnhonoured } from "./protocol.js"
import { checkModel, checkNoMaskToken, makePlan, type PreparedPrompt } from "./plan.js"
import { rankedLogprobs, scorePrompt } from "./promptLogprobs.js"
import { chatLogprobs, respond, TokenTexts } from "./render.js"
import { preparePromptJobs } from "./run.js"
import { planChoice, prepareChoiceJobs } from "./choice.js"
import type { ChoiceDecoder } from "./ChoiceDecoder.js"
import { type JsonTemplate, planStructured, promptTemplate, requestedFormat, templateConflicts } from "./structured.js"
import { callId, planToolCall, planWithCall, toolCallOf } from "./tools.js"
import { ServingConfig } from "./ServingConfig.js"

/**
 * Renders and tokenizes a conversation, as chat completions and /tokenize do. Messages the template
 * cannot take are the client's fault (400); a template that fails to render is the model's (500).
 */
export const renderMessages = (
  messages: ReadonlyArray<ChatMessage>,
  options: {
    readonly addGenerationPrompt: boolean
    readonly addSpecialTokens?: boolean
    /** The request's tools, for a template that shows them. */
    readonly tools?: ReadonlyArray<unknown> | undefined
  }
) =>
  Effect.gen(function* () {
    const formatter = yield* ChatFormatter
    const tokenizer = yield* Tokenizer
    const rendered = yield* formatter.render(messages, { addGenerationPrompt: options.addGenerationPrompt, tools: options.tools }).pipe(
      Effect.catchTags({
        InvalidChatRequest: (error) => Effect.fail(new BadRequest({ message: error.message, param: error.param })),
        ChatTemplateError: (error) => Effect.fail(new InternalError({ message: error.message, code: "chat_template" }))
      })
    )
    return tokenizer.encode(rendered.text, { addSpecialTokens: options.addSpecialTokens ?? rendered.addSpecialTokens })
  }).pipe(
    Effect.tap((tokens) => Effect.annotateCurrentSpan({ "vdiff.messages": messages.length, "vdiff.prompt_tokens": tokens.length })),
    Effect.withSpan("vdiff.render_prompt")
  )

export const chatCompletions = (request: ChatCompletionRequest) =>
  Effect.gen(function* () {
    const tokenizer = yield* Tokenizer
    const config = yield* ServingConfig
    const requestId = yield* RequestId
    const maxTokens =
      request.max_completion_tokens !== undefined
        ? { value: request.max_completion_tokens, param: "max_completion_tokens" }
        : request.max_tokens !== undefined
          ? { value: request.max_tokens, param: "max_tokens" }
          : undefined
    // An unknown model is a 404 before anything about the request's content is.
    yield* checkModel(request.model)
    const conflicting = templateConflicts(request)
    const format = yield* requestedFormat(request)
    const calls = yield* planToolCall({
      tools: request.tools,
      toolChoice: request.tool_choice,
      maxTokens,
      conflicting: [...(format === undefined ? [] : [format.param]), ...conflicting]
    })
    const formatted =
      calls === undefined
        ? yield* planStructured({
            type: format?.type,
            schema: format?.schema,
            param: format?.param ?? "response_format",
            ...(format === undefined ? {} : { schemaParam: format.schemaParam }),
            maxTokens,
            conflicting
          })
        : undefined
    // Structured output and calls: the answer is the template, as long as it is.
    const planFor = (laid: JsonTemplate | undefined) =>
      makePlan(
        request,
        laid === undefined ? maxTokens : { value: laid.template.length, param: maxTokens?.param ?? "max_tokens" },
        request.logprobs === true ? (request.top_logprobs ?? 0) : 0,
        chatUnhonoured
      )
    const promptTokens = yield* renderMessages(request.messages, { addGenerationPrompt: true, tools: request.tools })
    // tool_choice "required" with several tools: the call is chosen first, by scoring the functions' names.
    const { plan, call, structured } = yield* planWithCall(calls, formatted, planFor, { tokens: promptTokens, param: "messages" })
    if (request.top_logprobs !== undefined && request.logprobs !== true) {
      return yield* new BadRequest({ message: "top_logprobs requires logprobs to be true", param: "top_logprobs" })
    }
    const choice = yield* planChoice(request, {
      chat: true,
      conflicting: call !== undefined ? ["tool_choice"] : structured === undefined || format === undefined ? [] : [format.param],
      maxTokens: maxTokens?.value,
      endTokens: plan.endTokens
    })
    if (choice !== undefined && (request.top_logprobs ?? 0) > 0) {
      return yield* new BadRequest({
        message: `top_logprobs is not supported with ${choice.param}: its answer has no alternatives per token (logprobs alone gives each token's logprob)`,
        param: "top_logprobs",
        code: "unsupported_parameter"
      })
    }

    const prompt: PreparedPrompt = {
      tokens: promptTokens,
      param: "messages",
      ...(structured === undefined ? {} : promptTemplate(structured))
    }
    // vLLM's prompt_logprobs: the conversation as it is run, scored before the answer (promptLogprobs.ts).
    const ranked = request.prompt_logprobs
    if (ranked !== undefined && plan.stream) {
      return yield* new BadRequest({
        message: "prompt_logprobs is not supported with stream",
        param: "prompt_logprobs",
        code: "unsupported_parameter"
      })
    }
    const promptScores =
      ranked === undefined
        ? undefined
        : yield* checkNoMaskToken([prompt]).pipe(Effect.zipRight(scorePrompt(plan.truncatePrompt(prompt).tokens, ranked, true)))
    // A structured answer's text is its JSON, complete once every slot is denoised: a stream carries it
    // whole in the choice's last chunk. A call's arguments come the same way, after a first chunk with its
    // id and name.
    const contentOf = (decoder: ChoiceDecoder): string => (structured === undefined ? decoder.text : structured.render(decoder.canvas))
    const jobs = yield* choice === undefined ? preparePromptJobs([prompt], plan) : prepareChoiceJobs([prompt], plan, choice)
    const texts = new TokenTexts(tokenizer)
    const top = request.logprobs === true ? (request.top_logprobs ?? 0) : undefined
    return yield* respond(plan, jobs, {
      id: `chatcmpl-${requestId}`,
      object: "chat.completion",
      chunkObject: "chat.completion.chunk",
      modelName: config.modelName,
      texts,
      wantsTokens: top !== undefined,
      textAtEnd: structured !== undefined,
      choice: (_, decoder) => ({
        message:
          call === undefined
            ? { role: "assistant", content: contentOf(decoder) }
            : { role: "assistant", content: null, tool_calls: [toolCallOf(call, decoder.canvas)] },
        logprobs: top === undefined ? null : chatLogprobs(decoder, 0, decoder.tokenIds.length, top, texts)
      }),
      delta: (_, { decoder, delta }) => ({
        delta:
          structured === undefined
            ? delta.text === ""
              ? {}
              : { content: delta.text }
            : delta.finishReason === null
              ? {}
              : call === undefined
                ? { content: contentOf(decoder) }
                : { tool_calls: [{ index: 0, function: { arguments: call.argumentsOf(decoder.canvas) } }] },
        logprobs: top === undefined ? null : chatLogprobs(decoder, delta.firstToken, delta.endToken, top, texts)
      }),
      ...(call === undefined ? {} : { finishAs: (reason) => (reason === "stop" ? call.finishReason : reason) }),
      ...(promptScores === undefined ? {} : { responseFields: () => ({ prompt_logprobs: rankedLogprobs(promptScores, ranked!, texts) }) }),
      // OpenAI opens every choice with a chunk carrying the role (and a call's id and name).
      opening: () => ({
        delta:
          call === undefined
            ? { role: "assistant", content: "" }
            : {
                role: "assistant",
                content: null,
                tool_calls: [{ index: 0, id: callId(), type: "function", function: { name: call.name, arguments: "" } }]
              },
        logprobs: null
      })
    })
  })
