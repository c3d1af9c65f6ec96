/**
 * Hostile requests for the generation endpoints, as fast-check arbitraries, and the check every answer
 * to one must pass.
 *
 * A request is a path, headers and raw body bytes, so that bodies which are not JSON, not UTF-8 or
 * nested deeper than any parser likes can be sent as they are. Field values mix what a buggy or
 * malicious client sends — wrong types, huge, negative, fractional and NaN-like numbers, deep nesting,
 * giant strings, lone surrogates, token ids outside the vocabulary, prompts over the context, thousands
 * of messages, prototype keys — with valid values, so that one bad field among good ones is tried too.
 * Valid values are small (answers of at most 8 tokens), so that a body that happens to be valid is quick.
 *
 * The embedded model's figures are assumed: vocabulary 2048, context 256.
 */
import fc from "fast-check"

export const VOCAB = 2048
export const CONTEXT = 256

export interface HostileRequest {
  readonly path: "/v1/completions" | "/v1/chat/completions"
  readonly headers: Record<string, string>
  readonly body: Uint8Array
  /** What the case is, for the failure message (bodies can be megabytes). */
  readonly label: string
}

// ---- values ----------------------------------------------------------------------------------------

/** A token so JSON text can be spliced in where JSON.stringify could not make it (deep nesting). */
class RawJson {
  constructor(readonly text: string) {}
}

/** JSON text of a value that may hold RawJson parts. */
const toJson = (value: unknown): string => {
  if (value instanceof RawJson) return value.text
  if (Array.isArray(value)) return `[${value.map(toJson).join(",")}]`
  if (typeof value === "object" && value !== null) {
    return `{${Object.entries(value)
      .map(([k, v]) => `${JSON.stringify(k)}:${toJson(v)}`)
      .join(",")}}`
  }
  // NaN and ±Infinity become null, as JSON.stringify does.
  return JSON.stringify(value) ?? "null"
}

const nested = (depth: number, open: string, close: string, leaf: string) => new RawJson(open.repeat(depth) + leaf + close.repeat(depth))

/** Arrays or objects nested up to 100 000 deep. */
const deepNesting = fc.oneof(
  fc.integer({ min: 1, max: 100_000 }).map((d) => nested(d, "[", "]", "1")),
  fc.integer({ min: 1, max: 100_000 }).map((d) => nested(d, '{"a":', "}", "1"))
)

const hugeNumbers = fc.constantFrom(1e308, -1e308, 2 ** 53 + 2, -(2 ** 63), 2 ** 31, 2 ** 32, 1e-320, -0, Number.MAX_SAFE_INTEGER)
const nanLike = fc.constantFrom("NaN", "Infinity", "-Infinity", "1e999", "0x10", "1_000", "", " ", "null", "true", "8")
const rawNumbers = fc.constantFrom("1e999", "-1e999", "1E400", "0.0000000000000000000000000000001", "123456789012345678901234567890")

/** Anything but what the field wants. */
const junk: fc.Arbitrary<unknown> = fc.oneof(
  fc.boolean(),
  fc.constant(null),
  fc.integer({ min: -1_000_000_000, max: -1 }),
  fc.double({ noNaN: false }),
  hugeNumbers,
  nanLike,
  rawNumbers.map((text) => new RawJson(text)),
  fc.string({ maxLength: 20 }),
  fc.string({ unit: "binary", maxLength: 20 }),
  fc.array(fc.oneof(fc.integer(), fc.string({ maxLength: 5 }), fc.constant(null)), { maxLength: 5 }),
  fc.dictionary(fc.string({ maxLength: 8 }), fc.oneof(fc.integer(), fc.string({ maxLength: 5 })), { maxKeys: 4 }),
  deepNesting
)

/** Sometimes a valid value, sometimes junk. */
const field = <A>(valid: fc.Arbitrary<A>) => fc.oneof({ arbitrary: valid, weight: 2 }, { arbitrary: junk, weight: 3 })

