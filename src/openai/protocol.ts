/**
 * The OpenAI-compatible wire format: schemas of the request bodies (decoded with effect/Schema, so a bad
 * value is a 400 naming the parameter) and of the responses and stream chunks (the serving code builds
 * values of these types; the tests decode real responses with them).
 *
 * Requests follow OpenAI's completions and chat completions APIs, plus vLLM's extensions (top_k,
 * stop_token_ids, return_token_ids, /tokenize, /detokenize) and the diffusion settings of this server
 * (diffusion_steps, block_length, remasking, cfg_scale, parallel_threshold, parallel_factor, early_stop,
 * kv_cache, stream_options.include_snapshots). Unknown fields are ignored, as OpenAI and vLLM do; `null`
 * counts as absent, because SDKs send it for unset fields. Responses carry a `diffusion` object of statistics.
 *
 * Ranges checked here are those that do not depend on the model; the serving code checks the rest
 * (context length, vocabulary, `n` against the batch size) and what is not supported yet.
 */
import { Schema } from "effect"
import * as Sampling from "../config/sampling.js"
import { MAX_SEED } from "../config/sampling.js"

// ---- building blocks ---------------------------------------------------------------------------------

/** One message for every way the value can be wrong, so errors read "temperature must be ...". */
const described = <A, I>(schema: Schema.Schema<A, I>, message: string): Schema.Schema<A, I> =>
  schema.annotations({ message: () => ({ message, override: true }) })

/** Optional; `null` means absent. */
const optional = <A, I>(schema: Schema.Schema<A, I>) => Schema.optionalWith(schema, { nullable: true, exact: true })

// The same value schemas, and messages, as the sampling settings' request fields.
const int = (name: string, min: number, max?: number) =>
  Sampling.requestValue(name, max === undefined ? { type: "int", min } : { type: "int", min, max })

const boolean = (name: string) => Sampling.requestValue(name, { type: "switch" })

const TokenId = Schema.NonNegativeInt

export { MAX_DIFFUSION_STEPS, MAX_SEED } from "../config/sampling.js"

const SEED_MODULUS = BigInt(MAX_SEED)
/**
 * seed: any 64-bit integer, signed or not, as OpenAI and vLLM take it. The engine's seeds run from 0 to
 * MAX_SEED (a request's n answers use seed, seed + 1, ..., which must stay exact); a seed outside that range
 * is taken modulo 2^52.
 */
const Seed = Schema.transform(
  described(
    Schema.Number.pipe(Schema.filter((s) => Number.isInteger(s) && s >= -(2 ** 63) && s <= 2 ** 64)),
    "seed must be an integer (any 64-bit value)"
  ),
  Schema.Number,
  {
    strict: true,
    decode: (s) => (s >= 0 && s <= MAX_SEED ? s : Number(((BigInt(s) % SEED_MODULUS) + SEED_MODULUS) % SEED_MODULUS)),
    encode: (s) => s
  }
)

const Stop = described(Schema.Union(Schema.String, Schema.Array(Schema.String)), "stop must be a string or an array of strings")

export const StreamOptions = Schema.Struct({
  include_usage: optional(boolean("stream_options.include_usage")),
  /** vLLM: with include_usage, every chunk carries the usage so far (the tokens sent until then). */
  continuous_usage_stats: optional(boolean("stream_options.continuous_usage_stats")),
  /** vdiff extension: a `snapshot` of the whole canvas on every denoising step. */
  include_snapshots: optional(boolean("stream_options.include_snapshots"))
})

/**
 * Fields of OpenAI's API and of vLLM's extensions that would change the answer and that this server does
 * not honour, each with the values that change nothing (absent and `null` always do) and the reason. The
 * request schemas keep them as they come, so that the serving code refuses any other value with a 400
 * naming the field (openai/plan.ts `refuseUnhonoured`); every other unknown field is ignored.
 */
