/**
 * Non-streaming completions, models, tokenize and detokenize over real HTTP, against the fake engine
 * answering scripted text: response shapes, answers cut at EOS / stop strings / stop tokens, usage
 * without padding, n and prompt lists, echo, logprobs, return_token_ids, and the settings the engine got.
 */
import { Effect, Schema } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { CompletionResponse, DetokenizeResponse, Model, ModelList, TokenizeResponse } from "../src/openai/protocol.js"
import { eventually, parseSse, servingConfig, startServer, type TestServer, textScript } from "./openai-support.js"

const strict = <A, I>(schema: Schema.Schema<A, I>) => Schema.decodeUnknownSync(schema, { onExcessProperty: "error" })

/** The scripted answer: depends on the prompt and the seed, so every choice can be told apart. */
const answerText = (prompt: string, seed: number) =>
  prompt.includes("long") ? `the world the world the world ${seed}` : `Hello wörld 👋 ${seed}. Good night`

let server: TestServer
beforeAll(async () => {
  server = await startServer({
    script: (t) => ({
      ...textScript(t, (prompt, settings) => answerText(prompt, settings.seed), {
        end: "eos",
        probability: (position) => 1 / (position + 2)
      })
    })
  })
})
afterAll(() => server.close())

const complete = async (body: Record<string, unknown>) => {
  const response = await server.post("/v1/completions", body)
  expect(response.status).toBe(200)
  return strict(CompletionResponse)(await response.json())
}

const encode = (text: string, addSpecialTokens = false) => [...server.tokenizer.encode(text, { addSpecialTokens })]
const lastCreated = () => server.engine.created[server.engine.created.length - 1]!

