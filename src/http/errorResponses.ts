/**
 * Every failure becomes a response here, with the body every error carries,
 * `{"error": {"message", "type", "param", "code", "request_id"}}`:
 *  - an API error (api/errors.ts, from the handlers and the middleware) renders itself: its own status,
 *    Retry-After on 429 and 503, WWW-Authenticate on 401;
 *  - RouteNotFound from the router: 404, or 405 with Allow when the path exists for other methods;
 *  - a request body that could not be read: 400;
 *  - anything else (a bug): 500 with a generic message; the cause is logged, not sent.
 * Interruption (the client went away) is left alone: there is no one to answer.
 *
 * It runs inside the request-id middleware, so the bodies carry the request id.
 *
 * @since 0.1.0
 */
import { type HttpApp, HttpServerRequest, HttpServerRespondable } from "@effect/platform"
import { Cause, Effect, Option } from "effect"
import { BadRequest, InternalError, isApiError, MethodNotAllowed, NotFound } from "../api/errors.js"
import type { RequestId } from "../api/RequestId.js"
import { pathOf } from "./middleware.js"
import type { RouteTable } from "./routeTable.js"

const isTagged = (u: unknown, tag: string): boolean => typeof u === "object" && u !== null && "_tag" in u && u._tag === tag

/** The API error a failure that is not one stands for: from the router, the body reader, or a bug. */
const asApiError = (failure: unknown, request: HttpServerRequest.HttpServerRequest, routes: RouteTable) => {
  if (isTagged(failure, "RouteNotFound")) {
    const path = pathOf(request.url)
    const found = routes.find(path)
    if (found === undefined) {
      return new NotFound({ message: `no route ${request.method} ${path}`, code: "route_not_found" })
    }
    const allow = found.methods.join(", ")
    return new MethodNotAllowed({
      message: `method ${request.method} is not allowed on ${path} (allowed: ${allow})`,
      code: "method_not_allowed",
      headers: { allow }
    })
  }
  if (isTagged(failure, "RequestError")) return new BadRequest({ message: "the request body could not be read" })
  return undefined
}

/** Turns every failure of `app` into an error response (see the module comment). */
export const renderErrors =
  (routes: RouteTable) =>
  <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<never, R | RequestId> =>
    Effect.catchAllCause(app, (cause) =>
      Effect.gen(function* () {
        if (Cause.isInterruptedOnly(cause)) return yield* Effect.failCause(cause as Cause.Cause<never>)
        const request = yield* HttpServerRequest.HttpServerRequest
        const failure = Option.getOrUndefined(Cause.failureOption(cause))
        const error = isApiError(failure) ? failure : asApiError(failure, request, routes)
        if (error !== undefined) return yield* HttpServerRespondable.toResponse(error)
        yield* Effect.logError("unhandled failure", cause)
        return yield* HttpServerRespondable.toResponse(new InternalError({ message: "internal server error", code: "internal_error" }))
      })
    )
