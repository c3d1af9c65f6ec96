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

export interface ChatMessage {
  readonly role: string
  readonly content: string | ReadonlyArray<ContentPart>
}

export const roles = ["system", "user", "assistant"] as const
export type Role = (typeof roles)[number]

/**
 * Roles a request may use besides `roles`, and the role each is rendered as: OpenAI's `developer` (its
 * newer models' name for system instructions) is a system message to every chat template.
 */
export const roleAliases: Readonly<Record<string, Role>> = { developer: "system" }

/** A message after validation: a known role and plain text. */
export interface TextMessage {
  readonly role: Role
  readonly content: string
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
    for (const [i, { role: given, content }] of messages.entries()) {
      const role = Object.hasOwn(roleAliases, given) ? roleAliases[given]! : given
      if (!isRole(role)) {
        return yield* new InvalidChatRequest({
          reason: "UnknownRole",
          param: `messages[${i}].role`,
          message: `unknown role "${given}" (expected one of ${[...roles, ...Object.keys(roleAliases)].join(", ")})`
        })
      }
      if (typeof content === "string") {
        out.push({ role, content })
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
      out.push({ role, content: texts.join("\n") })
    }
    return out
  })

const capitalise = (role: string): string => role.charAt(0).toUpperCase() + role.slice(1)

/** The fallback format, for models without a chat template. */
export const renderFallback = (messages: ReadonlyArray<TextMessage>, options?: RenderOptions): string => {
  const turns = messages.map(({ role, content }) => `${capitalise(role)}: ${content}`)
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
    return {
      hasTemplate: true,
      render: (messages, options) =>
        Effect.flatMap(validateMessages(messages), (valid) =>
          Effect.try({
            try: () => ({
              text: template.render({
                messages: valid.map(({ content, role }) => ({ role, content })),
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
