/**
 * The sampling settings: how one answer is denoised. Each is described ONCE here — its request field,
 * value type and range, server default, meaning, and the engine's name for it — and everything else is
 * derived from this table:
 *
 * - the request fields of /v1/completions and /v1/chat/completions (`requestFields`, spread into
 *   openai/protocol.ts), with their 400 messages ("top_p must be a number greater than 0 and at most 1");
 * - the server defaults: the `vdiff serve` flags and VDIFF_* variables (`configFields`, spread into
 *   config/Config.ts, so also its --help and the README's Configuration table) and what the serving layer
 *   falls back to (`EngineDefaults`, `defaultsFromConfig`);
 * - the engine's settings object (`SamplingParams`), which is also the params object the native addon
 *   reads (`NativeSamplingParams`, whose names are the C++ reader's in native/src/addon/addon.cpp);
 * - `resolve`: a request's values, else the server's, else the documented default, as the engine takes them.
 *
 * A new setting `min_p` is one entry in `samplingSettings` below (then `minP` in the engine, `--min-p` and
 * VDIFF_MIN_P on the server, a row in the README's table), plus the C++ SamplingParams field and its read
 * in addon.cpp's params_of.
 *
 * Names: the key is the request field (snake_case); the flag and the engine field are its camelCase unless
 * `engine` names the engine field (max_tokens → genLength, diffusion_steps → steps).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import { IntegerText, NumberText, OneOfText, setting, SwitchText } from "./Setting.js"

/** The largest seed: the n answers of a request use seed, seed+1, ..., which must stay exact integers. */
export const MAX_SEED = 2 ** 52

/**
 * The most denoising steps a request may ask for. More steps than answer tokens change nothing (a block
 * never takes more steps than it has positions), so this only keeps absurd values away from the engine.
 */
export const MAX_DIFFUSION_STEPS = 100_000

// ---- value types -------------------------------------------------------------------------------------

/** What a setting holds, and the range a request may ask for. */
export type ValueType =
  | { readonly type: "int"; readonly min: number; readonly max?: number }
  | { readonly type: "number"; readonly min: number; readonly max?: number; readonly above?: boolean }
  | { readonly type: "oneOf"; readonly values: ReadonlyArray<string> }
  | { readonly type: "switch" }

type ValueOf<V> = V extends { readonly type: "oneOf"; readonly values: ReadonlyArray<infer W> }
  ? W
  : V extends { readonly type: "switch" }
    ? boolean
    : number

export interface SamplingSetting<V extends ValueType = ValueType> {
  readonly value: V
  /** The range of the server's flag, when it differs from a request's. */
  readonly flag?: V | undefined
  /** The engine's (and the native addon's) field name, when it is not the request field's camelCase. */
  readonly engine?: string | undefined
  /**
   * Absent from the engine's settings means off (the native side has a neutral value); otherwise the
   * engine requires it.
   */
  readonly optional: boolean
  /** The server default, written as on the command line. */
  readonly default: string
  /** How the docs show the default when the literal would mislead. */
  readonly defaultText?: string | undefined
  /** The placeholder of the flag's value in --help (N, T, ...); one-of settings list their values. */
  readonly placeholder?: string | undefined
  /** The --help and README text of the server flag. */
  readonly description: string
  /** Turns the chosen value into the engine's, given the answer length (block_length: at most that). */
  readonly toEngine?: ((value: ValueOf<V>, genLength: number) => ValueOf<V>) | undefined
}

const entry = <const V extends ValueType, const O extends boolean, const E extends string = never>(
  spec: SamplingSetting<V> & { readonly optional: O; readonly engine?: E }
) => spec as typeof spec & ([E] extends [never] ? unknown : { readonly engine: E })

// ---- the table ---------------------------------------------------------------------------------------

