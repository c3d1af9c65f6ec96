import { describe, expect, it } from "@effect/vitest"
import { once } from "node:events"
import { connect } from "node:net"
import { Effect, HashMap, Logger, LogLevel } from "effect"
import { postJson, request, settings, startServer } from "./http-helpers.js"

/** Tests run the server quietly; the access-log test captures the log instead. */
const quiet = Effect.provide(Logger.minimumLogLevel(LogLevel.None))

const withServer = <A, E>(argv: ReadonlyArray<string>, body: (url: string) => Effect.Effect<A, E>) =>
  Effect.gen(function* () {
    const config = yield* Effect.promise(() => settings(argv))
    const server = yield* startServer({ config })
    return yield* body(server.url)
  }).pipe(quiet)

const expectErrorBody = (json: any, type: string, code: string | null, requestId: string | null) => {
  expect(json).toEqual({
    error: { message: expect.any(String), type, param: expect.toBeOneOf([null, expect.any(String)]), code, request_id: requestId }
  })
}

const securityHeaders = {
  "x-content-type-options": "nosniff",
  "x-frame-options": "DENY",
  "x-xss-protection": "0",
  "strict-transport-security": "max-age=31536000; includeSubDomains"
}

const expectSecurityHeaders = (headers: Headers) => {
  for (const [name, value] of Object.entries(securityHeaders)) expect(headers.get(name), name).toBe(value)
}

describe("auth", () => {
  it.scopedLive("lets every request through when no key is configured", () =>
    withServer([], (url) =>
      Effect.gen(function* () {
        expect((yield* request(url + "/v1/models")).status).toBe(200)
        expect((yield* request(url + "/v1/engine/stats")).status).toBe(200)
      })
    )
  )

  it.scopedLive("answers 401 without a key and with a wrong one (missing_api_key, invalid_api_key), 200 with any configured key", () =>
    withServer(["--api-key", "key-one,key-two"], (url) =>
      Effect.gen(function* () {
        const missing = yield* request(url + "/v1/models")
        expect(missing.status).toBe(401)
        expect(missing.headers.get("www-authenticate")).toBe(`Bearer realm="vdiff"`)
        expectErrorBody(missing.json, "invalid_request_error", "missing_api_key", missing.headers.get("x-request-id"))

        const basic = yield* request(url + "/v1/models", { headers: { authorization: "Basic a2V5LW9uZQ==" } })
        expect(basic.status).toBe(401)

        const wrong = yield* request(url + "/v1/models", { headers: { authorization: "Bearer key-three" } })
        expect(wrong.status).toBe(401)
        expect(wrong.headers.get("www-authenticate")).toBe(`Bearer realm="vdiff"`)
        expectErrorBody(wrong.json, "invalid_request_error", "invalid_api_key", wrong.headers.get("x-request-id"))
        expect(wrong.text).not.toContain("key-three")

        // A prefix or an extension of a key is not the key.
        for (const key of ["key-on", "key-one1", "KEY-ONE"]) {
          expect((yield* request(url + "/v1/models", { headers: { authorization: `Bearer ${key}` } })).status).toBe(401)
        }
        for (const key of ["key-one", "key-two"]) {
          const ok = yield* request(url + "/v1/models", { headers: { authorization: `Bearer ${key}` } })
          expect(ok.status).toBe(200)
          expect(ok.json.object).toBe("list")
        }
        const stats = yield* request(url + "/v1/engine/stats")
        expect(stats.status).toBe(401)
        const post = yield* postJson(url + "/v1/completions", { model: "m", prompt: "x" })
        expect(post.status).toBe(401)
      })
    )
  )

  it.scopedLive("exempts the probes, /version and /metrics", () =>
    withServer(["--api-key", "secret"], (url) =>
      Effect.gen(function* () {
        for (const path of ["/health", "/health/live", "/health/ready", "/version", "/metrics"]) {
          expect((yield* request(url + path)).status, path).toBe(200)
        }
      })
    )
  )
})

describe("routing errors", () => {
  it.scopedLive("answers 404 for an unknown route and 405 with Allow for a wrong method", () =>
    withServer([], (url) =>
      Effect.gen(function* () {
        const missing = yield* request(url + "/v2/completions")
        expect(missing.status).toBe(404)
        expectErrorBody(missing.json, "invalid_request_error", "route_not_found", missing.headers.get("x-request-id"))

        const getCompletions = yield* request(url + "/v1/completions")
        expect(getCompletions.status).toBe(405)
        expect(getCompletions.headers.get("allow")).toBe("POST")
        expectErrorBody(getCompletions.json, "invalid_request_error", "method_not_allowed", getCompletions.headers.get("x-request-id"))

        const postHealth = yield* request(url + "/health", { method: "POST" })
        expect(postHealth.status).toBe(405)
        expect(postHealth.headers.get("allow")).toBe("GET, HEAD")

        const deleteModel = yield* request(url + "/v1/models/some-model", { method: "DELETE" })
        expect(deleteModel.status).toBe(405)
        expect(deleteModel.headers.get("allow")).toBe("GET, HEAD")
      })
    )
  )
})

