/**
 * The mechanism behind every command's settings, apart from any particular table of them: a setting is a
 * field of an effect/Schema Struct that decodes the text a user types (a flag's value or an environment
 * variable) into a typed value, annotated with its meaning and default. From such a Struct, `commandLine`
 * derives the flags (field `maxQueueSize` ↔ `--max-queue-size`, or an explicit `flag`), the environment
 * variables (`VDIFF_MAX_QUEUE_SIZE`, for commands that read them), the parser, the `--help` text and a
 * Markdown table.
 *
 * Precedence: a flag wins over an environment variable, which wins over the default. An empty environment
 * variable counts as unset. A setting with a standard variable (OTEL_EXPORTER_OTLP_ENDPOINT) reads it when
 * its VDIFF_* variable is unset. A bad value fails with one line naming the flag, the value and where it
 * came from (list items can hide their value, as API keys do).
 *
 * The tables: src/config/Config.ts (`vdiff serve`), src/config/sampling.ts (the sampling settings that
 * `vdiff serve` takes as server defaults), src/cli/commands.ts (the other commands).
 *
 * @since 0.1.0
 */
import { Either, Option, ParseResult, Schema, SchemaAST } from "effect"

// --- annotations that turn a field schema into a documented setting ---------------------------------

const SettingDefaultId: unique symbol = Symbol.for("vdiff/config/SettingDefault")
const SettingDefaultTextId: unique symbol = Symbol.for("vdiff/config/SettingDefaultText")
const SettingKindId: unique symbol = Symbol.for("vdiff/config/SettingKind")
const SettingValueId: unique symbol = Symbol.for("vdiff/config/SettingValue")
const SettingEnvFallbackId: unique symbol = Symbol.for("vdiff/config/SettingEnvFallback")
const SettingFlagId: unique symbol = Symbol.for("vdiff/config/SettingFlag")

/** "value" (takes a value), "list" (repeatable, comma-separated) or "switch" (`--flag` alone means true). */
export type SettingKind = "value" | "list" | "switch"
export type RawDefault = string | ReadonlyArray<string> | undefined

export interface SettingDoc {
  readonly description: string
  /** The default, written as a user would type it (a list for list settings), or a function computing it. */
  readonly default: RawDefault | (() => RawDefault)
  /** How the docs show the default when it is computed or absent. */
  readonly defaultText?: string | undefined
  readonly kind?: SettingKind | undefined
  /** The placeholder for the value in help text: PORT, SECONDS, ... */
  readonly value?: string | undefined
  /** A standard environment variable read when the VDIFF_* one is unset (OTEL_EXPORTER_OTLP_ENDPOINT). */
  readonly envFallback?: string | undefined
  /** The flag when it is not the field's name in kebab case (`--gen` for genLength). */
  readonly flag?: string | undefined
}

/** A field schema annotated as a setting. */
export const setting = <A, I>(schema: Schema.Schema<A, I>, doc: SettingDoc): Schema.Schema<A, I> =>
  schema.annotations({
    description: doc.description,
    [SettingDefaultId]: doc.default,
    [SettingDefaultTextId]: doc.defaultText,
    [SettingKindId]: doc.kind ?? "value",
    [SettingValueId]: doc.value ?? "VALUE",
    [SettingEnvFallbackId]: doc.envFallback,
    [SettingFlagId]: doc.flag
  })

// --- schemas from text --------------------------------------------------------------------------------

const invalid = (ast: SchemaAST.AST, actual: unknown, message: string) => ParseResult.fail(new ParseResult.Type(ast, actual, message))

const quoted = (text: string) => JSON.stringify(text)

const rangeText = (min: number, max: number) =>
  max === Number.MAX_SAFE_INTEGER || max === Infinity ? `of at least ${min}` : `from ${min} to ${max}`

/** A whole number from `min` to `max`, written in decimal digits. */
export const IntegerText = (min: number, max: number = Number.MAX_SAFE_INTEGER) =>
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

