/**
 * The model's recommended sampling defaults (its directory's generation_config.json, read as vLLM's
 * `--generation-config auto` reads it): which keys count, how a bad value fails the load, and how they sit
 * beneath the server's flags and above the documented defaults, through the real server layers over the
 * fake engine (which records the settings each sequence was created with).
 */
import { readFileSync } from "node:fs"
import { mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Either, Option } from "effect"
import { afterAll, describe, expect, it } from "vitest"
import * as Config from "../src/config/Config.js"
import * as Sampling from "../src/config/sampling.js"
import { makeFake } from "../src/engine/EngineTest.js"
import { fakeIds, fakeLoader, postJson, startServer, writeTinyTokenizer } from "./http-helpers.js"
import { embeddedModel, startServe } from "./stress/serve.js"

const families = Object.fromEntries(Sampling.knownFamilies.map((family) => [family.name, family]))

describe("modelDefaults: the keys of generation_config.json that are sampling defaults", () => {
  it("takes the server settings by request name and Hugging Face's aliases, and passes over the rest", () => {
    const json = {
      temperature: 0.7,
      top_p: 0.9,
      max_new_tokens: 64,
      steps: 32,
      block_length: 8,
      do_sample: true,
      bos_token_id: 1,
      eos_token_id: [2, 3],
      transformers_version: "4.46.2",
      top_k: null
    }
    expect(Sampling.modelDefaults(json)).toEqual(
      Either.right({ temperature: 0.7, top_p: 0.9, max_tokens: 64, diffusion_steps: 32, block_length: 8 })
    )
  })

  it("passes over what Dream's library writes into every checkpoint: steps without its length, alg origin", () => {
    const dream = { alg: "origin", alg_temp: null, eps: 0.001, steps: 512, temperature: 0.0, top_k: null, top_p: null }
    expect(Sampling.modelDefaults(dream, families["dream"])).toEqual(Either.right({ eps: 0.001, temperature: 0 }))
    expect(Sampling.modelDefaults({ ...dream, alg: "maskgit_plus", max_new_tokens: 256 }, families["dream"])).toEqual(
      Either.right({ alg: "maskgit_plus", eps: 0.001, temperature: 0, max_tokens: 256, diffusion_steps: 512 })
    )
  })

  it("passes over the settings that do not apply to the model's family", () => {
    // alg and eps are Dream's; remasking and cfg_scale are full-canvas settings.
    expect(Sampling.modelDefaults({ alg: "entropy", eps: 0.01, temperature: 0.2 }, families["llada"])).toEqual(
      Either.right({ temperature: 0.2 })
    )
    expect(Sampling.modelDefaults({ alg: "entropy", eps: 0.01, remasking: "random", cfg_scale: 1 }, families["dream"])).toEqual(
      Either.right({ alg: "entropy", eps: 0.01 })
    )
  })

  it("refuses a value out of range with the request's message, and two parallel rules at once", () => {
    expect(Sampling.modelDefaults({ temperature: 5 })).toEqual(Either.left("temperature must be a number from 0 to 2"))
    expect(Sampling.modelDefaults({ max_new_tokens: 0 })).toEqual(Either.left("max_tokens must be an integer >= 1"))
    expect(Sampling.modelDefaults({ remasking: "left_to_right" })).toEqual(Either.left('remasking must be "low_confidence" or "random"'))
    expect(Sampling.modelDefaults({ parallel_threshold: 0.9, parallel_factor: 1 })).toEqual(
      Either.left("parallel_threshold and parallel_factor cannot both be set: they are two rules for the same choice")
    )
    expect(Either.isLeft(Sampling.modelDefaults([1, 2]))).toBe(true)
  })
})

describe("withModelDefaults: the model's values beneath the server's", () => {
  const server = (argv: ReadonlyArray<string>) => {
    const loaded = Config.load({ argv: ["--model", "m", ...argv], env: {} })
    if (Either.isLeft(loaded)) throw new Error(loaded.left.message)
    return Sampling.defaultsFromConfig(loaded.right)
  }

  it("fills the settings the server leaves at their documented defaults, and names them", () => {
    const { defaults, applied } = Sampling.withModelDefaults(server([]), { temperature: 0.8, top_p: 0.9, max_tokens: 64 })
    expect(defaults).toMatchObject({ temperature: 0.8, topP: 0.9, maxTokens: 64, blockLength: 32 })
    expect(applied).toEqual({ temperature: 0.8, top_p: 0.9, max_tokens: 64 })
  })

  it("keeps a setting a flag set to another value", () => {
    const { defaults, applied } = Sampling.withModelDefaults(server(["--temperature", "0.3", "--max-tokens", "20"]), {
      temperature: 0.8,
      top_p: 0.9,
      max_tokens: 64
    })
    expect(defaults).toMatchObject({ temperature: 0.3, topP: 0.9, maxTokens: 20 })
    expect(applied).toEqual({ top_p: 0.9 })
  })

  it("keeps the whole parallel group when the server turned one of its rules on", () => {
    const { defaults, applied } = Sampling.withModelDefaults(server(["--parallel-factor", "1"]), { parallel_threshold: 0.9 })
    expect(defaults).toMatchObject({ parallelThreshold: 0, parallelFactor: 1 })
    expect(applied).toEqual({})
    // Left off by the server, the model's rule applies.
    expect(Sampling.withModelDefaults(server([]), { parallel_threshold: 0.9 }).defaults).toMatchObject({ parallelThreshold: 0.9 })
  })
})

