/**
 * A rolling restart of 3 `vdiff serve` replicas behind HAProxy (Debian's; .ci/run installs it), under a
 * steady load of streaming and non-streaming requests: each replica in turn gets SIGTERM, drains, exits 0
 * and is started again, while the load goes on. Nothing may fail and no stream may be cut: every request
 * sent is answered in full, with the same text it gets alone (bench/lb/rolling-restart.ts does the work;
 * bench/lb/run is the longer run whose figures the README gives).
 *
 * The load is modest — 3 requests in flight, answers of at most 16 tokens — because this machine has 2
 * cores shared with others; the time limit guards against a hang, it is not a speed target.
 */
import { describe, expect, it } from "vitest"
import { haproxyConfig, haproxyVersion, rollingRestart } from "../bench/lb/rolling-restart.js"

const haproxy = haproxyVersion()

describe("rolling restart behind HAProxy", () => {
  it("the balancer health-checks readiness and retries refused or failed connections elsewhere", () => {
    const config = haproxyConfig({ port: 1, socket: "/x", replicas: [{ name: "r0", port: 2 }] })
    expect(config).toContain("http-check send meth GET uri /health/ready")
    expect(config).toMatch(/retry-on conn-failure empty-response 503/)
    expect(config).toMatch(/option redispatch 1/)
    expect(config).toContain("server r0 127.0.0.1:2")
  })

  it.skipIf(haproxy === undefined)(
    "3 replicas restarted one by one under load: 0 failed, 0 truncated streams, every replica exits 0",
    async () => {
      const figures = await rollingRestart({
        replicas: 3,
        clients: 3,
        steadyMs: 10_000,
        settleMs: 2_000,
        maxTokens: 16,
        threads: 1,
        distinct: 12,
        burst: 3,
        timeoutMs: 540_000
      })
      const summary = JSON.stringify({
        steady: figures.steady,
        restart: figures.restart,
        restarts: figures.restarts,
        problems: figures.problems
      })
      // The load ran through both phases, streams and not, on every replica.
      expect(figures.steady.sent, summary).toBeGreaterThan(0)
      expect(figures.restart.sent, summary).toBeGreaterThan(0)
      expect(figures.total.streams, summary).toBeGreaterThan(0)
      expect(figures.total.streams, summary).toBeLessThan(figures.total.sent)
      for (const served of Object.values(figures.balancer.perReplica)) expect(served, summary).toBeGreaterThan(0)
      // Every replica drained and exited cleanly, and came back.
      expect(figures.restarts.map((r) => r.exitCode)).toEqual([0, 0, 0])
      // The goal: nothing failed, nothing cut.
      expect(figures.total.failed, summary).toBe(0)
      expect(figures.total.truncatedStreams, summary).toBe(0)
      expect(figures.total.completed, summary).toBe(figures.total.sent)
      expect(figures.balancer.responses5xx, summary).toBe(0)
    },
    600_000
  )
})
