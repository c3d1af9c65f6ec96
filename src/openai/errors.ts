/**
 * Every way a request can fail, as one tagged error per kind. Each knows its HTTP status and its OpenAI
 * error `type`; `toErrorBody` renders the body every error response carries:
 * `{"error": {"message", "type", "param", "code", "request_id"}}`.
 */
import { Schema } from "effect"
import type { EngineError } from "../engine/errors.js"
import type { GenerationError } from "../scheduler/Scheduler.js"

const fields = {
  message: Schema.String,
  param: Schema.optionalWith(Schema.NullOr(Schema.String), { default: () => null }),
  code: Schema.optionalWith(Schema.NullOr(Schema.String), { default: () => null })
}

/** 400: the request is malformed or asks for something invalid (never 422). */
export class BadRequest extends Schema.TaggedError<BadRequest>()("BadRequest", fields) {
  get status() { return 400 }
  get type() { return "invalid_request_error" }
}

/** 401: no API key was given where one is required. */
export class Unauthorized extends Schema.TaggedError<Unauthorized>()("Unauthorized", fields) {
  get status() { return 401 }
  get type() { return "authentication_error" }
}

/** 403: the API key given is not one of the server's. */
export class Forbidden extends Schema.TaggedError<Forbidden>()("Forbidden", fields) {
  get status() { return 403 }
  get type() { return "permission_error" }
}

/** 404: unknown model or route. */
export class NotFound extends Schema.TaggedError<NotFound>()("NotFound", fields) {
  get status() { return 404 }
  get type() { return "not_found_error" }
}

/** 405: the route exists, the method does not. */
export class MethodNotAllowed extends Schema.TaggedError<MethodNotAllowed>()("MethodNotAllowed", fields) {
  get status() { return 405 }
  get type() { return "invalid_request_error" }
}

/** 413: the body is over the size limit. */
export class PayloadTooLarge extends Schema.TaggedError<PayloadTooLarge>()("PayloadTooLarge", fields) {
  get status() { return 413 }
  get type() { return "invalid_request_error" }
}

/** 429: the client is over its rate limit; retry after `retryAfterSeconds`. */
export class RateLimited extends Schema.TaggedError<RateLimited>()("RateLimited", {
  ...fields,
  retryAfterSeconds: Schema.Number
}) {
  get status() { return 429 }
  get type() { return "rate_limit_error" }
}

/** 500: the engine or the server failed. */
export class InternalError extends Schema.TaggedError<InternalError>()("InternalError", fields) {
  get status() { return 500 }
  get type() { return "server_error" }
}

/** 503: the queue is full, the model is not loaded yet, or the server is draining. */
export class ServiceUnavailable extends Schema.TaggedError<ServiceUnavailable>()("ServiceUnavailable", {
  ...fields,
  retryAfterSeconds: Schema.optional(Schema.Number)
}) {
  get status() { return 503 }
  get type() { return "service_unavailable_error" }
}

/** 504: the request ran past its deadline. */
export class GatewayTimeout extends Schema.TaggedError<GatewayTimeout>()("GatewayTimeout", fields) {
  get status() { return 504 }
  get type() { return "timeout_error" }
}

export type ApiError =
  | BadRequest
  | Unauthorized
  | Forbidden
  | NotFound
  | MethodNotAllowed
  | PayloadTooLarge
  | RateLimited
  | InternalError
  | ServiceUnavailable
  | GatewayTimeout

export interface ErrorBody {
  readonly error: {
    readonly message: string
    readonly type: string
    readonly param: string | null
    readonly code: string | null
    readonly request_id: string | null
  }
}

export const toErrorBody = (error: ApiError, requestId: string | null): ErrorBody => ({
  error: { message: error.message, type: error.type, param: error.param, code: error.code, request_id: requestId }
})

/** The API error a scheduler or engine failure stands for. */
export const fromGenerationError = (error: GenerationError | EngineError): ApiError => {
  switch (error._tag) {
    case "InvalidRequestError":
      return new BadRequest({ message: error.message, param: error.param ?? null })
    case "QueueFull":
      return new ServiceUnavailable({
        message: error.message,
        code: "queue_full",
        retryAfterSeconds: error.retryAfterSeconds
      })
    case "Draining":
      return new ServiceUnavailable({ message: error.message, code: "draining" })
    case "RequestTimeout":
      return new GatewayTimeout({ message: error.message, code: "timeout" })
    case "ModelLoadError":
      return new ServiceUnavailable({ message: error.message, code: "model_not_loaded" })
    case "EngineFailure":
      // Out of memory (a KV cache beyond what is left of the budget, an allocation refused) is the
      // server's capacity, not a fault: the client may retry.
      return error.code === "VDIFF_OUT_OF_MEMORY"
        ? new ServiceUnavailable({ message: error.message, code: "out_of_memory" })
        : new InternalError({ message: error.message, code: error.code.toLowerCase() })
  }
}
