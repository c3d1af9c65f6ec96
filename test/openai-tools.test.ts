/**
 * Tool calls over real HTTP (src/openai/tools.ts): the call the request names is laid on the canvas as
 * `{"name": ..., "arguments": {...}}` and the answer is that call — `message.tool_calls` with the
 * arguments' JSON, content null — streamed as OpenAI streams a call (id and name first, then the
 * arguments). A call sent back in the conversation reaches the prompt as the JSON the model wrote; what
 * cannot be honoured is a 400 naming the field.
 */
import { Schema } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { ChatCompletionChunk, ChatCompletionResponse } from "../src/openai/protocol.js"
import { parseSse, startServer, type TestServer, textScript } from "./openai-support.js"

const decodeResponse = Schema.decodeUnknownSync(ChatCompletionResponse, { onExcessProperty: "error" })
const decodeChunk = Schema.decodeUnknownSync(ChatCompletionChunk, { onExcessProperty: "error" })

let server: TestServer
beforeAll(async () => {
  // The answer's text repeats over the whole canvas, so every slot holds some of it.
  server = await startServer({ script: (t) => textScript(t, () => "Hello world, good night. ", { end: "none" }) })
})
afterAll(() => server.close())

const messages = [{ role: "user", content: "Say hello" }]
const getPlace = {
  type: "function",
  function: {
    name: "get_place",
    description: "Where a person is",
    parameters: { type: "object", properties: { city: { type: "string" }, reason: { type: "string" } }, required: ["city"] }
  }
}
const ping = { type: "function", function: { name: "ping" } }
const named = (name: string) => ({ type: "function", function: { name } })

const chat = async (body: Record<string, unknown>) => {
  const response = await server.post("/v1/chat/completions", { messages, ...body })
  expect(response.status).toBe(200)
  return decodeResponse(await response.json())
}

const refused = async (body: Record<string, unknown>) => {
  const response = await server.post("/v1/chat/completions", { messages, ...body })
  expect(response.status).toBe(400)
  return ((await response.json()) as { error: { message: string; param: string | null } }).error
}

const lastCreated = () => server.engine.created[server.engine.created.length - 1]!

