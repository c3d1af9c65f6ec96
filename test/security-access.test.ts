/**
 * Who gets in, and what leaks, checked on the real server:
 *  - with API keys set, no route but the exempt ones (probes, /version, /metrics, GET /) answers without a
 *    valid key: every route of the server's routers × every method × missing, wrong, malformed and
 *    misplaced credentials, plus unknown paths, path tricks and odd methods, on a `vdiff serve` child;
 *    with a valid key the same routes do answer (so the requests were well formed);
 *  - the keys and the Authorization headers sent never appear in the server's output (stdout and
 *    stderr at log level debug), nor in a response;
 *  - request ids from clients are kept only when sane; otherwise a fresh one is made, and the rejected
 *    value is neither echoed nor logged;
 *  - the key comparison takes the same time whatever prefix of a key the candidate matches (measured on
 *    the comparison function; the same measurement catches a naive comparison, so it can fail);
 *  - the rate limit cannot be escaped by varying X-Forwarded-For (or Forwarded, X-Real-IP) unless
 *    --trust-proxy is on;
 *  - CORS gives unknown origins nothing by default, and only the listed origins when configured.
 * The last two run the server's layers in-process (HTTP over loopback) with the fake engine.
 */
import { randomBytes } from "node:crypto"
import { request as httpRequest } from "node:http"
import { Chunk, Effect, Exit, Logger, LogLevel, Scope } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { makeKeyCheck } from "../src/http/auth.js"
import { router as openaiRouter } from "../src/openai/routes.js"
import * as Playground from "../src/playground/Playground.js"
import * as SystemRoutes from "../src/server/systemRoutes.js"
import { settings, startServer } from "./http-helpers.js"
import { type ServeProcess, startServe } from "./stress/serve.js"

interface RawReply {
  readonly status: number
  readonly headers: Record<string, string | Array<string> | undefined>
  readonly text: string
}

/** A request exactly as given (path and method unnormalised), over node:http. */
const raw = (url: string, options: { method: string; path: string; headers?: Record<string, string | Array<string>>; body?: string }) =>
  new Promise<RawReply>((resolve, reject) => {
    const { hostname, port } = new URL(url)
    // Content-Length explicitly: node:http sends a DELETE's or OPTIONS's body without one otherwise.
    const length = options.body === undefined ? {} : { "content-length": String(Buffer.byteLength(options.body)) }
    const req = httpRequest(
      { host: hostname, port, method: options.method, path: options.path, headers: { ...options.headers, ...length } },
      (res) => {
        let text = ""
        res.setEncoding("utf8")
        res.on("data", (chunk) => (text += chunk))
        res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text }))
      }
    )
    req.on("error", reject)
    req.setTimeout(30_000, () => req.destroy(new Error("timeout")))
    req.end(options.body)
  })

const header = (reply: RawReply, name: string) => {
  const value = reply.headers[name]
  return Array.isArray(value) ? value.join(", ") : value
}

// ---- auth, logs and request ids on a child process ----------------------------------------------------

/** Distinctive keys, so that any trace of them in the output is found. */
const keys = [`sk-valid-${randomBytes(12).toString("hex")}`, `sk-other-${randomBytes(12).toString("hex")}`]
const wrongKey = `sk-wrong-${randomBytes(12).toString("hex")}`

/** Every route of the routers the server mounts (src/server/Server.ts), as [method, concrete path]. */
const serverRoutes = (): Array<[string, string]> =>
  [SystemRoutes.router({ modelName: "shakespeare", queueCapacity: 64 }), Playground.router, openaiRouter].flatMap((router) =>
    Chunk.toReadonlyArray(router.routes).map((route): [string, string] => [
      route.method,
      route.path.replace(/:[^/]+/g, "shakespeare").replace(/\*$/, "anything")
    ])
  )

/** Exempt from auth by design: the probes, /version, /metrics and the page at GET / (and HEAD /). */
const exempt = (method: string, path: string) =>
  ["/health", "/health/live", "/health/ready", "/version", "/metrics"].includes(path) ||
  (path === "/" && (method === "GET" || method === "HEAD"))

const methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"]

/** Paths that are not routes, or that try to look like an exempt one. */
const oddPaths = [
  "/nope",
  "/v1",
  "/v1/",
  "/admin",
  "/debug",
  "/v1/engine",
  "/v1/engine/stats/",
  "/health/../v1/models",
  "/v1/models/../../health",
  "/metrics/../v1/engine/stats",
  "//v1/models",
  "/v1//models",
  "/V1/MODELS",
  "/v1/models?/health",
  "/v1/models%3F/health",
  "/%2e%2e/v1/models",
  "/v1/models;/health",
  "/health;/../v1/engine/stats",
  "/health%00/../v1/models",
  "http://127.0.0.1/v1/models",
  "*"
]

/** Credentials that must not open anything: none, wrong, malformed, or the right key in the wrong place. */
const badCredentials: Array<[string, Record<string, string>]> = [
  ["no key", {}],
  ["a wrong key", { authorization: `Bearer ${wrongKey}` }],
  ["a key's prefix", { authorization: `Bearer ${keys[0]!.slice(0, -1)}` }],
  ["a key plus a character", { authorization: `Bearer ${keys[0]}x` }],
  ["two keys", { authorization: `Bearer ${keys[0]} ${keys[1]}` }],
  ["Basic scheme", { authorization: `Basic ${Buffer.from(`user:${keys[0]}`).toString("base64")}` }],
  ["the bare key", { authorization: keys[0]! }],
  ["Bearer and nothing", { authorization: "Bearer" }],
  ["the key in X-API-Key", { "x-api-key": keys[0]! }],
  ["the key in a cookie", { cookie: `api_key=${keys[0]}` }]
]

