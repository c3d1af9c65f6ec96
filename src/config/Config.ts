/**
 * Every setting of `vdiff serve`, as ONE effect/Schema: `Settings`. Each field is a schema from the text a
 * user types to the typed value, annotated with its meaning and its default. Everything else derives from
 * it: the command-line flag (field `maxQueueSize` ↔ `--max-queue-size`), the environment variable
 * (`VDIFF_MAX_QUEUE_SIZE`), the defaults, the `--help` text and the README's table of settings.
 *
 * Precedence: a flag wins over an environment variable, which wins over the default. An empty environment
 * variable counts as unset. A setting that has a standard variable (--otlp-endpoint:
 * OTEL_EXPORTER_OTLP_ENDPOINT) reads it when its VDIFF_* variable is unset. A bad value stops startup with one line naming the flag, the value and where it
 * came from (API keys are never echoed).
 *
 * `settingsMarkdown()` renders the README's table:
 *   node --import tsx -e 'import("./src/config/Config.ts").then((m) => console.log(m.settingsMarkdown()))'
 *
 * @since 0.1.0
 */
import { basename } from "node:path"
import { Either, Option, ParseResult, Schema, SchemaAST } from "effect"
import { MAX_DIFFUSION_STEPS } from "../openai/protocol.js"
import { embeddedModelDir } from "./package.js"

// --- annotations that turn a field schema into a documented setting ---------------------------------

/** The default, written as a user would type it (a list for list settings), or a function computing it. */
const SettingDefaultId: unique symbol = Symbol.for("vdiff/config/SettingDefault")
/** How the docs show the default when it is computed or absent. */
const SettingDefaultTextId: unique symbol = Symbol.for("vdiff/config/SettingDefaultText")
/** "value" (takes a value), "list" (repeatable, comma-separated) or "switch" (`--flag` alone means true). */
const SettingKindId: unique symbol = Symbol.for("vdiff/config/SettingKind")
/** The placeholder for the value in help text: PORT, SECONDS, ... */
const SettingValueId: unique symbol = Symbol.for("vdiff/config/SettingValue")
/** A standard environment variable read when the VDIFF_* one is unset (OTEL_EXPORTER_OTLP_ENDPOINT). */
const SettingEnvFallbackId: unique symbol = Symbol.for("vdiff/config/SettingEnvFallback")

export type SettingKind = "value" | "list" | "switch"
type RawDefault = string | ReadonlyArray<string> | undefined

interface SettingDoc {
  readonly description: string
  readonly default: RawDefault | (() => RawDefault)
  readonly defaultText?: string
  readonly kind?: SettingKind
  readonly value?: string
  readonly envFallback?: string
}

const setting = <A, I>(schema: Schema.Schema<A, I>, doc: SettingDoc): Schema.Schema<A, I> =>
  schema.annotations({
    description: doc.description,
    [SettingDefaultId]: doc.default,
    [SettingDefaultTextId]: doc.defaultText,
    [SettingKindId]: doc.kind ?? "value",
    [SettingValueId]: doc.value ?? "VALUE",
    [SettingEnvFallbackId]: doc.envFallback
  })

// --- schemas from text --------------------------------------------------------------------------------

const invalid = (ast: SchemaAST.AST, actual: unknown, message: string) =>
  ParseResult.fail(new ParseResult.Type(ast, actual, message))

const quoted = (text: string) => JSON.stringify(text)

const rangeText = (min: number, max: number) =>
  max === Number.MAX_SAFE_INTEGER || max === Infinity ? `of at least ${min}` : `from ${min} to ${max}`

/** A whole number from `min` to `max`, written in decimal digits. */
const IntegerText = (min: number, max: number = Number.MAX_SAFE_INTEGER) =>
  Schema.transformOrFail(Schema.String, Schema.Number, {
    strict: true,
    decode: (text, _, ast) => {
      const trimmed = text.trim()
      const value = Number(trimmed)
      return /^[+-]?\d+$/.test(trimmed) && Number.isSafeInteger(value) && value >= min && value <= max
        ? ParseResult.succeed(value)
        : invalid(ast, text, `must be an integer ${rangeText(min, max)}, got ${quoted(text)}`)
    },
    encode: (value) => ParseResult.succeed(String(value))
  })

