/**
 * Hostile input against a `vdiff serve` child process (native engine, embedded model), property-based
 * with fast-check (test/stress/hostile.ts has the generators):
 *  - fuzzed JSON bodies of both generation endpoints, with fuzzed headers: every answer is a 4xx with the
 *    OpenAI error body (its request_id the response's X-Request-ID) or, for a body that happens to be
 *    valid, a well-formed 200 — never a 5xx, never a hang (30 s), never a crash;
 *  - generated valid bodies all get 200;
 *  - bytes no HTTP client library would send (control characters and CR/LF in headers, oversized
 *    headers, conflicting lengths, garbage request lines) written to a raw socket: each gets a 4xx status
 *    line or a closed connection, and the server keeps serving.
 * The number of cases tried is printed. fast-check picks a new seed each run and prints it on failure.
 */
import { connect } from "node:net"
import fc from "fast-check"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type Answer, type HostileRequest, hostileRequest, problemWith, validRequest } from "./stress/hostile.js"
import { awaitIdle, fullSize, type ServeProcess, size, startServe } from "./stress/serve.js"

let server: ServeProcess

beforeAll(async () => {
  server = await startServe({
    // Defaults small, so a valid body without max_tokens is quick; a queue that multi-prompt bodies fit in.
    flags: ["--max-concurrent-requests", "4", "--max-queue-size", "256", "--max-tokens", "8", "--diffusion-steps", "8"]
  })
})
afterAll(async () => {
  expect(await server.stop()).toBe(0)
})

/** The server's --max-body-size (the default). */
const MAX_BODY = 1_048_576

/**
 * Sends a request; undefined when a body over the size limit was cut off: the server answers 413 at
 * once and closes, and a client still uploading may see the connection end (EPIPE) before the answer.
 */
const send = async (request: HostileRequest): Promise<Answer | undefined> => {
  try {
    const response = await fetch(server.url + request.path, {
      method: "POST",
      headers: request.headers,
      body: request.body,
      // A hang fails the case.
      signal: AbortSignal.timeout(30_000)
    })
    return { status: response.status, headers: response.headers, text: await response.text() }
  } catch (error) {
    const code = (error as { cause?: { code?: string } }).cause?.code
    if (request.body.length > MAX_BODY && (code === "EPIPE" || code === "ECONNRESET")) return undefined
    throw error
  }
}

const tally = (counts: Map<string, number>) =>
  [...counts.entries()]
    .sort()
    .map(([k, v]) => `${k}: ${v}`)
    .join(", ")

