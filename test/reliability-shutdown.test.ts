/**
 * SIGTERM in the middle of a load, on a `vdiff serve` child process with the native engine:
 *  - with a shutdown timeout long enough, every request in flight — running or queued — completes with
 *    its usual answer, requests arriving meanwhile are refused with 503 `draining` (or find the socket
 *    closed), and the process exits 0;
 *  - with a short timeout, whatever is still running when it passes ends cleanly (a JSON request gets
 *    503 `draining`, a stream an error event and `data: [DONE]`), nothing is left without an answer, and
 *    the process still exits 0, soon after the timeout.
 */
import { describe, expect, it } from "vitest"
import { answersAlone, checkStream, requestSpecs, type RequestSpec, send, specAt } from "./stress/load.js"
import { engineStats, size, sleep, startServe, timeLimit } from "./stress/serve.js"

/**
 * Waits until all of `requests` sent have reached the scheduler (running, queued or finished since
 * `finishedBefore`), with at least `waiting` of them queued.
 */
const awaitSubmitted = async (url: string, requests: number, finishedBefore: number, waiting: number) => {
  const start = Date.now()
  for (;;) {
    const { scheduler } = await engineStats(url)
    const seen = scheduler.running + scheduler.waiting + scheduler.requests_finished - finishedBefore
    if (seen >= requests && scheduler.waiting >= waiting) return scheduler
    if (Date.now() - start > 20_000) throw new Error(`requests never all submitted: ${JSON.stringify(scheduler)}`)
    await sleep(5)
  }
}

/**
 * Once readiness says draining, sends new requests every 25 ms until the server stops answering; each
 * must be refused as draining. Returns how many were.
 */
const probeWhileDraining = async (url: string, stopped: Promise<unknown>) => {
  for (let i = 0; ; i++) {
    const ready = await fetch(url + "/health/ready")
    if (ready.status === 503) break
    if (i > 500) throw new Error("readiness never turned 503 after SIGTERM")
    await sleep(10)
  }
  let refused = 0
  let done = false
  void stopped.then(() => (done = true))
  while (!done) {
    let reply: { status: number; body: any; retryAfter: string | null }
    try {
      const response = await fetch(url + "/v1/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ prompt: "late", max_tokens: 4 })
      })
      reply = { status: response.status, body: await response.json(), retryAfter: response.headers.get("retry-after") }
    } catch {
      break // the server has closed its socket
    }
    expect(reply.status, JSON.stringify(reply.body)).toBe(503)
    expect(reply.body.error.code).toBe("draining")
    expect(reply.retryAfter).not.toBeNull()
    refused++
    await sleep(25)
  }
  return refused
}

