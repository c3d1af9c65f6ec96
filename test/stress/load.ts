/**
 * A bounded load generator for the OpenAI endpoints, with a check of every answer.
 *
 * `clients` loops each keep one request in flight until `requests` have been sent or `durationMs` has
 * passed (whichever comes first). The requests are a fixed, seeded mix of completions and chat, streaming
 * and not, n = 1 or 2, greedy and seeded sampling; every one is classified:
 *  - ok: 200 and the body is well formed — a JSON response that decodes with the protocol schema and has
 *    every choice, or an SSE stream whose every event decodes, with no error event, one finish_reason per
 *    choice, and `data: [DONE]` last; when `expected` is given, each choice's text (the concatenated deltas
 *    of a stream) must also equal the text that request got when it ran alone;
 *  - queueFull: 503 with code queue_full and a Retry-After header;
 *  - malformed: anything else that came back (other statuses included);
 *  - lost: no answer at all (connection reset, or nothing within `requestTimeoutMs`).
 */
import { Either, Schema } from "effect"
import { ChatCompletionChunk, ChatCompletionResponse, CompletionChunk, CompletionResponse } from "../../src/openai/protocol.js"

export interface RequestSpec {
  /** Which distinct request this is (the same key, the same answer). */
  readonly key: string
  readonly path: "/v1/completions" | "/v1/chat/completions"
  readonly stream: boolean
  readonly n: number
  readonly body: Record<string, unknown>
}

const prompts = [
  "ROMEO:\n",
  "First Citizen:\nWe are",
  "KING RICHARD III:\nNow is the winter of",
  "JULIET:\nO Romeo, Romeo!",
  "MENENIUS:\nWhat work's, my countrymen, in hand?",
  "HAMLET:\nTo be, or not"
]