/** A finite decimal number of at least `min` (above `min` when `exclusive`) and at most `max`. */
const NumberText = (min: number, exclusive = false, max = Infinity) =>
  Schema.transformOrFail(Schema.String, Schema.Number, {
    strict: true,
    decode: (text, _, ast) => {
      const trimmed = text.trim()
      const value = Number(trimmed)
      const ok = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(trimmed) && Number.isFinite(value) &&
        (exclusive ? value > min : value >= min) && value <= max
      const range = exclusive
        ? `above ${min}${max === Infinity ? "" : ` and at most ${max}`}`
        : max === Infinity ? `of at least ${min}` : `from ${min} to ${max}`
      return ok ? ParseResult.succeed(value) : invalid(ast, text, `must be a number ${range}, got ${quoted(text)}`)
    },
    encode: (value) => ParseResult.succeed(String(value))
  })

const switchValues: Record<string, boolean> = { true: true, false: false, "1": true, "0": false, yes: true, no: false, on: true, off: false }

/** true/false (also 1/0, yes/no, on/off). */
const SwitchText = Schema.transformOrFail(Schema.String, Schema.Boolean, {
  strict: true,
  decode: (text, _, ast) => {
    const value = switchValues[text.trim().toLowerCase()]
    return value === undefined
      ? invalid(ast, text, `must be true or false, got ${quoted(text)}`)
      : ParseResult.succeed(value)
  },
  encode: (value) => ParseResult.succeed(String(value))
})

/** One of the given words. */
const OneOfText = <const Values extends ReadonlyArray<string>>(values: Values) =>
  Schema.transformOrFail(Schema.String, Schema.Literal(...values), {
    strict: true,
    decode: (text, _, ast) =>
      values.includes(text.trim())
        ? ParseResult.succeed(text.trim() as Values[number])
        : invalid(ast, text, `must be one of ${values.join(", ")}; got ${quoted(text)}`),
    encode: (value) => ParseResult.succeed(value)
  })

/** Text without surrounding whitespace and not empty. */
const NonEmptyText = Schema.transformOrFail(Schema.String, Schema.String, {
  strict: true,
  decode: (text, _, ast) =>
    text.trim() === "" ? invalid(ast, text, "must not be empty") : ParseResult.succeed(text.trim()),
  encode: ParseResult.succeed
})

/**
 * A list given as repeated flags and/or comma-separated values; every item is checked by `check`, which
 * returns why an item is bad. `describe` says how a bad item is shown (keys are never shown).
 */
const ListText = (check: (item: string) => string | undefined, describe: (item: string) => string = quoted) =>
  Schema.transformOrFail(Schema.Array(Schema.String), Schema.Array(Schema.String), {
    strict: true,
    decode: (values, _, ast) => {
      const items = values.flatMap((value) => value.split(",")).map((item) => item.trim()).filter((item) => item !== "")
      for (const item of items) {
        const problem = check(item)
        if (problem !== undefined) return invalid(ast, "<list>", `${problem}, got ${describe(item)}`)
      }
      return ParseResult.succeed(items)
    },
    encode: (items) => ParseResult.succeed([items.join(",")])
  })

/** An http(s) URL; a trailing slash is dropped. */
const HttpUrlText = Schema.transformOrFail(Schema.String, Schema.String, {
  strict: true,
  decode: (text, _, ast) => {
    const trimmed = text.trim()
    try {
      const url = new URL(trimmed)
      if (url.protocol === "http:" || url.protocol === "https:") return ParseResult.succeed(trimmed.replace(/\/+$/, ""))
    } catch {
      // reported below
    }
    return invalid(ast, text, `must be an http:// or https:// URL, got ${quoted(text)}`)
  },
  encode: ParseResult.succeed
})

const isOrigin = (item: string): boolean => {
  if (item === "*") return true
  try {
    const url = new URL(item)
    return (url.protocol === "http:" || url.protocol === "https:") && url.origin === item
  } catch {
    return false
  }
}

