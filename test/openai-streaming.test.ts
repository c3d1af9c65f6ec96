/**
 * Streaming (SSE) over real HTTP: deltas of the final committed prefix that add up to the non-streamed
 * answer, whole characters only, stop strings held back, the role chunk, usage and snapshot chunks,
 * errors before and after the response head, and cancellation when the client goes away or a stop ends
 * the answer.
 */
import { Effect, Schema } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import {
  ChatCompletionChunk,
  ChatCompletionResponse,
  CompletionChunk,
  CompletionResponse,
  MASK_PLACEHOLDER
} from "../src/openai/protocol.js"
import { eventually, parseSse, startServer, type TestServer, textScript } from "./openai-support.js"

const answerText = (seed: number) => `Hello wörld 👋 ${seed}. Good night`

/**
 * Like low-confidence decoding: block by block (8 positions), inside a block two positions per step in
 * an order that is not left to right — so the committed prefix grows only now and then.
 */
const BLOCK = 8
const BLOCK_ORDER = [7, 2, 0, 5, 3, 6, 1, 4]
const outOfOrder = (genLength: number): Array<Array<number>> => {
  const steps: Array<Array<number>> = []
  for (let start = 0; start < genLength; start += BLOCK) {
    const length = Math.min(BLOCK, genLength - start)
    const order = length === BLOCK ? BLOCK_ORDER.map((i) => start + i) : Array.from({ length }, (_, i) => start + length - 1 - i)
    for (let i = 0; i < order.length; i += 2) steps.push(order.slice(i, i + 2))
  }
  return steps
}

const decodeCompletionChunk = Schema.decodeUnknownSync(CompletionChunk, { onExcessProperty: "error" })
const decodeChatChunk = Schema.decodeUnknownSync(ChatCompletionChunk, { onExcessProperty: "error" })
const decodeCompletionResponse = Schema.decodeUnknownSync(CompletionResponse, { onExcessProperty: "error" })
const decodeChatResponse = Schema.decodeUnknownSync(ChatCompletionResponse, { onExcessProperty: "error" })

let server: TestServer
beforeAll(async () => {
  server = await startServer({
    script: (t) => textScript(t, (_, settings) => answerText(settings.seed), { schedule: outOfOrder })
  })
})
afterAll(() => server.close())

/** Posts a streaming request and returns its chunks (checked: SSE framing, [DONE] last, headers). */
const stream = async (target: TestServer, path: string, body: Record<string, unknown>) => {
  const response = await target.post(path, { ...body, stream: true })
  expect(response.status).toBe(200)
  expect(response.headers.get("content-type")).toBe("text/event-stream")
  expect(response.headers.get("cache-control")).toBe("no-cache")
  const events = parseSse(await response.text())
  expect(events[events.length - 1]).toBe("[DONE]")
  expect(events.slice(0, -1)).not.toContain("[DONE]")
  return events.slice(0, -1)
}

const completionChunks = async (body: Record<string, unknown>) =>
  (await stream(server, "/v1/completions", body)).map((event) => decodeCompletionChunk(event))
const chatChunks = async (body: Record<string, unknown>) =>
  (await stream(server, "/v1/chat/completions", body)).map((event) => decodeChatChunk(event))

const nonStreamed = async (path: string, body: Record<string, unknown>) => {
  const response = await server.post(path, body)
  expect(response.status).toBe(200)
  return response.json()
}

/** Per choice index: the concatenated text and the finish reasons seen. */
const collect = (choices: ReadonlyArray<{ index: number; text: string; finish_reason: string | null }>) => {
  const texts = new Map<number, string>()
  const finishes = new Map<number, Array<string>>()
  for (const choice of choices) {
    expect(choice.text).not.toContain("\uFFFD")
    if (finishes.has(choice.index)) throw new Error(`choice ${choice.index} continued after its finish_reason`)
    texts.set(choice.index, (texts.get(choice.index) ?? "") + choice.text)
    if (choice.finish_reason !== null) finishes.set(choice.index, [choice.finish_reason])
  }
  return { texts, finishes }
}

