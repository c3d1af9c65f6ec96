/** --otlp-endpoint: flag, VDIFF_OTLP_ENDPOINT, else the standard OTEL_EXPORTER_OTLP_ENDPOINT. */
import { Either } from "effect"
import { describe, expect, it } from "vitest"
import * as Config from "../src/config/Config.js"
import { tracesUrl } from "../src/telemetry/Telemetry.js"

const load = (argv: ReadonlyArray<string>, env: Record<string, string> = {}) => Config.load({ argv, env })

const endpoint = (argv: ReadonlyArray<string>, env: Record<string, string> = {}) => {
  const result = load(argv, env)
  if (Either.isLeft(result)) throw new Error(result.left.message)
  return result.right.otlpEndpoint
}

describe("--otlp-endpoint", () => {
  it("is unset by default: no tracing", () => {
    expect(endpoint([])).toBeUndefined()
  })

  it("takes the flag over VDIFF_OTLP_ENDPOINT over OTEL_EXPORTER_OTLP_ENDPOINT", () => {
    const otel = { OTEL_EXPORTER_OTLP_ENDPOINT: "http://otel:4318" }
    const vdiff = { ...otel, VDIFF_OTLP_ENDPOINT: "http://vdiff:4318" }
    expect(endpoint([], otel)).toBe("http://otel:4318")
    expect(endpoint([], vdiff)).toBe("http://vdiff:4318")
    expect(endpoint(["--otlp-endpoint", "https://flag:4318/"], vdiff)).toBe("https://flag:4318")
    // An empty variable counts as unset.
    expect(endpoint([], { VDIFF_OTLP_ENDPOINT: "", OTEL_EXPORTER_OTLP_ENDPOINT: "http://otel:4318" })).toBe("http://otel:4318")
  })

  it("refuses what is not an http(s) URL, naming where it came from", () => {
    const error = (argv: ReadonlyArray<string>, env: Record<string, string> = {}) => {
      const result = load(argv, env)
      if (Either.isRight(result)) throw new Error("expected a ConfigError")
      return result.left.message
    }
    expect(error(["--otlp-endpoint", "collector:4318"])).toBe(`--otlp-endpoint: must be an http:// or https:// URL, got "collector:4318"`)
    expect(error([], { OTEL_EXPORTER_OTLP_ENDPOINT: "grpc://x" })).toBe(
      `OTEL_EXPORTER_OTLP_ENDPOINT (--otlp-endpoint): must be an http:// or https:// URL, got "grpc://x"`
    )
  })

  it("documents both variables", () => {
    expect(Config.settingsMarkdown()).toContain(
      "| `--otlp-endpoint URL` | `VDIFF_OTLP_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` | none |"
    )
    expect(Config.helpText()).toContain("env VDIFF_OTLP_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT")
  })

  it("sends spans to the base URL's /v1/traces, as OTLP/HTTP exporters do", () => {
    expect(tracesUrl("http://collector:4318")).toBe("http://collector:4318/v1/traces")
    expect(tracesUrl("http://collector:4318/")).toBe("http://collector:4318/v1/traces")
    expect(tracesUrl("https://gateway.example/otlp")).toBe("https://gateway.example/otlp/v1/traces")
  })
})