/**
 * A finite decimal number of at least `min` (above `min` when `exclusive`) and at most `max` (below `max`
 * when `exclusiveMax`).
 */
export const NumberText = (min: number, exclusive = false, max = Infinity, exclusiveMax = false) =>
  Schema.transformOrFail(Schema.String, Schema.Number, {
    strict: true,
    decode: (text, _, ast) => {
      const trimmed = text.trim()
      const value = Number(trimmed)
      const ok =
        /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(trimmed) &&
        Number.isFinite(value) &&
        (exclusive ? value > min : value >= min) &&
        (exclusiveMax ? value < max : value <= max)
      const upper = exclusiveMax ? "below" : "at most"
      const range = exclusive
        ? `above ${min}${max === Infinity ? "" : ` and ${upper} ${max}`}`
        : exclusiveMax
          ? `of at least ${min} and below ${max}`
          : max === Infinity
            ? `of at least ${min}`
            : `from ${min} to ${max}`
      return ok ? ParseResult.succeed(value) : invalid(ast, text, `must be a number ${range}, got ${quoted(text)}`)
    },
    encode: (value) => ParseResult.succeed(String(value))
  })

const switchValues: Record<string, boolean> = {
  true: true,
  false: false,
  "1": true,
  "0": false,
  yes: true,
  no: false,
  on: true,
  off: false
}

/** true/false (also 1/0, yes/no, on/off). */
export const SwitchText = Schema.transformOrFail(Schema.String, Schema.Boolean, {
  strict: true,
  decode: (text, _, ast) => {
    const value = switchValues[text.trim().toLowerCase()]
    return value === undefined ? invalid(ast, text, `must be true or false, got ${quoted(text)}`) : ParseResult.succeed(value)
  },
  encode: (value) => ParseResult.succeed(String(value))
})

/** One of the given words. */
export const OneOfText = <const Values extends ReadonlyArray<string>>(values: Values) =>
  Schema.transformOrFail(Schema.String, Schema.Literal(...values), {
    strict: true,
    decode: (text, _, ast) =>
      values.includes(text.trim())
        ? ParseResult.succeed(text.trim() as Values[number])
        : invalid(ast, text, `must be one of ${values.join(", ")}; got ${quoted(text)}`),
    encode: (value) => ParseResult.succeed(value)
  })

/** Text without surrounding whitespace and not empty. */
export const NonEmptyText = Schema.transformOrFail(Schema.String, Schema.String, {
  strict: true,
  decode: (text, _, ast) => (text.trim() === "" ? invalid(ast, text, "must not be empty") : ParseResult.succeed(text.trim())),
  encode: ParseResult.succeed
})

/**
 * A list given as repeated flags and/or comma-separated values; every item is checked by `check`, which
 * returns why an item is bad. `describe` says how a bad item is shown (keys are never shown).
 */
export const ListText = (
  check: (item: string) => string | undefined,
  describe: (item: string) => string = quoted,
  /** Why a list given with no item in it (`--api-key=`, `--api-key ,`) is refused; absent: it is the empty list. */
  emptyRefused?: string
) =>
  Schema.transformOrFail(Schema.Array(Schema.String), Schema.Array(Schema.String), {
    strict: true,
    decode: (values, _, ast) => {
      const items = values
        .flatMap((value) => value.split(","))
        .map((item) => item.trim())
        .filter((item) => item !== "")
      if (emptyRefused !== undefined && values.length > 0 && items.length === 0) return invalid(ast, "<list>", emptyRefused)
      for (const item of items) {
        const problem = check(item)
        if (problem !== undefined) return invalid(ast, "<list>", `${problem}, got ${describe(item)}`)
      }
      return ParseResult.succeed(items)
    },
    encode: (items) => ParseResult.succeed([items.join(",")])
  })