const giantString = fc
  .constantFrom(20_000, 300_000, 1_100_000)
  .chain((length) =>
    fc.constantFrom("x", "é", "😀", "\u0000", "<|endoftext|>", "<|mdm_mask|>").map((unit) => unit.repeat(Math.ceil(length / unit.length)))
  )

const shortText = fc.oneof(
  fc.constantFrom("ROMEO:\n", "To be, or not", "", " ", "<|mdm_mask|><|mdm_mask|>", "<|endoftext|>", "<|eot_id|>"),
  fc.string({ maxLength: 30 }),
  fc.string({ unit: "binary", maxLength: 30 })
)

const tokenId = fc.oneof(
  { arbitrary: fc.integer({ min: 0, max: VOCAB - 1 }), weight: 4 },
  { arbitrary: fc.integer({ min: VOCAB, max: 200_000 }), weight: 1 },
  { arbitrary: fc.integer({ min: -5, max: -1 }), weight: 1 },
  { arbitrary: fc.constantFrom(2 ** 31, 2 ** 53, 1.5, 1e308), weight: 1 }
)

const prompt = fc.oneof(
  { arbitrary: shortText, weight: 3 },
  // Giant strings cost a tokenization each: rarer.
  { arbitrary: giantString, weight: 1 },
  { arbitrary: fc.array(tokenId, { minLength: 0, maxLength: 30 }), weight: 3 },
  // Over the context.
  {
    arbitrary: fc
      .integer({ min: CONTEXT - 10, max: CONTEXT + 200 })
      .map((n) => Array.from({ length: n }, (_, i) => (i * 37) % (VOCAB - 8))),
    weight: 1
  },
  { arbitrary: fc.array(shortText, { minLength: 0, maxLength: 6 }), weight: 2 },
  { arbitrary: fc.array(fc.array(tokenId, { maxLength: 10 }), { maxLength: 4 }), weight: 2 },
  { arbitrary: junk, weight: 3 }
)

const role = fc.oneof(fc.constantFrom("user", "system", "assistant", "tool", "developer", "function", "", "USER"), junk)

const contentPart = fc.oneof(
  fc.record({ type: fc.constant("text"), text: field(shortText) }),
  fc.record({ type: fc.oneof(fc.constantFrom("image_url", "input_audio", "file", "refusal"), junk), text: junk }, { requiredKeys: [] }),
  junk
)

const message = fc.record(
  {
    role,
    content: fc.oneof(
      { arbitrary: shortText, weight: 4 },
      { arbitrary: giantString, weight: 1 },
      { arbitrary: fc.array(contentPart, { maxLength: 4 }), weight: 3 },
      { arbitrary: junk, weight: 3 }
    ),
    name: field(fc.string({ maxLength: 10 })),
    tool_calls: junk
  },
  { requiredKeys: [] }
)

const messages = fc.oneof(
  { arbitrary: fc.array(message, { maxLength: 6 }), weight: 6 },
  // Thousands of messages, each fine on its own.
  {
    arbitrary: fc
      .integer({ min: 1000, max: 5000 })
      .map((n) => Array.from({ length: n }, (_, i) => ({ role: i % 2 === 0 ? "user" : "assistant", content: "hi" }))),
    weight: 1
  },
  { arbitrary: junk, weight: 2 }
)

const smallInt = (min: number, max: number) => fc.integer({ min, max })