describe("POST /v1/completions", () => {
  it("answers with the OpenAI shape, the text cut at EOS, and usage without the padding", async () => {
    const before = Math.floor(Date.now() / 1000)
    const response = await complete({ prompt: "Say hello", max_tokens: 40, seed: 3 })
    const text = answerText("Say hello", 3)
    expect(response.id).toMatch(/^cmpl-req\d+$/)
    expect(response.object).toBe("text_completion")
    expect(response.model).toBe("tiny")
    expect(response.created).toBeGreaterThanOrEqual(before)
    expect(response.choices).toEqual([{ index: 0, text, logprobs: null, finish_reason: "stop" }])
    const promptTokens = encode("Say hello", true).length
    const completionTokens = encode(text).length
    expect(completionTokens).toBeLessThan(40)
    expect(response.usage).toEqual({
      prompt_tokens: promptTokens,
      completion_tokens: completionTokens,
      total_tokens: promptTokens + completionTokens,
      prompt_tokens_details: { cached_tokens: 0 }
    })
  })

  it("says length when the answer fills max_tokens, and counts max_tokens tokens", async () => {
    const response = await complete({ prompt: "Say hello", max_tokens: 6, seed: 3 })
    const tokens = encode(answerText("Say hello", 3)).slice(0, 6)
    expect(response.choices[0]!.finish_reason).toBe("length")
    expect(response.choices[0]!.text).toBe(server.tokenizer.decode(tokens))
    expect(response.usage.completion_tokens).toBe(6)
  })

  it("hands the engine the request's settings, and the server's defaults for the rest", async () => {
    await complete({
      prompt: "Say hello",
      max_tokens: 24,
      diffusion_steps: 12,
      block_length: 6,
      remasking: "random",
      cfg_scale: 1.5,
      temperature: 0.7,
      seed: 42,
      top_k: 20,
      top_p: 0.9,
      parallel_threshold: 0.8,
      early_stop: false,
      kv_cache: "dual"
    })
    const eot = server.tokenizer.specialTokens.eot
    expect(lastCreated().prompt).toEqual(encode("Say hello", true))
    expect(lastCreated().suffix).toEqual([])
    expect(lastCreated().settings).toEqual({
      genLength: 24,
      steps: 12,
      blockLength: 6,
      remasking: "random",
      cfgScale: 1.5,
      temperature: 0.7,
      seed: 42,
      logitsEosInf: false,
      confidenceEosEotInf: false,
      eotTokenId: eot._tag === "Some" ? eot.value : -1,
      topK: 20,
      topP: 0.9,
      minP: 0,
      presencePenalty: 0,
      frequencyPenalty: 0,
      repetitionPenalty: 1,
      parallelThreshold: 0.8,
      parallelFactor: 0,
      earlyStop: false,
      kvCache: "dual"
    })
    await complete({ prompt: "Say hello", seed: 1 })
    const { defaults } = servingConfig
    expect(lastCreated().settings).toMatchObject({
      genLength: defaults.maxTokens,
      steps: defaults.maxTokens,
      blockLength: defaults.blockLength,
      remasking: defaults.remasking,
      cfgScale: defaults.cfgScale,
      temperature: defaults.temperature,
      // Without server defaults for them: no filtering, no parallel decoding, early stop on, no cache.
      topK: 0,
      topP: 1,
      minP: 0,
      parallelThreshold: 0,
      parallelFactor: 0,
      earlyStop: true,
      kvCache: "none"
    })
    // top_k -1 means off, as in vLLM; parallel_factor chooses the factor rule.
    await complete({ prompt: "Say hello", seed: 1, top_k: -1, parallel_factor: 2 })
    expect(lastCreated().settings).toMatchObject({ topK: 0, parallelThreshold: 0, parallelFactor: 2 })
    // No max_tokens: the default answer length, shortened to what the context has left.
    await complete({ prompt: "x".repeat(120), seed: 1 })
    expect(lastCreated().settings.genLength).toBe(servingConfig.maxModelLen - 121)
    // A block never longer than the answer.
    await complete({ prompt: "Say hello", max_tokens: 4, seed: 1 })
    expect(lastCreated().settings.blockLength).toBe(4)
  })

  it("uses a random seed when none is given, and the same seed gives the same answer", async () => {
    const a = await complete({ prompt: "Say hello", max_tokens: 30 })
    const seedA = lastCreated().settings.seed
    const b = await complete({ prompt: "Say hello", max_tokens: 30 })
    const seedB = lastCreated().settings.seed
    expect(seedA).not.toBe(seedB)
    expect(a.choices[0]!.text).toBe(answerText("Say hello", seedA))
    expect(b.choices[0]!.text).toBe(answerText("Say hello", seedB))
    const again = await complete({ prompt: "Say hello", max_tokens: 30, seed: seedA })
    expect(again.choices[0]!.text).toBe(a.choices[0]!.text)
  })

  it("gives n answers per prompt for a list of prompts, indexed prompt × n + answer", async () => {
    const response = await complete({ prompt: ["Say hello", "a long one"], n: 2, max_tokens: 40, seed: 10 })
    expect(response.choices.map((c) => [c.index, c.text])).toEqual([
      [0, answerText("Say hello", 10)],
      [1, answerText("Say hello", 11)],
      [2, answerText("a long one", 10)],
      [3, answerText("a long one", 11)]
    ])
    const promptTokens = encode("Say hello", true).length + encode("a long one", true).length
    const completionTokens = [10, 11].reduce(
      (sum, seed) => sum + encode(answerText("Say hello", seed)).length + encode(answerText("a long one", seed)).length,
      0
    )
    // Prompt tokens count once per prompt, not once per answer.
    expect(response.usage).toEqual({
      prompt_tokens: promptTokens,
      completion_tokens: completionTokens,
      total_tokens: promptTokens + completionTokens,
      prompt_tokens_details: { cached_tokens: 0 }
    })
  })

  it("takes prompts as token ids, one list or several", async () => {
    const ids = encode("Say hello", true)
    const one = await complete({ prompt: ids, max_tokens: 40, seed: 5 })
    expect(one.choices[0]!.text).toBe(answerText("Say hello", 5))
    expect(lastCreated().prompt).toEqual(ids)
    const two = await complete({ prompt: [ids, encode("a long one")], max_tokens: 40, seed: 5 })
    expect(two.choices.map((c) => c.text)).toEqual([answerText("Say hello", 5), answerText("a long one", 5)])
  })

  it("cuts the text at the first stop string, even inside a token, with finish_reason stop", async () => {
    const full = answerText("Say hello", 3)
    const cases: ReadonlyArray<readonly [string | Array<string>, string]> = [
      ["Good", full.slice(0, full.indexOf("Good"))],
      [["igh", "👋"], full.slice(0, full.indexOf("👋"))],
      [["ld 👋 3"], full.slice(0, full.indexOf("ld 👋 3"))],
      ["never there", full]
    ]
    for (const [stop, text] of cases) {
      const response = await complete({ prompt: "Say hello", max_tokens: 40, seed: 3, stop })
      expect(response.choices[0]).toMatchObject({ text, finish_reason: "stop" })
    }
  })

  it("ends at a stop token id, counted as generated but not in the text", async () => {
    const tokens = encode(answerText("Say hello", 3))
    const response = await complete({
      prompt: "Say hello",
      max_tokens: 40,
      seed: 3,
      stop_token_ids: [tokens[2]!],
      return_token_ids: true
    })
    expect(response.choices[0]).toMatchObject({
      text: server.tokenizer.decode(tokens.slice(0, 2)),
      finish_reason: "stop",
      token_ids: tokens.slice(0, 3)
    })
    expect(response.usage.completion_tokens).toBe(3)
  })

  it("puts the prompt before the answer with echo", async () => {
    const texts = await complete({ prompt: ["Say hello", "a long one"], max_tokens: 40, seed: 2, echo: true })
    expect(texts.choices.map((c) => c.text)).toEqual(["Say hello" + answerText("Say hello", 2), "a long one" + answerText("a long one", 2)])
    // Token prompts echo their text (special tokens such as BOS left out, as in the answers).
    const ids = await complete({ prompt: encode("Say hello", true), max_tokens: 40, seed: 2, echo: true })
    expect(ids.choices[0]!.text).toBe("Say hello" + answerText("Say hello", 2))
  })

  it("with echo and logprobs, scores each prompt's tokens first: null for the first, then one per token, then the answer's", async () => {
    const before = server.engine.scored.length
    const response = await complete({
      prompt: [encode("Say hello"), encode("Good")],
      max_tokens: 40,
      seed: 2,
      echo: true,
      logprobs: 2,
      n: 2
    })
    expect(response.choices).toHaveLength(4)
    // One scoring job per prompt: a canvas per token after the first.
    expect(server.engine.scored.slice(before).flat()).toHaveLength(encode("Say hello").length - 1 + encode("Good").length - 1)
    for (const [i, choice] of response.choices.entries()) {
      const promptIds = i < 2 ? encode("Say hello") : encode("Good")
      const logprobs = choice.logprobs!
      expect(logprobs.tokens.slice(0, promptIds.length)).toEqual(promptIds.map((id) => server.tokenizer.decode([id])))
      expect(logprobs.token_logprobs[0]).toBeNull()
      expect(logprobs.top_logprobs![0]).toBeNull()
      expect(logprobs.token_logprobs.slice(1).every((l) => typeof l === "number")).toBe(true)
      // The text offsets run through the echoed prompt into the answer.
      const promptText = i < 2 ? "Say hello" : "Good"
      expect(logprobs.text_offset[promptIds.length]).toBe(promptText.length)
      expect(logprobs.text_offset.every((offset, k) => k === 0 || offset >= logprobs.text_offset[k - 1]!)).toBe(true)
      // The answer's tokens, then the EOS it ended at (in the logprobs only), as OpenAI's legacy completions.
      expect(choice.finish_reason).toBe("stop")
      expect(logprobs.tokens.length - promptIds.length).toBe(encode(choice.text.slice(promptText.length)).length + 1)
      expect(logprobs.tokens.at(-1)).toBe("<|endoftext|>")
      expect(logprobs.text_offset.at(-1)).toBe(choice.text.length)
      expect(response.usage.completion_tokens).toBe(
        response.choices.reduce((sum, c, k) => sum + encode(c.text.slice((k < 2 ? "Say hello" : "Good").length)).length, 0)
      )
    }
  })

  it("with max_tokens 0 and echo, answers with the prompt alone: its logprobs when asked, nothing denoised", async () => {
    const steps = server.engine.batches.length
    const response = await complete({ prompt: "Say hello", max_tokens: 0, echo: true, logprobs: 1, n: 2 })
    expect(server.engine.batches.length).toBe(steps)
    const promptIds = encode("Say hello", true)
    for (const choice of response.choices) {
      expect(choice).toMatchObject({ text: "Say hello", finish_reason: "length" })
      expect(choice.logprobs!.tokens).toHaveLength(promptIds.length)
      expect(choice.logprobs!.token_logprobs[0]).toBeNull()
    }
    expect(response.usage).toMatchObject({ prompt_tokens: promptIds.length, completion_tokens: 0 })
    const streamed = await server.post("/v1/completions", { prompt: "Say hello", max_tokens: 0, echo: true, stream: true })
    const events = parseSse(await streamed.text()) as Array<any>
    expect(events.at(-1)).toBe("[DONE]")
    expect(events.map((e) => e.choices?.[0]?.text).join("")).toBe("Say hello")
    expect(events.at(-2).choices[0].finish_reason).toBe("length")
    const refused = await server.post("/v1/completions", { prompt: "Say hello", max_tokens: 0 })
    expect(refused.status).toBe(400)
    expect(((await refused.json()) as any).error.param).toBe("max_tokens")
  })

  it("vLLM's prompt_logprobs: per prompt token its logprob, rank and text, and the likeliest tokens beside it", async () => {
    const before = server.engine.scored.length
    const response = await complete({ prompt: "Say hello", max_tokens: 4, seed: 1, prompt_logprobs: 2, n: 2 })
    const ids = encode("Say hello", true)
    const items = server.engine.scored.slice(before).flat()
    expect(items).toHaveLength(ids.length - 1)
    for (const choice of response.choices) {
      const ranked = choice.prompt_logprobs!
      expect(ranked).toHaveLength(ids.length)
      expect(ranked[0]).toBeNull()
      for (let i = 1; i < ids.length; i++) {
        // The fake model expects (canvas[0] + position) % 1000 and ranks the others by distance from it.
        const expected = (ids[0]! + i) % 1000
        const d = ids[i]! - expected
        const entry = ranked[i]![String(ids[i])]!
        expect(entry).toEqual({
          logprob: -Math.abs(d) / 10,
          rank: d === 0 ? 1 : d > 0 ? 2 * d : 2 * -d + 1,
          decoded_token: server.tokenizer.decode([ids[i]!])
        })
        expect(ranked[i]![String(expected)]).toMatchObject({ rank: 1 })
        expect(ranked[i]![String(expected + 1)]).toMatchObject({ rank: 2 })
      }
    }
    const streamed = await server.post("/v1/completions", { prompt: "Say hello", prompt_logprobs: 1, stream: true })
    expect(streamed.status).toBe(400)
  })

  it("vLLM's prompt_logprobs on chat: the rendered conversation's tokens, once for the response; not with stream", async () => {
    const messages = [{ role: "user", content: "Hi" }]
    const before = server.engine.scored.length
    const response = await server.post("/v1/chat/completions", { messages, max_tokens: 2, prompt_logprobs: 1, n: 2 })
    expect(response.status).toBe(200)
    const body = (await response.json()) as any
    const tokenized = await server.post("/tokenize", { messages })
    const ids = ((await tokenized.json()) as { tokens: Array<number> }).tokens
    expect(server.engine.scored.slice(before).flat()).toHaveLength(ids.length - 1)
    const ranked = body.prompt_logprobs as Array<Record<string, { logprob: number; rank: number }> | null>
    expect(ranked).toHaveLength(ids.length)
    expect(ranked[0]).toBeNull()
    for (let i = 1; i < ids.length; i++) {
      const d = ids[i]! - ((ids[0]! + i) % 1000)
      expect(ranked[i]![String(ids[i])]).toMatchObject({ logprob: -Math.abs(d) / 10, rank: d === 0 ? 1 : d > 0 ? 2 * d : 2 * -d + 1 })
    }
    for (const choice of body.choices) expect(choice.prompt_logprobs).toBeUndefined()
    const streamed = await server.post("/v1/chat/completions", { messages, prompt_logprobs: 1, stream: true })
    expect(streamed.status).toBe(400)
    expect(((await streamed.json()) as any).error.param).toBe("prompt_logprobs")
  })

  it("returns the log of each token's committed probability as logprobs", async () => {
    const text = answerText("Say hello", 3)
    const tokens = encode(text)
    const response = await complete({ prompt: "Say hello", max_tokens: 40, seed: 3, logprobs: 1 })
    const logprobs = response.choices[0]!.logprobs!
    // The script commits position p with probability 1 / (p + 2).
    expect(logprobs.token_logprobs).toHaveLength(tokens.length)
    logprobs.token_logprobs.forEach((lp, p) => expect(lp).toBeCloseTo(Math.log(1 / (p + 2)), 6))
    expect(logprobs.tokens).toEqual(tokens.map((id) => server.tokenizer.decode([id])))
    // The engine's alternatives (none from this fake engine) plus the chosen token, as OpenAI returns it.
    expect(logprobs.top_logprobs).toEqual(logprobs.tokens.map((token, p) => ({ [token]: logprobs.token_logprobs[p] })))
    expect(lastCreated().settings.topLogprobs).toBe(1)
    // text_offset: where each token's text starts; a token inside a character starts where it does.
    const offsets = tokens.map((_, i) => server.tokenizer.decode(tokens.slice(0, i)).replace(/\uFFFD+$/, "").length)
    expect(logprobs.text_offset).toEqual(offsets)
    const none = await complete({ prompt: "Say hello", max_tokens: 40, seed: 3, logprobs: 0 })
    expect(none.choices[0]!.logprobs!.top_logprobs).toBeNull()
    expect(lastCreated().settings.topLogprobs).toBeUndefined()
  })

  it("infills between the prompt and a suffix: the inserted text only, the suffix counted as prompt", async () => {
    const text = answerText("Say hello", 3)
    const response = await complete({ prompt: "Say hello", suffix: " the end", max_tokens: 40, seed: 3 })
    // The suffix goes to the engine tokenized without special tokens, after the answer's masks.
    expect(lastCreated().prompt).toEqual(encode("Say hello", true))
    expect(lastCreated().suffix).toEqual(encode(" the end"))
    expect(response.choices[0]!.text).toBe(text)
    const promptTokens = encode("Say hello", true).length + encode(" the end").length
    expect(response.usage).toEqual({
      prompt_tokens: promptTokens,
      completion_tokens: encode(text).length,
      total_tokens: promptTokens + encode(text).length,
      prompt_tokens_details: { cached_tokens: 0 }
    })
    // echo adds the prompt in front, never the suffix behind; an empty suffix is no suffix.
    const echoed = await complete({ prompt: "Say hello", suffix: " the end", echo: true, max_tokens: 40, seed: 3 })
    expect(echoed.choices[0]!.text).toBe("Say hello" + text)
    await complete({ prompt: "Say hello", suffix: "", max_tokens: 40, seed: 3 })
    expect(lastCreated().suffix).toEqual([])
  })

  it("reports how the answers were denoised in a diffusion object", async () => {
    const response = await complete({ prompt: "Say hello", max_tokens: 40, seed: 3 })
    const diffusion = response.diffusion!
    // The fake engine commits one token a step and evaluates the canvas once a step; the answer is read
    // up to its EOS, so at least that many steps ran.
    expect(diffusion.steps).toBeGreaterThanOrEqual(encode(answerText("Say hello", 3)).length + 1)
    expect(diffusion).toEqual({
      steps: diffusion.steps,
      forward_passes: diffusion.steps,
      kv_refreshes: 0,
      tokens_per_step: 1,
      skipped_tokens: 0,
      kv_cache: "none",
      parallel: null
    })
    // Sums over every answer of every prompt; the request's parallel rule is named.
    const many = await complete({
      prompt: ["Say hello", "a long one"],
      n: 2,
      max_tokens: 40,
      seed: 3,
      parallel_threshold: 0.8,
      cfg_scale: 1
    })
    // Each answer ran at least to its EOS (an answer that ends first keeps counting its prompt's steps).
    const stepsToEos = (prompt: string, seed: number) => encode(answerText(prompt, seed)).length + 1
    expect(many.diffusion!.steps).toBeGreaterThanOrEqual(
      stepsToEos("Say hello", 3) + stepsToEos("Say hello", 4) + stepsToEos("a long one", 3) + stepsToEos("a long one", 4)
    )
    expect(many.diffusion!.forward_passes).toBe(2 * many.diffusion!.steps) // cfg: two canvases a step
    expect(many.diffusion!.parallel).toEqual({ threshold: 0.8 })
    expect((await complete({ prompt: "Say hello", max_tokens: 8, parallel_factor: 1.5 })).diffusion!.parallel).toEqual({ factor: 1.5 })
    // A cached answer refreshes its cache once per block begun: 40 tokens in blocks of 8 (the default).
    const cached = await complete({ prompt: "Say hello", max_tokens: 40, seed: 3, kv_cache: "dual" })
    const blocksBegun = Math.floor((cached.diffusion!.steps - 1) / 8) + 1
    expect(cached.diffusion).toMatchObject({ kv_cache: "dual", kv_refreshes: blocksBegun })
  })

  it("adds prompt_token_ids and token_ids to each choice with return_token_ids", async () => {
    const response = await complete({ prompt: "Say hello", n: 2, max_tokens: 40, seed: 3, return_token_ids: true })
    response.choices.forEach((choice, j) => {
      expect(choice.prompt_token_ids).toEqual(encode("Say hello", true))
      expect(choice.token_ids).toEqual(encode(answerText("Say hello", 3 + j)))
      expect(server.tokenizer.decode(choice.token_ids!)).toBe(choice.text)
    })
  })
})

