/**
 * The errors of the API, as OpenAI clients see them: one tagged error per kind, each made by `apiError`
 * from its HTTP status and OpenAI error `type`. Every one renders itself as its response (it is an
 * HttpServerRespondable): the status, the headers its kind implies (Retry-After on 429 and 503,
 * WWW-Authenticate on 401) and the body every error response carries,
 * `{"error": {"message", "type", "param", "code", "request_id"}}`, with the RequestId in context.
 *
 * Neither http/ nor openai/ owns these: both raise them, and http/errorResponses.ts renders them.
 *
 * @since 0.1.0
 */
import { HttpServerRespondable, HttpServerResponse } from "@effect/platform"
import { Effect, Option, Predicate, Schema } from "effect"
import type { YieldableError } from "effect/Cause"
import { RequestId } from "./RequestId.js"

const fields = {
  message: Schema.String,
  param: Schema.optionalWith(Schema.NullOr(Schema.String), { default: () => null }),
  code: Schema.optionalWith(Schema.NullOr(Schema.String), { default: () => null }),
  /** Sent as Retry-After (whole seconds, at least 1) by the kinds that send it; 1 s when absent. */
  retryAfterSeconds: Schema.optional(Schema.Number),
  /** Headers this response adds to those its kind implies (Allow on a 405). */
  headers: Schema.optional(Schema.Record({ key: Schema.String, value: Schema.String }))
}

/** What a kind of API error is: its HTTP status and OpenAI error `type`, and whether it tells when to retry. */
export interface ApiErrorKind {
  readonly status: number
  readonly type: string
  /** Sends Retry-After (429, 503). */
  readonly retryAfter?: boolean
  /** Headers every error of the kind carries. */
  readonly headers?: Readonly<Record<string, string>>
}

/** What an API error is made from; `param` and `code` default to null. */
export interface ApiErrorProps {
  readonly message: string
  readonly param?: string | null
  readonly code?: string | null
  readonly retryAfterSeconds?: number
  readonly headers?: Readonly<Record<string, string>>
}

const ApiErrorTypeId: unique symbol = Symbol.for("vdiff/ApiError")

export interface ApiError<Tag extends string = string> extends YieldableError, HttpServerRespondable.Respondable {
  readonly [ApiErrorTypeId]: ApiErrorKind
  readonly _tag: Tag
  readonly status: number
  readonly type: string
  readonly message: string
  readonly param: string | null
  readonly code: string | null
  readonly retryAfterSeconds?: number | undefined
  readonly headers?: Readonly<Record<string, string>> | undefined
}

export interface ApiErrorClass<Tag extends string> {
  new (props: ApiErrorProps): ApiError<Tag>
}

export const isApiError = (u: unknown): u is ApiError => Predicate.hasProperty(u, ApiErrorTypeId)

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

/** The response for an API error: its status, the headers its kind implies and its own, and the body. */
export const errorResponse = (error: ApiError, requestId: string | null): HttpServerResponse.HttpServerResponse => {
  const kind = error[ApiErrorTypeId]
  const retryAfter: Record<string, string> =
    kind.retryAfter === true ? { "retry-after": String(Math.max(1, Math.ceil(error.retryAfterSeconds ?? 1))) } : {}
  return HttpServerResponse.unsafeJson(toErrorBody(error, requestId), {
    status: error.status,
    headers: { ...retryAfter, ...kind.headers, ...error.headers }
  })
}

/**
 * A kind of API error, as a class: `class`-like use (`new BadRequest({ message, param })`, `yield*` in
 * Effect.gen, `catchTag("BadRequest", ...)`, `instanceof`) as with any Schema.TaggedError.
 */
export const apiError = <const Tag extends string>(tag: Tag, kind: ApiErrorKind): ApiErrorClass<Tag> => {
  class Kind extends Schema.TaggedError<Kind>()(tag as string, fields) {
    get [ApiErrorTypeId]() {
      return kind
    }
    get status() {
      return kind.status
    }
    get type() {
      return kind.type
    }
    /** The response, with the request id when the request-id middleware is around. */
    [HttpServerRespondable.symbol]() {
      return Effect.map(Effect.serviceOption(RequestId), (id) => errorResponse(this, Option.getOrNull(id)))
    }
  }
  return Kind as unknown as ApiErrorClass<Tag>
}

/** 400: the request is malformed or asks for something invalid (never 422). */
export const BadRequest = apiError("BadRequest", { status: 400, type: "invalid_request_error" })
export type BadRequest = InstanceType<typeof BadRequest>

/** 401: no API key, or an unknown one, where one is required. OpenAI's type for it is invalid_request_error. */
export const Unauthorized = apiError("Unauthorized", {
  status: 401,
  type: "invalid_request_error",
  headers: { "www-authenticate": `Bearer realm="vdiff"` }
})
export type Unauthorized = InstanceType<typeof Unauthorized>

/**
 * 403: understood and refused — a browser origin the server does not allow (CORS). A missing or unknown API
 * key is 401 (Unauthorized), as OpenAI answers.
 */
export const Forbidden = apiError("Forbidden", { status: 403, type: "permission_error" })
export type Forbidden = InstanceType<typeof Forbidden>

/** 404: unknown model or route (OpenAI's type for both is invalid_request_error; `code` tells them apart). */
export const NotFound = apiError("NotFound", { status: 404, type: "invalid_request_error" })
export type NotFound = InstanceType<typeof NotFound>

/** 405: the route exists, the method does not (the response carries Allow). */
export const MethodNotAllowed = apiError("MethodNotAllowed", { status: 405, type: "invalid_request_error" })
export type MethodNotAllowed = InstanceType<typeof MethodNotAllowed>

/** 413: the body is over the size limit. */
export const PayloadTooLarge = apiError("PayloadTooLarge", { status: 413, type: "invalid_request_error" })
export type PayloadTooLarge = InstanceType<typeof PayloadTooLarge>

/** 429: the client is over its rate limit; retry after `retryAfterSeconds`. */
export const RateLimited = apiError("RateLimited", { status: 429, type: "rate_limit_error", retryAfter: true })
export type RateLimited = InstanceType<typeof RateLimited>

/** 500: the engine or the server failed. */
export const InternalError = apiError("InternalError", { status: 500, type: "server_error" })
export type InternalError = InstanceType<typeof InternalError>

/** 503: the queue is full, the model is not loaded yet, or the server is draining. */
export const ServiceUnavailable = apiError("ServiceUnavailable", {
  status: 503,
  type: "service_unavailable_error",
  retryAfter: true
})
export type ServiceUnavailable = InstanceType<typeof ServiceUnavailable>

/** 504: the request ran past its deadline. */
export const GatewayTimeout = apiError("GatewayTimeout", { status: 504, type: "timeout_error" })
export type GatewayTimeout = InstanceType<typeof GatewayTimeout>
