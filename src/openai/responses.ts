/**
 * POST /v1/responses: OpenAI's Responses API, as far as a stateless server can honour it. New OpenAI SDK
 * code and the AI SDK's default OpenAI provider call it.
 *
 * `input` is a string (one user message) or a list of messages (roles user, assistant, system,
 * developer; content a string or input_text / output_text parts); `instructions` comes first as a system
 * message. `max_output_tokens`, `temperature`, `top_p` and `text.format` (json_schema: structured
 * output, as chat's response_format) are honoured, as are this server's own settings (top_k, seed, the
 * diffusion settings). One answer (no `n`).
 *
 * `include: ["message.output_text.logprobs"]` with `top_logprobs` gives each output token's logprob and
 * alternatives, as chat's logprobs.
 *
 * Function tools as chat's (openai/tools.ts): `tool_choice` naming a function (`{type: "function", name}`),
 * or "required" with one tool, makes the answer that call, laid on the canvas; the output item is then a
 * `function_call` (call_id, name, arguments). The conversation may hold `function_call` and
 * `function_call_output` items (as an assistant's tool_calls and a tool message).
 *
 * Refused by name (400), because this server keeps nothing between requests: `previous_response_id`,
 * `conversation`, `store: true`, `background: true`, any other `include`, built-in tools, and input items
 * other than messages and function calls.
 *
 * The response is a `response` object whose one output item is the assistant message; `status` is
 * "completed", or "incomplete" (`incomplete_details.reason: "max_output_tokens"`) when the answer filled
 * its length. A stream sends the Responses events: response.created, response.in_progress,
 * response.output_item.added, response.content_part.added, response.output_text.delta..., then
 * response.output_text.done, response.content_part.done, response.output_item.done and
 * response.completed (or response.incomplete); an error after the head is an `error` event.
 */
import { Effect, Option } from "effect"
import { type ApiError, BadRequest } from "../api/errors.js"
import { RequestId } from "../api/RequestId.js"
import type { ChatMessage, ContentPart } from "../chat/ChatFormatter.js"
import type { ChoiceDecoder } from "./ChoiceDecoder.js"
import { renderMessages } from "./chat.js"
import { checkModel, makePlan, type PreparedPrompt } from "./plan.js"
import type { ResponseRequest } from "./protocol.js"
import { chatLogprobs, nowSeconds, TokenTexts } from "./render.js"
import { diffusionOfJobs, mergedChunks, preparePromptJobs, runToEnd, usageOfJobs } from "./run.js"
import { ServingConfig } from "./ServingConfig.js"
import { Tokenizer } from "../tokenizer/Tokenizer.js"
import { type JsonTemplate, planStructured, promptTemplate } from "./structured.js"
import { callId, planToolCall, planWithCall } from "./tools.js"
import { respondSse, type SseEncoding } from "./streaming.js"
import { HttpServerResponse } from "@effect/platform"

/** What `include` may ask for: each output token's logprob and its `top_logprobs` alternatives. */
const LOGPROBS = "message.output_text.logprobs"

const unsupported = (param: string, message: string) => new BadRequest({ message, param, code: "unsupported_parameter" })

/** The first field of the request that needs what this server does not have, as a 400. */
const refusal = (request: ResponseRequest): BadRequest | undefined => {
  const stateless = "this server keeps no responses or conversations between requests"
  if (request.previous_response_id !== undefined) {
    return unsupported("previous_response_id", `previous_response_id is not supported: ${stateless}; send the whole conversation as input`)
  }
  if (request.conversation !== undefined) {
    return unsupported("conversation", `conversation is not supported: ${stateless}; send the whole conversation as input`)
  }
  if (request.store === true) {
    return unsupported("store", `store is not supported: ${stateless}; send store: false or leave it out`)
  }
  if (request.background === true) {
    return unsupported("background", "background is not supported: responses are answered while the request waits")
  }
  const included = (request.include ?? []).filter((what) => what !== LOGPROBS)
  if (included.length > 0) {
    return unsupported("include", `include is not supported for ${included.join(", ")}; only ${LOGPROBS} is`)
  }
  return undefined
}

