/**
 * Non-streaming chat completions over real HTTP: the conversation rendered with the model's chat
 * template, the answer ending at end-of-turn, n answers, and chat-shaped logprobs.
 */
import { Schema } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { ChatCompletionResponse } from "../src/openai/protocol.js"
import { startServer, type TestServer, textScript } from "./openai-support.js"

const strict = Schema.decodeUnknownSync(ChatCompletionResponse, { onExcessProperty: "error" })

const answerText = (seed: number) => `Good night, wörld 👋 ${seed}`

let server: TestServer
beforeAll(async () => {
  server = await startServer({
    script: (t) => textScript(t, (_, settings) => answerText(settings.seed), { end: "eot", probability: () => 0.25 })
  })
})
afterAll(() => server.close())

const messages = [
  { role: "system", content: "Be brief." },
  {
    role: "user",
    content: [
      { type: "text", text: "Say" },
      { type: "text", text: "goodnight" }
    ]
  }
]

const chat = async (body: Record<string, unknown>) => {
  const response = await server.post("/v1/chat/completions", { messages, ...body })
  expect(response.status).toBe(200)
  return strict(await response.json())
}

const encode = (text: string) => [...server.tokenizer.encode(text, { addSpecialTokens: false })]

describe("POST /v1/chat/completions", () => {
  it("renders the conversation with the chat template and answers up to end-of-turn", async () => {
    const response = await chat({ max_tokens: 40, seed: 7 })
    expect(response.id).toMatch(/^chatcmpl-req\d+$/)
    expect(response.object).toBe("chat.completion")
    expect(response.choices).toEqual([
      { index: 0, message: { role: "assistant", content: answerText(7) }, logprobs: null, finish_reason: "stop" }
    ])
    const prompt = server.engine.created[server.engine.created.length - 1]!.prompt
    expect(server.tokenizer.decode(prompt)).toBe(
      "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" +
        "<|start_header_id|>user<|end_header_id|>\n\nSay\ngoodnight<|eot_id|>" +
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    // Neither the end-of-turn token nor the EOS padding after it is counted.
    const completionTokens = encode(answerText(7)).length
    expect(response.usage).toEqual({
      prompt_tokens: prompt.length,
      completion_tokens: completionTokens,
      total_tokens: prompt.length + completionTokens,
      prompt_tokens_details: { cached_tokens: 0 }
    })
    // How it was denoised: the fake engine commits one token per step, read up to the end-of-turn token.
    expect(response.diffusion).toMatchObject({ tokens_per_step: 1, kv_cache: "none", parallel: null })
    expect(response.diffusion!.steps).toBeGreaterThanOrEqual(completionTokens + 1)
  })

  it("prefers max_completion_tokens to max_tokens", async () => {
    const response = await chat({ max_tokens: 40, max_completion_tokens: 3, seed: 7 })
    expect(server.engine.created[server.engine.created.length - 1]!.settings.genLength).toBe(3)
    expect(response.choices[0]!.finish_reason).toBe("length")
    expect(response.usage.completion_tokens).toBe(3)
  })

  it("gives n answers with consecutive seeds, and applies stop strings", async () => {
    const response = await chat({ max_tokens: 40, seed: 20, n: 3, stop: [","] })
    expect(response.choices.map((c) => [c.index, c.message.content, c.finish_reason])).toEqual([
      [0, "Good night", "stop"],
      [1, "Good night", "stop"],
      [2, "Good night", "stop"]
    ])
    const full = await chat({ max_tokens: 40, seed: 20, n: 3 })
    expect(full.choices.map((c) => c.message.content)).toEqual([answerText(20), answerText(21), answerText(22)])
  })

  it("returns chat logprobs: each token's text, committed logprob and bytes", async () => {
    const response = await chat({ max_tokens: 40, seed: 7, logprobs: true, top_logprobs: 1 })
    const content = response.choices[0]!.logprobs!.content
    const tokens = encode(answerText(7))
    expect(content.map((entry) => entry.token)).toEqual(tokens.map((id) => server.tokenizer.decode([id])))
    for (const entry of content) {
      expect(entry.logprob).toBeCloseTo(Math.log(0.25), 6)
      // A whole character has its UTF-8 bytes; a token holding part of one (the emoji's) has none known.
      if (entry.token.includes("\uFFFD")) expect(entry.bytes).toBeNull()
      else expect(Buffer.from(entry.bytes!).toString("utf8")).toBe(entry.token)
      // top_logprobs are the engine's alternatives at the committing step (test/openai-clients.test.ts
      // checks them on the real engine); this fake engine reports none.
      expect(entry.top_logprobs).toEqual([])
    }
    // The engine was asked for them.
    expect(server.engine.created[server.engine.created.length - 1]!.settings.topLogprobs).toBe(1)
    expect(content.filter((entry) => entry.bytes === null)).toHaveLength(4)
    const plain = await chat({ max_tokens: 40, seed: 7, logprobs: true })
    expect(plain.choices[0]!.logprobs!.content.every((entry) => entry.top_logprobs.length === 0)).toBe(true)
    expect(server.engine.created[server.engine.created.length - 1]!.settings.topLogprobs).toBeUndefined()
  })
})
