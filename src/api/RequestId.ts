/**
 * The id of the HTTP request being served: taken from a sane incoming X-Request-ID or generated. The
 * request-id middleware provides it; handlers read it for response ids (`cmpl-<id>`) and error bodies.
 */
import { Context } from "effect"

export class RequestId extends Context.Tag("vdiff/RequestId")<RequestId, string>() {}