export const samplingSettings = {
  max_tokens: entry({
    value: { type: "int", min: 1 },
    engine: "genLength",
    optional: false,
    default: "128",
    placeholder: "N",
    description: "Answer length when a request gives no max_tokens"
  }),
  diffusion_steps: entry({
    value: { type: "int", min: 1, max: MAX_DIFFUSION_STEPS },
    flag: { type: "int", min: 0, max: MAX_DIFFUSION_STEPS },
    engine: "steps",
    optional: false,
    default: "0",
    placeholder: "N",
    description: "Denoising steps when a request gives no diffusion_steps; 0: one step per answer token",
    toEngine: (steps, genLength) => (steps === 0 ? genLength : steps)
  }),
  block_length: entry({
    value: { type: "int", min: 1 },
    optional: false,
    default: "32",
    placeholder: "N",
    description: "Semi-autoregressive block length when a request gives no block_length",
    toEngine: (length, genLength) => Math.min(length, genLength)
  }),
  remasking: entry({
    value: { type: "oneOf", values: ["low_confidence", "random"] },
    optional: false,
    default: "low_confidence",
    description: "Which masked positions a step commits when a request gives no remasking"
  }),
  cfg_scale: entry({
    value: { type: "number", min: 0, max: 1000 },
    flag: { type: "number", min: 0 },
    optional: false,
    default: "0",
    placeholder: "S",
    description: "Classifier-free guidance scale when a request gives no cfg_scale; 0 turns it off"
  }),
  temperature: entry({
    value: { type: "number", min: 0, max: 2 },
    flag: { type: "number", min: 0 },
    optional: false,
    default: "0",
    placeholder: "T",
    description: "Sampling temperature when a request gives none; 0 is greedy"
  }),
  top_k: entry({
    value: { type: "int", min: -1 },
    flag: { type: "int", min: 0 },
    optional: true,
    default: "0",
    placeholder: "K",
    description: "Top-k sampling when a request gives no top_k: at temperature > 0 draw among the K likeliest tokens; 0 turns it off",
    // -1 and 0 both mean off, as in vLLM.
    toEngine: (k) => Math.max(0, k)
  }),
  top_p: entry({
    value: { type: "number", min: 0, above: true, max: 1 },
    optional: true,
    default: "1",
    placeholder: "P",
    description:
      "Nucleus sampling when a request gives no top_p: at temperature > 0 draw from the likeliest tokens holding P of the probability; 1 turns it off"
  }),
  min_p: entry({
    value: { type: "number", min: 0, max: 1 },
    optional: true,
    default: "0",
    placeholder: "P",
    description:
      "Min-p sampling when a request gives no min_p: at temperature > 0 draw only tokens at least P times as likely as the likeliest; 0 turns it off"
  }),
  parallel_threshold: entry({
    value: { type: "number", min: 0, max: 1 },
    optional: true,
    default: "0",
    placeholder: "T",
    description:
      "Parallel decoding when a request sets neither parallel rule: a step also commits every masked position of the block at least T likely; 0 turns it off"
  }),
  parallel_factor: entry({
    value: { type: "number", min: 0, max: 1000 },
    flag: { type: "number", min: 0 },
    optional: true,
    default: "0",
    placeholder: "F",
    description:
      "Parallel decoding by rank when a request sets neither parallel rule: threshold 1 − F/(r+1); 0 turns it off; not together with --parallel-threshold"
  }),
  early_stop: entry({
    value: { type: "switch" },
    optional: true,
    default: "true",
    description:
      "Finish once the answer has ended instead of denoising the remaining blocks, when a request gives no early_stop; --early-stop=false turns it off"
  }),
  kv_cache: entry({
    value: { type: "oneOf", values: ["none", "prefix", "dual"] },
    optional: true,
    default: "none",
    description:
      "Approximate KV cache when a request gives no kv_cache: prefix recomputes the block and what follows it, dual the block only, between whole-canvas refreshes at block starts; none is exact"
  })
}

type Table = typeof samplingSettings
export type SamplingField = keyof Table

/**
 * Settings that decide the same thing: a request that sets any of them decides alone (the others are
 * off), and neither a request nor the server may turn on more than one.
 */
export const exclusiveSettings = [
  {
    members: ["parallel_threshold", "parallel_factor"] as const,
    off: 0,
    because: "they are two rules for the same choice"
  }
] as const

// ---- names -------------------------------------------------------------------------------------------

type Camel<S extends string> = S extends `${infer H}_${infer T}` ? `${H}${Capitalize<Camel<T>>}` : S
const camel = (name: string) => name.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase())

type EngineName<K extends SamplingField> = Table[K] extends { readonly engine: infer E extends string } ? E : Camel<K>
type ConfigName<K extends SamplingField> = Camel<K>

const fields = Object.keys(samplingSettings) as Array<SamplingField>
const specOf = (field: SamplingField): SamplingSetting => samplingSettings[field] as SamplingSetting

/** The engine's name of a setting: genLength for max_tokens, topP for top_p. */
export const engineName = (field: SamplingField): string => specOf(field).engine ?? camel(field)

/**
 * The request field of a native setting's name (the C++ SamplingParams field, as the engine's errors name
 * it: "gen_length" → max_tokens, "top_p" → top_p); undefined for a name no request field stands for.
 */
export const requestFieldOfNative = (name: string): SamplingField | undefined => {
  const engine = camel(name)
  return fields.find((field) => (field === "max_tokens" ? "genLength" : engineName(field)) === engine)
}
/** The server setting's name (Config.Settings): maxTokens for max_tokens, topP for top_p. */
export const configName = (field: SamplingField): string => camel(field)