describe("body size limit", () => {
  it.scopedLive("answers 413 when Content-Length or the body itself is over the limit", () =>
    withServer(["--max-body-size", "100"], (url) =>
      Effect.gen(function* () {
        const big = JSON.stringify({ model: "m", prompt: "x".repeat(200) })
        const declared = yield* request(url + "/v1/completions", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: big
        })
        expect(declared.status).toBe(413)
        expectErrorBody(declared.json, "invalid_request_error", "body_too_large", declared.headers.get("x-request-id"))

        // No Content-Length: a chunked body is cut off while it is read.
        const chunks = [big.slice(0, 60), big.slice(60)]
        const streamed = yield* request(url + "/v1/completions", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: new ReadableStream({
            start(controller) {
              for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk))
              controller.close()
            }
          }),
          duplex: "half"
        } as RequestInit)
        expect(streamed.status).toBe(413)

        // Under the limit the handler reads the body (and here refuses the unknown model).
        const small = yield* postJson(url + "/v1/completions", { model: "m", prompt: "x" })
        expect(small.status).toBe(404)
        expect(small.json.error.code).toBe("model_not_found")
      })
    )
  )

  it.scopedLive("lets a client that uploads a whole oversized body before reading get its 413", () =>
    withServer([], (url) =>
      Effect.gen(function* () {
        // 2 MiB declared in Content-Length against the default 1 MiB limit, from a client that, like curl
        // or most HTTP libraries, sends all of it before it reads. The server reads and discards the body
        // before it answers and closes; closing on unread bytes would reset the connection, and the
        // client would get ECONNRESET (or EPIPE) instead of the 413.
        const upload = yield* uploadThenRead(url, "/v1/completions", 2 * 1024 * 1024)
        expect(upload.error).toBeUndefined()
        const [head, body] = upload.text.split("\r\n\r\n")
        expect(head).toMatch(/^HTTP\/1\.1 413 /)
        expect(head).toMatch(/\r\nconnection: close\r\n/i)
        expectErrorBody(JSON.parse(body!), "invalid_request_error", "body_too_large", /x-request-id: (\S+)/i.exec(head!)![1]!)

        // The same without Content-Length, chunked.
        const text = "x".repeat(2 * 1024 * 1024)
        const streamed = yield* request(url + "/v1/completions", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: new ReadableStream({
            start(controller) {
              for (let at = 0; at < text.length; at += 64 * 1024) {
                controller.enqueue(new TextEncoder().encode(text.slice(at, at + 64 * 1024)))
              }
              controller.close()
            }
          }),
          duplex: "half"
        } as RequestInit)
        expect(streamed.status).toBe(413)
        expect(streamed.json.error.code).toBe("body_too_large")
      })
    )
  )
})

/**
 * Over a raw socket: a POST of `bytes` bytes declared in Content-Length, written in full (with a pause
 * after the first 64 KiB), and only then the answer read to the end of the connection. `error` is the
 * code of whatever failed on the way.
 */
const uploadThenRead = (url: string, path: string, bytes: number) =>
  Effect.promise(async () => {
    const { hostname, port } = new URL(url)
    const socket = connect(Number(port), hostname)
    let error: string | undefined
    socket.on("error", (cause: NodeJS.ErrnoException) => (error ??= cause.code ?? String(cause)))
    const closed = once(socket, "close")
    try {
      await once(socket, "connect")
      socket.write(
        `POST ${path} HTTP/1.1\r\nhost: ${hostname}:${port}\r\ncontent-type: application/json\r\n` + `content-length: ${bytes}\r\n\r\n`
      )
      const piece = Buffer.alloc(64 * 1024, "x")
      for (let sent = 0; sent < bytes && !socket.destroyed; sent += piece.length) {
        // A connection that has gone never drains.
        if (!socket.write(piece)) await Promise.race([once(socket, "drain"), closed])
        // A slow link: the server has the headers and the start of the body long before the rest.
        if (sent === 0) await new Promise((resolve) => setTimeout(resolve, 100))
      }
      const chunks: Array<Buffer> = []
      socket.on("data", (chunk: Buffer) => chunks.push(chunk))
      await closed
      return { text: Buffer.concat(chunks).toString("utf8"), error }
    } catch (cause) {
      return { text: "", error: error ?? String(cause) }
    }
  })