describe("an answer that ends early", () => {
  let slow: TestServer
  beforeAll(async () => {
    slow = await startServer({
      script: (t) => textScript(t, () => "Hello world night the world", { end: "none" }),
      engine: { stepMs: 5 }
    })
  })
  afterAll(() => slow.close())

  it("is cancelled in the engine as soon as its text is decided", async () => {
    const response = await slow.post("/v1/completions", { prompt: "Say hello", max_tokens: 100, seed: 1, stop: "night" })
    expect(((await response.json()) as { choices: Array<{ text: string }> }).choices[0]!.text).toBe("Hello world ")
    // The scheduler frees the cancelled sequence before its next step.
    await eventually(async () => (await Effect.runPromise(slow.engine.live)) === 0, 1_000)
    // 100 steps would have been run to the end; the stop string was read after 3.
    expect(slow.engine.batches.length).toBeLessThan(10)
  })
})

describe("a prompt list longer than the batch and the queue together", () => {
  // A batch of 8 sequences and a queue of 4.
  let small: TestServer
  beforeAll(async () => {
    small = await startServer({ script: (t) => textScript(t, () => "Hello world"), scheduler: { queueCapacity: 4 } })
  })
  afterAll(() => small.close())
  const letters = (count: number) => Array.from({ length: count }, (_, i) => String.fromCharCode(97 + i))

  it("is a 400 naming prompt even on an idle server, and nothing of it reaches the engine", async () => {
    for (const [prompts, n, most] of [
      [13, 1, 12],
      [9, 2, 8]
    ] as const) {
      const response = await small.post("/v1/completions", { prompt: letters(prompts), n, max_tokens: 1 })
      expect(response.status).toBe(400)
      const body = (await response.json()) as { error: Record<string, unknown> }
      expect(body.error).toMatchObject({ type: "invalid_request_error", param: "prompt", code: "too_many_prompts" })
      expect(body.error["message"]).toMatch(new RegExp(`${prompts} prompts.*at most ${most} requests of n = ${n}`))
    }
    expect(small.engine.created).toHaveLength(0)
  })

  it("is answered whole when it fits: the free batch slots take the first prompts, the queue the rest", async () => {
    const response = await small.post("/v1/completions", { prompt: letters(12), max_tokens: 2 })
    expect(response.status).toBe(200)
    expect(strict(CompletionResponse)(await response.json()).choices).toHaveLength(12)
  })
})