// --- the settings -------------------------------------------------------------------------------------

export const logLevels = ["all", "trace", "debug", "info", "warning", "error", "fatal", "none"] as const
export type LogLevelName = (typeof logLevels)[number]

/**
 * All settings of `vdiff serve`. Decodes from the raw text of flags and environment variables (lists as
 * arrays of text) to typed values.
 */
export const Settings = Schema.Struct({
  host: setting(NonEmptyText, {
    description: "Address to listen on; 0.0.0.0 listens on every interface",
    default: "127.0.0.1",
    value: "ADDRESS"
  }),
  port: setting(IntegerText(0, 65535), {
    description: "TCP port to listen on; 0 picks a free one",
    default: "8000",
    value: "PORT"
  }),
  model: setting(NonEmptyText, {
    description: "Model directory (config.json, safetensors weights, tokenizer.json)",
    default: embeddedModelDir,
    defaultText: "the embedded model (models/shakespeare in the package)",
    value: "DIR"
  }),
  servedModelName: setting(Schema.UndefinedOr(NonEmptyText), {
    description: "Model id that clients name in requests and that /v1/models lists",
    default: undefined,
    defaultText: "the model directory's name",
    value: "NAME"
  }),
  dtype: setting(OneOfText(["auto"]), {
    description: "Compute type; auto (the only choice for now) computes in the dtype the weights are stored in",
    default: "auto",
    value: "auto"
  }),
  threads: setting(IntegerText(0, 4096), {
    description: "Threads for the forward pass; 0 uses every core",
    default: "0",
    value: "N"
  }),
  apiKey: setting(
    ListText(
      (item) => /^[\x21-\x7e]+$/.test(item) ? undefined : "API keys must be printable ASCII without spaces",
      () => "a key that is not (value hidden)"
    ),
    {
      description: "API key clients must send as `Authorization: Bearer KEY`; repeat or comma-separate for several; none: no authentication",
      default: [],
      defaultText: "none",
      kind: "list",
      value: "KEY"
    }
  ),
  allowedOrigins: setting(
    ListText((item) => isOrigin(item) ? undefined : `origins must be "*" or like https://example.com:8080`),
    {
      description: "Browser origins allowed to call the API (CORS), comma-separated; `*` allows any; none: no cross-origin access",
      default: [],
      defaultText: "none",
      kind: "list",
      value: "ORIGINS"
    }
  ),
  trustProxy: setting(SwitchText, {
    description: "Take the client address from X-Forwarded-For (only behind a proxy you control)",
    default: "false",
    kind: "switch",
    value: "BOOL"
  }),
  rateLimitRequests: setting(IntegerText(0), {
    description: "Requests a client (API key, else address) may make per window, and failed API key attempts an address may make; 0 turns rate limiting off",
    default: "0",
    value: "N"
  }),
  rateLimitWindow: setting(NumberText(0, true), {
    description: "Length of the sliding rate-limit window, in seconds",
    default: "60",
    value: "SECONDS"
  }),
  maxConcurrentRequests: setting(IntegerText(1, 1024), {
    description: "Sequences decoded together in one batch (the batch size)",
    default: "8",
    value: "N"
  }),
  maxQueueSize: setting(IntegerText(1), {
    description: "Requests that may wait for a batch slot; beyond it requests get 503 with Retry-After",
    default: "64",
    value: "N"
  }),
  maxBatchTokens: setting(IntegerText(0), {
    description: "Canvas tokens (prompt + answer, doubled under cfg) the live batch may hold; 0: no limit but the batch size",
    default: "0",
    value: "N"
  }),
  requestTimeout: setting(NumberText(0), {
    description: "Seconds a request may take, queueing included, before it fails with 504; 0: no limit",
    default: "300",
    value: "SECONDS"
  }),
  shutdownTimeout: setting(NumberText(0), {
    description: "Seconds to let in-flight requests finish after SIGTERM/SIGINT before they are ended",
    default: "30",
    value: "SECONDS"
  }),
  maxBodySize: setting(IntegerText(1), {
    description: "Largest request body accepted, in bytes; larger gets 413",
    default: "1048576",
    value: "BYTES"
  }),
  maxTokens: setting(IntegerText(1), {
    description: "Answer length when a request gives no max_tokens",
    default: "128",
    value: "N"
  }),
  diffusionSteps: setting(IntegerText(0, MAX_DIFFUSION_STEPS), {
    description: "Denoising steps when a request gives no diffusion_steps; 0: one step per answer token",
    default: "0",
    value: "N"
  }),
  blockLength: setting(IntegerText(1), {
    description: "Semi-autoregressive block length when a request gives no block_length",
    default: "32",
    value: "N"
  }),
  remasking: setting(OneOfText(["low_confidence", "random"]), {
    description: "Which masked positions a step commits when a request gives no remasking",
    default: "low_confidence",
    value: "low_confidence|random"
  }),
  cfgScale: setting(NumberText(0), {
    description: "Classifier-free guidance scale when a request gives no cfg_scale; 0 turns it off",
    default: "0",
    value: "S"
  }),
  temperature: setting(NumberText(0), {
    description: "Sampling temperature when a request gives none; 0 is greedy",
    default: "0",
    value: "T"
  }),
  topK: setting(IntegerText(0), {
    description: "Top-k sampling when a request gives no top_k: at temperature > 0 draw among the K likeliest tokens; 0 turns it off",
    default: "0",
    value: "K"
  }),
  topP: setting(NumberText(0, true, 1), {
    description: "Nucleus sampling when a request gives no top_p: at temperature > 0 draw from the likeliest tokens holding P of the probability; 1 turns it off",
    default: "1",
    value: "P"
  }),
  parallelThreshold: setting(NumberText(0, false, 1), {
    description: "Parallel decoding when a request sets neither parallel rule: a step also commits every masked position of the block at least T likely; 0 turns it off",
    default: "0",
    value: "T"
  }),
  parallelFactor: setting(NumberText(0), {
    description: "Parallel decoding by rank when a request sets neither parallel rule: threshold 1 − F/(r+1); 0 turns it off; not together with --parallel-threshold",
    default: "0",
    value: "F"
  }),
  earlyStop: setting(SwitchText, {
    description: "Finish once the answer has ended instead of denoising the remaining blocks, when a request gives no early_stop; --early-stop=false turns it off",
    default: "true",
    kind: "switch",
    value: "BOOL"
  }),
  kvCache: setting(OneOfText(["none", "prefix", "dual"]), {
    description: "Approximate KV cache when a request gives no kv_cache: prefix recomputes the block and what follows it, dual the block only, between whole-canvas refreshes at block starts; none is exact",
    default: "none",
    value: "none|prefix|dual"
  }),
  kvCacheDtype: setting(OneOfText(["f32", "bf16"]), {
    description: "Element type of the KV caches: f32 (a read of an unchanged canvas is exact) or bf16 (half the memory)",
    default: "f32",
    value: "f32|bf16"
  }),
  kvCacheBudget: setting(IntegerText(0), {
    description: "Bytes all live KV caches may hold together; a request whose caches do not fit waits for running ones to finish; one cache larger than the budget is a 400, a request whose caches never fit together a 503; 0: no limit",
    default: "0",
    value: "BYTES"
  }),
  logLevel: setting(OneOfText(logLevels), {
    description: `Least important log level written: ${logLevels.join(", ")}`,
    default: "info",
    value: "LEVEL"
  }),
  otlpEndpoint: setting(Schema.UndefinedOr(HttpUrlText), {
    description: "OpenTelemetry collector (OTLP/HTTP) base URL; spans are sent to URL/v1/traces. Unset: no tracing",
    default: undefined,
    defaultText: "none",
    value: "URL",
    envFallback: "OTEL_EXPORTER_OTLP_ENDPOINT"
  })
})

