/**
 * Enums and booleans in a JSON template (src/openai/chains.ts, structured.ts), over the fake engine: the
 * canvases that score every value in its place (the skeleton in place, every written position masked, the
 * chain rule over the value's tokens and the pad after them), the value picked from the fake model's scores,
 * the template the engine then denoises around it, logprobs from the scores, and the answers that need no
 * denoising at all.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { isRefusal, layOut, skeletonOf } from "../src/openai/structured.js"
import { parseSse, startServer, type TestServer } from "./openai-support.js"

let server: TestServer
beforeAll(async () => {
  server = await startServer()
})
afterAll(() => server.close())

/** The fake model's log-probability of `target` at canvas position `position`: -|target - expected| / 10. */
const fakeScore = (canvas: ReadonlyArray<number>, position: number, target: number) =>
  -Math.abs(target - ((canvas[0]! + position) % 1000)) / 10

const messages = [{ role: "user", content: "Say hello" }]
const format = (schema: unknown) => ({ type: "json_schema", json_schema: { name: "x", schema } })
const schema = {
  type: "object",
  properties: { ok: { type: "boolean" }, mood: { type: "string", enum: ["Hello", "night", "Good night"] }, why: { type: "string" } }
}

const post = async (body: Record<string, unknown>) => {
  const response = await server.post("/v1/chat/completions", { messages, ...body })
  expect(response.status).toBe(200)
  return (await response.json()) as any
}

/** The template as the request lays it out (8 tokens a string value), with its choices. */
const laidOut = (given: unknown) => {
  const skeleton = skeletonOf(given)
  if (isRefusal(skeleton)) throw new Error(skeleton.message)
  return layOut(skeleton, 8, server.tokenizer)
}

