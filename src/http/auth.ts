/**
 * API key authentication: `Authorization: Bearer <key>` against the keys of --api-key. No keys configured:
 * no authentication. A missing or malformed header is 401 `missing_api_key`, a key that is not one of ours
 * 401 `invalid_api_key` (both with WWW-Authenticate), as OpenAI and vLLM answer: clients raise their
 * authentication error for it (the openai SDK's AuthenticationError). 403 is kept for what it means, a
 * client that is known but not allowed (http/middleware.ts: a refused CORS origin); every key of
 * --api-key may use every route, so auth itself never answers 403. The key is never echoed back. Public
 * paths (probes, /version, /metrics, GET /) and CORS preflights need no key.
 *
 * @since 0.1.0
 */
import { createHash, timingSafeEqual } from "node:crypto"
import { type HttpApp, HttpServerRequest } from "@effect/platform"
import { Effect } from "effect"
import { Unauthorized } from "../api/errors.js"
import { isPublic } from "./middleware.js"

const digest = (key: string): Buffer => createHash("sha256").update(key, "utf8").digest()

/** The token of an `Authorization: Bearer <token>` header, if that is what the header holds. */
export const bearerToken = (request: HttpServerRequest.HttpServerRequest): string | undefined => {
  const header = request.headers["authorization"]
  const match = header === undefined ? null : /^Bearer[ \t]+(\S+)[ \t]*$/i.exec(header)
  return match?.[1]
}

/**
 * Whether `key` is one of `keys`, in time that does not depend on where a key differs or how long it
 * is: both sides are compared as SHA-256 digests (always 32 bytes) with timingSafeEqual, and every
 * configured key is compared, match or not.
 */
export const makeKeyCheck = (keys: ReadonlyArray<string>) => {
  const digests = keys.map(digest)
  return (key: string): boolean => {
    const given = digest(key)
    let found = false
    for (const d of digests) found = timingSafeEqual(given, d) || found
    return found
  }
}

export const auth = (keys: ReadonlyArray<string>) => {
  const isKey = makeKeyCheck(keys)
  return <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | Unauthorized, R> =>
    keys.length === 0
      ? app
      : Effect.gen(function* () {
          const request = yield* HttpServerRequest.HttpServerRequest
          if (isPublic(request) || request.method === "OPTIONS") return yield* app
          const token = bearerToken(request)
          if (token === undefined) {
            return yield* new Unauthorized({
              message: "an API key is required: send it as Authorization: Bearer <key>",
              code: "missing_api_key"
            })
          }
          if (!isKey(token)) {
            return yield* new Unauthorized({
              message: "Incorrect API key provided: send one of this server's keys as Authorization: Bearer <key>",
              code: "invalid_api_key"
            })
          }
          return yield* app
        })
}