describe("streaming completions", () => {
  const variants: ReadonlyArray<Record<string, unknown>> = [
    { max_tokens: 40 },
    { max_tokens: 12 },
    { max_tokens: 40, stop: "Good" },
    { max_tokens: 40, stop: ["night", "xyz"] },
    { max_tokens: 40, stop: "👋" },
    { max_tokens: 40, stop_token_ids: [259] },
    { max_tokens: 40, echo: true }
  ]
  for (const variant of variants) {
    it(`adds up to the non-streamed answer: ${JSON.stringify(variant)}`, async () => {
      const body = { prompt: ["Say hello", "Good night"], n: 2, seed: 4, ...variant }
      const expected = decodeCompletionResponse(await nonStreamed("/v1/completions", body))
      const chunks = await completionChunks(body)
      for (const chunk of chunks) {
        expect(chunk.id).toBe(chunks[0]!.id)
        expect(chunk.choices).toHaveLength(1)
        expect(chunk.usage).toBeUndefined()
      }
      const { texts, finishes } = collect(chunks.flatMap((chunk) => chunk.choices))
      expect(expected.choices).toHaveLength(4)
      for (const choice of expected.choices) {
        expect(texts.get(choice.index)).toBe(choice.text)
        expect(finishes.get(choice.index)).toEqual([choice.finish_reason])
      }
    })
  }

  it("holds back text that could begin a stop string until it is decided", async () => {
    // Left to right, one token per step, so " Good" and " night" are read in different steps.
    const oneByOne = await startServer({ script: (t) => textScript(t, (_, settings) => answerText(settings.seed)) })
    const chunks = await stream(oneByOne, "/v1/completions", { prompt: "Say hello", max_tokens: 40, seed: 4, stop: "Good day" }).finally(
      () => oneByOne.close()
    )
    const texts = chunks.map((chunk) => decodeCompletionChunk(chunk).choices[0]!.text)
    expect(texts.join("")).toBe(answerText(4))
    // "Good" was held until " night" showed it does not begin "Good day": it goes out with " night".
    expect(texts.some((text) => text.endsWith("Good"))).toBe(false)
    expect(texts.filter((text) => text.includes("Good"))).toEqual([expect.stringContaining("Good night")])
  })

  it("streams token ids and logprobs that add up to the non-streamed ones", async () => {
    const body = { prompt: "Say hello", max_tokens: 40, seed: 4, logprobs: 1, return_token_ids: true }
    const expected = decodeCompletionResponse(await nonStreamed("/v1/completions", body)).choices[0]!
    const choices = (await completionChunks(body)).map((chunk) => chunk.choices[0]!)
    expect(choices[0]!.prompt_token_ids).toEqual(expected.prompt_token_ids)
    expect(choices.slice(1).every((choice) => choice.prompt_token_ids === undefined)).toBe(true)
    expect(choices.flatMap((choice) => choice.token_ids!)).toEqual(expected.token_ids)
    const logprobs = choices.map((choice) => choice.logprobs!)
    expect(logprobs.flatMap((l) => l.tokens)).toEqual(expected.logprobs!.tokens)
    expect(logprobs.flatMap((l) => l.token_logprobs)).toEqual(expected.logprobs!.token_logprobs)
    expect(logprobs.flatMap((l) => l.text_offset)).toEqual(expected.logprobs!.text_offset)
  })

  it("ends with a usage chunk when asked, usage null on the others", async () => {
    const body = { prompt: ["Say hello", "Good night"], n: 2, seed: 4, max_tokens: 40 }
    const expected = decodeCompletionResponse(await nonStreamed("/v1/completions", body))
    const chunks = await completionChunks({ ...body, stream_options: { include_usage: true } })
    const last = chunks[chunks.length - 1]!
    expect(last.choices).toEqual([])
    expect(last.usage).toEqual(expected.usage)
    expect(chunks.slice(0, -1).every((chunk) => chunk.usage === null && chunk.choices.length === 1)).toBe(true)
    // The diffusion statistics ride on the usage chunk only: four answers of at most 20 steps (the script
    // commits two positions a step), one forward each.
    expect(last.diffusion).toMatchObject({ tokens_per_step: 2, skipped_tokens: 0, kv_cache: "none", parallel: null })
    expect(last.diffusion!.forward_passes).toBe(last.diffusion!.steps)
    expect(last.diffusion!.steps).toBeLessThanOrEqual(4 * 20)
    expect(last.diffusion!.steps).toBeGreaterThanOrEqual(expected.usage.completion_tokens / 2)
    expect(chunks.slice(0, -1).every((chunk) => chunk.diffusion === undefined)).toBe(true)
  })

  it("with vLLM's continuous_usage_stats, every chunk carries the usage so far, ending at the final one", async () => {
    const body = { prompt: ["Say hello", "Good night"], n: 2, seed: 4, max_tokens: 40 }
    const expected = decodeCompletionResponse(await nonStreamed("/v1/completions", body))
    const chunks = await completionChunks({ ...body, stream_options: { include_usage: true, continuous_usage_stats: true } })
    const last = chunks[chunks.length - 1]!
    expect(last.usage).toEqual(expected.usage)
    const running = chunks.slice(0, -1).map((chunk) => chunk.usage!)
    expect(running.length).toBeGreaterThan(4)
    let before = 0
    for (const usage of running) {
      expect(usage.prompt_tokens).toBe(expected.usage.prompt_tokens)
      expect(usage.total_tokens).toBe(usage.prompt_tokens + usage.completion_tokens)
      expect(usage.completion_tokens).toBeGreaterThanOrEqual(before)
      before = usage.completion_tokens
    }
    // The chunks before the last carry fewer tokens than the whole; the last content chunk all of them.
    expect(running[0]!.completion_tokens).toBeLessThan(expected.usage.completion_tokens)
    expect(running.at(-1)!.completion_tokens).toBe(expected.usage.completion_tokens)
    // Without include_usage it is nothing: no usage anywhere.
    const plain = await completionChunks({ ...body, stream_options: { continuous_usage_stats: true } })
    expect(plain.every((chunk) => chunk.usage === undefined)).toBe(true)
  })

  it("sends a snapshot of the whole canvas after every denoising step", async () => {
    const genLength = 16
    const body = { prompt: "Say hello", max_tokens: genLength, diffusion_steps: genLength / 2, seed: 4 }
    const expected = decodeCompletionResponse(await nonStreamed("/v1/completions", body)).choices[0]!
    const chunks = await completionChunks({ ...body, stream_options: { include_snapshots: true } })
    const schedule = outOfOrder(genLength)
    expect(chunks).toHaveLength(schedule.length)
    const answer = server.tokenizer.encode(answerText(4), { addSpecialTokens: false }).slice(0, genLength)
    const committed = new Set<number>()
    let streamed = ""
    chunks.forEach((chunk, i) => {
      const choice = chunk.choices[0]!
      const snapshot = choice.snapshot!
      schedule[i]!.forEach((position) => committed.add(position))
      expect(snapshot.step).toBe(i + 1)
      expect(snapshot.total_steps).toBe(schedule.length)
      expect(snapshot.block).toBe(Math.floor(i / (BLOCK / 2)))
      expect(snapshot.committed_now).toEqual([...schedule[i]!].sort((a, b) => a - b))
      expect(snapshot.masked).toBe(genLength - committed.size)
      expect(snapshot.canvas).toEqual(
        answer.map((id, position) => (committed.has(position) ? server.tokenizer.decode([id]) : MASK_PLACEHOLDER))
      )
      // Only the contiguous committed prefix is ever streamed, and it is final.
      streamed += choice.text
      let prefix = 0
      while (committed.has(prefix)) prefix++
      expect(server.tokenizer.decode(answer.slice(0, prefix)).startsWith(streamed)).toBe(true)
      expect(expected.text.startsWith(streamed)).toBe(true)
    })
    expect(streamed).toBe(expected.text)
  })
})

