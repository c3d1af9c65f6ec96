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
 * Families: a setting applies to the decodings `appliesTo` lists (all when absent: full canvas, block,
 * Dream), and `readings` says how a decoding other than full canvas reads it where that differs; a request
 * that gives it for a model of another decoding gets a 400 naming it (`familyViolation`), and the engine gets
 * its neutral value or none (`resolve`). A new family's decoding is one more `Decoding`, its settings an
 * `appliesTo` entry or a reading each.
 *
 * @since 0.1.0
 */
import { Either, ParseResult, Schema } from "effect"
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
  | {
      readonly type: "number"
      readonly min: number
      readonly max?: number
      /** Strictly above min (eps > 0). */
      readonly above?: boolean
      /** Strictly below max (eps < 1). */
      readonly below?: boolean
    }
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
  /**
   * The decodings whose models the setting applies to (ModelFamily.decoding); absent: every decoding. A
   * request that sets it for a model of another decoding gets a 400 naming it, unless it gives the
   * `neutral` value.
   */
  readonly appliesTo?: ReadonlyArray<Decoding> | undefined
  /** Only models with token editing (LLaDA2.1's rule) take it, among those of its decodings. */
  readonly requires?: "editing" | undefined
  /**
   * Where the setting does not apply: the value that means "off" there. A request may give it (it changes
   * nothing), and the engine gets it when the setting is required. Absent: every value is refused there and
   * the engine gets none (or `inert`'s).
   */
  readonly neutral?: ValueOf<V> | undefined
  /**
   * Where a required setting does not apply and has no neutral value: the value the engine gets, which it
   * does not read there (block_length under Dream decoding: the whole answer, one block).
   */
  readonly inert?: ((genLength: number) => ValueOf<V>) | undefined
  /**
   * How the decodings other than full canvas read the setting, where that differs from full-canvas decoding
   * (block: LLaDA2.x, SDAR; dream: Dream).
   */
  readonly readings?: { readonly [D in Decoding]?: Reading<ValueOf<V>> } | undefined
}

/** A setting as a decoding other than full canvas reads it. */
export interface Reading<T> {
  /** The README's words for its meaning under that decoding. */
  readonly meaning: string
  /** The README's words for its default there. */
  readonly defaultText: string
  /**
   * The family's default: what a request that leaves the setting out gets when the server's default is
   * the documented (full-canvas) one. Absent: the documented default.
   */
  readonly default?: ((family: ModelFamily) => T) | undefined
  /** Whether a server default other than the documented one applies to these models (default true). */
  readonly serverDefault?: boolean | undefined
  /** Why the value does not fit the model (a 400 naming the setting); undefined: it fits. */
  readonly check?: ((value: T, family: ModelFamily) => string | undefined) | undefined
  /** The engine's value under that decoding (replaces the setting's own toEngine). */
  readonly toEngine?: ((value: T, genLength: number, family: ModelFamily) => T) | undefined
}

// ---- model families ----------------------------------------------------------------------------------

/**
 * How a model writes its answer: "full_canvas" (LLaDA: bidirectional attention over prompt and answer;
 * blocks only order the commits), "block" (LLaDA2.x, SDAR: block-causal attention, blocks of the trained
 * length aligned at position 0, finished blocks cached exactly) or "dream" (Dream: bidirectional over the
 * whole canvas with shifted predictions, no blocks; Dream's sampler: the eps time schedule and its
 * unmasking algorithms).
 */
export type Decoding = "full_canvas" | "block" | "dream"

/** Every decoding, in the order the docs list them. */
export const decodings: ReadonlyArray<Decoding> = ["full_canvas", "block", "dream"]

/** How the docs and the 400s name a decoding, and the models that decode so. */
export const decodingDocs: Readonly<Record<Decoding, { readonly words: string; readonly column: string; readonly models: string }>> = {
  full_canvas: { words: "full-canvas decoding", column: "full canvas", models: "LLaDA" },
  block: { words: "block decoding", column: "block", models: "LLaDA2.x, SDAR" },
  dream: { words: "Dream decoding", column: "Dream", models: "Dream" }
}

