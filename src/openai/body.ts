/**
 * Reads a JSON request body with a schema. Every way it can be wrong is a 400 whose `param` names the
 * field at fault ("temperature", "messages[0].content") and whose message says what is expected.
 */
import { HttpServerRequest } from "@effect/platform"
import type { RequestError } from "@effect/platform/HttpServerError"
import { Effect, ParseResult, Schema } from "effect"
import { BadRequest, PayloadTooLarge } from "../api/errors.js"

/** A path of the decoded value as a parameter name: ["messages", 0, "content"] → "messages[0].content". */
export const paramOf = (path: ReadonlyArray<PropertyKey>): string | null => {
  let param = ""
  for (const key of path) {
    param += typeof key === "number" ? `[${key}]` : param === "" ? String(key) : `.${String(key)}`
  }
  return param === "" ? null : param
}

/** The first issue of a parse error, as a BadRequest. */
export const fromParseError = (error: ParseResult.ParseError): BadRequest => {
  const issue = ParseResult.ArrayFormatter.formatErrorSync(error)[0]
  const param = issue === undefined ? null : paramOf(issue.path)
  if (issue === undefined) return new BadRequest({ message: "invalid request body" })
  const message = issue._tag === "Missing" ? `${param ?? "a field"} is required` : issue.message
  return new BadRequest({ message, param })
}

const fromRequestError = (error: RequestError) => {
  // The platform stops reading a body over its size limit (IncomingMessage.MaxBodySize) with this error.
  if (error.cause instanceof Error && error.cause.message === "maxBytes exceeded") {
    return new PayloadTooLarge({ message: "the request body is too large" })
  }
  return error.reason === "Decode"
    ? new BadRequest({ message: "the request body is not valid JSON" })
    : new BadRequest({ message: "the request body could not be read" })
}

const isObject = (value: unknown): value is Record<string, unknown> => typeof value === "object" && value !== null && !Array.isArray(value)

/**
 * How deep a body may nest: far more than any request needs (messages[i].content[j].text is 5 deep).
 * Deeper bodies are refused before decoding, because describing what is wrong with a value (the schema's
 * error formatting) recurses through it and would overflow the stack on a body nested thousands deep.
 */
export const MAX_BODY_DEPTH = 64

/** Whether `value` nests objects or arrays more than `limit` deep (checked without recursion). */
const nestsDeeperThan = (value: unknown, limit: number): boolean => {
  const pending: Array<[unknown, number]> = [[value, 1]]
  while (pending.length > 0) {
    const [item, depth] = pending.pop()!
    if (typeof item !== "object" || item === null) continue
    if (depth > limit) return true
    for (const child of Object.values(item)) pending.push([child, depth + 1])
  }
  return false
}

export const decodeJsonBody = <A, I>(schema: Schema.Schema<A, I>) =>
  Effect.gen(function* () {
    const request = yield* HttpServerRequest.HttpServerRequest
    const body = yield* Effect.mapError(request.json, fromRequestError)
    if (!isObject(body)) return yield* new BadRequest({ message: "the request body must be a JSON object" })
    if (nestsDeeperThan(body, MAX_BODY_DEPTH)) {
      return yield* new BadRequest({ message: `the request body nests deeper than ${MAX_BODY_DEPTH} levels` })
    }
    return yield* Effect.mapError(Schema.decodeUnknown(schema)(body), fromParseError)
  })