describe("with API keys set (vdiff serve child, log level debug)", () => {
  let server: ServeProcess
  const sent: Array<string> = []

  beforeAll(async () => {
    server = await startServe({
      flags: ["--max-tokens", "4", "--log-level", "debug"],
      env: { VDIFF_API_KEY: keys.join(",") }
    })
  })
  afterAll(async () => {
    if (server.child.exitCode === null) await server.stop()
  })

  it("no route but the exempt ones answers without a valid key", async () => {
    const targets: Array<[string, string]> = []
    for (const [, path] of serverRoutes()) for (const method of methods) targets.push([method, path])
    for (const path of oddPaths) for (const method of ["GET", "POST", "OPTIONS"]) targets.push([method, path])
    const body = JSON.stringify({ prompt: "x", max_tokens: 2, messages: [{ role: "user", content: "x" }], tokens: [1] })
    let refused = 0
    let exemptAnswered = 0
    for (const [method, path] of targets) {
      for (const [name, headers] of badCredentials) {
        const reply = await raw(server.url, {
          method,
          path,
          headers: { "content-type": "application/json", ...headers },
          ...(method === "GET" || method === "HEAD" ? {} : { body })
        }).catch((error) => {
          throw new Error(`${method} ${path} with ${name}: ${error}`)
        })
        sent.push(...Object.values(headers))
        const context = `${method} ${path} with ${name}: ${reply.status} ${reply.text.slice(0, 200)}`
        if (exempt(method, path)) {
          exemptAnswered++
          continue
        }
        // Never an answer with content: refused (401: a missing, malformed or unknown key alike, as
        // OpenAI answers), or for a preflight-style OPTIONS, which browsers send without credentials and
        // which auth lets through, no route (404/405) or a refused origin (403).
        expect(reply.status < 200 || reply.status >= 300, context).toBe(true)
        if (method !== "OPTIONS" && path !== "*") {
          expect(reply.status, context).toBe(401)
          expect(header(reply, "www-authenticate"), context).toMatch(/^Bearer/)
          if (method !== "HEAD") {
            const error = JSON.parse(reply.text).error
            expect(error.type, context).toBe("invalid_request_error")
            expect(["missing_api_key", "invalid_api_key"], context).toContain(error.code)
          }
        }
        // No response carries a key back.
        for (const key of [...keys, wrongKey]) expect(reply.text.includes(key), context).toBe(false)
        refused++
      }
    }
    // The control: with a valid key the same routes answer.
    const authorization = { authorization: `Bearer ${keys[1]}` }
    sent.push(authorization.authorization)
    const validBody: Record<string, unknown> = {
      "/v1/completions": { prompt: "x", max_tokens: 2 },
      "/v1/chat/completions": { messages: [{ role: "user", content: "x" }], max_tokens: 2 },
      "/v1/responses": { input: "x", max_output_tokens: 2 },
      "/tokenize": { prompt: "x" },
      "/detokenize": { tokens: [1] }
    }
    for (const [method, path] of serverRoutes()) {
      const reply = await raw(server.url, {
        method,
        path,
        headers: { "content-type": "application/json", ...authorization },
        ...(method === "GET" ? {} : { body: JSON.stringify(validBody[path]) })
      })
      expect(reply.status, `${method} ${path} with a valid key: ${reply.text.slice(0, 200)}`).toBe(200)
    }
    console.log(
      `auth: ${refused} requests without a valid key to ${targets.length - targets.filter(([m, p]) => exempt(m, p)).length} ` +
        `method×path pairs (${serverRoutes().length} routes, ${oddPaths.length} odd paths, ${methods.length} methods, ` +
        `${badCredentials.length} kinds of bad credentials): none answered; ${exemptAnswered} to exempt routes; ` +
        `every route answered with a valid key`
    )
  })

  it("request ids from clients are kept only when sane, and rejected ones are neither echoed nor logged", async () => {
    const authorization = `Bearer ${keys[0]}`
    const post = (requestId: string | Array<string>) =>
      raw(server.url, {
        method: "POST",
        path: "/v1/completions",
        headers: { "content-type": "application/json", authorization, "x-request-id": requestId },
        body: '{"prompt": 5}'
      })
    const sane = `client-${randomBytes(6).toString("hex")}.A_1`
    const kept = await post(sane)
    expect(header(kept, "x-request-id")).toBe(sane)
    expect(JSON.parse(kept.text).error.request_id).toBe(sane)

    const insane = [
      `has space-${randomBytes(4).toString("hex")}`,
      `<script>${randomBytes(4).toString("hex")}</script>`,
      `x${randomBytes(4).toString("hex")}`.padEnd(129, "y"),
      `../../etc/passwd-${randomBytes(4).toString("hex")}`,
      `%0d%0aSet-Cookie:${randomBytes(4).toString("hex")}`,
      `quote"${randomBytes(4).toString("hex")}`,
      `latin1-\u00e9${randomBytes(4).toString("hex")}`,
      ""
    ]
    const generated = new Set<string>()
    for (const id of [...insane, [`dup-${randomBytes(4).toString("hex")}`, "second"]]) {
      const reply = await post(id)
      const echoed = header(reply, "x-request-id")!
      expect(echoed, JSON.stringify(id)).toMatch(/^[0-9a-f]{32}$/)
      expect(JSON.parse(reply.text).error.request_id).toBe(echoed)
      generated.add(echoed)
    }
    expect(generated.size).toBe(insane.length + 1)
    const output = server.output()
    expect(output).toContain(sane)
    for (const id of insane.filter((id) => id !== "")) {
      const marker = id.match(/[0-9a-f]{8}/)![0]
      expect(output.includes(marker), `rejected id ${JSON.stringify(id)} appears in the logs`).toBe(false)
    }
  })

  it("neither keys nor Authorization headers appear anywhere in the server's output", async () => {
    // A streamed and a plain generation with a valid key, so their log lines are in the output too.
    for (const stream of [false, true]) {
      const reply = await raw(server.url, {
        method: "POST",
        path: "/v1/completions?api_key=" + keys[0],
        headers: { "content-type": "application/json", authorization: `Bearer ${keys[0]}` },
        body: JSON.stringify({ prompt: "ROMEO:", max_tokens: 4, stream })
      })
      expect(reply.status).toBe(200)
    }
    expect(await server.stop()).toBe(0)
    const output = server.output()
    expect(sent.length).toBeGreaterThan(100)
    expect(output.split("\n").length).toBeGreaterThan(100)
    for (const secret of [...keys, wrongKey]) expect(output.includes(secret), `a key appears in the output`).toBe(false)
    // Nor any Authorization value, whole or base64.
    for (const value of new Set(sent)) {
      if (value.length >= 12) expect(output.includes(value), `"${value}" appears in the output`).toBe(false)
    }
    expect(output).not.toMatch(/bearer\s+sk-/i)
    console.log(`logs: ${output.split("\n").length - 1} lines of server output at log level debug; no key, no Authorization value`)
  })
})

