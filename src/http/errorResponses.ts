/**
 * Every failure becomes a response here, with the body every error carries,
 * `{"error": {"message", "type", "param", "code", "request_id"}}`:
 *  - ApiError (from the handlers and the middleware): its own status; Retry-After on 429 and 503,
 *    WWW-Authenticate on 401;
 *  - RouteNotFound from the router: 404, or 405 with Allow when the path exists for other methods;
 *  - a request body that could not be read: 400;
 *  - anything else (a bug): 500 with a generic message; the cause is logged, not sent.
 * Interruption (the client went away) is left alone: there is no one to answer.
 *
 * @since 0.1.0
 */
import { type HttpApp, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { Cause, Effect, Option } from "effect"
import {
  type ApiError,
  BadRequest,
  Forbidden,
  GatewayTimeout,
  InternalError,
  MethodNotAllowed,
  NotFound,
  PayloadTooLarge,
  RateLimited,
  ServiceUnavailable,
  Unauthorized,
  toErrorBody
} from "../openai/errors.js"
import { pathOf } from "./middleware.js"
import { RequestId } from "./RequestId.js"
import type { RouteTable } from "./routeTable.js"

const apiErrorClasses = [
  BadRequest,
  Unauthorized,
  Forbidden,
  NotFound,
  MethodNotAllowed,
  PayloadTooLarge,
  RateLimited,
  InternalError,
  ServiceUnavailable,
  GatewayTimeout
]

export const isApiError = (u: unknown): u is ApiError => apiErrorClasses.some((c) => u instanceof c)

/** The response for an API error; `headers` adds to the ones the error implies. */
export const errorResponse = (
  error: ApiError,
  requestId: string | null,
  headers: Record<string, string> = {}
): HttpServerResponse.HttpServerResponse => {
  const implied: Record<string, string> = {}
  if (error._tag === "RateLimited" || error._tag === "ServiceUnavailable") {
    implied["retry-after"] = String(Math.max(1, Math.ceil(error.retryAfterSeconds ?? 1)))
  }
  if (error._tag === "Unauthorized") implied["www-authenticate"] = `Bearer realm="vdiff"`
  return HttpServerResponse.unsafeJson(toErrorBody(error, requestId), {
    status: error.status,
    headers: { ...implied, ...headers }
  })
}

const isTagged = (u: unknown, tag: string): boolean =>
  typeof u === "object" && u !== null && "_tag" in u && u._tag === tag

/** Turns every failure of `app` into an error response (see the module comment). */
export const renderErrors = (routes: RouteTable) =>
<E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<never, R | RequestId> =>
  Effect.catchAllCause(app, (cause) =>
    Effect.gen(function*() {
      if (Cause.isInterruptedOnly(cause)) return yield* Effect.failCause(cause as Cause.Cause<never>)
      const requestId = yield* RequestId
      const request = yield* HttpServerRequest.HttpServerRequest
      const failure = Option.getOrUndefined(Cause.failureOption(cause))
      if (isApiError(failure)) return errorResponse(failure, requestId)
      if (isTagged(failure, "RouteNotFound")) {
        const path = pathOf(request.url)
        const found = routes.find(path)
        if (found === undefined) {
          return errorResponse(
            new NotFound({ message: `no route ${request.method} ${path}`, code: "route_not_found" }),
            requestId
          )
        }
        const allow = found.methods.join(", ")
        return errorResponse(
          new MethodNotAllowed({
            message: `method ${request.method} is not allowed on ${path} (allowed: ${allow})`,
            code: "method_not_allowed"
          }),
          requestId,
          { allow }
        )
      }
      if (isTagged(failure, "RequestError")) {
        return errorResponse(new BadRequest({ message: "the request body could not be read" }), requestId)
      }
      yield* Effect.logError("unhandled failure", cause)
      return errorResponse(new InternalError({ message: "internal server error", code: "internal_error" }), requestId)
    }))
