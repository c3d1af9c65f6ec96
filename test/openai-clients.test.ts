/**
 * What today's client libraries send, against a live `vdiff serve` on the embedded model (with an API
 * key): the official `openai` SDK (top logprobs, auth errors by class, the developer role, the Responses
 * API, structured output parsed with zod), the Vercel AI SDK through `@ai-sdk/openai-compatible` (chat
 * completions) and through `@ai-sdk/openai`'s default provider (the Responses API), and LangChain's
 * ChatOpenAI. Answers are Shakespeare-ish: the checks are about shape, agreement between endpoints and
 * streaming, never about what the model says.
 */
import { createOpenAI } from "@ai-sdk/openai"
import { createOpenAICompatible } from "@ai-sdk/openai-compatible"
import { ChatOpenAI } from "@langchain/openai"
import { generateText, Output, streamText, tool } from "ai"
import OpenAI from "openai"
import { zodResponseFormat } from "openai/helpers/zod"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { z } from "zod"
import { type ServeProcess, startServe } from "./stress/serve.js"

const apiKey = "sk-clients-test-key"
const model = "shakespeare"
let server: ServeProcess
let client: OpenAI

beforeAll(async () => {
  server = await startServe({ flags: ["--api-key", apiKey, "--max-tokens", "12"] })
  client = new OpenAI({ apiKey, baseURL: server.url + "/v1", maxRetries: 0, timeout: 30_000 })
})
afterAll(async () => {
  expect(await server.stop()).toBe(0)
})

const descending = (values: ReadonlyArray<number>) => values.every((v, i) => i === 0 || values[i - 1]! >= v)

