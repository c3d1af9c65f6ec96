/**
 * The HTTP answer when the model host has no model to serve: 503 with Retry-After, the host's message and
 * a code per state — model_not_ready while loading, draining at shutdown (both: retry in 5 s),
 * model_load_failed when loading failed (retry in 60 s: someone has to fix the model first).
 *
 * @since 0.1.0
 */
import { Effect } from "effect"
import { ServiceUnavailable } from "../api/errors.js"
import type { ModelUnavailable } from "./ModelHost.js"

const answers = {
  loading: { code: "model_not_ready", retryAfterSeconds: 5 },
  draining: { code: "draining", retryAfterSeconds: 5 },
  error: { code: "model_load_failed", retryAfterSeconds: 60 }
} as const

export const toServiceUnavailable = (error: ModelUnavailable): ServiceUnavailable =>
  new ServiceUnavailable({ message: error.message, ...answers[error.state] })

/** `effect`, failing with the 503 instead of ModelUnavailable. */
export const orServiceUnavailable = <A, R>(effect: Effect.Effect<A, ModelUnavailable, R>): Effect.Effect<A, ServiceUnavailable, R> =>
  Effect.mapError(effect, toServiceUnavailable)
