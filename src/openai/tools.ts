/**
 * Tool calling, diffusion's way: the call a request asks for is laid on the canvas as the JSON of the call,
 * `{"name": "get_weather", "arguments": {"city": "…"}}`, with the name and the arguments' keys fixed and
 * each string value a slot the model denoises in place (structured output's template, openai/structured.ts).
 * The answer is that call: `message.tool_calls[0]` with the arguments' JSON text, `content` null.
 *
 * Which call: `tool_choice` names the function, or is "required" (with several tools the function is chosen
 * first: chooseCall scores each name in its own call's layout). A model with no format of
 * its own for calls (LLaDA's, the embedded model's) never decides to call one, so "auto" is refused, as
 * vLLM refuses it without a tool parser; "none", or no tool_choice (vLLM's default), answers in text with
 * the tools given to the chat template. The name goes on the canvas too, so that the model writes the
 * arguments knowing the function, and a call sent back in the conversation is shown to a template that does
 * not read `tool_calls` in the same form (chat/ChatFormatter.ts).
 */
import { Effect } from "effect"
import { randomBytes } from "node:crypto"
import { BadRequest } from "../api/errors.js"
import type { FunctionTool, ToolCall, ToolChoice } from "./protocol.js"
import type { NonEmptyReadonlyArray } from "effect/Array"
import type { SamplingSettings } from "../engine/Engine.js"
import { Scheduler } from "../scheduler/Scheduler.js"
import { Tokenizer } from "../tokenizer/Tokenizer.js"
import { pickChoice } from "./chains.js"
import { NOT_COMMITTED } from "./ChoiceDecoder.js"
import { fromGenerationError } from "./errors.js"
import { type AnswerPlan, checkNoMaskToken, type PreparedPrompt } from "./plan.js"
import { type JsonTemplate, type StructuredRequest, templateOf } from "./structured.js"

/** The call an answer makes: its function, its template on the canvas, and the finish reason it reports. */
export interface PlannedCall {
  readonly name: string
  readonly template: JsonTemplate
  /** "stop" for a named function (as OpenAI answers a forced call), "tool_calls" for tool_choice "required". */
  readonly finishReason: "stop" | "tool_calls"
  /** The arguments' JSON text of a finished canvas. */
  readonly argumentsOf: (canvas: ArrayLike<number>) => string
  /** Where the function's name lies in the template: its first position and its tokens. */
  readonly nameAt: { readonly start: number; readonly tokens: ReadonlyArray<number> }
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
 * The calls a chat request may make — the named function's, or with "required" every tool's (chooseCall
 * picks one) — undefined when it asks for none, or a 400 saying why it cannot be made. `conflicting` names
 * the fields given that a template cannot honour (stop, min_tokens, ...).
 */
export const planToolCall = (request: {
  readonly tools: ReadonlyArray<FunctionTool> | undefined
  readonly toolChoice: ToolChoice | undefined
  readonly maxTokens: StructuredRequest["maxTokens"]
  readonly conflicting: ReadonlyArray<string>
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
          'send "required", or "none"',
        param: "tool_choice",
        code: "unsupported_parameter"
      })
    }
    if (tools.length === 0) {
      return yield* new BadRequest({ message: "tool_choice asks for a call, but the request gives no tools", param: "tool_choice" })
    }
    let indexes: ReadonlyArray<number>
    if (choice === "required") indexes = tools.map((_, i) => i)
    else {
      const found = names.get(choice.function.name)
      if (found === undefined) {
        return yield* new BadRequest({
          message: `tool_choice names ${JSON.stringify(choice.function.name)}, which is not one of tools`,
          param: "tool_choice.function.name"
        })
      }
      indexes = [found]
    }
    const conflict = request.conflicting[0]
    if (conflict !== undefined) {
      return yield* new BadRequest({
        message: `${conflict} cannot be used with a tool call: the answer is exactly the call's JSON, which ends where it does and which no stop cuts`,
        param: conflict,
        code: "unsupported_parameter"
      })
    }
    const tokenizer = yield* Tokenizer
    const candidates = yield* Effect.forEach(indexes, (index) =>
      Effect.gen(function* () {
        const name = tools[index]!.function.name
        // The name is a piece of its own, so that its tokens are known (`nameAt`) for choosing among calls.
        const before = ['{"name": ', JSON.stringify(name), ', "arguments": ']
        const after = "}"
        const template = yield* templateOf(tools[index]!.function.parameters, {
          schemaParam: `tools[${index}].function.parameters`,
          maxTokens: request.maxTokens,
          wrap: { before, after, under: "arguments" },
          emptyObject: true
        })
        const prefix = before.join("")
        return {
          name,
          template,
          finishReason: (choice === "required" ? "tool_calls" : "stop") as PlannedCall["finishReason"],
          nameAt: {
            start: tokenizer.encode(before[0]!, { addSpecialTokens: false }).length,
            tokens: tokenizer.encode(before[1]!, { addSpecialTokens: false })
          },
          argumentsOf: (canvas) => {
            const text = template.render(canvas)
            return text.slice(prefix.length, text.length - after.length)
          }
        } satisfies PlannedCall
      })
    )
    // One candidate per index, and there is at least one (tools is not empty).
    return candidates as ReadonlyArray<PlannedCall> as NonEmptyReadonlyArray<PlannedCall>
  })