export interface Unhonoured {
  readonly neutral: (value: unknown) => boolean
  readonly reason: string
}
const never = () => false
const isFalse = (value: unknown) => value === false
const isEmptyList = (value: unknown) => Array.isArray(value) && value.length === 0
const noTools = "the model cannot call tools"
const guided = {
  neutral: never,
  reason:
    "constrained decoding is not supported; guided_choice (structured_outputs.choice) picks among strings, and response_format json_schema (guided_json, structured_outputs.json) lays out a JSON answer"
}
/** structured_outputs with only these kinds set (choice.ts reads `choice`, structured.ts `json`); any other kind is refused. */
const onlyKinds =
  (...kinds: ReadonlyArray<string>) =>
  (value: unknown) =>
    typeof value === "object" &&
    value !== null &&
    !Array.isArray(value) &&
    Object.entries(value).every(([key, v]) => kinds.includes(key) || v === null || v === undefined || v === false)

const sharedUnhonoured = {
  guided_regex: guided,
  guided_grammar: guided,
  structured_outputs: { ...guided, neutral: onlyKinds("choice", "json") }
} satisfies Record<string, Unhonoured>

/**
 * Chat's unhonoured fields: the shared ones, tools' legacy fields (`tools` and `tool_choice` are honoured,
 * openai/tools.ts), audio, and vLLM's chat echo.
 */
export const chatUnhonoured = {
  ...sharedUnhonoured,
  functions: { neutral: isEmptyList, reason: `${noTools} by the legacy functions; send tools and tool_choice` },
  function_call: {
    neutral: (value: unknown) => value === "none" || value === "auto",
    reason: `${noTools} by the legacy function_call; send tools and tool_choice`
  },
  modalities: {
    neutral: (value: unknown) => Array.isArray(value) && value.every((m) => m === "text"),
    reason: "the model writes text only"
  },
  audio: { neutral: never, reason: "the model writes text only" },
  echo: { neutral: isFalse, reason: "a chat answer does not repeat the conversation (completions' echo does)" }
} satisfies Record<string, Unhonoured>

/** Completions' unhonoured fields: the shared ones. */
export const completionUnhonoured = sharedUnhonoured

/** Schema fields that keep the unhonoured fields as they come. */
const kept = <K extends string>(table: Record<K, Unhonoured>) =>
  Object.fromEntries(Object.keys(table).map((name) => [name, optional(Schema.Unknown)])) as {
    [P in K]: ReturnType<typeof optional<unknown, unknown>>
  }

/**
 * Fields shared by completions and chat completions: the sampling settings (max_tokens, temperature, top_p,
 * top_k, and the diffusion settings diffusion_steps, block_length, remasking, cfg_scale, parallel_threshold,
 * parallel_factor, early_stop, kv_cache; described once in src/config/sampling.ts), and the rest.
 */
const samplingFields = {
  model: optional(described(Schema.String, "model must be a string")),
  ...Sampling.requestFields,
  n: optional(int("n", 1)),
  stop: optional(Stop),
  stop_token_ids: optional(described(Schema.Array(TokenId), "stop_token_ids must be an array of token ids")),
  /**
   * vLLM: the answer's first min_tokens positions never take an end token nor one of stop_token_ids, and
   * no stop string ends it there. A diffusion answer knows its positions from the start, so this is a bar
   * by position, not a count of tokens written so far.
   */
  min_tokens: optional(int("min_tokens", 0)),
  /** vLLM: no position of the answer takes an end token (EOS, end of turn), so it fills max_tokens. */
  ignore_eos: optional(boolean("ignore_eos")),
  /** vLLM: the answer's tokens are drawn from these only (end tokens too: without one the answer fills max_tokens). */
  allowed_token_ids: optional(described(Schema.Array(TokenId), "allowed_token_ids must be an array of token ids")),
  /**
   * vLLM: words the answer must not hold. A word whose forms (as it is, and after a space) are each one
   * token is banned at every position (openai/plan.ts); a word of several tokens is refused.
   */
  bad_words: optional(described(Schema.Array(Schema.String), "bad_words must be an array of strings")),
  /** vLLM: the text of an answer ended by a stop string ends with it (by default it ends before it). */
  include_stop_str_in_output: optional(boolean("include_stop_str_in_output")),
  /** vLLM: only the prompt's last k tokens are kept (-1: the model's context length), after templating. */
  truncate_prompt_tokens: optional(int("truncate_prompt_tokens", -1)),
  seed: optional(Seed),
  logit_bias: optional(described(Schema.Record({ key: Schema.String, value: Schema.Number }), "logit_bias must map token ids to numbers")),
  stream: optional(boolean("stream")),
  stream_options: optional(StreamOptions),
  /** vLLM: add prompt_token_ids and token_ids to every choice. */
  return_token_ids: optional(boolean("return_token_ids")),
  /** vLLM: the answer is one of these strings, the one the model finds likeliest (openai/choice.ts). */
  guided_choice: optional(Schema.Unknown)
}