// ---- timing of the key comparison ---------------------------------------------------------------------

describe("the key comparison", () => {
  /**
   * Median nanoseconds per call of `check(candidate)`, over interleaved batches: each round times a
   * batch of each candidate in turn, so load on the machine falls on both alike.
   */
  const medians = (check: (key: string) => boolean, candidates: ReadonlyArray<string>, rounds: number, batch: number) => {
    const samples = candidates.map(() => [] as Array<number>)
    for (let r = 0; r < rounds; r++) {
      for (let c = 0; c < candidates.length; c++) {
        const candidate = candidates[(c + r) % candidates.length]!
        const start = process.hrtime.bigint()
        for (let i = 0; i < batch; i++) check(candidate)
        samples[(c + r) % candidates.length]!.push(Number(process.hrtime.bigint() - start) / batch)
      }
    }
    return samples.map((s) => s.sort((a, b) => a - b)[Math.floor(s.length / 2)]!)
  }

  it("takes the same time whatever prefix of a key the candidate shares (and the test would see a leak)", () => {
    // Long keys make a prefix-dependent comparison easy to see.
    const key = "sk-" + randomBytes(2048).toString("hex")
    const sharesAllButLast = key.slice(0, -1) + (key.endsWith("0") ? "1" : "0")
    const sharesNothing = (key[0] === "x" ? "y" : "x") + key.slice(1).replace(/./g, "z")
    const sharesHalf = key.slice(0, key.length / 2) + "z".repeat(key.length / 2)
    const candidates = [sharesAllButLast, sharesHalf, sharesNothing]

    const check = makeKeyCheck([key, "sk-" + randomBytes(2048).toString("hex")])
    // What a leaky comparison looks like: stops at the first differing character.
    const naive = (candidate: string) => {
      for (let i = 0; i < key.length; i++) if (candidate.charCodeAt(i) !== key.charCodeAt(i)) return false
      return candidate.length === key.length
    }
    for (const candidate of candidates) expect(check(candidate)).toBe(false)
    expect(check(key)).toBe(true)

    const [all, half, none] = medians(check, candidates, 101, 40)
    const [naiveAll, , naiveNone] = medians(naive, candidates, 101, 40)
    const spread = Math.max(all!, half!, none!) / Math.min(all!, half!, none!)
    console.log(
      `key comparison: median ${all!.toFixed(0)} / ${half!.toFixed(0)} / ${none!.toFixed(0)} ns for a candidate sharing all ` +
        `but one / half / none of a 4099-character key (spread ${spread.toFixed(2)}x); a naive comparison: ` +
        `${naiveAll!.toFixed(0)} vs ${naiveNone!.toFixed(0)} ns (${(naiveAll! / naiveNone!).toFixed(1)}x)`
    )
    // The naive comparison differs by orders of magnitude; the real one by noise only.
    expect(naiveAll! / naiveNone!).toBeGreaterThan(5)
    expect(spread).toBeLessThan(1.5)
  })
})

// ---- rate limit and CORS, in-process --------------------------------------------------------------------