describe("a template's enums and booleans", () => {
  it("are scored in place by the chain rule (pad included), the likeliest taken at temperature 0, the rest denoised around it", async () => {
    const scoredBefore = server.engine.scored.length
    const body = await post({ response_format: format(schema), temperature: 0, logprobs: true })
    const prompt = server.engine.created.at(-1)!.prompt
    const laid = laidOut(schema)
    const mask = server.tokenizer.specialTokens.mask
    const base = laid.template.map((t) => (t === -1 ? mask : t))
    // One scoring job: per choice, per value, a canvas per token and one for the pad.
    const expected = laid.choices.flatMap(({ start, values }) =>
      values.flatMap(({ tokens }) =>
        Array.from({ length: tokens.length + 1 }, (_, k) => ({
          canvas: [...prompt, ...base.slice(0, start), ...tokens.slice(0, k), ...base.slice(start + k)],
          positions: [prompt.length + start + k],
          targets: [k < tokens.length ? tokens[k]! : laid.pad]
        }))
      )
    )
    expect(server.engine.scored.slice(scoredBefore).flat()).toEqual(expected)
    // The picks: each choice's value with the highest chain.
    const picks = laid.choices.map(({ start, values }) => {
      const totals = values.map(({ tokens }) =>
        [...tokens, laid.pad].reduce((sum, token, k) => sum + fakeScore(prompt, prompt.length + start + k, token), 0)
      )
      return totals.indexOf(Math.max(...totals))
    })
    const content = JSON.parse(body.choices[0].message.content)
    expect(content.ok).toBe([true, false][picks[0]!])
    expect(content.mood).toBe(["Hello", "night", "Good night"][picks[1]!])
    expect(typeof content.why).toBe("string")
    // The engine denoised the string value around the picks: the template it got has them in place.
    const filled = [...laid.template]
    laid.choices.forEach(({ start, width, values }, c) => {
      const { tokens } = values[picks[c]!]!
      for (let k = 0; k < width; k++) filled[start + k] = k < tokens.length ? tokens[k]! : laid.pad
    })
    expect(server.engine.created.at(-1)!.template).toEqual(filled)
    // Logprobs of a picked value's tokens and its first pad are the scores; later pads are filler (0).
    const logprobs = body.choices[0].logprobs.content.map((t: { logprob: number }) => t.logprob)
    const { start, values } = laid.choices[1]!
    const { tokens } = values[picks[1]!]!
    ;[...tokens, laid.pad].forEach((token, k) =>
      expect(logprobs[start + k]).toBeCloseTo(fakeScore(prompt, prompt.length + start + k, token), 5)
    )
    for (let k = tokens.length + 1; k < laid.choices[1]!.width; k++) expect(logprobs[start + k]).toBe(0)
    // Forward passes: the scoring's canvases, then one a step for the 8 positions of "why".
    expect(body.diffusion.forward_passes).toBe(expected.length + 8)
    expect(body.diffusion.steps).toBe(8)
    expect(body.choices[0].finish_reason).toBe("stop")
  })

  it("an answer with only choices is settled by the scoring alone: no sequence, no step", async () => {
    const only = { type: "object", properties: { ok: { type: "boolean" }, n: { enum: [1, 2, 3] } } }
    const created = server.engine.created.length
    const scored = server.engine.scored.length
    const body = await post({ response_format: format(only), temperature: 0 })
    expect(server.engine.created.length).toBe(created)
    expect(Object.keys(JSON.parse(body.choices[0].message.content))).toEqual(["ok", "n"])
    expect(body.diffusion.steps).toBe(0)
    // (The scheduler scores in forwards no larger than a step's batch: 8 canvases here.)
    expect(body.diffusion.forward_passes).toBe(server.engine.scored.slice(scored).flat().length)
    expect(body.diffusion.forward_passes).toBe(
      laidOut(only).choices.reduce((sum, c) => sum + c.values.reduce((n, v) => n + v.tokens.length + 1, 0), 0)
    )
    expect(body.choices[0].finish_reason).toBe("stop")
  })

  it("n answers with a temperature draw their own values (seed + index) and are denoised as their own sequences", async () => {
    const created = server.engine.created.length
    const body = await post({ response_format: format(schema), temperature: 1, n: 3, seed: 11 })
    expect(body.choices).toHaveLength(3)
    const sequences = server.engine.created.slice(created)
    expect(sequences.map((s) => s.settings.seed)).toEqual([11, 12, 13])
    for (const [i, choice] of body.choices.entries()) {
      const content = JSON.parse(choice.message.content)
      expect(typeof content.ok).toBe("boolean")
      expect(["Hello", "night", "Good night"]).toContain(content.mood)
      // Each sequence's template holds its own answer's picks.
      const template = sequences[i]!.template!
      const laid = laidOut(schema)
      const okRegion = template.slice(laid.choices[0]!.start, laid.choices[0]!.start + laid.choices[0]!.width)
      expect(server.tokenizer.decode(okRegion).trim()).toBe(String(content.ok))
    }
  })

  it("streams the JSON whole in the last chunk, as the unstreamed answer", async () => {
    const whole = await post({ response_format: format(schema), temperature: 0, seed: 2 })
    const response = await server.post("/v1/chat/completions", {
      messages,
      response_format: format(schema),
      temperature: 0,
      seed: 2,
      stream: true
    })
    const events = parseSse(await response.text()).slice(0, -1) as Array<any>
    expect(events).toHaveLength(2)
    expect(events[1].choices[0].delta.content).toBe(whole.choices[0].message.content)
  })

  it("a tool call's enum argument is chosen the same way", async () => {
    const tools = [
      {
        type: "function",
        function: {
          name: "weather",
          parameters: {
            type: "object",
            properties: { city: { type: "string" }, unit: { type: "string", enum: ["celsius", "fahrenheit"] } }
          }
        }
      }
    ]
    const body = await post({ tools, tool_choice: "required", temperature: 0 })
    const args = JSON.parse(body.choices[0].message.tool_calls[0].function.arguments)
    expect(["celsius", "fahrenheit"]).toContain(args.unit)
    expect(typeof args.city).toBe("string")
  })
})

