/**
 * The table of every setting of `vdiff serve`, as ONE effect/Schema Struct: `Settings`. Each field is a
 * schema from the text a user types to the typed value, annotated with its meaning and default; the
 * sampling settings' fields come from their own table (src/config/sampling.ts). The mechanism that turns
 * the Struct into flags (`maxQueueSize` ↔ `--max-queue-size`), VDIFF_* variables, defaults, `--help` and
 * the README's Configuration table is src/config/Setting.ts.
 *
 * `settingsMarkdown()` renders the README's table (test/readme-settings.test.ts keeps README.md equal to it):
 *   node --import tsx -e 'import("./src/config/Config.ts").then((m) => console.log(m.settingsMarkdown()))'
 *
 * @since 0.1.0
 */
import { basename } from "node:path"
import { type Either, Schema } from "effect"
import { embeddedModelDir } from "./package.js"
import * as Sampling from "./sampling.js"
import {
  commandLine,
  type ConfigError,
  HttpUrlText,
  IntegerText,
  type LoadInput,
  ListText,
  NonEmptyText,
  NumberText,
  OneOfText,
  type SettingInfo,
  setting,
  SwitchText
} from "./Setting.js"

export { ConfigError, type LoadInput, type SettingInfo, type SettingKind } from "./Setting.js"

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

/** The CPU kernels' instruction sets (--cpu-isa); auto is the widest the CPU has. */
export const cpuIsas = ["auto", "portable", "avx2", "avx512", "avx512bf16", "amx"] as const
export type CpuIsa = (typeof cpuIsas)[number]

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
  device: setting(OneOfText(["auto", "cpu", "cuda"]), {
    description: "Where the forward pass runs: cuda (a GPU; start-up fails without one), cpu, or auto (a visible GPU, else the CPU)",
    default: "auto",
    value: "auto|cpu|cuda"
  }),
  gpuMemoryUtilization: setting(NumberText(0, true, 1), {
    description: "Share of the GPU's memory vdiff may use for weights, KV caches and activations (cuda only), in (0, 1]",
    default: "0.9",
    value: "F"
  }),
  quantize: setting(OneOfText(["none", "q8_0", "q4_0"]), {
    description:
      "Quantize the projection matrices at load (CPU; the head stays as stored): q8_0 (int8 blocks of 32) or q4_0 (4-bit); none computes from the weights as stored; a checkpoint from `vdiff quantize` is served as it is",
    default: "none",
    value: "none|q8_0|q4_0"
  }),
  threads: setting(IntegerText(0, 4096), {
    description: "Threads for the forward pass; 0 uses every core",
    default: "0",
    value: "N"
  }),
  cpuIsa: setting(OneOfText(cpuIsas), {
    description:
      "Instruction set of the CPU kernels: auto (the widest this CPU has), or portable, avx2, avx512, avx512bf16 (AVX-512 with the bf16 dot product) or amx (bf16 products on AMX tiles) to force one (tests, benchmarks); one the CPU lacks fails at start-up",
    default: "auto",
    value: "auto|portable|avx2|avx512|avx512bf16|amx"
  }),
  apiKey: setting(
    ListText(
      (item) => (/^[\x21-\x7e]+$/.test(item) ? undefined : "API keys must be printable ASCII without spaces"),
      () => "a key that is not (value hidden)",
      // An empty value (a variable that expanded to nothing) would otherwise leave the server open.
      "was given but names no key; leave it out to run without authentication"
    ),
    {
      description:
        "API key clients must send as `Authorization: Bearer KEY`; repeat or comma-separate for several; none: no authentication",
      default: [],
      defaultText: "none",
      kind: "list",
      value: "KEY"
    }
  ),
  allowedOrigins: setting(
    ListText((item) => (isOrigin(item) ? undefined : `origins must be "*" or like https://example.com:8080`)),
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
    description:
      "Requests a client (API key, else address) may make per window, and failed API key attempts an address may make; 0 turns rate limiting off",
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
    description:
      "Seconds to let in-flight requests finish after SIGTERM/SIGINT before they are ended; a second signal ends the process at once, saying so on stderr (status 143 or 130)",
    default: "30",
    value: "SECONDS"
  }),
  maxBodySize: setting(IntegerText(1), {
    description: "Largest request body accepted, in bytes; larger gets 413",
    default: "1048576",
    value: "BYTES"
  }),
  // The server defaults of the sampling settings (--max-tokens ... --kv-cache), from their one table.
  ...Sampling.configFields,
  generationConfig: setting(OneOfText(["auto", "vdiff"]), {
    description:
      "Where the sampling defaults come from: auto lays the model's generation_config.json (temperature, top_p, block_length, ... as vLLM reads it) under the flags above, so a setting left at its documented default takes the model's; vdiff uses the flags alone",
    default: "auto",
    value: "auto|vdiff"
  }),
  kvCacheDtype: setting(OneOfText(["f32", "bf16"]), {
    description: "Element type of the KV caches: f32 (a read of an unchanged canvas is exact) or bf16 (half the memory)",
    default: "f32",
    value: "f32|bf16"
  }),
  kvCacheBudget: setting(IntegerText(0), {
    description:
      "Bytes all live KV caches may hold together; a request whose caches do not fit waits for running ones to finish; one cache larger than the budget is a 400, a request whose caches never fit together a 503; 0: no limit",
    default: "0",
    value: "BYTES"
  }),
  prefixCache: setting(IntegerText(0), {
    description:
      "Block-diffusion models (LLaDA2.x, SDAR): bytes of the keys and values of finished prompt blocks kept for later requests whose prompts start with the same blocks, which then skip computing them (exact: the same answers); entries give way to running requests' caches; 0: off",
    default: "536870912",
    value: "BYTES"
  }),
  prefillChunk: setting(IntegerText(0), {
    description:
      "Block-diffusion models: the most prompt tokens a request prefills in one step (rounded down to whole blocks, at least one); a longer prompt's prefill takes several steps, so it does not hold up the steps of the requests running beside it (the same answers); 0: the whole prompt in one step",
    default: "512",
    value: "TOKENS"
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

const serve = commandLine(Settings, {
  command: "vdiff serve",
  environment: true,
  summary: [
    "Serves a masked-diffusion language model behind an OpenAI-compatible HTTP API.",
    "Every flag can also be set by its environment variable; a flag wins over the environment."
  ],
  exclusive: Sampling.exclusiveSettings.map((rule) => ({
    members: [Sampling.configName(rule.members[0]), Sampling.configName(rule.members[1])] as [SettingName, SettingName],
    off: rule.off,
    because: rule.because
  }))
})

/** Every setting's flag, environment variable, default and meaning, in table order. */
export const settings: ReadonlyArray<SettingInfo<SettingName>> = serve.settings

/**
 * Reads flags: `--name value`, `--name=value`; a switch alone (`--trust-proxy`) means true; list flags
 * may repeat. A non-list flag given twice keeps the last value.
 */
export const parseFlags = serve.parseFlags

/** Flags, then environment variables, then defaults, decoded through `Settings`. */
export const load = (input: LoadInput): Either.Either<Settings, ConfigError> => serve.load(input)

/** The id clients use for the model: --served-model-name, else the model directory's name. */
export const servedModelName = (config: Settings): string => config.servedModelName ?? basename(config.model)

/** The Markdown table of every setting (flag, environment variable, default, meaning) for the README. */
export const settingsMarkdown = (): string => serve.markdown()

/** `vdiff serve --help`. */
export const helpText = (): string => serve.help()