describe("CORS", () => {
  const preflight = (url: string, origin: string) =>
    request(url + "/v1/completions", {
      method: "OPTIONS",
      headers: {
        origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-stainless-os"
      }
    })

  it.scopedLive("allows no cross-origin access by default", () =>
    withServer([], (url) =>
      Effect.gen(function* () {
        const refused = yield* preflight(url, "https://app.example")
        expect(refused.status).toBe(403)
        expect(refused.headers.get("access-control-allow-origin")).toBeNull()
        expectErrorBody(refused.json, "permission_error", "origin_not_allowed", refused.headers.get("x-request-id"))
        const simple = yield* request(url + "/v1/models", { headers: { origin: "https://app.example" } })
        expect(simple.status).toBe(200)
        expect(simple.headers.get("access-control-allow-origin")).toBeNull()
        // What a page can POST anywhere without a preflight (a form, plain text) is refused before it runs;
        // JSON from a page (the playground's own requests) and bodies from clients that send no Origin run.
        const body = JSON.stringify({ prompt: "ROMEO:", max_tokens: 1 })
        for (const type of ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]) {
          const form = yield* request(url + "/v1/completions", {
            method: "POST",
            headers: { origin: "https://evil.example", "content-type": type },
            body
          })
          expect(form.status, type).toBe(403)
          expectErrorBody(form.json, "permission_error", "origin_not_allowed", form.headers.get("x-request-id"))
        }
        const page = yield* postJson(url + "/v1/completions", { prompt: "ROMEO:", max_tokens: 1 }, { origin: url })
        expect(page.status).toBe(200)
        const curl = yield* request(url + "/v1/completions", {
          method: "POST",
          headers: { "content-type": "application/x-www-form-urlencoded" },
          body
        })
        expect(curl.status).toBe(200)
      })
    )
  )

  it.scopedLive("answers preflights of listed origins before auth and refuses others", () =>
    withServer(["--allowed-origins", "https://app.example,https://other.example", "--api-key", "k"], (url) =>
      Effect.gen(function* () {
        const allowed = yield* preflight(url, "https://app.example")
        expect(allowed.status).toBe(204)
        expect(allowed.headers.get("access-control-allow-origin")).toBe("https://app.example")
        expect(allowed.headers.get("access-control-allow-methods")).toBe("GET, POST, OPTIONS")
        expect(allowed.headers.get("access-control-allow-headers")).toBe("authorization, content-type, x-stainless-os")
        expect(allowed.headers.get("access-control-max-age")).toBe("600")
        expect(allowed.headers.get("vary")).toBe("Origin")
        expectSecurityHeaders(allowed.headers)

        const refused = yield* preflight(url, "https://evil.example")
        expect(refused.status).toBe(403)
        expect(refused.headers.get("access-control-allow-origin")).toBeNull()

        const actual = yield* request(url + "/v1/models", {
          headers: { origin: "https://other.example", authorization: "Bearer k" }
        })
        expect(actual.status).toBe(200)
        expect(actual.headers.get("access-control-allow-origin")).toBe("https://other.example")
        expect(actual.headers.get("access-control-expose-headers")).toContain("x-request-id")
        // Errors carry the CORS headers too, so the page can read them.
        const unauthorized = yield* request(url + "/v1/models", { headers: { origin: "https://app.example" } })
        expect(unauthorized.status).toBe(401)
        expect(unauthorized.headers.get("access-control-allow-origin")).toBe("https://app.example")
      })
    )
  )

  it.scopedLive("allows any origin with *", () =>
    withServer(["--allowed-origins", "*"], (url) =>
      Effect.gen(function* () {
        const allowed = yield* preflight(url, "https://anywhere.example")
        expect(allowed.status).toBe(204)
        expect(allowed.headers.get("access-control-allow-origin")).toBe("*")
        expect(allowed.headers.get("vary")).toBeNull()
      })
    )
  )
})

