import { spawnSync } from "node:child_process"
import { join } from "node:path"
import { Either, Schema } from "effect"
import { describe, expect, it } from "vitest"
import * as Config from "../src/config/Config.js"
import { embeddedModelDir } from "../src/config/package.js"
import { servingDefaults } from "../src/server/Server.js"

const repoRoot = join(import.meta.dirname, "..")

const load = (argv: ReadonlyArray<string>, env: Record<string, string> = {}) => Config.load({ argv, env })

const ok = (argv: ReadonlyArray<string>, env: Record<string, string> = {}): Config.Settings => {
  const result = load(argv, env)
  if (Either.isLeft(result)) throw new Error(`unexpected ConfigError: ${result.left.message}`)
  return result.right
}

const error = (argv: ReadonlyArray<string>, env: Record<string, string> = {}): string => {
  const result = load(argv, env)
  if (Either.isRight(result)) throw new Error("expected a ConfigError")
  return result.left.message
}

describe("Config", () => {
  it("has the documented defaults", () => {
    const config = ok([])
    expect(config).toEqual({
      host: "127.0.0.1",
      port: 8000,
      model: embeddedModelDir(),
      servedModelName: undefined,
      dtype: "auto",
      device: "auto",
      gpuMemoryUtilization: 0.9,
      quantize: "none",
      threads: 0,
      cpuIsa: "auto",
      apiKey: [],
      allowedOrigins: [],
      trustProxy: false,
      rateLimitRequests: 0,
      rateLimitWindow: 60,
      maxConcurrentRequests: 8,
      maxQueueSize: 64,
      maxBatchTokens: 0,
      requestTimeout: 300,
      shutdownTimeout: 30,
      maxBodySize: 1024 * 1024,
      maxTokens: 128,
      diffusionSteps: 0,
      blockLength: 32,
      remasking: "low_confidence",
      cfgScale: 0,
      temperature: 0,
      topK: 0,
      topP: 1,
      minP: 0,
      presencePenalty: 0,
      frequencyPenalty: 0,
      repetitionPenalty: 1,
      parallelThreshold: 0,
      parallelFactor: 0,
      earlyStop: true,
      kvCache: "none",
      alg: "entropy",
      algTemp: 0,
      eps: 0.001,
      generationConfig: "auto",
      kvCacheDtype: "f32",
      kvCacheBudget: 0,
      prefixCache: 536870912,
      prefillChunk: 512,
      logLevel: "info"
    })
    expect(Config.servedModelName(config)).toBe("shakespeare")
    expect(Config.servedModelName(ok(["--served-model-name", "bard"]))).toBe("bard")
  })

  it("derives every flag and environment variable from the schema's field names", () => {
    const names = Object.keys(Config.Settings.fields)
    expect(Config.settings.map((s) => s.name)).toEqual(names)
    const byName = new Map(Config.settings.map((s) => [s.name, s]))
    expect(byName.get("maxConcurrentRequests")).toMatchObject({
      flag: "--max-concurrent-requests",
      env: "VDIFF_MAX_CONCURRENT_REQUESTS"
    })
    expect(byName.get("apiKey")).toMatchObject({ flag: "--api-key", env: "VDIFF_API_KEY", kind: "list" })
    expect(byName.get("trustProxy")).toMatchObject({ flag: "--trust-proxy", kind: "switch" })
  })

  it("takes a flag over an environment variable over the default, for every setting", () => {
    // A distinct valid value per setting, from the flag and from the environment.
    const values: Record<string, [string, string]> = {
      host: ["0.0.0.0", "::1"],
      port: ["9001", "9002"],
      model: ["/models/a", "/models/b"],
      servedModelName: ["a", "b"],
      dtype: ["auto", "auto"],
      device: ["cpu", "cuda"],
      gpuMemoryUtilization: ["0.5", "0.8"],
      quantize: ["q8_0", "q4_0"],
      threads: ["3", "4"],
      cpuIsa: ["portable", "avx2"],
      apiKey: ["k1", "k2"],
      allowedOrigins: ["https://a.example", "https://b.example"],
      trustProxy: ["true", "false"],
      rateLimitRequests: ["5", "6"],
      rateLimitWindow: ["1.5", "2.5"],
      maxConcurrentRequests: ["2", "3"],
      maxQueueSize: ["7", "9"],
      maxBatchTokens: ["100", "200"],
      requestTimeout: ["10", "20"],
      shutdownTimeout: ["0", "5"],
      maxBodySize: ["1000", "2000"],
      maxTokens: ["16", "32"],
      diffusionSteps: ["8", "12"],
      blockLength: ["4", "8"],
      remasking: ["random", "low_confidence"],
      cfgScale: ["1.5", "0.5"],
      temperature: ["0.7", "1"],
      topK: ["20", "40"],
      topP: ["0.9", "0.95"],
      minP: ["0.05", "0.1"],
      presencePenalty: ["0.5", "-1"],
      frequencyPenalty: ["1.5", "0.25"],
      repetitionPenalty: ["1.2", "0.9"],
      parallelThreshold: ["0.9", "0.8"],
      parallelFactor: ["1", "0.5"],
      earlyStop: ["true", "false"],
      kvCache: ["prefix", "dual"],
      alg: ["maskgit_plus", "origin"],
      algTemp: ["0.5", "2"],
      eps: ["0.01", "1e-4"],
      generationConfig: ["vdiff", "auto"],
      kvCacheDtype: ["bf16", "f32"],
      kvCacheBudget: ["1048576", "2097152"],
      prefixCache: ["0", "1073741824"],
      prefillChunk: ["0", "64"],
      logLevel: ["debug", "error"],
      otlpEndpoint: ["http://collector-a:4318", "https://collector-b:4318"]
    }
    expect(Object.keys(values).sort()).toEqual(Config.settings.map((s) => s.name).sort())
    for (const info of Config.settings) {
      const [fromFlag, fromEnv] = values[info.name]!
      const env = { [info.env]: fromEnv }
      const flagged = ok([`${info.flag}=${fromFlag}`], env)[info.name]
      const envOnly = ok([], env)[info.name]
      expect(flagged, info.flag).toEqual(decodeOne(info.name, fromFlag))
      expect(envOnly, info.env).toEqual(decodeOne(info.name, fromEnv))
      if (info.name !== "dtype") expect(flagged, info.flag).not.toEqual(envOnly)
      const fallback = info.defaultRaw()
      const expectedDefault = typeof fallback === "string" ? decodeOne(info.name, fallback) : fallback
      expect(ok([])[info.name], `default of ${info.flag}`).toEqual(expectedDefault)
    }
    // An empty variable counts as unset.
    expect(ok([], { VDIFF_PORT: "" }).port).toBe(8000)
  })

  it("reads lists from repeated flags and commas, and switches without a value", () => {
    const config = ok(["--api-key", "a,b", "--api-key=c", "--allowed-origins", "*,https://x.example:8080", "--trust-proxy"])
    expect(config.apiKey).toEqual(["a", "b", "c"])
    expect(config.allowedOrigins).toEqual(["*", "https://x.example:8080"])
    expect(config.trustProxy).toBe(true)
    expect(ok([], { VDIFF_API_KEY: "x, y" }).apiKey).toEqual(["x", "y"])
    // Flags replace the environment's list rather than adding to it.
    expect(ok(["--api-key", "f"], { VDIFF_API_KEY: "e" }).apiKey).toEqual(["f"])
    expect(ok(["--trust-proxy=false"]).trustProxy).toBe(false)
  })

  it("stops on a bad value with one line naming the flag, the value and its source", () => {
    expect(error(["--port", "abc"])).toBe(`--port: must be an integer from 0 to 65535, got "abc"`)
    expect(error([], { VDIFF_PORT: "70000" })).toBe(`VDIFF_PORT (--port): must be an integer from 0 to 65535, got "70000"`)
    expect(error(["--max-concurrent-requests", "0"])).toBe(`--max-concurrent-requests: must be an integer from 1 to 1024, got "0"`)
    expect(error(["--temperature", "-1"])).toBe(`--temperature: must be a number of at least 0, got "-1"`)
    expect(error(["--rate-limit-window", "0"])).toBe(`--rate-limit-window: must be a number above 0, got "0"`)
    expect(error(["--remasking", "best"])).toBe(`--remasking: must be one of low_confidence, random; got "best"`)
    expect(error(["--trust-proxy=maybe"])).toBe(`--trust-proxy: must be true or false, got "maybe"`)
    expect(error(["--allowed-origins", "https://x.example/"])).toBe(
      `--allowed-origins: origins must be "*" or like https://example.com:8080, got "https://x.example/"`
    )
    expect(error(["--dtype", "f16"])).toBe(`--dtype: must be one of auto; got "f16"`)
    expect(error(["--top-k", "-1"])).toBe(`--top-k: must be an integer of at least 0, got "-1"`)
    expect(error(["--top-p", "0"])).toBe(`--top-p: must be a number above 0 and at most 1, got "0"`)
    expect(error([], { VDIFF_TOP_P: "1.5" })).toBe(`VDIFF_TOP_P (--top-p): must be a number above 0 and at most 1, got "1.5"`)
    expect(error(["--parallel-threshold", "1.2"])).toBe(`--parallel-threshold: must be a number from 0 to 1, got "1.2"`)
    expect(error(["--parallel-factor", "-1"])).toBe(`--parallel-factor: must be a number of at least 0, got "-1"`)
    expect(error(["--early-stop=sometimes"])).toBe(`--early-stop: must be true or false, got "sometimes"`)
    expect(error(["--kv-cache", "full"])).toBe(`--kv-cache: must be one of none, prefix, dual; got "full"`)
    expect(error(["--alg", "random"])).toBe(`--alg: must be one of origin, maskgit_plus, topk_margin, entropy; got "random"`)
    expect(error(["--eps", "1"])).toBe(`--eps: must be a number above 0 and below 1, got "1"`)
    expect(error([], { VDIFF_EPS: "0" })).toBe(`VDIFF_EPS (--eps): must be a number above 0 and below 1, got "0"`)
    expect(error(["--alg-temp", "-0.5"])).toBe(`--alg-temp: must be a number of at least 0, got "-0.5"`)
    expect(error([], { VDIFF_KV_CACHE_BUDGET: "1.5e9" })).toBe(
      `VDIFF_KV_CACHE_BUDGET (--kv-cache-budget): must be an integer of at least 0, got "1.5e9"`
    )
    expect(error(["--port"])).toBe("--port needs a value (PORT)")
    expect(error(["--bogus", "1"])).toBe("unknown flag --bogus (vdiff serve --help lists them)")
    expect(error(["serve-me"])).toBe(`unexpected argument "serve-me" (settings are --name value)`)
  })

  it("turns on at most one parallel decoding rule, and hands the sampler defaults to the serving layer", () => {
    expect(error(["--parallel-threshold", "0.9", "--parallel-factor", "1"])).toBe(
      "--parallel-threshold and --parallel-factor cannot both be above 0: they are two rules for the same choice"
    )
    expect(error(["--parallel-threshold", "0.9"], { VDIFF_PARALLEL_FACTOR: "1" })).toBe(
      "--parallel-threshold and VDIFF_PARALLEL_FACTOR (--parallel-factor) cannot both be above 0: they are two rules for the same choice"
    )
    // One rule on and the other explicitly off is fine.
    expect(ok(["--parallel-threshold", "0.9", "--parallel-factor", "0"]).parallelThreshold).toBe(0.9)
    expect(ok(["--early-stop"]).earlyStop).toBe(true)
    expect(ok([], { VDIFF_EARLY_STOP: "false" }).earlyStop).toBe(false)

    const defaults = servingDefaults(
      ok(["--top-k", "20", "--top-p", "0.9", "--parallel-factor", "1.5", "--early-stop=false", "--diffusion-steps", "0"])
    )
    expect(defaults).toMatchObject({ topK: 20, topP: 0.9, parallelThreshold: 0, parallelFactor: 1.5, earlyStop: false, steps: 0 })
    expect(servingDefaults(ok([]))).toMatchObject({
      topK: 0,
      topP: 1,
      parallelThreshold: 0,
      parallelFactor: 0,
      earlyStop: true,
      kvCache: "none"
    })
    expect(servingDefaults(ok(["--kv-cache", "dual"])).kvCache).toBe("dual")
  })

  it("refuses an --api-key given with no key in it, which would leave the server open", () => {
    for (const argv of [["--api-key="], ["--api-key", ",,"], ["--api-key", " "]]) {
      expect(error(argv)).toMatch(/--api-key: was given but names no key/)
    }
  })

  it("never echoes an API key in an error", () => {
    const message = error(["--api-key", "good,secret key"])
    expect(message).toContain("--api-key")
    expect(message).not.toContain("secret")
  })

  it("documents every setting in one Markdown table", () => {
    const table = Config.settingsMarkdown().split("\n")
    expect(table[0]).toBe("| Flag | Environment variable | Default | Meaning |")
    expect(table).toHaveLength(2 + Config.settings.length)
    for (const info of Config.settings) {
      expect(table.some((row) => row.includes(info.flag) && row.includes(info.env))).toBe(true)
    }
    expect(table).toContain(
      "| `--max-queue-size N` | `VDIFF_MAX_QUEUE_SIZE` | `64` | Requests that may wait for a batch slot; beyond it requests get 503 with Retry-After |"
    )
  })

  it("exits the CLI with status 2 and one line on stderr for a bad value", () => {
    const tsx = join(repoRoot, "node_modules", ".bin", "tsx")
    const result = spawnSync(tsx, ["src/main.ts", "serve", "--port", "99999"], {
      cwd: repoRoot,
      encoding: "utf8",
      env: { ...process.env, VDIFF_LOG_LEVEL: "info" },
      timeout: 60_000
    })
    expect(result.status).toBe(2)
    expect(result.stderr.trim().split("\n")).toEqual([`vdiff serve: --port: must be an integer from 0 to 65535, got "99999"`])
    expect(result.stdout).toBe("")
  })
})

/** What the setting's own field schema decodes `text` to, apart from any precedence. */
const decodeOne = (name: Config.SettingName, text: string): unknown => {
  const info = Config.settings.find((s) => s.name === name)!
  const field = Config.Settings.fields[name] as Schema.Schema<unknown, unknown>
  return Schema.decodeUnknownSync(field)(info.kind === "list" ? [text] : text)
}