describe("streaming chat completions", () => {
  it("opens each choice with the role, then adds up to the non-streamed answer", async () => {
    const body = { messages: [{ role: "user", content: "hi" }], n: 2, seed: 9, max_tokens: 40, stop: "night" }
    const expected = decodeChatResponse(await nonStreamed("/v1/chat/completions", body))
    const chunks = await chatChunks({ ...body, stream_options: { include_usage: true } })
    expect(chunks.slice(0, 2).map((chunk) => chunk.choices[0])).toEqual(
      [0, 1].map((index) => ({
        index,
        delta: { role: "assistant", content: "" },
        logprobs: null,
        finish_reason: null
      }))
    )
    for (const chunk of chunks) expect(chunk.object).toBe("chat.completion.chunk")
    const usage = chunks[chunks.length - 1]!
    expect(usage.usage).toEqual(expected.usage)
    const { texts, finishes } = collect(
      chunks
        .slice(2, -1)
        .flatMap((chunk) => chunk.choices.map((c) => ({ index: c.index, text: c.delta.content ?? "", finish_reason: c.finish_reason })))
    )
    for (const choice of expected.choices) {
      expect(texts.get(choice.index)).toBe(choice.message.content)
      expect(finishes.get(choice.index)).toEqual([choice.finish_reason])
    }
  })

  it("streams chat logprobs and snapshots in valid chunks", async () => {
    const body = { messages: [{ role: "user", content: "hi" }], seed: 9, max_tokens: 16, diffusion_steps: 8 }
    const chunks = await chatChunks({ ...body, logprobs: true, stream_options: { include_snapshots: true } })
    const steps = chunks.slice(1)
    expect(steps).toHaveLength(8)
    expect(steps.every((chunk) => chunk.choices[0]!.snapshot !== undefined)).toBe(true)
    const expected = decodeChatResponse(await nonStreamed("/v1/chat/completions", { ...body, logprobs: true }))
    expect(steps.flatMap((chunk) => chunk.choices[0]!.logprobs!.content)).toEqual(expected.choices[0]!.logprobs!.content)
  })
})

