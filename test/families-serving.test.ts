/**
 * End to end through a live `vdiff serve` for each family other than LLaDA: tiny random models written by
 * `vdiff make-model --preset llada2-tiny | sdar-tiny | sdar-moe-tiny | dream-tiny` into a temporary
 * directory, served by the real CLI and native engine. Block families: Completions, chat (the model's own chat template), streaming (the
 * streamed text adds up to the non-streamed one; snapshots mark the phase and, with LLaDA2.1 editing,
 * the provisional tokens), n > 1 (each answer is the one its seed gives alone), the usage's block
 * statistics, the cached path equal to full recompute, structured output and tool calls laid on the
 * canvas (Dream's too), the metrics, and the 400s that name a setting the model cannot honour.
 */
import { execFile } from "node:child_process"
import { mkdtemp, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { promisify } from "node:util"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { loadAddon } from "../src/engine/native.js"
import { repoRoot, type ServeProcess, startServe } from "./stress/serve.js"

const run = promisify(execFile)

interface Family {
  readonly preset: string
  readonly name: string
  readonly blockLength: number
  readonly editing: boolean
  /** A one-message conversation ("Speak.") as the model's own chat template renders it. */
  readonly chat: string
}

const families: ReadonlyArray<Family> = [
  {
    preset: "llada2-tiny",
    name: "llada2_moe",
    blockLength: 32,
    editing: true,
    chat: "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Speak.<|role_end|><role>ASSISTANT</role>"
  },
  {
    preset: "sdar-tiny",
    name: "sdar",
    blockLength: 4,
    editing: false,
    chat: "<|im_start|>user\nSpeak.<|im_end|>\n<|im_start|>assistant\n"
  },
  {
    preset: "sdar-moe-tiny",
    name: "sdar_moe",
    blockLength: 4,
    editing: false,
    chat: "<|im_start|>user\nSpeak.<|im_end|>\n<|im_start|>assistant\n"
  }
]

const prompt = "ROMEO:\nBut soft, what light"

interface Choice {
  readonly index: number
  readonly text?: string
  readonly message?: { readonly content: string }
  readonly finish_reason: string
  readonly token_ids?: ReadonlyArray<number>
  readonly prompt_token_ids?: ReadonlyArray<number>
}

interface Diffusion {
  readonly steps: number
  readonly forward_passes: number
  readonly decoding?: string
  readonly block_length?: number
  readonly forwards?: { readonly prefill: number; readonly denoise: number; readonly commit: number }
  readonly tokens_per_forward?: number
  readonly kv_cache: string
  readonly parallel: unknown
  readonly editing?: unknown
}

interface Completion {
  readonly choices: ReadonlyArray<Choice>
  readonly usage: {
    readonly prompt_tokens: number
    readonly completion_tokens: number
    readonly prompt_tokens_details: { readonly cached_tokens: number }
  }
  readonly diffusion: Diffusion
}

/**
 * ignore_eos fills the answer with text; min_tokens keeps the request's stop tokens off the first positions
 * too: a token the answer starts with, given as a stop token, is nowhere in the first 12 positions.
 */
const barsEndAndStopTokens = async (complete: (body: Record<string, unknown>) => Promise<Completion>) => {
  const filled = await complete({ max_tokens: 12, ignore_eos: true, return_token_ids: true })
  expect(filled.choices[0]!.finish_reason).toBe("length")
  expect(filled.choices[0]!.token_ids).toHaveLength(12)
  const first = filled.choices[0]!.token_ids![0]!
  const barred = await complete({ max_tokens: 12, ignore_eos: true, min_tokens: 12, stop_token_ids: [first], return_token_ids: true })
  expect(barred.choices[0]!.finish_reason).toBe("length")
  expect(barred.choices[0]!.token_ids).toHaveLength(12)
  expect(barred.choices[0]!.token_ids).not.toContain(first)
}

let dir: string

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "vdiff-families-"))
})
afterAll(async () => {
  if (dir !== undefined) await rm(dir, { recursive: true, force: true })
})