describe("openai SDK", () => {
  it("completions logprobs: N: the N likeliest alternatives of the committing step, plus the chosen token", async () => {
    const completion = await client.completions.create({ model, prompt: "KING:", max_tokens: 8, seed: 1, logprobs: 3 })
    const logprobs = completion.choices[0]!.logprobs!
    expect(logprobs.tokens!.length).toBe(8)
    logprobs.top_logprobs!.forEach((top, i) => {
      const entries = Object.entries(top)
      // 3 alternatives (fewer only if two render to the same text), and the chosen token when not among them.
      expect(entries.length).toBeGreaterThanOrEqual(2)
      expect(entries.length).toBeLessThanOrEqual(4)
      expect(Object.keys(top)).toContain(logprobs.tokens![i])
      const alternatives = entries.slice(0, 3).map(([, lp]) => lp)
      expect(descending(alternatives)).toBe(true)
      for (const lp of alternatives) expect(lp).toBeLessThanOrEqual(0)
      // The chosen token's own logprob is the probability it was committed with.
      expect(top[logprobs.tokens![i]!]).toBe(logprobs.token_logprobs![i]!)
    })
    // Real alternatives: at least one position offers tokens besides the chosen one, with less weight.
    expect(logprobs.top_logprobs!.every((top) => Object.keys(top).length > 1)).toBe(true)

    // 20 is the most; 21 is refused.
    const twenty = await client.completions.create({ model, prompt: "KING:", max_tokens: 2, seed: 1, logprobs: 20 })
    expect(Object.keys(twenty.choices[0]!.logprobs!.top_logprobs![0]!).length).toBeGreaterThanOrEqual(15)
    const tooMany = await client.completions.create({ model, prompt: "KING:", max_tokens: 2, logprobs: 21 }).catch((e) => e)
    expect(tooMany).toBeInstanceOf(OpenAI.BadRequestError)
    expect(tooMany.param).toBe("logprobs")
  })

  it("chat logprobs with top_logprobs: N alternatives per token with logprobs and bytes, the same streamed", async () => {
    const request = {
      model,
      messages: [{ role: "user" as const, content: "Speak, my lord." }],
      max_tokens: 8,
      seed: 2,
      logprobs: true,
      top_logprobs: 4
    }
    const completion = await client.chat.completions.create(request)
    const content = completion.choices[0]!.logprobs!.content!
    expect(content.length).toBeGreaterThan(0)
    for (const entry of content) {
      expect(entry.top_logprobs).toHaveLength(4)
      expect(descending(entry.top_logprobs.map((t) => t.logprob))).toBe(true)
      expect(new Set(entry.top_logprobs.map((t) => t.token)).size).toBeGreaterThan(1)
      for (const top of entry.top_logprobs) {
        if (top.bytes !== null) expect(Buffer.from(top.bytes).toString("utf8")).toBe(top.token)
      }
      // The likeliest alternative is at least as likely as the token committed, which when it is among
      // them carries its own logprob.
      expect(entry.top_logprobs[0]!.logprob).toBeGreaterThanOrEqual(entry.logprob - 1e-4)
      const chosen = entry.top_logprobs.find((t) => t.token === entry.token)
      if (chosen !== undefined) expect(chosen.logprob).toBe(entry.logprob)
    }
    expect(content.map((e) => e.token).join("")).toBe(completion.choices[0]!.message.content)

    const stream = await client.chat.completions.create({ ...request, stream: true })
    const streamed: Array<OpenAI.ChatCompletionTokenLogprob> = []
    for await (const chunk of stream) streamed.push(...(chunk.choices[0]?.logprobs?.content ?? []))
    expect(streamed).toEqual(content)
  })

  it("auth errors by class: no key and a wrong key are AuthenticationError (401)", async () => {
    for (const key of ["sk-not-ours", "sk-clients-test-ke"]) {
      const intruder = new OpenAI({ apiKey: key, baseURL: server.url + "/v1", maxRetries: 0 })
      const denied = await intruder.chat.completions.create({ model, messages: [{ role: "user", content: "x" }] }).catch((e) => e)
      expect(denied).toBeInstanceOf(OpenAI.AuthenticationError)
      expect(denied.status).toBe(401)
      expect(denied.code).toBe("invalid_api_key")
      expect(denied.message).not.toContain(key)
    }
    const response = await fetch(server.url + "/v1/models")
    expect(response.status).toBe(401)
    expect(((await response.json()) as { error: { code: string } }).error.code).toBe("missing_api_key")
  })

  it("the developer role is a system message", async () => {
    const ask = (role: "developer" | "system" | "user") =>
      client.chat.completions.create({
        model,
        messages: [
          { role, content: "Thou art a herald of the king." },
          { role: "user", content: "What news?" }
        ],
        max_tokens: 10,
        seed: 5
      })
    const [developer, system, user] = await Promise.all([ask("developer"), ask("system"), ask("user")])
    expect(developer.choices[0]!.message.content).toBe(system.choices[0]!.message.content)
    expect(developer.usage).toEqual(system.usage)
    // The control: as a user message the same words make another prompt.
    expect(user.usage!.prompt_tokens).not.toBe(system.usage!.prompt_tokens)
  })

  it("responses: input and instructions answer as chat's system and user messages do", async () => {
    const response = await client.responses.create({
      model,
      instructions: "Thou art a herald of the king.",
      input: "What news?",
      max_output_tokens: 10,
      temperature: 0,
      seed: 6
    } as OpenAI.Responses.ResponseCreateParamsNonStreaming)
    const chat = await client.chat.completions.create({
      model,
      messages: [
        { role: "system", content: "Thou art a herald of the king." },
        { role: "user", content: "What news?" }
      ],
      max_tokens: 10,
      temperature: 0,
      seed: 6
    })
    expect(response.object).toBe("response")
    expect(response.id).toMatch(/^resp_/)
    expect(response.output_text).toBe(chat.choices[0]!.message.content)
    expect(response.status).toBe(chat.choices[0]!.finish_reason === "length" ? "incomplete" : "completed")
    expect(response.usage).toMatchObject({
      input_tokens: chat.usage!.prompt_tokens,
      output_tokens: chat.usage!.completion_tokens,
      total_tokens: chat.usage!.total_tokens
    })

    // A message list with content parts, streamed: the events in order, the deltas adding up.
    const request = {
      model,
      input: [
        { role: "developer" as const, content: "Thou art a herald of the king." },
        { role: "user" as const, content: [{ type: "input_text" as const, text: "What news?" }] }
      ],
      max_output_tokens: 10,
      seed: 6
    } as OpenAI.Responses.ResponseCreateParamsNonStreaming
    const whole = await client.responses.create(request)
    expect(whole.output_text).toBe(response.output_text)
    const stream = await client.responses.create({ ...request, stream: true })
    const types: Array<string> = []
    let text = ""
    let completed: OpenAI.Responses.Response | undefined
    for await (const event of stream) {
      types.push(event.type)
      if (event.type === "response.output_text.delta") text += event.delta
      if (event.type === "response.completed" || event.type === "response.incomplete") completed = event.response
    }
    expect(types.slice(0, 4)).toEqual([
      "response.created",
      "response.in_progress",
      "response.output_item.added",
      "response.content_part.added"
    ])
    expect(types.filter((t) => t === "response.output_text.delta").length).toBeGreaterThan(0)
    expect(types.slice(-4, -1)).toEqual(["response.output_text.done", "response.content_part.done", "response.output_item.done"])
    expect(["response.completed", "response.incomplete"]).toContain(types[types.length - 1])
    expect(text).toBe(whole.output_text)
    expect(
      completed!.output_text ??
        completed!.output
          .flatMap((o) => (o.type === "message" ? o.content : []))
          .map((c) => (c.type === "output_text" ? c.text : ""))
          .join("")
    ).toBe(whole.output_text)
  })

  it("responses: what needs stored state or built-in tools is a 400 naming the field", async () => {
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ previous_response_id: "resp_1" }, "previous_response_id"],
      [{ store: true }, "store"],
      [{ tools: [{ type: "web_search" }] }, "tools[0].type"],
      [{ tools: [{ type: "function", name: "f" }], tool_choice: "auto" }, "tool_choice"],
      [{ input: [{ type: "reasoning", summary: [] }] }, "input[0].type"],
      [{ text: { format: { type: "json_object" } } }, "text.format"],
      [{ include: ["file_search_call.results"] }, "include"]
    ]
    for (const [fields, param] of cases) {
      const refused = await client.responses.create({ model, input: "x", ...fields } as never).catch((e) => e)
      expect(refused, param).toBeInstanceOf(OpenAI.BadRequestError)
      expect(refused.param, param).toBe(param)
      expect(refused.message, param).toMatch(/not supported|this server runs no built-in tools/)
    }
    // store: false is what this server does anyway.
    const stored = await client.responses.create({ model, input: "x", store: false, max_output_tokens: 2 })
    expect((stored as unknown as { store: boolean }).store).toBe(false)
  })

  it("responses: include message.output_text.logprobs gives each token's logprob and alternatives, streamed alike", async () => {
    const request = {
      model,
      input: "Speak, my lord.",
      max_output_tokens: 8,
      seed: 3,
      include: ["message.output_text.logprobs" as const],
      top_logprobs: 3
    }
    const response = await client.responses.create(request)
    const message = response.output[0]!
    if (message.type !== "message" || message.content[0]!.type !== "output_text") throw new Error("no output text")
    const logprobs = message.content[0]!.logprobs!
    expect(logprobs).toHaveLength(response.usage!.output_tokens)
    expect(logprobs.map((l) => l.token).join("")).toBe(response.output_text)
    for (const entry of logprobs) {
      expect(entry.top_logprobs).toHaveLength(3)
      expect(descending(entry.top_logprobs.map((t) => t.logprob))).toBe(true)
    }
    const stream = await client.responses.create({ ...request, stream: true })
    const streamed: Array<unknown> = []
    for await (const event of stream) if (event.type === "response.output_text.delta") streamed.push(...event.logprobs)
    expect(streamed).toEqual(logprobs)
  })
})

