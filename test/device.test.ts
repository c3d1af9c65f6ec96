/**
 * --device: `auto` takes a visible GPU, else the CPU, and says which in its ready line and in /health;
 * `cuda` without a GPU stops `vdiff serve` at start-up with one clear line, never a crash or a hang. The
 * checks that need a GPU run only where one is visible and report themselves skipped, with the reason,
 * everywhere else (bench/gpu/run.sh runs the native CUDA tests on a lent GPU).
 */
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { loadAddon } from "../src/engine/native.js"
import { repoRoot, type ServeProcess, serveToExit, startServe } from "./stress/serve.js"

const gpus = loadAddon().cudaDevices()
const noGpu = gpus === 0
if (noGpu) console.log("test/device.test.ts: GPU checks SKIPPED: no CUDA GPU is visible to this build (cudaDevices() = 0)")

describe("--device", () => {
  let server: ServeProcess
  beforeAll(async () => {
    server = await startServe({ flags: ["--device", "auto"] })
  })
  afterAll(async () => {
    await server?.stop()
  })

  it("auto serves on the backend it found and reports it in the ready line, /health and /v1/engine/stats", async () => {
    const ready = server.logs.find((entry) => String(entry["message"]).startsWith("vdiff ready on"))!
    const expected = noGpu ? "cpu" : "cuda"
    expect(ready).toMatchObject({ backend: expected, device_setting: "auto" })
    expect(String(ready["message"])).toContain(`backend ${expected} (`)
    const health = (await (await fetch(server.url + "/health")).json()) as any
    expect(health.backend).toMatchObject({ name: expected, device: ready["device"] })
    expect(health.backend.memory_used_bytes).toBeGreaterThan(0)
    const stats = (await (await fetch(server.url + "/v1/engine/stats")).json()) as any
    expect(stats.backend).toEqual(health.backend)
  })

  it.skipIf(!noGpu)("cuda without a GPU stops start-up with one error line naming the device: exit 1, no stack trace", async () => {
    const run = await serveToExit(["--device", "cuda"])
    expect(run.code).toBe(1)
    const errors = run.stdout
      .split("\n")
      .filter((line) => line !== "")
      .map((line) => JSON.parse(line) as Record<string, unknown>)
      .filter((entry) => entry["level"] === "error")
    expect(errors).toHaveLength(1)
    expect(String(errors[0]!["message"])).toMatch(
      new RegExp(`^cannot load the model from ${join(repoRoot, "models", "shakespeare")}: device cuda: `)
    )
    expect(run.stdout + run.stderr).not.toMatch(/\n\s+at /)
    expect(run.stdout).not.toContain("vdiff ready on")
  })

  it("a device that is not one of auto, cpu, cuda is refused before anything listens: exit 2", async () => {
    const run = await serveToExit(["--device", "tpu"])
    expect(run.code).toBe(2)
    expect(run.stderr).toContain("--device")
    expect(run.stdout).not.toContain("listening on")
  })
})