/** Fields both endpoints share, valid values kept small. */
const samplingFields = {
  model: field(fc.constantFrom("shakespeare", "gpt-4", "")),
  max_tokens: field(smallInt(1, 8)),
  temperature: field(fc.double({ min: 0, max: 2, noNaN: true })),
  top_p: field(fc.constantFrom(1, 0.5)),
  top_k: field(fc.constantFrom(-1, 0, 5)),
  n: field(smallInt(1, 4)),
  stop: field(fc.oneof(fc.string({ minLength: 1, maxLength: 3 }), fc.array(fc.string({ maxLength: 3 }), { maxLength: 5 }))),
  stop_token_ids: field(fc.array(tokenId, { maxLength: 5 })),
  seed: field(fc.integer({ min: 0, max: 2 ** 31 })),
  presence_penalty: field(fc.constantFrom(0, 1)),
  frequency_penalty: field(fc.constantFrom(0, -1)),
  logit_bias: field(fc.dictionary(fc.string({ maxLength: 4 }), fc.integer({ min: -100, max: 100 }), { maxKeys: 3 })),
  stream: field(fc.boolean()),
  stream_options: field(fc.record({ include_usage: field(fc.boolean()), include_snapshots: field(fc.boolean()) }, { requiredKeys: [] })),
  return_token_ids: field(fc.boolean()),
  diffusion_steps: field(smallInt(1, 8)),
  block_length: field(smallInt(1, 8)),
  remasking: field(fc.constantFrom("low_confidence", "random")),
  cfg_scale: field(fc.constantFrom(0, 1.5))
}

const completionBody = fc.record(
  {
    ...samplingFields,
    prompt,
    suffix: field(shortText),
    echo: field(fc.boolean()),
    logprobs: field(smallInt(0, 5)),
    best_of: field(smallInt(1, 2))
  },
  { requiredKeys: [] }
)

const chatBody = fc.record(
  {
    ...samplingFields,
    messages,
    max_completion_tokens: field(smallInt(1, 8)),
    logprobs: field(fc.boolean()),
    top_logprobs: field(smallInt(0, 20)),
    tools: field(fc.array(junk, { maxLength: 2 })),
    response_format: field(fc.record({ type: fc.constantFrom("text", "json_object") }))
  },
  { requiredKeys: [] }
)

// ---- bodies and headers ----------------------------------------------------------------------------

const utf8 = (text: string) => new TextEncoder().encode(text)

/** Bytes that are not UTF-8: overlong forms, lone continuation bytes, surrogates encoded, 0xFF. */
const invalidUtf8 = fc
  .array(
    fc.oneof(
      fc.constantFrom([0xff], [0xfe], [0xc0, 0xaf], [0xe0, 0x80, 0xaf], [0xed, 0xa0, 0x80], [0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xc3]),
      fc
        .integer({ min: 0x20, max: 0x7e })
        .filter((b) => b !== 0x22 && b !== 0x5c)
        .map((b) => [b])
    ),
    { minLength: 1, maxLength: 40 }
  )
  .map((parts) => Uint8Array.from(parts.flat()))

/** A body: a fuzzed object of the endpoint, or something that is not such an object at all. */
const body = (fields: fc.Arbitrary<Record<string, unknown>>, textField: string) =>
  fc.oneof(
    { arbitrary: fields.map((value) => ({ bytes: utf8(toJson(value)), label: "object" })), weight: 12 },
    // A string field with bytes that are not UTF-8 inside the JSON.
    {
      arbitrary: invalidUtf8.map((bytes) => ({
        bytes: Uint8Array.from([...utf8(`{"${textField}":"`), ...bytes, ...utf8(`","max_tokens":2}`)]),
        label: "invalid-utf8-string"
      })),
      weight: 2
    },
    { arbitrary: invalidUtf8.map((bytes) => ({ bytes, label: "invalid-utf8-body" })), weight: 1 },
    { arbitrary: junk.map((value) => ({ bytes: utf8(toJson(value)), label: "not-an-object" })), weight: 1 },
    {
      arbitrary: fc
        .constantFrom(
          "",
          "{",
          '{"prompt":',
          "{'prompt': 'x'}",
          '{"prompt": NaN}',
          '{"prompt": "x",}',
          "\u0000",
          "[]",
          "null",
          '{"prompt":"a","prompt":5}',
          // Prototype keys: JSON.parse makes them own properties; nothing may treat them as more.
          '{"__proto__":{"stream":true,"n":9},"prompt":"x","messages":[{"role":"user","content":"x"}],"max_tokens":2}',
          '{"constructor":{"prototype":{"polluted":1}},"prompt":"x","max_tokens":2}',
          '{"prompt":"x","max_tokens":2,"stream_options":{"__proto__":{"include_usage":true}}}'
        )
        .map((text) => ({ bytes: utf8(text), label: "odd-json" })),
      weight: 1
    }
  )

