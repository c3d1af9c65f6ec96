/**
 * The OpenAI routes over the real native engine and the embedded model (models/shakespeare) with its own
 * tokenizer and chat template: what the fake engine cannot show — real step events, EOS where the model
 * puts it, seeds and batching through the addon, the snapshot's step count against the engine's plan.
 */
import { join } from "node:path"
import { Effect, Layer, Option, Schema } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import * as Engine from "../src/engine/Engine.js"
import { ChatCompletionResponse, CompletionChunk, CompletionResponse } from "../src/openai/protocol.js"
import type { ServingDefaults } from "../src/openai/ServingConfig.js"
import * as Tokenizer from "../src/tokenizer/Tokenizer.js"
import { eventually, parseSse, startServerWith, type TestServer } from "./openai-support.js"

const modelDir = join(import.meta.dirname, "..", "models", "shakespeare")

/** The routes over the native engine on the embedded model, with these engine options and serving defaults. */
const startEmbedded = async (engineOptions: Partial<Engine.EngineOptions> = {}, defaults: Partial<ServingDefaults> = {}) => {
  const tokenizer = await Effect.runPromise(Tokenizer.make(modelDir))
  const engine = await Effect.runPromise(Engine.make({ modelDir, threads: 1, ...engineOptions }))
  return startServerWith({
    engine,
    engineLayer: Layer.succeed(Engine.Engine, engine),
    tokenizer,
    config: {
      modelName: "shakespeare",
      maxModelLen: engine.info.config.maxSequenceLength,
      defaults: {
        maxTokens: 24,
        steps: null,
        blockLength: 8,
        remasking: "low_confidence",
        cfgScale: 0,
        temperature: 0,
        ...defaults
      }
    }
  })
}

let server: TestServer<Engine.EngineShape>
beforeAll(async () => {
  server = await startEmbedded()
})
afterAll(() => server.close())

const complete = async (body: Record<string, unknown>) => {
  const response = await server.post("/v1/completions", body)
  expect(response.status).toBe(200)
  return Schema.decodeUnknownSync(CompletionResponse)(await response.json())
}

const isSpecial = (id: number) => {
  const s = server.tokenizer.specialTokens
  return id === s.eos || (s.eot._tag === "Some" && id === s.eot.value)
}