describe("hostile input", () => {
  it(
    "fuzzed bodies and headers: a 4xx with the OpenAI error body or a well-formed 200, never a 5xx, hang or crash",
    async () => {
      const statuses = new Map<string, number>()
      const kinds = new Map<string, number>()
      let tried = 0
      const started = performance.now()
      await fc.assert(
        fc.asyncProperty(hostileRequest, async (request) => {
          tried++
          const answer = await send(request)
          const status = answer === undefined ? "closed over the size limit" : String(answer.status)
          statuses.set(status, (statuses.get(status) ?? 0) + 1)
          kinds.set(request.label, (kinds.get(request.label) ?? 0) + 1)
          if (answer === undefined) return
          const problem = problemWith(answer)
          if (problem !== undefined) throw new Error(`${request.label}: ${problem}`)
        }),
        { numRuns: size(400, 10_000), interruptAfterTimeLimit: size(20_000, 600_000), markInterruptAsFailure: false }
      )
      console.log(
        `fuzz (${new Date().toISOString().slice(0, 10)}): ${tried} hostile requests in ` +
          `${((performance.now() - started) / 1000).toFixed(1)} s; statuses {${tally(statuses)}}; kinds {${tally(kinds)}}`
      )
      expect(tried).toBeGreaterThanOrEqual(size(100, 1000))
      expect(server.child.exitCode).toBeNull()
      expect((await fetch(server.url + "/health/live")).status).toBe(200)
      const { stats } = await awaitIdle(server.url)
      expect(stats.engine.live_sequences).toBe(0)
    },
    fullSize ? 1_000_000 : 60_000
  )

  it("bodies nested 100 000 deep, in any field, get a 400 (they once overflowed the error formatter: 500)", async () => {
    const cases: Array<[HostileRequest["path"], string, string]> = [
      ["/v1/completions", '{"prompt":"x","model":', "}"],
      ["/v1/completions", '{"prompt":', "}"],
      ["/v1/completions", '{"prompt":"x","unknown":', "}"],
      ["/v1/chat/completions", '{"messages":', "}"],
      ["/v1/chat/completions", '{"messages":[{"role":"user","content":[{"type":"text","text":', "}]}]}"]
    ]
    for (const [path, before, after] of cases) {
      for (const [open, close] of [
        ["[", "]"],
        ['{"a":', "}"]
      ] as const) {
        const text = before + open.repeat(100_000) + "1" + close.repeat(100_000) + after
        const answer = await send({
          path,
          headers: { "content-type": "application/json" },
          body: new TextEncoder().encode(text),
          label: "deep"
        })
        expect(answer?.status, `${before}${open}${open}...`).toBe(400)
        expect(problemWith(answer!)).toBeUndefined()
      }
    }
  })

  it(
    "generated valid bodies all get a well-formed 200",
    async () => {
      let tried = 0
      await fc.assert(
        fc.asyncProperty(validRequest, async ({ path, body }) => {
          tried++
          const response = await fetch(server.url + path, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify(body),
            signal: AbortSignal.timeout(30_000)
          })
          const answer = { status: response.status, headers: response.headers, text: await response.text() }
          if (answer.status !== 200) throw new Error(`${JSON.stringify(body)}: ${answer.status} ${answer.text.slice(0, 300)}`)
          const problem = problemWith(answer)
          if (problem !== undefined) throw new Error(`${JSON.stringify(body)}: ${problem}`)
        }),
        { numRuns: size(30, 500), interruptAfterTimeLimit: size(15_000, 240_000), markInterruptAsFailure: false }
      )
      console.log(`valid bodies: ${tried} tried, all 200`)
      expect(tried).toBeGreaterThanOrEqual(size(10, 100))
    },
    fullSize ? 700_000 : 60_000
  )

  it("malformed HTTP on a raw socket: a 4xx or a closed connection, and the server keeps serving", async () => {
    const { port } = new URL(server.url)
    /** Writes raw bytes and returns the status line of the answer ("" if the connection just closed). */
    const raw = (bytes: string | Buffer) =>
      new Promise<string>((resolve, reject) => {
        const socket = connect(Number(port), "127.0.0.1")
        let received = ""
        const timer = setTimeout(() => {
          socket.destroy()
          reject(new Error(`no answer and no close within 10 s to ${JSON.stringify(String(bytes).slice(0, 80))}`))
        }, 10_000)
        socket.on("data", (chunk) => {
          received += chunk.toString("latin1")
          // One answer is enough; the server may keep the connection open.
          if (received.includes("\r\n\r\n")) socket.end()
        })
        socket.on("error", () => undefined)
        socket.on("close", () => {
          clearTimeout(timer)
          resolve(received.split("\r\n")[0] ?? "")
        })
        // Half-close after writing, so a request whose body never completes ends rather than waits.
        socket.end(bytes)
      })
    const body = '{"prompt":"x","max_tokens":2}'
    const post = (headerLines: string, payload = body) => `POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n${headerLines}\r\n${payload}`
    const cases: Array<string | Buffer> = [
      post(`Content-Type: application/json\r\nX-Request-ID: a\rb\r\nContent-Length: ${body.length}\r\n`),
      post(`Content-Type: application/json\r\nX-Request-ID: a\u0000b\r\nContent-Length: ${body.length}\r\n`),
      post(`Content-Type: application/json\r\nAuthorization: Bearer \u0001\u0002\r\nContent-Length: ${body.length}\r\n`),
      post(`Content-Type: application/json\r\nX-Big: ${"a".repeat(70_000)}\r\nContent-Length: ${body.length}\r\n`),
      post(`Content-Type: application/json\r\nContent-Length: ${body.length}\r\nContent-Length: 5\r\n`),
      post(`Content-Type: application/json\r\nContent-Length: ${body.length}\r\nTransfer-Encoding: chunked\r\n`),
      post(`Content-Type: application/json\r\nContent-Length: -1\r\n`),
      post(`Content-Type: application/json\r\nContent-Length: 99999999999999999999\r\n`),
      post(`Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n`, "zz\r\nnot hex\r\n0\r\n\r\n"),
      post(`Bad Header Name: x\r\nContent-Length: ${body.length}\r\n`),
      post(`Content-Type: application/json\r\nContent-Length: ${body.length}\r\n`).replace("HTTP/1.1", "HTTP/9.9"),
      "GARBAGE\r\n\r\n",
      "POST /v1/completions\r\n\r\n",
      `POST ${"/a".repeat(20_000)} HTTP/1.1\r\nHost: x\r\n\r\n`,
      Buffer.from([0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03]), // a TLS ClientHello
      post(`Content-Type: application/json\r\nContent-Length: ${body.length + 10}\r\n`) // a body cut short
    ]
    const lines: Array<string> = []
    for (const bytes of cases) {
      const line = await raw(bytes)
      lines.push(line)
      // A status line, if any, is a 4xx.
      if (line !== "") expect(line, JSON.stringify(String(bytes).slice(0, 120))).toMatch(/^HTTP\/1\.[01] 4\d\d /)
    }
    console.log(`raw sockets: ${cases.length} malformed requests answered: ${lines.map((l) => l.slice(9, 12) || "closed").join(" ")}`)
    expect(server.child.exitCode).toBeNull()
    const after = await fetch(server.url + "/v1/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body
    })
    expect(after.status).toBe(200)
  })
})
