/**
 * Logs as one JSON object per line on stdout, so the access log, the ready line and errors can be read
 * by people and by log collectors alike:
 *
 *   {"timestamp":"2025-01-01T12:00:00.000Z","level":"info","message":"request","request_id":"9f…",
 *    "trace_id":"4bf9…","span_id":"00f0…","method":"POST","path":"/v1/completions","status":200,…}
 *
 * timestamp, level and message come first; trace_id and span_id when the line is written inside a
 * recorded span (tracing on, see telemetry/Telemetry.ts), so a log line leads to its trace; then the
 * annotations (request_id, which the request-id middleware sets, and each line's own fields); `cause`
 * last, for failures.
 *
 * @since 0.1.0
 */
import { Cause, Context, FiberRef, FiberRefs, HashMap, Layer, Logger, LogLevel, Tracer } from "effect"
import type { LogLevelName } from "../config/Config.js"

const messageText = (message: unknown): unknown => {
  // An Error would serialize as {}: it is written as its name and message.
  const parts = (Array.isArray(message) ? message : [message]).map((part) => (part instanceof Error ? String(part) : part))
  return parts.length === 1 ? parts[0] : parts
}

/** The span the line is written in, when it is one that is recorded (not a no-op span). */
const recordedSpan = (context: FiberRefs.FiberRefs): Tracer.AnySpan | undefined => {
  const span = Context.getOption(FiberRefs.getOrDefault(context, FiberRef.currentContext), Tracer.ParentSpan)
  return span._tag === "Some" && span.value.sampled ? span.value : undefined
}

/** A JSON-lines logger writing each line with `write`. */
export const makeJsonLogger = (write: (line: string) => void) =>
  Logger.make(({ annotations, cause, context, date, logLevel, message }) => {
    const entry: Record<string, unknown> = {
      timestamp: date.toISOString(),
      level: logLevel.label.toLowerCase(),
      message: messageText(message)
    }
    const span = recordedSpan(context)
    if (span !== undefined) {
      entry["trace_id"] = span.traceId
      entry["span_id"] = span.spanId
    }
    for (const [key, value] of HashMap.toEntries(annotations)) entry[key] = value
    if (!Cause.isEmpty(cause)) entry["cause"] = Cause.pretty(cause, { renderErrorCause: true })
    write(JSON.stringify(entry) + "\n")
  })

export const jsonLogger = makeJsonLogger((line) => process.stdout.write(line))

const levels: Record<LogLevelName, LogLevel.LogLevel> = {
  all: LogLevel.All,
  trace: LogLevel.Trace,
  debug: LogLevel.Debug,
  info: LogLevel.Info,
  warning: LogLevel.Warning,
  error: LogLevel.Error,
  fatal: LogLevel.Fatal,
  none: LogLevel.None
}

/** JSON lines at `level` and above (--log-level), replacing Effect's default logger. */
export const layer = (level: LogLevelName, logger: Logger.Logger<unknown, void> = jsonLogger): Layer.Layer<never> =>
  Layer.merge(Logger.replace(Logger.defaultLogger, logger), Logger.minimumLogLevel(levels[level]))