/** The fields completions and chat share, as the serving code reads them. */
export type SamplingRequest = Schema.Struct.Type<typeof samplingFields>

// ---- requests ----------------------------------------------------------------------------------------

/** `response_format.json_schema` (completions, chat) and the json_schema `text.format` (responses). */
export const JsonSchemaFormat = Schema.Struct({
  name: optional(described(Schema.String, "json_schema.name must be a string")),
  description: optional(described(Schema.String, "json_schema.description must be a string")),
  schema: optional(Schema.Unknown),
  strict: optional(described(Schema.Boolean, "json_schema.strict must be true or false"))
})

/** response_format (completions, chat): "text", or "json_schema" with a schema (structured output, openai/structured.ts). */
export const ResponseFormat = Schema.Struct({
  type: described(Schema.String, "response_format.type must be a string"),
  json_schema: optional(JsonSchemaFormat)
})
export type ResponseFormat = typeof ResponseFormat.Type

/** A prompt: text, texts, token ids, or lists of token ids (one answer set per prompt). */
export const Prompt = described(
  Schema.Union(Schema.String, Schema.Array(Schema.String), Schema.Array(TokenId), Schema.Array(Schema.Array(TokenId))),
  "prompt must be a string, an array of strings, an array of token ids or an array of arrays of token ids"
)

export const CompletionRequest = Schema.Struct({
  ...kept(completionUnhonoured),
  ...samplingFields,
  prompt: Prompt,
  /**
   * Text after the answer: true infilling, the canvas is prompt, masks, suffix. The choice's text is the
   * inserted text only (as OpenAI returns it); usage counts the suffix's tokens as prompt tokens.
   */
  suffix: optional(described(Schema.String, "suffix must be a string")),
  echo: optional(boolean("echo")),
  /**
   * Completions: the logprobs of the answer's tokens, with this many likeliest alternatives per token
   * (OpenAI allows up to 5, vLLM up to 20; the engine reports up to 20).
   */
  logprobs: optional(int("logprobs", 0, 20)),
  best_of: optional(int("best_of", 1)),
  /** As the sampling field, but 0 is allowed with echo: the prompt alone, scored with logprobs. */
  max_tokens: optional(int("max_tokens", 0)),
  /**
   * vLLM: each prompt token's log-probability, rank and decoded text, with this many likeliest tokens
   * beside it (openai/promptLogprobs.ts: the chain rule in reading order); the first token's is null.
   */
  prompt_logprobs: optional(int("prompt_logprobs", 0, 20)),
  /** vLLM: a JSON schema (or its JSON text) for the answer, as response_format json_schema (structured.ts). */
  guided_json: optional(Schema.Unknown),
  response_format: optional(ResponseFormat)
})
export type CompletionRequest = typeof CompletionRequest.Type

const ContentPart = Schema.Struct({
  type: described(Schema.String, "a content part needs a string type"),
  text: Schema.optional(Schema.Unknown)
})

/** A call an assistant message made, as a client sends it back in the conversation. */
export const MessageToolCall = Schema.Struct({
  id: optional(described(Schema.String, "a tool call's id must be a string")),
  type: optional(described(Schema.Literal("function"), 'a tool call\'s type must be "function"')),
  function: Schema.Struct({
    name: described(Schema.String, "function.name must be a string"),
    arguments: described(Schema.String, "function.arguments must be a string (the arguments' JSON)")
  })
})