/** The request's input as chat messages: the instructions first (as system), then the input. */
const messagesOf = (request: ResponseRequest): Effect.Effect<ReadonlyArray<ChatMessage>, BadRequest> => {
  const messages: Array<ChatMessage> = []
  if (request.instructions !== undefined) messages.push({ role: "system", content: request.instructions })
  if (typeof request.input === "string") {
    messages.push({ role: "user", content: request.input })
    return Effect.succeed(messages)
  }
  for (const [i, item] of request.input.entries()) {
    const param = `input[${i}]`
    const required = (field: "call_id" | "name" | "arguments" | "output") =>
      new BadRequest({ message: `${param}.${field} is required for a ${item.type} item`, param: `${param}.${field}` })
    if (item.type === "function_call") {
      if (item.call_id === undefined) return Effect.fail(required("call_id"))
      if (item.name === undefined) return Effect.fail(required("name"))
      if (item.arguments === undefined) return Effect.fail(required("arguments"))
      const call = { id: item.call_id, function: { name: item.name, arguments: item.arguments } }
      // Calls one after another are one assistant turn, as chat's tool_calls.
      const last = messages[messages.length - 1]
      if (last?.role === "assistant" && last.tool_calls !== undefined)
        messages[messages.length - 1] = { ...last, tool_calls: [...last.tool_calls, call] }
      else messages.push({ role: "assistant", tool_calls: [call] })
      continue
    }
    if (item.type === "function_call_output") {
      if (item.call_id === undefined) return Effect.fail(required("call_id"))
      if (item.output === undefined) return Effect.fail(required("output"))
      messages.push({ role: "tool", tool_call_id: item.call_id, content: item.output })
      continue
    }
    if (item.type !== undefined && item.type !== "message") {
      return Effect.fail(
        unsupported(
          `${param}.type`,
          `input items of type "${item.type}" are not supported: only messages, function_call and function_call_output are`
        )
      )
    }
    if (item.role === undefined) return Effect.fail(new BadRequest({ message: `${param}.role is required`, param: `${param}.role` }))
    if (item.content === undefined) {
      return Effect.fail(new BadRequest({ message: `${param}.content is required`, param: `${param}.content` }))
    }
    if (typeof item.content === "string") {
      messages.push({ role: item.role, content: item.content })
      continue
    }
    const parts: Array<ContentPart> = []
    for (const [j, part] of item.content.entries()) {
      if (part.type !== "input_text" && part.type !== "output_text" && part.type !== "text") {
        return Effect.fail(
          unsupported(`${param}.content[${j}]`, `content parts of type "${part.type}" are not supported: this model takes text only`)
        )
      }
      if (typeof part.text !== "string") {
        return Effect.fail(new BadRequest({ message: "text must be a string", param: `${param}.content[${j}].text` }))
      }
      parts.push({ type: "text", text: part.text })
    }
    messages.push({ role: item.role, content: parts })
  }
  return Effect.succeed(messages)
}

/** Responses SSE: `event: <type>` before each data line, events numbered, no [DONE]. */
const responsesEncoding = (): SseEncoding => {
  let sequence = 0
  return {
    event: (chunk) => {
      const { type, ...rest } = chunk as { type: string }
      return `event: ${type}\ndata: ${JSON.stringify({ type, sequence_number: sequence++, ...rest })}\n\n`
    },
    done: "",
    error: (error: ApiError) => ({ type: "error", code: error.code ?? error.type, message: error.message, param: error.param })
  }
}