describe("a served model's generation_config.json", () => {
  const dirs: Array<string> = []
  afterAll(() => Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true }))))

  const modelDir = async (generationConfig: unknown) => {
    const dir = await mkdtemp(join(tmpdir(), "vdiff-gencfg-"))
    dirs.push(dir)
    await writeTinyTokenizer(dir, fakeIds)
    await writeFile(join(dir, "generation_config.json"), JSON.stringify(generationConfig))
    return dir
  }

  /** The settings the engine was asked for by a completion that gives `fields`, under these flags. */
  const settingsOf = (dir: string, argv: ReadonlyArray<string>, fields: Record<string, unknown> = {}) =>
    Effect.gen(function* () {
      const loaded = Config.load({ argv: ["--port", "0", "--model", dir, "--served-model-name", "m", ...argv], env: {} })
      if (Either.isLeft(loaded)) return yield* Effect.die(loaded.left.message)
      const engine = makeFake()
      const server = yield* startServer({ config: loaded.right, load: fakeLoader(loaded.right, { engine }) })
      const reply = yield* postJson(`${server.url}/v1/completions`, { model: "m", prompt: "hi", ...fields })
      expect(reply.status).toBe(200)
      return engine.created[0]!.settings
    }).pipe(Effect.scoped, Effect.runPromise)

  const recommended = { temperature: 0.7, top_p: 0.9, max_new_tokens: 12, bos_token_id: 0 }

  it("gives a request that leaves them out the model's recommendations", async () => {
    const settings = await settingsOf(await modelDir(recommended), [])
    expect(settings).toMatchObject({ temperature: 0.7, topP: 0.9, genLength: 12, blockLength: 12 })
  })

  it("yields to the request's own values and to flags set to other values", async () => {
    const dir = await modelDir(recommended)
    expect(await settingsOf(dir, [], { temperature: 0, max_tokens: 8 })).toMatchObject({ temperature: 0, topP: 0.9, genLength: 8 })
    expect(await settingsOf(dir, ["--temperature", "0.2"])).toMatchObject({ temperature: 0.2, topP: 0.9, genLength: 12 })
  })

  it("passes Hugging Face's repetition_penalty on as the default, and a request's penalties over it", async () => {
    const dir = await modelDir({ repetition_penalty: 1.3 })
    expect(await settingsOf(dir, [])).toMatchObject({ repetitionPenalty: 1.3, presencePenalty: 0, frequencyPenalty: 0 })
    expect(await settingsOf(dir, [], { repetition_penalty: 1, presence_penalty: 0.5, frequency_penalty: -0.25 })).toMatchObject({
      repetitionPenalty: 1,
      presencePenalty: 0.5,
      frequencyPenalty: -0.25
    })
  })

  it("is ignored under --generation-config vdiff", async () => {
    const settings = await settingsOf(await modelDir(recommended), ["--generation-config", "vdiff"])
    expect(settings).toMatchObject({ temperature: 0, topP: 1, genLength: 128 })
  })

  it("fails the load with the file's name and the value's problem", async () => {
    const dir = await modelDir({ temperature: 5 })
    const loaded = Config.load({ argv: ["--port", "0", "--model", dir], env: {} })
    if (Either.isLeft(loaded)) throw new Error(loaded.left.message)
    const failure = await Effect.gen(function* () {
      const server = yield* startServer({ config: loaded.right, awaitReady: false })
      yield* Effect.either(server.host.awaitReady)
      return yield* server.host.failure
    }).pipe(Effect.scoped, Effect.runPromise)
    expect(Option.getOrThrow(failure)).toContain("generation_config.json: temperature must be a number from 0 to 2")
  })
})

describe("the embedded model's generation_config.json, through `vdiff serve`", () => {
  const recommended = JSON.parse(readFileSync(join(embeddedModel, "generation_config.json"), "utf8")) as Record<string, unknown>
  // The file's sampling settings as the server reads them (its token ids and do_sample are not settings).
  const sampling = Either.getOrThrow(Sampling.modelDefaults(recommended)) as Record<string, unknown>

  it("recommends sampling settings the server applies when a request sets none", async () => {
    expect(Object.keys(sampling).length).toBeGreaterThan(0)
    const serve = await startServe({ flags: ["--generation-config", "auto"] })
    try {
      const line = serve.logs.find((entry) => String(entry["message"]).startsWith("sampling defaults from the model's"))
      expect(line, serve.output()).toBeDefined()
      for (const [key, value] of Object.entries(sampling)) expect(String(line!["message"])).toContain(`${key} ${String(value)}`)
      const complete = async (fields: Record<string, unknown>) => {
        const response = await fetch(`${serve.url}/v1/completions`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ prompt: "ROMEO:\n", max_tokens: 32, seed: 11, ...fields })
        })
        expect(response.status).toBe(200)
        return ((await response.json()) as { choices: Array<{ text: string }> }).choices[0]!.text
      }
      // Unset fields take the file's values: the same answer as a request that sets them all, and not the
      // answer of vdiff's own greedy default.
      const byDefault = await complete({})
      expect(await complete(sampling)).toBe(byDefault)
      expect(await complete({ temperature: 0 })).not.toBe(byDefault)
    } finally {
      await serve.stop()
    }
  })
})
