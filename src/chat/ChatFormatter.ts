/**
 * Chat formatting: turns a list of chat messages into the prompt text the model was trained on.
 *
 * With a `chat_template` in tokenizer_config.json (LLaDA-Instruct and the embedded model have one) the
 * template is rendered with @huggingface/jinja, given `messages`, `bos_token`, `eos_token` and
 * `add_generation_prompt`, as Hugging Face's `apply_chat_template` does. Without one, the fallback format
 * is used: each message as "Role: content" (role capitalised), joined by a blank line, ending with
 * "Assistant:" —
 *
 *     System: {system}\n\nUser: {user}\n\nAssistant: {assistant}\n\nUser: {user}\n\nAssistant:
 *
 * Tools (openai/tools.ts): a template gets the request's `tools`, and the conversation's `tool` messages
 * and assistant `tool_calls` as Hugging Face passes them (arguments parsed from their JSON). A template that
 * does not read `tool_calls` (LLaDA-Instruct's, the embedded model's) or the fallback format gets an
 * assistant's calls written into its content, each as the JSON the server lays on the canvas for a call
 * (`{"name": ..., "arguments": {...}}`), so that the model sees its calls as it wrote them.
 *
 * @since 0.1.0
 */
import { Template } from "@huggingface/jinja"
import { Context, Effect, Layer, Schema } from "effect"
import { Tokenizer } from "../tokenizer/Tokenizer.js"

/** A content part of a message; only `{type: "text", text}` can be given to a text-only model. */
export interface ContentPart {
  readonly type: string
  readonly text?: unknown
  readonly [key: string]: unknown
}

/** A call an assistant message made, as the client sends it back: arguments as JSON text. */
export interface MessageToolCall {
  readonly id?: string | undefined
  readonly function: { readonly name: string; readonly arguments: string }
}

export interface ChatMessage {
  readonly role: string
  /** Absent only on an assistant message that made tool calls. */
  readonly content?: string | ReadonlyArray<ContentPart> | undefined
  readonly tool_calls?: ReadonlyArray<MessageToolCall> | undefined
  readonly tool_call_id?: string | undefined
}

export const roles = ["system", "user", "assistant", "tool"] as const
export type Role = (typeof roles)[number]

/**
 * Roles a request may use besides `roles`, and the role each is rendered as: OpenAI's `developer` (its
 * newer models' name for system instructions) is a system message to every chat template.
 */
export const roleAliases: Readonly<Record<string, Role>> = { developer: "system" }

/** A call after validation: its arguments parsed when they are JSON (kept as text when not). */
export interface ToolCallOf {
  readonly id: string | undefined
  readonly name: string
  readonly arguments: unknown
}

/** A message after validation: a known role and plain text, and an assistant's calls or a tool's call id. */
export interface TextMessage {
  readonly role: Role
  readonly content: string
  readonly toolCalls?: ReadonlyArray<ToolCallOf>
  readonly toolCallId?: string
}

/**
 * JSON text as this server lays it on the canvas and as Python's json.dumps writes it: ", " between
 * items, ": " after keys.
 */
export const spacedJson = (value: unknown): string => {
  if (Array.isArray(value)) return `[${value.map(spacedJson).join(", ")}]`
  if (typeof value === "object" && value !== null) {
    return `{${Object.entries(value)
      .map(([key, item]) => `${JSON.stringify(key)}: ${spacedJson(item)}`)
      .join(", ")}}`
  }
  return JSON.stringify(value) ?? "null"
}

/** A call as the canvas holds it: `{"name": ..., "arguments": {...}}`. */
export const callText = (call: ToolCallOf): string => spacedJson({ name: call.name, arguments: call.arguments })

const parsedArguments = (text: string): unknown => {
  try {
    return JSON.parse(text)
  } catch {
    return text
  }
}

/** The request's messages cannot be formatted for this model (an HTTP 400). */
export class InvalidChatRequest extends Schema.TaggedError<InvalidChatRequest>()("InvalidChatRequest", {
  reason: Schema.Literal("EmptyMessages", "UnknownRole", "UnsupportedContent", "RejectedByTemplate"),
  /** Where in the request, e.g. "messages[2].content[1]". */
  param: Schema.String,
  message: Schema.String
}) {}

/** The model's chat template does not parse or fails while rendering (a fault of the model directory). */
export class ChatTemplateError extends Schema.TaggedError<ChatTemplateError>()("ChatTemplateError", {
  message: Schema.String
}) {}