/** What the settings depend on about the served model (the engine's model info says it). */
export interface ModelFamily {
  /** config.json's model_type: llada, llada2_moe, sdar, sdar_moe. */
  readonly name: string
  readonly decoding: Decoding
  /** Block decoding: the block length the model was trained with; full canvas: 0. */
  readonly blockLength: number
  /** Whether the model has LLaDA2.1's token editing (editing_threshold, max_post_steps). */
  readonly editing: boolean
}

/** LLaDA: the family of every model served before block decoding, and of models that say nothing else. */
export const lladaFamily: ModelFamily = { name: "llada", decoding: "full_canvas", blockLength: 0, editing: false }

/** Whether the setting applies to models of the decoding (for some of them, with `requires`). */
const appliesToDecoding = (spec: SamplingSetting, decoding: Decoding): boolean =>
  spec.appliesTo === undefined || spec.appliesTo.includes(decoding)

/** Whether the setting applies to the model. */
export const appliesTo = (field: SamplingField, family: ModelFamily): boolean => {
  const spec = specOf(field)
  return appliesToDecoding(spec, family.decoding) && (spec.requires !== "editing" || family.editing)
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
    toEngine: (steps, genLength) => (steps === 0 ? genLength : steps),
    readings: {
      block: {
        meaning: "denoising steps per block (at most block_length: one token a step)",
        defaultText: "block_length (one token a step)",
        toEngine: (steps, _genLength, family) => (steps === 0 ? family.blockLength : Math.min(steps, family.blockLength))
      },
      dream: {
        meaning:
          "Dream's steps over the whole answer: step i of N commits the share 1 − t(i+1)/t(i) of the masks left (the last step all); more steps than max_tokens add steps that commit nothing",
        defaultText: "max_tokens (one token a step, as Dream runs steps = max_new_tokens)"
      }
    }
  }),
  block_length: entry({
    value: { type: "int", min: 1 },
    optional: false,
    default: "32",
    placeholder: "N",
    description: "Semi-autoregressive block length when a request gives no block_length",
    toEngine: (length, genLength) => Math.min(length, genLength),
    // Dream denoises the whole answer as one: the engine does not read the block length there.
    appliesTo: ["full_canvas", "block"],
    inert: (genLength) => genLength,
    readings: {
      block: {
        meaning: "the block the model was trained with; no other is accepted",
        defaultText: "the model's (LLaDA2 32, SDAR 4)",
        default: (family) => family.blockLength,
        serverDefault: false,
        check: (length, family) =>
          length === family.blockLength
            ? undefined
            : `block_length must be ${family.blockLength}, the block length this model (${family.name}) was trained with, got ${length}`,
        toEngine: (_length, _genLength, family) => family.blockLength
      }
    }
  }),
  remasking: entry({
    value: { type: "oneOf", values: ["low_confidence", "random"] },
    optional: false,
    default: "low_confidence",
    description: "Which masked positions a step commits when a request gives no remasking",
    appliesTo: ["full_canvas"],
    neutral: "low_confidence"
  }),
  cfg_scale: entry({
    value: { type: "number", min: 0, max: 1000 },
    flag: { type: "number", min: 0, max: 1000 },
    optional: false,
    default: "0",
    placeholder: "S",
    description: "Classifier-free guidance scale when a request gives no cfg_scale; 0 turns it off",
    appliesTo: ["full_canvas"],
    neutral: 0
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
    toEngine: (k) => Math.max(0, k),
    readings: {
      dream: {
        meaning:
          "Dream's rule: the tokens outside the K likeliest are dropped before the softmax, so at temperature 0 too they change the confidences and with them the order of the commits; 0: off",
        defaultText: "`0`"
      }
    }
  }),
  top_p: entry({
    value: { type: "number", min: 0, above: true, max: 1 },
    optional: true,
    default: "1",
    placeholder: "P",
    description:
      "Nucleus sampling when a request gives no top_p: at temperature > 0 draw from the likeliest tokens holding P of the probability; 1 turns it off",
    readings: {
      dream: {
        meaning:
          "Dream's rule: the likeliest tokens holding P of the probability are kept before the softmax, so at temperature 0 too they change the confidences and with them the order of the commits; 1: off",
        defaultText: "`1`"
      }
    }
  }),
  min_p: entry({
    value: { type: "number", min: 0, max: 1 },
    optional: true,
    default: "0",
    placeholder: "P",
    description:
      "Min-p sampling when a request gives no min_p: at temperature > 0 draw only tokens at least P times as likely as the likeliest; 0 turns it off",
    appliesTo: ["full_canvas", "block"],
    neutral: 0
  }),
  presence_penalty: entry({
    value: { type: "number", min: -2, max: 2 },
    optional: true,
    default: "0",
    placeholder: "P",
    description:
      "Presence penalty when a request gives none: subtracted from the logit of every token the answer already holds (committed anywhere in it; EOS and end-of-turn not counted), at every temperature; 0 turns it off"
  }),
  frequency_penalty: entry({
    value: { type: "number", min: -2, max: 2 },
    optional: true,
    default: "0",
    placeholder: "P",
    description:
      "Frequency penalty when a request gives none: subtracted from a token's logit once per time the answer already holds it (EOS and end-of-turn not counted), at every temperature; 0 turns it off"
  }),
  repetition_penalty: entry({
    value: { type: "number", min: 0, above: true, max: 2 },
    optional: true,
    default: "1",
    placeholder: "R",
    description:
      "Repetition penalty when a request gives none (Hugging Face's and vLLM's): the logit of every token in the prompt or the answer is divided by R when positive, multiplied when negative, at every temperature; 1 turns it off"
  }),
  parallel_threshold: entry({
    value: { type: "number", min: 0, max: 1 },
    optional: true,
    default: "0",
    placeholder: "T",
    description:
      "Parallel decoding when a request sets neither parallel rule: a step also commits every masked position of the block at least T likely; 0 turns it off",
    appliesTo: ["full_canvas", "block"],
    neutral: 0,
    readings: {
      block: {
        meaning:
          "commit every masked position of the open block more than T likely (strictly) when they are at least the step's quota, else the quota's likeliest (LLaDA2.0's threshold, SDAR's low_confidence_dynamic); 0: the quota only",
        defaultText: "0.95",
        default: () => 0.95
      }
    }
  }),
  parallel_factor: entry({
    value: { type: "number", min: 0, max: 1000 },
    flag: { type: "number", min: 0 },
    optional: true,
    default: "0",
    placeholder: "F",
    description:
      "Parallel decoding by rank when a request sets neither parallel rule: threshold 1 − F/(r+1); 0 turns it off; not together with --parallel-threshold",
    appliesTo: ["full_canvas"],
    neutral: 0
  }),
  early_stop: entry({
    value: { type: "switch" },
    optional: true,
    default: "true",
    description:
      "Finish once the answer has ended instead of denoising the remaining blocks, when a request gives no early_stop; --early-stop=false turns it off",
    // Block decoding always stops after the block that holds the end of the answer, as its references do;
    // Dream denoises the whole answer for all its steps, as its reference does.
    appliesTo: ["full_canvas"],
    neutral: true
  }),
  kv_cache: entry({
    value: { type: "oneOf", values: ["none", "prefix", "dual"] },
    optional: true,
    default: "none",
    description:
      "Approximate KV cache when a request gives no kv_cache: prefix recomputes the block and what follows it, dual the block only, between whole-canvas refreshes at block starts; none is exact",
    // Dream has no blocks to cache between: every step evaluates the whole canvas.
    appliesTo: ["full_canvas", "block"],
    neutral: "none",
    readings: {
      block: {
        meaning:
          "prefix: the prompt's whole blocks are prefilled once and every finished block is cached from its final tokens (exact); none: every step recomputes the window up to the open block's end (the references' form); dual does not apply",
        defaultText: "prefix",
        default: () => "prefix",
        check: (mode) =>
          mode === "dual"
            ? 'kv_cache "dual" does not apply to block decoding: a finished block\'s cache is exact already ("prefix"), and later blocks are never attended'
            : undefined
      }
    }
  }),
  alg: entry({
    value: { type: "oneOf", values: ["origin", "maskgit_plus", "topk_margin", "entropy"] },
    optional: true,
    default: "entropy",
    description:
      "Dream: which masked positions a step commits when a request gives no alg: entropy (the lowest entropy), maskgit_plus (the likeliest token), topk_margin (the widest margin between the two likeliest) or origin (each at random with the step's share)",
    appliesTo: ["dream"]
  }),
  alg_temp: entry({
    value: { type: "number", min: 0 },
    optional: true,
    default: "0",
    placeholder: "T",
    description:
      "Dream: when a request gives no alg_temp, above 0 a step draws the positions it commits from softmax(confidence / T) instead of taking the most confident; 0 takes them",
    appliesTo: ["dream"]
  }),
  eps: entry({
    value: { type: "number", min: 0, above: true, max: 1, below: true },
    optional: true,
    default: "0.001",
    placeholder: "E",
    description:
      "Dream: the end of the time schedule linspace(1, E, steps + 1) when a request gives no eps; step i commits the share 1 − t(i+1)/t(i) of the masks left",
    appliesTo: ["dream"]
  })
}