/** A small deterministic PRNG (mulberry32), so the mix is the same on every run. */
export const prng = (seed: number) => {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/**
 * `distinct` different requests (prompt, kind, length, sampling), each of which the mix sends both
 * streaming and not. Short answers with few steps keep every request well under a second alone.
 */
export const requestSpecs = (distinct: number, seed = 1): Array<Omit<RequestSpec, "stream">> => {
  const random = prng(seed)
  const pick = <A>(items: ReadonlyArray<A>): A => items[Math.floor(random() * items.length)]!
  return Array.from({ length: distinct }, (_, i) => {
    const chat = i % 2 === 1
    const maxTokens = pick([8, 16, 24, 32])
    const n = random() < 0.25 ? 2 : 1
    const sampled = random() < 0.5
    const prompt = prompts[i % prompts.length]!
    const body: Record<string, unknown> = {
      model: "shakespeare",
      max_tokens: maxTokens,
      diffusion_steps: pick([maxTokens / 2, maxTokens]),
      block_length: 8,
      n,
      temperature: sampled ? 0.8 : 0,
      seed: 1000 + i,
      ...(chat ? { messages: [{ role: "user", content: prompt }] } : { prompt })
    }
    return { key: `spec${i}`, path: chat ? "/v1/chat/completions" : "/v1/completions", n, body }
  })
}

/** The request the mix sends i-th: spec i mod distinct, streaming every other time round. */
export const specAt = (specs: ReadonlyArray<Omit<RequestSpec, "stream">>, i: number): RequestSpec => {
  const spec = specs[i % specs.length]!
  const stream = (Math.floor(i / specs.length) + (i % specs.length)) % 2 === 1
  return {
    ...spec,
    stream,
    body: stream ? { ...spec.body, stream: true, stream_options: { include_usage: i % 3 === 0 } } : spec.body
  }
}

export type Outcome =
  | { readonly kind: "ok"; readonly texts: ReadonlyArray<string>; readonly ms: number; readonly firstEventMs?: number }
  | { readonly kind: "queueFull"; readonly ms: number }
  | { readonly kind: "malformed"; readonly why: string; readonly ms: number }
  | { readonly kind: "lost"; readonly why: string; readonly ms: number }

const decodes = <A, I>(schema: Schema.Schema<A, I>, value: unknown): string | undefined => {
  const result = Schema.decodeUnknownEither(schema)(value)
  return Either.isLeft(result) ? result.left.message.slice(0, 300) : undefined
}

/** Checks a non-streaming answer; returns the choices' texts or why it is malformed. */
export const checkJson = (spec: RequestSpec, text: string): { texts: Array<string> } | { why: string } => {
  let json: any
  try {
    json = JSON.parse(text)
  } catch {
    return { why: `body is not JSON: ${text.slice(0, 200)}` }
  }
  const chat = spec.path === "/v1/chat/completions"
  const problem = chat ? decodes(ChatCompletionResponse, json) : decodes(CompletionResponse, json)
  if (problem !== undefined) return { why: problem }
  if (json.choices.length !== spec.n) return { why: `${json.choices.length} choices, expected ${spec.n}` }
  const texts: Array<string> = []
  for (const choice of json.choices) texts[choice.index] = chat ? choice.message.content : choice.text
  if (texts.length !== spec.n || texts.some((t) => typeof t !== "string")) return { why: "choice indexes are not 0..n-1" }
  return { texts }
}

/** Checks a whole SSE body; returns the choices' concatenated texts or why it is malformed. */
export const checkStream = (spec: RequestSpec, body: string): { texts: Array<string> } | { why: string } => {
  if (!body.endsWith("\n\n")) return { why: `stream does not end with a blank line: ${JSON.stringify(body.slice(-80))}` }
  const events = body.slice(0, -2).split("\n\n")
  if (events.at(-1) !== "data: [DONE]") return { why: `last event is not [DONE]: ${JSON.stringify(events.at(-1))}` }
  const chat = spec.path === "/v1/chat/completions"
  const texts = Array.from({ length: spec.n }, () => "")
  const finished = Array.from({ length: spec.n }, () => 0)
  const roles = Array.from({ length: spec.n }, () => false)
  for (const event of events.slice(0, -1)) {
    if (!event.startsWith("data: ")) return { why: `not an SSE data event: ${JSON.stringify(event.slice(0, 80))}` }
    let chunk: any
    try {
      chunk = JSON.parse(event.slice(6))
    } catch {
      return { why: `event is not JSON: ${JSON.stringify(event.slice(0, 120))}` }
    }
    if (chunk.error !== undefined) return { why: `error event: ${JSON.stringify(chunk.error)}` }
    const problem = chat ? decodes(ChatCompletionChunk, chunk) : decodes(CompletionChunk, chunk)
    if (problem !== undefined) return { why: problem }
    for (const choice of chunk.choices) {
      if (!(choice.index >= 0 && choice.index < spec.n)) return { why: `choice index ${choice.index} out of range` }
      if (chat && choice.delta.role === "assistant") roles[choice.index] = true
      texts[choice.index] += (chat ? choice.delta.content : choice.text) ?? ""
      if (choice.finish_reason !== null) finished[choice.index]!++
    }
  }
  if (finished.some((count) => count !== 1)) return { why: `finish_reason counts per choice: ${finished.join(",")}` }
  if (chat && roles.some((role) => !role)) return { why: "a chat choice never got its role" }
  return { texts }
}

export interface SendOptions {
  readonly headers?: Record<string, string>
  readonly timeoutMs?: number
}

/** Sends one request of the mix and classifies what comes back. */
export const send = async (url: string, spec: RequestSpec, options: SendOptions = {}): Promise<Outcome> => {
  const started = performance.now()
  const ms = () => performance.now() - started
  const signal = AbortSignal.timeout(options.timeoutMs ?? 60_000)
  try {
    const response = await fetch(url + spec.path, {
      method: "POST",
      headers: { "content-type": "application/json", ...options.headers },
      body: JSON.stringify(spec.body),
      signal
    })
    if (response.status === 503) {
      const text = await response.text()
      const ok = text.includes('"code":"queue_full"') && response.headers.get("retry-after") !== null
      return ok ? { kind: "queueFull", ms: ms() } : { kind: "malformed", why: `503: ${text.slice(0, 300)}`, ms: ms() }
    }
    if (response.status !== 200) {
      return { kind: "malformed", why: `status ${response.status}: ${(await response.text()).slice(0, 300)}`, ms: ms() }
    }
    if (!spec.stream) {
      const checked = checkJson(spec, await response.text())
      return "why" in checked ? { kind: "malformed", why: checked.why, ms: ms() } : { kind: "ok", texts: checked.texts, ms: ms() }
    }
    if (!String(response.headers.get("content-type")).startsWith("text/event-stream")) {
      return { kind: "malformed", why: `stream content-type ${response.headers.get("content-type")}`, ms: ms() }
    }
    const reader = response.body!.getReader()
    const decoder = new TextDecoder()
    let body = ""
    let firstEventMs: number | undefined
    for (;;) {
      const { done, value } = await reader.read()
      if (done) break
      firstEventMs ??= ms()
      body += decoder.decode(value, { stream: true })
    }
    body += decoder.decode()
    const checked = checkStream(spec, body)
    if ("why" in checked) return { kind: "malformed", why: checked.why, ms: ms() }
    return { kind: "ok", texts: checked.texts, ms: ms(), ...(firstEventMs === undefined ? {} : { firstEventMs }) }
  } catch (error) {
    return { kind: "lost", why: String((error as Error)?.cause ?? error), ms: ms() }
  }
}

export interface LoadOptions {
  readonly url: string
  readonly clients: number
  /** At most this many requests in all. */
  readonly requests: number
  /** No request starts after this long. */
  readonly durationMs: number
  readonly specs: ReadonlyArray<Omit<RequestSpec, "stream">>
  /** Per spec key, the texts the request got alone; answers under load must be the same. */
  readonly expected?: ReadonlyMap<string, ReadonlyArray<string>>
  readonly headers?: Record<string, string>
  readonly requestTimeoutMs?: number
  /** How long a client waits after a 503 before its next request (as a client honouring Retry-After would, shortened). */
  readonly pauseAfterQueueFullMs?: number
  /** Called every `sampleEveryMs` while the load runs (e.g. to read the scheduler's figures). */
  readonly sample?: () => Promise<void>
  readonly sampleEveryMs?: number
}

export interface LoadFigures {
  readonly sent: number
  readonly ok: number
  readonly streamed: number
  readonly queueFull: number
  readonly malformed: number
  readonly lost: number
  readonly mismatched: number
  readonly p50Ms: number
  readonly p99Ms: number
  readonly maxMs: number
  /** Streams: time to the first bytes of the body. */
  readonly firstEventP50Ms: number
  readonly wallMs: number
  readonly requestsPerSecond: number
  /** The first few problems, for the failure message. */
  readonly problems: ReadonlyArray<string>
}

/** The nearest-rank percentile of sorted values. */
export const percentile = (sorted: ReadonlyArray<number>, p: number): number =>
  sorted.length === 0 ? NaN : sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))]!