describe.each(families)("serving $preset ($name)", (family) => {
  let server: ServeProcess
  const post = async (path: string, body: unknown) =>
    fetch(server.url + path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) })
  const complete = async (body: Record<string, unknown>): Promise<Completion> => {
    const response = await post("/v1/completions", { prompt, max_tokens: 12, ...body })
    expect(response.status, await response.clone().text()).toBe(200)
    return (await response.json()) as Completion
  }
  const refused = async (body: Record<string, unknown>, path = "/v1/completions") => {
    const response = await post(path, { prompt, max_tokens: 8, ...body })
    expect(response.status).toBe(400)
    return ((await response.json()) as { error: { param: string; message: string; type: string } }).error
  }

  beforeAll(async () => {
    const out = join(dir, family.preset)
    await run(process.execPath, ["--import", "tsx", "src/main.ts", "make-model", "--preset", family.preset, "--seed", "3", "--out", out], {
      cwd: repoRoot
    })
    server = await startServe({ model: out, flags: ["--max-tokens", "16", "--served-model-name", family.preset] })
  }, 120_000)
  afterAll(async () => {
    await server?.stop()
  })

  it("names the family in /v1/models and /v1/engine/stats", async () => {
    const models = (await (await fetch(`${server.url}/v1/models`)).json()) as { data: Array<Record<string, unknown>> }
    expect(models.data).toHaveLength(1)
    expect(models.data[0]).toMatchObject({
      id: family.preset,
      family: { name: family.name, decoding: "block", block_length: family.blockLength, editing: family.editing }
    })
    const stats = (await (await fetch(`${server.url}/v1/engine/stats`)).json()) as { engine: Record<string, unknown> }
    expect(stats.engine["family"]).toEqual(models.data[0]!["family"])
  })

  it("completes a prompt with block decoding: the family's defaults, forwards by phase, the same answer every time at temperature 0", async () => {
    // Long enough for two blocks or more, so that a finished block is committed and cached.
    const first = await complete({ max_tokens: 2 * family.blockLength + 4, return_token_ids: true })
    expect(first.choices).toHaveLength(1)
    const [choice] = first.choices
    expect(["stop", "length"]).toContain(choice!.finish_reason)
    expect(first.usage.completion_tokens).toBe(choice!.token_ids!.length)
    expect(first.usage.completion_tokens).toBeLessThanOrEqual(2 * family.blockLength + 4)
    const d = first.diffusion
    expect(d).toMatchObject({ decoding: "block", block_length: family.blockLength, kv_cache: "prefix", parallel: { threshold: 0.95 } })
    // One forward per step: prefill of the prompt's whole blocks (the prompt is longer than a block of
    // SDAR's, shorter than LLaDA2's), denoise steps, one commit per finished block but the last.
    expect(d.forwards!.prefill + d.forwards!.denoise + d.forwards!.commit).toBe(d.forward_passes)
    expect(d.forwards!.prefill).toBe(choice!.prompt_token_ids!.length >= family.blockLength ? 1 : 0)
    expect(d.forwards!.denoise).toBeGreaterThan(0)
    expect(d.tokens_per_forward).toBeGreaterThan(0)
    expect(d.editing).toBeNull()
    const again = await complete({ max_tokens: 2 * family.blockLength + 4, return_token_ids: true })
    expect(again.choices[0]!.token_ids).toEqual(choice!.token_ids)
  })

  it("honours ignore_eos and min_tokens by position", () => barsEndAndStopTokens(complete))

  it("gives the same tokens with the exact block cache as with full recompute", async () => {
    for (const body of [{ parallel_threshold: 0 }, { diffusion_steps: 2 }, {}]) {
      const cached = await complete({ ...body, max_tokens: 16, return_token_ids: true })
      const recomputed = await complete({ ...body, max_tokens: 16, return_token_ids: true, kv_cache: "none" })
      expect(recomputed.diffusion.kv_cache).toBe("none")
      expect(recomputed.diffusion.forwards!.prefill + recomputed.diffusion.forwards!.commit).toBe(0)
      expect(recomputed.choices[0]!.token_ids, JSON.stringify(body)).toEqual(cached.choices[0]!.token_ids)
    }
  })

  it("keeps whole prompt blocks across requests: a prompt that starts with them copies them, with the same answer", async () => {
    const speech = "KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    const body = { prompt: speech + speech, max_tokens: 12, return_token_ids: true }
    const first = await complete(body)
    const promptIds = first.choices[0]!.prompt_token_ids!
    const whole = Math.floor(promptIds.length / family.blockLength) * family.blockLength
    expect(whole).toBeGreaterThan(0)
    expect(first.usage.prompt_tokens_details).toEqual({ cached_tokens: 0 })
    expect(first.diffusion.forwards!.prefill).toBe(1)
    // The same prompt again: its whole blocks are copied, no prefill, the same answer.
    const second = await complete(body)
    expect(second.usage.prompt_tokens_details).toEqual({ cached_tokens: whole })
    expect(second.diffusion.forwards!.prefill).toBe(0)
    expect(second.choices[0]!.token_ids).toEqual(first.choices[0]!.token_ids)
    // The next turn (token ids: the prompt, its answer, more): at least the prompt's blocks are copied, and
    // the answer is the one full recompute gives (kv_cache none looks nothing up).
    const next = [...promptIds, ...first.choices[0]!.token_ids!, ...promptIds.slice(1, 6)]
    const turn = await complete({ prompt: next, max_tokens: 8, return_token_ids: true })
    const recomputed = await complete({ prompt: next, max_tokens: 8, return_token_ids: true, kv_cache: "none" })
    expect(turn.usage.prompt_tokens_details.cached_tokens).toBeGreaterThanOrEqual(whole)
    expect(turn.usage.prompt_tokens_details.cached_tokens % family.blockLength).toBe(0)
    expect(recomputed.usage.prompt_tokens_details.cached_tokens).toBe(0)
    expect(turn.choices[0]!.token_ids).toEqual(recomputed.choices[0]!.token_ids)
    // n = 3 on a new prompt: one answer prefills it, the two others wait a step and copy it; each answer is
    // the one its seed gives alone.
    const metricsText = async () => (await fetch(`${server.url}/metrics`)).text()
    const counterIn = (text: string, name: string) =>
      Number(
        text
          .split("\n")
          .find((l) => l.startsWith(name))!
          .split(" ")
          .pop()
      )
    const hitsBefore = counterIn(await metricsText(), "vdiff_prefix_cache_hits_total")
    const fresh = `QUEEN MARGARET:\n${speech}${speech}`
    const shared = await complete({ ...body, prompt: fresh, n: 3, temperature: 0.8, seed: 21 })
    expect(shared.diffusion.forwards!.prefill).toBe(1)
    expect(shared.usage.prompt_tokens_details.cached_tokens).toBe(0)
    // The two that waited copied the prompt's whole blocks, and the metric counts their copies.
    const freshWhole = Math.floor(shared.choices[0]!.prompt_token_ids!.length / family.blockLength) * family.blockLength
    expect(counterIn(await metricsText(), "vdiff_prefix_cache_hits_total") - hitsBefore).toBe(2 * freshWhole)
    const alone = await complete({ ...body, prompt: fresh, temperature: 0.8, seed: 22 })
    expect(shared.choices[1]!.token_ids).toEqual(alone.choices[0]!.token_ids)
    const stats = (await (await fetch(`${server.url}/v1/engine/stats`)).json()) as { engine: { prefix_cache: Record<string, number> } }
    expect(stats.engine.prefix_cache).toMatchObject({ capacity_bytes: 536870912, evictions: 0 })
    expect(stats.engine.prefix_cache["hits"]).toBeGreaterThanOrEqual(2)
    expect(stats.engine.prefix_cache["entries"]).toBeGreaterThan(0)
    const metrics = await (await fetch(`${server.url}/metrics`)).text()
    const counter = (name: string) =>
      Number(
        metrics
          .split("\n")
          .find((l) => l.startsWith(name))!
          .split(" ")
          .pop()
      )
    expect(counter("vdiff_prefix_cache_hits_total")).toBeGreaterThanOrEqual(2 * whole)
    expect(counter("vdiff_prefix_cache_queries_total")).toBeGreaterThan(counter("vdiff_prefix_cache_hits_total"))
  })

  it("chats with the model's own chat template", async () => {
    const response = await post("/v1/chat/completions", {
      messages: [{ role: "user", content: "Speak." }],
      max_tokens: 8,
      return_token_ids: true
    })
    expect(response.status).toBe(200)
    const chat = (await response.json()) as Completion
    expect(chat.choices[0]!.message!.content).toEqual(expect.any(String))
    const rendered = (await (await post("/detokenize", { tokens: chat.choices[0]!.prompt_token_ids })).json()) as { prompt: string }
    expect(rendered.prompt).toBe(family.chat)
    expect(chat.diffusion.decoding).toBe("block")
  })

  it("lays structured output and a tool call on the canvas: the answer parses, the exact cache as full recompute", async () => {
    const schema = {
      type: "object",
      properties: { name: { type: "string", maxLength: 12 }, mood: { enum: ["merry", "sad"] }, men: { type: "integer", maximum: 999 } }
    }
    const chatFor = async (body: Record<string, unknown>) => {
      const response = await post("/v1/chat/completions", {
        messages: [{ role: "user", content: "Speak." }],
        temperature: 0,
        return_token_ids: true,
        ...body
      })
      expect(response.status, await response.clone().text()).toBe(200)
      return (await response.json()) as Completion & {
        choices: Array<{ message: { content: string | null; tool_calls?: Array<{ function: { name: string; arguments: string } }> } }>
      }
    }
    const format = { type: "json_schema", json_schema: { name: "x", schema } }
    const cached = await chatFor({ response_format: format, kv_cache: "prefix" })
    const full = await chatFor({ response_format: format, kv_cache: "none" })
    const content = cached.choices[0]!.message.content!
    const parsed = JSON.parse(content) as { name: string; mood: string; men: number }
    expect(Object.keys(parsed)).toEqual(["name", "mood", "men"])
    expect(parsed.name.length).toBeLessThanOrEqual(12)
    expect(["merry", "sad"]).toContain(parsed.mood)
    expect(Number.isInteger(parsed.men) && parsed.men <= 999).toBe(true)
    expect(full.choices[0]!.message.content).toBe(content)
    expect(cached.choices[0]!.finish_reason).toBe("stop")
    expect(cached.diffusion.decoding).toBe("block")
    const call = await chatFor({ tools: [{ type: "function", function: { name: "muster", parameters: schema } }], tool_choice: "required" })
    const made = call.choices[0]!.message.tool_calls![0]!
    expect(made.function.name).toBe("muster")
    expect(Object.keys(JSON.parse(made.function.arguments))).toEqual(["name", "mood", "men"])
  })

  it("streams the text the non-streamed answer has, with the usage and block statistics on the last chunk", async () => {
    const body = { max_tokens: 16, temperature: 0.9, seed: 11 }
    const whole = await complete(body)
    const response = await post("/v1/completions", { prompt, ...body, stream: true, stream_options: { include_usage: true } })
    expect(response.status).toBe(200)
    const events = (await response.text())
      .split("\n\n")
      .filter((block) => block !== "")
      .map((block) => block.slice("data: ".length))
    expect(events[events.length - 1]).toBe("[DONE]")
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as Completion)
    const text = chunks.flatMap((c) => c.choices.map((choice) => choice.text ?? "")).join("")
    expect(text).toBe(whole.choices[0]!.text)
    const last = chunks[chunks.length - 1]!
    expect(last.usage).toEqual(whole.usage)
    expect(last.diffusion).toEqual(whole.diffusion)
  })

  it("answers n > 1 together, each answer the one its seed gives alone", async () => {
    const together = await complete({ n: 3, temperature: 0.8, seed: 5, return_token_ids: true })
    expect(together.choices.map((c) => c.index)).toEqual([0, 1, 2])
    for (const [i, choice] of together.choices.entries()) {
      const alone = await complete({ temperature: 0.8, seed: 5 + i, return_token_ids: true })
      expect(choice.token_ids, `answer ${i}`).toEqual(alone.choices[0]!.token_ids)
    }
  })

  it("refuses with a 400 naming what the model cannot honour", async () => {
    expect(await refused({ cfg_scale: 1.5 })).toMatchObject({ param: "cfg_scale", type: "invalid_request_error" })
    expect((await refused({ block_length: family.blockLength * 2 })).message).toContain(`block_length must be ${family.blockLength}`)
    expect((await refused({ kv_cache: "dual" })).param).toBe("kv_cache")
    expect((await refused({ remasking: "random" })).param).toBe("remasking")
    expect((await refused({ parallel_factor: 1 })).param).toBe("parallel_factor")
    expect((await refused({ suffix: "\n\nJULIET:" })).param).toBe("suffix")
    if (family.editing) expect((await refused({ editing_threshold: 0.5, diffusion_steps: 4 })).param).toBe("diffusion_steps")
    if (!family.editing) {
      expect((await refused({ editing_threshold: 0.5 })).param).toBe("editing_threshold")
      expect((await refused({ max_post_steps: 4 })).param).toBe("max_post_steps")
    }
    expect((await refused({ alg: "entropy" })).param).toBe("alg")
    // Neutral values change nothing and are accepted.
    await complete({ cfg_scale: 0, remasking: "low_confidence", block_length: family.blockLength, max_tokens: 4 })
  })

  // Token editing is a LLaDA2.1 rule: the test exists only for the families that have it.
  if (family.editing) {
    it("edits with LLaDA2.1's rule: provisional tokens in the snapshots, final text as without streaming", async () => {
      const body = { max_tokens: 16, parallel_threshold: 0.5, editing_threshold: 0, max_post_steps: 4 }
      const whole = await complete(body)
      expect(whole.diffusion.editing).toEqual({ threshold: 0, max_post_steps: 4 })
      const response = await post("/v1/completions", { prompt, ...body, stream: true, stream_options: { include_snapshots: true } })
      expect(response.status).toBe(200)
      const chunks = (await response.text())
        .split("\n\n")
        .filter((block) => block !== "" && block !== "data: [DONE]")
        .map(
          (block) => JSON.parse(block.slice("data: ".length)) as { choices: Array<{ text: string; snapshot?: Record<string, unknown> }> }
        )
      const snapshots = chunks.flatMap((c) => c.choices.flatMap((choice) => (choice.snapshot === undefined ? [] : [choice.snapshot])))
      expect(snapshots.length).toBeGreaterThan(0)
      for (const snapshot of snapshots) {
        expect(["prefill", "denoise", "commit"]).toContain(snapshot["phase"])
        const canvas = snapshot["canvas"] as Array<string>
        for (const position of snapshot["provisional"] as Array<number>) expect(canvas[position]).not.toBe("<mask>")
      }
      // While the only block is open its written tokens are provisional; none reach the text before it closes.
      expect(snapshots.some((s) => (s["provisional"] as Array<number>).length > 0)).toBe(true)
      expect(chunks.map((c) => c.choices.map((choice) => choice.text).join("")).join("")).toBe(whole.choices[0]!.text)
    })
  }

  it("counts the phase mix and the KV reuse in /metrics", async () => {
    const text = await (await fetch(`${server.url}/metrics`)).text()
    const value = (series: string) => {
      const line = text.split("\n").find((l) => l.startsWith(series + " ") || l.startsWith(series + "{"))
      return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(" ") + 1))
    }
    const phase = (name: string) => {
      const line = text.split("\n").find((l) => l.startsWith("vdiff_step_phase_total{") && l.includes(`phase="${name}"`))
      return line === undefined ? 0 : Number(line.slice(line.lastIndexOf(" ") + 1))
    }
    expect(phase("denoise")).toBeGreaterThan(0)
    expect(phase("commit")).toBeGreaterThan(0)
    // Tokens per step are observed for the denoising steps only, not for prefill and commit forwards.
    expect(value("vdiff_tokens_per_step_count")).toBe(phase("denoise"))
    const attended = value("vdiff_kv_positions_attended_total")!
    const reused = value("vdiff_kv_positions_reused_total")!
    expect(reused).toBeGreaterThan(0)
    expect(reused).toBeLessThan(attended)
    expect(value("vdiff_kv_reuse_share")).toBeCloseTo(reused / attended, 6)
  })
})