describe("OpenAI routes on the embedded model", () => {
  it("streams exactly the non-streamed answer, one snapshot per step", async () => {
    const body = { prompt: "ROMEO:\nBut soft, what light", max_tokens: 24, diffusion_steps: 12, seed: 1, return_token_ids: true }
    const whole = (await complete(body)).choices[0]!
    expect(whole.token_ids!.some(isSpecial)).toBe(false)
    expect(server.tokenizer.decode(whole.token_ids!, { skipSpecialTokens: true })).toBe(whole.text)

    const response = await server.post("/v1/completions", { ...body, stream: true, stream_options: { include_snapshots: true } })
    const events = parseSse(await response.text())
    expect(events.pop()).toBe("[DONE]")
    const chunks = events.map((event) => Schema.decodeUnknownSync(CompletionChunk)(event).choices[0]!)
    expect(chunks.map((c) => c.text).join("")).toBe(whole.text)
    expect(chunks.flatMap((c) => c.token_ids!)).toEqual(whole.token_ids)
    expect(chunks[chunks.length - 1]!.finish_reason).toBe(whole.finish_reason)
    chunks.forEach((chunk, i) => {
      expect(chunk.snapshot!.step).toBe(i + 1)
      expect(chunk.snapshot!.total_steps).toBe(12)
    })
    // Ended by the length, the last snapshot is the engine's last step; ended by EOS, an earlier one.
    if (whole.finish_reason === "length") expect(chunks.length).toBe(12)
    else expect(chunks.length).toBeLessThanOrEqual(12)
  })

  it("gives answer j of n the answer of seed + j, batched or not", async () => {
    const body = { prompt: "KING HENRY:\n", max_tokens: 16, temperature: 0.9 }
    const batched = await complete({ ...body, n: 2, seed: 40 })
    const alone = await complete({ ...body, seed: 41 })
    expect(batched.choices[1]!.text).toBe(alone.choices[0]!.text)
    const again = await complete({ ...body, seed: 40 })
    expect(again.choices[0]!.text).toBe(batched.choices[0]!.text)
  })

  it("answers n choices whose sequences finish at different steps (one stops early, another runs to the end)", async () => {
    // A CI run once got 400 "sequence N is already finished": the scheduler stepped the early-stopped one.
    let mixed = 0
    for (let seed = 1; seed <= 12; seed++) {
      const response = await server.post("/v1/chat/completions", {
        messages: [{ role: "user", content: "" }],
        n: 4,
        seed,
        max_tokens: 12,
        block_length: 3,
        diffusion_steps: 12,
        temperature: 1
      })
      expect(response.status, `seed ${seed}`).toBe(200)
      const body = Schema.decodeUnknownSync(ChatCompletionResponse)(await response.json())
      expect(body.choices).toHaveLength(4)
      const skipped = (body as unknown as { diffusion: { skipped_tokens: number } }).diffusion.skipped_tokens
      if (skipped > 0 && body.choices.some((c) => c.finish_reason === "length")) mixed++
    }
    // The case was really exercised.
    expect(mixed).toBeGreaterThan(0)
  })

  it("answers a chat with the model's template, counting no end token", async () => {
    const response = await server.post("/v1/chat/completions", {
      messages: [{ role: "user", content: "Who art thou?" }],
      max_tokens: 24,
      seed: 2,
      return_token_ids: true
    })
    expect(response.status).toBe(200)
    const body = Schema.decodeUnknownSync(ChatCompletionResponse)(await response.json())
    const choice = body.choices[0]!
    expect(choice.token_ids!.some(isSpecial)).toBe(false)
    expect(body.usage.completion_tokens).toBe(choice.token_ids!.length)
    expect(server.tokenizer.decode(choice.token_ids!, { skipSpecialTokens: true })).toBe(choice.message.content)
    expect(server.tokenizer.decode(choice.prompt_token_ids!)).toContain("<|start_header_id|>user<|end_header_id|>")
  })

  it("fills max_tokens with ignore_eos, and keeps the first min_tokens positions free of end tokens", async () => {
    const ask = async (extra: Record<string, unknown>) => {
      const response = await server.post("/v1/chat/completions", {
        messages: [{ role: "user", content: "Who art thou?" }],
        max_tokens: 24,
        seed: 2,
        return_token_ids: true,
        ...extra
      })
      expect(response.status).toBe(200)
      const body = Schema.decodeUnknownSync(ChatCompletionResponse)(await response.json())
      return { choice: body.choices[0]!, tokens: body.usage.completion_tokens }
    }
    // The model ends this answer early on its own, so the options have something to change.
    const plain = await ask({})
    expect(plain.choice.finish_reason).toBe("stop")
    expect(plain.tokens).toBeLessThan(12)
    const filled = await ask({ ignore_eos: true })
    expect(filled.choice.finish_reason).toBe("length")
    expect(filled.tokens).toBe(24)
    expect(filled.choice.token_ids!.some(isSpecial)).toBe(false)
    expect(server.tokenizer.decode(filled.choice.token_ids!, { skipSpecialTokens: true })).toBe(filled.choice.message.content)
    const longer = await ask({ min_tokens: 12 })
    expect(longer.tokens).toBeGreaterThanOrEqual(12)
    expect(longer.choice.token_ids!.slice(0, 12).some(isSpecial)).toBe(false)
  })

  it("adds logit_bias to the logits: +100 makes a token the whole answer, -100 keeps it out", async () => {
    const body = { prompt: "ROMEO:\nBut soft, what light", max_tokens: 16, diffusion_steps: 16, return_token_ids: true }
    const plain = (await complete(body)).choices[0]!
    const first = plain.token_ids![0]!
    const favoured = (await complete({ ...body, logit_bias: { [first]: 100 } })).choices[0]!
    expect(favoured.token_ids).toEqual(Array(16).fill(first))
    const banned = (await complete({ ...body, logit_bias: { [first]: -100 } })).choices[0]!
    expect(banned.token_ids).not.toContain(first)
    expect(banned.token_ids).not.toEqual(plain.token_ids)
  })

  it("keeps bad_words out of the answer: a word the greedy answer writes, as written and after a space", async () => {
    const body = { prompt: "ROMEO:\nBut soft, what light", max_tokens: 16, temperature: 0, seed: 1, return_token_ids: true }
    const plain = (await complete(body)).choices[0]!
    // A word the answer holds whose forms are one token each.
    const word = plain
      .token_ids!.map((id) => server.tokenizer.decode([id]).trim())
      .find(
        (text) =>
          /^[A-Za-z]+$/.test(text) &&
          [text, ` ${text}`].every((form) => server.tokenizer.encode(form, { addSpecialTokens: false }).length === 1)
      )
    expect(word).toBeDefined()
    const forms = [word!, ` ${word}`].map((form) => server.tokenizer.encode(form, { addSpecialTokens: false })[0]!)
    expect(plain.token_ids!.some((id) => forms.includes(id))).toBe(true)
    const kept = (await complete({ ...body, bad_words: [word!] })).choices[0]!
    for (const id of forms) expect(kept.token_ids).not.toContain(id)
    expect(kept.token_ids).not.toEqual(plain.token_ids)
  })

  it("draws only allowed_token_ids: without an end token among them, the answer fills max_tokens", async () => {
    const body = { prompt: "ROMEO:\nBut soft, what light", max_tokens: 16, return_token_ids: true }
    const plain = (await complete(body)).choices[0]!
    const allowed = [...new Set(plain.token_ids!.slice(1, 3))]
    const only = (await complete({ ...body, allowed_token_ids: allowed })).choices[0]!
    expect(only.finish_reason).toBe("length")
    expect(only.token_ids).toHaveLength(16)
    for (const token of only.token_ids!) expect(allowed).toContain(token)
  })

  it("reports on every step the steps it plans, and runs exactly that many", async () => {
    const engine = server.engine
    for (const [genLength, blockLength, steps] of [
      [24, 8, 12],
      [20, 8, 7],
      [10, 4, 30],
      [9, 9, 1]
    ] as const) {
      const settings: Engine.SamplingSettings = {
        genLength,
        blockLength,
        steps,
        temperature: 0,
        remasking: "low_confidence",
        cfgScale: 0,
        seed: 0,
        logitsEosInf: false,
        confidenceEosEotInf: false,
        eotTokenId: -1
      }
      const id = await Effect.runPromise(engine.create(server.tokenizer.encode("To be"), settings))
      let taken = 0
      const planned = new Set<number>()
      for (;;) {
        taken++
        const [result] = await Effect.runPromise(engine.step([id]))
        planned.add(result!.stepsTotal)
        if (result!.finished) break
      }
      await Effect.runPromise(engine.release(id))
      expect({ genLength, blockLength, steps, planned: [...planned] }).toEqual({ genLength, blockLength, steps, planned: [taken] })
      // The reference's plan: the steps shared over the blocks, each block's share in [1, its length].
      const blocks = Math.ceil(genLength / blockLength)
      const expected = Array.from({ length: blocks }, (_, b) =>
        Math.min(Math.max(Math.floor(steps / blocks) + (b < steps % blocks ? 1 : 0), 1), Math.min(blockLength, genLength - b * blockLength))
      ).reduce((a, b) => a + b, 0)
      expect(taken).toBe(expected)
    }
  })

  it("samples with min_p: 1 keeps only the likeliest token, so a hot sampler answers the greedy text", async () => {
    const body = { prompt: "ROMEO:\nBut soft, what light", max_tokens: 16, block_length: 8, seed: 3 }
    const greedy = (await complete({ ...body, temperature: 0 })).choices[0]!.text
    expect((await complete({ ...body, temperature: 1.5, min_p: 1 })).choices[0]!.text).toBe(greedy)
    expect((await complete({ ...body, temperature: 1.5 })).choices[0]!.text).not.toBe(greedy)
    const bad = await server.post("/v1/completions", { ...body, min_p: 1.5 })
    expect(bad.status).toBe(400)
    expect(((await bad.json()) as any).error.param).toBe("min_p")
  })

  it("decodes in parallel when asked: fewer steps than tokens at most, reported in the diffusion object", async () => {
    const body = { prompt: "ROMEO:\nBut soft, what light", max_tokens: 32, block_length: 8, seed: 5, return_token_ids: true }
    const vanilla = await complete(body)
    expect(vanilla.diffusion).toMatchObject({ kv_cache: "none", parallel: null, tokens_per_step: 1 })
    const parallel = await complete({ ...body, parallel_threshold: 0.9 })
    const d = parallel.diffusion!
    expect(d.parallel).toEqual({ threshold: 0.9 })
    expect(d.forward_passes).toBe(d.steps)
    expect(d.steps).toBeLessThanOrEqual(32)
    expect(d.tokens_per_step).toBeGreaterThanOrEqual(1)
    // Streamed with snapshots: the same text, and total_steps is the upper bound of one step per token.
    const response = await server.post("/v1/completions", {
      ...body,
      parallel_threshold: 0.9,
      stream: true,
      stream_options: { include_snapshots: true, include_usage: true }
    })
    const events = parseSse(await response.text())
    expect(events.pop()).toBe("[DONE]")
    const chunks = events.map((event) => Schema.decodeUnknownSync(CompletionChunk)(event))
    const usage = chunks.pop()!
    expect(usage.diffusion!.parallel).toEqual({ threshold: 0.9 })
    expect(chunks.map((c) => c.choices[0]!.text).join("")).toBe(parallel.choices[0]!.text)
    for (const chunk of chunks) expect(chunk.choices[0]!.snapshot!.total_steps).toBe(32)
  })

  it("infills between a prompt and a suffix on the real engine", async () => {
    const body = { prompt: "ROMEO:\n", suffix: "\n\nJULIET:\nAy me!", max_tokens: 16, seed: 6, return_token_ids: true }
    const response = await complete(body)
    const suffixTokens = server.tokenizer.encode(body.suffix, { addSpecialTokens: false }).length
    const choice = response.choices[0]!
    expect(response.usage.prompt_tokens).toBe(choice.prompt_token_ids!.length + suffixTokens)
    expect(server.tokenizer.decode(choice.token_ids!, { skipSpecialTokens: true })).toBe(choice.text)
    // Deterministic per seed, like any answer; the suffix is context the model sees, so it shapes the
    // inserted tokens (checked natively and on the golden model: test/engine-sampling.test.ts).
    const again = await complete(body)
    expect(again.choices[0]!.token_ids).toEqual(choice.token_ids)
  })

  it("frees the sequence when a streaming client goes away", async () => {
    const controller = new AbortController()
    const response = await server.post(
      "/v1/completions",
      { prompt: "To be", max_tokens: 200, seed: 3, stream: true, stream_options: { include_snapshots: true } },
      { signal: controller.signal }
    )
    const reader = response.body!.getReader()
    await reader.read()
    controller.abort()
    await eventually(async () => (await Effect.runPromise(server.engine.live)) === 0, 5_000)
  })
})