export const ChatMessage = Schema.Struct({
  role: described(Schema.String, "role must be a string"),
  /** Absent (or null) only on an assistant message that made tool calls. */
  content: optional(
    described(Schema.Union(Schema.String, Schema.Array(ContentPart)), "content must be a string or an array of content parts")
  ),
  name: optional(Schema.String),
  tool_calls: optional(described(Schema.Array(MessageToolCall), "tool_calls must be an array of tool calls")),
  tool_call_id: optional(described(Schema.String, "tool_call_id must be a string"))
})

/** A function the model may call (chat's `tools`): its name, what it does and its arguments' JSON schema. */
export const FunctionTool = Schema.Struct({
  type: described(Schema.Literal("function"), 'a tool\'s type must be "function"'),
  function: Schema.Struct({
    name: described(
      Schema.String.pipe(Schema.pattern(/^[A-Za-z0-9_-]{1,64}$/)),
      "function.name must be 1 to 64 letters, digits, underscores or dashes"
    ),
    description: optional(described(Schema.String, "function.description must be a string")),
    parameters: optional(Schema.Unknown),
    strict: optional(described(Schema.Boolean, "function.strict must be true or false"))
  })
})
export type FunctionTool = typeof FunctionTool.Type

/** `tool_choice`: "none", "auto", "required", or the function the answer calls. */
export const ToolChoice = described(
  Schema.Union(
    Schema.Literal("none", "auto", "required"),
    Schema.Struct({ type: Schema.Literal("function"), function: Schema.Struct({ name: Schema.String }) })
  ),
  'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
)
export type ToolChoice = typeof ToolChoice.Type

export const ChatCompletionRequest = Schema.Struct({
  ...kept(chatUnhonoured),
  ...samplingFields,
  messages: Schema.Array(ChatMessage).annotations({
    message: () => ({ message: "messages must be an array of messages", override: false })
  }),
  /** Newer name of max_tokens; wins when both are given. */
  max_completion_tokens: optional(int("max_completion_tokens", 1)),
  logprobs: optional(boolean("logprobs")),
  top_logprobs: optional(int("top_logprobs", 0, 20)),
  /** vLLM: a JSON schema (or its JSON text) for the answer, as response_format json_schema (structured.ts). */
  guided_json: optional(Schema.Unknown),
  /** vLLM: the rendered conversation's tokens scored (openai/promptLogprobs.ts), in the response's `prompt_logprobs`. */
  prompt_logprobs: optional(int("prompt_logprobs", 0, 20)),
  tools: optional(Schema.Array(FunctionTool)),
  tool_choice: optional(ToolChoice),
  /** The answer makes at most one call whatever this says. */
  parallel_tool_calls: optional(boolean("parallel_tool_calls")),
  response_format: optional(ResponseFormat)
})
export type ChatCompletionRequest = typeof ChatCompletionRequest.Type

/** A content part of a Responses input message: input_text / output_text carry text. */
const ResponseContentPart = Schema.Struct({
  type: described(Schema.String, "a content part needs a string type"),
  text: Schema.optional(Schema.Unknown)
})

/**
 * An item of a Responses `input` list: a message (type "message" or left out), a function call the model
 * made ("function_call": call_id, name, arguments) or its result ("function_call_output": call_id,
 * output); other items are refused.
 */
export const ResponseInputItem = Schema.Struct({
  type: optional(described(Schema.String, "an input item's type must be a string")),
  role: optional(described(Schema.String, "role must be a string")),
  content: optional(
    described(Schema.Union(Schema.String, Schema.Array(ResponseContentPart)), "content must be a string or an array of content parts")
  ),
  call_id: optional(described(Schema.String, "call_id must be a string")),
  name: optional(described(Schema.String, "name must be a string")),
  arguments: optional(described(Schema.String, "arguments must be a string (the arguments' JSON)")),
  output: optional(described(Schema.String, "output must be a string"))
})

/** A function tool of the Responses API: the chat tool's `function` fields, flat. */
export const ResponseFunctionTool = Schema.Struct({
  type: described(Schema.Literal("function"), 'a tool\'s type must be "function": this server runs no built-in tools'),
  ...FunctionTool.fields.function.fields
})