const round = (x: number) => Math.round(x * 10) / 10

export const runLoad = async (options: LoadOptions): Promise<LoadFigures> => {
  const started = performance.now()
  const deadline = started + options.durationMs
  const latencies: Array<number> = []
  const firstEvents: Array<number> = []
  const problems: Array<string> = []
  const counts = { sent: 0, ok: 0, streamed: 0, queueFull: 0, malformed: 0, lost: 0, mismatched: 0 }
  let next = 0

  const client = async () => {
    while (next < options.requests && performance.now() < deadline) {
      const spec = specAt(options.specs, next++)
      counts.sent++
      const outcome = await send(options.url, spec, {
        ...(options.headers === undefined ? {} : { headers: options.headers }),
        timeoutMs: options.requestTimeoutMs ?? 60_000
      })
      if (outcome.kind === "ok") {
        const want = options.expected?.get(spec.key)
        if (want !== undefined && JSON.stringify(want) !== JSON.stringify(outcome.texts)) {
          counts.mismatched++
          if (problems.length < 5) {
            problems.push(`${spec.key}${spec.stream ? " (stream)" : ""}: ${JSON.stringify(outcome.texts)} != ${JSON.stringify(want)}`)
          }
          continue
        }
        counts.ok++
        if (spec.stream) counts.streamed++
        latencies.push(outcome.ms)
        if (outcome.firstEventMs !== undefined) firstEvents.push(outcome.firstEventMs)
      } else {
        counts[outcome.kind]++
        if (outcome.kind === "queueFull" && options.pauseAfterQueueFullMs !== undefined) {
          await new Promise((resolve) => setTimeout(resolve, options.pauseAfterQueueFullMs))
        }
        if (outcome.kind !== "queueFull" && problems.length < 5) problems.push(`${spec.key}: ${outcome.kind}: ${outcome.why}`)
      }
    }
  }

  let sampling = options.sample !== undefined
  const sampler = (async () => {
    while (sampling) {
      await options.sample!()
      await new Promise((resolve) => setTimeout(resolve, options.sampleEveryMs ?? 100))
    }
  })()
  await Promise.all(Array.from({ length: options.clients }, client))
  sampling = false
  await sampler
  const wallMs = performance.now() - started
  latencies.sort((a, b) => a - b)
  firstEvents.sort((a, b) => a - b)
  return {
    ...counts,
    p50Ms: round(percentile(latencies, 0.5)),
    p99Ms: round(percentile(latencies, 0.99)),
    maxMs: round(latencies.at(-1) ?? NaN),
    firstEventP50Ms: round(percentile(firstEvents, 0.5)),
    wallMs: Math.round(wallMs),
    requestsPerSecond: round((counts.ok * 1000) / wallMs),
    problems
  }
}

/** The texts each spec gets when it runs alone (non-streaming, one at a time). */
export const answersAlone = async (
  url: string,
  specs: ReadonlyArray<Omit<RequestSpec, "stream">>,
  headers?: Record<string, string>
): Promise<Map<string, ReadonlyArray<string>>> => {
  const expected = new Map<string, ReadonlyArray<string>>()
  for (const spec of specs) {
    const outcome = await send(url, { ...spec, stream: false }, headers === undefined ? {} : { headers })
    if (outcome.kind !== "ok") throw new Error(`${spec.key} alone: ${JSON.stringify(outcome)}`)
    expected.set(spec.key, outcome.texts)
  }
  return expected
}