describe("KV cache settings of the server on the embedded model", () => {
  let cached: TestServer<Engine.EngineShape>
  beforeAll(async () => {
    // A budget with room for one 64-position cache: a request with n = 2 can never fit.
    const kvCacheBudgetBytes = server.engine.info.kvCacheBytesPerPosition * 64
    cached = await startEmbedded({ kvCacheBudgetBytes }, { kvCache: "dual" })
  })
  afterAll(() => cached.close())

  it("uses the server's kv_cache for requests that set none, and the request's when it does", async () => {
    const body = { model: "shakespeare", prompt: "ROMEO:\n", max_tokens: 24 }
    const byDefault = await cached.post("/v1/completions", body)
    expect(byDefault.status).toBe(200)
    const d = Schema.decodeUnknownSync(CompletionResponse)(await byDefault.json()).diffusion!
    expect(d.kv_cache).toBe("dual")
    // A dual cache recomputes the whole canvas only at the 3 block starts.
    expect(d.kv_refreshes).toBe(3)
    const none = await cached.post("/v1/completions", { ...body, kv_cache: "none" })
    expect(Schema.decodeUnknownSync(CompletionResponse)(await none.json()).diffusion!.kv_cache).toBe("none")
  })

  it("answers 503 out_of_memory when the caches of a request can never fit the budget, and serves the next", async () => {
    const body = { model: "shakespeare", prompt: "ROMEO:\n", max_tokens: 24 }
    // 2 x (3 prompt + 40 answer) positions > 64; one alone fits.
    const response = await cached.post("/v1/completions", { ...body, max_tokens: 40, n: 2 })
    expect(response.status).toBe(503)
    const error = (await response.json()) as { error: { code: string; type: string } }
    expect(error.error).toMatchObject({ code: "out_of_memory", type: "service_unavailable_error" })
    expect((await cached.post("/v1/completions", body)).status).toBe(200)
    expect(await Effect.runPromise(cached.engine.live)).toBe(0)
  })
})