/** The Responses API's `tool_choice`: "none", "auto", "required", or `{type: "function", name}`. */
export const ResponseToolChoice = described(
  Schema.Union(Schema.Literal("none", "auto", "required"), Schema.Struct({ type: Schema.Literal("function"), name: Schema.String })),
  'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}'
)

/** `text.format` of the Responses API: "text", or "json_schema" (name, schema, strict) as structured output. */
export const ResponseTextFormat = Schema.Struct({
  type: described(Schema.String, "text.format.type must be a string"),
  ...JsonSchemaFormat.fields
})

const { max_tokens: _maxTokens, ...responseSamplingFields } = Sampling.requestFields

/**
 * POST /v1/responses, the part a stateless server can honour: `input` (a string or a list of messages),
 * `instructions` (a system message before them), `max_output_tokens`, `temperature`, `top_p`, `stream`,
 * `text.format`, and this server's own settings (top_k, seed, the diffusion settings). What needs stored
 * state or tools is decoded so that it can be refused by name (openai/responses.ts).
 */
export const ResponseRequest = Schema.Struct({
  ...responseSamplingFields,
  model: optional(described(Schema.String, "model must be a string")),
  input: described(Schema.Union(Schema.String, Schema.Array(ResponseInputItem)), "input must be a string or an array of input items"),
  instructions: optional(described(Schema.String, "instructions must be a string")),
  max_output_tokens: optional(int("max_output_tokens", 1)),
  stream: optional(boolean("stream")),
  seed: optional(Seed),
  text: optional(Schema.Struct({ format: optional(ResponseTextFormat) })),
  // Refused unless neutral (openai/responses.ts says why).
  store: optional(boolean("store")),
  background: optional(boolean("background")),
  previous_response_id: optional(described(Schema.String, "previous_response_id must be a string")),
  conversation: optional(Schema.Unknown),
  tools: optional(Schema.Array(ResponseFunctionTool)),
  tool_choice: optional(ResponseToolChoice),
  parallel_tool_calls: optional(boolean("parallel_tool_calls")),
  include: optional(described(Schema.Array(Schema.String), "include must be an array of strings")),
  top_logprobs: optional(int("top_logprobs", 0, 20)),
  metadata: optional(Schema.Record({ key: Schema.String, value: Schema.String }))
})
export type ResponseRequest = typeof ResponseRequest.Type

/** vLLM's /tokenize: either a prompt or chat messages. */
export const TokenizeRequest = Schema.Struct({
  model: optional(described(Schema.String, "model must be a string")),
  prompt: optional(described(Schema.String, "prompt must be a string")),
  messages: optional(Schema.Array(ChatMessage)),
  /** With messages: the tools the chat template is given, as chat completions give them. */
  tools: optional(Schema.Array(FunctionTool)),
  /** Default: true for a prompt; for messages, what chat completions do (the template writes its own). */
  add_special_tokens: optional(boolean("add_special_tokens")),
  add_generation_prompt: optional(boolean("add_generation_prompt"))
})
export type TokenizeRequest = typeof TokenizeRequest.Type

export const DetokenizeRequest = Schema.Struct({
  model: optional(described(Schema.String, "model must be a string")),
  tokens: described(Schema.Array(TokenId), "tokens must be an array of token ids")
})
export type DetokenizeRequest = typeof DetokenizeRequest.Type

// ---- responses ---------------------------------------------------------------------------------------

export const FinishReason = Schema.Literal("stop", "length")
export type FinishReason = typeof FinishReason.Type

/** Chat's also say "tool_calls": the answer is a call the request required (tool_choice "required"). */
export const ChatFinishReason = Schema.Literal("stop", "length", "tool_calls")

export const Usage = Schema.Struct({
  prompt_tokens: Schema.Int,
  completion_tokens: Schema.Int,
  total_tokens: Schema.Int,
  /**
   * cached_tokens: the prompt tokens whose keys and values came from the prefix cache instead of being
   * computed (block-diffusion models with --prefix-cache; 0 otherwise). With n > 1, those every answer got.
   */
  prompt_tokens_details: Schema.Struct({ cached_tokens: Schema.Int })
})
export type Usage = typeof Usage.Type

