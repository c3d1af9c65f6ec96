/**
 * The official `openai` SDK (v6) against a `vdiff serve` child process on the embedded model, with an
 * API key: models, completions and chat, streaming and not; a stream's text equals the same request's
 * text without streaming; the SDK's typed errors for the server's error bodies; the SDK's request id is
 * the server's. The diffusion settings go as extra body fields, as clients of vLLM's extensions send them.
 */
import OpenAI from "openai"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type ServeProcess, startServe } from "./stress/serve.js"

const apiKey = "sk-sdk-test-key"
let server: ServeProcess
let client: OpenAI

beforeAll(async () => {
  server = await startServe({ flags: ["--api-key", apiKey, "--max-tokens", "16"] })
  client = new OpenAI({ apiKey, baseURL: server.url + "/v1", maxRetries: 0, timeout: 30_000 })
})
afterAll(async () => {
  expect(await server.stop()).toBe(0)
})

/** Settings the SDK does not know, sent as they are. */
const diffusion = { diffusion_steps: 16, block_length: 8 } as Record<string, unknown>

describe("the openai SDK", () => {
  it("lists the model", async () => {
    const models = await client.models.list()
    expect(models.data.map((m) => m.id)).toEqual(["shakespeare"])
    expect(models.data[0]).toMatchObject({ object: "model", owned_by: expect.any(String), max_model_len: 512 })
    const model = await client.models.retrieve("shakespeare")
    expect(model.id).toBe("shakespeare")
  })

  it("completions: a stream's deltas add up to the answer without streaming", async () => {
    const request = { model: "shakespeare", prompt: "ROMEO:\n", max_tokens: 16, temperature: 0, seed: 3, ...diffusion }
    const completion = await client.completions.create(request)
    expect(completion.object).toBe("text_completion")
    expect(completion.id).toBe(`cmpl-${completion._request_id}`)
    expect(completion.choices).toHaveLength(1)
    const choice = completion.choices[0]!
    expect(["stop", "length"]).toContain(choice.finish_reason)
    expect(completion.usage!.completion_tokens).toBeGreaterThan(0)
    expect(completion.usage!.completion_tokens).toBeLessThanOrEqual(16)

    const stream = await client.completions.create({ ...request, stream: true, stream_options: { include_usage: true } })
    let text = ""
    let finish: string | null = null
    let usage: OpenAI.CompletionUsage | null | undefined
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        text += c.text
        if (c.finish_reason !== null) finish = c.finish_reason
      }
      if (chunk.usage) usage = chunk.usage
    }
    expect(text).toBe(choice.text)
    expect(finish).toBe(choice.finish_reason)
    expect(usage).toEqual(completion.usage)
  })

  it("chat: a stream's deltas add up to the message without streaming, the role first", async () => {
    const request = {
      model: "shakespeare",
      messages: [
        { role: "system" as const, content: "Speak as a player." },
        { role: "user" as const, content: "Who goes there?" }
      ],
      max_completion_tokens: 16,
      temperature: 0,
      seed: 5,
      ...diffusion
    }
    const completion = await client.chat.completions.create(request)
    expect(completion.object).toBe("chat.completion")
    expect(completion.id).toBe(`chatcmpl-${completion._request_id}`)
    const message = completion.choices[0]!.message
    expect(message.role).toBe("assistant")
    expect(typeof message.content).toBe("string")

    const stream = await client.chat.completions.create({ ...request, stream: true })
    let content = ""
    const roles: Array<string> = []
    let finish: string | null = null
    for await (const chunk of stream) {
      expect(chunk.object).toBe("chat.completion.chunk")
      for (const c of chunk.choices) {
        if (c.delta.role) roles.push(c.delta.role)
        content += c.delta.content ?? ""
        if (c.finish_reason !== null) finish = c.finish_reason
      }
    }
    expect(roles).toEqual(["assistant"])
    expect(content).toBe(message.content)
    expect(finish).toBe(completion.choices[0]!.finish_reason)
  })

  it("n answers in one request, each with its own index", async () => {
    const completion = await client.completions.create({
      model: "shakespeare",
      prompt: "JULIET:\n",
      max_tokens: 8,
      n: 3,
      temperature: 0.8,
      seed: 1
    })
    expect(completion.choices.map((c) => c.index)).toEqual([0, 1, 2])
  })

  it("the server's error bodies become the SDK's typed errors", async () => {
    const bad = await client.completions.create({ model: "shakespeare", prompt: "x", temperature: 5 }).catch((e) => e)
    expect(bad).toBeInstanceOf(OpenAI.BadRequestError)
    expect(bad.status).toBe(400)
    expect(bad.param).toBe("temperature")
    expect(bad.type).toBe("invalid_request_error")
    expect(bad.requestID).toEqual(expect.any(String))

    const unknown = await client.chat.completions.create({ model: "gpt-4", messages: [{ role: "user", content: "x" }] }).catch((e) => e)
    expect(unknown).toBeInstanceOf(OpenAI.NotFoundError)

    const tooLong = await client.completions.create({ model: "shakespeare", prompt: "x", max_tokens: 5000 }).catch((e) => e)
    expect(tooLong).toBeInstanceOf(OpenAI.BadRequestError)
    expect(tooLong.code).toBe("context_length_exceeded")

    const intruder = new OpenAI({ apiKey: "sk-not-ours", baseURL: server.url + "/v1", maxRetries: 0 })
    const denied = await intruder.models.list().catch((e) => e)
    expect(denied).toBeInstanceOf(OpenAI.AuthenticationError)
    expect(denied.status).toBe(401)
    expect(denied.code).toBe("invalid_api_key")
  })
})