describe("a named tool call", () => {
  it("is the answer: tool_calls with the arguments' JSON, content null, finish_reason stop; the call is laid on the canvas", async () => {
    const response = await chat({ tools: [ping, getPlace], tool_choice: named("get_place"), seed: 3 })
    const [choice] = response.choices
    expect(choice!.finish_reason).toBe("stop")
    expect(choice!.message.content).toBeNull()
    const [call] = choice!.message.tool_calls!
    expect(call!.id).toMatch(/^call_[A-Za-z0-9]{24}$/)
    expect(call!.type).toBe("function")
    expect(call!.function.name).toBe("get_place")
    const args = JSON.parse(call!.function.arguments) as Record<string, unknown>
    expect(Object.keys(args)).toEqual(["city", "reason"])
    for (const value of Object.values(args)) {
      expect(typeof value).toBe("string")
      // What the model wrote in the slot: a piece of the script's repeating text, whitespace trimmed.
      expect((value as string).length).toBeGreaterThan(0)
      expect("Hello world, good night. ".repeat(4)).toContain(value)
    }
    // The engine got the call's skeleton: the name and the keys fixed, the values masked (-1).
    const { template } = lastCreated()
    expect(template).toBeDefined()
    expect(server.tokenizer.decode(template!.filter((t) => t !== -1))).toBe(
      '{"name": "get_place", "arguments": {"city": "", "reason": ""}}'
    )
    expect(template!.filter((t) => t === -1)).toHaveLength(16)
    expect(response.usage.completion_tokens).toBe(template!.length)
  })

  it('tool_choice "required" with one tool makes its call and says finish_reason "tool_calls"', async () => {
    const response = await chat({ tools: [getPlace], tool_choice: "required", seed: 3 })
    expect(response.choices[0]!.finish_reason).toBe("tool_calls")
    expect(response.choices[0]!.message.tool_calls![0]!.function.name).toBe("get_place")
  })

  it("streams the id and name first, then the arguments once the values are denoised; the same call as unstreamed", async () => {
    const body = { messages, tools: [getPlace], tool_choice: "required", seed: 5, stream: true }
    const response = await server.post("/v1/chat/completions", body)
    expect(response.status).toBe(200)
    const events = parseSse(await response.text())
    expect(events.at(-1)).toBe("[DONE]")
    const chunks = events.slice(0, -1).map((event) => decodeChunk(event))
    expect(chunks).toHaveLength(2)
    const [first, last] = chunks.map((chunk) => chunk.choices[0]!)
    expect(first!.delta.role).toBe("assistant")
    expect(first!.delta.content).toBeNull()
    expect(first!.delta.tool_calls).toEqual([
      { index: 0, id: expect.stringMatching(/^call_[A-Za-z0-9]{24}$/), type: "function", function: { name: "get_place", arguments: "" } }
    ])
    expect(first!.finish_reason).toBeNull()
    expect(last!.finish_reason).toBe("tool_calls")
    const whole = await chat({ tools: [getPlace], tool_choice: "required", seed: 5 })
    expect(last!.delta.tool_calls).toEqual([
      { index: 0, function: { arguments: whole.choices[0]!.message.tool_calls![0]!.function.arguments } }
    ])
  })

  it('"required" with several tools: each name is scored in its own call\'s layout, the likeliest is called', async () => {
    const scoredBefore = server.engine.scored.length
    const response = await chat({ tools: [getPlace, ping, named("get_time")], tool_choice: "required", temperature: 0 })
    const items = server.engine.scored.slice(scoredBefore).flat()
    // Per tool: its name's tokens (the JSON string) and the token after them, one canvas each.
    const names = ["get_place", "ping", "get_time"]
    const lengths = names.map((name) => server.tokenizer.encode(JSON.stringify(name), { addSpecialTokens: false }).length + 1)
    expect(items).toHaveLength(lengths.reduce((a, b) => a + b, 0))
    // The fake model scores -|target - (canvas[0] + position) % 1000| / 10; the pick is the highest chain.
    let at = 0
    const totals = lengths.map((length) => {
      const chain = items.slice(at, at + length)
      at += length
      return chain.reduce((sum, item) => sum - Math.abs(item.targets[0]! - ((item.canvas[0]! + item.positions[0]!) % 1000)) / 10, 0)
    })
    const best = names[totals.indexOf(Math.max(...totals))]!
    const call = response.choices[0]!.message.tool_calls![0]!
    expect(call.function.name).toBe(best)
    expect(response.choices[0]!.finish_reason).toBe("tool_calls")
    // The first canvas: the call's skeleton with the name (and the comma after it) masked, the values too.
    const first = items[0]!
    const answerStart = first.positions[0]! - server.tokenizer.encode('{"name": ', { addSpecialTokens: false }).length
    const shown = first.canvas.slice(answerStart).filter((t) => t !== server.tokenizer.specialTokens.mask)
    expect(server.tokenizer.decode(shown)).toBe('{"name":  "arguments": {"city": "", "reason": ""}}')
  })

  it("n answers are n calls with their own ids", async () => {
    const response = await chat({ tools: [getPlace], tool_choice: named("get_place"), n: 2, seed: 1 })
    const ids = response.choices.map((choice) => choice.message.tool_calls![0]!.id)
    expect(new Set(ids).size).toBe(2)
  })

  it("a function without parameters is called with {} at once, with no denoising", async () => {
    const before = server.engine.created.length
    const response = await chat({ tools: [ping], tool_choice: named("ping") })
    expect(response.choices[0]!.message.tool_calls![0]!.function).toEqual({ name: "ping", arguments: "{}" })
    expect(response.choices[0]!.finish_reason).toBe("stop")
    expect(server.engine.created.length).toBe(before)
    expect(response.diffusion!.steps).toBe(0)
  })

  it("max_tokens sizes the values' slots", async () => {
    const full = await chat({ tools: [getPlace], tool_choice: "required" })
    const skeleton = full.usage.completion_tokens - 16
    const small = await chat({ tools: [getPlace], tool_choice: "required", max_tokens: skeleton + 6 })
    expect(small.usage.completion_tokens).toBe(skeleton + 6)
    expect(lastCreated().template!.filter((t) => t === -1)).toHaveLength(6)
  })
})