describe("failures and cancellation while streaming", () => {
  const slowScript = (seconds: { stepMs: number; requestTimeoutMs?: number; queueCapacity?: number; maxConcurrent?: number }) =>
    startServer({
      script: (t) => textScript(t, () => "Hello world night the world", { end: "none" }),
      engine: { stepMs: seconds.stepMs },
      scheduler: {
        ...(seconds.requestTimeoutMs === undefined ? {} : { requestTimeoutMs: seconds.requestTimeoutMs }),
        ...(seconds.queueCapacity === undefined ? {} : { queueCapacity: seconds.queueCapacity }),
        ...(seconds.maxConcurrent === undefined ? {} : { maxConcurrent: seconds.maxConcurrent })
      }
    })

  it("answers with the HTTP status when the request fails before the stream starts", async () => {
    // One batch slot, taken by a long request, and no queue: the next request has nowhere to wait.
    const full = await slowScript({ stepMs: 5, queueCapacity: 0, maxConcurrent: 1 })
    const busy = full.post("/v1/completions", { prompt: "Say hello", max_tokens: 100 })
    try {
      await eventually(async () => (await Effect.runPromise(full.engine.live)) === 1, 2_000)
      const response = await full.post("/v1/completions", { prompt: "Say hello", stream: true })
      expect(response.status).toBe(503)
      const body = (await response.json()) as { error: { code: string; type: string } }
      expect(body.error).toMatchObject({ code: "queue_full", type: "service_unavailable_error" })
      expect((await busy).status).toBe(200)
    } finally {
      await full.close()
    }
  })

  it("sends an error event, then [DONE], when the request fails after the head was sent", async () => {
    const timed = await slowScript({ stepMs: 20, requestTimeoutMs: 200 })
    try {
      const events = await stream(timed, "/v1/completions", { prompt: "Say hello", max_tokens: 100, seed: 1 })
      const error = events[events.length - 1] as { error: Record<string, unknown> }
      expect(error.error).toMatchObject({ type: "timeout_error", code: "timeout", param: null })
      expect(error.error["request_id"]).toMatch(/^req\d+$/)
      expect(events.length).toBeGreaterThan(1)
      events.slice(0, -1).forEach((event) => decodeCompletionChunk(event))
      await eventually(async () => (await Effect.runPromise(timed.engine.live)) === 0, 1_000)
    } finally {
      await timed.close()
    }
  })

  describe("with a slow engine", () => {
    let slow: TestServer
    beforeAll(async () => {
      slow = await slowScript({ stepMs: 10 })
    })
    afterAll(() => slow.close())

    it("cancels the sequence when the client disconnects", async () => {
      const controller = new AbortController()
      const response = await slow.post(
        "/v1/chat/completions",
        { messages: [{ role: "user", content: "hi" }], max_tokens: 100, n: 2, seed: 1, stream: true },
        { signal: controller.signal }
      )
      const reader = response.body!.getReader()
      await reader.read()
      expect(await Effect.runPromise(slow.engine.live)).toBe(2)
      controller.abort()
      await eventually(async () => (await Effect.runPromise(slow.engine.live)) === 0, 1_000)
      const steps = slow.engine.batches.length
      await new Promise((resolve) => setTimeout(resolve, 50))
      expect(slow.engine.batches.length).toBe(steps)
      expect(steps).toBeLessThan(100)
    })

    it("cancels the sequence when a stop string ends the answer", async () => {
      const before = slow.engine.batches.length
      const chunks = await stream(slow, "/v1/completions", { prompt: "Say hello", max_tokens: 100, seed: 1, stop: "night" })
      const text = chunks.map((chunk) => decodeCompletionChunk(chunk).choices[0]!.text).join("")
      expect(text).toBe("Hello world ")
      await eventually(async () => (await Effect.runPromise(slow.engine.live)) === 0, 1_000)
      expect(slow.engine.batches.length - before).toBeLessThan(10)
    })
  })
})