export interface RenderOptions {
  /** End with the opening of an assistant turn, for the model to complete. Default true. */
  readonly addGenerationPrompt?: boolean
  /** The request's tools (`{type: "function", function}`), given to a template as `tools`. */
  readonly tools?: ReadonlyArray<unknown> | undefined
}

export interface RenderedChat {
  readonly text: string
  /**
   * Whether to encode `text` with the tokenizer's special tokens (BOS). False for a chat template, which
   * writes its own special tokens (as `apply_chat_template` does); true for the fallback format.
   */
  readonly addSpecialTokens: boolean
}

export interface ChatFormatterShape {
  /** Whether the model has its own chat template (otherwise the fallback format is used). */
  readonly hasTemplate: boolean
  readonly render: (
    messages: ReadonlyArray<ChatMessage>,
    options?: RenderOptions
  ) => Effect.Effect<RenderedChat, InvalidChatRequest | ChatTemplateError>
}

export class ChatFormatter extends Context.Tag("vdiff/ChatFormatter")<ChatFormatter, ChatFormatterShape>() {}

const isRole = (role: string): role is Role => (roles as ReadonlyArray<string>).includes(role)

/**
 * Checks roles (a `developer` message becomes a system message) and content and flattens content parts
 * to text. Several text parts are joined with "\n"
 * (as vLLM does for text-only templates); any other part (image_url, input_audio, ...) is an error.
 */
export const validateMessages = (messages: ReadonlyArray<ChatMessage>): Effect.Effect<ReadonlyArray<TextMessage>, InvalidChatRequest> =>
  Effect.gen(function* () {
    if (messages.length === 0) {
      return yield* new InvalidChatRequest({
        reason: "EmptyMessages",
        param: "messages",
        message: "messages must contain at least one message"
      })
    }
    const out: Array<TextMessage> = []
    for (const [i, message] of messages.entries()) {
      const { role: given, content } = message
      const role = Object.hasOwn(roleAliases, given) ? roleAliases[given]! : given
      if (!isRole(role)) {
        return yield* new InvalidChatRequest({
          reason: "UnknownRole",
          param: `messages[${i}].role`,
          message: `unknown role "${given}" (expected one of ${[...roles, ...Object.keys(roleAliases)].join(", ")})`
        })
      }
      const calls = message.tool_calls ?? []
      if (calls.length > 0 && role !== "assistant") {
        return yield* new InvalidChatRequest({
          reason: "UnsupportedContent",
          param: `messages[${i}].tool_calls`,
          message: `tool_calls belong to assistant messages, not to a ${given} message`
        })
      }
      const extra = {
        ...(calls.length > 0
          ? {
              toolCalls: calls.map((call) => ({
                id: call.id,
                name: call.function.name,
                arguments: parsedArguments(call.function.arguments)
              }))
            }
          : {}),
        ...(role === "tool" && message.tool_call_id !== undefined ? { toolCallId: message.tool_call_id } : {})
      }
      if (content === undefined || content === null) {
        if (calls.length === 0) {
          return yield* new InvalidChatRequest({
            reason: "UnsupportedContent",
            param: `messages[${i}].content`,
            message: "content is required (only an assistant message with tool_calls may leave it out)"
          })
        }
        out.push({ role, content: "", ...extra })
        continue
      }
      if (typeof content === "string") {
        out.push({ role, content, ...extra })
        continue
      }
      if (!Array.isArray(content)) {
        return yield* new InvalidChatRequest({
          reason: "UnsupportedContent",
          param: `messages[${i}].content`,
          message: "content must be a string or a list of text parts"
        })
      }
      const texts: Array<string> = []
      for (const [j, part] of content.entries()) {
        if (typeof part !== "object" || part === null || part.type !== "text") {
          return yield* new InvalidChatRequest({
            reason: "UnsupportedContent",
            param: `messages[${i}].content[${j}]`,
            message: `content part of type "${String(part?.type)}" is not supported: this model takes text only`
          })
        }
        if (typeof part.text !== "string") {
          return yield* new InvalidChatRequest({
            reason: "UnsupportedContent",
            param: `messages[${i}].content[${j}].text`,
            message: "text must be a string"
          })
        }
        texts.push(part.text)
      }
      out.push({ role, content: texts.join("\n"), ...extra })
    }
    return out
  })

const capitalise = (role: string): string => role.charAt(0).toUpperCase() + role.slice(1)

/** A message's content with its calls written after it (for a template that does not read tool_calls). */
const contentWithCalls = ({ content, toolCalls }: TextMessage): string =>
  toolCalls === undefined ? content : [...(content === "" ? [] : [content]), ...toolCalls.map(callText)].join("\n")