/**
 * vdiff extension: how the answers were denoised, summed over every sequence of the request (all its
 * prompts' n answers). Non-streaming responses carry it; streams carry it on the usage chunk.
 */
export const Diffusion = Schema.Struct({
  /** Denoising steps taken. */
  steps: Schema.Int,
  /** Canvas evaluations by the model: one per step, two with cfg_scale > 0. */
  forward_passes: Schema.Int,
  /** Of those, the ones that recomputed the whole canvas to refresh a KV cache (the rest computed a part). */
  kv_refreshes: Schema.Int,
  /** Tokens committed by denoising per step, on average. */
  tokens_per_step: Schema.Number,
  /** Answer positions an early stop filled with EOS without denoising them. */
  skipped_tokens: Schema.Int,
  kv_cache: Schema.Literal("none", "prefix", "dual"),
  /** The parallel decoding rule in use, or null for the fixed per-step quota. */
  parallel: Schema.NullOr(Schema.Union(Schema.Struct({ threshold: Schema.Number }), Schema.Struct({ factor: Schema.Number }))),
  // Block decoding (LLaDA2.x, SDAR) and Dream add these; LLaDA's object is as it was.
  /** "block" for block decoding, "dream" for Dream's sampler. */
  decoding: Schema.optionalWith(Schema.Literal("block", "dream"), { exact: true }),
  /** Dream: the unmasking algorithm, its temperature and the end of the time schedule the answers used. */
  dream: Schema.optionalWith(
    Schema.Struct({
      alg: Schema.Literal("origin", "maskgit_plus", "topk_margin", "entropy"),
      alg_temp: Schema.Number,
      eps: Schema.Number
    }),
    { exact: true }
  ),
  /** The block length the answers were written in (the model's). */
  block_length: Schema.optionalWith(Schema.Int, { exact: true }),
  /**
   * The sequences' steps by the phase of their forward: prefill (the prompt's whole blocks, once), denoise
   * (the open block) and commit (a finished block once more, from its final tokens, to cache it exactly).
   */
  forwards: Schema.optionalWith(Schema.Struct({ prefill: Schema.Int, denoise: Schema.Int, commit: Schema.Int }), { exact: true }),
  /** Tokens committed by denoising per forward pass, every phase counted. */
  tokens_per_forward: Schema.optionalWith(Schema.Number, { exact: true }),
  /** LLaDA2.1 token editing in use, or null. */
  editing: Schema.optionalWith(Schema.NullOr(Schema.Struct({ threshold: Schema.Number, max_post_steps: Schema.Int })), { exact: true })
})
export type Diffusion = typeof Diffusion.Type

const diffusionField = { diffusion: Schema.optionalWith(Diffusion, { exact: true }) }

/**
 * Completions logprobs. A token's logprob is that of the probability it had when it was committed; its
 * `top_logprobs` are the likeliest tokens of the distribution at the step that committed it (for a
 * diffusion model, the step where the position was unmasked), plus the chosen token. With echo the
 * prompt's tokens come first, scored by the chain rule (openai/promptLogprobs.ts).
 */
export const CompletionLogprobs = Schema.Struct({
  tokens: Schema.Array(Schema.String),
  /** With echo, the prompt's first token has none (null), as OpenAI's. */
  token_logprobs: Schema.Array(Schema.NullOr(Schema.Number)),
  top_logprobs: Schema.NullOr(Schema.Array(Schema.NullOr(Schema.Record({ key: Schema.String, value: Schema.Number })))),
  text_offset: Schema.Array(Schema.Int)
})
export type CompletionLogprobs = typeof CompletionLogprobs.Type

export const TopLogprob = Schema.Struct({
  token: Schema.String,
  logprob: Schema.Number,
  /** UTF-8 bytes of the token; null when the token is part of a character (its bytes are not known). */
  bytes: Schema.NullOr(Schema.Array(Schema.Int))
})

export const ChatTokenLogprob = Schema.Struct({
  ...TopLogprob.fields,
  top_logprobs: Schema.Array(TopLogprob)
})
export type ChatTokenLogprob = typeof ChatTokenLogprob.Type