describe("SIGTERM under load", () => {
  it(
    "drains: every running and queued request completes, new ones get 503, exit 0",
    async () => {
      const server = await startServe({
        flags: ["--max-concurrent-requests", "4", "--max-queue-size", "64", "--shutdown-timeout", "120"]
      })
      const specs = requestSpecs(8, 11)
      const expected = await answersAlone(server.url, specs)
      const clients = size(10, 32)
      const finishedBefore = (await engineStats(server.url)).scheduler.requests_finished
      const inFlight = Array.from({ length: clients }, (_, i) => ({ spec: specAt(specs, i), outcome: send(server.url, specAt(specs, i)) }))
      const busy = await awaitSubmitted(server.url, clients, finishedBefore, 1)
      const signalled = performance.now()
      server.child.kill("SIGTERM")
      const refused = await probeWhileDraining(server.url, server.exited)
      for (const { spec, outcome } of inFlight) {
        const result = await outcome
        expect(result.kind, JSON.stringify(result)).toBe("ok")
        if (result.kind === "ok") expect(result.texts).toEqual(expected.get(spec.key))
      }
      expect(await server.exited).toBe(0)
      const messages = server.logs.map((entry) => String(entry["message"]))
      expect(messages.at(-1)).toBe("drained; closing the server and releasing the model")
      console.log(
        `SIGTERM drain: ${clients} requests in flight (${busy.running} running, ${busy.waiting} queued at the signal) all ` +
          `completed exactly; ` +
          `${refused} late requests refused with 503 draining; exit 0 after ${Math.round(performance.now() - signalled)} ms`
      )
    },
    timeLimit()
  )

  it(
    "ends what is left at --shutdown-timeout cleanly, answers every request, and exits 0",
    async () => {
      const timeoutS = 1
      const server = await startServe({
        flags: ["--max-concurrent-requests", "4", "--max-queue-size", "64", "--shutdown-timeout", String(timeoutS)]
      })
      const clients = size(8, 24)
      const finishedBefore = (await engineStats(server.url)).scheduler.requests_finished
      const long = (i: number): RequestSpec => {
        const stream = i % 2 === 0
        const body = {
          prompt: ["ROMEO:\n", "JULIET:\n", "HAMLET:\n"][i % 3],
          max_tokens: 160,
          diffusion_steps: 160,
          ...(stream ? { stream: true } : {})
        }
        return { key: `long${i}`, path: "/v1/completions", stream, n: 1, body }
      }
      const results = Array.from({ length: clients }, async (_, i) => {
        const spec = long(i)
        try {
          const response = await fetch(server.url + spec.path, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify(spec.body)
          })
          return { spec, status: response.status, text: await response.text() }
        } catch (error) {
          return { spec, status: 0, text: String(error) }
        }
      })
      await awaitSubmitted(server.url, clients, finishedBefore, 1)
      const signalled = performance.now()
      server.child.kill("SIGTERM")
      const counts = { completed: 0, streamEnded: 0, refused: 0 }
      for (const { spec, status, text } of await Promise.all(results)) {
        expect(status, text).not.toBe(0)
        // Still queued at the timeout, a stream has not started either: both get their own 503.
        if (status === 503) {
          expect(JSON.parse(text).error).toMatchObject({ type: "service_unavailable_error", code: "draining" })
          counts.refused++
          continue
        }
        expect(status, text).toBe(200)
        if (!spec.stream) {
          counts.completed++
          continue
        }
        const events = text.split("\n\n").filter((event) => event !== "")
        expect(events.at(-1)).toBe("data: [DONE]")
        const last = JSON.parse(events.at(-2)!.slice("data: ".length))
        if (last.error !== undefined) {
          expect(last.error).toMatchObject({ type: "service_unavailable_error", code: "draining" })
          counts.streamEnded++
        } else {
          expect("texts" in checkStream(spec, text)).toBe(true)
          counts.completed++
        }
      }
      const code = await server.exited
      const exitMs = Math.round(performance.now() - signalled)
      expect(code).toBe(0)
      // Drained work takes the timeout; what is ended after it goes out at once.
      expect(exitMs).toBeLessThan(timeoutS * 1000 + 10_000)
      expect(counts.streamEnded + counts.refused).toBeGreaterThan(0)
      console.log(
        `SIGTERM with --shutdown-timeout ${timeoutS}: ${clients} requests: ${counts.completed} completed, ` +
          `${counts.streamEnded} streams ended with a draining error event, ${counts.refused} got 503 draining (JSON answers cut, or still queued); ` +
          `none lost; exit 0 after ${exitMs} ms`
      )
    },
    timeLimit()
  )

  it(
    "a second signal during the drain ends the process at once, saying so on stderr, with the signal's status",
    async () => {
      for (const signal of ["SIGTERM", "SIGINT"] as const) {
        const server = await startServe({ flags: ["--max-concurrent-requests", "2", "--shutdown-timeout", "120"] })
        const finishedBefore = (await engineStats(server.url)).scheduler.requests_finished
        const body = JSON.stringify({ prompt: "ROMEO:\n", max_tokens: 200, diffusion_steps: 200 })
        // Eight long requests, two at a time: seconds of work, so the drain still runs at the second signal.
        const requests = Array.from({ length: 8 }, () =>
          fetch(server.url + "/v1/completions", { method: "POST", headers: { "content-type": "application/json" }, body }).then(
            (response) => response.status,
            () => 0
          )
        )
        await awaitSubmitted(server.url, 8, finishedBefore, 1)
        server.child.kill(signal)
        await new Promise((resolve) => setTimeout(resolve, 300))
        server.child.kill(signal)
        expect(await server.exited).toBe(signal === "SIGTERM" ? 143 : 130)
        expect(server.output()).toContain(`vdiff serve: a second ${signal} during the shutdown: exiting now`)
        await Promise.all(requests)
      }
    },
    timeLimit()
  )
})