describe("request id and security headers", () => {
  it.scopedLive("are on successes, errors and preflights alike", () =>
    withServer(["--api-key", "k"], (url) =>
      Effect.gen(function* () {
        const replies = [
          yield* request(url + "/health"),
          yield* request(url + "/v1/models", { headers: { authorization: "Bearer k" } }),
          yield* request(url + "/nowhere"),
          yield* request(url + "/v1/models"),
          yield* request(url + "/v1/models", { headers: { authorization: "Bearer no" } }),
          yield* request(url + "/v1/completions", {
            method: "OPTIONS",
            headers: { origin: "https://x.example", "access-control-request-method": "POST" }
          })
        ]
        // Auth comes before routing: an unknown path without a key is 401, not 404.
        expect(replies.map((r) => r.status)).toEqual([200, 200, 401, 401, 401, 403])
        const ids = new Set<string>()
        for (const reply of replies) {
          expectSecurityHeaders(reply.headers)
          const id = reply.headers.get("x-request-id")!
          expect(id).toMatch(/^[0-9a-f]{32}$/)
          ids.add(id)
          if (reply.status >= 400) expect(reply.json.error.request_id).toBe(id)
        }
        expect(ids.size).toBe(replies.length)
      })
    )
  )

  it.scopedLive("takes a sane incoming X-Request-ID and replaces an insane one", () =>
    withServer([], (url) =>
      Effect.gen(function* () {
        const sane = yield* request(url + "/nowhere", { headers: { "x-request-id": "trace-42.a_B" } })
        expect(sane.headers.get("x-request-id")).toBe("trace-42.a_B")
        expect(sane.json.error.request_id).toBe("trace-42.a_B")
        const models = yield* request(url + "/v1/models", { headers: { "x-request-id": "abc" } })
        expect(models.headers.get("x-request-id")).toBe("abc")
        for (const bad of ["has space", "x".repeat(129), "semi;colon", "<script>"]) {
          const reply = yield* request(url + "/nowhere", { headers: { "x-request-id": bad } })
          expect(reply.headers.get("x-request-id")).toMatch(/^[0-9a-f]{32}$/)
        }
        // The id is the suffix of a completion's id.
        const name = models.json.data[0].id
        const completion = yield* postJson(
          url + "/v1/completions",
          { model: name, prompt: "Hi", max_tokens: 3 },
          { "x-request-id": "req-7" }
        )
        expect(completion.status).toBe(200)
        expect(completion.json.id).toBe("cmpl-req-7")
      })
    )
  )
})

describe("access log", () => {
  it.scopedLive("writes one structured line per request, without keys or the Authorization header", () =>
    Effect.gen(function* () {
      const lines: Array<{ message: unknown; annotations: Record<string, unknown> }> = []
      const capture = Logger.make(({ annotations, message }) => {
        lines.push({ message, annotations: Object.fromEntries(HashMap.toEntries(annotations)) })
      })
      const config = yield* Effect.promise(() => settings(["--api-key", "topsecret-key"]))
      const url = yield* startServer({ config }).pipe(
        Effect.map((s) => s.url),
        Effect.provide(Logger.replace(Logger.defaultLogger, capture))
      )
      yield* request(url + "/v1/models?x=1", { headers: { authorization: "Bearer topsecret-key", "x-request-id": "log-1" } })
      yield* request(url + "/v1/models", { headers: { authorization: "Bearer wrong-secret" } })
      const access = lines.filter((l) => l.annotations["path"] !== undefined)
      expect(access).toHaveLength(2)
      expect(access[0]!.annotations).toEqual({
        request_id: "log-1",
        method: "GET",
        path: "/v1/models",
        status: 200,
        duration_ms: expect.any(Number),
        client: "127.0.0.1"
      })
      expect(access[1]!.annotations["status"]).toBe(401)
      const everything = JSON.stringify(lines)
      expect(everything).not.toContain("topsecret")
      expect(everything).not.toContain("wrong-secret")
      expect(everything.toLowerCase()).not.toContain("authorization")
    })
  )

  it.scopedLive("logs probes and scrapes that succeed at debug level, so they do not drown the requests at info", () =>
    Effect.gen(function* () {
      const lines: Array<{ level: string; path: unknown; status: unknown }> = []
      const capture = Logger.make(({ annotations, logLevel }) => {
        const fields = Object.fromEntries(HashMap.toEntries(annotations))
        if (fields["path"] !== undefined) lines.push({ level: logLevel.label, path: fields["path"], status: fields["status"] })
      })
      const config = yield* Effect.promise(() => settings([]))
      const url = yield* startServer({ config }).pipe(
        Effect.map((s) => s.url),
        Effect.provide(Logger.replace(Logger.defaultLogger, capture)),
        Effect.provide(Logger.minimumLogLevel(LogLevel.Debug))
      )
      for (const path of ["/health", "/health/live", "/health/ready", "/metrics", "/v1/models", "/health/nothing"]) {
        yield* request(url + path)
      }
      expect(lines).toEqual([
        { level: "DEBUG", path: "/health", status: 200 },
        { level: "DEBUG", path: "/health/live", status: 200 },
        { level: "DEBUG", path: "/health/ready", status: 200 },
        { level: "DEBUG", path: "/metrics", status: 200 },
        { level: "INFO", path: "/v1/models", status: 200 },
        { level: "INFO", path: "/health/nothing", status: 404 }
      ])
    })
  )
})