export const ChatLogprobs = Schema.Struct({ content: Schema.Array(ChatTokenLogprob) })
export type ChatLogprobs = typeof ChatLogprobs.Type

/** vLLM's return_token_ids. */
const tokenIdFields = {
  prompt_token_ids: Schema.optionalWith(Schema.Array(Schema.Int), { exact: true }),
  token_ids: Schema.optionalWith(Schema.Array(Schema.Int), { exact: true })
}

/**
 * vdiff extension on stream chunks (stream_options.include_snapshots): the whole answer canvas after a
 * denoising step. `canvas` has one entry per answer position: the token's text, or MASK_PLACEHOLDER where
 * nothing is committed yet.
 */
export const Snapshot = Schema.Struct({
  /** Denoising steps done (this one included). */
  step: Schema.Int,
  total_steps: Schema.Int,
  /** The block this step worked on. */
  block: Schema.Int,
  /** Answer positions per block (the request's block_length or the server's default): where `block` lies. */
  block_length: Schema.Int,
  /** Positions still masked. */
  masked: Schema.Int,
  canvas: Schema.Array(Schema.String),
  /** Answer positions committed by this step. */
  committed_now: Schema.Array(Schema.Int),
  // Block decoding adds these; LLaDA's snapshots are as they were.
  /** What the sequence's forward did in this step: "prefill", "denoise" or "commit". */
  phase: Schema.optionalWith(Schema.Literal("prefill", "denoise", "commit"), { exact: true }),
  /**
   * With token editing: the open block's positions whose token (shown in `canvas`) is committed for now
   * but may still be rewritten; they become final, and reach the text, when their block closes. Every other
   * position of `canvas` that is not `<mask>` is final.
   */
  provisional: Schema.optionalWith(Schema.Array(Schema.Int), { exact: true })
})
export type Snapshot = typeof Snapshot.Type

export const MASK_PLACEHOLDER = "<mask>"

/** vLLM's form of a logprob: keyed by token id (as a string), with its rank and text. */
export const RankedLogprob = Schema.Struct({
  logprob: Schema.Number,
  rank: Schema.Int,
  decoded_token: Schema.String
})

/** vLLM's prompt_logprobs: per prompt token (null for the first), token id → its logprob, rank and text. */
const PromptLogprobs = Schema.Array(Schema.NullOr(Schema.Record({ key: Schema.String, value: RankedLogprob })))

export const CompletionChoice = Schema.Struct({
  index: Schema.Int,
  text: Schema.String,
  logprobs: Schema.NullOr(CompletionLogprobs),
  finish_reason: FinishReason,
  ...tokenIdFields,
  /** vLLM's prompt_logprobs: per prompt token (null for the first), it and its likeliest alternatives. */
  prompt_logprobs: Schema.optionalWith(PromptLogprobs, { exact: true })
})
export type CompletionChoice = typeof CompletionChoice.Type

export const CompletionResponse = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("text_completion"),
  created: Schema.Int,
  model: Schema.String,
  choices: Schema.Array(CompletionChoice),
  usage: Usage,
  ...diffusionField
})
export type CompletionResponse = typeof CompletionResponse.Type

export const CompletionChunkChoice = Schema.Struct({
  index: Schema.Int,
  text: Schema.String,
  logprobs: Schema.NullOr(CompletionLogprobs),
  finish_reason: Schema.NullOr(FinishReason),
  snapshot: Schema.optionalWith(Snapshot, { exact: true }),
  ...tokenIdFields
})
export type CompletionChunkChoice = typeof CompletionChunkChoice.Type

export const CompletionChunk = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("text_completion"),
  created: Schema.Int,
  model: Schema.String,
  choices: Schema.Array(CompletionChunkChoice),
  usage: Schema.optionalWith(Schema.NullOr(Usage), { exact: true }),
  ...diffusionField
})
export type CompletionChunk = typeof CompletionChunk.Type

/** A call in an answer: its id, the function's name and the arguments' JSON text. */
export const ToolCall = Schema.Struct({
  id: Schema.String,
  type: Schema.Literal("function"),
  function: Schema.Struct({ name: Schema.String, arguments: Schema.String })
})
export type ToolCall = typeof ToolCall.Type