describe("server defaults for the sampler options", () => {
  let configured: TestServer
  beforeAll(async () => {
    configured = await startServer({
      script: (t) => textScript(t, () => "Hello world"),
      config: {
        defaults: {
          ...servingConfig.defaults,
          topK: 40,
          topP: 0.95,
          parallelThreshold: 0.9,
          earlyStop: false,
          kvCache: "prefix"
        }
      }
    })
  })
  afterAll(() => configured.close())

  const settingsFor = async (body: Record<string, unknown>) => {
    const response = await configured.post("/v1/completions", { prompt: "Say hello", seed: 1, ...body })
    expect(response.status).toBe(200)
    return configured.engine.created[configured.engine.created.length - 1]!.settings
  }

  it("applies them to requests that do not choose, and lets a request override each", async () => {
    expect(await settingsFor({})).toMatchObject({
      topK: 40,
      topP: 0.95,
      parallelThreshold: 0.9,
      parallelFactor: 0,
      earlyStop: false,
      kvCache: "prefix"
    })
    expect(await settingsFor({ kv_cache: "none" })).toMatchObject({ kvCache: "none" })
    expect(await settingsFor({ top_k: 0, top_p: 1, early_stop: true })).toMatchObject({ topK: 0, topP: 1, earlyStop: true })
    // A request that names a parallel rule decides alone: 0 turns the server's threshold off.
    expect(await settingsFor({ parallel_threshold: 0 })).toMatchObject({ parallelThreshold: 0, parallelFactor: 0 })
    expect(await settingsFor({ parallel_factor: 1 })).toMatchObject({ parallelThreshold: 0, parallelFactor: 1 })
  })
})