describe("structured output (json_schema by template)", () => {
  const Herald = z.object({
    name: z.string(),
    news: z.string(),
    house: z.object({ seat: z.string(), liege: z.string() })
  })
  const messages = [{ role: "user" as const, content: "Who art thou, and what news?" }]
  const format = { type: "json_schema" as const, json_schema: { name: "herald", schema: z.toJSONSchema(Herald), strict: true } }
  /** Fewer denoising steps than masks (several tokens a step), to keep the test quick: the skeleton is what is checked. */
  const quick = { diffusion_steps: 12 } as Record<string, unknown>

  it("the reply parses with the schema, streamed or not; without response_format it does not", async () => {
    for (const seed of [1, 2]) {
      const completion = await client.chat.completions.create({ model, messages, seed, response_format: format, ...quick })
      const content = completion.choices[0]!.message.content!
      const parsed = Herald.parse(JSON.parse(content))
      expect(Object.keys(parsed)).toEqual(["name", "news", "house"])
      expect(completion.choices[0]!.finish_reason).toBe("stop")
      const stream = await client.chat.completions.create({ model, messages, seed, response_format: format, stream: true, ...quick })
      let streamed = ""
      let chunks = 0
      for await (const chunk of stream) {
        chunks++
        streamed += chunk.choices[0]?.delta.content ?? ""
      }
      expect(streamed).toBe(content)
      // The role, then the whole JSON once every slot is denoised: no empty chunks for the steps between.
      expect(chunks).toBe(2)
    }
    // The negative control: the same request as plain text is not JSON of this shape.
    const plain = await client.chat.completions.create({ model, messages, seed: 1, max_tokens: 40 })
    const valid = (() => {
      try {
        return Herald.safeParse(JSON.parse(plain.choices[0]!.message.content!)).success
      } catch {
        return false
      }
    })()
    expect(valid).toBe(false)
  })

  it("booleans and enums chosen, numbers written as digits, lists of strings: the reply parses with the schema", async () => {
    const Verdict = z.object({
      villain: z.boolean(),
      mood: z.enum(["merry", "sad", "wrathful"]),
      soldiers: z.number().int().nonnegative(),
      allies: z.array(z.string()).min(1).max(3),
      why: z.string()
    })
    const response_format = {
      type: "json_schema" as const,
      json_schema: { name: "verdict", schema: z.toJSONSchema(Verdict), strict: true }
    }
    for (const temperature of [0, 1.5]) {
      const completion = await client.chat.completions.create({ model, messages, seed: 3, temperature, response_format, ...quick })
      Verdict.parse(JSON.parse(completion.choices[0]!.message.content!))
    }
  })

  it("the SDK's parse helper (zodResponseFormat): nullable fields, literal unions, string lengths, a sub-object used twice, a tuple", async () => {
    const Place = z.object({ city: z.string().min(2), country: z.string().max(12) })
    const Plan = z.object({
      motto: z.string().min(4).max(20),
      home: Place,
      away: Place,
      note: z.string().nullable(),
      kind: z.union([z.literal("war"), z.literal("peace")]),
      sworn: z.boolean().nullable(),
      pair: z.tuple([z.string(), z.number().int()])
    })
    for (const temperature of [0, 1.5]) {
      const completion = await client.chat.completions.parse({
        model,
        messages,
        seed: 5,
        temperature,
        response_format: zodResponseFormat(Plan, "plan"),
        ...quick
      })
      const parsed = completion.choices[0]!.message.parsed!
      // The helper parsed it with the zod schema: every bound held, whatever the model wrote.
      expect(Plan.parse(parsed)).toEqual(parsed)
      expect(parsed.motto.length).toBeGreaterThanOrEqual(4)
      expect(typeof parsed.note).toBe("string")
    }
  })

  it("a Pydantic-style schema: definitions in $defs, fields that point at them, Optional fields", async () => {
    // What `Plan.model_json_schema()` gives for class Place(BaseModel): city: str; class Plan(BaseModel):
    // home: Place; away: Optional[Place] = None; mood: Literal["merry", "sad"]; note: Optional[str] = None.
    const schema = {
      $defs: {
        Place: { properties: { city: { title: "City", type: "string" } }, required: ["city"], title: "Place", type: "object" }
      },
      properties: {
        home: { $ref: "#/$defs/Place" },
        away: { anyOf: [{ $ref: "#/$defs/Place" }, { type: "null" }], default: null },
        mood: { enum: ["merry", "sad"], title: "Mood", type: "string" },
        note: { anyOf: [{ type: "string" }, { type: "null" }], default: null, title: "Note" }
      },
      required: ["home", "mood"],
      title: "Plan",
      type: "object"
    }
    const completion = await client.chat.completions.create({
      model,
      messages,
      seed: 6,
      response_format: { type: "json_schema", json_schema: { name: "plan", schema, strict: true } },
      ...quick
    })
    const Plan = z.object({
      home: z.object({ city: z.string() }).strict(),
      away: z.object({ city: z.string() }).strict().nullable(),
      mood: z.enum(["merry", "sad"]),
      note: z.string().nullable()
    })
    const parsed = Plan.strict().parse(JSON.parse(completion.choices[0]!.message.content!))
    expect(Object.keys(parsed)).toEqual(["home", "away", "mood", "note"])
  })

  it("max_tokens sizes the value slots; schemas a template cannot honour are refused with the reason", async () => {
    // The skeleton of this schema is 47 tokens of the embedded model's vocabulary; 4 values share the rest,
    // 3 tokens each.
    const small = await client.chat.completions.create({ model, messages, seed: 4, max_tokens: 59, response_format: format, ...quick })
    expect(small.usage!.completion_tokens).toBe(59)
    Herald.parse(JSON.parse(small.choices[0]!.message.content!))

    const refused = async (schema: unknown, reason: RegExp) => {
      const error = await client.chat.completions
        .create({
          model,
          messages,
          response_format: { type: "json_schema", json_schema: { name: "x", schema: schema as Record<string, unknown> } }
        })
        .catch((e) => e)
      expect(error).toBeInstanceOf(OpenAI.BadRequestError)
      expect(error.param).toBe("response_format.json_schema.schema")
      expect(error.message).toMatch(reason)
    }
    await refused(
      z.toJSONSchema(z.object({ age: z.number().multipleOf(5) })),
      /schema\.properties\.age\.multipleOf: multipleOf is not supported/
    )
    await refused(z.toJSONSchema(z.object({ tags: z.array(z.string()) })), /an array needs maxItems/)
    await refused(z.toJSONSchema(z.object({ id: z.string().regex(/^[a-z]+$/) })), /pattern is not supported/)
    await refused(z.toJSONSchema(z.object({ at: z.iso.date() })), /format is not supported/)
    await refused(z.toJSONSchema(z.object({ id: z.union([z.string(), z.number()]) })), /anyOf of 2 shapes is not supported/)
    await refused(z.toJSONSchema(z.string()), /must be an object with known keys/)
    await refused({ type: "object" }, /needs its keys in `properties`/)
    const jsonObject = await client.chat.completions.create({ model, messages, response_format: { type: "json_object" } }).catch((e) => e)
    expect(jsonObject).toBeInstanceOf(OpenAI.BadRequestError)
    expect(jsonObject.message).toMatch(/keys of the object are not known/)
    const tooShort = await client.chat.completions.create({ model, messages, max_tokens: 10, response_format: format }).catch((e) => e)
    expect(tooShort).toBeInstanceOf(OpenAI.BadRequestError)
    expect(tooShort.message).toMatch(/leaves no room for the values/)
  })
})

