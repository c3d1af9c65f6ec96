/**
 * Test support for the OpenAI server tests: a tiny byte-level BPE tokenizer written to a temporary model
 * directory, and a real HTTP server (port 0) running the OpenAI router over the real Scheduler and the
 * fake engine, with a scripted answer per prompt. Errors are rendered as the HTTP layer does (status and
 * `{"error": ...}` body).
 */
import { createServer } from "node:http"
import { mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { HttpServer, HttpServerResponse } from "@effect/platform"
import { NodeHttpServer } from "@effect/platform-node"
import { Context, Effect, Exit, Layer, Option, Scope } from "effect"
import * as ChatFormatter from "../src/chat/ChatFormatter.js"
import type { Engine, SamplingSettings } from "../src/engine/Engine.js"
import { type FakeEngine, type FakeEngineOptions, type FakeScript, layerFake, makeFake } from "../src/engine/EngineTest.js"
import { RequestId } from "../src/api/RequestId.js"
import { type ApiError, toErrorBody } from "../src/api/errors.js"
import { router } from "../src/openai/routes.js"
import * as ServingConfig from "../src/openai/ServingConfig.js"
import * as Scheduler from "../src/scheduler/Scheduler.js"
import * as Tokenizer from "../src/tokenizer/Tokenizer.js"
import { byteChars, byteLevelBpe } from "./support/tokenizer-json.js"

// ---- a tiny tokenizer ---------------------------------------------------------------------------------

/**
 * Words that become single tokens (merged byte by byte, left to right). Everything else, e.g. "é" or an
 * emoji, stays one token per UTF-8 byte: the case where a character is split over tokens.
 */
const WORDS = ["Hello", " world", " night", " Good", " Say", " hello", "ö", " the"]

export const SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

const CHAT_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}" +
  "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}" +
  "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"

/** Writes tokenizer.json, tokenizer_config.json and config.json of a tiny model to a temporary directory. */
export const writeTinyModelDir = async (): Promise<string> => {
  const chars = byteChars()
  const vocab: Record<string, number> = {}
  chars.forEach((c, b) => (vocab[c] = b))
  const merges: Array<[string, string]> = []
  for (const word of WORDS) {
    const symbols = Array.from(new TextEncoder().encode(word), (b) => chars[b]!)
    let merged = symbols[0]!
    for (const next of symbols.slice(1)) {
      if (vocab[merged + next] === undefined) {
        merges.push([merged, next])
        vocab[merged + next] = Object.keys(vocab).length
      }
      merged += next
    }
  }
  const firstSpecial = Object.keys(vocab).length
  const bos = SPECIAL[0]!
  const tokenizerJson = byteLevelBpe({
    vocab,
    merges,
    special: SPECIAL.map((content, k) => ({ id: firstSpecial + k, content })),
    postProcessor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }, { Sequence: { id: "B", type_id: 1 } }],
      special_tokens: { [bos]: { id: bos, ids: [firstSpecial], tokens: [bos] } }
    },
    decoderPrefixSpace: false
  })
  const tokenizerConfig = {
    tokenizer_class: "PreTrainedTokenizerFast",
    bos_token: bos,
    eos_token: SPECIAL[1],
    pad_token: SPECIAL[1],
    mask_token: SPECIAL[2],
    clean_up_tokenization_spaces: false,
    chat_template: CHAT_TEMPLATE
  }
  const config = { mask_token_id: firstSpecial + 2, eos_token_id: firstSpecial + 1, vocab_size: firstSpecial + SPECIAL.length }
  const dir = await mkdtemp(join(tmpdir(), "vdiff-openai-"))
  await writeFile(join(dir, "tokenizer.json"), JSON.stringify(tokenizerJson))
  await writeFile(join(dir, "tokenizer_config.json"), JSON.stringify(tokenizerConfig))
  await writeFile(join(dir, "config.json"), JSON.stringify(config))
  return dir
}

let tokenizerPromise: Promise<Tokenizer.TokenizerShape> | undefined

