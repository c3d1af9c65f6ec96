/**
 * Load on a `vdiff serve` child process (native engine, embedded model) over loopback.
 *
 *  - A sustained mix of completions and chat, streaming and not, from more clients than the batch has
 *    slots: nothing lost, nothing malformed, every answer exactly the answer that request gets alone
 *    (batching must not change answers), no 503 while the queue has room, the batch never over its size;
 *    latency percentiles and the server's memory before and after are printed. Memory is read after a
 *    full garbage collection in the server (test/stress/gc-on-signal.ts), so the figures compare live
 *    memory rather than two points of V8's sawtooth. Bounds: the live JS heap grows by less than 10% and
 *    the RSS by less than 20% from the end of the warm-up to the end of the run.
 *  - 503 comes exactly when the queue is full: with 2 slots and a queue of 2, the fifth concurrent
 *    request is refused with queue_full and Retry-After, and as soon as a slot frees the next is taken.
 *  - Overload (many more clients than slots + queue): some requests get 503, every other one is still
 *    answered exactly, and the queue never holds more than its capacity.
 *
 * `npm test` runs a short version; `npm run test:stress` (VDIFF_STRESS=1) the full one.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { answersAlone, requestSpecs, runLoad } from "./stress/load.js"
import { awaitIdle, engineStats, fullSize, type ServeProcess, size, sleep, startServe, timeLimit } from "./stress/serve.js"

const date = () => new Date().toISOString().slice(0, 10)

/** The live JS heap (after a full GC) and the RSS, in MiB. */
const memory = async (server: Awaited<ReturnType<typeof startServe>>) => {
  await server.collectGarbage()
  const health = (await (await fetch(server.url + "/health")).json()) as any
  return { heapMiB: health.memory.heap_used_bytes / 2 ** 20, rssMiB: server.rssKb() / 1024 }
}

const mib = (x: number) => `${x.toFixed(1)} MiB`

describe("load", () => {
  it(
    "a sustained mix above the batch size: nothing lost or malformed, exact answers, bounded memory",
    async () => {
      const slots = 4
      const clients = size(8, 16)
      const server = await startServe({
        gcHook: true,
        flags: ["--max-concurrent-requests", String(slots), "--max-queue-size", "64"]
      })
      try {
        const specs = requestSpecs(size(6, 12))
        const expected = await answersAlone(server.url, specs)
        const warmUp = await runLoad({ url: server.url, clients, requests: size(8, 200), durationMs: 120_000, specs, expected })
        expect(warmUp.ok).toBe(warmUp.sent)
        const before = await memory(server)

        let maxWaiting = 0
        let maxRunning = 0
        const figures = await runLoad({
          url: server.url,
          clients,
          requests: size(24, 2000),
          durationMs: size(25_000, 480_000),
          specs,
          expected,
          sample: async () => {
            const { scheduler } = await engineStats(server.url)
            maxWaiting = Math.max(maxWaiting, scheduler.waiting)
            maxRunning = Math.max(maxRunning, scheduler.running_sequences)
          },
          sampleEveryMs: 200
        })
        const after = await memory(server)
        const { stats } = await awaitIdle(server.url)

        console.log(
          [
            `load (${date()}, ${fullSize ? "full" : "short"} run): ${clients} clients, batch size ${slots}, embedded model, ` +
              `completions+chat, half streaming, n 1-2, 8-32 tokens`,
            `  sent ${figures.sent}, served ${figures.ok} (${figures.streamed} streamed), 503 ${figures.queueFull}, ` +
              `malformed ${figures.malformed}, lost ${figures.lost}, answers differing from alone ${figures.mismatched}`,
            `  latency p50 ${figures.p50Ms} ms, p99 ${figures.p99Ms} ms, max ${figures.maxMs} ms; stream first bytes p50 ` +
              `${figures.firstEventP50Ms} ms; ${figures.requestsPerSecond} req/s over ${(figures.wallMs / 1000).toFixed(1)} s`,
            `  scheduler: at most ${maxRunning} sequences running, ${maxWaiting} requests waiting; engine live after: ` +
              `${stats.engine.live_sequences}`,
            `  memory after GC: heap ${mib(before.heapMiB)} -> ${mib(after.heapMiB)} ` +
              `(${((after.heapMiB / before.heapMiB - 1) * 100).toFixed(1)}%), RSS ${mib(before.rssMiB)} -> ${mib(after.rssMiB)} ` +
              `(${((after.rssMiB / before.rssMiB - 1) * 100).toFixed(1)}%)`
          ].join("\n")
        )
        expect(figures.problems).toEqual([])
        expect(figures.ok).toBe(figures.sent)
        expect(figures.lost + figures.malformed + figures.mismatched + figures.queueFull).toBe(0)
        expect(maxRunning).toBeLessThanOrEqual(slots)
        expect(maxRunning).toBe(slots)
        expect(stats.engine.live_sequences).toBe(0)
        expect(after.heapMiB).toBeLessThan(before.heapMiB * 1.1)
        expect(after.rssMiB).toBeLessThan(before.rssMiB * 1.2)
      } finally {
        expect(await server.stop()).toBe(0)
      }
    },
    timeLimit()
  )
})