describe("tool calls (tool_choice names the function; the call is laid on the canvas)", () => {
  const Place = z.object({ city: z.string(), reason: z.string() })
  const messages = [{ role: "user" as const, content: "Where art thou bound?" }]
  const tools = [
    {
      type: "function" as const,
      function: { name: "get_place", description: "Where one is bound", parameters: z.toJSONSchema(Place) as Record<string, unknown> }
    }
  ]
  const quick = { diffusion_steps: 8 } as Record<string, unknown>

  it("openai SDK: the call's arguments parse with the schema, streamed (the SDK's stream helper) or not", async () => {
    const tool_choice = { type: "function" as const, function: { name: "get_place" } }
    const completion = await client.chat.completions.create({ model, messages, tools, tool_choice, seed: 2, ...quick })
    const message = completion.choices[0]!.message
    expect(message.content).toBeNull()
    const call = message.tool_calls![0]!
    if (call.type !== "function") throw new Error("expected a function call")
    expect(call.function.name).toBe("get_place")
    Place.parse(JSON.parse(call.function.arguments))
    const stream = client.chat.completions.stream({ model, messages, tools, tool_choice, seed: 2, ...quick })
    const streamed = (await stream.finalChatCompletion()).choices[0]!.message
    const streamedCall = streamed.tool_calls![0]!
    if (streamedCall.type !== "function") throw new Error("expected a function call")
    expect(streamedCall.function).toEqual(call.function)
  })

  it("openai SDK, Responses API: a function_call output item, streamed alike; the call and its output go back as input items", async () => {
    const responseTools = [{ type: "function" as const, name: "get_place", parameters: tools[0]!.function.parameters, strict: true }]
    const tool_choice = { type: "function" as const, name: "get_place" }
    const seeded = { seed: 2, ...quick }
    const response = await client.responses.create({ model, input: "Where art thou bound?", tools: responseTools, tool_choice, ...seeded })
    expect(response.status).toBe("completed")
    const [item] = response.output
    if (item?.type !== "function_call") throw new Error(`expected a function_call item, got ${item?.type}`)
    expect(item.name).toBe("get_place")
    expect(item.call_id).toMatch(/^call_/)
    Place.parse(JSON.parse(item.arguments))
    const events: Array<string> = []
    let streamedArguments = ""
    const stream = await client.responses.create({
      model,
      input: "Where art thou bound?",
      tools: responseTools,
      tool_choice,
      stream: true,
      ...seeded
    })
    for await (const event of stream) {
      events.push(event.type)
      if (event.type === "response.function_call_arguments.done") streamedArguments = event.arguments
    }
    expect(events).toEqual([
      "response.created",
      "response.in_progress",
      "response.output_item.added",
      "response.function_call_arguments.delta",
      "response.function_call_arguments.done",
      "response.output_item.done",
      "response.completed"
    ])
    expect(streamedArguments).toBe(item.arguments)
    const followUp = await client.responses.create({
      model,
      input: [
        { role: "user", content: "Where art thou bound?" },
        { type: "function_call", call_id: item.call_id, name: item.name, arguments: item.arguments },
        { type: "function_call_output", call_id: item.call_id, output: "To Verona" }
      ],
      tools: responseTools,
      max_output_tokens: 4
    })
    expect(followUp.output[0]!.type).toBe("message")
  })

  it("Vercel AI SDK, through chat completions and through the Responses API (the default provider): a required tool's call", async () => {
    const compatible = createOpenAICompatible({ name: "vdiff", baseURL: server.url + "/v1", apiKey })
    const openai = createOpenAI({ baseURL: server.url + "/v1", apiKey })
    for (const languageModel of [compatible.chatModel(model), openai(model)]) {
      const result = await generateText({
        model: languageModel,
        prompt: "Where art thou bound?",
        seed: 3,
        tools: { get_place: tool({ description: "Where one is bound", inputSchema: Place }) },
        toolChoice: { type: "tool", toolName: "get_place" }
      })
      expect(result.toolCalls).toHaveLength(1)
      expect(result.toolCalls[0]!.toolName).toBe("get_place")
      Place.parse(result.toolCalls[0]!.input)
    }
  })

  it("LangChain: bindTools with tool_choice gives the call's args", async () => {
    const chat = new ChatOpenAI({ model, apiKey, configuration: { baseURL: server.url + "/v1" }, maxRetries: 0 })
    const bound = chat.bindTools([{ type: "function", function: tools[0]!.function }], { tool_choice: "get_place" })
    const reply = await bound.invoke([["human", "Where art thou bound?"]], { seed: 4 } as Record<string, unknown>)
    const calls = (reply as unknown as { tool_calls: Array<{ name: string; args: unknown }> }).tool_calls
    expect(calls).toHaveLength(1)
    expect(calls[0]!.name).toBe("get_place")
    Place.parse(calls[0]!.args)
    // tool_choice "any" (OpenAI's "required") with two tools: the model picks the function.
    const Hour = z.object({ hour: z.number().int().min(0).max(23) })
    const hour = { type: "function" as const, function: { name: "get_hour", parameters: z.toJSONSchema(Hour) as Record<string, unknown> } }
    const either = chat.bindTools([{ type: "function", function: tools[0]!.function }, hour], { tool_choice: "any" })
    const picked = (await either.invoke([["human", "What hour is it?"]], { seed: 5 } as Record<string, unknown>)) as unknown as {
      tool_calls: Array<{ name: string; args: unknown }>
    }
    expect(picked.tool_calls).toHaveLength(1)
    const [made] = picked.tool_calls
    if (made!.name === "get_hour") Hour.parse(made!.args)
    else Place.parse(made!.args)
  })
})