export const responses = (request: ResponseRequest) =>
  Effect.gen(function* () {
    const config = yield* ServingConfig
    const requestId = yield* RequestId
    yield* checkModel(request.model)
    const refused = refusal(request)
    if (refused !== undefined) return yield* refused

    const maxTokens = request.max_output_tokens === undefined ? undefined : { value: request.max_output_tokens, param: "max_output_tokens" }
    const format = request.text?.format
    // The function tools in chat's shape, for the chat template and the call's plan.
    const tools = request.tools?.map(({ type, ...fn }) => ({ type, function: fn }))
    const choice = request.tool_choice
    const calls = yield* planToolCall({
      tools,
      toolChoice: typeof choice === "object" ? { type: "function", function: { name: choice.name } } : choice,
      maxTokens,
      conflicting: format?.type === "json_schema" ? ["text.format"] : []
    })
    const formatted =
      calls === undefined
        ? yield* planStructured({ type: format?.type, schema: format?.schema, param: "text.format", maxTokens, conflicting: [] })
        : undefined
    // With include: [LOGPROBS], each output token's logprob and top_logprobs alternatives, as chat's.
    const top = request.include?.includes(LOGPROBS) === true ? (request.top_logprobs ?? 0) : undefined
    if (request.top_logprobs !== undefined && top === undefined) {
      return yield* new BadRequest({ message: `top_logprobs requires include: ["${LOGPROBS}"]`, param: "top_logprobs" })
    }
    const planFor = (laid: JsonTemplate | undefined) =>
      makePlan(
        { ...request, n: 1 },
        laid === undefined ? maxTokens : { value: laid.template.length, param: maxTokens?.param ?? "max_output_tokens" },
        top ?? 0
      )
    const messages = yield* messagesOf(request)
    const promptTokens = yield* renderMessages(messages, { addGenerationPrompt: true, tools })
    // tool_choice "required" with several tools: the call is chosen first, by scoring the functions' names.
    const { plan, call, structured } = yield* planWithCall(calls, formatted, planFor, { tokens: promptTokens, param: "input" })
    const prompt: PreparedPrompt = {
      tokens: promptTokens,
      param: "input",
      ...(structured === undefined ? {} : { ...promptTemplate(structured), templateParam: "text.format" })
    }
    const jobs = yield* preparePromptJobs([prompt], plan)
    const decoder = jobs[0]!.run.decoders[0]!
    const textOf = (d: ChoiceDecoder) => (structured === undefined ? d.text : structured.render(d.canvas))
    const texts = new TokenTexts(yield* Tokenizer)
    const logprobsOf = (from: number, to: number) => (top === undefined ? [] : chatLogprobs(decoder, from, to, top, texts).content)

    const createdAt = yield* nowSeconds
    const id = `resp_${requestId}`
    const itemId = `msg_${requestId}`
    const part = (text: string, logprobs: ReadonlyArray<unknown> = []) => ({ type: "output_text", text, annotations: [], logprobs })
    const finalPart = () => part(textOf(decoder), logprobsOf(0, decoder.tokenIds.length))
    const item = (status: "in_progress" | "completed" | "incomplete", content: ReadonlyArray<unknown>) => ({
      id: itemId,
      type: "message",
      status,
      role: "assistant",
      content
    })
    // A call's output item: its id, the call's id (call_...), the function and the arguments' JSON.
    const callItemId = `fc_${requestId}`
    const callIdOf = callId()
    const callItem = (status: "in_progress" | "completed", args: string) => ({
      id: callItemId,
      type: "function_call",
      status,
      call_id: callIdOf,
      name: call?.name ?? "",
      arguments: args
    })
    const argumentsOf = () => call?.argumentsOf(decoder.canvas) ?? ""
    const finalItem = (status: "completed" | "incomplete") =>
      call === undefined ? item(status, [finalPart()]) : callItem("completed", argumentsOf())
    const response = (finished: boolean) => {
      const status = !finished ? "in_progress" : decoder.finishReason === "length" ? "incomplete" : "completed"
      const usage = finished ? usageOfJobs(jobs) : undefined
      return {
        id,
        object: "response",
        created_at: createdAt,
        status,
        error: null,
        incomplete_details: status === "incomplete" ? { reason: "max_output_tokens" } : null,
        instructions: request.instructions ?? null,
        max_output_tokens: request.max_output_tokens ?? null,
        model: config.modelName,
        output: finished ? [finalItem(status === "incomplete" ? "incomplete" : "completed")] : [],
        parallel_tool_calls: false,
        previous_response_id: null,
        store: false,
        temperature: jobs[0]!.settings.temperature,
        top_p: jobs[0]!.settings.topP ?? 1,
        text: { format: format === undefined || structured === undefined ? { type: "text" } : format },
        tool_choice: request.tool_choice ?? "none",
        tools: request.tools ?? [],
        truncation: "disabled",
        metadata: request.metadata ?? {},
        usage:
          usage === undefined
            ? null
            : {
                input_tokens: usage.prompt_tokens,
                input_tokens_details: { cached_tokens: usage.prompt_tokens_details.cached_tokens },
                output_tokens: usage.completion_tokens,
                output_tokens_details: { reasoning_tokens: 0 },
                total_tokens: usage.total_tokens
              },
        ...(finished ? { diffusion: diffusionOfJobs(jobs, plan.family) } : {})
      }
    }

    if (!plan.stream) {
      yield* runToEnd(jobs)
      return HttpServerResponse.unsafeJson(response(true))
    }

    if (call !== undefined) {
      // A call streams as OpenAI streams one: the item, the arguments once denoised, the item done.
      const callAt = { item_id: callItemId, output_index: 0 }
      const callChunks = mergedChunks(jobs, 1, (_, __, { delta: { finishReason } }) =>
        finishReason === null
          ? Option.none()
          : Option.some({ type: "response.function_call_arguments.delta", ...callAt, delta: argumentsOf() })
      )
      const callEpilogue = Effect.sync(() => {
        const done = response(true)
        return [
          { type: "response.function_call_arguments.done", ...callAt, arguments: argumentsOf() },
          { type: "response.output_item.done", output_index: 0, item: done.output[0] },
          { type: "response.completed", response: done }
        ]
      })
      return yield* respondSse({
        preamble: [
          { type: "response.created", response: response(false) },
          { type: "response.in_progress", response: response(false) },
          { type: "response.output_item.added", output_index: 0, item: callItem("in_progress", "") }
        ],
        chunks: callChunks,
        epilogue: callEpilogue,
        encoding: responsesEncoding()
      })
    }

    const at = { item_id: itemId, output_index: 0, content_index: 0 }
    const preamble = [
      { type: "response.created", response: response(false) },
      { type: "response.in_progress", response: response(false) },
      { type: "response.output_item.added", output_index: 0, item: item("in_progress", []) },
      { type: "response.content_part.added", ...at, part: part("") }
    ]
    const chunks = mergedChunks(jobs, 1, (_, __, { delta: { text, finishReason, firstToken, endToken } }) => {
      const delta = structured === undefined ? text : finishReason === null ? "" : textOf(decoder)
      const worthIt = delta !== "" || (top !== undefined && endToken > firstToken)
      return worthIt
        ? Option.some({ type: "response.output_text.delta", ...at, delta, logprobs: logprobsOf(firstToken, endToken) })
        : Option.none()
    })
    const epilogue = Effect.sync(() => {
      const done = response(true)
      const final = finalPart()
      return [
        { type: "response.output_text.done", ...at, text: final.text, logprobs: final.logprobs },
        { type: "response.content_part.done", ...at, part: final },
        { type: "response.output_item.done", output_index: 0, item: done.output[0] },
        { type: done.status === "incomplete" ? "response.incomplete" : "response.completed", response: done }
      ]
    })
    return yield* respondSse({ preamble, chunks, epilogue, encoding: responsesEncoding() })
  })