// ---- chunked prefill ---------------------------------------------------------------------------------

describe("serving sdar-tiny with --prefill-chunk 8 and no prefix cache", () => {
  let server: ServeProcess
  const complete = async (body: Record<string, unknown>): Promise<Completion> => {
    const response = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ max_tokens: 12, return_token_ids: true, ...body })
    })
    expect(response.status, await response.clone().text()).toBe(200)
    return (await response.json()) as Completion
  }

  beforeAll(async () => {
    const out = join(dir, "sdar-tiny-chunked")
    await run(process.execPath, ["--import", "tsx", "src/main.ts", "make-model", "--preset", "sdar-tiny", "--seed", "3", "--out", out], {
      cwd: repoRoot
    })
    server = await startServe({ model: out, flags: ["--prefill-chunk", "9", "--prefix-cache", "0"] })
  }, 120_000)
  afterAll(async () => {
    await server?.stop()
  })

  it("prefills a long prompt two blocks a step, with the answer of full recompute", async () => {
    const chunked = await complete({
      prompt: "KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;"
    })
    const whole = Math.floor(chunked.choices[0]!.prompt_token_ids!.length / 4) * 4
    expect(whole).toBeGreaterThan(8)
    // --prefill-chunk 9 is two blocks of 4: one prefill forward per 8 prompt positions.
    expect(chunked.diffusion.forwards!.prefill).toBe(Math.ceil(whole / 8))
    expect(chunked.usage.prompt_tokens_details).toEqual({ cached_tokens: 0 })
    const recomputed = await complete({
      prompt: chunked.choices[0]!.prompt_token_ids,
      kv_cache: "none"
    })
    expect(chunked.choices[0]!.token_ids).toEqual(recomputed.choices[0]!.token_ids)
    const stats = (await (await fetch(`${server.url}/v1/engine/stats`)).json()) as { engine: Record<string, unknown> }
    expect(stats.engine["prefix_cache"]).toBeUndefined()
  })
})