describe("Vercel AI SDK", () => {
  it("@ai-sdk/openai-compatible: generateText and streamText agree", async () => {
    const provider = createOpenAICompatible({ name: "vdiff", baseURL: server.url + "/v1", apiKey, includeUsage: true })
    const settings = {
      model: provider.chatModel(model),
      prompt: "What news?",
      system: "Thou art a herald.",
      maxOutputTokens: 10,
      seed: 7,
      temperature: 0
    }
    const generated = await generateText(settings)
    expect(generated.text.length).toBeGreaterThan(0)
    expect(["stop", "length"]).toContain(generated.finishReason)
    expect(generated.usage.outputTokens).toBeGreaterThan(0)
    const streamed = streamText(settings)
    let text = ""
    for await (const delta of streamed.textStream) text += delta
    expect(text).toBe(generated.text)
    expect((await streamed.usage).outputTokens).toBe(generated.usage.outputTokens)
  })

  it("@ai-sdk/openai-compatible with structured outputs: the object validates against the zod schema", async () => {
    const provider = createOpenAICompatible({ name: "vdiff", baseURL: server.url + "/v1", apiKey, supportsStructuredOutputs: true })
    const schema = z.object({ name: z.string(), news: z.string() })
    const result = await generateText({
      model: provider.chatModel(model),
      prompt: "Who art thou?",
      seed: 8,
      output: Output.object({ schema })
    })
    expect(schema.parse(result.output)).toEqual(result.output)
  })

  it("@ai-sdk/openai's default provider: an object by the Responses API's text.format validates against the zod schema", async () => {
    const openai = createOpenAI({ baseURL: server.url + "/v1", apiKey })
    const schema = z.object({ name: z.string(), news: z.string() })
    const result = await generateText({
      model: openai(model),
      prompt: "Who art thou?",
      output: Output.object({ schema }),
      providerOptions: { openai: { strictJsonSchema: true } }
    })
    expect(schema.parse(result.output)).toEqual(result.output)
    expect(result.finishReason).toBe("stop")
  })

  it("@ai-sdk/openai's default provider (the Responses API): generateText and streamText agree", async () => {
    const openai = createOpenAI({ baseURL: server.url + "/v1", apiKey })
    const settings = {
      model: openai(model),
      prompt: "What news?",
      system: "Thou art a herald.",
      maxOutputTokens: 10,
      seed: 7,
      temperature: 0
    }
    const generated = await generateText(settings)
    expect(generated.text.length).toBeGreaterThan(0)
    expect(generated.response.id).toMatch(/^resp_/)
    expect(generated.usage.outputTokens).toBeGreaterThan(0)
    const streamed = streamText(settings)
    let text = ""
    for await (const delta of streamed.textStream) text += delta
    expect(text).toBe(generated.text)
    expect(await streamed.finishReason).toBe(generated.finishReason)
  })
})

describe("LangChain ChatOpenAI", () => {
  it("invoke and stream agree", async () => {
    const chat = new ChatOpenAI({
      model,
      apiKey,
      configuration: { baseURL: server.url + "/v1" },
      maxTokens: 10,
      temperature: 0,
      maxRetries: 0
    })
    const messages: Array<[string, string]> = [
      ["system", "Thou art a herald."],
      ["human", "What news?"]
    ]
    const reply = await chat.invoke(messages, { seed: 9 })
    expect(typeof reply.content).toBe("string")
    expect((reply.content as string).length).toBeGreaterThan(0)
    // (The message type's fields resolve to `never` across the zod versions installed; read it plainly.)
    const usage = (reply as unknown as { usage_metadata?: { output_tokens: number } }).usage_metadata
    expect(usage?.output_tokens).toBeGreaterThan(0)
    let streamed = ""
    for await (const chunk of await chat.stream(messages, { seed: 9 })) streamed += chunk.content as string
    expect(streamed).toBe(reply.content)
  })
})