describe("tools in the conversation", () => {
  it("a call sent back reaches the prompt as the JSON laid on the canvas, its result as a tool turn; /tokenize agrees", async () => {
    const conversation = [
      { role: "user", content: "Where?" },
      {
        role: "assistant",
        content: null,
        tool_calls: [{ id: "call_1", type: "function", function: { name: "get_place", arguments: '{"city":"Verona"}' } }]
      },
      { role: "tool", tool_call_id: "call_1", content: "Fair Verona" }
    ]
    await chat({ messages: conversation, tools: [getPlace], max_tokens: 4 })
    const tokenized = await server.post("/tokenize", { messages: conversation, tools: [getPlace] })
    expect(((await tokenized.json()) as { tokens: Array<number> }).tokens).toEqual(lastCreated().prompt)
    expect(server.tokenizer.decode(lastCreated().prompt)).toBe(
      "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhere?<|eot_id|>" +
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_place", "arguments": {"city": "Verona"}}<|eot_id|>' +
        "<|start_header_id|>tool<|end_header_id|>\n\nFair Verona<|eot_id|>" +
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
  })

  it('with tool_choice "none", or none given (vLLM\'s default), tools are given and the answer is text', async () => {
    for (const choice of [{ tool_choice: "none" }, {}]) {
      const response = await chat({ tools: [getPlace], max_tokens: 6, ...choice })
      expect(typeof response.choices[0]!.message.content).toBe("string")
      expect(response.choices[0]!.message.tool_calls).toBeUndefined()
      expect(lastCreated().template).toBeUndefined()
    }
  })
})

describe("what cannot be honoured", () => {
  it.each([
    ['"auto"', { tools: [getPlace], tool_choice: "auto" }, "tool_choice", /"auto" is not supported: this model has no format/],
    ["an unknown name", { tools: [getPlace], tool_choice: named("fly") }, "tool_choice.function.name", /"fly", which is not one of tools/],
    ["a call without tools", { tool_choice: "required" }, "tool_choice", /gives no tools/],
    [
      "two functions of one name",
      { tools: [getPlace, getPlace], tool_choice: "required" },
      "tools[1].function.name",
      /names must be unique/
    ],
    ["a tool that is not a function", { tools: [{ type: "code_interpreter" }] }, "tools[0].type", /must be "function"/],
    ["a name with spaces", { tools: [named("get place")] }, "tools[0].function.name", /letters, digits, underscores or dashes/],
    ["an unknown tool_choice", { tools: [getPlace], tool_choice: "always" }, "tool_choice", /"none", "auto", "required" or/],
    [
      "an array argument without items",
      {
        tools: [{ type: "function", function: { name: "f", parameters: { type: "object", properties: { n: { type: "array" } } } } }],
        tool_choice: "required"
      },
      "tools[0].function.parameters",
      /at tools\[0\]\.function\.parameters\.properties\.n\.items: an array needs the schema of its items/
    ],
    [
      "a call with response_format",
      {
        tools: [getPlace],
        tool_choice: "required",
        response_format: {
          type: "json_schema",
          json_schema: { name: "x", schema: { type: "object", properties: { a: { type: "string" } } } }
        }
      },
      "response_format",
      /cannot be used with a tool call/
    ],
    ["a call with a stop", { tools: [getPlace], tool_choice: "required", stop: "x" }, "stop", /cannot be used with a tool call/],
    [
      "a call with guided_choice",
      { tools: [getPlace], tool_choice: "required", guided_choice: ["a", "b"] },
      "tool_choice",
      /does not apply with guided_choice/
    ],
    [
      "too few tokens for the values",
      { tools: [getPlace], tool_choice: "required", max_tokens: 10 },
      "max_tokens",
      /leaves no room for the values/
    ],
    ["legacy functions", { functions: [{ name: "f", parameters: {} }] }, "functions", /send tools and tool_choice/]
  ])("%s", async (_, body, param, message) => {
    const error = await refused(body)
    expect(error.param).toBe(param)
    expect(error.message).toMatch(message)
  })
})

describe("the Responses API", () => {
  const responseTools = [{ type: "function", ...getPlace.function }]

  it("a named call is a function_call output item: the same call chat makes", async () => {
    const response = await server.post("/v1/responses", {
      input: "Say hello",
      tools: responseTools,
      tool_choice: { type: "function", name: "get_place" },
      seed: 3
    })
    expect(response.status).toBe(200)
    const body = (await response.json()) as { status: string; output: Array<Record<string, unknown>>; tool_choice: unknown; tools: unknown }
    expect(body.status).toBe("completed")
    expect(body.output).toHaveLength(1)
    expect(body.output[0]).toMatchObject({
      type: "function_call",
      status: "completed",
      name: "get_place",
      call_id: expect.stringMatching(/^call_/)
    })
    expect(body.tool_choice).toEqual({ type: "function", name: "get_place" })
    expect(body.tools).toEqual(responseTools)
    const viaChat = await chat({ tools: [getPlace], tool_choice: named("get_place"), seed: 3 })
    expect(body.output[0]!["arguments"]).toBe(viaChat.choices[0]!.message.tool_calls![0]!.function.arguments)
  })

  it("function_call and function_call_output items reach the prompt as an assistant's calls (one turn) and tool messages", async () => {
    // The tiny tokenizer writes JSON nearly a byte a token: this conversation needs more than 128.
    const roomy = await startServer({ config: { maxModelLen: 512 } })
    const response = await roomy.post("/v1/responses", {
      input: [
        { role: "user", content: "Where?" },
        { type: "function_call", call_id: "call_1", name: "get_place", arguments: '{"city":"Verona"}' },
        { type: "function_call", call_id: "call_2", name: "get_place", arguments: '{"city":"Mantua"}' },
        { type: "function_call_output", call_id: "call_1", output: "Fair Verona" }
      ],
      tools: responseTools,
      max_output_tokens: 4
    })
    expect(response.status).toBe(200)
    await roomy.close()
    expect(roomy.tokenizer.decode(roomy.engine.created.at(-1)!.prompt)).toBe(
      "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhere?<|eot_id|>" +
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_place", "arguments": {"city": "Verona"}}\n' +
        '{"name": "get_place", "arguments": {"city": "Mantua"}}<|eot_id|>' +
        "<|start_header_id|>tool<|end_header_id|>\n\nFair Verona<|eot_id|>" +
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
  })

  it.each([
    ["a function_call without call_id", { input: [{ type: "function_call", name: "f", arguments: "{}" }] }, "input[0].call_id"],
    ["a function_call_output without output", { input: [{ type: "function_call_output", call_id: "c" }] }, "input[0].output"],
    ["a built-in tool", { input: "x", tools: [{ type: "file_search" }] }, "tools[0].type"],
    ["auto with tools", { input: "x", tools: responseTools, tool_choice: "auto" }, "tool_choice"]
  ])("refuses %s", async (_, body, param) => {
    const response = await server.post("/v1/responses", body)
    expect(response.status).toBe(400)
    expect(((await response.json()) as { error: { param: string } }).error.param).toBe(param)
  })
})