export type Settings = Schema.Schema.Type<typeof Settings>
export type SettingName = keyof Settings

// --- derived: flags, environment variables, defaults --------------------------------------------------

export interface SettingInfo {
  readonly name: SettingName
  /** `--max-queue-size` */
  readonly flag: string
  /** `VDIFF_MAX_QUEUE_SIZE` */
  readonly env: string
  /** A standard variable read when `env` is unset, e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`. */
  readonly envFallback: string | undefined
  readonly kind: SettingKind
  readonly value: string
  readonly description: string
  /** The default as typed (computed now for computed defaults). */
  readonly defaultRaw: () => RawDefault
  /** The default as the docs show it. */
  readonly defaultText: string
  /** The default is described in words (computed or absent) rather than a literal value. */
  readonly defaultInWords: boolean
}

const words = (name: string) => name.replace(/[A-Z]/g, (c) => " " + c.toLowerCase()).split(" ")

const annotation = <A>(ast: SchemaAST.AST, id: symbol): A | undefined =>
  Option.getOrUndefined(SchemaAST.getAnnotation<A>(id)(ast))

export const settings: ReadonlyArray<SettingInfo> = Object.entries(Settings.fields).map(([name, schema]) => {
  const ast = schema.ast
  const rawDefault = annotation<RawDefault | (() => RawDefault)>(ast, SettingDefaultId)
  const defaultRaw = typeof rawDefault === "function" ? rawDefault : () => rawDefault
  const shown = annotation<string>(ast, SettingDefaultTextId)
  const fixed = typeof rawDefault === "function" ? undefined : rawDefault
  return {
    name: name as SettingName,
    flag: "--" + words(name).join("-"),
    env: "VDIFF_" + words(name).join("_").toUpperCase(),
    envFallback: annotation<string>(ast, SettingEnvFallbackId),
    kind: annotation<SettingKind>(ast, SettingKindId) ?? "value",
    value: annotation<string>(ast, SettingValueId) ?? "VALUE",
    description: Option.getOrElse(SchemaAST.getDescriptionAnnotation(ast), () => ""),
    defaultRaw,
    defaultText: shown ?? (typeof fixed === "string" ? fixed : Array.isArray(fixed) ? fixed.join(",") : ""),
    defaultInWords: shown !== undefined
  }
})