// ---- derived: request fields -------------------------------------------------------------------------

/** One message for every way the value can be wrong, so errors read "temperature must be ...". */
const described = <A, I>(schema: Schema.Schema<A, I>, message: string): Schema.Schema<A, I> =>
  schema.annotations({ message: () => ({ message, override: true }) })

const listed = (values: ReadonlyArray<string>) => {
  const quoted = values.map((v) => JSON.stringify(v))
  return quoted.length === 1 ? quoted[0]! : `${quoted.slice(0, -1).join(", ")} or ${quoted[quoted.length - 1]}`
}

/** The schema of a request value of the given type, failing with one message naming the field. */
export const requestValue = <V extends ValueType>(name: string, value: V): Schema.Schema<ValueOf<V>> => {
  switch (value.type) {
    case "int": {
      const max = value.max ?? Number.MAX_SAFE_INTEGER
      return described(
        Schema.Int.pipe(Schema.between(value.min, max)),
        value.max === undefined
          ? `${name} must be an integer >= ${value.min}`
          : `${name} must be an integer from ${value.min} to ${value.max}`
      ) as unknown as Schema.Schema<ValueOf<V>>
    }
    case "number":
      return (value.above === true
        ? described(
            Schema.Finite.pipe(Schema.greaterThan(value.min), Schema.lessThanOrEqualTo(value.max ?? Infinity)),
            `${name} must be a number greater than ${value.min} and at most ${value.max}`
          )
        : described(
            Schema.Finite.pipe(Schema.between(value.min, value.max ?? Infinity)),
            `${name} must be a number from ${value.min} to ${value.max}`
          )) as unknown as Schema.Schema<ValueOf<V>>
    case "oneOf":
      return described(Schema.Literal(...value.values), `${name} must be ${listed(value.values)}`) as unknown as Schema.Schema<ValueOf<V>>
    case "switch":
      return described(Schema.Boolean, `${name} must be true or false`) as unknown as Schema.Schema<ValueOf<V>>
  }
}

/** Optional; `null` means absent (SDKs send it for unset fields). */
const optional = <A>(schema: Schema.Schema<A>) => Schema.optionalWith(schema, { nullable: true, exact: true })

type RequestFields = {
  readonly [K in SamplingField]: Schema.optionalWith<Schema.Schema<ValueOf<Table[K]["value"]>>, { nullable: true; exact: true }>
}

/** The request fields of the sampling settings (completions and chat), in table order. */
export const requestFields: RequestFields = Object.fromEntries(
  fields.map((field) => [field, optional(requestValue(field, specOf(field).value))])
) as unknown as RequestFields

/** A request's sampling fields, as decoded. */
export type SamplingRequest = { readonly [K in SamplingField]?: ValueOf<Table[K]["value"]> }

// ---- derived: server settings ------------------------------------------------------------------------

// biome-ignore lint/suspicious/noExplicitAny: each setting's value type is derived from the table separately (ValueOf)
const flagSchema = (value: ValueType): Schema.Schema<any, string> => {
  switch (value.type) {
    case "int":
      return IntegerText(value.min, value.max)
    case "number":
      return NumberText(value.min, value.above ?? false, value.max)
    case "oneOf":
      return OneOfText(value.values)
    case "switch":
      return SwitchText
  }
}

type ConfigFields = {
  readonly [K in SamplingField as ConfigName<K>]: Schema.Schema<ValueOf<Table[K]["value"]>, string>
}

/** The `vdiff serve` settings of the server defaults (flag `--top-p`, variable VDIFF_TOP_P), in table order. */
export const configFields: ConfigFields = Object.fromEntries(
  fields.map((field) => {
    const spec = specOf(field)
    const value = spec.flag ?? spec.value
    return [
      configName(field),
      setting(flagSchema(value), {
        description: spec.description,
        default: spec.default,
        defaultText: spec.defaultText,
        kind: value.type === "switch" ? "switch" : "value",
        value: value.type === "oneOf" ? value.values.join("|") : value.type === "switch" ? "BOOL" : spec.placeholder
      })
    ]
  })
) as unknown as ConfigFields

/** The server settings' values of the sampling settings. */
export type SamplingConfig = { readonly [K in SamplingField as ConfigName<K>]: ValueOf<Table[K]["value"]> }

// ---- derived: the engine's settings ------------------------------------------------------------------

type Required_ = { [K in SamplingField]: Table[K]["optional"] extends true ? never : K }[SamplingField]
type Optional_ = Exclude<SamplingField, Required_>

