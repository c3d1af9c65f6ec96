/**
 * Shared pieces of the HTTP tests: a tiny byte-level tokenizer (its ids suit the fake engine and make the
 * fake engine's output predictable text, which the embedded model's tokenizer would not), a model loader over
 * the fake engine whose loading a test can hold, a server on 127.0.0.1:0 built from the real layers, and
 * small fetch helpers.
 */
import { existsSync } from "node:fs"
import { mkdir, mkdtemp, writeFile } from "node:fs/promises"
import { createServer } from "node:http"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { HttpServer } from "@effect/platform"
import { NodeHttpServer } from "@effect/platform-node"
import { Context, Deferred, Effect, Either, Layer, type Scope } from "effect"
import * as Config from "../src/config/Config.js"
import { type FakeEngine, type FakeEngineOptions, makeFake } from "../src/engine/EngineTest.js"
import { fromEngine, type Loader, ModelHost, ModelLoadFailed } from "../src/server/ModelHost.js"
import type { ApiRouter } from "../src/server/Server.js"
import * as Server from "../src/server/Server.js"
import * as Tokenizer from "../src/tokenizer/Tokenizer.js"
import { router as openaiRouter } from "../src/openai/routes.js"
import { byteChars, byteLevelBpe } from "./support/tokenizer-json.js"

export const repoRoot = join(import.meta.dirname, "..")

/**
 * Writes a byte-level BPE tokenizer without merges (one token per byte, ids 0..255) plus the special
 * tokens <|endoftext|> = eos and <|mdm_mask|> = mask, and a config.json naming them, into `dir`.
 */
export const writeTinyTokenizer = async (dir: string, ids: { readonly eos: number; readonly mask: number }) => {
  await mkdir(dir, { recursive: true })
  const vocab: Record<string, number> = {}
  byteChars().forEach((c, id) => (vocab[c] = id))
  vocab["<|endoftext|>"] = ids.eos
  vocab["<|mdm_mask|>"] = ids.mask
  const tokenizer = byteLevelBpe({
    vocab,
    merges: [],
    special: [
      { id: ids.eos, content: "<|endoftext|>" },
      { id: ids.mask, content: "<|mdm_mask|>" }
    ],
    decoderPrefixSpace: true
  })
  await writeFile(join(dir, "tokenizer.json"), JSON.stringify(tokenizer))
  await writeFile(
    join(dir, "tokenizer_config.json"),
    JSON.stringify({ eos_token: "<|endoftext|>", mask_token: "<|mdm_mask|>", pad_token: "<|endoftext|>" })
  )
  if (!existsSync(join(dir, "config.json"))) {
    await writeFile(join(dir, "config.json"), JSON.stringify({ mask_token_id: ids.mask, eos_token_id: ids.eos }))
  }
}

/** The fake engine's special ids (src/engine/EngineTest.ts). */
export const fakeIds = { eos: 998, mask: 999_999 }

let fakeTokenizerDir: Promise<string> | undefined

/** A model directory holding only a tokenizer that suits the fake engine's ids. */
export const fakeModelDir = (): Promise<string> =>
  (fakeTokenizerDir ??= mkdtemp(join(tmpdir(), "vdiff-http-")).then(async (dir) => {
    await writeTinyTokenizer(dir, fakeIds)
    return dir
  }))

export interface FakeLoaderOptions extends FakeEngineOptions {
  /** Loading waits for this (a test holds the model "loading" until it completes it). */
  readonly hold?: Deferred.Deferred<void>
  /** Loading fails with this message. */
  readonly fail?: string
  /** The engine to serve (a test inspects what it was asked); default: a new fake engine with these options. */
  readonly engine?: FakeEngine
}

/** A Loader over the fake engine and the fake model directory's tokenizer, with the config's settings. */
export const fakeLoader = (config: Config.Settings, options: FakeLoaderOptions = {}): Loader =>
  Effect.gen(function* () {
    if (options.hold !== undefined) yield* Deferred.await(options.hold)
    if (options.fail !== undefined) return yield* new ModelLoadFailed({ modelDir: config.model, message: options.fail })
    const tokenizer = yield* Tokenizer.make(config.model).pipe(
      Effect.mapError((e) => new ModelLoadFailed({ modelDir: config.model, message: e.message }))
    )
    return yield* fromEngine(options.engine ?? makeFake(options), tokenizer, {
      modelName: Config.servedModelName(config),
      scheduler: {
        maxConcurrent: config.maxConcurrentRequests,
        queueCapacity: config.maxQueueSize,
        maxBatchTokens: Number.MAX_SAFE_INTEGER,
        requestTimeoutMs: config.requestTimeout * 1000
      },
      defaults: Server.servingDefaults(config),
      generationConfig: config.generationConfig
    })
  })

/** Settings as `vdiff serve` would decode them from these flags, on port 0 and the fake model directory. */
export const settings = async (argv: ReadonlyArray<string> = []): Promise<Config.Settings> => {
  const loaded = Config.load({ argv: ["--port", "0", "--model", await fakeModelDir(), ...argv], env: {} })
  if (Either.isLeft(loaded)) throw new Error(loaded.left.message)
  return loaded.right
}

export interface TestServer {
  readonly url: string
  readonly host: Context.Tag.Service<typeof ModelHost>
}

/**
 * Starts the server's real layers on 127.0.0.1:0 in the current scope, with the fake loader (or `load`)
 * and the real OpenAI router (or `api`).
 */
export const startServer = (options: {
  readonly config: Config.Settings
  readonly load?: Loader
  readonly api?: ApiRouter
  /** Wait for the model to be ready before returning (default true). */
  readonly awaitReady?: boolean
}): Effect.Effect<TestServer, never, Scope.Scope> =>
  Effect.gen(function* () {
    const context = yield* Layer.build(
      Server.layerApp({
        config: options.config,
        api: options.api ?? openaiRouter,
        load: options.load ?? fakeLoader(options.config)
      }).pipe(Layer.provideMerge(NodeHttpServer.layer(() => createServer(), { host: "127.0.0.1", port: 0 })))
    ).pipe(Effect.orDie)
    const address = Context.get(context, HttpServer.HttpServer).address
    if (address._tag !== "TcpAddress") return yield* Effect.die("expected a TCP address")
    const host = Context.get(context, ModelHost)
    if (options.awaitReady !== false) yield* Effect.orDie(host.awaitReady)
    return { url: `http://127.0.0.1:${address.port}`, host }
  })

export interface Reply {
  readonly status: number
  readonly headers: Headers
  readonly text: string
  readonly json: any
}

/** fetch, read to the end; `json` is the parsed body when it is JSON. */
export const request = (url: string, init: RequestInit = {}): Effect.Effect<Reply> =>
  Effect.promise(async () => {
    const response = await fetch(url, init)
    const text = await response.text()
    let json: unknown
    try {
      json = JSON.parse(text)
    } catch {
      // not JSON
    }
    return { status: response.status, headers: response.headers, text, json }
  })

export const postJson = (url: string, body: unknown, headers: Record<string, string> = {}) =>
  request(url, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) })