describe("a full queue (2 slots, a queue of 2)", () => {
  let server: ServeProcess

  beforeAll(async () => {
    server = await startServe({ flags: ["--max-concurrent-requests", "2", "--max-queue-size", "2"] })
  })
  afterAll(async () => {
    expect(await server.stop()).toBe(0)
  })

  it(
    "503 exactly when the queue is full, and never otherwise",
    async () => {
      const post = (body: Record<string, unknown>, signal?: AbortSignal) =>
        fetch(server.url + "/v1/completions", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify(body),
          ...(signal === undefined ? {} : { signal })
        })
      // Long whatever the model writes and however loaded the machine: early_stop false denoises every step
      // even if the answer ends early (its greedy answer runs to the length), and 480 steps over a 484-token
      // canvas take about 20 s at one thread, so no slot frees before the test aborts it. (192 steps, about
      // 2 s, once let a stream finish while a loaded CI machine was still polling the queue.)
      const long = { prompt: "ROMEO:\n", max_tokens: 480, diffusion_steps: 480, early_stop: false }
      const short = { prompt: "JULIET:\n", max_tokens: 4 }
      const until = async (check: (s: Awaited<ReturnType<typeof engineStats>>["scheduler"]) => boolean) => {
        for (let i = 0; !check((await engineStats(server.url)).scheduler); i++) {
          if (i > 2000) throw new Error("the scheduler never reached the expected state")
          await sleep(5)
        }
      }
      // Two streams fill both slots.
      const streams = [new AbortController(), new AbortController()]
      for (const controller of streams) {
        const response = await post({ ...long, stream: true }, controller.signal)
        expect(response.status).toBe(200)
      }
      await until((s) => s.running === 2)
      // Two more fill the queue.
      const queued = [new AbortController(), new AbortController()]
      const queuedReplies = queued.map((controller) => post(long, controller.signal).catch(() => undefined))
      await until((s) => s.waiting === 2)
      // Full: every further request is refused at once, with the OpenAI body and Retry-After.
      for (let i = 0; i < 3; i++) {
        const response = await post(short)
        const body = (await response.json()) as any
        expect(response.status).toBe(503)
        expect(body.error).toMatchObject({ type: "service_unavailable_error", code: "queue_full", param: null })
        expect(Number(response.headers.get("retry-after"))).toBeGreaterThanOrEqual(1)
      }
      expect(((await (await fetch(server.url + "/health")).json()) as any).status).toBe("degraded")
      // One stream leaves: a queued request takes its slot, and the queue has room for exactly one again.
      streams[0]!.abort()
      await until((s) => s.waiting === 1 && s.running === 2)
      const admitted = post(short)
      await until((s) => s.waiting === 2)
      const refused = await post(short)
      expect(refused.status).toBe(503)
      // Let the rest go: the request that found room is answered.
      streams[1]!.abort()
      for (const controller of queued) controller.abort()
      await Promise.all(queuedReplies)
      const answer = await admitted
      expect(answer.status).toBe(200)
      expect(((await answer.json()) as any).choices).toHaveLength(1)
      await awaitIdle(server.url)
    },
    timeLimit()
  )

  it(
    "overload: some requests get 503, all others are answered exactly, the queue beyond the batch's free room stays within its capacity",
    async () => {
      const specs = requestSpecs(6, 5)
      const expected = await answersAlone(server.url, specs)
      let maxWaiting = 0
      // Admission's rule: the requests waiting beyond what the batch's free room takes at the next step
      // stay within the queue's capacity. A request the free room will take still counts as waiting until
      // that step, so `waiting` alone may briefly exceed the capacity by the free slots.
      let maxBeyondRoom = 0
      const figures = await runLoad({
        url: server.url,
        clients: 8,
        requests: size(400, 5000),
        durationMs: size(4_000, 120_000),
        specs,
        expected,
        sample: async () => {
          const { scheduler } = await engineStats(server.url)
          maxWaiting = Math.max(maxWaiting, scheduler.waiting)
          maxBeyondRoom = Math.max(maxBeyondRoom, scheduler.waiting - Math.max(0, 2 - scheduler.running_sequences))
        },
        sampleEveryMs: 50,
        pauseAfterQueueFullMs: 250
      })
      console.log(
        `overload (${date()}): 8 clients on 2 slots + a queue of 2: sent ${figures.sent}, served ${figures.ok}, ` +
          `503 queue_full ${figures.queueFull}, malformed ${figures.malformed}, lost ${figures.lost}, ` +
          `most waiting ${maxWaiting}; served p50 ${figures.p50Ms} ms, p99 ${figures.p99Ms} ms`
      )
      expect(figures.problems).toEqual([])
      expect(figures.queueFull).toBeGreaterThan(0)
      expect(figures.ok + figures.queueFull).toBe(figures.sent)
      expect(maxBeyondRoom).toBeLessThanOrEqual(2)
      expect(maxWaiting).toBeLessThanOrEqual(4)
      await awaitIdle(server.url)
    },
    timeLimit()
  )
})