/** The part of the engine's settings that the table describes. */
export type SamplingTableParams = { readonly [K in Required_ as EngineName<K>]: ValueOf<Table[K]["value"]> } & {
  readonly [K in Optional_ as EngineName<K>]?: ValueOf<Table[K]["value"]> | undefined
}

/** The engine's settings that are no request setting: the seed and the model's own tokens. */
export interface EngineOnlyParams {
  /** Seeds the sequence's own random stream: same seed, same answer. */
  readonly seed: number
  /** Reference option: EOS can never be sampled. */
  readonly logitsEosInf: boolean
  /** Reference option: EOS/EOT predictions get confidence 0, so they are committed last. */
  readonly confidenceEosEotInf: boolean
  /** End-of-turn token id, or -1 when the model has none. */
  readonly eotTokenId: number
  /** With a KV cache, also refresh every n-th step of a block (1: every step, = no cache); absent or 0: never. */
  readonly kvRefreshInterval?: number | undefined
  /**
   * Alternatives reported with each committed token: the topLogprobs likeliest tokens of the step that
   * committed it, with their log-probabilities (0 to 20); absent or 0: none.
   */
  readonly topLogprobs?: number | undefined
}

/** How one sequence is denoised, as the Engine service takes it. Meanings follow LLaDA's generate(). */
export type SamplingParams = SamplingTableParams & EngineOnlyParams

/**
 * The params object the native addon reads (native/src/addon/addon.cpp, params_of): the same names; the
 * seed may be a bigint, and the reference options may be left out.
 */
export type NativeSamplingParams = SamplingTableParams &
  Omit<EngineOnlyParams, "seed" | "logitsEosInf" | "confidenceEosEotInf" | "eotTokenId"> & {
    readonly seed: number | bigint
    readonly logitsEosInf?: boolean | undefined
    readonly confidenceEosEotInf?: boolean | undefined
    /** Absent, null or -1: none. */
    readonly eotTokenId?: number | null | undefined
  }

// ---- derived: defaults and resolution ----------------------------------------------------------------

/**
 * What the server gives a request that leaves a setting out, by engine name (the answer length as
 * maxTokens). Absent or null: the documented default.
 */
export type EngineDefaults = { readonly maxTokens: number } & {
  readonly [K in Exclude<SamplingField, "max_tokens"> as EngineName<K>]?: ValueOf<Table[K]["value"]> | null | undefined
}

/** The serving defaults of the server settings. */
export const defaultsFromConfig = (config: SamplingConfig): EngineDefaults => {
  const values = config as unknown as Record<string, unknown>
  return Object.fromEntries(
    fields.map((field) => [field === "max_tokens" ? "maxTokens" : engineName(field), values[configName(field)]])
  ) as unknown as EngineDefaults
}

const documentedDefault = new Map(
  fields.map((field) => {
    const spec = specOf(field)
    return [field, Schema.decodeSync(flagSchema(spec.flag ?? spec.value))(spec.default) as unknown]
  })
)

/** The exclusive rule a request breaks, with the field it names (the last one it set), or undefined. */
export const exclusiveViolation = (request: SamplingRequest): { message: string; param: string } | undefined => {
  for (const rule of exclusiveSettings) {
    const values = rule.members.map((field) => request[field])
    if (values.every((value) => value !== undefined && value !== rule.off)) {
      return {
        message: `${rule.members.join(" and ")} cannot both be set: ${rule.because}`,
        param: rule.members[rule.members.length - 1]!
      }
    }
  }
  return undefined
}

/**
 * The engine's values of every setting but the answer length, for an answer of `genLength` tokens: the
 * request's, else the server's default, else the documented one. A request that sets any member of an
 * exclusive group decides the whole group (the members it leaves out are off).
 */
export const resolve = (request: SamplingRequest, defaults: EngineDefaults, genLength: number): SamplingTableParams => {
  const fromDefaults = defaults as unknown as Record<string, unknown>
  const decided = new Map<SamplingField, unknown>()
  for (const rule of exclusiveSettings) {
    if (rule.members.some((field) => request[field] !== undefined)) {
      for (const field of rule.members) decided.set(field, request[field] ?? rule.off)
    }
  }
  const params: Record<string, unknown> = { genLength }
  for (const field of fields) {
    if (field === "max_tokens") continue
    const spec = specOf(field)
    const name = engineName(field)
    const value = decided.has(field) ? decided.get(field) : (request[field] ?? fromDefaults[name] ?? documentedDefault.get(field))
    params[name] = spec.toEngine === undefined ? value : (spec.toEngine as (v: unknown, g: number) => unknown)(value, genLength)
  }
  return params as unknown as SamplingTableParams
}