/** The tiny tokenizer, built once per test file. */
export const tinyTokenizer = (): Promise<Tokenizer.TokenizerShape> =>
  (tokenizerPromise ??= (async () => {
    const dir = await writeTinyModelDir()
    try {
      return await Effect.runPromise(Tokenizer.make(dir))
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })())

// ---- scripted answers ---------------------------------------------------------------------------------

export const eotOf = (tokenizer: Tokenizer.TokenizerShape): number => Option.getOrThrow(tokenizer.specialTokens.eot)

/**
 * The answer tokens for a text, `genLength` of them: the text's tokens, then EOS or end-of-turn and EOS
 * padding (what an instruct model's canvas looks like); with `end: "none"` the text repeats instead, so
 * the answer has no end token at all.
 */
export const answerTokens = (
  tokenizer: Tokenizer.TokenizerShape,
  text: string,
  genLength: number,
  end: "eos" | "eot" | "none" = "eos"
): Array<number> => {
  const textTokens = tokenizer.encode(text, { addSpecialTokens: false })
  const eos = tokenizer.specialTokens.eos
  if (end === "none") return Array.from({ length: genLength }, (_, i) => textTokens[i % textTokens.length]!)
  const tokens = [...textTokens, end === "eot" ? eotOf(tokenizer) : eos]
  while (tokens.length < genLength) tokens.push(eos)
  return tokens.slice(0, genLength)
}

/** Answers `text(prompt, seed)` where the prompt is the decoded prompt text. */
export const textScript = (
  tokenizer: Tokenizer.TokenizerShape,
  text: (prompt: string, settings: SamplingSettings) => string,
  options: Omit<FakeScript, "answer"> & { readonly end?: "eos" | "eot" | "none" } = {}
): FakeScript => ({
  ...options,
  endTokens: [tokenizer.specialTokens.eos, eotOf(tokenizer)],
  answer: (prompt, settings) =>
    answerTokens(tokenizer, text(tokenizer.decode(prompt, { skipSpecialTokens: true }), settings), settings.genLength, options.end)
})

// ---- the server ---------------------------------------------------------------------------------------

export interface TestServer<E = FakeEngine> {
  readonly url: string
  readonly engine: E
  readonly tokenizer: Tokenizer.TokenizerShape
  readonly close: () => Promise<void>
  readonly post: (path: string, body: unknown, init?: RequestInit) => Promise<Response>
}

export const servingConfig: ServingConfig.ServingConfigShape = {
  modelName: "tiny",
  created: 1_700_000_000,
  maxModelLen: 128,
  defaults: { maxTokens: 16, steps: null, blockLength: 8, remasking: "low_confidence", cfgScale: 0, temperature: 0 }
}

const isApiError = (error: unknown): error is ApiError =>
  typeof error === "object" && error !== null && "status" in error && "type" in error && "message" in error

export interface ServerOptions {
  readonly script?: (tokenizer: Tokenizer.TokenizerShape) => FakeScript
  readonly engine?: FakeEngineOptions
  readonly scheduler?: Partial<Scheduler.SchedulerOptions>
  readonly config?: Partial<ServingConfig.ServingConfigShape>
}

/** The router over the fake engine (scripted when `script` is given) and the tiny tokenizer. */
export const startServer = async (options: ServerOptions = {}): Promise<TestServer> => {
  const tokenizer = await tinyTokenizer()
  const engine = makeFake({
    ...options.engine,
    ...(options.script === undefined ? {} : { script: options.script(tokenizer) })
  })
  return startServerWith({ ...options, engine, engineLayer: layerFake(engine), tokenizer })
}

/** The router over any engine and tokenizer, on a real HTTP server listening on a free port. */
export const startServerWith = async <E>(options: {
  readonly engine: E
  readonly engineLayer: Layer.Layer<Engine, unknown>
  readonly tokenizer: Tokenizer.TokenizerShape
  readonly scheduler?: Partial<Scheduler.SchedulerOptions>
  readonly config?: Partial<ServingConfig.ServingConfigShape>
}): Promise<TestServer<E>> => {
  const { tokenizer } = options
  const formatter = await Effect.runPromise(ChatFormatter.fromTokenizerConfig(tokenizer.tokenizerConfig))
  let requests = 0
  const app = router.pipe(
    Effect.catchAll((error) =>
      isApiError(error)
        ? Effect.flatMap(RequestId, (id) => Effect.succeed(HttpServerResponse.unsafeJson(toErrorBody(error, id), { status: error.status })))
        : Effect.fail(error)
    ),
    Effect.provideServiceEffect(
      RequestId,
      Effect.sync(() => `req${++requests}`)
    )
  )
  const services = Layer.mergeAll(
    Scheduler.layer({
      maxConcurrent: 8,
      queueCapacity: 64,
      maxBatchTokens: 1_000_000,
      requestTimeoutMs: 0,
      ...options.scheduler
    }).pipe(Layer.provide(options.engineLayer)),
    Layer.succeed(Tokenizer.Tokenizer, tokenizer),
    Layer.succeed(ChatFormatter.ChatFormatter, formatter),
    ServingConfig.layer({ ...servingConfig, ...options.config })
  )
  const layer = HttpServer.serve(app).pipe(
    Layer.provideMerge(NodeHttpServer.layer(createServer, { port: 0, host: "127.0.0.1" })),
    Layer.provide(services)
  )
  const scope = Effect.runSync(Scope.make())
  const context = await Effect.runPromise(Layer.buildWithScope(layer, scope))
  const address = Context.get(context, HttpServer.HttpServer).address
  if (address._tag !== "TcpAddress") throw new Error("expected a TCP address")
  const url = `http://127.0.0.1:${address.port}`
  return {
    url,
    engine: options.engine,
    tokenizer,
    close: () => Effect.runPromise(Scope.close(scope, Exit.void)),
    post: (path, body, init) =>
      fetch(url + path, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: typeof body === "string" ? body : JSON.stringify(body),
        ...init
      })
  }
}

// ---- reading responses --------------------------------------------------------------------------------

/** Parses a whole SSE body into its `data:` payloads; "[DONE]" stays a string. */
export const parseSse = (body: string): Array<unknown> => {
  const events: Array<unknown> = []
  for (const block of body.split("\n\n")) {
    if (block === "") continue
    if (!block.startsWith("data: ")) throw new Error(`not an SSE data event: ${JSON.stringify(block)}`)
    const data = block.slice("data: ".length)
    events.push(data === "[DONE]" ? data : JSON.parse(data))
  }
  return events
}

/** Waits (polling) until the condition holds, failing after `timeoutMs`. */
export const eventually = async (condition: () => boolean | Promise<boolean>, timeoutMs = 5_000): Promise<void> => {
  const start = Date.now()
  while (!(await condition())) {
    if (Date.now() - start > timeoutMs) throw new Error("condition not met in time")
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}