/**
 * Settings a request may give but the server has no flag for: LLaDA2.1's token editing, chosen per
 * request (its modes are pairs of parallel_threshold and editing_threshold). Off unless a request sets it.
 */
export const requestOnlySettings = {
  editing_threshold: entry({
    value: { type: "number", min: 0, max: 1 },
    optional: true,
    default: "",
    defaultText: "off",
    placeholder: "T",
    description:
      "LLaDA2.1 token editing: after every forward, a token already committed in the open block (not the prompt's) is rewritten where the model predicts another token more than T likely; a block without masks takes up to max_post_steps more forwards while edits happen; masks are committed above parallel_threshold (at least one a forward), so diffusion_steps does not apply. Modes: quality parallel_threshold 0.7 + editing_threshold 0.5, speed 0.5 + 0.0",
    appliesTo: ["block"],
    requires: "editing"
  }),
  max_post_steps: entry({
    value: { type: "int", min: 0, max: 1000 },
    optional: true,
    default: "16",
    placeholder: "N",
    description: "LLaDA2.1 token editing: forwards a block without masks may still take to edit its tokens",
    appliesTo: ["block"],
    requires: "editing"
  })
}

const allSettings = { ...samplingSettings, ...requestOnlySettings }
type Table = typeof allSettings
/** Every request setting: the server's (with a flag) and the request-only ones. */
export type SamplingField = keyof Table
/** The settings that are also server flags. */
export type ServerField = keyof typeof samplingSettings

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