/** The fallback format, for models without a chat template. */
export const renderFallback = (messages: ReadonlyArray<TextMessage>, options?: RenderOptions): string => {
  const turns = messages.map((message) => `${capitalise(message.role)}: ${contentWithCalls(message)}`)
  if (options?.addGenerationPrompt ?? true) turns.push("Assistant:")
  return turns.join("\n\n")
}

/** Thrown by the template's `raise_exception(...)`: the template itself rejects the conversation. */
class TemplateRejection extends Error {}
const RAISE_EXCEPTION = "vdiff_raise_exception"

const errorMessage = (cause: unknown): string => (cause instanceof Error ? cause.message : String(cause))

/** tokenizer_config.json names tokens as a string or as a serialized AddedToken `{content, ...}`. */
const tokenText = (value: unknown): string =>
  typeof value === "string"
    ? value
    : typeof value === "object" && value !== null && typeof (value as { content?: unknown }).content === "string"
      ? (value as { content: string }).content
      : ""

/**
 * The template of a tokenizer_config.json: `chat_template` is a string, or a list of named templates of
 * which "default" is the one for plain chat.
 */
const chatTemplateOf = (tokenizerConfig: Readonly<Record<string, unknown>>): string | undefined => {
  const value = tokenizerConfig["chat_template"]
  if (typeof value === "string") return value
  if (Array.isArray(value)) {
    const named = value.find((t) => typeof t === "object" && t !== null && t.name === "default")
    return typeof named?.template === "string" ? named.template : undefined
  }
  return undefined
}

/** A formatter for the model whose tokenizer_config.json is given. Fails if its template does not parse. */
export const fromTokenizerConfig = (
  tokenizerConfig: Readonly<Record<string, unknown>>
): Effect.Effect<ChatFormatterShape, ChatTemplateError> =>
  Effect.gen(function* () {
    const source = chatTemplateOf(tokenizerConfig)
    if (source === undefined) {
      return {
        hasTemplate: false,
        render: (messages, options) =>
          validateMessages(messages).pipe(Effect.map((valid) => ({ text: renderFallback(valid, options), addSpecialTokens: true })))
      }
    }
    // The library's own raise_exception throws a plain Error like every other rendering failure, and it
    // cannot be redefined, so calls are routed to a function of ours that throws a TemplateRejection.
    const template = yield* Effect.try({
      try: () => new Template(source.replace(/\braise_exception\b/g, RAISE_EXCEPTION)),
      catch: (cause) => new ChatTemplateError({ message: `chat_template does not parse: ${errorMessage(cause)}` })
    })
    const bosToken = tokenText(tokenizerConfig["bos_token"])
    const eosToken = tokenText(tokenizerConfig["eos_token"])
    // Hugging Face's message shape for a template that reads tool calls; the calls as content for one that does not.
    const readsToolCalls = source.includes("tool_calls")
    const templateMessage = (message: TextMessage) =>
      readsToolCalls
        ? {
            role: message.role,
            content: message.content,
            ...(message.toolCalls === undefined
              ? {}
              : {
                  tool_calls: message.toolCalls.map((call) => ({
                    ...(call.id === undefined ? {} : { id: call.id }),
                    type: "function",
                    function: { name: call.name, arguments: call.arguments }
                  }))
                }),
            ...(message.toolCallId === undefined ? {} : { tool_call_id: message.toolCallId })
          }
        : { role: message.role, content: contentWithCalls(message) }
    return {
      hasTemplate: true,
      render: (messages, options) =>
        Effect.flatMap(validateMessages(messages), (valid) =>
          Effect.try({
            try: () => ({
              text: template.render({
                messages: valid.map(templateMessage),
                ...(options?.tools === undefined ? {} : { tools: options.tools }),
                bos_token: bosToken,
                eos_token: eosToken,
                add_generation_prompt: options?.addGenerationPrompt ?? true,
                [RAISE_EXCEPTION]: (message: string) => {
                  throw new TemplateRejection(message)
                }
              }),
              addSpecialTokens: false
            }),
            catch: (cause) =>
              cause instanceof TemplateRejection
                ? new InvalidChatRequest({ reason: "RejectedByTemplate", param: "messages", message: cause.message })
                : new ChatTemplateError({ message: `chat_template failed to render: ${errorMessage(cause)}` })
          })
        )
    }
  })

/** The formatter for the model the Tokenizer was loaded from. */
export const layer: Layer.Layer<ChatFormatter, ChatTemplateError, Tokenizer> = Layer.effect(
  ChatFormatter,
  Effect.flatMap(Tokenizer, (tokenizer) => fromTokenizerConfig(tokenizer.tokenizerConfig))
)