const byFlag = new Map(settings.map((s) => [s.flag, s]))

// --- loading ------------------------------------------------------------------------------------------

/** A setting is missing, malformed or out of range; `message` is one line for the user. */
export class ConfigError extends Schema.TaggedError<ConfigError>()("ConfigError", {
  message: Schema.String
}) {}

type Raw = Record<string, string | Array<string> | undefined>
type Source = { readonly flag: string } | { readonly env: string } | "default"

/** The setting's environment variable and the one it was read from (its own, else its fallback). */
const fromEnvironment = (info: SettingInfo, env: LoadInput["env"]): { value: string; name: string } | undefined => {
  for (const name of [info.env, info.envFallback]) {
    const value = name === undefined ? undefined : env[name]
    if (name !== undefined && value !== undefined && value !== "") return { value, name }
  }
  return undefined
}

/**
 * Reads flags: `--name value`, `--name=value`; a switch alone (`--trust-proxy`) means true; list flags
 * may repeat. A non-list flag given twice keeps the last value.
 */
export const parseFlags = (argv: ReadonlyArray<string>): Either.Either<Raw, ConfigError> => {
  const raw: Raw = {}
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!
    if (!arg.startsWith("--")) {
      return Either.left(new ConfigError({ message: `unexpected argument ${quoted(arg)} (settings are --name value)` }))
    }
    const eq = arg.indexOf("=")
    const flag = eq < 0 ? arg : arg.slice(0, eq)
    const info = byFlag.get(flag)
    if (info === undefined) {
      return Either.left(new ConfigError({ message: `unknown flag ${flag} (vdiff serve --help lists them)` }))
    }
    let value: string
    if (eq >= 0) value = arg.slice(eq + 1)
    else if (info.kind === "switch") value = "true"
    else if (i + 1 < argv.length && !argv[i + 1]!.startsWith("--")) value = argv[++i]!
    else return Either.left(new ConfigError({ message: `${flag} needs a value (${info.value})` }))
    if (info.kind === "list") raw[info.name] = [...((raw[info.name] as Array<string> | undefined) ?? []), value]
    else raw[info.name] = value
  }
  return Either.right(raw)
}

