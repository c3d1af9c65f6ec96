/**
 * Logs as one JSON object per line on stdout — `{"time", "level", "message", ...annotations}` — so the
 * access log, the ready line and errors can be read by people and by log collectors alike.
 *
 * @since 0.1.0
 */
import { Cause, HashMap, Layer, Logger, LogLevel } from "effect"
import type { LogLevelName } from "../config/Config.js"

const messageText = (message: unknown): unknown => {
  const parts = Array.isArray(message) ? message : [message]
  return parts.length === 1 ? parts[0] : parts
}

export const jsonLogger = Logger.make(({ annotations, cause, date, logLevel, message }) => {
  const entry: Record<string, unknown> = {
    time: date.toISOString(),
    level: logLevel.label.toLowerCase(),
    message: messageText(message)
  }
  for (const [key, value] of HashMap.toEntries(annotations)) entry[key] = value
  if (!Cause.isEmpty(cause)) entry["cause"] = Cause.pretty(cause, { renderErrorCause: true })
  process.stdout.write(JSON.stringify(entry) + "\n")
})

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

/** JSON lines at `level` and above, replacing Effect's default logger. */
export const layer = (level: LogLevelName): Layer.Layer<never> =>
  Layer.merge(Logger.replace(Logger.defaultLogger, jsonLogger), Logger.minimumLogLevel(levels[level]))
