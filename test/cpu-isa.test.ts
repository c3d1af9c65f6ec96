/**
 * --cpu-isa (VDIFF_CPU_ISA): the configuration takes auto, portable, avx2, avx512, avx512bf16 or amx and nothing else; a
 * served model computes on the kernels asked for and /health and /v1/engine/stats say which; an ISA this
 * CPU lacks stops start-up with one error line naming the setting and listing the ISAs the CPU has. The
 * ISAs this CPU has are found by loading the embedded model on each through the addon.
 */
import { Either } from "effect"
import { afterAll, describe, expect, it } from "vitest"
import * as Config from "../src/config/Config.js"
import { loadAddon, type NativeAddon } from "../src/engine/native.js"
import { embeddedModel, type ServeProcess, serveToExit, startServe } from "./stress/serve.js"

const addon: NativeAddon = loadAddon()
const named = ["portable", "avx2", "avx512", "avx512bf16", "amx"] as const
const runs = async (isa: (typeof named)[number]): Promise<boolean> =>
  addon.loadModel(embeddedModel, { threads: 1, cpuIsa: isa }).then(
    () => true,
    (e: { code?: string }) => {
      if (e.code !== "VDIFF_UNAVAILABLE") throw e
      return false
    }
  )
const has = await Promise.all(named.map(runs))
const ours = named.filter((_, i) => has[i])
const lacking = named.filter((_, i) => !has[i])
const widest = ours[ours.length - 1]!
// A CPU that runs every ISA has none to refuse: the start-up test below exists only where there is one
// (like the editing tests, which exist only for families with editing), and says so when it does not.
if (lacking.length === 0) console.log("test/cpu-isa.test.ts: this CPU runs every ISA; no lacking one to refuse")

describe("--cpu-isa", () => {
  it("the configuration takes auto, portable, avx2, avx512, avx512bf16 and amx (default auto) and refuses anything else", () => {
    const load = (argv: ReadonlyArray<string>, env: Record<string, string> = {}) => Config.load({ argv, env })
    const ok = (argv: ReadonlyArray<string>, env: Record<string, string> = {}) => {
      const result = load(argv, env)
      if (Either.isLeft(result)) throw new Error(`unexpected ConfigError: ${result.left.message}`)
      return result.right.cpuIsa
    }
    expect(ok([])).toBe("auto")
    for (const isa of ["auto", ...named]) expect(ok(["--cpu-isa", isa])).toBe(isa)
    expect(ok([], { VDIFF_CPU_ISA: "portable" })).toBe("portable")
    expect(ok(["--cpu-isa", "avx2"], { VDIFF_CPU_ISA: "portable" })).toBe("avx2")
    for (const [argv, env] of [
      [["--cpu-isa", "sse4"], {}],
      [["--cpu-isa", "AVX2"], {}],
      [["--cpu-isa", ""], {}],
      [[], { VDIFF_CPU_ISA: "neon" }]
    ] as const) {
      const result = load(argv, env)
      expect(Either.isLeft(result), JSON.stringify({ argv, env })).toBe(true)
      if (Either.isLeft(result)) expect(result.left.message).toMatch(/--cpu-isa|VDIFF_CPU_ISA/)
    }
  })

  it("an unknown value stops vdiff serve before anything listens: exit 2, naming the flag", async () => {
    const run = await serveToExit(["--cpu-isa", "sse4"])
    expect(run.code).toBe(2)
    expect(run.stderr).toContain("--cpu-isa")
    expect(run.stdout).not.toContain("listening on")
  })

  it("the addon refuses a name that is not an ISA, and one this CPU lacks, with typed errors", async () => {
    await expect(addon.loadModel(embeddedModel, { threads: 1, cpuIsa: "sse4" as never })).rejects.toMatchObject({
      code: "VDIFF_INVALID_ARGUMENT",
      message: expect.stringContaining("--cpu-isa")
    })
    for (const isa of lacking)
      await expect(addon.loadModel(embeddedModel, { threads: 1, cpuIsa: isa })).rejects.toMatchObject({
        code: "VDIFF_UNAVAILABLE",
        message: expect.stringContaining(`available: auto, ${ours.join(", ")}`)
      })
    // auto is the widest this CPU has (VDIFF_ISA unset).
    if (process.env["VDIFF_ISA"] === undefined) {
      const auto = await addon.loadModel(embeddedModel, { threads: 1, cpuIsa: "auto" })
      expect(auto.info().device).toBe(widest)
    }
  })

  describe.each([...new Set(["portable", widest])])("a model served with --cpu-isa %s", (isa) => {
    let server: ServeProcess
    afterAll(async () => {
      await server?.stop()
    })

    it("computes on those kernels and says so in /health and /v1/engine/stats, and answers", async () => {
      server = await startServe({ flags: ["--cpu-isa", isa] })
      const health = (await (await fetch(server.url + "/health")).json()) as any
      expect(health.backend).toMatchObject({ name: "cpu", device: isa, gemm: isa })
      const stats = (await (await fetch(server.url + "/v1/engine/stats")).json()) as any
      expect(stats.backend).toEqual(health.backend)
      const response = await fetch(server.url + "/v1/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ prompt: "ROMEO:", max_tokens: 8 })
      })
      expect(response.status).toBe(200)
    })
  })

  if (lacking.length > 0)
    it("an ISA this CPU lacks stops start-up with one error line naming the setting and the ISAs it has: exit 1", async () => {
      const run = await serveToExit(["--cpu-isa", lacking[0]!])
      expect(run.code).toBe(1)
      const errors = run.stdout
        .split("\n")
        .filter((line) => line !== "")
        .map((line) => JSON.parse(line) as Record<string, unknown>)
        .filter((entry) => entry["level"] === "error")
      expect(errors).toHaveLength(1)
      const message = String(errors[0]!["message"])
      expect(message).toContain(`--cpu-isa (VDIFF_CPU_ISA) ${lacking[0]}: this CPU does not support it`)
      expect(message).toContain(`available: auto, ${ours.join(", ")}`)
      expect(run.stdout + run.stderr).not.toMatch(/\n\s+at /)
      expect(run.stdout).not.toContain("vdiff ready on")
    })
})