describe("guided_choice on the embedded model", () => {
  /** The chain rule, scored here one canvas at a time: per choice, each token's log-probability, then the end's. */
  const chainsOf = async (prompt: ReadonlyArray<number>, choices: ReadonlyArray<ReadonlyArray<number>>, end: number) => {
    const special = server.tokenizer.specialTokens
    const width = Math.max(...choices.map((c) => c.length)) + 1
    const chains: Array<Array<number>> = []
    for (const tokens of choices) {
      const chain: Array<number> = []
      for (let k = 0; k <= tokens.length; k++) {
        const canvas = [...prompt, ...tokens.slice(0, k), ...new Array<number>(width - k).fill(special.mask)]
        const target = k < tokens.length ? tokens[k]! : end
        const [score] = await Effect.runPromise(server.engine.score([{ canvas, positions: [prompt.length + k], targets: [target] }]))
        chain.push(score!.logprobs[0]!)
      }
      chains.push(chain)
    }
    return chains
  }

  it("answers with the choice whose chain of log-probabilities, end token included, is the highest, and reports that chain", async () => {
    const prompt = "ROMEO:\nWhat say you, my lord?\n\nKING HENRY:\n"
    const choices = ["Ay, my lord.", "No", "What, ho!", "I will not."]
    const tokens = choices.map((c) => server.tokenizer.encode(c, { addSpecialTokens: false }))
    const special = server.tokenizer.specialTokens
    const chains = await chainsOf(server.tokenizer.encode(prompt), tokens, special.eos)
    const totals = chains.map((chain) => chain.reduce((a, b) => a + b, 0))
    const best = totals.indexOf(Math.max(...totals))
    const answer = await complete({ prompt, guided_choice: choices, temperature: 0, logprobs: 0 })
    const choice = answer.choices[0]!
    expect(choice.text).toBe(choices[best])
    expect(choice.finish_reason).toBe("stop")
    const logprobs = choice.logprobs!.token_logprobs as ReadonlyArray<number>
    expect(logprobs).toHaveLength(tokens[best]!.length)
    logprobs.forEach((logprob, i) => expect(logprob).toBeCloseTo(chains[best]![i]!, 5))
    expect(answer.usage.completion_tokens).toBe(tokens[best]!.length)
    // One canvas per token of every choice, plus one each for the end token.
    expect(answer.diffusion!.forward_passes).toBe(tokens.reduce((sum, t) => sum + t.length + 1, 0))
  })

  it("draws by the choices' probabilities at a temperature: reproducible per seed, and top_k 1 is the likeliest", async () => {
    const body = { prompt: "ROMEO:\n", guided_choice: ["Ay", "No", "Peace", "Farewell"], n: 4, temperature: 2 }
    const texts = async (extra: Record<string, unknown>) => (await complete({ ...body, ...extra })).choices.map((c) => c.text)
    const first = await texts({ seed: 11 })
    expect(await texts({ seed: 11 })).toEqual(first)
    for (const text of first) expect(body.guided_choice).toContain(text)
    const greedy = (await complete({ ...body, n: 1, temperature: 0 })).choices[0]!.text
    expect(await texts({ seed: 3, top_k: 1 })).toEqual([greedy, greedy, greedy, greedy])
    // Over 4 seeds of 4 answers at temperature 2, more than one choice comes out.
    const drawn = new Set<string>()
    for (const seed of [1, 2, 3, 4]) for (const text of await texts({ seed })) drawn.add(text)
    expect(drawn.size).toBeGreaterThan(1)
  })

  it("chat: the choice is scored as the assistant's turn, ending with the end-of-turn token", async () => {
    const messages = [{ role: "user", content: "Wilt thou come?" }]
    const choices = ["Ay, my lord.", "No."]
    const special = server.tokenizer.specialTokens
    const rendered = await server.post("/tokenize", { messages, add_generation_prompt: true })
    const prompt = ((await rendered.json()) as { tokens: Array<number> }).tokens
    const tokens = choices.map((c) => server.tokenizer.encode(c, { addSpecialTokens: false }))
    const chains = await chainsOf(prompt, tokens, Option.getOrThrow(special.eot))
    const totals = chains.map((chain) => chain.reduce((a, b) => a + b, 0))
    const response = await server.post("/v1/chat/completions", { messages, structured_outputs: { choice: choices }, temperature: 0 })
    expect(response.status).toBe(200)
    const chat = Schema.decodeUnknownSync(ChatCompletionResponse)(await response.json())
    expect(chat.choices[0]!.message.content).toBe(choices[totals.indexOf(Math.max(...totals))])
  })
})