/**
 * Header values that are valid HTTP (visible ASCII, spaces, tabs), hostile in content. Bytes that are not
 * valid in a header at all are the raw-socket test's (Node's parser refuses them before the server sees
 * the request).
 */
const headerValue = fc.oneof(
  fc.string({ unit: "binary-ascii", maxLength: 40 }).map((s) => s.replace(/[^\x20-\x7e\t]/g, "").trim()),
  fc.constantFrom("", " ", "a".repeat(4000), "../../etc/passwd", "<script>alert(1)</script>", "%00", "Bearer", "Bearer  x y")
)

const headers = fc.record(
  {
    "content-type": fc.constantFrom(
      "application/json",
      "application/json; charset=utf-8",
      "application/json; charset=latin1",
      "text/plain",
      "application/x-www-form-urlencoded",
      "multipart/form-data; boundary=x",
      "",
      "application/json, text/plain"
    ),
    "x-request-id": headerValue,
    authorization: headerValue,
    accept: fc.constantFrom("text/event-stream", "application/json", "*/*", "image/png", ""),
    origin: fc.constantFrom("https://evil.example", "null", "http://127.0.0.1", ""),
    "content-encoding": fc.constantFrom("gzip", "br", "identity"),
    "x-forwarded-for": headerValue,
    "user-agent": headerValue,
    "accept-encoding": fc.constantFrom("gzip", "identity", "*;q=0")
  },
  { requiredKeys: [] }
)

/** How fast-check shows a request in a failure report: bodies can be megabytes, so only their start. */
const shown = (request: HostileRequest) =>
  Object.assign(request, {
    [fc.toStringMethod]: () => {
      const text = new TextDecoder().decode(request.body.subarray(0, 400))
      return (
        `${request.label}: POST ${request.path} headers ${JSON.stringify(request.headers)} body (${request.body.length} bytes) ` +
        JSON.stringify(text) +
        (request.body.length > 400 ? "..." : "")
      )
    }
  })

export const hostileRequest: fc.Arbitrary<HostileRequest> = fc.oneof(
  fc
    .record({ body: body(completionBody, "prompt"), headers })
    .map(({ body, headers }) => shown({ path: "/v1/completions", headers, body: body.bytes, label: `completions ${body.label}` })),
  fc
    .record({ body: body(chatBody, "messages"), headers })
    .map(({ body, headers }) => shown({ path: "/v1/chat/completions", headers, body: body.bytes, label: `chat ${body.label}` }))
)

// ---- valid requests --------------------------------------------------------------------------------

/** The embedded model's mask token, which a prompt may not hold. */
export const MASK = 2044

const validPrompt = fc.oneof(
  fc.string({ maxLength: 40 }),
  fc.constantFrom("ROMEO:\n", "First Citizen:\nWe are"),
  fc.array(
    fc.integer({ min: 0, max: VOCAB - 1 }).filter((id) => id !== MASK),
    { minLength: 1, maxLength: 30 }
  ),
  fc.array(fc.string({ maxLength: 20 }), { minLength: 1, maxLength: 3 })
)