/**
 * The call an answer makes among several (tool_choice "required" with several tools): each function's
 * name scored in its own call's layout — the prompt, the call's skeleton with every written position
 * masked, the name's tokens by the chain rule in reading order and the token after it (as guided_choice
 * scores a choice and its end) — in one scoring job, and picked as a choice is (pickChoice: the likeliest
 * at temperature 0, else drawn with the request's seed). One pick serves the request's n answers.
 */
export const chooseCall = (candidates: NonEmptyReadonlyArray<PlannedCall>, prompt: ReadonlyArray<number>, settings: SamplingSettings) =>
  Effect.gen(function* () {
    if (candidates.length === 1) return candidates[0]
    const scheduler = yield* Scheduler
    const mask = (yield* Tokenizer).specialTokens.mask
    const chains = candidates.map(({ template, nameAt }) => {
      const base = template.template.map((token) => (token === NOT_COMMITTED ? mask : token))
      const targets = [...nameAt.tokens, base[nameAt.start + nameAt.tokens.length]!]
      return targets.map((target, k) => {
        const canvas = base.slice()
        for (let j = k; j < targets.length; j++) canvas[nameAt.start + j] = mask
        return { canvas: [...prompt, ...canvas], positions: [prompt.length + nameAt.start + k], targets: [target] }
      })
    })
    const scores = yield* scheduler.score({ items: chains.flat() }).pipe(Effect.mapError(fromGenerationError))
    let at = 0
    const totals = chains.map((items) => {
      const total = scores.slice(at, at + items.length).reduce((sum, scored) => sum + scored.logprobs[0]!, 0)
      at += items.length
      return total
    })
    return candidates[yield* pickChoice(totals, settings, settings.seed)]!
  })

/**
 * A request's plan, and its call when it asks for one: the plan is made for the answer's template (the
 * call's, else `formatted`, structured output's), after choosing among several calls (chooseCall) with
 * the sampling the first plan resolves for `prompt`.
 */
export const planWithCall = <E, R>(
  calls: NonEmptyReadonlyArray<PlannedCall> | undefined,
  formatted: JsonTemplate | undefined,
  planFor: (laid: JsonTemplate | undefined) => Effect.Effect<AnswerPlan, E, R>,
  prompt: PreparedPrompt
) =>
  Effect.gen(function* () {
    const first = yield* planFor(calls?.[0].template ?? formatted)
    if (calls === undefined || calls.length === 1) return { plan: first, call: calls?.[0], structured: calls?.[0].template ?? formatted }
    const kept = first.truncatePrompt(prompt)
    yield* checkNoMaskToken([kept])
    const call = yield* chooseCall(calls, kept.tokens, yield* first.settingsFor(kept.tokens.length, kept.param))
    return { plan: yield* planFor(call.template), call, structured: call.template }
  })