/** The server's layers on 127.0.0.1 with the fake engine, for as long as the describe block runs. */
const inProcess = (flags: ReadonlyArray<string>) => {
  const scope = Effect.runSync(Scope.make())
  let url = ""
  beforeAll(async () => {
    const config = await settings(flags)
    const started = startServer({ config }).pipe(Scope.extend(scope), Effect.provide(Logger.minimumLogLevel(LogLevel.None)))
    url = (await Effect.runPromise(started)).url
  })
  afterAll(() => Effect.runPromise(Scope.close(scope, Exit.void)))
  return () => url
}

describe("the rate limit, without --trust-proxy", () => {
  const url = inProcess(["--rate-limit-requests", "3", "--rate-limit-window", "60"])

  it("counts a client by its address, whatever X-Forwarded-For, Forwarded or X-Real-IP say", async () => {
    const statuses: Array<number> = []
    for (let i = 0; i < 10; i++) {
      const reply = await raw(url(), {
        method: "GET",
        path: "/v1/models",
        headers: {
          "x-forwarded-for": `203.0.113.${i}, 10.0.0.${i}`,
          forwarded: `for=198.51.100.${i}`,
          "x-real-ip": `192.0.2.${i}`
        }
      })
      statuses.push(reply.status)
    }
    expect(statuses).toEqual([200, 200, 200, 429, 429, 429, 429, 429, 429, 429])
  })
})

describe("the rate limit, with --trust-proxy", () => {
  const url = inProcess(["--rate-limit-requests", "3", "--rate-limit-window", "60", "--trust-proxy"])

  it("counts by the forwarded address (the control: varying it is what the other test does)", async () => {
    const statuses: Array<number> = []
    for (let i = 0; i < 6; i++) {
      const reply = await raw(url(), { method: "GET", path: "/v1/models", headers: { "x-forwarded-for": `203.0.113.${i}` } })
      statuses.push(reply.status)
    }
    expect(statuses).toEqual([200, 200, 200, 200, 200, 200])
  })
})

const preflight = (url: string, origin: string) =>
  raw(url, {
    method: "OPTIONS",
    path: "/v1/chat/completions",
    headers: { origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type" }
  })

describe("CORS by default", () => {
  const url = inProcess([])

  it("gives other origins nothing: no Access-Control-Allow-Origin, preflights refused", async () => {
    for (const origin of ["https://evil.example", "null", "http://127.0.0.1", "http://localhost:8000"]) {
      const plain = await raw(url(), { method: "GET", path: "/v1/models", headers: { origin } })
      expect(header(plain, "access-control-allow-origin"), origin).toBeUndefined()
      const pre = await preflight(url(), origin)
      expect(pre.status, origin).toBe(403)
      expect(header(pre, "access-control-allow-origin"), origin).toBeUndefined()
      expect(JSON.parse(pre.text).error).toMatchObject({ type: "permission_error", code: "origin_not_allowed" })
    }
  })
})

describe("CORS with --allowed-origins", () => {
  const allowed = "https://app.example"
  const url = inProcess(["--allowed-origins", allowed])

  it("allows exactly the listed origin, and no look-alike", async () => {
    const pre = await preflight(url(), allowed)
    expect(pre.status).toBe(204)
    expect(header(pre, "access-control-allow-origin")).toBe(allowed)
    expect(header(pre, "access-control-allow-credentials")).toBeUndefined()
    const plain = await raw(url(), { method: "GET", path: "/v1/models", headers: { origin: allowed } })
    expect(header(plain, "access-control-allow-origin")).toBe(allowed)
    expect(header(plain, "vary")).toMatch(/origin/i)
    const lookAlikes = [
      "https://app.example.evil.com",
      "https://evil.com/https://app.example",
      "https://app.example:444",
      "http://app.example",
      "HTTPS://APP.EXAMPLE",
      "https://app.example/",
      "https://sub.app.example",
      "null"
    ]
    for (const origin of lookAlikes) {
      const denied = await preflight(url(), origin)
      expect(denied.status, origin).toBe(403)
      expect(header(denied, "access-control-allow-origin"), origin).toBeUndefined()
      const get = await raw(url(), { method: "GET", path: "/v1/models", headers: { origin } })
      expect(header(get, "access-control-allow-origin"), origin).toBeUndefined()
    }
  })
})