/** An http(s) URL; a trailing slash is dropped. */
export const HttpUrlText = Schema.transformOrFail(Schema.String, Schema.String, {
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

// --- derived: flags, environment variables, defaults --------------------------------------------------

export interface SettingInfo<Name extends string = string> {
  readonly name: Name
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

const annotation = <A>(ast: SchemaAST.AST, id: symbol): A | undefined => Option.getOrUndefined(SchemaAST.getAnnotation<A>(id)(ast))

/** What the annotations of a Struct's fields say about each setting, in field order. */
export const settingsOf = <Fields extends Schema.Struct.Fields>(
  fields: Fields
): ReadonlyArray<SettingInfo<Extract<keyof Fields, string>>> =>
  Object.entries(fields).map(([name, schema]) => {
    const ast = (schema as Schema.Schema.Any).ast
    const rawDefault = annotation<RawDefault | (() => RawDefault)>(ast, SettingDefaultId)
    const defaultRaw = typeof rawDefault === "function" ? rawDefault : () => rawDefault
    const shown = annotation<string>(ast, SettingDefaultTextId)
    const fixed = typeof rawDefault === "function" ? undefined : rawDefault
    return {
      name: name as Extract<keyof Fields, string>,
      flag: annotation<string>(ast, SettingFlagId) ?? "--" + words(name).join("-"),
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

// --- loading ------------------------------------------------------------------------------------------

/** A setting is missing, malformed or out of range; `message` is one line for the user. */
export class ConfigError extends Schema.TaggedError<ConfigError>()("ConfigError", {
  message: Schema.String
}) {}

export interface LoadInput {
  readonly argv: ReadonlyArray<string>
  readonly env: Readonly<Record<string, string | undefined>>
}

type Raw = Record<string, string | Array<string> | undefined>

/**
 * A rule across settings, checked after each has decoded: `members` may not all be "on" (above `off`)
 * at once. `because` ends the message.
 */
export interface ExclusiveRule<Name extends string> {
  readonly members: readonly [Name, Name]
  readonly off: unknown
  readonly because: string
}

export interface CommandLineOptions<Name extends string> {
  /** The command, for messages and help: "vdiff serve". */
  readonly command: string
  /** Whether the settings read VDIFF_* environment variables (vdiff serve does; the tools do not). */
  readonly environment: boolean
  /** Help text above the list of flags. */
  readonly summary: ReadonlyArray<string>
  readonly exclusive?: ReadonlyArray<ExclusiveRule<Name>> | undefined
}

export interface CommandLine<A, Name extends string> {
  readonly settings: ReadonlyArray<SettingInfo<Name>>
  /**
   * Reads flags: `--name value`, `--name=value`; a switch alone (`--trust-proxy`) means true; list flags
   * may repeat. A non-list flag given twice keeps the last value.
   */
  readonly parseFlags: (argv: ReadonlyArray<string>) => Either.Either<Partial<Record<Name, string | Array<string>>>, ConfigError>
  /** Flags, then environment variables, then defaults, decoded through the Struct. */
  readonly load: (input: LoadInput) => Either.Either<A, ConfigError>
  /** The Markdown table of every setting (flag, environment variable, default, meaning). */
  readonly markdown: () => string
  /** `--help`. */
  readonly help: () => string
}

/** The parser, help and docs of a command whose settings are the fields of `schema`. */
export const commandLine = <Fields extends Schema.Struct.Fields>(
  schema: Schema.Struct<Fields>,
  options: CommandLineOptions<Extract<keyof Fields, string>>
): CommandLine<Schema.Schema.Type<Schema.Struct<Fields>>, Extract<keyof Fields, string>> => {
  type Name = Extract<keyof Fields, string>
  type A = Schema.Schema.Type<Schema.Struct<Fields>>
  const decode = Schema.decodeUnknownEither(schema as unknown as Schema.Schema<A, unknown>, { errors: "first" })
  type Source = { readonly flag: string } | { readonly env: string } | "default"
  const settings = settingsOf(schema.fields)
  const byFlag = new Map(settings.map((s) => [s.flag, s]))
  const byName = new Map(settings.map((s) => [s.name as string, s]))

  const fromEnvironment = (info: SettingInfo, env: LoadInput["env"]): { value: string; name: string } | undefined => {
    if (!options.environment) return undefined
    for (const name of [info.env, info.envFallback]) {
      const value = name === undefined ? undefined : env[name]
      if (name !== undefined && value !== undefined && value !== "") return { value, name }
    }
    return undefined
  }

  const parseFlags = (argv: ReadonlyArray<string>): Either.Either<Partial<Record<Name, string | Array<string>>>, ConfigError> => {
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
        return Either.left(new ConfigError({ message: `unknown flag ${flag} (${options.command} --help lists them)` }))
      }
      let value: string
      if (eq >= 0) value = arg.slice(eq + 1)
      else if (info.kind === "switch") value = "true"
      else if (i + 1 < argv.length && !argv[i + 1]!.startsWith("--")) value = argv[++i]!
      else return Either.left(new ConfigError({ message: `${flag} needs a value (${info.value})` }))
      if (info.kind === "list") raw[info.name] = [...((raw[info.name] as Array<string> | undefined) ?? []), value]
      else raw[info.name] = value
    }
    return Either.right(raw as Partial<Record<Name, string | Array<string>>>)
  }

  const load = (input: LoadInput): Either.Either<A, ConfigError> =>
    Either.gen(function* () {
      const flags: Raw = yield* parseFlags(input.argv)
      const raw: Raw = {}
      const sources: Record<string, Source> = {}
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
      const config = yield* decode(raw).pipe(
        Either.mapLeft((error) => {
          const issue = ParseResult.ArrayFormatter.formatErrorSync(error)[0]
          const info = byName.get(String(issue?.path[0]))
          if (info === undefined || issue === undefined) return new ConfigError({ message: error.message })
          return new ConfigError({ message: `${where(info)}: ${issue.message}` })
        })
      )
      for (const rule of options.exclusive ?? []) {
        const values = rule.members.map((name) => (config as Record<string, unknown>)[name])
        if (values.every((value) => value !== rule.off)) {
          const [a, b] = rule.members.map((name) => where(byName.get(name)!))
          return yield* Either.left(new ConfigError({ message: `${a} and ${b} cannot both be above 0: ${rule.because}` }))
        }
      }
      return config
    })

  const markdown = (): string => {
    const cell = (text: string) => text.replace(/\|/g, "\\|")
    const rows = settings.map((s) => {
      const flag = s.kind === "switch" ? `\`${s.flag}\`` : `\`${s.flag} ${s.value}\``
      const shown = s.defaultInWords ? s.defaultText : `\`${s.defaultText}\``
      if (!options.environment) return `| ${cell(flag)} | ${cell(shown)} | ${cell(s.description)} |`
      const env = s.envFallback === undefined ? `\`${s.env}\`` : `\`${s.env}\`, else \`${s.envFallback}\``
      return `| ${cell(flag)} | ${env} | ${cell(shown)} | ${cell(s.description)} |`
    })
    const head = options.environment
      ? ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|"]
      : ["| Flag | Default | Meaning |", "|---|---|---|"]
    return [...head, ...rows].join("\n")
  }

  const help = (): string => {
    const lines = settings.map((s) => {
      const left = s.kind === "switch" ? s.flag : `${s.flag} ${s.value}`
      const shown = s.defaultText === "" ? "" : ` (default: ${s.defaultText})`
      const line = `  ${left.padEnd(34)} ${s.description}${shown}`
      if (!options.environment) return line
      const env = s.envFallback === undefined ? s.env : `${s.env}, else ${s.envFallback}`
      return `${line}\n  ${"".padEnd(34)} env ${env}`
    })
    return [`usage: ${options.command} [flags]`, "", ...options.summary, "", ...lines].join("\n")
  }

  return { settings, parseFlags, load, markdown, help }
}
