/** Why the scheduler turned a request away or ended it. */
import { Schema } from "effect"

/** The admission queue is full; the client should retry later (503 with Retry-After). */
export class QueueFull extends Schema.TaggedError<QueueFull>()("QueueFull", {
  message: Schema.String,
  retryAfterSeconds: Schema.Number
}) {}

/** The server is draining for shutdown and admits nothing new (503). */
export class Draining extends Schema.TaggedError<Draining>()("Draining", {
  message: Schema.String
}) {}

/** The request ran past its deadline (504). */
export class RequestTimeout extends Schema.TaggedError<RequestTimeout>()("RequestTimeout", {
  message: Schema.String,
  timeoutMs: Schema.Number
}) {}
