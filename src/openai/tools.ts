/**
 * Tool calling, diffusion's way: the call a request asks for is laid on the canvas as the JSON of the call,
 * `{"name": "get_weather", "arguments": {"city": "…"}}`, with the name and the arguments' keys fixed and
 * each string value a slot the model denoises in place (structured output's template, openai/structured.ts).
 * The answer is that call: `message.tool_calls[0]` with the arguments' JSON text, `content` null.
 *
 * Which call: `tool_choice` names the function, or is "required" with one tool. A model with no format of
 * its own for calls (LLaDA's, the embedded model's) never decides to call one, so "auto" is refused, as
 * vLLM refuses it without a tool parser; "none", or no tool_choice (vLLM's default), answers in text with
 * the tools given to the chat template. The name goes on the canvas too, so that the model writes the
 * arguments knowing the function, and a call sent back in the conversation is shown to a template that does
 * not read `tool_calls` in the same form (chat/ChatFormatter.ts).
 */
import { Effect } from "effect"
import { randomBytes } from "node:crypto"
import { BadRequest } from "../api/errors.js"
import type { ModelFamily } from "../config/sampling.js"
import type { FunctionTool, ToolCall, ToolChoice } from "./protocol.js"
import { type JsonTemplate, requireFullCanvas, type StructuredRequest, templateOf } from "./structured.js"

/** The call an answer makes: its function, its template on the canvas, and the finish reason it reports. */
export interface PlannedCall {
  readonly name: string
  readonly template: JsonTemplate
  /** "stop" for a named function (as OpenAI answers a forced call), "tool_calls" for tool_choice "required". */
  readonly finishReason: "stop" | "tool_calls"
  /** The arguments' JSON text of a finished canvas. */
  readonly argumentsOf: (canvas: ArrayLike<number>) => string
}

/** A call's id, as OpenAI's look: "call_" and 24 letters and digits. */
export const callId = (): string => `call_${randomBytes(18).toString("base64url").replace(/[-_]/g, "0").slice(0, 24)}`

/** A finished call as the response carries it. */
export const toolCallOf = (call: PlannedCall, canvas: ArrayLike<number>): ToolCall => ({
  id: callId(),
  type: "function",
  function: { name: call.name, arguments: call.argumentsOf(canvas) }
})

/**
 * The call a chat request asks for, undefined when it asks for none, or a 400 saying why it cannot be
 * made. `conflicting` names the fields given that a template cannot honour (stop, min_tokens, ...).
 */
export const planToolCall = (request: {
  readonly tools: ReadonlyArray<FunctionTool> | undefined
  readonly toolChoice: ToolChoice | undefined
  readonly maxTokens: StructuredRequest["maxTokens"]
  readonly conflicting: ReadonlyArray<string>
  readonly family: ModelFamily
}) =>
  Effect.gen(function* () {
    const tools = request.tools ?? []
    const choice = request.toolChoice
    const names = new Map<string, number>()
    for (const [i, tool] of tools.entries()) {
      if (names.has(tool.function.name)) {
        return yield* new BadRequest({
          message: `tools[${i}] is a second function named ${JSON.stringify(tool.function.name)}: names must be unique`,
          param: `tools[${i}].function.name`
        })
      }
      names.set(tool.function.name, i)
    }
    if (choice === undefined || choice === "none") return undefined
    if (choice === "auto") {
      if (tools.length === 0) return undefined
      return yield* new BadRequest({
        message:
          'tool_choice "auto" is not supported: this model has no format of its own for calling tools, so it never ' +
          'decides to call one; name the function (tool_choice {"type": "function", "function": {"name": ...}}), ' +
          'send "required" with one tool, or "none"',
        param: "tool_choice",
        code: "unsupported_parameter"
      })
    }
    if (tools.length === 0) {
      return yield* new BadRequest({ message: "tool_choice asks for a call, but the request gives no tools", param: "tool_choice" })
    }
    let index: number
    if (choice === "required") {
      if (tools.length > 1) {
        return yield* new BadRequest({
          message:
            `tool_choice "required" with ${tools.length} tools is not supported: the call is laid out before ` +
            'denoising, so its function must be known; name it (tool_choice {"type": "function", "function": {"name": ...}})',
          param: "tool_choice",
          code: "unsupported_parameter"
        })
      }
      index = 0
    } else {
      const found = names.get(choice.function.name)
      if (found === undefined) {
        return yield* new BadRequest({
          message: `tool_choice names ${JSON.stringify(choice.function.name)}, which is not one of tools`,
          param: "tool_choice.function.name"
        })
      }
      index = found
    }
    yield* requireFullCanvas(request.family, "tool_choice", "a tool call")
    const conflict = request.conflicting[0]
    if (conflict !== undefined) {
      return yield* new BadRequest({
        message: `${conflict} cannot be used with a tool call: the answer is exactly the call's JSON, which ends where it does and which no stop cuts`,
        param: conflict,
        code: "unsupported_parameter"
      })
    }
    const name = tools[index]!.function.name
    const before = `{"name": ${JSON.stringify(name)}, "arguments": `
    const after = "}"
    const template = yield* templateOf(tools[index]!.function.parameters, {
      schemaParam: `tools[${index}].function.parameters`,
      maxTokens: request.maxTokens,
      wrap: { before, after, under: "arguments" },
      emptyObject: true
    })
    return {
      name,
      template,
      finishReason: choice === "required" ? "tool_calls" : "stop",
      argumentsOf: (canvas) => {
        const text = template.render(canvas)
        return text.slice(before.length, text.length - after.length)
      }
    } satisfies PlannedCall
  })