describe("vLLM's guided_json and structured_outputs.json on chat", () => {
  const simple = { type: "object", properties: { who: { type: "string" }, ok: { type: "boolean" } } }

  it("lay the same template as response_format json_schema, the schema given as an object or as its JSON text", async () => {
    const templates: Array<ReadonlyArray<number> | undefined> = []
    for (const fields of [
      { response_format: format(simple) },
      { guided_json: simple },
      { guided_json: JSON.stringify(simple) },
      { structured_outputs: { json: simple } }
    ]) {
      const body = await post({ ...fields, temperature: 0, seed: 4 })
      expect(Object.keys(JSON.parse(body.choices[0].message.content))).toEqual(["who", "ok"])
      templates.push(server.engine.created.at(-1)!.template)
    }
    for (const template of templates) expect(template).toEqual(templates[0])
  })

  it("refuse a schema given twice, one that is not JSON, one a template cannot honour (naming where), and on completions", async () => {
    const refused = async (body: Record<string, unknown>, path = "/v1/chat/completions") => {
      const response = await server.post(path, path === "/v1/completions" ? { prompt: "Hi", ...body } : { messages, ...body })
      expect(response.status).toBe(400)
      return ((await response.json()) as { error: { message: string; param: string } }).error
    }
    expect(await refused({ guided_json: simple, response_format: format(simple) })).toMatchObject({
      param: "guided_json",
      message: expect.stringMatching(/give the answer's format once: response_format and guided_json/)
    })
    expect((await refused({ guided_json: "{not json" })).param).toBe("guided_json")
    expect(await refused({ guided_json: { type: "object", properties: { n: { type: "string", format: "date" } } } })).toMatchObject({
      param: "guided_json",
      message: expect.stringMatching(/at guided_json\.properties\.n/)
    })
    expect((await refused({ structured_outputs: { json: { type: "string" } } })).param).toBe("structured_outputs.json")
  })
})

describe("structured output on completions", () => {
  const simple = { type: "object", properties: { who: { type: "string" }, ok: { type: "boolean" } } }
  const complete = async (body: Record<string, unknown>) => {
    const response = await server.post("/v1/completions", { prompt: "KING:", temperature: 0, seed: 4, ...body })
    expect(response.status).toBe(200)
    return response
  }

  it("lays the schema out after each prompt, as chat does after the conversation: every prompt's every answer parses", async () => {
    const chat = await post({ guided_json: simple, temperature: 0, seed: 4 })
    const chatTemplate = server.engine.created.at(-1)!.template
    for (const fields of [
      { response_format: format(simple) },
      { guided_json: JSON.stringify(simple) },
      { structured_outputs: { json: simple } }
    ]) {
      const before = server.engine.created.length
      const body = (await (await complete({ ...fields, prompt: ["KING:", "QUEEN:"], n: 2 })).json()) as any
      expect(body.choices).toHaveLength(4)
      for (const choice of body.choices) {
        expect(Object.keys(JSON.parse(choice.text))).toEqual(["who", "ok"])
        expect(choice.finish_reason).toBe("stop")
      }
      // The same skeleton as chat's, laid out for each prompt.
      const created = server.engine.created.slice(before)
      expect(created.length).toBeGreaterThanOrEqual(2)
      for (const sequence of created) expect(sequence.template).toEqual(chatTemplate)
      expect(body.usage.completion_tokens).toBe(4 * chatTemplate!.length)
    }
    expect(Object.keys(JSON.parse(chat.choices[0].message.content))).toEqual(["who", "ok"])
  })

  it("echo puts the prompt before the JSON; a stream carries the JSON whole in the choice's last chunk", async () => {
    const whole = (await (await complete({ guided_json: simple })).json()) as any
    const echoed = (await (await complete({ guided_json: simple, echo: true })).json()) as any
    expect(echoed.choices[0].text).toBe(`KING:${whole.choices[0].text}`)
    const events = parseSse(await (await complete({ guided_json: simple, stream: true })).text()).slice(0, -1) as Array<any>
    expect(events).toHaveLength(1)
    expect(events[0].choices[0].text).toBe(whole.choices[0].text)
  })

  it("refuses a schema given twice, one a template cannot honour, and a schema with guided_choice", async () => {
    const refused = async (body: Record<string, unknown>) => {
      const response = await server.post("/v1/completions", { prompt: "Hi", ...body })
      expect(response.status).toBe(400)
      return ((await response.json()) as { error: { message: string; param: string } }).error
    }
    expect((await refused({ guided_json: simple, response_format: format(simple) })).param).toBe("guided_json")
    expect((await refused({ guided_json: { type: "object", properties: { n: { type: "string", pattern: "x" } } } })).message).toMatch(
      /at guided_json\.properties\.n\.pattern/
    )
    expect(await refused({ guided_json: simple, guided_choice: ["a", "b"] })).toMatchObject({
      param: "guided_json",
      message: expect.stringMatching(/does not apply with guided_choice/)
    })
  })
})
