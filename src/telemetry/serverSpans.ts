/**
 * What @effect/platform's HTTP tracer leaves to the exporter, put right as each server span ends (a span
 * processor's `onEnding`, where the span is still open):
 *
 * - Status from the HTTP status, as OpenTelemetry's HTTP conventions ask of a server span: 5xx is an
 *   error (with `error.type` the status code), 4xx is left unset (the client's fault, not the server's).
 *   The platform ends every span whose handler succeeded as OK, and this server renders its errors as
 *   responses, so a 503 or a 504 was exported as OK and escaped error views and tail sampling. The SDK
 *   treats OK as final, so the status is replaced, not set.
 * - A client that went away before its response was complete (`vdiff.client_gone`, set by the access log,
 *   which counts it as 499): status unset, not OK — the response did not go out whole, and not by the
 *   server's fault.
 * - Credentials out of the attributes: the platform redacts only the authorization, cookie and x-api-key
 *   headers; the `api-key` header (Azure-style OpenAI clients) and Proxy-Authorization are redacted here
 *   too, and so are query parameters that carry keys or tokens in `url.full` and `url.query`.
 */
import { SpanKind, SpanStatusCode } from "@opentelemetry/api"
import type { ReadableSpan, Span, SpanProcessor } from "@opentelemetry/sdk-trace-base"

const REDACTED = "REDACTED"
/** Request and response header attributes that carry credentials (lower case, as the platform writes them). */
const secretHeaders = ["api-key", "proxy-authorization", "x-goog-api-key"]
/** Query parameters whose values are credentials. */
const secretParameter = /^(api[-_]?key|key|access[-_]?token|token|auth|authorization|password|secret)$/i

/** A query string ("a=1&api_key=x") with the values of secret parameters replaced. */
export const redactQuery = (query: string): string =>
  query
    .split("&")
    .map((pair) => {
      const at = pair.indexOf("=")
      const name = at < 0 ? pair : pair.slice(0, at)
      let decoded = name
      try {
        decoded = decodeURIComponent(name.replace(/\+/g, " "))
      } catch {
        // not valid percent-encoding: judged as written
      }
      return at >= 0 && secretParameter.test(decoded) ? `${name}=${REDACTED}` : pair
    })
    .join("&")

const redactUrl = (url: string): string => {
  const at = url.indexOf("?")
  if (at < 0) return url
  const hash = url.indexOf("#", at)
  const end = hash < 0 ? url.length : hash
  return url.slice(0, at + 1) + redactQuery(url.slice(at + 1, end)) + url.slice(end)
}

/** The span processor; put it first, so that the exporting processors see the spans as it leaves them. */
export const serverSpanConventions = (): SpanProcessor => ({
  onStart: () => undefined,
  onEnding: (span: Span) => {
    if (span.kind !== SpanKind.SERVER) return
    const attributes = span.attributes
    for (const name of secretHeaders) {
      for (const side of ["request", "response"]) {
        const key = `http.${side}.header.${name}`
        if (attributes[key] !== undefined) span.setAttribute(key, REDACTED)
      }
    }
    const query = attributes["url.query"]
    if (typeof query === "string") span.setAttribute("url.query", redactQuery(query))
    const full = attributes["url.full"]
    if (typeof full === "string") span.setAttribute("url.full", redactUrl(full))
    const status = Number(attributes["http.response.status_code"])
    if (attributes["vdiff.client_gone"] === true) {
      ;(span as { status: ReadableSpan["status"] }).status = { code: SpanStatusCode.UNSET }
    } else if (status >= 500) {
      span.setAttribute("error.type", String(status))
      ;(span as { status: ReadableSpan["status"] }).status = { code: SpanStatusCode.ERROR, message: `HTTP ${status}` }
    } else if (status >= 400) {
      ;(span as { status: ReadableSpan["status"] }).status = { code: SpanStatusCode.UNSET }
    }
  },
  onEnd: () => undefined,
  forceFlush: () => Promise.resolve(),
  shutdown: () => Promise.resolve()
})
