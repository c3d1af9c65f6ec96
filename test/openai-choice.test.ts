/**
 * guided_choice and structured_outputs.choice (src/openai/choice.ts) over the fake engine: the canvases the
 * scoring job is given (the chain rule over every choice, end token included), the choice picked from the
 * fake model's scores, the JSON and streamed forms, and what is refused. The scores themselves are checked
 * against the native engine on the embedded model in openai-engine.test.ts.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Option } from "effect"
import { pickChoice } from "../src/openai/chains.js"
import { Effect } from "effect"
import type { SamplingSettings } from "../src/engine/Engine.js"
import { parseSse, startServer, type TestServer } from "./openai-support.js"

let server: TestServer
beforeAll(async () => {
  server = await startServer()
})
afterAll(() => server.close())

const encode = (text: string) => server.tokenizer.encode(text, { addSpecialTokens: false })

/** The fake model's log-probability of `target` at canvas position `position`: -|target - expected| / 10. */
const fakeScore = (canvas: ReadonlyArray<number>, position: number, target: number) =>
  -Math.abs(target - ((canvas[0]! + position) % 1000)) / 10

const json = async (response: Response) => {
  const body = (await response.json()) as any
  return { status: response.status, body }
}

describe("guided_choice", () => {
  it("scores each choice by the chain rule, its end token included, and answers with the likeliest", async () => {
    const prompt = "Hello"
    const choices = ["Good night", " world", "Say hello the"]
    const before = server.engine.scored.length
    const { status, body } = await json(
      await server.post("/v1/completions", { prompt, guided_choice: choices, temperature: 0, logprobs: 0 })
    )
    expect(status).toBe(200)
    const promptTokens = server.tokenizer.encode(prompt)
    const special = server.tokenizer.specialTokens
    const tokens = choices.map(encode)
    const width = Math.max(...tokens.map((t) => t.length)) + 1
    // One scoring job: per choice, one canvas per token and one for the end token, in order.
    const items = server.engine.scored.slice(before).flat()
    const expected = tokens.flatMap((t) =>
      Array.from({ length: t.length + 1 }, (_, k) => ({
        canvas: [...promptTokens, ...t.slice(0, k), ...new Array<number>(width - k).fill(special.mask)],
        positions: [promptTokens.length + k],
        targets: [k < t.length ? t[k]! : special.eos]
      }))
    )
    expect(items).toEqual(expected)
    const totals = tokens.map((t) =>
      [...t, special.eos].reduce((sum, token, k) => sum + fakeScore([...promptTokens], promptTokens.length + k, token), 0)
    )
    const best = totals.indexOf(Math.max(...totals))
    const choice = body.choices[0]
    expect(choice.text).toBe(choices[best])
    expect(choice.finish_reason).toBe("stop")
    // Probabilities are held in float32, as the engine reports them.
    const expectedLogprobs = tokens[best]!.map((token, k) => fakeScore(promptTokens, promptTokens.length + k, token))
    expect(choice.logprobs.token_logprobs).toHaveLength(expectedLogprobs.length)
    choice.logprobs.token_logprobs.forEach((logprob: number, k: number) => expect(logprob).toBeCloseTo(expectedLogprobs[k]!, 6))
    expect(body.usage).toMatchObject({ prompt_tokens: promptTokens.length, completion_tokens: tokens[best]!.length })
  })

  it("chat: structured_outputs.choice, scored as the assistant's turn ending with the end-of-turn token", async () => {
    const before = server.engine.scored.length
    const response = await server.post("/v1/chat/completions", {
      messages: [{ role: "user", content: "Hello" }],
      structured_outputs: { choice: ["Good", "night"] },
      temperature: 0
    })
    const { status, body } = await json(response)
    expect(status).toBe(200)
    expect(["Good", "night"]).toContain(body.choices[0].message.content)
    const items = server.engine.scored.slice(before).flat()
    const eot = Option.getOrThrow(server.tokenizer.specialTokens.eot)
    // The last canvas of each choice predicts the end of the turn.
    expect(items.filter((item) => item.targets[0] === eot)).toHaveLength(2)
  })

  it("streams one chunk per answer, then the usage and [DONE]", async () => {
    const response = await server.post("/v1/chat/completions", {
      messages: [{ role: "user", content: "Hello" }],
      guided_choice: ["Good", "night", "world"],
      n: 2,
      seed: 5,
      temperature: 1,
      stream: true,
      stream_options: { include_usage: true }
    })
    expect(response.status).toBe(200)
    const events = parseSse(await response.text()) as Array<any>
    expect(events.at(-1)).toBe("[DONE]")
    const chunks = events.slice(0, -2)
    // The role chunk of each answer, then its content with finish_reason "stop".
    for (const index of [0, 1]) {
      const mine = chunks.filter((c) => c.choices[0].index === index)
      expect(mine.map((c) => c.choices[0].finish_reason)).toEqual([null, "stop"])
      expect(["Good", "night", "world"]).toContain(mine[1].choices[0].delta.content)
    }
    expect(events.at(-2).usage.completion_tokens).toBeGreaterThan(0)
  })

  it("refuses what a choice cannot honour, naming the field", async () => {
    const refused = async (body: Record<string, unknown>, path = "/v1/completions") => {
      const { status, body: error } = await json(await server.post(path, { prompt: "Hello", ...body }))
      expect(status, JSON.stringify(error)).toBe(400)
      return error.error as { param: string; message: string }
    }
    const choices = ["Good", "night"]
    expect((await refused({ guided_choice: choices, diffusion_steps: 4 })).param).toBe("diffusion_steps")
    expect((await refused({ guided_choice: choices, stop: ["x"] })).param).toBe("stop")
    expect((await refused({ guided_choice: choices, suffix: "end" })).param).toBe("suffix")
    expect((await refused({ guided_choice: choices, logit_bias: { "5": 1 } })).param).toBe("logit_bias")
    expect((await refused({ guided_choice: choices, logprobs: 2 })).param).toBe("logprobs")
    expect((await refused({ guided_choice: choices, max_tokens: 1 }, "/v1/completions")).message).toMatch(/more than max_tokens/)
    expect((await refused({ guided_choice: [] })).param).toBe("guided_choice")
    expect((await refused({ guided_choice: "Good" })).param).toBe("guided_choice")
    expect((await refused({ guided_choice: ["Good", ""] })).param).toBe("guided_choice[1]")
    expect((await refused({ guided_choice: ["Good", "<|mdm_mask|>"] })).param).toBe("guided_choice[1]")
    expect((await refused({ guided_choice: ["Good", "x<|endoftext|>"] })).message).toMatch(/ends an answer/)
    expect((await refused({ guided_choice: choices, structured_outputs: { choice: choices } })).param).toBe("guided_choice")
    expect((await refused({ structured_outputs: { regex: "a+" } })).param).toBe("structured_outputs")
    // structured_outputs.json is a schema to lay out: {} is not one a template can honour.
    expect((await refused({ structured_outputs: { json: {} } })).param).toBe("structured_outputs.json")
    expect((await refused({ guided_choice: new Array(257).fill("Good") })).message).toMatch(/at most 256/)
    const chat = { messages: [{ role: "user", content: "Hi" }], guided_choice: choices }
    expect((await refused({ ...chat, logprobs: true, top_logprobs: 2 }, "/v1/chat/completions")).param).toBe("top_logprobs")
    expect(
      (
        await refused(
          {
            ...chat,
            response_format: { type: "json_schema", json_schema: { schema: { type: "object", properties: { a: { type: "string" } } } } }
          },
          "/v1/chat/completions"
        )
      ).param
    ).toBe("response_format")
    const long = await refused({ prompt: "Hello ".repeat(70), guided_choice: ["Good night world the"] })
    expect(long).toMatchObject({ param: "prompt" })
    expect(long.message).toMatch(/maximum context length/)
  })
})

