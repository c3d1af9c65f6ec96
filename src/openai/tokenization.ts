/**
 * vLLM's POST /tokenize and /detokenize: the tokens a prompt or a conversation becomes (exactly what
 * completions and chat completions would submit), and the text of token ids.
 */
import { HttpServerResponse } from "@effect/platform"
import { Effect } from "effect"
import { Tokenizer } from "../tokenizer/Tokenizer.js"
import { renderMessages } from "./chat.js"
import { BadRequest } from "../api/errors.js"
import type { DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse } from "./protocol.js"
import { checkModel, checkTokenIds } from "./plan.js"
import { ServingConfig } from "./ServingConfig.js"

export const tokenize = (request: TokenizeRequest) =>
  Effect.gen(function* () {
    const tokenizer = yield* Tokenizer
    const config = yield* ServingConfig
    yield* checkModel(request.model)
    if ((request.prompt === undefined) === (request.messages === undefined)) {
      return yield* new BadRequest({ message: "give either prompt or messages", param: "prompt" })
    }
    const tokens =
      request.messages !== undefined
        ? yield* renderMessages(request.messages, {
            addGenerationPrompt: request.add_generation_prompt ?? true,
            tools: request.tools,
            ...(request.add_special_tokens === undefined ? {} : { addSpecialTokens: request.add_special_tokens })
          })
        : tokenizer.encode(request.prompt!, { addSpecialTokens: request.add_special_tokens ?? true })
    return HttpServerResponse.unsafeJson({
      count: tokens.length,
      max_model_len: config.maxModelLen,
      tokens: [...tokens]
    } satisfies TokenizeResponse)
  })

export const detokenize = (request: DetokenizeRequest) =>
  Effect.gen(function* () {
    const tokenizer = yield* Tokenizer
    yield* checkModel(request.model)
    if (request.tokens.length > 0) yield* checkTokenIds(request.tokens, "tokens", tokenizer)
    return HttpServerResponse.unsafeJson({ prompt: tokenizer.decode(request.tokens) } satisfies DetokenizeResponse)
  })