describe("structured output's number slots on the embedded model", () => {
  it("writes only digits (a point in a number) and end tokens there, where the model would write words", async () => {
    const messages = [{ role: "user", content: "How many soldiers, and how old art thou?" }]
    const schemaOf = (type: string) => ({
      type: "object",
      properties: { soldiers: { type }, age: { type: type === "string" ? "string" : "number" } }
    })
    const post = async (type: string, seed: number) => {
      const body = {
        messages,
        seed,
        temperature: 1.5,
        return_token_ids: true,
        response_format: { type: "json_schema", json_schema: { name: "x", schema: schemaOf(type) } }
      }
      const response = await server.post("/v1/chat/completions", body)
      expect(response.status).toBe(200)
      return (await response.json()) as { choices: Array<{ message: { content: string }; token_ids: Array<number> }> }
    }
    const text = (id: number) => server.tokenizer.decode([id])
    let wordsAsStrings = 0
    for (const seed of [1, 2, 3, 4]) {
      const answer = (await post("integer", seed)).choices[0]!
      const parsed = JSON.parse(answer.message.content) as { soldiers: number; age: number }
      expect(Number.isInteger(parsed.soldiers)).toBe(true)
      expect(typeof parsed.age).toBe("number")
      // The slots' tokens: every position of the answer that is not the skeleton's.
      const skeleton = server.tokenizer.encode('{"soldiers": ', { addSpecialTokens: false }).length
      const slot = answer.token_ids.slice(skeleton, skeleton + 8)
      expect(slot.length).toBe(8)
      expect(text(slot[0]!)).toMatch(/^[0-9]+$/)
      for (const id of slot) expect(isSpecial(id) || /^[0-9]+$/.test(text(id))).toBe(true)
      // The control: as a string, the same slot holds words.
      const free = JSON.parse((await post("string", seed)).choices[0]!.message.content) as { soldiers: string }
      if (/[A-Za-z]/.test(free.soldiers)) wordsAsStrings++
    }
    expect(wordsAsStrings).toBeGreaterThan(0)
  })
})

