/**
 * The API's responses on a fixed set of requests, byte for byte: a real `vdiff serve` on the embedded
 * model answers each request of `requests` below, and the bodies (with the fields that differ per call —
 * ids, timestamps, request ids — replaced by placeholders) must equal test/fixtures/api-responses.json.
 * The file was recorded before the architecture redesign (VDIFF_RECORD=1 rewrites it), so a refactor that
 * changes any answer, status, header-visible error or streamed chunk fails here. On a CPU with AMX the
 * server runs on avx512bf16 (below).
 */
import { existsSync, readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { loadAddon } from "../src/engine/native.js"
import { embeddedModel, type ServeProcess, startServe } from "./stress/serve.js"

const fixture = join(import.meta.dirname, "fixtures", "api-responses.json")
const record = process.env["VDIFF_RECORD"] === "1"

interface Case {
  readonly name: string
  readonly method: "GET" | "POST"
  readonly path: string
  readonly body?: unknown
}

const prompt = "ROMEO:\nBut soft, what light"
const chat = [{ role: "user", content: "Speak, good sir." }]
const requests: ReadonlyArray<Case> = [
  { name: "models", method: "GET", path: "/v1/models" },
  { name: "completion", method: "POST", path: "/v1/completions", body: { model: "shakespeare", prompt, max_tokens: 24 } },
  {
    name: "completion blocks and steps",
    method: "POST",
    path: "/v1/completions",
    body: { prompt, max_tokens: 32, block_length: 8, diffusion_steps: 16, return_token_ids: true }
  },
  {
    name: "completion n=2 echo",
    method: "POST",
    path: "/v1/completions",
    body: { prompt: ["KING:", "QUEEN:"], max_tokens: 16, n: 2, echo: true }
  },
  { name: "completion stop", method: "POST", path: "/v1/completions", body: { prompt, max_tokens: 32, stop: ["\n"] } },
  {
    name: "completion suffix",
    method: "POST",
    path: "/v1/completions",
    body: { prompt: "First Citizen:\n", suffix: "\n\nSecond Citizen:", max_tokens: 16 }
  },
  { name: "completion token ids", method: "POST", path: "/v1/completions", body: { prompt: [1, 50, 60, 70], max_tokens: 12 } },
  { name: "completion cfg", method: "POST", path: "/v1/completions", body: { prompt, max_tokens: 16, cfg_scale: 1.5, block_length: 8 } },
  {
    name: "completion dual cache parallel",
    method: "POST",
    path: "/v1/completions",
    body: { prompt, max_tokens: 32, kv_cache: "dual", parallel_threshold: 0.5, early_stop: true }
  },
  {
    name: "completion prefix cache",
    method: "POST",
    path: "/v1/completions",
    body: { prompt, max_tokens: 32, kv_cache: "prefix", block_length: 16 }
  },
  { name: "completion logprobs 0", method: "POST", path: "/v1/completions", body: { prompt, max_tokens: 8, logprobs: 0 } },
  {
    name: "completion stream",
    method: "POST",
    path: "/v1/completions",
    body: { prompt, max_tokens: 24, stream: true, stream_options: { include_usage: true } }
  },
  {
    name: "completion stream snapshots",
    method: "POST",
    path: "/v1/completions",
    body: { prompt, max_tokens: 16, block_length: 8, stream: true, stream_options: { include_snapshots: true } }
  },
  { name: "chat", method: "POST", path: "/v1/chat/completions", body: { model: "shakespeare", messages: chat, max_tokens: 32 } },
  {
    name: "chat system n=2",
    method: "POST",
    path: "/v1/chat/completions",
    body: { messages: [{ role: "system", content: "Thou art a king." }, ...chat], max_tokens: 24, n: 2 }
  },
  {
    name: "chat stream",
    method: "POST",
    path: "/v1/chat/completions",
    body: { messages: chat, max_tokens: 32, stream: true, stream_options: { include_usage: true } }
  },
  { name: "tokenize", method: "POST", path: "/tokenize", body: { prompt } },
  { name: "detokenize", method: "POST", path: "/detokenize", body: { tokens: [1, 50, 60, 70, 80] } },
  { name: "error unknown model", method: "POST", path: "/v1/completions", body: { model: "gpt-4", prompt } },
  { name: "error bad field", method: "POST", path: "/v1/completions", body: { prompt, max_tokens: -1 } },
  { name: "error bad type", method: "POST", path: "/v1/completions", body: { prompt, temperature: "hot" } },
  {
    name: "error both parallel rules",
    method: "POST",
    path: "/v1/completions",
    body: { prompt, parallel_threshold: 0.9, parallel_factor: 1 }
  },
  { name: "error context", method: "POST", path: "/v1/completions", body: { prompt, max_tokens: 100000 } },
  { name: "error chat no messages", method: "POST", path: "/v1/chat/completions", body: { messages: [] } },
  { name: "error not found", method: "GET", path: "/v1/nothing" }
]

// What differs from call to call, replaced by a placeholder wherever it appears in a body.
const normalize = (text: string): string =>
  text
    .replace(/"(id|request_id)":"[^"]*"/g, '"$1":"<$1>"')
    .replace(/"created":\d+/g, '"created":0')
    .replace(/"created_at":\d+/g, '"created_at":0')

// The recording holds the bits of the bf16 dot product as kernels.h defines it, which every ISA computes
// but amx (its tiles sum 32 products in an order of their own, within the same bound): where this CPU has
// AMX, the server runs on avx512bf16 (which every AMX CPU has), the widest ISA that gives those bits.
const addon = loadAddon()
const hasAmx = await addon.loadModel(embeddedModel, { threads: 1, cpuIsa: "amx" }).then(
  () => true,
  () => false
)

let server: ServeProcess
beforeAll(async () => {
  server = await startServe({ flags: ["--max-tokens", "32", ...(hasAmx ? ["--cpu-isa", "avx512bf16"] : [])] })
})
afterAll(async () => {
  await server?.stop()
})

describe("API responses on the recorded requests", () => {
  it("equal the recording byte for byte", async () => {
    const answers: Record<string, { status: number; contentType: string | null; body: string }> = {}
    for (const c of requests) {
      const response = await fetch(server.url + c.path, {
        method: c.method,
        ...(c.body === undefined ? {} : { headers: { "content-type": "application/json" }, body: JSON.stringify(c.body) })
      })
      answers[c.name] = {
        status: response.status,
        contentType: response.headers.get("content-type"),
        body: normalize(await response.text())
      }
    }
    if (record) writeFileSync(fixture, JSON.stringify(answers, null, 1) + "\n")
    expect(existsSync(fixture)).toBe(true)
    const recorded = JSON.parse(readFileSync(fixture, "utf8")) as typeof answers
    expect(Object.keys(answers)).toEqual(Object.keys(recorded))
    for (const name of Object.keys(recorded)) expect({ name, ...answers[name] }).toEqual({ name, ...recorded[name] })
  }, 120_000)
})