const fields = Object.keys(allSettings) as Array<SamplingField>
const serverFields = Object.keys(samplingSettings) as Array<ServerField>
const specOf = (field: SamplingField): SamplingSetting => allSettings[field] as SamplingSetting

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
    case "number": {
      const max = value.max ?? Infinity
      const above = value.above === true
      const below = value.below === true
      const message =
        value.max === undefined
          ? `${name} must be a number ${above ? ">" : ">="} ${value.min}`
          : above
            ? `${name} must be a number greater than ${value.min} and ${below ? "less than" : "at most"} ${value.max}`
            : below
              ? `${name} must be a number from ${value.min} to less than ${value.max}`
              : `${name} must be a number from ${value.min} to ${value.max}`
      const inRange = (x: number) => (above ? x > value.min : x >= value.min) && (below ? x < max : x <= max)
      return described(Schema.Finite.pipe(Schema.filter(inRange)), message) as unknown as Schema.Schema<ValueOf<V>>
    }
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
      return NumberText(value.min, value.above ?? false, value.max, value.below ?? false)
    case "oneOf":
      return OneOfText(value.values)
    case "switch":
      return SwitchText
  }
}

type ConfigFields = {
  readonly [K in ServerField as ConfigName<K>]: Schema.Schema<ValueOf<Table[K]["value"]>, string>
}

