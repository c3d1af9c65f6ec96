/**
 * The OpenAI-compatible routes. Thin: each decodes its body with the protocol schema and hands it to the
 * serving code. Handlers fail with ApiError (the HTTP layer renders it as the error body and status) and
 * need, besides what the router provides, the Scheduler, the Tokenizer, the ChatFormatter, the
 * ServingConfig and the request's RequestId.
 *
 *   POST /v1/completions        POST /v1/chat/completions     POST /v1/responses
 *   GET  /v1/models             GET  /v1/models/{model}
 *   POST /tokenize              POST /detokenize
 *
 * Streaming responses keep pulling from the scheduler inside the request's Scope (which the platform
 * closes after the body is written) — so the router must not be wrapped in `Effect.scoped`.
 */
import { HttpRouter } from "@effect/platform"
import { Effect } from "effect"
import { errorTypeOf, tracked } from "../telemetry/requests.js"
import { decodeJsonBody } from "./body.js"
import { chatCompletions } from "./chat.js"
import { completions } from "./completions.js"
import { listModels, retrieveModel } from "./models.js"
import { ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ResponseRequest, TokenizeRequest } from "./protocol.js"
import { responses } from "./responses.js"
import { detokenize, tokenize } from "./tokenization.js"

export const router = HttpRouter.empty.pipe(
  // Generation requests are counted and timed from here to their last byte (telemetry/requests.ts).
  HttpRouter.post("/v1/completions", tracked(Effect.flatMap(decodeJsonBody(CompletionRequest), completions), errorTypeOf)),
  HttpRouter.post("/v1/chat/completions", tracked(Effect.flatMap(decodeJsonBody(ChatCompletionRequest), chatCompletions), errorTypeOf)),
  HttpRouter.post("/v1/responses", tracked(Effect.flatMap(decodeJsonBody(ResponseRequest), responses), errorTypeOf)),
  HttpRouter.get("/v1/models", listModels),
  HttpRouter.get(
    "/v1/models/:model",
    Effect.flatMap(HttpRouter.params, (params) => retrieveModel(params["model"] ?? ""))
  ),
  HttpRouter.post("/tokenize", Effect.flatMap(decodeJsonBody(TokenizeRequest), tokenize)),
  HttpRouter.post("/detokenize", Effect.flatMap(decodeJsonBody(DetokenizeRequest), detokenize))
)