// ---- Dream -------------------------------------------------------------------------------------------

describe("serving dream-tiny (dream)", () => {
  let server: ServeProcess
  let model: string
  const post = async (path: string, body: unknown) =>
    fetch(server.url + path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) })
  const complete = async (body: Record<string, unknown>, path = "/v1/completions"): Promise<Completion> => {
    const response = await post(path, { prompt, max_tokens: 12, ...body })
    expect(response.status, await response.clone().text()).toBe(200)
    return (await response.json()) as Completion
  }
  const refused = async (body: Record<string, unknown>) => {
    const response = await post("/v1/completions", { prompt, max_tokens: 8, ...body })
    expect(response.status).toBe(400)
    return ((await response.json()) as { error: { param: string; message: string; type: string } }).error
  }

  beforeAll(async () => {
    model = join(dir, "dream-tiny")
    await run(process.execPath, ["--import", "tsx", "src/main.ts", "make-model", "--preset", "dream-tiny", "--seed", "3", "--out", model], {
      cwd: repoRoot
    })
    // A server tuned for LLaDA (a KV cache, a block length, a parallel rule): none of it applies to Dream.
    server = await startServe({
      model,
      flags: [
        "--max-tokens",
        "16",
        "--served-model-name",
        "dream-tiny",
        "--kv-cache",
        "prefix",
        "--block-length",
        "8",
        "--parallel-threshold",
        "0.9"
      ]
    })
  }, 120_000)
  afterAll(async () => {
    await server?.stop()
  })

  it("names the family in /v1/models and /v1/engine/stats", async () => {
    const models = (await (await fetch(`${server.url}/v1/models`)).json()) as { data: Array<Record<string, unknown>> }
    expect(models.data[0]).toMatchObject({
      id: "dream-tiny",
      family: { name: "dream", decoding: "dream", block_length: 0, editing: false }
    })
    const stats = (await (await fetch(`${server.url}/v1/engine/stats`)).json()) as { engine: Record<string, unknown> }
    expect(stats.engine["family"]).toEqual(models.data[0]!["family"])
  })

  it("completes with Dream's sampler: entropy, eps 1e-3, one step per token; the answer the engine gives alone", async () => {
    const first = await complete({ return_token_ids: true })
    expect(first.diffusion).toMatchObject({
      decoding: "dream",
      dream: { alg: "entropy", alg_temp: 0, eps: 0.001 },
      steps: 12,
      kv_cache: "none",
      parallel: null
    })
    expect(first.diffusion.block_length).toBeUndefined()
    // Deterministic at temperature 0.
    expect((await complete({ return_token_ids: true })).choices[0]!.token_ids).toEqual(first.choices[0]!.token_ids)
    const margin = await complete({ return_token_ids: true, alg: "topk_margin", diffusion_steps: 4, eps: 0.01 })
    expect(margin.diffusion).toMatchObject({ steps: 4, dream: { alg: "topk_margin", alg_temp: 0, eps: 0.01 } })
    // Each answer is the one the addon writes for its prompt tokens with the same settings, up to its end.
    const engine = await loadAddon().loadModel(model, { threads: 1 })
    const answers = [
      { served: first, alg: "entropy" as const, steps: 12, eps: 0.001 },
      { served: margin, alg: "topk_margin" as const, steps: 4, eps: 0.01 }
    ]
    for (const { served, alg, steps, eps } of answers) {
      const [choice] = served.choices
      const id = engine.create(Int32Array.from(choice!.prompt_token_ids!), {
        genLength: 12,
        blockLength: 12,
        steps,
        temperature: 0,
        remasking: "low_confidence",
        cfgScale: 0,
        seed: 0,
        alg,
        algTemp: 0,
        eps
      })
      for (let done = false; !done; ) done = (await engine.step([id]))[0]!.finished
      const canvas = Array.from(engine.canvas(id))
      engine.release(id)
      // dream-tiny's <|endoftext|> (config eos) and <|im_end|> (its chat template's turn end) end the text.
      const ends = [2042, 2044]
      const end = canvas.findIndex((t) => ends.includes(t))
      expect(choice!.token_ids, alg).toEqual(end < 0 ? canvas : canvas.slice(0, end))
      expect(choice!.finish_reason, alg).toBe(end < 0 ? "length" : "stop")
    }
    // The two algorithms write different answers here, so the setting reached the engine.
    expect(margin.choices[0]!.token_ids).not.toEqual(first.choices[0]!.token_ids)
  })

  it("honours ignore_eos and min_tokens by position", () => barsEndAndStopTokens(complete))

  it("chats with the model's own chat template (Qwen2's, with its default system turn)", async () => {
    const chat = await complete(
      { prompt: undefined, messages: [{ role: "user", content: "Speak." }], max_tokens: 8, return_token_ids: true },
      "/v1/chat/completions"
    )
    expect(chat.choices[0]!.message!.content).toEqual(expect.any(String))
    const rendered = (await (await post("/detokenize", { tokens: chat.choices[0]!.prompt_token_ids })).json()) as { prompt: string }
    expect(rendered.prompt).toBe(
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nSpeak.<|im_end|>\n<|im_start|>assistant\n"
    )
    expect(chat.diffusion.decoding).toBe("dream")
  })

  it("streams the text the non-streamed answer has, sampling the same for a seed", async () => {
    const body = { max_tokens: 16, temperature: 0.9, alg_temp: 0.5, seed: 11 }
    const whole = await complete(body)
    const response = await post("/v1/completions", { prompt, ...body, stream: true, stream_options: { include_usage: true } })
    expect(response.status).toBe(200)
    const events = (await response.text())
      .split("\n\n")
      .filter((block) => block !== "")
      .map((block) => block.slice("data: ".length))
    expect(events[events.length - 1]).toBe("[DONE]")
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as Completion)
    expect(chunks.flatMap((c) => c.choices.map((choice) => choice.text ?? "")).join("")).toBe(whole.choices[0]!.text)
    expect(chunks[chunks.length - 1]!.diffusion).toEqual(whole.diffusion)
  })

  it("lays structured output on the canvas: the answer parses, streamed whole in the last chunk", async () => {
    const schema = { type: "object", properties: { name: { type: "string", minLength: 2 }, mood: { enum: ["merry", "sad"] } } }
    const body = { max_tokens: undefined, temperature: 0, guided_json: schema }
    const whole = await complete(body)
    const parsed = JSON.parse(whole.choices[0]!.text!) as { name: string; mood: string }
    expect(Object.keys(parsed)).toEqual(["name", "mood"])
    expect(parsed.name.length).toBeGreaterThanOrEqual(2)
    expect(["merry", "sad"]).toContain(parsed.mood)
    const streamed = await post("/v1/completions", { prompt, ...body, stream: true })
    const texts = (await streamed.text())
      .split("\n\n")
      .filter((event) => event.startsWith("data: {"))
      .map((event) => (JSON.parse(event.slice(6)) as { choices: Array<{ text: string }> }).choices[0]?.text ?? "")
    expect(texts.join("")).toBe(whole.choices[0]!.text)
  })

  it("refuses with a 400 naming what the model cannot honour", async () => {
    expect(await refused({ cfg_scale: 1.5 })).toMatchObject({ param: "cfg_scale", type: "invalid_request_error" })
    expect((await refused({ kv_cache: "prefix" })).param).toBe("kv_cache")
    expect((await refused({ block_length: 4 })).param).toBe("block_length")
    expect((await refused({ remasking: "random" })).param).toBe("remasking")
    expect((await refused({ parallel_threshold: 0.5 })).param).toBe("parallel_threshold")
    expect((await refused({ min_p: 0.1 })).param).toBe("min_p")
    expect((await refused({ editing_threshold: 0.5 })).param).toBe("editing_threshold")
    expect((await refused({ suffix: "\n\nJULIET:" })).param).toBe("suffix")
    expect((await refused({ eps: 1 })).param).toBe("eps")
    expect((await refused({ alg: "random" })).param).toBe("alg")
    // Neutral values change nothing and are accepted.
    await complete({ cfg_scale: 0, remasking: "low_confidence", kv_cache: "none", parallel_threshold: 0, max_tokens: 4 })
  })
})

describe("Dream's settings on a LLaDA model (the embedded one)", () => {
  let server: ServeProcess
  beforeAll(async () => {
    server = await startServe({ flags: ["--max-tokens", "8"] })
  }, 120_000)
  afterAll(async () => {
    await server?.stop()
  })

  it("refuses alg, alg_temp and eps with a 400 naming them", async () => {
    for (const body of [{ alg: "entropy" }, { alg_temp: 0 }, { eps: 0.001 }]) {
      const response = await fetch(`${server.url}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ prompt, max_tokens: 4, ...body })
      })
      expect(response.status).toBe(400)
      const error = ((await response.json()) as { error: { param: string; message: string } }).error
      expect(error.param).toBe(Object.keys(body)[0])
      expect(error.message).toContain("(llada, full-canvas decoding): it is a setting of Dream decoding (Dream)")
    }
  })
})