const validCommon = {
  model: fc.constant("shakespeare"),
  max_tokens: smallInt(1, 8),
  temperature: fc.double({ min: 0, max: 2, noNaN: true }),
  n: smallInt(1, 3),
  seed: fc.integer({ min: 0, max: 2 ** 40 }),
  stop: fc.oneof(fc.string({ minLength: 1, maxLength: 3 }), fc.array(fc.string({ minLength: 1, maxLength: 3 }), { maxLength: 3 })),
  diffusion_steps: smallInt(1, 8),
  block_length: smallInt(1, 8),
  remasking: fc.constantFrom("low_confidence", "random"),
  return_token_ids: fc.boolean()
}

/** Requests that are valid by the API: each must get 200 and a well-formed answer. */
export const validRequest = fc.oneof(
  fc
    .record({ ...validCommon, prompt: validPrompt, echo: fc.boolean(), stream: fc.boolean() }, { requiredKeys: ["prompt"] })
    .map((b) => ({ path: "/v1/completions" as const, body: b as Record<string, unknown> })),
  fc
    .record(
      {
        ...validCommon,
        messages: fc.array(
          fc.record({
            role: fc.constantFrom("user", "system", "assistant"),
            content: fc.oneof(
              fc.string({ maxLength: 30 }),
              fc.array(fc.record({ type: fc.constant("text"), text: fc.string({ maxLength: 10 }) }), { minLength: 1, maxLength: 2 })
            )
          }),
          { minLength: 1, maxLength: 3 }
        ),
        logprobs: fc.boolean(),
        stream: fc.boolean()
      },
      { requiredKeys: ["messages"] }
    )
    .map((b) => ({ path: "/v1/chat/completions" as const, body: b as Record<string, unknown> }))
)

// ---- the check -------------------------------------------------------------------------------------

export interface Answer {
  readonly status: number
  readonly headers: Headers
  readonly text: string
}

/**
 * Why an answer to a request is unacceptable, or undefined when it is fine: a 4xx must carry the OpenAI
 * error body with the response's request id; a 200 must be a well-formed completion or stream; anything
 * else (5xx, 3xx, 1xx) is never fine.
 */
export const problemWith = (answer: Answer): string | undefined => {
  const requestId = answer.headers.get("x-request-id")
  if (requestId === null) return "no X-Request-ID header"
  if (answer.status === 200) {
    const type = answer.headers.get("content-type") ?? ""
    if (type.startsWith("text/event-stream")) {
      const events = answer.text.split("\n\n").filter((e) => e !== "")
      if (events.at(-1) !== "data: [DONE]") return "stream does not end with [DONE]"
      for (const event of events.slice(0, -1)) {
        let chunk: any
        try {
          chunk = JSON.parse(event.slice("data: ".length))
        } catch {
          return `stream event is not JSON: ${event.slice(0, 200)}`
        }
        if (chunk.error !== undefined) return `stream error event: ${JSON.stringify(chunk.error)}`
        if (!Array.isArray(chunk.choices)) return "a chunk without choices"
      }
      return undefined
    }
    try {
      const json = JSON.parse(answer.text)
      return Array.isArray(json.choices) && json.choices.length > 0 ? undefined : "200 without choices"
    } catch {
      return `200 body is not JSON: ${answer.text.slice(0, 200)}`
    }
  }
  if (answer.status < 400 || answer.status >= 500) return `status ${answer.status}: ${answer.text.slice(0, 300)}`
  let json: any
  try {
    json = JSON.parse(answer.text)
  } catch {
    return `${answer.status} body is not JSON: ${answer.text.slice(0, 200)}`
  }
  const error = json?.error
  const shaped =
    typeof error === "object" &&
    error !== null &&
    Object.keys(error).sort().join(",") === "code,message,param,request_id,type" &&
    typeof error.message === "string" &&
    error.message !== "" &&
    typeof error.type === "string" &&
    (error.param === null || typeof error.param === "string") &&
    (error.code === null || typeof error.code === "string") &&
    error.request_id === requestId
  return shaped ? undefined : `${answer.status} body is not the OpenAI error shape: ${answer.text.slice(0, 300)}`
}