describe("pickChoice", () => {
  const settings = (extra: Partial<SamplingSettings>): SamplingSettings =>
    ({
      genLength: 1,
      blockLength: 1,
      steps: 1,
      temperature: 1,
      remasking: "low_confidence",
      cfgScale: 0,
      seed: 0,
      ...extra
    }) as SamplingSettings
  const pick = (logprobs: ReadonlyArray<number>, extra: Partial<SamplingSettings>, seed: number) =>
    Effect.runSync(pickChoice(logprobs, settings(extra), seed))

  it("takes the likeliest at temperature 0, the first of equals", () => {
    expect(pick([-3, -1, -2], { temperature: 0 }, 0)).toBe(1)
    expect(pick([-1, -1], { temperature: 0 }, 0)).toBe(0)
  })

  it("draws by softmax(logprob / temperature): frequencies follow the probabilities, the same per seed", () => {
    const logprobs = [Math.log(0.6), Math.log(0.3), Math.log(0.1)]
    const counts = [0, 0, 0]
    for (let seed = 0; seed < 3000; seed++) counts[pick(logprobs, {}, seed)]!++
    expect(counts[0]! / 3000).toBeCloseTo(0.6, 1)
    expect(counts[1]! / 3000).toBeCloseTo(0.3, 1)
    expect(counts[2]! / 3000).toBeCloseTo(0.1, 1)
    expect(pick(logprobs, {}, 42)).toBe(pick(logprobs, {}, 42))
  })

  it("keeps only what top_k, min_p and top_p keep", () => {
    const logprobs = [Math.log(0.5), Math.log(0.3), Math.log(0.15), Math.log(0.05)]
    const drawn = (extra: Partial<SamplingSettings>) => {
      const seen = new Set<number>()
      for (let seed = 0; seed < 400; seed++) seen.add(pick(logprobs, extra, seed))
      return [...seen].sort()
    }
    expect(drawn({})).toEqual([0, 1, 2, 3])
    expect(drawn({ topK: 2 })).toEqual([0, 1])
    expect(drawn({ minP: 0.5 })).toEqual([0, 1])
    expect(drawn({ topP: 0.75 })).toEqual([0, 1])
    expect(drawn({ topP: 0.85 })).toEqual([0, 1, 2])
  })
})