describe("echo with logprobs on the embedded model", () => {
  it("gives each prompt token after the first its chain-rule log-probability and alternatives, then the answer's", async () => {
    const prompt = "ROMEO:\nBut soft, what light"
    const tokens = server.tokenizer.encode(prompt)
    const answer = await complete({ prompt, echo: true, logprobs: 3, max_tokens: 2, temperature: 0 })
    const logprobs = answer.choices[0]!.logprobs!
    expect(answer.choices[0]!.text.startsWith(prompt)).toBe(true)
    expect(logprobs.tokens).toHaveLength(tokens.length + 2)
    expect(logprobs.token_logprobs[0]).toBeNull()
    expect(logprobs.top_logprobs![0]).toBeNull()
    const mask = server.tokenizer.specialTokens.mask
    for (let i = 1; i < tokens.length; i++) {
      // Token i on a canvas of the first i tokens and masks over the rest of the prompt.
      const canvas = [...tokens.slice(0, i), ...new Array<number>(tokens.length - i).fill(mask)]
      const [alone] = await Effect.runPromise(server.engine.score([{ canvas, positions: [i], targets: [tokens[i]!], topLogprobs: 3 }]))
      expect(logprobs.token_logprobs[i]).toBeCloseTo(alone!.logprobs[0]!, 6)
      const top = logprobs.top_logprobs![i]!
      for (const alternative of alone!.top[0]!)
        expect(top[server.tokenizer.decode([alternative.token])]).toBeCloseTo(alternative.logprob, 5)
      expect(top[logprobs.tokens[i]!]).toBeCloseTo(alone!.logprobs[0]!, 6)
    }
    // The answer's two tokens follow, offset past the echoed prompt.
    expect(logprobs.text_offset[tokens.length]).toBe(prompt.length)
    expect(logprobs.token_logprobs.slice(tokens.length).every((l) => typeof l === "number")).toBe(true)
    // A stream's opening chunk carries the prompt's part.
    const streamed = await server.post("/v1/completions", { prompt, echo: true, logprobs: 3, max_tokens: 2, temperature: 0, stream: true })
    const opening = (parseSse(await streamed.text())[0] as any).choices[0]
    expect(opening.text).toBe(prompt)
    expect(opening.logprobs.token_logprobs).toEqual(logprobs.token_logprobs.slice(0, tokens.length))
  })
})