export interface LoadInput {
  readonly argv: ReadonlyArray<string>
  readonly env: Readonly<Record<string, string | undefined>>
}

/** Flags, then environment variables, then defaults, decoded through `Settings`. */
export const load = (input: LoadInput): Either.Either<Settings, ConfigError> =>
  Either.gen(function*() {
    const flags = yield* parseFlags(input.argv)
    const raw: Raw = {}
    const sources: Partial<Record<SettingName, Source>> = {}
    for (const info of settings) {
      const fromFlag = flags[info.name]
      const fromEnv = fromEnvironment(info, input.env)
      if (fromFlag !== undefined) {
        raw[info.name] = fromFlag
        sources[info.name] = { flag: info.flag }
      } else if (fromEnv !== undefined) {
        raw[info.name] = info.kind === "list" ? [fromEnv.value] : fromEnv.value
        sources[info.name] = { env: fromEnv.name }
      } else {
        const value = info.defaultRaw()
        raw[info.name] = value === undefined ? undefined : typeof value === "string" ? value : [...value]
        sources[info.name] = "default"
      }
    }
    /** How an error names a setting: by the variable it came from, else by its flag. */
    const where = (info: SettingInfo) => {
      const source = sources[info.name]
      return source !== undefined && source !== "default" && "env" in source ? `${source.env} (${info.flag})` : info.flag
    }
    const config = yield* Schema.decodeUnknownEither(Settings, { errors: "first" })(raw).pipe(
      Either.mapLeft((error) => {
        const issue = ParseResult.ArrayFormatter.formatErrorSync(error)[0]
        const name = issue?.path[0] as SettingName | undefined
        const info = settings.find((s) => s.name === name)
        if (info === undefined || issue === undefined) return new ConfigError({ message: error.message })
        return new ConfigError({ message: `${where(info)}: ${issue.message}` })
      })
    )
    // The one rule across settings: the two parallel decoding rules decide the same thing.
    if (config.parallelThreshold > 0 && config.parallelFactor > 0) {
      const [threshold, factor] = (["parallelThreshold", "parallelFactor"] as const).map((name) =>
        where(settings.find((s) => s.name === name)!)
      )
      return yield* Either.left(
        new ConfigError({ message: `${threshold} and ${factor} cannot both be above 0: they are two rules for the same choice` })
      )
    }
    return config
  })

/** The id clients use for the model: --served-model-name, else the model directory's name. */
export const servedModelName = (config: Settings): string => config.servedModelName ?? basename(config.model)

// --- documentation ------------------------------------------------------------------------------------

/** The Markdown table of every setting (flag, environment variable, default, meaning) for the README. */
export const settingsMarkdown = (): string => {
  const cell = (text: string) => text.replace(/\|/g, "\\|")
  const rows = settings.map((s) => {
    const flag = s.kind === "switch" ? `\`${s.flag}\`` : `\`${s.flag} ${s.value}\``
    const shown = s.defaultInWords ? s.defaultText : `\`${s.defaultText}\``
    const env = s.envFallback === undefined ? `\`${s.env}\`` : `\`${s.env}\`, else \`${s.envFallback}\``
    return `| ${cell(flag)} | ${env} | ${cell(shown)} | ${cell(s.description)} |`
  })
  return ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|", ...rows].join("\n")
}

/** `vdiff serve --help`. */
export const helpText = (): string => {
  const lines = settings.map((s) => {
    const left = s.kind === "switch" ? s.flag : `${s.flag} ${s.value}`
    const shown = s.defaultText === "" ? "" : ` (default: ${s.defaultText})`
    const env = s.envFallback === undefined ? s.env : `${s.env}, else ${s.envFallback}`
    return `  ${left.padEnd(34)} ${s.description}${shown}\n  ${"".padEnd(34)} env ${env}`
  })
  return [
    "usage: vdiff serve [flags]",
    "",
    "Serves a masked-diffusion language model behind an OpenAI-compatible HTTP API.",
    "Every flag can also be set by its environment variable; a flag wins over the environment.",
    "",
    ...lines
  ].join("\n")
}