/** The `vdiff serve` settings of the server defaults (flag `--top-p`, variable VDIFF_TOP_P), in table order. */
export const configFields: ConfigFields = Object.fromEntries(
  serverFields.map((field) => {
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
export type SamplingConfig = { readonly [K in ServerField as ConfigName<K>]: ValueOf<Table[K]["value"]> }

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
  /**
   * vLLM's min_tokens: answer positions below it (0 to genLength) never take an end token (EOS, eotTokenId,
   * the model's stop tokens) nor one of stopTokenIds; absent or 0: none.
   */
  readonly minTokens?: number | undefined
  /** vLLM's ignore_eos: no answer position takes an end token; absent: false. */
  readonly ignoreEos?: boolean | undefined
  /** The request's stop tokens (the answer is cut at them by the caller), barred below minTokens. */
  readonly stopTokenIds?: ReadonlyArray<number> | undefined
  /** Further tokens the caller ends answers at (a chat template's turn end), barred with the end tokens. */
  readonly endTokenIds?: ReadonlyArray<number> | undefined
  /**
   * OpenAI's logit_bias as [token, bias] pairs (bias in [-100, 100]): added to the token's logit, in float,
   * after cfg and before anything reads the row; absent: none.
   */
  readonly logitBias?: ReadonlyArray<readonly [number, number]> | undefined
  /** vLLM's allowed_token_ids: when given (not empty), every other token's logit is -inf before the bias. */
  readonly allowedTokenIds?: ReadonlyArray<number> | undefined
  /**
   * Tokens allowed at single answer positions (a JSON template's number slots): positionAllowed[i] indexes
   * allowedSets for answer position i, -1 for none; at such a position every other token's logit is -inf.
   */
  readonly positionAllowed?: ReadonlyArray<number> | undefined
  readonly allowedSets?: ReadonlyArray<ReadonlyArray<number>> | undefined
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
 * maxTokens). Absent or null: the documented default (or the model family's, see `resolve`).
 */
export type EngineDefaults = { readonly maxTokens: number } & {
  readonly [K in Exclude<ServerField, "max_tokens"> as EngineName<K>]?: ValueOf<Table[K]["value"]> | null | undefined
}

/** The serving defaults of the server settings. */
export const defaultsFromConfig = (config: SamplingConfig): EngineDefaults => {
  const values = config as unknown as Record<string, unknown>
  return Object.fromEntries(
    serverFields.map((field) => [field === "max_tokens" ? "maxTokens" : engineName(field), values[configName(field)]])
  ) as unknown as EngineDefaults
}

/** Each setting's documented default, as the engine takes it (absent: none, the setting is off). */
const documentedDefault = new Map(
  fields.flatMap((field) => {
    const spec = specOf(field)
    return spec.default === "" ? [] : [[field, Schema.decodeSync(flagSchema(spec.flag ?? spec.value))(spec.default) as unknown] as const]
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

/** "full-canvas decoding (LLaDA) and block decoding (LLaDA2.x, SDAR)": the decodings a setting applies to. */
const decodingsText = (list: ReadonlyArray<Decoding>) => {
  const named = list.map((decoding) => `${decodingDocs[decoding].words} (${decodingDocs[decoding].models})`)
  return named.length === 1 ? named[0]! : `${named.slice(0, -1).join(", ")} and ${named[named.length - 1]}`
}

/**
 * The first setting the request gives that the served model cannot honour, with the field it names: one
 * that does not apply to the model's family (other than its neutral value: `cfg_scale: 0` on a block
 * model changes nothing), or a value the family does not take (a block_length the model was not trained
 * with, kv_cache "dual" under block decoding). Undefined: every setting fits.
 */
export const familyViolation = (request: SamplingRequest, family: ModelFamily): { message: string; param: string } | undefined => {
  for (const field of fields) {
    const value = request[field]
    if (value === undefined) continue
    const spec = specOf(field)
    if (!appliesTo(field, family)) {
      if (spec.neutral !== undefined && value === spec.neutral) continue
      const where =
        spec.requires === "editing"
          ? "it needs a model with token editing (LLaDA2.1's llada2_moe)"
          : `it is a setting of ${decodingsText(spec.appliesTo ?? decodings)}`
      return {
        message: `${field} does not apply to this model (${family.name}, ${decodingDocs[family.decoding].words}): ${where}`,
        param: field
      }
    }
    const problem = spec.readings?.[family.decoding]?.check?.(value as never, family)
    if (problem !== undefined) return { message: problem, param: field }
  }
  // LLaDA2.1's editing commits by its thresholds, at least one token a forward, with no step schedule.
  if (request.editing_threshold !== undefined && request.diffusion_steps !== undefined) {
    return {
      message:
        "diffusion_steps does not apply with editing_threshold: token editing commits every masked position above parallel_threshold (at least one a forward) until the block is done, with no step schedule",
      param: "diffusion_steps"
    }
  }
  return undefined
}

/**
 * The engine's values of every setting but the answer length, for an answer of `genLength` tokens: the
 * request's, else the server's default, else the documented one. A request that sets any member of an
 * exclusive group decides the whole group (the members it leaves out are off).
 *
 * For a model of another family than LLaDA (`family`): a setting that does not apply gets its neutral
 * (or inert) value when the engine requires it, else none; where the family's decoding has its own reading
 * of a setting, it takes the family default where the request leaves the setting out and the server's
 * default is the documented one or one the family does not take (for block_length under block decoding:
 * always), and reads the value through that reading's rule. The request is expected to have passed
 * `familyViolation`.
 */
export const resolve = (
  request: SamplingRequest,
  defaults: EngineDefaults,
  genLength: number,
  family: ModelFamily = lladaFamily
): SamplingTableParams => {
  const fromDefaults = defaults as unknown as Record<string, unknown>
  const decided = new Map<SamplingField, unknown>()
  for (const rule of exclusiveSettings) {
    // A group decides together only where all of it applies (block models have one parallel rule).
    if (!rule.members.every((field) => appliesTo(field, family))) continue
    if (rule.members.some((field) => request[field] !== undefined)) {
      for (const field of rule.members) decided.set(field, request[field] ?? rule.off)
    }
  }
  const params: Record<string, unknown> = { genLength }
  for (const field of fields) {
    if (field === "max_tokens") continue
    const spec = specOf(field)
    const name = engineName(field)
    if (!appliesTo(field, family)) {
      if (!spec.optional) params[name] = spec.neutral ?? spec.inert?.(genLength)
      continue
    }
    const documented = documentedDefault.get(field)
    const rule = spec.readings?.[family.decoding]
    const server = fromDefaults[name] ?? undefined
    const fallback =
      rule === undefined
        ? (server ?? documented)
        : rule.serverDefault !== false &&
            server !== undefined &&
            server !== documented &&
            rule.check?.(server as never, family) === undefined
          ? server
          : (rule.default?.(family) ?? documented)
    const value = decided.has(field) ? decided.get(field) : (request[field] ?? fallback)
    if (value === undefined) continue
    const convert = rule?.toEngine
    params[name] =
      convert !== undefined
        ? (convert as (v: unknown, g: number, f: ModelFamily) => unknown)(value, genLength, family)
        : spec.toEngine === undefined
          ? value
          : (spec.toEngine as (v: unknown, g: number) => unknown)(value, genLength)
  }
  return params as unknown as SamplingTableParams
}

// ---- derived: the model's own defaults -----------------------------------------------------------------

/** The settings a model may recommend, by request field: the server's (each has a flag). */
export type ModelDefaults = { readonly [K in ServerField]?: ValueOf<Table[K]["value"]> }

/** generation_config.json keys, as Hugging Face names them, that stand for a request field of another name. */
const generationConfigAliases: Readonly<Record<string, ServerField>> = {
  max_new_tokens: "max_tokens",
  steps: "diffusion_steps"
}

/**
 * The sampling defaults a model recommends in its directory's generation_config.json (Hugging Face's file,
 * which vLLM's `--generation-config auto` reads the same way): the keys that are server settings of this
 * table, by their request names (temperature, top_p, block_length, ...) or Hugging Face's (max_new_tokens,
 * and Dream's steps for diffusion_steps, taken only with max_new_tokens; Dream's alg "origin", its library's
 * default, is passed over), each checked as a request's value is. Other keys (token ids,
 * do_sample, transformers_version) are not sampling defaults here and are passed over, as are settings
 * that do not apply to the model's family. A value out of range fails with the request's message.
 */
export const modelDefaults = (json: unknown, family: ModelFamily = lladaFamily): Either.Either<ModelDefaults, string> => {
  if (typeof json !== "object" || json === null || Array.isArray(json)) return Either.left("it must hold a JSON object")
  const given: Record<string, unknown> = {}
  for (const [key, value] of Object.entries(json)) {
    const field = generationConfigAliases[key] ?? key
    if ((serverFields as ReadonlyArray<string>).includes(field) && value !== null && appliesTo(field as ServerField, family)) {
      given[field] = value
    }
  }
  // Dream's library writes its own call defaults into every checkpoint's file (steps 512, alg "origin"),
  // which are not recommendations: `steps` counts the steps of one answer length, so it is taken only with
  // the max_new_tokens it goes with (else the server's default, a step per answer token, scales with each
  // answer); "origin" reveals positions at random even at temperature 0, where the server's default
  // (entropy) is deterministic.
  const record = json as Record<string, unknown>
  if (record["steps"] != null && record["diffusion_steps"] == null && record["max_new_tokens"] == null) delete given["diffusion_steps"]
  if (given["alg"] === "origin") delete given["alg"]
  const decoded: Record<string, unknown> = {}
  for (const [field, value] of Object.entries(given)) {
    const result = Schema.decodeUnknownEither(requestValue(field, specOf(field as ServerField).value))(value)
    if (Either.isLeft(result)) return Either.left(ParseResult.TreeFormatter.formatErrorSync(result.left))
    decoded[field] = result.right
  }
  for (const rule of exclusiveSettings) {
    const set = rule.members.filter((field) => decoded[field] !== undefined && decoded[field] !== rule.off)
    if (set.length > 1) return Either.left(`${set.join(" and ")} cannot both be set: ${rule.because}`)
  }
  return Either.right(decoded as ModelDefaults)
}

/**
 * The server's defaults with the model's beneath them: a setting the server leaves at its documented
 * default takes the model's recommendation; one set by a flag or variable to anything else keeps it. A
 * member of an exclusive group (parallel_threshold, parallel_factor) that the server turned on keeps the
 * whole group. Returns the defaults and the settings the model's values decided.
 */
export const withModelDefaults = (
  defaults: EngineDefaults,
  model: ModelDefaults
): { readonly defaults: EngineDefaults; readonly applied: ModelDefaults } => {
  const out: Record<string, unknown> = { ...defaults }
  const applied: Record<string, unknown> = {}
  const nameOf = (field: ServerField) => (field === "max_tokens" ? "maxTokens" : engineName(field))
  const atDocumented = (field: ServerField) => {
    const server = out[nameOf(field)] ?? undefined
    return server === undefined || server === documentedDefault.get(field)
  }
  const serverTurnedOn = new Set<ServerField>()
  for (const rule of exclusiveSettings) {
    if (rule.members.some((field) => !atDocumented(field) && out[nameOf(field)] !== rule.off)) {
      for (const field of rule.members) serverTurnedOn.add(field)
    }
  }
  for (const field of serverFields) {
    const value = model[field]
    if (value === undefined || serverTurnedOn.has(field) || !atDocumented(field)) continue
    out[nameOf(field)] = value
    applied[field] = value
  }
  return { defaults: out as unknown as EngineDefaults, applied: applied as ModelDefaults }
}

// ---- derived: the README's table of the families' settings -------------------------------------------

/** The families the engine knows, for the docs: config.json's model_type, and what it decodes with. */
export const knownFamilies: ReadonlyArray<ModelFamily> = [
  lladaFamily,
  { name: "llada2_moe", decoding: "block", blockLength: 32, editing: true },
  { name: "sdar", decoding: "block", blockLength: 4, editing: false },
  { name: "sdar_moe", decoding: "block", blockLength: 4, editing: false },
  { name: "dream", decoding: "dream", blockLength: 0, editing: false }
]

/**
 * The Markdown table of which request settings apply to which decoding, with each one's default there
 * (README.md's "Model families"; test/families-settings.test.ts keeps the README equal to it):
 *   node --import tsx -e 'import("./src/config/sampling.ts").then((m) => console.log(m.familiesMarkdown()))'
 */
export const familiesMarkdown = (): string => {
  const cell = (text: string) => text.replace(/\|/g, "\\|")
  const code = (value: unknown) => `\`${typeof value === "string" ? value : JSON.stringify(value)}\``
  const documented = (field: SamplingField) => {
    const spec = specOf(field)
    return spec.defaultText ?? code(spec.default)
  }
  const refused = (spec: SamplingSetting) =>
    spec.neutral === undefined ? "400 (does not apply)" : `400 unless ${code(spec.neutral)} (does not apply)`
  const familiesOf = (decoding: Decoding) => knownFamilies.filter((family) => family.decoding === decoding)
  const text = (field: SamplingField, decoding: Decoding): string => {
    const spec = specOf(field)
    const flag = (serverFields as ReadonlyArray<string>).includes(field) ? `, or \`--${field.replace(/_/g, "-")}\`` : ""
    const takers = familiesOf(decoding).filter((family) => appliesTo(field, family))
    if (takers.length === 0) return refused(spec)
    if (spec.requires !== undefined) {
      return `${takers.map((family) => family.name).join(", ")} only (elsewhere 400); default ${documented(field)}`
    }
    const reading = spec.readings?.[decoding]
    if (reading !== undefined) {
      return `${reading.meaning}; default ${reading.defaultText}${reading.serverDefault === false ? "" : flag}`
    }
    const asFull = decoding !== "full_canvas" && appliesToDecoding(spec, "full_canvas") ? "as full canvas; " : ""
    return `${asFull}default ${documented(field)}${flag}`
  }
  const header = decodings.map(
    (decoding) =>
      `${decodingDocs[decoding].column}: ${familiesOf(decoding)
        .map((family) => `\`${family.name}\``)
        .join(", ")}`
  )
  const rows = fields.map((field) => `| \`${field}\` | ${decodings.map((decoding) => cell(text(field, decoding))).join(" | ")} |`)
  return [`| request field | ${header.join(" | ")} |`, `|---|${decodings.map(() => "---|").join("")}`, ...rows].join("\n")
}