describe("lm-evaluation-harness's log-likelihood request", () => {
  it("gives a continuation's log-likelihood and greediness the way local-completions reads them", async () => {
    // What lm_eval's local-completions sends: token ids of context + continuation, one token asked for,
    // logprobs 1, echo; it sums token_logprobs[ctxlen:-1] and checks each against max(top_logprobs).
    const context = server.tokenizer.encode("KING HENRY:\nWhat say you, my", { addSpecialTokens: true })
    const continuation = server.tokenizer.encode(" lord", { addSpecialTokens: false })
    const response = await server.post("/v1/completions", {
      model: "shakespeare",
      prompt: [[...context, ...continuation]],
      temperature: 0,
      max_tokens: 1,
      logprobs: 1,
      seed: 1234,
      echo: true
    })
    expect(response.status).toBe(200)
    const choice = ((await response.json()) as any).choices[0]
    const ctxlen = context.length
    const tokenLogprobs = choice.logprobs.token_logprobs.slice(ctxlen, -1) as Array<number>
    const tops = choice.logprobs.top_logprobs.slice(ctxlen, -1) as Array<Record<string, number>>
    expect(tokenLogprobs).toHaveLength(continuation.length)
    // The same chain scored here: each continuation token on its context and masks over the rest.
    const all = [...context, ...continuation]
    const mask = server.tokenizer.specialTokens.mask
    let expected = 0
    let greedy = true
    for (let i = ctxlen; i < all.length; i++) {
      const canvas = [...all.slice(0, i), ...new Array<number>(all.length - i).fill(mask)]
      const [scored] = await Effect.runPromise(server.engine.score([{ canvas, positions: [i], targets: [all[i]!], topLogprobs: 1 }]))
      expected += scored!.logprobs[0]!
      greedy = greedy && scored!.top[0]![0]!.token === all[i]
    }
    expect(tokenLogprobs.reduce((a, b) => a + b, 0)).toBeCloseTo(expected, 5)
    expect(tokenLogprobs.every((logprob, k) => logprob === Math.max(...Object.values(tops[k]!)))).toBe(greedy)
  })
})

describe("prompt_logprobs on the embedded model", () => {
  it("ranks each prompt token in its row: the likeliest is rank 1, and a token among the top has the rank of its place", async () => {
    const prompt = "ROMEO:\nBut soft, what light"
    const answer = await complete({ prompt, max_tokens: 2, temperature: 0, prompt_logprobs: 5, echo: true, logprobs: 5 })
    const choice = answer.choices[0]!
    const ranked = choice.prompt_logprobs!
    const tokens = server.tokenizer.encode(prompt)
    expect(ranked).toHaveLength(tokens.length)
    for (let i = 1; i < tokens.length; i++) {
      const entries = ranked[i]!
      const own = entries[String(tokens[i])]!
      // The same log-probability as echo's.
      expect(own.logprob).toBeCloseTo(choice.logprobs!.token_logprobs[i]!, 6)
      const byRank = Object.values(entries).sort((a, b) => a.rank - b.rank)
      expect(byRank[0]!.rank).toBe(1)
      for (let k = 1; k < byRank.length; k++) expect(byRank[k]!.logprob).toBeLessThanOrEqual(byRank[k - 1]!.logprob + 1e-6)
      // A prompt token outside the five likeliest ranks below them.
      if (Object.keys(entries).length > 5) expect(own.rank).toBeGreaterThan(5)
      else expect(own.rank).toBeLessThanOrEqual(5)
    }
  })
})
