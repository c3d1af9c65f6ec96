/**
 * The engine's failures as tagged errors. Each native error code of the addon maps to one of these, so
 * callers can `Effect.catchTag` on what went wrong instead of parsing messages.
 */
import { Schema } from "effect"
import { requestFieldOfNative } from "../config/sampling.js"

/** The model directory, its config.json or its safetensors cannot be used. */
export class ModelLoadError extends Schema.TaggedError<ModelLoadError>()("ModelLoadError", {
  message: Schema.String
}) {}

/** A request the engine refuses: bad sampling settings, a prompt over the context, token ids out of range. */
export class InvalidRequestError extends Schema.TaggedError<InvalidRequestError>()("InvalidRequestError", {
  message: Schema.String,
  param: Schema.optional(Schema.String)
}) {}

/** The engine failed while working (out of memory, an internal fault); only the sequences involved fail. */
export class EngineFailure extends Schema.TaggedError<EngineFailure>()("EngineFailure", {
  message: Schema.String,
  code: Schema.String
}) {}

export type EngineError = ModelLoadError | InvalidRequestError | EngineFailure

/** Reads the `.code` that the addon puts on its errors ("VDIFF_INVALID_MODEL", ...). */
export const nativeErrorCode = (cause: unknown): string =>
  typeof cause === "object" && cause !== null && "code" in cause && typeof cause.code === "string" ? cause.code : "VDIFF_INTERNAL"

export const nativeErrorMessage = (cause: unknown): string => (cause instanceof Error ? cause.message : String(cause))

/**
 * The request field at fault in a native error: the addon's `.param` (the C++ name) as the request names
 * it (gen_length → max_tokens); inputs (prompt, suffix, template) keep their names.
 */
export const nativeErrorParam = (cause: unknown): string | undefined => {
  if (typeof cause !== "object" || cause === null || !("param" in cause) || typeof cause.param !== "string") return undefined
  return requestFieldOfNative(cause.param) ?? cause.param
}

/** Turns whatever the addon threw into the tagged error it stands for. */
export const fromNative = (cause: unknown): EngineError => {
  const code = nativeErrorCode(cause)
  const message = nativeErrorMessage(cause)
  switch (code) {
    case "VDIFF_INVALID_MODEL":
      return new ModelLoadError({ message })
    case "VDIFF_INVALID_ARGUMENT": {
      const param = nativeErrorParam(cause)
      return new InvalidRequestError(param === undefined ? { message } : { message, param })
    }
    default:
      return new EngineFailure({ message, code })
  }
}
