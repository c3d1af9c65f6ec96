/**
 * Every request field's bad values answer 400 (never 422) with `param` naming the field, before any
 * sequence is created; an unknown model is 404.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { startServer, type TestServer, textScript } from "./openai-support.js"

let server: TestServer
beforeAll(async () => {
  server = await startServer({ script: (t) => textScript(t, () => "Hello world") })
})
afterAll(() => server.close())

interface ErrorBody {
  readonly error: { message: string; type: string; param: string | null; code: string | null; request_id: string }
}

const expectError = async (response: Response, status: number, param: string | null, message?: RegExp) => {
  const body = (await response.json()) as ErrorBody
  expect({ status: response.status, param: body.error.param }).toEqual({ status, param })
  expect(Object.keys(body.error).sort()).toEqual(["code", "message", "param", "request_id", "type"])
  expect(body.error.request_id).toMatch(/^req\d+$/)
  if (message !== undefined) expect(body.error.message).toMatch(message)
  return body.error
}

const prompt = { prompt: "Say hello" }
const chat = { messages: [{ role: "user", content: "hi" }] }
const jsonFormat = { type: "json_schema", json_schema: { name: "x", schema: { type: "object", properties: { a: { type: "string" } } } } }

const completionCases: ReadonlyArray<readonly [string, Record<string, unknown>, string, RegExp?]> = [
  ["prompt of a wrong type", { prompt: 5 }, "prompt", /prompt must be a string/],
  ["no prompt", {}, "prompt", /prompt is required/],
  ["empty prompt list", { prompt: [] }, "prompt", /must not be empty/],
  ["empty token list in a list", { prompt: [[1, 2], []] }, "prompt[1]", /must not be empty/],
  ["negative token id", { prompt: [1, -2] }, "prompt"],
  ["token id outside the vocabulary", { prompt: [1, 99_999] }, "prompt[1]", /not in the vocabulary/],
  ["token id outside the vocabulary in a list", { prompt: [[3], [1, 5000]] }, "prompt[1][1]"],
  ["max_tokens 0 without echo", { ...prompt, max_tokens: 0 }, "max_tokens", /at least 1, or 0 with echo/],
  ["max_tokens below 0", { ...prompt, max_tokens: -1 }, "max_tokens", /integer >= 0/],
  ["max_tokens a string", { ...prompt, max_tokens: "ten" }, "max_tokens"],
  ["temperature below 0", { ...prompt, temperature: -1 }, "temperature", /from 0 to 2/],
  ["temperature above 2", { ...prompt, temperature: 2.5 }, "temperature"],
  ["temperature a string", { ...prompt, temperature: "hot" }, "temperature"],
  ["top_p above 1", { ...prompt, top_p: 1.5 }, "top_p", /greater than 0 and at most 1/],
  ["top_p 0", { ...prompt, top_p: 0 }, "top_p", /greater than 0 and at most 1/],
  ["top_k below -1", { ...prompt, top_k: -2 }, "top_k"],
  ["top_k fractional", { ...prompt, top_k: 1.5 }, "top_k"],
  ["parallel_threshold above 1", { ...prompt, parallel_threshold: 1.2 }, "parallel_threshold", /from 0 to 1/],
  ["negative parallel_threshold", { ...prompt, parallel_threshold: -0.1 }, "parallel_threshold"],
  ["negative parallel_factor", { ...prompt, parallel_factor: -1 }, "parallel_factor"],
  ["both parallel rules", { ...prompt, parallel_threshold: 0.9, parallel_factor: 1 }, "parallel_factor", /cannot both be set/],
  ["early_stop a string", { ...prompt, early_stop: "yes" }, "early_stop"],
  ["kv_cache unknown", { ...prompt, kv_cache: "full" }, "kv_cache", /"none", "prefix" or "dual"/],
  ["suffix a number", { ...prompt, suffix: 5 }, "suffix"],
  [
    "prompt plus suffix over the context",
    { prompt: "x".repeat(60), suffix: "y".repeat(70) },
    "prompt",
    /the prompt has 61 tokens and the suffix 70/
  ],
  [
    "prompt, suffix and max_tokens over the context",
    { prompt: "x".repeat(60), suffix: "y".repeat(30), max_tokens: 40 },
    "max_tokens",
    /131 tokens \(61 in the prompt, 30 in the suffix, 40 for the answer\)/
  ],
  ["n 0", { ...prompt, n: 0 }, "n"],
  ["n fractional", { ...prompt, n: 1.5 }, "n"],
  ["n above the batch size", { ...prompt, n: 9 }, "n", /at most 8/],
  ["stop a number", { ...prompt, stop: 5 }, "stop"],
  ["stop a list of numbers", { ...prompt, stop: [1] }, "stop"],
  ["empty stop string", { ...prompt, stop: ["x", ""] }, "stop", /must not be empty/],
  ["stop_token_ids a string", { ...prompt, stop_token_ids: "x" }, "stop_token_ids"],
  ["negative stop token id", { ...prompt, stop_token_ids: [-1] }, "stop_token_ids"],
  ["fractional seed", { ...prompt, seed: 1.5 }, "seed", /^seed must be an integer/],
  ["seed beyond 64 bits", { ...prompt, seed: 2 ** 70 }, "seed"],
  ["logprobs above 20", { ...prompt, logprobs: 21 }, "logprobs"],
  ["logprobs a boolean", { ...prompt, logprobs: true }, "logprobs"],
  ["echo a string", { ...prompt, echo: "yes" }, "echo"],
  ["stream a string", { ...prompt, stream: "yes" }, "stream"],
  ["stream_options without stream", { ...prompt, stream_options: { include_usage: true } }, "stream_options"],
  [
    "stream_options.include_usage a string",
    { ...prompt, stream: true, stream_options: { include_usage: "x" } },
    "stream_options.include_usage"
  ],
  [
    "stream_options.include_snapshots a number",
    { ...prompt, stream: true, stream_options: { include_snapshots: 1 } },
    "stream_options.include_snapshots"
  ],
  ["diffusion_steps 0", { ...prompt, diffusion_steps: 0 }, "diffusion_steps"],
  [
    "diffusion_steps absurdly large",
    { ...prompt, diffusion_steps: 1e15 },
    "diffusion_steps",
    /^diffusion_steps must be an integer from 1 to 100000$/
  ],
  [
    "the mask token typed in the prompt",
    { prompt: "Say <|mdm_mask|> hello" },
    "prompt",
    /^prompt contains the mask token "<\|mdm_mask\|>"/
  ],
  ["the mask token in a prompt of a list", { prompt: ["Say hello", "<|mdm_mask|>"] }, "prompt[1]", /mask token/],
  ["the mask token in a prompt scored for echo", { prompt: "Hi <|mdm_mask|>", echo: true, logprobs: 1 }, "prompt", /mask token/],
  ["the mask token in the suffix", { ...prompt, suffix: "a <|mdm_mask|>" }, "suffix", /^suffix contains the mask token/],
  ["block_length 0", { ...prompt, block_length: 0 }, "block_length"],
  ["unknown remasking", { ...prompt, remasking: "lowest" }, "remasking", /low_confidence/],
  ["negative cfg_scale", { ...prompt, cfg_scale: -1 }, "cfg_scale"],
  ["return_token_ids a number", { ...prompt, return_token_ids: 1 }, "return_token_ids"],
  ["best_of other than n", { ...prompt, best_of: 2 }, "best_of"],
  ["presence_penalty out of range", { ...prompt, presence_penalty: 3 }, "presence_penalty"],
  ["frequency_penalty out of range", { ...prompt, frequency_penalty: -2.5 }, "frequency_penalty", /from -2 to 2/],
  ["repetition_penalty 0", { ...prompt, repetition_penalty: 0 }, "repetition_penalty", /greater than 0 and at most 2/],
  ["repetition_penalty a string", { ...prompt, repetition_penalty: "1.2" }, "repetition_penalty"],
  [
    "logit_bias with a key that is no token id",
    { ...prompt, logit_bias: { hello: 5 } },
    "logit_bias",
    /^logit_bias key "hello" is not a token id/
  ],
  ["logit_bias with a leading zero", { ...prompt, logit_bias: { "01": 5 } }, "logit_bias", /not a token id/],
  ["logit_bias outside the vocabulary", { ...prompt, logit_bias: { "100000": 5 } }, "logit_bias", /not a token id/],
  [
    "logit_bias above 100",
    { ...prompt, logit_bias: { "5": 101 } },
    "logit_bias",
    /^logit_bias for token 5 must be a number from -100 to 100, got 101/
  ],
  ["ignore_eos a string", { ...prompt, ignore_eos: "yes" }, "ignore_eos"],
  ["min_tokens negative", { ...prompt, min_tokens: -1 }, "min_tokens"],
  [
    "min_tokens above max_tokens",
    { ...prompt, max_tokens: 8, min_tokens: 9 },
    "min_tokens",
    /^min_tokens \(9\) must be at most the answer length \(max_tokens: 8\)/
  ],
  ["allowed_token_ids empty", { ...prompt, allowed_token_ids: [] }, "allowed_token_ids", /^allowed_token_ids must not be empty/],
  [
    "allowed_token_ids outside the vocabulary",
    { ...prompt, allowed_token_ids: [3, 100000] },
    "allowed_token_ids[1]",
    /not in the vocabulary/
  ],
  [
    "vLLM's bad_words with a word of several tokens",
    { ...prompt, bad_words: ["night"] },
    "bad_words[0]",
    /"night" is 5 tokens: only words whose forms/
  ],
  ["vLLM's bad_words with an empty word", { ...prompt, bad_words: [" "] }, "bad_words[0]", /is empty/],
  ["vLLM's bad_words not a list", { ...prompt, bad_words: "night" }, "bad_words"],
  ["vLLM's guided_regex", { ...prompt, guided_regex: "yes|no" }, "guided_regex", /constrained decoding/],
  ["vLLM's structured_outputs other than choice and json", { ...prompt, structured_outputs: { regex: "a+" } }, "structured_outputs"],
  ["guided_choice with denoising settings", { ...prompt, guided_choice: ["yes", "no"], block_length: 4 }, "block_length", /does not apply/],
  ["include_stop_str_in_output a string", { ...prompt, include_stop_str_in_output: "yes" }, "include_stop_str_in_output"],
  [
    "truncate_prompt_tokens 0",
    { ...prompt, truncate_prompt_tokens: 0 },
    "truncate_prompt_tokens",
    /must be -1 \(the context length\) or from 1 to the context length 128, got 0/
  ],
  ["truncate_prompt_tokens above the context", { ...prompt, truncate_prompt_tokens: 129 }, "truncate_prompt_tokens"],
  ["truncate_prompt_tokens below -1", { ...prompt, truncate_prompt_tokens: -2 }, "truncate_prompt_tokens"],
  ["prompt_logprobs above 20", { ...prompt, prompt_logprobs: 21 }, "prompt_logprobs"],
  ["prompt_logprobs with stream", { ...prompt, prompt_logprobs: 2, stream: true }, "prompt_logprobs", /not supported with stream/],
  [
    "response_format json_object on completions",
    { ...prompt, response_format: { type: "json_object" } },
    "response_format",
    /keys of the object are not known/
  ],
  [
    "suffix with structured output",
    { ...prompt, suffix: "!", guided_json: { type: "object", properties: { a: { type: "string" } } } },
    "suffix",
    /the JSON skeleton laid after the prompt/
  ],
  [
    "logprobs with structured output on completions",
    { ...prompt, logprobs: 1, guided_json: { type: "object", properties: { a: { type: "string" } } } },
    "logprobs",
    /text_offset/
  ],
  ["model a number", { ...prompt, model: 5 }, "model"],
  ["prompt over the context", { prompt: "x".repeat(200) }, "prompt", /maximum context length is 128 tokens/],
  [
    "prompt plus max_tokens over the context",
    { prompt: "x".repeat(100), max_tokens: 50 },
    "max_tokens",
    /you requested 151 tokens \(101 in the prompt, 50 for the answer\)/
  ]
]

const chatCases: ReadonlyArray<readonly [string, Record<string, unknown>, string, RegExp?]> = [
  ["no messages", {}, "messages", /messages is required/],
  ["messages not a list", { messages: "hi" }, "messages"],
  ["no message", { messages: [] }, "messages", /at least one message/],
  ["a message without content", { messages: [{ role: "user" }] }, "messages[0].content", /is required/],
  ["content a number", { messages: [{ role: "user", content: 5 }] }, "messages[0].content"],
  ["an unknown role", { messages: [{ role: "robot", content: "hi" }] }, "messages[0].role", /unknown role/],
  [
    "an image part",
    { messages: [{ role: "user", content: [{ type: "image_url", image_url: {} }] }] },
    "messages[0].content[0]",
    /text only/
  ],
  [
    "a text part whose text is not a string",
    { messages: [{ role: "user", content: [{ type: "text", text: 5 }] }] },
    "messages[0].content[0].text",
    /^text must be a string$/
  ],
  [
    "the mask token in a message",
    { messages: [{ role: "user", content: "fill <|mdm_mask|> in" }] },
    "messages",
    /^messages contains the mask token/
  ],
  ["max_completion_tokens 0", { ...chat, max_completion_tokens: 0 }, "max_completion_tokens"],
  ["logprobs a number", { ...chat, logprobs: 1 }, "logprobs"],
  ["top_logprobs above 20", { ...chat, logprobs: true, top_logprobs: 21 }, "top_logprobs"],
  ["top_logprobs without logprobs", { ...chat, top_logprobs: 2 }, "top_logprobs", /requires logprobs/],
  ["a tool without its function", { ...chat, tools: [{ type: "function" }] }, "tools[0].function", /is required/],
  ["tool_choice required without tools", { ...chat, tool_choice: "required" }, "tool_choice", /gives no tools/],
  ["a named tool_choice", { ...chat, tool_choice: { type: "function", function: { name: "f" } } }, "tool_choice"],
  ["legacy functions", { ...chat, functions: [{ name: "f", parameters: {} }] }, "functions"],
  ["legacy function_call", { ...chat, function_call: { name: "f" } }, "function_call"],
  ["audio modalities", { ...chat, modalities: ["text", "audio"] }, "modalities", /text only/],
  ["audio output", { ...chat, audio: { voice: "alloy", format: "wav" } }, "audio"],
  ["vLLM's chat echo", { ...chat, echo: true }, "echo", /does not repeat the conversation/],
  [
    "min_tokens with structured output",
    { ...chat, min_tokens: 3, response_format: jsonFormat },
    "min_tokens",
    /^min_tokens cannot be used with structured output/
  ],
  [
    "ignore_eos with structured output",
    { ...chat, ignore_eos: true, response_format: jsonFormat },
    "ignore_eos",
    /cannot be used with structured output/
  ],
  ["stop with structured output", { ...chat, stop: "x", response_format: jsonFormat }, "stop", /cannot be used with structured output/],
  ["vLLM's guided_json without properties", { ...chat, guided_json: { type: "object" } }, "guided_json", /needs its keys in `properties`/],
  ["a JSON response_format", { ...chat, response_format: { type: "json_object" } }, "response_format"],
  ["temperature above 2", { ...chat, temperature: 3 }, "temperature"],
  ["messages over the context", { messages: [{ role: "user", content: "x".repeat(200) }] }, "messages", /maximum context length/],
  ["max_tokens over the context", { ...chat, max_tokens: 120 }, "max_tokens", /maximum context length/],
  ["max_tokens 0", { ...chat, max_tokens: 0 }, "max_tokens", /integer >= 1/],
  ["vLLM's prompt_logprobs in a chat stream", { ...chat, prompt_logprobs: 2, stream: true }, "prompt_logprobs", /not supported with stream/]
]

describe("request validation", () => {
  for (const [name, body, param, message] of completionCases) {
    it(`completions: ${name} → 400 naming ${param}`, async () => {
      const error = await expectError(await server.post("/v1/completions", body), 400, param, message)
      expect(error.type).toBe("invalid_request_error")
    })
  }
  for (const [name, body, param, message] of chatCases) {
    it(`chat: ${name} → 400 naming ${param}`, async () => {
      await expectError(await server.post("/v1/chat/completions", body), 400, param, message)
    })
  }

  it("a body that is not JSON, or not an object, is a 400", async () => {
    await expectError(await server.post("/v1/completions", "{not json"), 400, null, /not valid JSON/)
    await expectError(await server.post("/v1/completions", "[1, 2]"), 400, null, /JSON object/)
    await expectError(await server.post("/v1/chat/completions", ""), 400, null, /JSON object/)
  })

  it("an unknown model is a 404 model_not_found, everywhere a model can be named", async () => {
    for (const [path, body] of [
      ["/v1/completions", prompt],
      ["/v1/chat/completions", chat],
      ["/tokenize", prompt]
    ] as const) {
      const error = await expectError(await server.post(path, { ...body, model: "gpt-4" }), 404, "model", /gpt-4/)
      expect(error.code).toBe("model_not_found")
      expect(error.type).toBe("invalid_request_error")
    }
    await expectError(await fetch(`${server.url}/v1/models/gpt-4`), 404, "model")
  })

  it("tokenize and detokenize check their input", async () => {
    await expectError(await server.post("/tokenize", {}), 400, "prompt", /either prompt or messages/)
    await expectError(await server.post("/tokenize", { ...prompt, ...chat }), 400, "prompt")
    await expectError(await server.post("/detokenize", { tokens: [-1] }), 400, "tokens")
    await expectError(await server.post("/detokenize", { tokens: [5, 99_999] }), 400, "tokens[1]")
  })

  it("rejected requests never reached the engine", () => {
    expect(server.engine.created).toHaveLength(0)
  })

  it("unknown fields are ignored and null counts as absent, as OpenAI SDKs send it", async () => {
    const response = await server.post("/v1/completions", {
      ...prompt,
      user: "someone",
      made_up: { deep: [1] },
      stop: null,
      max_tokens: null,
      logprobs: null,
      suffix: null,
      stream_options: null,
      top_p: 1,
      top_k: -1,
      presence_penalty: 0
    })
    expect(response.status).toBe(200)
    expect(((await response.json()) as { choices: Array<{ text: string }> }).choices[0]!.text).toBe("Hello world")
  })

  it("seed takes any 64-bit integer, negative ones too, folded into the engine's 0 to 2^52", async () => {
    const seeds: Array<readonly [number | string, number]> = [
      [-42, 2 ** 52 - 42],
      ["9223372036854775807", 0], // 2^63 - 1 as JSON reads it: 2^63, a multiple of 2^52
      [2 ** 52, 2 ** 52], // in range: as given
      [2 ** 52 + 5, 5]
    ]
    for (const [seed, engineSeed] of seeds) {
      const body = `{"prompt": "Say hello", "seed": ${seed}}`
      const response = await server.post("/v1/completions", body)
      expect(response.status, String(seed)).toBe(200)
      expect(server.engine.created.at(-1)!.settings.seed, String(seed)).toBe(engineSeed)
    }
  })

  it("min_tokens and ignore_eos reach the engine, with the request's stop tokens to bar below min_tokens", async () => {
    const response = await server.post("/v1/completions", {
      ...prompt,
      max_tokens: 10,
      min_tokens: 4,
      ignore_eos: true,
      stop_token_ids: [7]
    })
    expect(response.status).toBe(200)
    expect(server.engine.created.at(-1)!.settings).toMatchObject({ genLength: 10, minTokens: 4, ignoreEos: true, stopTokenIds: [7] })
    // Every token the server ends answers at (EOS, end of turn, a template's turn end) is barred with them.
    const special = server.tokenizer.specialTokens
    expect([...server.engine.created.at(-1)!.settings.endTokenIds!].sort()).toEqual(
      [special.eos, ...(special.eot._tag === "Some" ? [special.eot.value] : [])].sort()
    )
    const chatResponse = await server.post("/v1/chat/completions", { ...chat, min_tokens: 0, ignore_eos: false })
    expect(chatResponse.status).toBe(200)
    const settings = server.engine.created.at(-1)!.settings
    expect([settings.minTokens, settings.ignoreEos, settings.stopTokenIds]).toEqual([undefined, undefined, undefined])
  })

  it("truncate_prompt_tokens keeps the prompt's last tokens: the engine, the usage, the token ids and echo see those", async () => {
    const ids = [...server.tokenizer.encode("Say hello there, good friend", { addSpecialTokens: false })]
    const kept = ids.slice(-3)
    const response = await server.post("/v1/completions", { prompt: ids, truncate_prompt_tokens: 3, echo: true, return_token_ids: true })
    expect(response.status).toBe(200)
    expect([...server.engine.created.at(-1)!.prompt]).toEqual(kept)
    const body = (await response.json()) as {
      choices: Array<{ text: string; prompt_token_ids: Array<number> }>
      usage: { prompt_tokens: number }
    }
    expect(body.usage.prompt_tokens).toBe(3)
    expect(body.choices[0]!.prompt_token_ids).toEqual(kept)
    expect(body.choices[0]!.text.startsWith(server.tokenizer.decode(kept, { skipSpecialTokens: true }))).toBe(true)
    // A prompt no longer than k is left alone, its echo the text as given; -1 is the context length.
    const short = await server.post("/v1/completions", { prompt: "Say hello", truncate_prompt_tokens: -1, echo: true })
    expect(((await short.json()) as { choices: Array<{ text: string }> }).choices[0]!.text.startsWith("Say hello")).toBe(true)
    const chatResponse = await server.post("/v1/chat/completions", { ...chat, truncate_prompt_tokens: 4 })
    expect(chatResponse.status).toBe(200)
    expect(server.engine.created.at(-1)!.prompt).toHaveLength(4)
  })

  it("allowed_token_ids reaches the engine as given", async () => {
    expect((await server.post("/v1/completions", { ...prompt, allowed_token_ids: [5, 3] })).status).toBe(200)
    expect(server.engine.created.at(-1)!.settings.allowedTokenIds).toEqual([5, 3])
  })

  it("logit_bias reaches the engine as [token, bias] pairs by token", async () => {
    const response = await server.post("/v1/completions", { ...prompt, logit_bias: { "9": -100, "3": 2.5, "0": 0 } })
    expect(response.status).toBe(200)
    expect(server.engine.created.at(-1)!.settings.logitBias).toEqual([
      [0, 0],
      [3, 2.5],
      [9, -100]
    ])
    expect((await server.post("/v1/chat/completions", { ...chat, logit_bias: {} })).status).toBe(200)
    expect(server.engine.created.at(-1)!.settings.logitBias).toBeUndefined()
  })

  it("fields that are not honoured pass at the values that change nothing", async () => {
    const completion = await server.post("/v1/completions", {
      ...prompt,
      bad_words: [],
      include_stop_str_in_output: false,
      guided_json: null,
      response_format: { type: "text" }
    })
    expect(completion.status).toBe(200)
    const reply = await server.post("/v1/chat/completions", {
      ...chat,
      tool_choice: "none",
      functions: [],
      function_call: "auto",
      modalities: ["text"],
      audio: null,
      echo: false,
      parallel_tool_calls: true
    })
    expect(reply.status).toBe(200)
    expect(((await reply.json()) as { choices: Array<{ message: { content: string } }> }).choices[0]!.message.content).toBe("Hello world")
  })
})