export const ChatCompletionChoice = Schema.Struct({
  index: Schema.Int,
  /** content is null, and tool_calls holds the call, when the answer calls a function. */
  message: Schema.Struct({
    role: Schema.Literal("assistant"),
    content: Schema.NullOr(Schema.String),
    tool_calls: Schema.optionalWith(Schema.Array(ToolCall), { exact: true })
  }),
  logprobs: Schema.NullOr(ChatLogprobs),
  finish_reason: ChatFinishReason,
  ...tokenIdFields
})
export type ChatCompletionChoice = typeof ChatCompletionChoice.Type

export const ChatCompletionResponse = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("chat.completion"),
  created: Schema.Int,
  model: Schema.String,
  choices: Schema.Array(ChatCompletionChoice),
  usage: Usage,
  /** vLLM's prompt_logprobs on chat: the rendered conversation's tokens, for the whole response. */
  prompt_logprobs: Schema.optionalWith(PromptLogprobs, { exact: true }),
  ...diffusionField
})
export type ChatCompletionResponse = typeof ChatCompletionResponse.Type

/** A stream's piece of a call: the first carries its id and name, a later one the arguments' text. */
export const ToolCallDelta = Schema.Struct({
  index: Schema.Int,
  id: Schema.optionalWith(Schema.String, { exact: true }),
  type: Schema.optionalWith(Schema.Literal("function"), { exact: true }),
  function: Schema.Struct({
    name: Schema.optionalWith(Schema.String, { exact: true }),
    arguments: Schema.String
  })
})

export const ChatDelta = Schema.Struct({
  role: Schema.optionalWith(Schema.Literal("assistant"), { exact: true }),
  content: Schema.optionalWith(Schema.NullOr(Schema.String), { exact: true }),
  tool_calls: Schema.optionalWith(Schema.Array(ToolCallDelta), { exact: true })
})

export const ChatCompletionChunkChoice = Schema.Struct({
  index: Schema.Int,
  delta: ChatDelta,
  logprobs: Schema.NullOr(ChatLogprobs),
  finish_reason: Schema.NullOr(ChatFinishReason),
  snapshot: Schema.optionalWith(Snapshot, { exact: true }),
  ...tokenIdFields
})
export type ChatCompletionChunkChoice = typeof ChatCompletionChunkChoice.Type

export const ChatCompletionChunk = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("chat.completion.chunk"),
  created: Schema.Int,
  model: Schema.String,
  choices: Schema.Array(ChatCompletionChunkChoice),
  usage: Schema.optionalWith(Schema.NullOr(Usage), { exact: true }),
  ...diffusionField
})
export type ChatCompletionChunk = typeof ChatCompletionChunk.Type

/**
 * vdiff extension on a model: its family (config.json's model_type; "dream" for Dream), how it decodes
 * (full canvas, block, or Dream's sampler), the block it was trained with (block decoding; 0 otherwise) and
 * whether it has token editing. Absent for LLaDA (full canvas), whose
 * model objects are as they were before other families were served.
 */
export const ModelFamily = Schema.Struct({
  name: Schema.String,
  decoding: Schema.Literal("full_canvas", "block", "dream"),
  block_length: Schema.Int,
  editing: Schema.Boolean
})

export const Model = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("model"),
  created: Schema.Int,
  owned_by: Schema.String,
  max_model_len: Schema.Int,
  family: Schema.optionalWith(ModelFamily, { exact: true })
})
export type Model = typeof Model.Type

export const ModelList = Schema.Struct({
  object: Schema.Literal("list"),
  data: Schema.Array(Model)
})
export type ModelList = typeof ModelList.Type

export const TokenizeResponse = Schema.Struct({
  count: Schema.Int,
  max_model_len: Schema.Int,
  tokens: Schema.Array(Schema.Int)
})
export type TokenizeResponse = typeof TokenizeResponse.Type

export const DetokenizeResponse = Schema.Struct({ prompt: Schema.String })
export type DetokenizeResponse = typeof DetokenizeResponse.Type