describe("models, tokenize, detokenize", () => {
  it("lists the served model", async () => {
    const list = strict(ModelList)(await (await fetch(`${server.url}/v1/models`)).json())
    expect(list).toEqual({
      object: "list",
      data: [{ id: "tiny", object: "model", created: servingConfig.created, owned_by: "vdiff", max_model_len: 128 }]
    })
    const model = strict(Model)(await (await fetch(`${server.url}/v1/models/tiny`)).json())
    expect(model.id).toBe("tiny")
  })

  it("tokenizes a prompt or messages exactly as the completion endpoints do", async () => {
    const plain = strict(TokenizeResponse)(await (await server.post("/tokenize", { prompt: "Say hello" })).json())
    expect(plain).toEqual({ count: plain.tokens.length, max_model_len: 128, tokens: encode("Say hello", true) })
    const bare = strict(TokenizeResponse)(await (await server.post("/tokenize", { prompt: "Say hello", add_special_tokens: false })).json())
    expect(bare.tokens).toEqual(encode("Say hello"))
    const messages = [{ role: "user", content: "hi" }]
    const chat = strict(TokenizeResponse)(await (await server.post("/tokenize", { messages })).json())
    expect(server.tokenizer.decode(chat.tokens)).toBe(
      "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    const chatResponse = await server.post("/v1/chat/completions", { messages, max_tokens: 8, seed: 1, return_token_ids: true })
    expect(((await chatResponse.json()) as { choices: Array<{ prompt_token_ids: Array<number> }> }).choices[0]!.prompt_token_ids).toEqual(
      chat.tokens
    )
  })

  it("detokenizes token ids", async () => {
    const ids = encode("Hello wörld 👋")
    const body = strict(DetokenizeResponse)(await (await server.post("/detokenize", { tokens: ids })).json())
    expect(body).toEqual({ prompt: "Hello wörld 👋" })
  })
})
